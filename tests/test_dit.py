"""DiT in Flax against PyTorch, both weight layouts (fp32, <= 1e-4 relative).

* diffusers: real ``DiTTransformer2DModel``s (every weight re-randomised: diffusers'
  init would leave parts at defaults that hide mistakes), saved with
  ``save_pretrained`` as safetensors, read back, converted, compared output and
  block by block.
* original facebookresearch layout: a compact PyTorch reference written here from
  the paper and the notes, first proven equal to diffusers' model, then used as
  the source checkpoint for the Flax model.
"""

import inspect
import math
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util
from torch import nn as tnn

from jdistill.convert import dit as convert
from jdistill.convert.engine import ConversionError, abstract_params
from jdistill.models import dit as dit_lib
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
HEADS, HEAD_DIM, DEPTH, SIZE, CLASSES = 2, 16, 2, 8, 10
D = HEADS * HEAD_DIM


def randomise(model, std=0.1, seed=0, skip=()):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in skip:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(in_channels, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, SIZE, SIZE, in_channels)).astype(np.float32)  # NHWC
    t = np.array([0.0, 999.0, 437.25], np.float32)[:batch]
    y = np.array([3, CLASSES, 0], np.int64)[:batch]  # CLASSES = the null label
    return x, t, y


def torch_run(model, blocks, x, t, y):
    """NHWC output and each block's output tokens, read with forward hooks."""
    feats = []
    hooks = [b.register_forward_hook(lambda m, i, o: feats.append(o.detach().numpy().copy())) for b in blocks]
    with torch.no_grad():
        out = model(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(y))
    for h in hooks:
        h.remove()
    out = out.sample if hasattr(out, "sample") else out
    return nhwc(out.numpy()), feats


def flax_run(module, params, x, t, y):
    out, state = module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32),
                              mutable=["intermediates"])
    inter = state["intermediates"]
    return np.asarray(out), [np.asarray(inter[f"block_{i}"][0]) for i in range(module.depth)]


def assert_parity(module, params, torch_model, torch_blocks, in_channels, what):
    x, t, y = inputs(in_channels)
    ref, ref_feats = torch_run(torch_model, torch_blocks, x, t, y)
    out, feats = flax_run(module, params, x, t, y)
    assert out.shape == ref.shape == (3, SIZE, SIZE, module.output_channels)
    for i, (a, e) in enumerate(zip(feats, ref_feats)):
        assert_close(a, e, TOL, f"{what}: block {i} tokens")
    assert_close(out, ref, TOL, f"{what}: output")


# ---------------------------------------------------------------- diffusers layout

DIFFUSERS_CASES = {
    "p2-sigma": dict(patch_size=2, out_channels=8),
    "p4-eps": dict(patch_size=4, out_channels=4, norm_eps=1e-6, norm_elementwise_affine=True,
                   activation_fn="gelu"),
}


def tiny_diffusers(**kw):
    cfg = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, num_layers=DEPTH,
               sample_size=SIZE, num_embeds_ada_norm=CLASSES, **kw)
    return randomise(diffusers.DiTTransformer2DModel(**cfg).eval())


@pytest.mark.parametrize("case", sorted(DIFFUSERS_CASES))
def test_diffusers_parity(case, tmp_path):
    model = tiny_diffusers(**DIFFUSERS_CASES[case])
    model.save_pretrained(tmp_path, safe_serialization=True)
    state_dict = safetensors.numpy.load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert convert.detect_layout(state_dict) == "diffusers"

    module = convert.config_from_diffusers(tmp_path)
    assert (module.shared_embedder, module.freq_shift) == (False, 1.0)
    assert module.norm_eps == model.config.norm_eps
    assert module.activation == {"gelu-approximate": "gelu_tanh", "gelu": "gelu"}[model.config.activation_fn]
    params = convert.load_dit_params(state_dict, module)
    assert_parity(module, params, model, model.transformer_blocks, 4, f"diffusers {case}")


