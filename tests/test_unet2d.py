"""jdistill's UNet2DModel and UNet blocks against diffusers (fp32, <= 1e-4 relative).

Each case is a tiny diffusers ``UNet2DModel`` with every parameter re-drawn at random
(diffusers' own init would leave some layers trivial), written with ``save_pretrained``
(safetensors + config.json, as public checkpoints are), read back with safetensors,
converted, and run on the same inputs. Together the cases hold every supported block
type and option; the block tests cover the VAE-style uses (no time embedding, no skips)
and the resamplers' corner cases the pixel UNet never reaches.
"""

import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from diffusers.models import resnet as d_resnet
from diffusers.models import downsampling as d_down
from diffusers.models import upsampling as d_up
from diffusers.models.unets import unet_2d_blocks as d_blocks
from safetensors.numpy import load_file

from jdistill.convert import engine
from jdistill.convert.unet2d import load_unet2d_params
from jdistill.models import unet_blocks
from jdistill.models.unet2d import UNet2DModel, config_from_diffusers
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4

# name -> (diffusers config, NHWC sample shape, timesteps, class labels (or None))
CASES = {
    # attention down / up / mid, scale_shift (mid attention then has no group norm), class table,
    # centred input, integer timesteps
    "attn_scaleshift_classes": (
        dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             resnet_time_scale_shift="scale_shift", num_class_embeds=5, mid_block_scale_factor=1.4142,
             center_input_sample=True, freq_shift=1, flip_sin_to_cos=True),
        (2, 16, 16, 3), np.array([3, 917]), np.array([1, 4])),
    # default time norm, no mid attention, padding-0 downsampling, "timestep" class embedding,
    # mish, float timesteps, three levels with two resnets each, the "UNetRes" prefix
    "default_noattn_timestepclass": (
        dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, attention_head_dim=8,
             down_block_types=("AttnDownBlock2D", "DownBlock2D", "UNetResDownBlock2D"),
             up_block_types=("UNetResUpBlock2D", "UpBlock2D", "AttnUpBlock2D"), add_attention=False,
             downsample_padding=0, class_embed_type="timestep", flip_sin_to_cos=False, freq_shift=1,
             act_fn="mish"),
        (2, 8, 8, 3), np.array([12.5, 700.25], np.float32), np.array([2.0, 7.0], np.float32)),
    # odd widths: head dim not dividing the channels (fewer heads * dim than channels), 5 in /
    # 7 out channels, a non-square image, identity class embedding, custom time width, gelu
    "odd_identity": (
        dict(in_channels=5, out_channels=7, block_out_channels=(12, 20), layers_per_block=1, norm_num_groups=4,
             attention_head_dim=8, down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), class_embed_type="identity",
             time_embedding_dim=24, norm_eps=1e-6, act_fn="gelu", mid_block_scale_factor=2.0),
        (2, 8, 12, 5), np.array([500, 20]), "identity"),
    # the consistency decoder's shape: resnet down / up sampling (also inside Attn blocks),
    # learned time table, scale_shift with an explicit mid-attention group norm, one head
    "resnet_resample_learned": (
        dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=None,
             down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_type="resnet",
             upsample_type="resnet", time_embedding_type="learned", num_train_timesteps=50,
             resnet_time_scale_shift="scale_shift", attn_norm_num_groups=2),
        (2, 8, 8, 3), np.array([0, 49]), None),
    # score-SDE VE style: Gaussian Fourier features of log sigma, output / sigma, no mid block,
    # dropout configured (inactive at eval on both sides)
    "fourier_nomid_dropout": (
        dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             time_embedding_type="fourier", mid_block_type=None, dropout=0.1),
        (2, 8, 8, 3), np.array([0.05, 30.0], np.float32), None),
}


