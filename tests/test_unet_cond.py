"""jdistill's UNet2DConditionModel against diffusers (fp32, <= 1e-4 relative).

Each case is a tiny diffusers ``UNet2DConditionModel`` with every parameter re-drawn at random
(diffusers zero-inits several layers, which would hide a wrong mapping), written with
``save_pretrained`` (safetensors + config.json, as public checkpoints are), read back with
safetensors, converted through the family protocol, and run on the same inputs. Together the
cases hold every block type and option the Flax model accepts (checked by
``test_every_supported_option_is_covered``).

The helpers here (``randomize_``, ``checkpoint``) are shared with the ControlNet and VAE tests.
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jdistill.convert import engine
from jdistill.convert import unet_cond as convert
from jdistill.models import layers, unet_cond
from jdistill.models.unet_cond import UNet2DConditionModel
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
TOKENS = 5


def randomize_(module: torch.nn.Module, seed: int = 0):
    """Redraw every parameter: norm scales near 1, biases small, weights ~ 1/sqrt(fan_in), so
    activations stay O(1) through the stack and no layer is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.3 * r if name.endswith("weight") else 0.3 * r)
            else:
                p.copy_(r / np.sqrt(p[0].numel()))
    return module


def checkpoint(model, path):
    """``save_pretrained`` as public checkpoints are written; returns (config dict, state dict
    read back with safetensors)."""
    model.save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    return config, load_file(str(path / "diffusion_pytorch_model.safetensors"))


