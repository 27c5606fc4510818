"""jdistill's ControlNetModel against diffusers (fp32, <= 1e-4 relative): the residuals on
their own, and a UNet2DConditionModel driven by them, as a ControlNet pipeline runs the pair.

Every parameter is re-drawn at random (diffusers zero-inits the zero convs and the
conditioning embedder's last conv, which would make every residual 0 and hide a wrong
mapping); checkpoints go through ``save_pretrained`` / safetensors as in the UNet tests.
"""

import diffusers
import jax
import numpy as np
import pytest
import torch
from test_unet_cond import TOKENS, checkpoint, randomize_, skip_shapes

from jdistill.convert import controlnet as convert
from jdistill.convert import engine
from jdistill.convert import unet_cond as convert_unet
from jdistill.models.controlnet import ControlNetModel
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4

# SD 1.x-like: cross-attention then plain down block, two resnets each, cross-attention mid
# block, a 3-stage conditioning embedder (images 4x the latents), odd latents (5x7)
SD = dict(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, cross_attention_dim=12,
          attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
CASES = {
    "sd": (dict(SD, conditioning_embedding_out_channels=(4, 8, 16)), (2, 5, 7)),
    # SDXL-like: text_time embedding, linear projections, transformer depths (1, 2), explicit
    # head counts, BGR conditioning, pooled residuals, resnet-only mid block, and a "timestep"
    # class embedding under act_fn gelu (diffusers' ControlNet builds that one with SiLU)
    "sdxl": (dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
                  attention_head_dim=(1, 1), num_attention_heads=(2, 4), use_linear_projection=True,
                  transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=6 + 6 * 4, class_embed_type="timestep", act_fn="gelu",
                  mid_block_type="UNetMidBlock2D", controlnet_conditioning_channel_order="bgr",
                  global_pool_conditions=True, conditioning_embedding_out_channels=(4, 8),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")),
             (2, 4, 6)),
}


def make_inputs(module, shape, rng) -> dict:
    b, h, w = shape
    f = module.conditioning_factor
    out = dict(sample=rng.standard_normal((b, h, w, module.in_channels)).astype(np.float32),
               timestep=np.array([3, 917]),
               encoder_hidden_states=rng.standard_normal((b, TOKENS, module.context_dim)).astype(np.float32),
               controlnet_cond=rng.uniform(-1, 1, (b, f * h, f * w, module.conditioning_channels)).astype(np.float32))
    if module.addition_embed_type == "text_time":
        text = module.projection_class_embeddings_input_dim - 6 * module.addition_time_embed_dim
        out["added_cond_kwargs"] = {"text_embeds": rng.standard_normal((b, text)).astype(np.float32),
                                    "time_ids": np.array([[64, 48, 0, 0, 64, 64], [80, 64, 8, 4, 64, 64]],
                                                         np.float32)}
    if module.class_embed_type == "timestep":
        out["class_labels"] = np.array([5.0, 250.0], np.float32)
    return out


def to_torch(inputs: dict) -> dict:
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    out = {}
    for key, value in inputs.items():
        if key in ("sample", "controlnet_cond"):
            out[key] = t(nchw(value))
        elif key == "added_cond_kwargs":
            out[key] = {k: t(v) for k, v in value.items()}
        else:
            out[key] = t(value)
    return out


def torch_controlnet(model, inputs, scale, guess_mode=False):
    with torch.no_grad():
        down, mid = model(**to_torch(inputs), conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
    return [nhwc(d.numpy()) for d in down], nhwc(mid.numpy())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (torch model, state dict, flax module, params, inputs, jitted apply)."""
    out = {}
    for i, (name, (cfg, shape)) in enumerate(CASES.items()):
        model = randomize_(diffusers.ControlNetModel(**cfg), seed=10 + i).eval()
        config, state = checkpoint(model, tmp_path_factory.mktemp(name))
        module = convert.module_from_config(config)
        params = convert.load_params(state, module)
        out[name] = (model, state, module, params, make_inputs(module, shape, np.random.default_rng(i)),
                     jax.jit(module.apply, static_argnames=("guess_mode", "train")))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_controlnet_residuals_match_diffusers(built, name):
    model, _, module, params, inputs, apply = built[name]
    down_ref, mid_ref = torch_controlnet(model, inputs, 0.7)
    down, mid = apply({"params": params}, **inputs, conditioning_scale=0.7)
    b, h, w, _ = inputs["sample"].shape
    expected_shapes = skip_shapes(module, b, h, w)
    if module.global_pool_conditions:
        expected_shapes = [(s[0], 1, 1, s[3]) for s in expected_shapes]
    assert [d.shape for d in down] == expected_shapes  # one residual per UNet skip state
    for j, (d, r) in enumerate(zip(down, down_ref)):
        assert_close(d, r, TOL, f"{name} down residual {j}")
    assert_close(mid, mid_ref, TOL, f"{name} mid residual")


def test_guess_mode_scales_match_diffusers(built):
    model, _, _, params, inputs, apply = built["sd"]
    down_ref, mid_ref = torch_controlnet(model, inputs, 0.8, guess_mode=True)
    down, mid = apply({"params": params}, **inputs, conditioning_scale=0.8, guess_mode=True)
    for j, (d, r) in enumerate(zip(down, down_ref)):
        assert_close(d, r, TOL, f"guess mode down residual {j}")
    assert_close(mid, mid_ref, TOL, "guess mode mid residual")


def test_unet_driven_by_controlnet_matches_diffusers(built, tmp_path):
    """The ControlNet pipeline's denoiser call: residuals (conditioning_scale 0.6) into the UNet."""
    cn_model, _, cn_module, cn_params, inputs, cn_apply = built["sd"]
    unet_model = randomize_(diffusers.UNet2DConditionModel(
        **{k: v for k, v in SD.items()}, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), seed=3).eval()
    config, state = checkpoint(unet_model, tmp_path)
    unet = convert_unet.module_from_config(config)
    unet_params = convert_unet.load_params(state, unet)
    unet_inputs = {k: v for k, v in inputs.items() if k != "controlnet_cond"}

    torch_inputs = to_torch(inputs)
    with torch.no_grad():
        down_t, mid_t = cn_model(**torch_inputs, conditioning_scale=0.6, return_dict=False)
        del torch_inputs["controlnet_cond"]
        expected = nhwc(unet_model(**torch_inputs, down_block_additional_residuals=down_t,
                                   mid_block_additional_residual=mid_t).sample.numpy())
        plain = nhwc(unet_model(**torch_inputs).sample.numpy())

    down, mid = cn_apply({"params": cn_params}, **inputs, conditioning_scale=0.6)
    out = jax.jit(unet.apply)({"params": unet_params}, **unet_inputs, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid)
    assert_close(out, expected, TOL, "UNet + ControlNet")
    assert not np.allclose(expected, plain, atol=1e-3)  # the residuals do change the prediction


def test_fresh_controlnet_starts_as_a_no_op():
    """Flax init zeroes the zero convs and the embedder's conv_out, as diffusers does: a
    ControlNet about to be trained adds nothing to its UNet."""
    module = ControlNetModel(block_out_channels=(4,), layers_per_block=1, norm_num_groups=2, cross_attention_dim=3,
                             attention_head_dim=1, down_block_types=("DownBlock2D",), mid_block_type="UNetMidBlock2D",
                             conditioning_embedding_out_channels=(2, 4))
    args, kwargs = module.example_inputs(batch=2)
    rng = np.random.default_rng(0)
    args = tuple(rng.standard_normal(a.shape).astype(np.float32) for a in args)
    # an "rbg" key: XLA:CPU compiles this init several times faster than with threefry
    params = jax.jit(module.init)(jax.random.key(0, impl="rbg"), *args, **kwargs)["params"]
    zero = [params[k] for k in params if k.startswith("controlnet_down_blocks") or k == "controlnet_mid_block"]
    zero.append(params["controlnet_cond_embedding"]["conv_out"])
    assert len(zero) == 4 and all(not np.any(leaf) for p in zero for leaf in jax.tree.leaves(p))
    assert np.any(params["controlnet_cond_embedding"]["conv_in"]["kernel"])
    down, mid = jax.jit(module.apply)({"params": params}, *args, **kwargs)
    assert all(not np.any(d) for d in down) and not np.any(mid)


def test_protocol_example_inputs_fit_the_checkpoint(built):
    _, state, module, params, _, _ = built["sd"]
    args, kwargs = convert.example_inputs(module, batch=2)
    assert args[3].shape[1] == args[0].shape[1] * module.conditioning_factor
    assert convert.export_rules(module) == []
    exported = engine.flax_to_torch_state_dict(params, {k: v.shape for k, v in state.items()})
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_converter_names_missing_unexpected_and_misshaped_keys(built):
    _, state, module, _, _, _ = built["sd"]
    bad = dict(state)
    del bad["controlnet_down_blocks.3.weight"]
    bad["controlnet_cond_embedding.blocks.9.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    bad["controlnet_mid_block.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    with pytest.raises(engine.ConversionError) as err:
        convert.load_params(bad, module)
    msg = str(err.value)
    assert "controlnet_down_blocks_3/kernel" in msg
    assert "controlnet_cond_embedding.blocks.9.weight" in msg
    assert "controlnet_mid_block.weight: checkpoint (16, 16, 3, 3)" in msg


def test_converter_names_another_family(built, tmp_path):
    _, _, module, _, _, _ = built["sd"]
    unet = diffusers.UNet2DConditionModel(**SD, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    _, unet_state = checkpoint(unet, tmp_path)
    with pytest.raises(engine.ConversionError, match="look like a UNet2DConditionModel"):
        convert.load_params(unet_state, module)


@pytest.mark.parametrize("change, needle", [
    (dict(layers_per_block=(1, 2)), "layers_per_block must be a single int"),
    (dict(cross_attention_dim=(12, 12)), "cross_attention_dim must be a single int"),
    (dict(mid_block_type=None), "mid_block_type None"),
    (dict(class_embed_type="simple_projection", projection_class_embeddings_input_dim=3), "simple_projection"),
    (dict(controlnet_conditioning_channel_order="yuv"), "yuv"),
    (dict(down_block_types=("AttnDownBlock2D", "DownBlock2D")), "AttnDownBlock2D"),
])
def test_unsupported_options_are_refused_by_name(change, needle):
    with pytest.raises(ValueError, match=needle):
        ControlNetModel(**{**SD, **change})
    with pytest.raises(ValueError, match=needle):
        convert.module_from_config({"_class_name": "ControlNetModel", **SD, **change})


def test_config_refuses_unimplemented_and_unknown_keys():
    with pytest.raises(ValueError, match="encoder_hid_dim_type='text_proj'"):
        convert.module_from_config({**SD, "encoder_hid_dim_type": "text_proj"})
    with pytest.raises(ValueError, match="up_block_types"):  # a UNet config is not a ControlNet config
        convert.module_from_config({**SD, "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")})
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        convert.module_from_config({**SD, "_class_name": "UNet2DConditionModel"})


def test_conditioning_image_of_the_wrong_size_is_named(built):
    _, _, module, params, inputs, _ = built["sd"]
    bad = dict(inputs, controlnet_cond=inputs["controlnet_cond"][:, :-4])
    with pytest.raises(ValueError, match="4x the latent size"):
        module.apply({"params": params}, **bad)
