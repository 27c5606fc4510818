"""SD3 / SD3.5 MMDiT in Flax against diffusers' ``SD3Transformer2DModel`` (fp32, <= 1e-4 relative).

Tiny real diffusers models keeping every block type of the public configs -- SD3-medium-like
(no qk norm, context_pre_only last block), SD3.5-like (qk RMS norm, dual-attention blocks
then plain ones) and one off the public path (qk LayerNorm, dual attention in the
context_pre_only block, no position crop) -- with every weight and the stored position table
re-randomised, saved with ``save_pretrained`` (safetensors), read back, converted, compared
on the output and on every block's image tokens (forward hooks vs sown intermediates), at
the training size, a non-square size (off-centre crop) and the full position grid.
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

from jdistill.convert import engine
from jdistill.convert import mmdit as convert
from jdistill.convert.engine import ConversionError
from jdistill.models import mmdit
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
TINY = dict(sample_size=8, patch_size=2, in_channels=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10)
TEXT_LEN = 5

CASES = {
    "sd3-medium": dict(num_layers=3, out_channels=4, pos_embed_max_size=12, dual_attention_layers=(), qk_norm=None),
    "sd35": dict(num_layers=4, out_channels=6, pos_embed_max_size=12, dual_attention_layers=(0, 1),
                 qk_norm="rms_norm"),
    "ln-qk-dual-last-nocrop": dict(num_layers=2, out_channels=None, pos_embed_max_size=None,
                                   dual_attention_layers=(1,), qk_norm="layer_norm"),
}
# (H, W) of the latents: the training size, a non-square one whose crop offset rounds down
# ((12 - 3) // 2 = 4 rows, (12 - 5) // 2 = 3 columns), the whole 12 x 12 position grid
SIZES = ((8, 8), (6, 10), (24, 24))


def randomise(model, std=0.2, seed=0):
    """Every parameter, and the stored position table, from N(0, std^2): diffusers zero-inits
    nothing here but its LayerNorm / RMSNorm weights are ones and a sin-cos table is smooth,
    either of which could hide a swapped or mis-cropped tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        if getattr(model.pos_embed, "pos_embed_max_size", None):
            model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape, generator=gen))
    return model


