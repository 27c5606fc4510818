"""Composite networks: a backbone and its adapter as one Flax module, hence one Denoiser.

Samplers, objectives and ``Denoiser.features`` see a single ``module.apply(params, z, t,
**cond)``; a composite keeps each part's params under its own name, exactly the tree that
part's converter produces, so pretrained pieces drop in and a trainer can freeze one part
with a mask on its top-level key.

:class:`ControlledUNet` is the denoiser call of diffusers' ControlNet pipelines
(``StableDiffusionControlNetPipeline``): the ControlNet reads the latents, the time, the text and
a conditioning image and returns one residual per UNet skip state plus one for the mid block;
the UNet adds them. Params: ``{"unet": convert.unet_cond.load_params(...), "controlnet":
convert.controlnet.load_params(...)}``::

    net = ControlledUNet(unet=unet_module, controlnet=controlnet_module, conditioning_scale=0.8)
    den = Denoiser.for_module(net, schedule, "eps", {"unet": unet_params, "controlnet": cn_params})
    cond = {"encoder_hidden_states": text, "controlnet_cond": image}
    uncond = {"encoder_hidden_states": empty_text, "controlnet_cond": image}
    x0 = den.predict(z, t, cond, guidance_scale=7.5, uncond=uncond).x0

The conditioning image is what the pipeline feeds the ControlNet (NHWC, values in [0, 1],
``controlnet.conditioning_factor`` times the latent size). Under classifier-free guidance both
halves carry it, as the pipeline does without guess mode. Guess mode (the ControlNet on the
conditional half only, which the pipeline also forces for global-pooling ControlNets) is not
reproduced and such ControlNets are refused. Sown features keep their part's path
(``unet/down_0``, ``controlnet/mid``); the UNet's ``mid`` includes the ControlNet's residual.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp

from jdistill.models.controlnet import ControlNetModel, unet_residuals
from jdistill.models.unet_cond import UNet2DConditionModel


class ControlledUNet(nn.Module):
    """A ``UNet2DConditionModel`` driven by a ``ControlNetModel``'s residuals (``conditioning_scale``
    multiplies them, as the pipeline's ``controlnet_conditioning_scale``)."""

    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    conditioning_scale: float = 1.0

    # what registry / Denoiser.for_module read off a network: the UNet's
    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.out_channels

    @property
    def sample_size(self):
        return self.unet.sample_size

    def example_inputs(self, batch: int = 1) -> tuple[tuple, dict]:
        args, kwargs = self.unet.example_inputs(batch)
        _, h, w, _ = args[0].shape
        f = self.controlnet.conditioning_factor
        image = jnp.zeros((batch, f * h, f * w, self.controlnet.conditioning_channels), jnp.float32)
        return (*args, image), kwargs

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                 added_cond_kwargs: Mapping | None = None, guidance=None, *, class_labels=None, timestep_cond=None,
                 train: bool = False):
        residuals = unet_residuals(self.controlnet, sample, timestep, encoder_hidden_states, controlnet_cond,
                                   self.conditioning_scale, added_cond_kwargs, class_labels=class_labels, train=train)
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs, guidance=guidance,
                         class_labels=class_labels, timestep_cond=timestep_cond, train=train, **residuals)
