"""Why jdistill's MMDiT CFG sampling is slow on CPU: forward time at batch B and 2B (CFG doubles the
batch), jdistill against diffusers' eager, same config (the bench's sd3-mmdit-cpu), random weights,
rounds alternated, medians.

    python bench/mmdit_batch_scaling.py                        # this round's CPU attention path (einsum)
    python bench/mmdit_batch_scaling.py --attention xla        # jax.nn.dot_product_attention's XLA path
    JDISTILL_REFERENCE_KERNELS=1 python bench/mmdit_batch_scaling.py   # every CPU speed-up off
"""

import argparse

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attention", choices=("einsum", "xla"), default=None)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    from attention_chunking import alternated_medians, bench_module  # this folder's script, on the path when run as above

    from jdistill.models import layers

    if args.attention:
        layers.attention_implementation = lambda *a, **k: args.attention
    spec, module, params = bench_module("sd3-mmdit-cpu")
    rng = np.random.default_rng(1)
    torch_model = diffusers.SD3Transformer2DModel(**spec.config).eval()
    torch.set_grad_enabled(False)
    forward = jax.jit(lambda p, x, t, c, y: module.apply({"params": p}, x, t, encoder_hidden_states=c,
                                                         pooled_projections=y))

    def jax_call(b):
        x = jnp.asarray(rng.standard_normal((b, spec.latent_hw, spec.latent_hw, spec.channels)), jnp.float32)
        c = jnp.asarray(rng.standard_normal((b, spec.text_tokens, spec.text_width)), jnp.float32)
        y = jnp.asarray(rng.standard_normal((b, spec.pooled_width)), jnp.float32)
        t = jnp.full((b,), 500.0)
        jax.block_until_ready(forward(params, x, t, c, y))
        return lambda: jax.block_until_ready(forward(params, x, t, c, y))

    def torch_call(b):
        x, t = torch.randn(b, spec.channels, spec.latent_hw, spec.latent_hw), torch.full((b,), 500.0)
        c, y = torch.randn(b, spec.text_tokens, spec.text_width), torch.randn(b, spec.pooled_width)
        torch_model(hidden_states=x, timestep=t, encoder_hidden_states=c, pooled_projections=y)
        return lambda: torch_model(hidden_states=x, timestep=t, encoder_hidden_states=c, pooled_projections=y)

    b = spec.batch
    calls = {(impl, n): (jax_call if impl == "jdistill" else torch_call)(n)
             for impl in ("jdistill", "eager") for n in (b, 2 * b)}
    med = alternated_medians(calls, args.rounds)
    print(f"attention: {layers.attention_implementation(None, None, None) if args.attention else 'default'}; "
          f"reference kernels: {layers.reference_kernels()}")
    print("| implementation | batch | ms / forward | 2B / B |")
    print("|---|---|---|---|")
    for impl in ("jdistill", "eager"):
        for n in (b, 2 * b):
            ratio = f"{med[(impl, n)] / med[(impl, b)]:.2f}" if n == 2 * b else "-"
            print(f"| {impl} | {n} | {1000 * med[(impl, n)]:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