def inputs(size, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *size, TINY["in_channels"])).astype(np.float32)  # NHWC
    t = np.array([1000.0, 437.25], np.float32)[:batch]
    ehs = rng.standard_normal((batch, TEXT_LEN, TINY["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32)
    return x, t, ehs, pooled


def torch_run(model, x, t, ehs, pooled):
    """NHWC output and every block's output image tokens (a block returns (text, image))."""
    feats = []
    hooks = [b.register_forward_hook(lambda mod, args, out: feats.append(out[1].detach().numpy().copy()))
             for b in model.transformer_blocks]
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(nchw(x)), encoder_hidden_states=torch.from_numpy(ehs),
                    pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t)).sample
    for h in hooks:
        h.remove()
    return nhwc(out.numpy()), feats


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    """(case, torch model, state dict as saved, Flax module, params) via save_pretrained -> safetensors."""
    case = request.param
    model = randomise(diffusers.SD3Transformer2DModel(**TINY, **CASES[case]).eval())
    path = tmp_path_factory.mktemp(case)
    model.save_pretrained(path, safe_serialization=True)
    state_dict = safetensors.numpy.load_file(path / "diffusion_pytorch_model.safetensors")
    module = convert.module_from_config(json.loads((path / "config.json").read_text()))
    return case, model, state_dict, module, convert.load_params(state_dict, module)


def test_parity(converted):
    case, model, state_dict, module, params = converted
    assert ("pos_embed.pos_embed" in state_dict) == bool(CASES[case]["pos_embed_max_size"])
    assert module.dual_attention_layers == CASES[case]["dual_attention_layers"]
    # one compiled forward per input size (cheaper on CPU than op-by-op dispatch)
    forward = jax.jit(lambda p, *a: module.apply({"params": p}, *a, mutable=["intermediates"]))
    for size in SIZES:
        x, t, ehs, pooled = inputs(size)
        ref, ref_feats = torch_run(model, x, t, ehs, pooled)
        out, state = forward(params, x, t, ehs, pooled)
        sown = state["intermediates"]
        assert out.shape == ref.shape == (2, *size, model.out_channels)
        assert sorted(sown) == [f"block_{i}" for i in range(module.num_layers)]
        for i, expected in enumerate(ref_feats):
            assert_close(sown[f"block_{i}"][0], expected, TOL, f"{case} {size}: block {i} image tokens")
        assert_close(out, ref, TOL, f"{case} {size}: output")


def test_export_round_trip(converted):
    """Flax params -> a diffusers state dict through the same key map: every tensor back bit for bit."""
    _, model, state_dict, module, params = converted
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    exported = engine.flax_to_torch_state_dict(params, shapes, convert.export_rules(module))
    assert exported.keys() == state_dict.keys()
    for k, v in state_dict.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_feature_gradients_match_torch():
    """LADD backpropagates through the frozen teacher's features into x: d(tapped block features)/dx
    through ``block_features`` is finite, non-zero and equal to PyTorch's (so the tapped
    features are the right ones too); the fixed position table gets no gradient."""
    model = randomise(diffusers.SD3Transformer2DModel(**TINY, **CASES["sd35"]).eval())
    module = convert.module_from_config(dict(model.config))
    params = convert.load_params(model.state_dict(), module)
    x, t, ehs, pooled = inputs((6, 10))
    taps = (1, 3)  # a dual-attention block and the context_pre_only one

    def objective(x, table):
        p = {**params, "pos_embed": {**params["pos_embed"], "pos_embed": table}}
        feats = mmdit.block_features(module, p, x, t, ehs, pooled, taps)
        assert sorted(feats) == list(taps)
        return sum(jnp.sum(f * jnp.cos(f)) for f in feats.values())  # weights every token differently

    gx, g_table = jax.jit(jax.grad(objective, argnums=(0, 1)))(jnp.asarray(x), params["pos_embed"]["pos_embed"])
    assert np.isfinite(gx).all() and np.abs(gx).min() > 0
    assert not np.any(g_table)

    xt = torch.from_numpy(nchw(x)).requires_grad_(True)
    feats = []
    hooks = [model.transformer_blocks[i].register_forward_hook(lambda mod, args, out: feats.append(out[1]))
             for i in taps]
    model(hidden_states=xt, encoder_hidden_states=torch.from_numpy(ehs), pooled_projections=torch.from_numpy(pooled),
          timestep=torch.from_numpy(t))
    for h in hooks:
        h.remove()
    sum((f * torch.cos(f)).sum() for f in feats).backward()
    assert_close(gx, nhwc(xt.grad.numpy()), TOL, "d features / dx")

    mask = traverse_util.flatten_dict(mmdit.trainable_mask(params))
    assert [k for k, v in mask.items() if not v] == [("pos_embed", "pos_embed")]
    with pytest.raises(ValueError, match=r"blocks \[4\] outside 0..3"):
        mmdit.block_features(module, params, x, t, ehs, pooled, (0, 4))


def test_initial_position_table_is_diffusers():
    """A fresh Flax init holds the table diffusers builds (sin-cos on a 12 x 12 grid rescaled to
    base size 4), so a model trained from scratch has SD3's positions."""
    model = diffusers.SD3Transformer2DModel(**TINY, **CASES["sd3-medium"])
    embed = mmdit.PatchEmbed(16, 2, TINY["sample_size"], CASES["sd3-medium"]["pos_embed_max_size"])
    params = jax.jit(embed.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))["params"]
    assert_close(params["pos_embed"], model.pos_embed.pos_embed.numpy(), 1e-7, "initial table")


# Shaped like the published transformer/config.json of SD3-medium and SD3.5-medium.
PUBLIC = {
    "sd3-medium": dict(attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
                       num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
                       pooled_projection_dim=2048, pos_embed_max_size=192, sample_size=128),
    "sd3.5-medium": dict(attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)),
                         in_channels=16, joint_attention_dim=4096, num_attention_heads=24, num_layers=24,
                         out_channels=16, patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", sample_size=128),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_config_shapes(name):
    """Full-size configs: the abstract Flax tree has exactly the shapes of diffusers' tensors
    (built on the meta device: no memory), key by key through the engine's own key map and layout."""
    config = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0", **PUBLIC[name]}
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**PUBLIC[name])
    module = convert.module_from_config(config)
    args, kwargs = convert.example_inputs(module)
    flat = traverse_util.flatten_dict(engine.abstract_params(module, *args, **kwargs))
    seen = set()
    for key, tensor in ref.state_dict().items():
        path, kind = engine._leaf_transform(engine.torch_key_to_path(key), flat)
        assert path in flat, key
        view = np.broadcast_to(np.float32(0), tuple(tensor.shape))  # the shape, without the memory
        assert flat[path].shape == engine._layout(view, kind, view.ndim).shape, key
        seen.add(path)
    assert seen == set(flat)


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def sd35():
    model = randomise(diffusers.SD3Transformer2DModel(**TINY, **CASES["sd35"]))
    return {k: v.numpy() for k, v in model.state_dict().items()}, dict(model.config)