def test_config_from_public_transformer2d_config():
    """facebook/DiT-XL-2-256's transformer config (a Transformer2DModel config that diffusers
    remaps to DiTTransformer2DModel): the parameter tree has exactly diffusers' count."""
    public = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
              "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
              "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
              "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
              "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
              "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 32,
              "upcast_attention": False, "use_linear_projection": False}
    module = convert.config_from_diffusers(public)
    assert (module.hidden_size, module.depth, module.num_heads, module.patch_size) == (1152, 28, 16, 2)
    assert (module.output_channels, module.num_classes, module.norm_eps) == (8, 1000, 1e-5)

    dit_args = set(inspect.signature(diffusers.DiTTransformer2DModel.__init__).parameters)
    with torch.device("meta"):  # shapes only, no memory
        ref = diffusers.DiTTransformer2DModel(**{k: v for k, v in public.items() if k in dit_args})
    assert param_count(module) == sum(p.numel() for p in ref.parameters())

    with pytest.raises(ValueError, match="cross_attention_dim"):
        convert.config_from_diffusers({**public, "cross_attention_dim": 1152})
    with pytest.raises(ValueError, match="ada_norm_zero"):
        convert.config_from_diffusers({**public, "norm_type": "ada_norm_single"})


# ---------------------------------------------------------------- original layout: a PyTorch reference


def ref_pos_table(dim, grid):
    """The original 2D sin-cos table, written out independently of jdistill: the first half
    of the channels from the column index, the second from the row index, each [sin, cos]."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.indices((grid, grid)).reshape(2, -1).astype(np.float64)
    part = lambda pos: np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1)  # noqa
    return np.concatenate([part(cols), part(rows)], axis=1).astype(np.float32)


def ref_timestep_features(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class RefAttention(tnn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = tnn.Linear(dim, 3 * dim)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, d))


class RefBlock(tnn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = tnn.ModuleDict(dict(fc1=tnn.Linear(dim, int(dim * mlp_ratio)),
                                       fc2=tnn.Linear(int(dim * mlp_ratio), dim)))
        self.adaLN_modulation = tnn.Sequential(tnn.SiLU(), tnn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        h = modulate(self.norm2(x), shift_m, scale_m)
        return x + gate_m[:, None] * self.mlp.fc2(tnn.functional.gelu(self.mlp.fc1(h), approximate="tanh"))


class RefDiT(tnn.Module):
    """The original DiT (Peebles & Xie): one shared timestep / label embedder, [cos, sin]
    timestep features with frequencies 10000^(-i/128), LayerNorms eps 1e-6, frozen pos_embed."""

    def __init__(self, input_size, patch, in_channels, dim, depth, heads, num_classes, learn_sigma):
        super().__init__()
        self.p, self.out_channels = patch, 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = tnn.ModuleDict(dict(proj=tnn.Conv2d(in_channels, dim, patch, stride=patch)))
        self.t_embedder = tnn.ModuleDict(dict(mlp=tnn.Sequential(tnn.Linear(256, dim), tnn.SiLU(),
                                                                 tnn.Linear(dim, dim))))
        self.y_embedder = tnn.ModuleDict(dict(embedding_table=tnn.Embedding(num_classes + 1, dim)))
        table = ref_pos_table(dim, input_size // patch)
        self.pos_embed = tnn.Parameter(torch.from_numpy(table)[None], requires_grad=False)
        self.blocks = tnn.ModuleList([RefBlock(dim, heads) for _ in range(depth)])
        self.final_layer = tnn.ModuleDict(dict(
            norm_final=tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6),
            linear=tnn.Linear(dim, patch * patch * self.out_channels),
            adaLN_modulation=tnn.Sequential(tnn.SiLU(), tnn.Linear(dim, 2 * dim))))

    def forward(self, x, t, y):
        n, _, height, width = x.shape
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(ref_timestep_features(t)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = self.final_layer.linear(modulate(self.final_layer.norm_final(h), shift, scale))
        gh, gw, p = height // self.p, width // self.p, self.p
        h = h.reshape(n, gh, gw, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(n, self.out_channels, gh * p, gw * p)


def tiny_reference(patch=2, learn_sigma=True, seed=0):
    ref = RefDiT(SIZE, patch, 4, D, DEPTH, HEADS, CLASSES, learn_sigma).eval()
    return randomise(ref, seed=seed, skip=("pos_embed",))


def reference_as_diffusers(state_dict, depth):
    """Original keys -> diffusers keys, written independently of jdistill.convert: the shared
    embedder is copied into every block's norm1.emb, qkv split into thirds."""
    emb = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2",
           "y_embedder.embedding_table": "class_embedder.embedding_table"}
    block = {"attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
             "adaLN_modulation.1": "norm1.linear"}
    final = {"final_layer.adaLN_modulation.1": "proj_out_1", "final_layer.linear": "proj_out_2",
             "x_embedder.proj": "pos_embed.proj"}
    out = {}
    for key, v in state_dict.items():
        if key == "pos_embed":  # diffusers computes its table (a non-persistent buffer)
            continue
        stem, leaf = key.rsplit(".", 1)
        if stem in emb:
            for i in range(depth):
                out[f"transformer_blocks.{i}.norm1.emb.{emb[stem]}.{leaf}"] = v
        elif stem in final:
            out[f"{final[stem]}.{leaf}"] = v
        else:
            i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", stem).groups()
            if rest == "attn.qkv":
                for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                    out[f"transformer_blocks.{i}.attn1.{name}.{leaf}"] = part
            else:
                out[f"transformer_blocks.{i}.{block[rest]}.{leaf}"] = v
    return out


