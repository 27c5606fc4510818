"""Text-to-image with Stable Diffusion 1.x / 2.x, SDXL and SD3 pipelines, on jdistill's
Denoiser and samplers.

    from jdistill.pipelines import TextToImage

    t2i = TextToImage.from_pretrained("out/sd15")  # a converted folder (or a diffusers one)
    images = t2i(["a photo of a cat"], num_steps=25, guidance_scale=7.5, seed=0)  # (1, 512, 512, 3) uint8

What diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
``StableDiffusion3Pipeline`` do, in one jitted function: encode the prompts and the
negative prompts (:mod:`jdistill.pipelines.prompts`), sample with the Denoiser (classifier-free
guidance in diffusers' ``guidance_scale`` convention, cond and uncond as one batch of 2B)
through :func:`jdistill.sampling.samplers.sample` on the grid of the folder's scheduler
(:mod:`jdistill.pipelines.scheduling`), then decode with the VAE (``unscale_latents``: the
scaling factor, SD3's shift factor, per-channel statistics). The sampling loop is the
sampler's ``lax.scan``; nothing runs on the host per step, so the same function runs on a
single device or on sharded inputs.

Latents are NHWC, in the diffusion model's space (diffusers' ``output_type="latent"``);
given ``latents`` are the unit noise diffusers' ``prepare_latents`` receives (it scales them by
the scheduler's ``init_noise_sigma``, as :class:`SamplingPlan` does). Images are NHWC, uint8
or floats in [-1, 1] (jdistill's image convention; diffusers' "np" output is (x + 1) / 2).

As in diffusers, guidance runs only for ``guidance_scale > 1``; a network with a guidance
embedding (a guidance-distilled student, ``guidance_embed=True``) reads the scale as its
``guidance`` input instead, in one pass without negative prompts, and an LCM UNet
(``time_cond_proj_dim``) reads it as LCM's w embedding (``timestep_cond``), as diffusers'
LatentConsistencyModelPipeline does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import images as images_lib
from jdistill.convert import io, pretrained
from jdistill.denoiser import Denoiser
from jdistill.models import layers
from jdistill.models import registry as model_registry
from jdistill.models import tokenizers as tokenizers_lib
from jdistill.pipelines import scheduling
from jdistill.pipelines.prompts import TEXT_COMPONENTS, PromptEncoder, as_list, family_of, negatives, sdxl_time_ids
from jdistill.sampling import samplers

OUTPUT_TYPES = ("uint8", "float", "latent")
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the jitted pipeline branches on (hashable: modules and flags)."""

    prompts: PromptEncoder
    vae: Any  # None: return latents only
    solver: str
    clip_x0: float | None
    ddpm_variance: str
    uncond: str  # "none" (no guidance), "tokens" (negative prompts), "zeros" (SDXL's empty negative)
    guidance_input: bool  # the network reads guidance_scale as its "guidance" input
    options: tuple = ()  # the plan's further solver options, (name, value) pairs
    final_scale: float = 1.0  # diffusers' final latents per final z (SamplingPlan.final_scale)
    timestep_cond: int | None = None  # an LCM UNet's time_cond_proj_dim: guidance enters as its w embedding


def _encode(prompts: PromptEncoder, uncond: str, text_params, tokens, negative_tokens, time_ids):
    """``time_ids``: None, or SDXL's (cond, uncond) pair."""
    cond_ids, uncond_ids = time_ids if time_ids is not None else (None, None)
    return prompts(text_params, tokens, negative_tokens if uncond == "tokens" else None,
                   zero_uncond=uncond == "zeros", time_ids=cond_ids, negative_time_ids=uncond_ids)


