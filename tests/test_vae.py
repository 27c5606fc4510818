"""jdistill's AutoencoderKL against diffusers (fp32, <= 1e-4 relative): posterior moments,
decoding, a posterior sample with given noise, reconstruction, the latent normalisation the
diffusion pipelines apply, and checkpoints with the pre-rename attention keys.

Every parameter is re-drawn at random; checkpoints go through ``save_pretrained`` /
safetensors as in the UNet tests.
"""

import diffusers
import jax
import numpy as np
import pytest
import torch
from test_unet_cond import checkpoint, randomize_

from jdistill.convert import engine
from jdistill.convert import vae as convert
from jdistill.models import vae as vae_lib
from jdistill.models.vae import AutoencoderKL
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4

CASES = {
    # SD 1.x / SDXL layout: encoder / decoder blocks, mid attention, quant convs, scaling only
    "sd": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
               down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
               up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")),
    # SD3 / Flux layout: no quant convs, a shift factor; attention in the encoder / decoder
    # blocks, none in the mid block; 3 latent channels, two resnets per block, gelu resnets
    "sd3_attn": dict(block_out_channels=(8, 12), layers_per_block=2, norm_num_groups=4, latent_channels=3,
                     act_fn="gelu", use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                     scaling_factor=1.5305, shift_factor=0.0609,
                     down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
                     up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D")),
    # per-channel latent statistics (Playground v2.5-style latents_mean / latents_std)
    "latent_stats": dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, scaling_factor=0.5,
                         latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (torch model, state dict, flax module, params, images, jitted encode, jitted decode)."""
    out = {}
    for i, (name, cfg) in enumerate(CASES.items()):
        model = randomize_(diffusers.AutoencoderKL(**cfg), seed=20 + i).eval()
        config, state = checkpoint(model, tmp_path_factory.mktemp(name))
        module = convert.module_from_config(config)
        params = convert.load_params(state, module)
        # a non-square image whose sides halve unevenly on the way down (10 -> 5)
        images = np.random.default_rng(i).uniform(-1, 1, (2, 10, 12, module.in_channels)).astype(np.float32)
        encode = jax.jit(lambda p, x, m=module: m.apply({"params": p}, x, method=m.encode))
        decode = jax.jit(lambda p, z, m=module: m.apply({"params": p}, z, method=m.decode))
        out[name] = (model, state, module, params, images, encode, decode)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_encode_decode_and_sample_match_diffusers(built, name):
    model, _, module, params, images, encode, decode = built[name]
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(nchw(images))).latent_dist
        # DiagonalGaussianDistribution.sample draws torch.randn with the generator: the same noise
        torch_sample = posterior.sample(generator=torch.Generator().manual_seed(7))
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
        decoded = model.decode(torch_sample).sample
    mean, logvar = encode(params, images)
    assert_close(mean, nhwc(posterior.mean.numpy()), TOL, f"{name} mean")
    assert_close(logvar, nhwc(posterior.logvar.numpy()), TOL, f"{name} logvar")
    z = module.sample(mean, logvar, noise=nhwc(noise.numpy()))
    assert_close(z, nhwc(torch_sample.numpy()), TOL, f"{name} sample")
    assert_close(decode(params, nhwc(torch_sample.numpy())), nhwc(decoded.numpy()), TOL, f"{name} decode")


def test_logvar_is_clipped_as_diffusers_clips_it(built):
    """Moments far outside [-30, 20] (a conv_out bias pushed out) come back clipped, as diffusers'."""
    model, state, module, params, images, encode, _ = built["sd"]
    params = jax.tree.map(np.array, params)
    latent = module.latent_channels
    params["quant_conv"]["bias"][latent:] = np.array([-80.0, 80.0, 0.0, 1.0])
    mean, logvar = encode(params, images)
    with torch.no_grad():
        model.quant_conv.bias[latent:] = torch.tensor([-80.0, 80.0, 0.0, 1.0])
        posterior = model.encode(torch.from_numpy(nchw(images))).latent_dist
    model.quant_conv.bias.data.copy_(torch.from_numpy(state["quant_conv.bias"]))  # leave the shared model as built
    assert logvar[..., 0].max() == -30.0 and logvar[..., 1].min() == 20.0
    assert_close(logvar, nhwc(posterior.logvar.numpy()), TOL, "clipped logvar")


def test_reconstruction_matches_diffusers_forward(built):
    model, _, module, params, images, _, _ = built["sd"]
    with torch.no_grad():
        expected = nhwc(model(torch.from_numpy(nchw(images))).sample.numpy())  # decodes the posterior mean
    assert_close(jax.jit(module.apply)({"params": params}, images), expected, TOL, "reconstruction")
    sampled = jax.jit(module.apply)({"params": params}, images, jax.random.key(0))
    assert sampled.shape == expected.shape and not np.allclose(sampled, expected)


@pytest.mark.parametrize("name", ["sd3_attn", "latent_stats", "sd"])
def test_latent_helpers_match_the_pipelines(built, name):
    """latents_from_images / images_from_latents against the formulas diffusers' pipelines apply:
    SD 1.x / SDXL ``z * scaling_factor``, SD3 / Flux ``(z - shift_factor) * scaling_factor``,
    SDXL with latents_mean / latents_std ``(z - mean) * scaling_factor / std``; decoding inverts."""
    model, _, module, params, images, _, _ = built[name]
    cfg = model.config
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(nchw(images))).latent_dist
        noise = np.random.default_rng(3).standard_normal(nhwc(posterior.mean.numpy()).shape).astype(np.float32)
        z = posterior.mean + posterior.std * torch.from_numpy(nchw(noise))
        if cfg.latents_mean is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1)
            latents = (z - mean) * cfg.scaling_factor / std
            back = latents * std / cfg.scaling_factor + mean
        else:
            shift = cfg.shift_factor or 0.0
            latents = (z - shift) * cfg.scaling_factor
            back = latents / cfg.scaling_factor + shift
        images_back = model.decode(back).sample
    ours = jax.jit(lambda p, x, n: module.apply({"params": p}, x, noise=n, method=module.latents_from_images))(
        params, images, noise)
    assert_close(ours, nhwc(latents.numpy()), TOL, f"{name} latents")
    decoded = jax.jit(lambda p, l: module.apply({"params": p}, l, method=module.images_from_latents))(params, ours)
    assert_close(decoded, nhwc(images_back.numpy()), TOL, f"{name} images")