def test_reference_equals_diffusers():
    """The reference is DiT as diffusers implements it, up to two constants diffusers changed:
    its CombinedTimestepLabelEmbeddings uses Timesteps(downscale_freq_shift=1), i.e. frequencies
    10000^(-i/127) instead of the original 10000^(-i/128), and its MLP LayerNorm takes the
    config's norm_eps (1e-5 by default) where the original has 1e-6. Built with norm_eps=1e-6
    and the shift set to 0, diffusers' model equals the reference; with its own shift it does not."""
    ref = tiny_reference()
    model = diffusers.DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                            out_channels=8, num_layers=DEPTH, sample_size=SIZE,
                                            num_embeds_ada_norm=CLASSES, norm_eps=1e-6).eval()
    model.load_state_dict(reference_as_diffusers(ref.state_dict(), DEPTH), strict=True)
    x, t, y = inputs(4)
    diffusers_default, _ = torch_run(model, [], x, t, y)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    assert_parity_torch(ref, ref.blocks, model, model.transformer_blocks, x, t, y)
    expected, _ = torch_run(ref, [], x, t, y)
    assert np.abs(diffusers_default - expected).max() > 100 * TOL * np.abs(expected).max()


def assert_parity_torch(a, a_blocks, b, b_blocks, x, t, y):
    out_a, feats_a = torch_run(a, a_blocks, x, t, y)
    out_b, feats_b = torch_run(b, b_blocks, x, t, y)
    for i, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        assert_close(fb, fa, 1e-5, f"reference vs diffusers: block {i}")
    assert_close(out_b, out_a, 1e-5, "reference vs diffusers: output")