def randomize_(module: torch.nn.Module, seed: int = 0):
    """Redraw every parameter: norm scales near 1, biases small, weights ~ 1/sqrt(fan_in)
    (activations stay O(1) through the stack), Fourier frequencies at their real scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name == "time_proj.weight" and p.ndim == 1:
                p.copy_(16 * r)
            elif p.ndim == 1:
                p.copy_(1 + 0.3 * r if name.endswith("weight") else 0.3 * r)
            else:
                p.copy_(r / np.sqrt(p[0].numel()))
    return module


def torch_call(model, x, t, labels):
    kw = {} if labels is None else {"class_labels": torch.from_numpy(labels)}
    with torch.no_grad():
        return nhwc(model(torch.from_numpy(nchw(x)), torch.from_numpy(t), **kw).sample.numpy())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (torch model, diffusers config, state dict, flax module, params, inputs); built once."""
    out = {}
    for i, (name, (cfg, shape, t, labels)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = randomize_(diffusers.UNet2DModel(**cfg), seed=i).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        config = json.loads((path / "config.json").read_text())
        state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
        module = UNet2DModel(**config_from_diffusers(config))
        params = load_unet2d_params(state, module)
        rng = np.random.default_rng(i)
        x = rng.standard_normal(shape).astype(np.float32)
        if isinstance(labels, str):  # identity: labels are embeddings of the time width
            labels = rng.standard_normal((shape[0], module.time_embed_dim)).astype(np.float32)
        out[name] = (model, config, state, module, params, (x, t, labels))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_unet2d_matches_diffusers(built, name):
    model, _, _, module, params, (x, t, labels) = built[name]
    expected = torch_call(model, x, t, labels)
    out = jax.jit(module.apply)({"params": params}, x, t, labels)
    assert out.shape == expected.shape
    assert_close(out, expected, TOL, name)


def test_every_supported_option_is_covered():
    """The cases above keep every block type and option the Flax model accepts."""
    from jdistill.models import unet2d

    cfgs = [c for c, *_ in CASES.values()]
    values = lambda key, default: {c.get(key, default) for c in cfgs}
    blocks = lambda key: {unet2d._block_type(b) for c in cfgs for b in c[key]}
    assert blocks("down_block_types") == set(unet2d.DOWN_BLOCKS)
    assert blocks("up_block_types") == set(unet2d.UP_BLOCKS)
    assert values("time_embedding_type", "positional") == set(unet2d.TIME_EMBEDDING_TYPES)
    assert values("class_embed_type", None) == set(unet2d.CLASS_EMBED_TYPES)
    assert values("mid_block_type", "UNetMidBlock2D") == set(unet2d.MID_BLOCKS)
    assert values("resnet_time_scale_shift", "default") == {"default", "scale_shift"}
    assert values("downsample_type", "conv") == values("upsample_type", "conv") == {"conv", "resnet"}
    assert {0, 1} <= values("downsample_padding", 1) and values("add_attention", True) == {True, False}
    assert any(c.get("num_class_embeds") for c in cfgs) and any(c.get("attn_norm_num_groups") for c in cfgs)


def test_scalar_timestep_broadcasts(built):
    model, _, _, module, params, (x, t, labels) = built["attn_scaleshift_classes"]
    expected = torch_call(model, x, np.array(250), labels)
    out = jax.jit(module.apply)({"params": params}, x, 250, labels)
    assert_close(out, expected, TOL, "scalar timestep")


def test_dropout_is_train_only(built):
    _, _, _, module, params, (x, t, _) = built["fourier_nomid_dropout"]
    apply = jax.jit(module.apply, static_argnames="train")
    eval_out = apply({"params": params}, x, t)
    a = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(1)})
    c = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, eval_out) and not np.allclose(a, c)


def test_converter_names_missing_unexpected_and_misshaped_keys(built):
    _, _, state, module, _, _ = built["attn_scaleshift_classes"]
    bad = dict(state)
    del bad["mid_block.attentions.0.to_k.bias"]
    bad["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    bad["conv_out.weight"] = np.zeros((3, 8, 5, 5), np.float32)
    with pytest.raises(engine.ConversionError) as err:
        load_unet2d_params(bad, module)
    msg = str(err.value)
    assert "mid_block/attentions_0/to_k/bias" in msg
    assert "down_blocks.0.resnets.0.extra.weight" in msg
    assert "conv_out.weight: checkpoint (3, 8, 5, 5)" in msg


def test_converter_reads_pre_rename_attention_keys(built):
    """Old uploads (DDPM, SD-VAE) name the attention projections query / key / value / proj_attn."""
    _, _, state, module, params, _ = built["odd_identity"]
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in state.items():
        for new, old in old_names.items():
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy) and any(".query." in k for k in legacy)
    converted = load_unet2d_params(legacy, module)
    jax.tree.map(np.testing.assert_array_equal, converted, params)