def skip_shapes(module, batch: int, height: int, width: int) -> list[tuple]:
    """NHWC shapes of a conditional UNet's skip states (what ControlNet residuals must match):
    conv_in's output, each resnet's, each stride-2 downsampler's (ceil halving)."""
    shapes = [(batch, height, width, module.block_out_channels[0])]
    n = len(module.block_out_channels)
    for i, (width_i, count) in enumerate(zip(module.block_out_channels, module.layers)):
        shapes += [(batch, height, width, width_i)] * count
        if i < n - 1:
            height, width = -(-height // 2), -(-width // 2)
            shapes.append((batch, height, width, width_i))
    return shapes


# name -> (diffusers config, (B, H, W) of the latents, extras: which inputs the case feeds)
CASES = {
    # SD 1.x: cross-attention down x2 + plain down, cross-attention mid, 1x1-conv proj_in, one head
    # count; odd latents (10x14: upsamplers resize to 3->5, 5->10 / 4->7, 7->14) and ControlNet
    # residuals fed in
    "sd1": (dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
                 attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
            (2, 10, 14), {"residuals"}),
    # SD 2.x: linear proj_in / proj_out, head counts per block (reversed on the way up), upcast
    # attention, per-block layer counts and cross_attention_dim, attn1 attending to the text in the
    # first block
    "sd2": (dict(block_out_channels=(8, 16), layers_per_block=(1, 2), norm_num_groups=4, cross_attention_dim=(12, 12),
                 attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                 only_cross_attention=(True, False),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
            (2, 8, 8), {"float_t"}),
    # SDXL: plain first level, transformer depth per block (1, 2), "text_time" embedding of the
    # pooled text and six size / crop ids
    "sdxl": (dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
                  attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                  addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=6 + 6 * 4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
             (2, 8, 8), {"text_time"}),
    # an LCM-style student's time embedding (timestep_cond through cond_proj, post-act, act on
    # the sum), "timestep" class embedding with act_fn gelu, scale_shift resnets, resnet-only mid
    # block, odd kernels, centred input, custom time width
    "lcm_scaleshift": (dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=6,
                            attention_head_dim=2, time_cond_proj_dim=5, timestep_post_act="silu",
                            time_embedding_act_fn="mish", class_embed_type="timestep", act_fn="gelu",
                            resnet_time_scale_shift="scale_shift", mid_block_type="UNetMidBlock2D",
                            conv_in_kernel=1, conv_out_kernel=5, center_input_sample=True, time_embedding_dim=24,
                            flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, mid_block_scale_factor=1.4,
                            downsample_padding=0,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                       (2, 8, 6), {"timestep_cond", "class_timestep"}),
    # per-resnet transformer depths (asymmetric: reverse_transformer_layers_per_block), a
    # "projection" class embedding concatenated to the time embedding, no mid block
    "asymmetric_concat": (dict(block_out_channels=(8,), layers_per_block=2, norm_num_groups=4,
                               cross_attention_dim=6, attention_head_dim=2, transformer_layers_per_block=((1, 2),),
                               reverse_transformer_layers_per_block=((2, 1, 1),),
                               class_embed_type="projection", projection_class_embeddings_input_dim=7,
                               class_embeddings_concat=True, mid_block_type=None,
                               down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)),
                          (2, 4, 4), {"class_projection"}),
}
# one-level UNets for the remaining class embeddings (a table, identity, a bare linear), a
# scalar timestep, dropout (inactive at eval)
TINY = dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, cross_attention_dim=6,
            attention_head_dim=2, mid_block_type="UNetMidBlock2DCrossAttn",
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
CASES.update({
    "class_table": (dict(TINY, num_class_embeds=5), (2, 4, 4), {"class_table"}),
    "class_identity": (dict(TINY, class_embed_type="identity", dropout=0.1), (2, 4, 4), {"class_identity"}),
    "class_simple_projection": (dict(TINY, class_embed_type="simple_projection",
                                     projection_class_embeddings_input_dim=3), (2, 4, 4),
                                {"class_projection", "scalar_t"}),
})


def make_inputs(module, shape, extras, rng) -> dict:
    """Random inputs for a case, as numpy arrays (NHWC), keyed by the Flax argument names."""
    b, h, w = shape
    out = dict(sample=rng.standard_normal((b, h, w, module.in_channels)).astype(np.float32),
               timestep=np.array([3, 917]),
               encoder_hidden_states=rng.standard_normal((b, TOKENS, module.context_dim)).astype(np.float32))
    if "float_t" in extras:
        out["timestep"] = np.array([12.5, 700.25], np.float32)
    if "scalar_t" in extras:  # broadcast over the batch
        out["timestep"] = np.array(250)
    if "text_time" in extras:
        text = module.projection_class_embeddings_input_dim - 6 * module.addition_time_embed_dim
        out["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((b, text)).astype(np.float32),
            # original size, crop corner, target size (SDXL's micro-conditioning)
            "time_ids": np.array([[64, 48, 0, 0, 64, 64], [80, 64, 8, 4, 64, 64]], np.float32)}
    if "residuals" in extras:
        out["down_block_additional_residuals"] = [rng.standard_normal(s).astype(np.float32)
                                                  for s in skip_shapes(module, b, h, w)]
        mid = skip_shapes(module, b, h, w)[-1]
        out["mid_block_additional_residual"] = rng.standard_normal(mid).astype(np.float32)
    if "timestep_cond" in extras:
        out["timestep_cond"] = rng.standard_normal((b, module.time_cond_proj_dim)).astype(np.float32)
    if "class_timestep" in extras:
        out["class_labels"] = np.array([5.0, 250.0], np.float32)
    if "class_table" in extras:
        out["class_labels"] = np.array([1, 4])
    if "class_identity" in extras:
        out["class_labels"] = rng.standard_normal((b, module.time_embed_dim)).astype(np.float32)
    if "class_projection" in extras:
        out["class_labels"] = rng.standard_normal((b, module.projection_class_embeddings_input_dim)).astype(np.float32)
    return out


def torch_call(model, inputs: dict):
    """diffusers' forward on the same inputs (NCHW, torch tensors), back as NHWC numpy."""
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    kw = {}
    for key, value in inputs.items():
        if key in ("sample", "mid_block_additional_residual"):
            kw[key] = t(nchw(value))
        elif key == "down_block_additional_residuals":
            kw[key] = tuple(t(nchw(v)) for v in value)
        elif key == "added_cond_kwargs":
            kw[key] = {k: t(v) for k, v in value.items()}
        else:
            kw[key] = t(value)
    with torch.no_grad():
        return nhwc(model(**kw).sample.numpy())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (torch model, config, state dict, flax module, params, inputs, jitted apply); built
    once, the apply shared by the tests so that each case compiles once."""
    out = {}
    for i, (name, (cfg, shape, extras)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = randomize_(diffusers.UNet2DConditionModel(**cfg), seed=i).eval()
        config, state = checkpoint(model, tmp_path_factory.mktemp(name))
        module = convert.module_from_config(config)
        params = convert.load_params(state, module)
        out[name] = (model, config, state, module, params, make_inputs(module, shape, extras, np.random.default_rng(i)),
                     jax.jit(module.apply, static_argnames="train"))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_unet_cond_matches_diffusers(built, name):
    model, _, _, module, params, inputs, apply = built[name]
    expected = torch_call(model, inputs)
    out = apply({"params": params}, **inputs)
    assert out.shape == expected.shape
    assert_close(out, expected, TOL, name)


def test_every_supported_option_is_covered():
    """The cases above hold every block type, embedding and option the Flax model accepts."""
    cfgs = [c for c, *_ in CASES.values()]
    values = lambda key, default: {c.get(key, default) for c in cfgs}  # noqa: E731
    blocks = lambda key: {b for c in cfgs for b in c[key]}  # noqa: E731
    assert blocks("down_block_types") == set(unet_cond.DOWN_BLOCKS)
    assert blocks("up_block_types") == set(unet_cond.UP_BLOCKS)
    assert values("mid_block_type", "UNetMidBlock2DCrossAttn") == set(unet_cond.MID_BLOCKS)
    assert values("class_embed_type", None) == set(unet_cond.CLASS_EMBED_TYPES)
    assert any(c.get("num_class_embeds") for c in cfgs)
    assert values("addition_embed_type", None) == set(unet_cond.ADDITION_EMBED_TYPES)
    assert values("resnet_time_scale_shift", "default") == {"default", "scale_shift"}
    assert values("use_linear_projection", False) == {True, False}
    for key in ("only_cross_attention", "layers_per_block", "attention_head_dim", "transformer_layers_per_block",
                "cross_attention_dim"):
        assert any(isinstance(c.get(key), tuple) for c in cfgs), key
    for key in ("reverse_transformer_layers_per_block", "time_cond_proj_dim", "timestep_post_act",
                "time_embedding_act_fn", "class_embeddings_concat", "center_input_sample", "time_embedding_dim",
                "upcast_attention", "dropout"):
        assert any(c.get(key) for c in cfgs), key
    assert values("conv_in_kernel", 3) >= {1, 3} and values("conv_out_kernel", 3) >= {3, 5}
    assert values("downsample_padding", 1) == {0, 1}


def test_dropout_is_train_only(built):
    _, _, _, _, params, inputs, apply = built["class_identity"]
    eval_out = apply({"params": params}, **inputs)
    a = apply({"params": params}, **inputs, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply({"params": params}, **inputs, train=True, rngs={"dropout": jax.random.key(1)})
    c = apply({"params": params}, **inputs, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, eval_out) and not np.allclose(a, c)


def test_bf16_compute_over_fp32_params(built):
    """dtype=bfloat16 computes in bf16 from the same fp32 params and stays near fp32."""
    _, _, _, module, params, inputs, apply = built["class_table"]
    out = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, **inputs)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), apply({"params": params}, **inputs), 5e-2, "bf16")


@pytest.fixture(scope="module")
def student(built):
    """The "class_table" teacher's guidance_embed student and its jitted apply."""
    module = built["class_table"][3].clone(guidance_embed=True)
    return module, jax.jit(module.apply)


def test_guidance_student_grafted_from_teacher_is_the_teacher(built, student):
    """engine.graft of the teacher's params into a fresh student tree fills every leaf but the
    guidance embedding (the rest of the fresh tree is NaN here: a leaf graft missed would show),
    and that student is the teacher for any guidance weight until the embedding's last layer
    moves."""
    _, _, _, teacher, params, inputs, teacher_apply = built["class_table"]
    module, student_apply = student
    w = np.array([1.0, 7.5], np.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), **inputs, guidance=w)["params"]
    fresh = jax.tree.map(lambda s: np.full(s.shape, np.nan, s.dtype), shapes)
    fresh["guidance_embedder"] = layers.GuidanceEmbedding(teacher.time_embed_dim).init(
        jax.random.key(5), w)["params"]  # the standalone module is what the UNet builds (graft checks shapes)
    grafted = engine.graft(params, fresh, new=["guidance_embedder"])
    teacher_out = np.asarray(teacher_apply({"params": params}, **inputs))
    np.testing.assert_array_equal(student_apply({"params": grafted}, **inputs, guidance=w), teacher_out)

    lin2 = grafted["guidance_embedder"]["linear_2"]
    lin2["kernel"] = jax.random.normal(jax.random.key(4), lin2["kernel"].shape)
    out = np.asarray(student_apply({"params": grafted}, **inputs, guidance=w))
    assert not np.allclose(out, teacher_out)
    assert not np.allclose(out, student_apply({"params": grafted}, **inputs, guidance=w[::-1]))