@pytest.mark.parametrize("patch, learn_sigma", [(2, True), (4, False)])
def test_original_parity(patch, learn_sigma):
    ref = tiny_reference(patch, learn_sigma)
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert convert.detect_layout(state_dict) == "original"

    module = convert.config_from_original(state_dict, num_heads=HEADS)
    expected = dit_lib.DiT(input_size=SIZE, patch_size=patch, in_channels=4, out_channels=8 if learn_sigma else 4,
                           hidden_size=D, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)
    assert module == expected  # the DiT defaults are the original layout's
    params = convert.load_dit_params(state_dict, module)
    assert_parity(module, params, ref, ref.blocks, 4, f"original p{patch}")

    # a training checkpoint holds the EMA weights next to the online ones: the EMA ones load
    wrapped = convert.load_dit_params({"model": {}, "ema": state_dict, "args": None}, module)
    jax.tree.map(np.testing.assert_array_equal, wrapped, params)


# ---------------------------------------------------------------- errors


def diffusers_state_dict():
    return {k: v.numpy() for k, v in tiny_diffusers(patch_size=2, out_channels=8).state_dict().items()}


@pytest.fixture(scope="module")
def diffusers_module():
    return dit_lib.DiT(input_size=SIZE, patch_size=2, in_channels=4, out_channels=8, hidden_size=D, depth=DEPTH,
                       num_heads=HEADS, num_classes=CLASSES, **dit_lib.LAYOUTS["diffusers"])


def test_missing_extra_and_misshaped_keys_are_named(diffusers_module):
    sd = diffusers_state_dict()
    convert.load_dit_params(sd, diffusers_module)  # the intact one loads

    missing = dict(sd)
    del missing["proj_out_2.bias"]
    with pytest.raises(ConversionError, match=r"1 missing from the checkpoint:\s+proj_out_2/bias"):
        convert.load_dit_params(missing, diffusers_module)

    extra = {**sd, "transformer_blocks.1.attn1.to_q.lora_A.weight": np.zeros((4, D), np.float32)}
    with pytest.raises(ConversionError, match=r"unexpected in the checkpoint:\s+transformer_blocks.1.attn1.to_q.lora"):
        convert.load_dit_params(extra, diffusers_module)

    bad = {**sd, "transformer_blocks.1.ff.net.2.weight": np.zeros((D, 64), np.float32)}
    with pytest.raises(ConversionError, match=r"shape mismatch:\s+transformer_blocks.1.ff.net.2.weight"):
        convert.load_dit_params(bad, diffusers_module)


def test_other_family_is_refused(diffusers_module):
    with torch.device("meta"):
        pixart = diffusers.PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                                    num_layers=1, sample_size=SIZE, cross_attention_dim=D,
                                                    caption_channels=16)
    keys = dict.fromkeys(pixart.state_dict(), np.zeros(1, np.float32))
    with pytest.raises(ConversionError, match=r"not a DiT checkpoint \(it looks like a PixArt transformer\)"):
        convert.load_dit_params(keys, diffusers_module)


def test_layout_and_module_must_agree(diffusers_module):
    sd = {k: v.numpy() for k, v in tiny_reference().state_dict().items()}
    with pytest.raises(ConversionError, match="shared_embedder=False.*freq_shift=1.0"):
        convert.load_dit_params(sd, diffusers_module)
    with pytest.raises(ConversionError, match="shared_embedder=True"):
        convert.load_dit_params(diffusers_state_dict(), convert.config_from_original(sd, num_heads=HEADS))


def test_bad_stored_pos_embed_is_refused():
    sd = {k: v.numpy() for k, v in tiny_reference().state_dict().items()}
    module = convert.config_from_original(sd, num_heads=HEADS)
    sd["pos_embed"] = sd["pos_embed"] + np.float32(1e-3)
    with pytest.raises(ConversionError, match="pos_embed: stored position table differs"):
        convert.load_dit_params(sd, module)
    sd["pos_embed"] = np.zeros((1, 4, D), np.float32)  # a 2x2 grid for an 8 / 2 = 4x4 model
    with pytest.raises(ConversionError, match="does not fit a 4x4 grid"):
        convert.load_dit_params(sd, module)


# ---------------------------------------------------------------- presets, guidance embedding, bf16