def test_guidance_student_at_init_equals_teacher():
    """A guidance_embed student with the teacher's params in every shared place is the teacher,
    for any guidance weight; once the embedding's last layer moves, the weight matters."""
    teacher = UNet2DModel(block_out_channels=(8,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                          layers_per_block=1, norm_num_groups=4, attention_head_dim=4, num_class_embeds=3)
    student = teacher.clone(guidance_embed=True)
    rng = np.random.default_rng(5)
    x, t, y = rng.standard_normal((2, 4, 4, 3)).astype(np.float32), np.array([10, 600]), np.array([0, 2])
    w = np.array([1.0, 7.5], np.float32)
    # an "rbg" key: XLA:CPU compiles its init in half the time of threefry's
    fresh = jax.jit(student.init)(jax.random.key(5, impl="rbg"), x, t, y, w)["params"]
    shared = {k: v for k, v in fresh.items() if k != "guidance_embedder"}
    assert set(fresh) - set(shared) == {"guidance_embedder"}
    teacher_out = np.asarray(jax.jit(teacher.apply)({"params": shared}, x, t, y))
    student_apply = jax.jit(student.apply)
    np.testing.assert_array_equal(student_apply({"params": fresh}, x, t, y, w), teacher_out)

    moved = jax.tree.map(lambda a: a, fresh)
    lin2 = moved["guidance_embedder"]["linear_2"]
    lin2["kernel"] = jax.random.normal(jax.random.key(4), lin2["kernel"].shape)
    out = np.asarray(student_apply({"params": moved}, x, t, y, w))
    assert not np.allclose(out, teacher_out)
    assert not np.allclose(out, student_apply({"params": moved}, x, t, y, w[::-1]))


def test_loader_gives_a_guidance_student_the_teacher_checkpoint(built):
    """A diffusers checkpoint fills every shared param; rng draws only the guidance embedding."""
    model, _, state, module, params, (x, t, labels) = built["attn_scaleshift_classes"]
    student = module.clone(guidance_embed=True)
    with pytest.raises(ValueError, match="rng"):
        load_unet2d_params(state, student)
    loaded = load_unet2d_params(state, student, rng=jax.random.key(3))
    assert set(loaded) == set(params) | {"guidance_embedder"}
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in loaded.items() if k != "guidance_embedder"}, params)
    out = jax.jit(student.apply)({"params": loaded}, x, t, labels, np.array([1.0, 7.5], np.float32))
    assert_close(out, torch_call(model, x, t, labels), TOL, "guidance student")