def _decode(vae, vae_params, latents):
    images = vae.apply({"params": vae_params}, latents, method=vae.images_from_latents)
    # diffusers' postprocess clamps the decoded images to the valid range
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("static",))
def _generate(denoiser, text_params, vae_params, tokens, negative_tokens, time_ids, noise, grid, guidance_scale, eta,
              rng, *, static: _Static):
    """Prompts -> latents (and images): the whole pipeline as one XLA program."""
    cond, uncond = _encode(static.prompts, static.uncond, text_params, tokens, negative_tokens, time_ids)
    if static.guidance_input:
        cond = {**cond, "guidance": jnp.full((noise.shape[0],), guidance_scale, jnp.float32)}
    if static.timestep_cond is not None:
        cond = {**cond, "timestep_cond": layers.guidance_scale_embedding(
            jnp.full((noise.shape[0],), guidance_scale, jnp.float32), static.timestep_cond)}
    latents = samplers.sample(denoiser, noise, cond, grid=grid, solver=static.solver, rng=rng,
                              guidance_scale=None if uncond is None else guidance_scale, uncond=uncond, eta=eta,
                              clip_x0=static.clip_x0, ddpm_variance=static.ddpm_variance, **dict(static.options))
    if static.final_scale != 1.0:
        latents = latents * static.final_scale
    images = None if static.vae is None else _decode(static.vae, vae_params, latents)
    return latents, images


