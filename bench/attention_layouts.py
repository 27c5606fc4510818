"""Is the layout of the CPU attention's products a lever? ``layers.attention``'s einsum path (products
on (B, T, N, H) operands, which XLA:CPU hands whole to one YNNPACK fusion) against the same attention
with its forward products heads-major, (B, N, T, H) x (B, N, H, S) after explicit transposes (the
alternative measured here, with the library's hand-written backward), beside PyTorch's
``scaled_dot_product_attention``. Forward alone (sampling) and forward + backward (training), fp32,
alternated rounds, medians, ms:

    python bench/attention_layouts.py                          # the shapes of the bench models
    python bench/attention_layouts.py --shapes 8,128,4,32 8,256,4,32
"""

import argparse

import numpy as np
from attention_chunking import alternated_medians



def heads_major_attention():
    """The alternative: the forward's two products with the heads leading; the backward is the library's."""
    import jax
    import jax.numpy as jnp

    from jdistill.models import layers

    def forward(q, k, v):
        logits = jnp.matmul(jnp.swapaxes(q, 1, 2), jnp.moveaxis(k, 1, 3), preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * jnp.float32(1.0 / np.sqrt(q.shape[-1])), axis=-1)
        out = jnp.swapaxes(jnp.matmul(probs.astype(v.dtype), jnp.swapaxes(v, 1, 2)), 1, 2)
        return out, (q, k, v, None, probs, out)

    attend = jax.custom_vjp(lambda q, k, v: forward(q, k, v)[0])
    attend.defvjp(forward, lambda res, d_out: layers._attention_einsum_bwd(res, d_out)[:3])
    return attend


# (B, T, heads, head width): the digits DiT, dit-cpu, sd3-mmdit-cpu's joint attention, sd15-unet-cpu's
# 32 x 32 self-attention and its text cross-attention, and a sweep of token counts
SHAPES = ["64,16,4,32", "32,64,4,64", "8,333,4,32", "4,1024,2,16", "4,1024,2,16,77", "8,64,4,32", "8,128,4,32",
          "8,256,4,32"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="B,T,heads,width[,S] (S: key length, default T)")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import torch

    from jdistill.models import layers

    print("| B, T, heads, width, S | einsum fwd | heads-major fwd | torch fwd | einsum fwd+bwd "
          "| heads-major fwd+bwd | torch fwd+bwd | max abs difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    forms = {"einsum": lambda q, k, v: layers.attention(q, k, v, implementation="einsum"),
             "heads-major": heads_major_attention()}
    for shape in args.shapes:
        b, t, n, h, *rest = (int(x) for x in shape.split(","))
        s = rest[0] if rest else t
        rng = np.random.default_rng(0)
        q = rng.standard_normal((b, t, n, h)).astype(np.float32)
        k, v = (rng.standard_normal((b, s, n, h)).astype(np.float32) for _ in range(2))
        w = rng.standard_normal((b, t, n, h)).astype(np.float32)
        jq, jk, jv, jw = map(jnp.asarray, (q, k, v, w))
        calls, outs = {}, {}
        for form, attend in forms.items():
            fwd = jax.jit(attend)
            grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * jw), argnums=(0, 1, 2)))
            outs[form] = np.asarray(fwd(jq, jk, jv))
            jax.block_until_ready(grad(jq, jk, jv))
            calls[(form, "fwd")] = lambda f=fwd: jax.block_until_ready(f(jq, jk, jv))
            calls[(form, "both")] = lambda g=grad: jax.block_until_ready(g(jq, jk, jv))
        tq, tk, tv, tw = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v, w))
        tqg, tkg, tvg = (a.clone().requires_grad_() for a in (tq, tk, tv))

        def torch_fwd():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

        def torch_both():
            out = torch.nn.functional.scaled_dot_product_attention(tqg, tkg, tvg)
            torch.autograd.grad((out * tw).sum(), (tqg, tkg, tvg))

        calls[("torch", "fwd")], calls[("torch", "both")] = torch_fwd, torch_both
        torch_fwd(), torch_both()
        med = alternated_medians(calls, args.rounds)
        ms = {key: f"{1000 * val:.2f}" for key, val in med.items()}
        diff = float(np.max(np.abs(outs["einsum"] - outs["heads-major"])))
        print(f"| {b}, {t}, {n}, {h}, {s} | {ms[('einsum', 'fwd')]} | {ms[('heads-major', 'fwd')]} | "
              f"{ms[('torch', 'fwd')]} | {ms[('einsum', 'both')]} | {ms[('heads-major', 'both')]} | "
              f"{ms[('torch', 'both')]} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