@pytest.mark.parametrize("change, needle", [
    (dict(down_block_types=("SkipDownBlock2D", "AttnDownBlock2D")), "SkipDownBlock2D"),
    (dict(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")), "CrossAttnUpBlock2D"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "UNetMidBlock2DCrossAttn"),
    (dict(resnet_time_scale_shift="spatial"), "spatial"),
    (dict(downsample_type="fir"), "fir"),
    (dict(upsample_type="conv_transpose"), "conv_transpose"),
    (dict(time_embedding_type="sinusoidal"), "sinusoidal"),
    (dict(class_embed_type="projection"), "projection"),
    (dict(norm_num_groups=None), "norm_num_groups"),
    (dict(act_fn="tanhshrink"), "tanhshrink"),
    (dict(time_embedding_type="learned"), "num_train_timesteps"),
    (dict(block_out_channels=(8, 16, 32)), "as many"),
])
def test_unsupported_options_are_refused_by_name(change, needle):
    base = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    with pytest.raises(ValueError, match=needle):
        UNet2DModel(**{**base, **change})
    with pytest.raises(ValueError, match=needle):
        config_from_diffusers({"_class_name": "UNet2DModel", **base, **change})


def test_config_from_diffusers_refuses_unknown_keys(built):
    _, config, *_ = built["attn_scaleshift_classes"]
    assert config_from_diffusers(config)["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D")
    with pytest.raises(ValueError, match="resnet_out_scale_factor"):
        config_from_diffusers({**config, "resnet_out_scale_factor": 2.0})
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        config_from_diffusers({**config, "_class_name": "UNet2DConditionModel"})


# --- the blocks on their own: the uses the VAE / conditional UNet will make of them ---------

def block_parity(torch_block, flax_block, torch_args, flax_args, torch_kwargs=None, pick=lambda out: out, seed=0,
                 static=()):
    """Randomise the torch block, convert its state dict into the Flax block's abstract params,
    and compare outputs (args: NHWC images or (B, C) embeddings; ``pick`` selects the Flax
    output to compare)."""
    randomize_(torch_block, seed).eval()
    to_torch = lambda a: torch.from_numpy(nchw(a) if a.ndim == 4 else a)
    with torch.no_grad():
        ref = nhwc(torch_block(*[to_torch(a) for a in torch_args], **(torch_kwargs or {})).numpy())
    target = engine.abstract_params(flax_block, *flax_args)
    params, _ = engine.convert_state_dict(torch_block.state_dict(), target, what=type(torch_block).__name__)
    out = pick(jax.jit(flax_block.apply, static_argnums=static)({"params": params}, *flax_args))
    assert_close(out, ref, TOL, type(torch_block).__name__)


def test_resnet_block_options():
    """skip_time_act, groups_out, a 1x1 shortcut without bias, output_scale_factor, down=True."""
    rng = np.random.default_rng(0)
    x, temb = rng.standard_normal((2, 6, 6, 8)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
    torch_block = d_resnet.ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=16, groups=4, groups_out=2,
                                         eps=1e-6, skip_time_act=True, output_scale_factor=2.0,
                                         conv_shortcut_bias=False, down=True)
    flax_block = unet_blocks.ResnetBlock2D(out_channels=12, groups=4, groups_out=2, eps=1e-6, skip_time_act=True,
                                           output_scale_factor=2.0, conv_shortcut_bias=False, resample="down")
    block_parity(torch_block, flax_block, (x, temb), (x, temb))


def test_resamplers():
    rng = np.random.default_rng(1)
    odd = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    with torch.no_grad():  # the average-pool form has no params: compare directly
        pooled = nhwc(d_down.Downsample2D(6, use_conv=False)(torch.from_numpy(nchw(odd))).numpy())
    assert_close(unet_blocks.Downsample2D(use_conv=False).apply({}, odd), pooled, TOL, "avg pool")
    block_parity(d_down.Downsample2D(6, use_conv=True, out_channels=4, padding=0, name="op"),
                 unet_blocks.Downsample2D(4, padding=0), (odd,), (odd,))
    small = rng.standard_normal((2, 4, 3, 6)).astype(np.float32)
    for size in [(7, 5), (8, 6), (9, 3)]:  # float-scaled, exact x2, one axis kept
        block_parity(d_up.Upsample2D(6, use_conv=True, out_channels=4), unet_blocks.Upsample2D(4), (small,),
                     (small, size), torch_kwargs=dict(output_size=size), static=2)


def test_vae_style_blocks():
    """No time embedding (encoder / decoder / mid), no skip states (decoder)."""
    rng = np.random.default_rng(2)
    x8 = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    x16 = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
    common = dict(resnet_eps=1e-6, resnet_groups=4)
    hidden = lambda out: out[0]  # a down block's output without its skip states
    block_parity(d_blocks.DownEncoderBlock2D(in_channels=8, out_channels=16, num_layers=2, resnet_groups=4,
                                             downsample_padding=0),
                 unet_blocks.DownBlock2D(out_channels=16, num_layers=2, downsample_padding=0, **common),
                 (x8,), (x8,), pick=hidden)
    block_parity(d_blocks.AttnDownEncoderBlock2D(in_channels=8, out_channels=16, num_layers=1, resnet_groups=4,
                                                 attention_head_dim=8),
                 unet_blocks.AttnDownBlock2D(out_channels=16, num_layers=1, attention_head_dim=8, **common),
                 (x8,), (x8,), pick=hidden)
    block_parity(d_blocks.UpDecoderBlock2D(in_channels=16, out_channels=8, num_layers=2, resnet_groups=4),
                 unet_blocks.UpBlock2D(out_channels=8, num_layers=2, **common), (x16,), (x16,))
    block_parity(d_blocks.AttnUpDecoderBlock2D(in_channels=16, out_channels=8, num_layers=2, resnet_groups=4,
                                               attention_head_dim=4),
                 unet_blocks.AttnUpBlock2D(out_channels=8, num_layers=2, attention_head_dim=4, **common),
                 (x16,), (x16,))
    block_parity(d_blocks.UNetMidBlock2D(in_channels=16, temb_channels=None, resnet_groups=4, attention_head_dim=16),
                 unet_blocks.UNetMidBlock2D(attention_head_dim=16, **common), (x16,), (x16,))