def test_missing_unexpected_misshaped_keys(sd35):
    state_dict, config = sd35
    module = convert.module_from_config(config)

    missing = {k: v for k, v in state_dict.items() if k != "transformer_blocks.2.attn.to_add_out.weight"}
    with pytest.raises(ConversionError, match="(?s)1 missing.*transformer_blocks_2/attn/to_add_out/kernel"):
        convert.load_params(missing, module)

    extra = {**state_dict, "transformer_blocks.0.attn.to_gate.weight": np.zeros((16, 16), np.float32)}
    with pytest.raises(ConversionError, match=r"(?s)1 unexpected.*transformer_blocks\.0\.attn\.to_gate\.weight"):
        convert.load_params(extra, module)

    bad = {**state_dict, "context_embedder.weight": np.zeros((16, 13), np.float32)}
    with pytest.raises(ConversionError, match=r"(?s)shape mismatch.*context_embedder\.weight: checkpoint \(16, 13\)"):
        convert.load_params(bad, module)

    bad = {**state_dict, "pos_embed.pos_embed": np.zeros((1, 100, 16), np.float32)}  # another pos_embed_max_size
    with pytest.raises(ConversionError, match=r"pos_embed\.pos_embed: checkpoint \(1, 100, 16\)"):
        convert.load_params(bad, module)


def test_checkpoint_of_another_configuration(sd35):
    """SD3.5 weights into an SD3 module (no dual attention, no qk norm): the extra keys are named."""
    state_dict, config = sd35
    module = convert.module_from_config({**config, "dual_attention_layers": [], "qk_norm": None})
    with pytest.raises(ConversionError, match=r"(?s)unexpected.*transformer_blocks\.0\.attn2\.to_q\.weight") as err:
        convert.load_params(state_dict, module)
    assert "transformer_blocks.0.attn.norm_added_q.weight" in str(err.value)


def tiny_state_dict(cls, **cfg):
    return {k: v.numpy() for k, v in cls(**cfg).state_dict().items()}


@pytest.mark.parametrize("family", ["flux", "dit", "pixart", "unet"])
def test_checkpoint_of_another_family(family, sd35):
    _, config = sd35
    module = convert.module_from_config(config)
    state_dict, named = {
        "flux": (lambda: tiny_state_dict(diffusers.FluxTransformer2DModel, patch_size=1, in_channels=4, num_layers=1,
                                         num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                         joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4)),
                 "Flux"),
        "dit": (lambda: tiny_state_dict(diffusers.DiTTransformer2DModel, num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, num_layers=1, sample_size=8, num_embeds_ada_norm=10), "DiT"),
        "pixart": (lambda: tiny_state_dict(diffusers.PixArtTransformer2DModel, num_attention_heads=2,
                                           attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
                                           cross_attention_dim=16, caption_channels=12), "PixArt"),
        "unet": (lambda: tiny_state_dict(diffusers.UNet2DModel, sample_size=8, in_channels=4, out_channels=4,
                                         block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                         down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)), "UNet"),
    }[family]
    with pytest.raises(ConversionError, match=f"not an SD3Transformer2DModel checkpoint: it looks like .*{named}"):
        convert.load_params(state_dict(), module)
    with pytest.raises(ConversionError, match="has none of"):
        convert.load_params({"weight": np.zeros(3, np.float32)}, module)


def test_config_errors():
    with pytest.raises(ValueError, match="_class_name 'FluxTransformer2DModel'"):
        convert.module_from_config({"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ValueError, match=r"does not implement: \['guidance_embeds'\]"):
        convert.module_from_config({**TINY, "guidance_embeds": True})
    for change, error in (({"caption_projection_dim": 24}, "caption_projection_dim 24 must equal"),
                          ({"pos_embed_max_size": 3}, "a 4x4 patch grid exceeds pos_embed_max_size 3"),
                          ({"qk_norm": "l2"}, "qk_norm 'l2' not supported"),
                          ({"num_layers": 2, "dual_attention_layers": [2]}, r"dual_attention_layers \[2\] outside")):
        module = convert.module_from_config({**TINY, **change})
        args, kwargs = convert.example_inputs(module)
        with pytest.raises(ValueError, match=error):
            engine.abstract_params(module, *args, **kwargs)