def param_count(module):
    shapes = abstract_params(module, **dit_lib.example_inputs(module))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_xl2_has_the_published_parameter_count():
    """675,129,632: the count the original training script prints for DiT-XL/2 (Table 1: 675M),
    which includes the frozen pos_embed (256 tokens x 1152) that jdistill computes instead."""
    module = dit_lib.dit_config("DiT-XL/2", input_size=32)
    assert (module.depth, module.hidden_size, module.num_heads, module.output_channels) == (28, 1152, 16, 8)
    assert param_count(module) + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("name, millions", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458)])
def test_published_sizes(name, millions):
    """DiT paper Table 1 (millions, with the 256-token pos_embed, ImageNet 256: input 32)."""
    module = dit_lib.dit_config(name, input_size=32)
    assert abs((param_count(module) + 256 * module.hidden_size) / 1e6 - millions) < 0.6


@pytest.mark.parametrize("name, depth, hidden, heads, patch", [("DiT-S/8", 12, 384, 6, 8), ("DiT-B/4", 12, 768, 12, 4),
                                                                ("DiT-L/2", 24, 1024, 16, 2)])
def test_presets(name, depth, hidden, heads, patch):
    m = dit_lib.dit_config(name, input_size=32, learn_sigma=False, layout="diffusers")
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size, m.output_channels) == (depth, hidden, heads, patch, 4)
    assert not m.shared_embedder and m.freq_shift == 1.0
    with pytest.raises(ValueError, match="unknown DiT"):
        dit_lib.dit_config("DiT-M/2")


def random_params(module, seed=0, keep=()):
    """Initialised params with every leaf outside ``keep`` redrawn (the adaLN-Zero init would
    make the network output zero and any comparison trivial)."""
    params = module.init(jax.random.key(seed), **dit_lib.example_inputs(module))["params"]
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    flat = {k: v if k[0] in keep else jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype) for k, v in
            flat.items()}
    return traverse_util.unflatten_dict(flat)


def test_guidance_student_equals_teacher_at_init():
    teacher = dit_lib.DiT(input_size=SIZE, in_channels=4, out_channels=8, hidden_size=D, depth=DEPTH,
                          num_heads=HEADS, num_classes=CLASSES)
    student = teacher.clone(guidance_embed=True)
    params = random_params(student, keep=("guidance_embedder",))
    teacher_params = {k: v for k, v in params.items() if k != "guidance_embedder"}
    assert set(params) - set(teacher_params) == {"guidance_embedder"}

    x, t, y = (jnp.asarray(a) for a in inputs(4))
    expected = teacher.apply({"params": teacher_params}, x, t, y)
    for w in (0.0, 1.5, 7.0):
        out = student.apply({"params": params}, x, t, y, guidance=jnp.full((3,), w))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))

    # the embedding is live: once its last layer moves, the guidance weight changes the output
    moved = jax.tree.map(lambda a: a, params)
    moved["guidance_embedder"]["linear_2"]["kernel"] = jnp.full_like(
        params["guidance_embedder"]["linear_2"]["kernel"], 0.05)
    a = student.apply({"params": moved}, x, t, y, guidance=jnp.full((3,), 1.0))
    b = student.apply({"params": moved}, x, t, y, guidance=jnp.full((3,), 4.0))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(ValueError, match="guidance"):
        student.apply({"params": params}, x, t, y)


def test_bf16_compute_over_fp32_params():
    module = dit_lib.DiT(input_size=SIZE, in_channels=4, out_channels=8, hidden_size=D, depth=DEPTH,
                         num_heads=HEADS, num_classes=CLASSES)
    params = random_params(module)
    x, t, y = (jnp.asarray(a) for a in inputs(4))
    ref = module.apply({"params": params}, x, t, y)
    out = module.clone(dtype=jnp.bfloat16).apply({"params": params}, x, t, y)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), np.asarray(ref), 5e-2, "bf16 vs fp32")