def test_loader_gives_a_guidance_student_the_teacher_checkpoint(built, student):
    """A diffusers checkpoint fills every shared param; rng draws only the guidance embedding."""
    model, _, state, _, params, inputs, _ = built["class_table"]
    module, student_apply = student
    with pytest.raises(ValueError, match="rng"):
        convert.load_params(state, module)
    loaded = convert.load_params(state, module, rng=jax.random.key(3))
    assert set(loaded) == set(params) | {"guidance_embedder"}
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in loaded.items() if k != "guidance_embedder"}, params)
    out = student_apply({"params": loaded}, **inputs, guidance=np.array([1.0, 7.5], np.float32))
    assert_close(out, torch_call(model, inputs), TOL, "guidance student")


def test_protocol_example_inputs_and_export_round_trip(built):
    """example_inputs init the module; export_rules + the engine give back diffusers' state dict."""
    model, _, state, module, params, *_ = built["sdxl"]
    args, kwargs = convert.example_inputs(module, batch=3)
    assert args[0].shape[0] == 3
    jax.tree.map(lambda a, b: a.shape == b.shape or pytest.fail("shape"),
                 engine.abstract_params(module, *args, **kwargs), params)
    exported = engine.flax_to_torch_state_dict(params, {k: v.shape for k, v in state.items()},
                                               convert.export_rules(module))
    assert exported.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_converter_names_missing_unexpected_and_misshaped_keys(built):
    _, _, state, module, *_ = built["sd1"]
    bad = dict(state)
    del bad["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    bad["mid_block.attentions.0.extra.weight"] = np.zeros(3, np.float32)
    bad["conv_out.weight"] = np.zeros((4, 8, 5, 5), np.float32)
    with pytest.raises(engine.ConversionError) as err:
        convert.load_params(bad, module)
    msg = str(err.value)
    assert "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel" in msg
    assert "mid_block.attentions.0.extra.weight" in msg
    assert "conv_out.weight: checkpoint (4, 8, 5, 5)" in msg


def test_converter_names_another_family(built, tmp_path):
    _, _, _, module, *_ = built["sd1"]
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4)
    _, vae_state = checkpoint(vae, tmp_path)
    with pytest.raises(engine.ConversionError, match="look like an AutoencoderKL"):
        convert.load_params(vae_state, module)