def test_scaling_helpers_are_inverse_and_need_no_params():
    z = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32)
    for cfg in ({}, {"shift_factor": 0.0609, "scaling_factor": 1.5305},
                {"latents_mean": (0.1, -0.2, 0.3, 0.0), "latents_std": (1.5, 0.5, 2.0, 1.0)}):
        vae = AutoencoderKL(**cfg)  # unbound: the helpers read the config only
        np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z)), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(AutoencoderKL().scale_latents(z), z * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(AutoencoderKL(shift_factor=0.5, scaling_factor=2.0).scale_latents(z), (z - 0.5) * 2,
                               rtol=1e-6)


def test_sample_from_a_key():
    mean, logvar = np.zeros((4096,), np.float32) + 1.0, np.full((4096,), np.log(4.0), np.float32)
    z = np.asarray(vae_lib.sample_latents(mean, logvar, jax.random.key(0)))
    assert abs(z.mean() - 1.0) < 0.1 and abs(z.std() - 2.0) < 0.1
    np.testing.assert_array_equal(z, vae_lib.sample_latents(mean, logvar, jax.random.key(0)))
    with pytest.raises(ValueError, match="key or the noise"):
        vae_lib.sample_latents(mean, logvar)


def test_converter_reads_pre_rename_attention_keys(built):
    """The original SD VAE uploads name the mid attention query / key / value / proj_attn."""
    _, state, module, params, _, _, _ = built["sd"]
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in state.items():
        for new, old in old_names.items():
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    jax.tree.map(np.testing.assert_array_equal, convert.load_params(legacy, module), params)


def test_converter_names_missing_unexpected_and_misshaped_keys(built):
    _, state, module, _, _, _, _ = built["sd"]
    bad = dict(state)
    del bad["decoder.mid_block.attentions.0.to_v.bias"]
    bad["encoder.down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    bad["post_quant_conv.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(engine.ConversionError) as err:
        convert.load_params(bad, module)
    msg = str(err.value)
    assert "decoder/mid_block/attentions_0/to_v/bias" in msg
    assert "encoder.down_blocks.0.resnets.0.extra.weight" in msg
    assert "post_quant_conv.weight: checkpoint (4, 4, 3, 3)" in msg


def test_converter_names_another_family(built, tmp_path):
    _, _, module, _, _, _, _ = built["sd"]
    unet = diffusers.UNet2DConditionModel(block_out_channels=(8,), norm_num_groups=4, cross_attention_dim=6,
                                          attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",),
                                          up_block_types=("CrossAttnUpBlock2D",))
    _, unet_state = checkpoint(unet, tmp_path)
    with pytest.raises(engine.ConversionError, match="look like a UNet2DConditionModel"):
        convert.load_params(unet_state, module)


@pytest.mark.parametrize("change, needle", [
    (dict(down_block_types=("DownBlock2D",)), "DownBlock2D"),
    (dict(up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")), "as many"),
    (dict(latents_mean=(0.0,) * 4), "come together"),
    (dict(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4, shift_factor=0.1), "give one"),
    (dict(latents_mean=(0.0,) * 3, latents_std=(1.0,) * 3), "latent_channels"),
    (dict(act_fn="tanhshrink"), "tanhshrink"),
])
def test_unsupported_options_are_refused_by_name(change, needle):
    with pytest.raises(ValueError, match=needle):
        AutoencoderKL(**change)
    with pytest.raises(ValueError, match=needle):
        convert.module_from_config({"_class_name": "AutoencoderKL", **change})


def test_config_refuses_unknown_keys_and_other_classes():
    assert convert.config_from_diffusers({"_class_name": "AutoencoderKL", "shift_factor": 0.1})["shift_factor"] == 0.1
    with pytest.raises(ValueError, match="norm_type"):
        convert.module_from_config({"norm_type": "spatial"})
    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        convert.module_from_config({"_class_name": "AutoencoderKLWan"})