_encode_jit = jax.jit(_encode, static_argnums=(0, 1))
_decode_jit = jax.jit(_decode, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Output:
    latents: jax.Array  # (B, h, w, C) final latents, the diffusion model's space
    images: jax.Array | None  # (B, H, W, 3) float32 in [-1, 1], or None when not decoded


@dataclasses.dataclass
class TextToImage:
    """A text-to-image pipeline: the denoising network (UNet2DConditionModel or SD3
    transformer), the VAE, the text towers and tokenizers, their params, and the scheduler
    config. Build it with :meth:`from_pretrained`, or directly from loaded modules:

    ``params = {"network": ..., "vae": ..., "text_encoders": (p1, p2, p3)}``; ``text_encoders``
    and ``tokenizers`` are in the order text_encoder, text_encoder_2, text_encoder_3 (None
    where a pipeline has none).
    """

    family: str  # "sd", "sdxl" or "sd3" (prompts.family_of)
    network: Any
    vae: Any
    text_encoders: tuple
    tokenizers: tuple
    params: dict
    scheduler_config: dict
    use_attention_mask: tuple = ()  # per tower, SD 1.x / 2.x only
    force_zeros_for_empty_prompt: bool = False  # SDXL: zeros, not "", as the negative when none is given
    # the loaded models by component name (module, config, family), as from_pretrained found them:
    # what a LoRA's module names are resolved against (with_lora)
    models: dict = dataclasses.field(default_factory=dict, repr=False)
    # the SDXL refiner (diffusers' requires_aesthetics_score): 5 time ids ending in an aesthetic score
    requires_aesthetics_score: bool = False

    def __post_init__(self):
        self.text_encoders = tuple(self.text_encoders)
        self.tokenizers = tuple(self.tokenizers)
        counts = (len(self.text_encoders), len(self.tokenizers), len(self.params["text_encoders"]))
        if len(set(counts)) != 1:
            raise ValueError(f"{counts[0]} text encoders, {counts[1]} tokenizers and {counts[2]} text encoder params: "
                             "give one of each per tower (None where the pipeline has none)")
        for i, (module, tok) in enumerate(zip(self.text_encoders, self.tokenizers)):
            if module is not None and tok is None:
                raise ValueError(f"text encoder {i + 1} has no tokenizer")
        self.schedule = scheduling.schedule_from_config(self.scheduler_config)
        self.prompt_encoder(256)  # checks the towers fit the family
        if self.family == "sdxl":
            self._check_sdxl_embedding()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, cache_dir=None, config=None, models_dir=None) -> "TextToImage":
        """From a pipeline folder with a ``model_index.json``: converted by ``jdistill convert``
        (restored as it is) or diffusers' own (each component converted once into the cache,
        see :func:`jdistill.convert.pretrained.load_pretrained`); from a single-file checkpoint
        with ``config`` a diffusers pipeline folder (its model_index, scheduler and tokenizers;
        the weights from the file); or from a preset name (:meth:`from_preset`). ``dtype``:
        params and compute dtype of every model (default: as stored)."""
        from jdistill.convert import presets

        path = Path(path).expanduser()
        if not path.exists() and presets.find(str(path)) is not None:
            return cls.from_preset(str(path), dtype=dtype, cache_dir=cache_dir, models_dir=models_dir)
        root = path
        if path.is_file():
            if config is None:
                raise ValueError(f"{path} is a single file: pass config= a diffusers pipeline folder for its "
                                 "model_index, scheduler and tokenizers (a single file holds none of them)")
            root = Path(config).expanduser()
        index = io.read_json(root / io.PIPELINE_INDEX)
        present = [name for name, entry in index.items()
                   if not name.startswith("_") and isinstance(entry, list) and entry and entry[0] is not None]
        family = family_of(present)

        def load(name):
            return pretrained.load_pretrained(path, name, dtype=dtype, cache_dir=cache_dir, config=config)

        network_name = "transformer" if family == "sd3" else "unet"
        network, vae = load(network_name), load("vae")
        towers, toks = [], []
        for encoder_name, tokenizer_name in TEXT_COMPONENTS:
            if encoder_name in present:
                towers.append(load(encoder_name))
                toks.append(tokenizers_lib.load_tokenizer(root, tokenizer_name))
            else:
                towers.append(None)
                toks.append(None)
        models = {network_name: network, "vae": vae, **{name: t for (name, _), t in zip(TEXT_COMPONENTS, towers) if t}}
        return cls(
            family=family, network=network.module, vae=vae.module,
            text_encoders=tuple(t and t.module for t in towers), tokenizers=tuple(toks),
            params={"network": network.params, "vae": vae.params,
                    "text_encoders": tuple(t and t.params for t in towers)},
            scheduler_config=io.read_json(root / SCHEDULER_CONFIG),
            use_attention_mask=tuple(bool(t and t.config.get("use_attention_mask")) for t in towers),
            # SDXL pipelines default it on (diffusers registers it in model_index.json)
            force_zeros_for_empty_prompt=family == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True)),
            models=models,
            requires_aesthetics_score=family == "sdxl" and bool(index.get("requires_aesthetics_score", False)),
        )

    @classmethod
    def from_preset(cls, name: str, *, dtype=None, cache_dir=None, models_dir=None) -> "TextToImage":
        """A preset as its authors sample it (:mod:`jdistill.convert.presets`): a pipeline preset's
        folder; a UNet file / folder preset put into its base preset's pipeline; a LoRA preset
        merged into its base pipeline at the published scale. The scheduler config is the
        preset's :class:`~jdistill.convert.presets.Sampler` on the base's config; a published
        timestep list (``preset.sampler.timesteps``) is passed as ``timesteps=`` when sampling."""
        from jdistill.convert import presets

        preset = presets.get(name)
        kw = dict(dtype=dtype, cache_dir=cache_dir, models_dir=models_dir)
        if preset.base is None:
            if preset.is_file or preset.folder != "pipeline":
                raise ValueError(f"preset {name!r} is a single model, not a pipeline: load it with load_pretrained")
            t2i = cls.from_pretrained(presets.locate(preset, models_dir), dtype=dtype, cache_dir=cache_dir)
        else:
            t2i = cls.from_preset(preset.base, **kw)
            if preset.lora:
                scale = preset.sampler.lora_scale if preset.sampler and preset.sampler.lora_scale is not None else 1.0
                t2i = t2i.with_lora(presets.locate(preset, models_dir), scale)
            else:
                student = pretrained.load_pretrained(name, preset.replaces, dtype=dtype, cache_dir=cache_dir,
                                                     models_dir=models_dir)
                t2i = dataclasses.replace(t2i, network=student.module,
                                          params={**t2i.params, "network": student.params},
                                          models={**t2i.models, preset.replaces: student})
        if preset.sampler is not None:
            t2i = t2i.with_scheduler(preset.sampler.scheduler_config(t2i.scheduler_config))
        return t2i

    def with_lora(self, lora_file, scale: float = 1.0) -> "TextToImage":
        """The same pipeline with a LoRA (diffusers / PEFT or kohya layout) merged into the models it
        adapts at ``scale`` (diffusers' ``fuse_lora(lora_scale=...)``); see
        :mod:`jdistill.convert.lora`, whose :func:`~jdistill.convert.lora.read` and
        :func:`~jdistill.convert.lora.merge` keep the factors apart for training."""
        from jdistill.convert import lora

        if not self.models:
            raise ValueError("with_lora needs the models' configs: build the pipeline with from_pretrained (or read "
                             "and merge with jdistill.convert.lora)")
        factors = lora.read(lora_file, {k: v for k, v in self.models.items() if k != "vae"})
        params = dict(self.params)
        towers = list(params["text_encoders"])
        for component, f in factors.items():
            if component in ("unet", "transformer"):
                params["network"] = lora.merge(params["network"], f, scale)
            else:
                i = [name for name, _ in TEXT_COMPONENTS].index(component)
                towers[i] = lora.merge(towers[i], f, scale)
        params["text_encoders"] = tuple(towers)
        return dataclasses.replace(self, params=params)

    def with_scheduler(self, scheduler) -> "TextToImage":
        """The same models sampled as another scheduler says: a config dict with its
        ``_class_name`` (a scheduler_config.json), or a diffusers scheduler object."""
        if hasattr(scheduler, "config"):  # a live scheduler: its config does not name its class
            scheduler = {**dict(scheduler.config), "_class_name": type(scheduler).__name__}
        return dataclasses.replace(self, scheduler_config=scheduling.without_used_defaults(dict(scheduler)))

    # ------------------------------------------------------------------ parts

    def prompt_encoder(self, max_sequence_length: int = 256) -> PromptEncoder:
        placeholder = None
        if self.family == "sd3" and (len(self.text_encoders) < 3 or self.text_encoders[2] is None):
            # diffusers' stand-in for a missing T5: zeros of the transformer's joint width
            placeholder = (max_sequence_length, self.network.joint_attention_dim)
        return PromptEncoder(self.family, self.text_encoders, tuple(self.use_attention_mask), placeholder)

    @property
    def prediction(self) -> str:
        return scheduling.prediction_type(self.scheduler_config)

    def denoiser(self) -> Denoiser:
        """The network as a :class:`Denoiser`: the scheduler config's schedule and prediction
        type (SD 1.x eps, SD 2.x v, SD3 flow)."""
        return Denoiser(params=self.params["network"], schedule=self.schedule, module=self.network,
                        prediction=self.prediction)

    def plan(self, num_steps: int | None, solver: str | None = None, *, timesteps=None) -> scheduling.SamplingPlan:
        """Solver, grid and initial noise scale: the folder scheduler's own by default
        (``timesteps``: a custom list, as diffusers' ``set_timesteps(timesteps=...)``)."""
        return scheduling.plan(self.scheduler_config, num_steps, solver, self.schedule, timesteps=timesteps)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.network.in_channels

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels the network was trained at (its ``sample_size``)."""
        size = getattr(self.network, "sample_size", None)
        if size is None:
            raise ValueError("the network's config has no sample_size: pass height= and width=")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def _check_sdxl_embedding(self):
        if getattr(self.network, "addition_embed_type", None) != "text_time":
            raise ValueError("an SDXL pipeline's UNet needs addition_embed_type 'text_time'")
        pooled = next(m.projection_dim for m in self.text_encoders if m is not None and m.projection_dim)
        n_ids = 5 if self.requires_aesthetics_score else 6
        passed = n_ids * self.network.addition_time_embed_dim + pooled
        expected = self.network.projection_class_embeddings_input_dim
        if passed != expected:
            raise ValueError(f"the UNet's added embedding takes {expected} features, but {n_ids} time ids x "
                             f"{self.network.addition_time_embed_dim} + pooled text {pooled} make {passed}"
                             + ("" if self.requires_aesthetics_score else " (an SDXL refiner's UNet takes 5 time ids: "
                                "its model_index.json says requires_aesthetics_score)"))

    # ------------------------------------------------------------------ prompts

    def _tokens(self, prompts, negative_prompts, uncond: str, max_sequence_length: int):
        enc = self.prompt_encoder(max_sequence_length)
        lengths = enc.token_lengths(self.tokenizers, max_sequence_length)
        tokens = enc.tokenize(self.tokenizers, prompts, lengths)
        neg = enc.tokenize(self.tokenizers, negatives(negative_prompts, len(prompts)), lengths) \
            if uncond == "tokens" else None
        return enc, tokens, neg

    def _uncond_mode(self, guided: bool, negative_prompts) -> str:
        if not guided:
            return "none"
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            return "zeros"
        return "tokens"

    def _time_ids(self, height, width, original_size, crops_coords_top_left, target_size, aesthetic_score=6.0,
                  negative_aesthetic_score=2.5, negative_original_size=None, negative_crops_coords_top_left=None):
        """SDXL's (cond, uncond) time ids, (1, 6) each (the refiner's (1, 5)), as diffusers'
        SDXL pipelines build them; None for the other families. The base model's unconditional
        side takes the same ids; the refiner's ends in ``negative_aesthetic_score`` (its size and
        crop default to the conditional ones), as StableDiffusionXLImg2ImgPipeline's."""
        if self.family != "sdxl":
            return None
        if height is None or width is None:
            default_h, default_w = self.default_size()
            height, width = height or default_h, width or default_w
        if not self.requires_aesthetics_score:
            ids = sdxl_time_ids(height, width, original_size, crops_coords_top_left, target_size)
            return ids, ids
        original = original_size or (height, width)
        cond = sdxl_time_ids(height, width, original, crops_coords_top_left, aesthetic_score=aesthetic_score)
        uncond = sdxl_time_ids(height, width, negative_original_size or original,
                               negative_crops_coords_top_left or crops_coords_top_left,
                               aesthetic_score=negative_aesthetic_score)
        return cond, uncond

    def encode_prompt(self, prompts: str | Sequence[str], negative_prompts=None, *, guidance: bool = True,
                      height: int | None = None, width: int | None = None, max_sequence_length: int = 256,
                      original_size=None, crops_coords_top_left=(0, 0), target_size=None, **sdxl):
        """``(cond, uncond)``: the network's conditioning kwargs for the prompts and, with
        ``guidance``, for the negative prompts (``uncond``; None without guidance). Pass them
        to ``Denoiser.predict(z, t, cond, guidance_scale=g, uncond=uncond)`` or a sampler.
        ``height`` / ``width`` (pixels) matter to SDXL's time ids only; ``sdxl``: the refiner's
        ``aesthetic_score`` (6.0), ``negative_aesthetic_score`` (2.5), ``negative_original_size``,
        ``negative_crops_coords_top_left``."""
        prompts = as_list(prompts)
        uncond = self._uncond_mode(guidance, negative_prompts)
        enc, tokens, neg = self._tokens(prompts, negative_prompts, uncond, max_sequence_length)
        time_ids = self._time_ids(height, width, original_size, crops_coords_top_left, target_size, **sdxl)
        return _encode_jit(enc, uncond, self.params["text_encoders"], tokens, neg, time_ids)

    def decode(self, latents) -> jax.Array:
        """Latents (diffusion space, NHWC) -> float32 images in [-1, 1]."""
        return _decode_jit(self.vae, self.params["vae"], jnp.asarray(latents))

    # ------------------------------------------------------------------ sampling

    def passes(self, guidance_scale: float) -> int:
        """Network passes a step: 2 under classifier-free guidance (a scale above 1 on a network
        that does not read the scale as an input), else 1."""
        reads = model_registry.guidance_input_kind(self.network) in ("guidance", "timestep_cond")
        return 2 if guidance_scale > 1 and not reads else 1

    def generate(self, prompts: str | Sequence[str], negative_prompts=None, *, num_steps: int, guidance_scale: float,
                 solver: str | None = None, latents=None, seed: int = 0, height: int | None = None,
                 width: int | None = None, eta: float = 0.0, decode: bool = True, max_sequence_length: int = 256,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, timesteps=None,
                 **sdxl) -> Output:
        """Sample images for ``prompts``; returns the final latents and (with ``decode``) the
        float images. See ``__call__`` for the arguments."""
        prompts = as_list(prompts)
        batch = len(prompts)
        plan = self.plan(num_steps, solver, timesteps=timesteps)
        f = self.vae_scale_factor
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != self.latent_channels:
                raise ValueError(f"latents {latents.shape}: expected NHWC (batch {batch}, h, w, "
                                 f"{self.latent_channels} channels)")
            height = height or latents.shape[1] * f
            width = width or latents.shape[2] * f
        elif height is None or width is None:
            default_h, default_w = self.default_size()
            height, width = height or default_h, width or default_w
        if height % f or width % f:
            raise ValueError(f"height {height} and width {width} must be multiples of the VAE factor {f}")
        shape = (batch, height // f, width // f, self.latent_channels)
        if latents is not None and latents.shape != shape:
            raise ValueError(f"latents {latents.shape} do not fit height {height} x width {width}: expected {shape}")

        # a typed PRNG key: a caller's own stream; anything else is an integer seed
        is_key = isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)
        key = seed if is_key else jax.random.key(seed)
        key_noise, key_steps = jax.random.split(key)
        noise = latents if latents is not None else jax.random.normal(key_noise, shape, jnp.float32)
        noise = noise * plan.noise_scale

        reads_guidance = model_registry.guidance_input_kind(self.network)
        guidance_input = reads_guidance == "guidance"
        lcm = int(self.network.time_cond_proj_dim) if reads_guidance == "timestep_cond" else None
        uncond = self._uncond_mode(self.passes(guidance_scale) == 2, negative_prompts)
        enc, tokens, neg = self._tokens(prompts, negative_prompts, uncond, max_sequence_length)
        static = _Static(enc, self.vae if decode else None, plan.solver, plan.clip_x0, plan.ddpm_variance, uncond,
                         guidance_input, plan.options, plan.final_scale, lcm)
        time_ids = self._time_ids(height, width, original_size, crops_coords_top_left, target_size, **sdxl)
        latents, images = _generate(self.denoiser(), self.params["text_encoders"], self.params["vae"], tokens, neg,
                                    time_ids, noise, plan.grid, jnp.float32(guidance_scale), jnp.float32(eta),
                                    key_steps, static=static)
        return Output(latents=latents, images=images)

    def __call__(self, prompts: str | Sequence[str], negative_prompts=None, *, num_steps: int, guidance_scale: float,
                 solver: str | None = None, latents=None, seed: int = 0, height: int | None = None,
                 width: int | None = None, output_type: str = "uint8", **options):
        """Images for ``prompts`` (a string or a list; ``negative_prompts``: None, one string, or
        one per prompt).

        ``num_steps`` sampling steps with ``solver`` (default: the folder scheduler's own, see
        :mod:`jdistill.pipelines.scheduling`), classifier-free guidance at ``guidance_scale``
        (diffusers' convention; off at <= 1). ``latents``: the initial unit noise, NHWC
        (B, height / f, width / f, C); else drawn from ``seed`` (an int, or a JAX PRNG key), which
        also seeds stochastic solvers. ``height`` / ``width`` in pixels (default: the latents', else the network's
        training size). ``output_type``: "uint8" (numpy NHWC), "float" ([-1, 1]) or "latent"
        (the final latents, diffusers' ``output_type="latent"``). ``options``: ``eta`` (DDIM, TCD),
        ``max_sequence_length`` (SD3's T5 tokens, default 256), SDXL's ``original_size`` /
        ``crops_coords_top_left`` / ``target_size``, the SDXL refiner's ``aesthetic_score`` /
        ``negative_aesthetic_score`` / ``negative_original_size`` / ``negative_crops_coords_top_left``,
        ``timesteps`` (a custom list such as [999, 749, 499, 249], as diffusers'
        ``set_timesteps(timesteps=...)``).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}: one of {OUTPUT_TYPES}")
        out = self.generate(prompts, negative_prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                            solver=solver, latents=latents, seed=seed, height=height, width=width,
                            decode=output_type != "latent", **options)
        if output_type == "latent":
            return out.latents
        if output_type == "float":
            return out.images
        return images_lib.to_uint8(np.asarray(out.images))