@pytest.mark.parametrize("change, needle", [
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), "SimpleCrossAttnDownBlock2D"),
    (dict(up_block_types=("AttnUpBlock2D", "UpBlock2D")), "AttnUpBlock2D"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "UNetMidBlock2DSimpleCrossAttn"),
    (dict(addition_embed_type="text"), "addition_embed_type 'text'"),
    (dict(class_embed_type="projection"), "projection_class_embeddings_input_dim"),
    (dict(addition_embed_type="text_time"), "addition_time_embed_dim"),
    (dict(resnet_time_scale_shift="spatial"), "spatial"),
    (dict(norm_num_groups=None), "norm_num_groups"),
    (dict(act_fn="tanhshrink"), "tanhshrink"),
    (dict(num_attention_heads=2), "num_attention_heads"),
    (dict(cross_attention_dim=(12, 16)), "cross_attention_dim"),
    (dict(attention_head_dim=(2, 2, 2)), "attention_head_dim"),
    (dict(attention_head_dim=16), "attention heads"),
    (dict(transformer_layers_per_block=((1, 1), (1, 1))), "reverse_transformer_layers_per_block"),
    (dict(conv_in_kernel=4), "even conv kernel"),
    (dict(block_out_channels=(8, 16, 32)), "as many"),
])
def test_unsupported_options_are_refused_by_name(change, needle):
    base = dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4, attention_head_dim=2)
    with pytest.raises(ValueError, match=needle):
        UNet2DConditionModel(**{**base, **change})
    with pytest.raises(ValueError, match=needle):
        convert.module_from_config({"_class_name": "UNet2DConditionModel", **base, **change})


@pytest.mark.parametrize("key, value", [("dual_cross_attention", True), ("encoder_hid_dim", 16),
                                        ("encoder_hid_dim_type", "text_proj"), ("time_embedding_type", "fourier"),
                                        ("attention_type", "gated")])
def test_config_refuses_unimplemented_options_by_name(built, key, value):
    _, config, *_ = built["sd1"]
    assert config[key] == convert.UNSUPPORTED_AT_DEFAULT[key]  # saved configs carry the default: accepted
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        convert.module_from_config({**config, key: value})


def test_config_refuses_unknown_keys_and_other_classes(built):
    _, config, *_ = built["sd1"]
    assert convert.config_from_diffusers(config)["down_block_types"][0] == "CrossAttnDownBlock2D"
    with pytest.raises(ValueError, match="new_option"):
        convert.module_from_config({**config, "new_option": 2.0})
    with pytest.raises(ValueError, match="UNet2DModel"):
        convert.module_from_config({**config, "_class_name": "UNet2DModel"})


def test_missing_inputs_are_named(built):
    _, _, _, module, params, inputs, _ = built["sdxl"]
    with pytest.raises(ValueError, match="time_ids"):
        module.apply({"params": params}, **dict(inputs, added_cond_kwargs={"text_embeds": np.zeros((2, 6))}))
    _, _, _, module, params, inputs, _ = built["sd1"]
    with pytest.raises(ValueError, match="come as a pair"):
        module.apply({"params": params}, **{k: v for k, v in inputs.items() if k != "mid_block_additional_residual"})
    with pytest.raises(ValueError, match="cross_attention_dim is 12"):
        module.apply({"params": params}, **dict(inputs, encoder_hidden_states=np.zeros((2, 3, 7), np.float32)))
