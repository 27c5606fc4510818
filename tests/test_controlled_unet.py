"""Composite networks as one Denoiser (jdistill/models/controlled_unet.py): a UNet2DConditionModel driven
by a ControlNet, run through ``Denoiser.for_module(...).predict`` with classifier-free guidance,
against diffusers' UNet fed by diffusers' ControlNetModel residuals as
StableDiffusionControlNetPipeline computes a step's noise prediction (fp32, <= 1e-4 relative)."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_controlnet import SD
from test_unet_cond import TOKENS, checkpoint, randomize_

from jdistill.convert import controlnet as convert_controlnet
from jdistill.convert import unet_cond as convert_unet
from jdistill.denoiser import Denoiser
from jdistill.diffusion import schedules
from jdistill.errors import InvalidArgument
from jdistill.models import registry
from jdistill.models.controlled_unet import ControlledUNet
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
G = 7.5  # the pipeline's guidance_scale
SCALE = 0.6  # its controlnet_conditioning_scale
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """diffusers' ControlNet and UNet (SD 1.x-like, every weight redrawn), their converted
    modules and params, and the ControlledUNet Denoiser over them."""
    root = tmp_path_factory.mktemp("controlled")
    cn = randomize_(diffusers.ControlNetModel(**SD, conditioning_embedding_out_channels=(4, 8, 16)), seed=21).eval()
    unet = randomize_(diffusers.UNet2DConditionModel(**SD, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                      seed=22).eval()
    cn_config, cn_state = checkpoint(cn, root / "controlnet")
    unet_config, unet_state = checkpoint(unet, root / "unet")
    cn_module, unet_module = convert_controlnet.module_from_config(cn_config), convert_unet.module_from_config(unet_config)
    params = {"unet": convert_unet.load_params(unet_state, unet_module),
              "controlnet": convert_controlnet.load_params(cn_state, cn_module)}
    net = ControlledUNet(unet=unet_module, controlnet=cn_module, conditioning_scale=SCALE)
    den = Denoiser.for_module(net, schedules.DiscreteVP.from_betas("scaled_linear", 1000, 0.00085, 0.012), "eps",
                              params)
    return cn, unet, net, den


def test_the_composite_params_are_the_converters_trees(pair):
    """init's tree (shapes only) is {"unet": UNet tree, "controlnet": ControlNet tree}, leaf for leaf."""
    _, _, net, den = pair
    args, kwargs = registry.example_inputs(net)
    shapes = jax.eval_shape(net.init, jax.random.key(0), *args, **kwargs)["params"]
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, den.params)
    # read off the UNet: 4 channels in and out, so no learned variance; no class labels
    assert (den.learned_variance, den.null_cond, net.in_channels, net.out_channels) == (False, None, 4, 4)


def test_controlled_unet_with_cfg_matches_the_controlnet_pipelines_step(pair):
    cn, unet, _, den = pair
    rng = np.random.default_rng(0)
    b, h, w = 2, 5, 7
    z = rng.standard_normal((b, h, w, 4)).astype(np.float32)
    text = rng.standard_normal((b, TOKENS, 12)).astype(np.float32)
    empty = np.broadcast_to(rng.standard_normal((1, TOKENS, 12)), (b, TOKENS, 12)).astype(np.float32)
    image = rng.uniform(0, 1, (b, 4 * h, 4 * w, 3)).astype(np.float32)  # 4x the latents, in [0, 1]
    ab = diffusers.DDIMScheduler(**SD_BETAS).alphas_cumprod.numpy().astype(np.float64)

    predict = jax.jit(lambda z, t, cond, uncond: den.predict(z, t, cond, G, uncond))
    cond = {"encoder_hidden_states": text, "controlnet_cond": image}
    uncond = {"encoder_hidden_states": empty, "controlnet_cond": image}
    for t in (917, 255):
        # StableDiffusionControlNetPipeline.__call__'s step: [uncond, cond] batch, the image twice
        latents = torch.from_numpy(nchw(np.concatenate([z, z])))
        embeds = torch.from_numpy(np.concatenate([empty, text]))
        with torch.no_grad():
            down, mid = cn(latents, t, encoder_hidden_states=embeds,
                           controlnet_cond=torch.from_numpy(nchw(np.concatenate([image, image]))),
                           conditioning_scale=SCALE, guess_mode=False, return_dict=False)
            noise = unet(latents, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]
            plain = unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]
        uncond_pred, text_pred = noise.chunk(2)
        eps = nhwc((uncond_pred + G * (text_pred - uncond_pred)).numpy())
        x0 = (z - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])

        got = predict(jnp.asarray(z), jnp.full((b,), t), cond, uncond)
        assert_close(got.eps, eps, TOL, f"eps at t={t}")
        assert_close(got.x0, x0, TOL, f"x0 at t={t}")
        # the ControlNet's residuals matter at this scale: the UNet alone is far off
        assert not np.allclose(nhwc(plain.numpy()), nhwc(noise.numpy()), atol=1e-2)


def test_global_pooling_controlnets_are_refused(pair):
    _, _, net, den = pair
    pooled = den.replace(module=net.clone(controlnet=net.controlnet.clone(global_pool_conditions=True)))
    args, kwargs = registry.example_inputs(net)
    with pytest.raises(InvalidArgument, match="guess mode"):
        pooled.output(args[0], jnp.ones((1,)), {"encoder_hidden_states": args[2], "controlnet_cond": args[3]})
