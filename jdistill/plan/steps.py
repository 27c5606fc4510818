"""What a recipe hands the planner: the jitted steps it runs, built from a config without weights.

    RECIPE = Recipe(..., plan=plan_steps)      # plan_steps(cfg) -> [TrainStep | CallStep, ...]

* :class:`TrainStep`: one stage's train step exactly as ``Engine.jit`` compiles it. ``init``
  gives each part's initial params and is evaluated abstractly (:func:`abstract_value`):
  leaves it returns as ``jax.ShapeDtypeStruct`` (pretrained weights a plan does not load)
  pass through, the rest is traced, never computed. ``frozen`` may hold ShapeDtypeStructs.
* :class:`CallStep`: any other jitted function ``fn(params, batch)`` (a sampler step): the
  weights laid out by the same logical-axis rules as training, the batch split over the
  data axes.

``batch`` is always the GLOBAL batch (ShapeDtypeStructs); the planner splits it over the mesh.
``settings`` names the config keys that change memory (``{"param_dtype":
"model.param_dtype", "remat": "model.remat"}``) so the advice can say which one to set;
``modules`` are the networks involved, read for the options they have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# the config keys recipes read a network's precision and activation-checkpointing options from
MODEL_SETTINGS = {"param_dtype": "model.param_dtype", "dtype": "model.dtype", "remat": "model.remat"}


@dataclasses.dataclass
class TrainStep:
    name: str
    engine: Any  # jdistill.train.engine.Engine
    init: Callable[[], dict]  # part name -> initial params (evaluated abstractly)
    frozen: Any  # what the step reads frozen (a teacher's params), arrays or ShapeDtypeStructs
    batch: Mapping[str, jax.ShapeDtypeStruct]  # one global batch
    seed: int = 0
    description: str = ""
    modules: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    settings: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(MODEL_SETTINGS))

    kind = "train"

    @classmethod
    def of_stage(cls, stage, batch, *, description: str = "", modules=None, settings=None) -> "TrainStep":
        """The step of a ``recipes.stages.Stage`` (its engine, init, frozen tree and seed)."""
        return cls(stage.name or "train", stage.engine, stage.init, stage.frozen, batch, int(stage.seed), description,
                   dict(modules or {}), dict(MODEL_SETTINGS if settings is None else settings))


@dataclasses.dataclass
class CallStep:
    name: str
    fn: Callable  # fn(params, batch) -> anything
    params: Any  # weights (arrays or ShapeDtypeStructs), laid out by the logical-axis rules
    batch: Any  # ShapeDtypeStructs with a leading global batch axis, split over the data axes
    description: str = ""
    modules: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    settings: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(MODEL_SETTINGS))
    # {name: trip count} of the loops in fn: XLA's cost analysis counts a loop body once
    loops: Mapping[str, int] = dataclasses.field(default_factory=dict)

    kind = "call"


def abstract_value(fn: Callable[[], Any]):
    """ShapeDtypeStructs of ``fn()``'s result, computed by tracing only (nothing is allocated).

    Leaves ``fn`` returns that are already ShapeDtypeStructs (a pretrained network's weights,
    which a plan never reads) pass through as they are."""
    box = {}

    def traced():
        leaves, treedef = jax.tree.flatten(fn())
        box["treedef"] = treedef
        box["given"] = [x if isinstance(x, jax.ShapeDtypeStruct) else None for x in leaves]
        return [x for x in leaves if not isinstance(x, jax.ShapeDtypeStruct)]

    computed = iter(jax.eval_shape(traced))
    return jax.tree.unflatten(box["treedef"], [g if g is not None else next(computed) for g in box["given"]])


def as_abstract(tree):
    """ShapeDtypeStructs of a tree of arrays / ShapeDtypeStructs (shardings dropped)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def module_params(module):
    """ShapeDtypeStructs of a network's params, as ``module.init`` would make them."""
    from jdistill.convert.engine import abstract_params
    from jdistill.models import registry

    args, kwargs = registry.example_inputs(module)
    return abstract_params(module, *args, **kwargs)


def image_batch(batch_size: int, image_shape, *, label: bool = True, extra: Mapping | None = None) -> dict:
    """A global batch of images (latents) ``(B, H, W, C)`` float32, with int32 labels when ``label``."""
    out = {"image": jax.ShapeDtypeStruct((int(batch_size), *map(int, image_shape)), jnp.float32)}
    if label:
        out["label"] = jax.ShapeDtypeStruct((int(batch_size),), jnp.int32)
    out.update(extra or {})
    return out


# -- sampler steps -----------------------------------------------------------------------------

TEXT_TOKENS = {"UNet2DConditionModel": 77}  # CLIP's prompt length; SD3's joint text length is its own


def sampling_cond(module, batch_size: int, pooled_dim: int | None = None) -> dict:
    """ShapeDtypeStructs of the condition a network samples with, at ``batch_size`` rows: DiT class
    labels; a UNet's prompt states (77 CLIP tokens) and, for SDXL, its pooled text embeddings
    (``pooled_dim`` wide: text_encoder_2's projection) and time ids, as many as the rest of the added
    embedding's input holds (the base's 6 size / crop ids, the refiner's 5 with the aesthetic score;
    6 when ``pooled_dim`` is not given); an SD3 transformer's joint text states and pooled projections.
    A network that reads the guidance scale as an input (an LCM UNet's ``timestep_cond``, a
    guidance-embedding DiT's ``guidance``) gets that input too: it samples guided in one pass."""
    from jdistill.errors import InvalidArgument
    from jdistill.models import registry

    b = int(batch_size)
    name = type(module).__name__
    reads_guidance = registry.guidance_input_kind(module)
    if name == "DiT":
        out = {"class_labels": jax.ShapeDtypeStruct((b,), jnp.int32)}
        if reads_guidance == "guidance":  # a guidance-distilled student
            out["guidance"] = jax.ShapeDtypeStruct((b,), jnp.float32)
        return out
    if name in ("UNet2DConditionModel", "ControlNetModel"):
        out = {"encoder_hidden_states": jax.ShapeDtypeStruct((b, TEXT_TOKENS[name], module.context_dim), jnp.float32)}
        if reads_guidance == "timestep_cond":  # an LCM UNet: the scale enters as its w embedding
            out["timestep_cond"] = jax.ShapeDtypeStruct((b, int(module.time_cond_proj_dim)), jnp.float32)
        if module.addition_embed_type == "text_time":
            width, dim = module.projection_class_embeddings_input_dim, module.addition_time_embed_dim
            text = int(pooled_dim) if pooled_dim else width - 6 * dim
            ids, rest = divmod(width - text, dim)
            if rest or ids <= 0:
                raise InvalidArgument(f"the added embedding takes {width} features: not pooled text {text} + time ids "
                                      f"of width {dim}")
            out["added_cond_kwargs"] = {"text_embeds": jax.ShapeDtypeStruct((b, text), jnp.float32),
                                        "time_ids": jax.ShapeDtypeStruct((b, ids), jnp.float32)}
        return out
    if name == "SD3Transformer2DModel":
        _, kwargs = module.example_inputs(b)
        return {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in kwargs.items()}
    raise ValueError(f"no sampling condition known for {name}")


def latent_shape(module, size: int | None = None) -> tuple[int, int, int]:
    """(H, W, C) of the latents a network samples: its configured size, or ``size`` latent pixels."""
    from jdistill.models import registry

    h, w, c = registry.image_shape(module)
    return (int(size), int(size), c) if size else (h, w, c)


def sampler_call(name: str, denoisers, fractions, grid, batch_size: int, *, solver: str = "ddim",
                 guidance_scales=None, mode: str = "timestep", size: int | None = None, description: str = "",
                 options: Mapping | None = None, pooled_dims=None) -> CallStep:
    """A CallStep of the stitched sampler (``jdistill.sampling.stitch.sample``, one model: fractions
    [1]) over ``grid`` for a batch of ``batch_size``: the denoisers' params are the weights, noise
    and conditions the batch. Unconditional inputs are made the way each denoiser makes them
    (DiT: the null class; text models take a second condition of the same shape). ``pooled_dims``:
    each denoiser's pooled text width (SDXL UNets, see :func:`sampling_cond`)."""
    from jdistill.sampling import stitch

    denoisers = list(denoisers)
    pooled = list(pooled_dims or [None] * len(denoisers))
    ref = denoisers[-1]
    text = ref.null_cond is None
    conds = [sampling_cond(d.module, batch_size, p) for d, p in zip(denoisers, pooled)]
    batch = {"noise": jax.ShapeDtypeStruct((int(batch_size), *latent_shape(ref.module, size)), jnp.float32),
             "cond": conds}
    if text and any(g not in (None, 1, 1.0) for g in (guidance_scales or [])):  # only CFG reads a negative prompt
        batch["uncond"] = list(conds)
    segs = stitch.segments(grid, ref.schedule, fractions, mode)
    loops = {f"{type(d.module).__name__} {i} steps": b - a for i, (d, (a, b)) in enumerate(zip(denoisers, segs))}

    def fn(params, batch):
        dens = [d.replace(params=p) for d, p in zip(denoisers, params)]
        return stitch.sample(dens, fractions, batch["noise"], batch["cond"], grid=grid, solver=solver,
                             rng=jax.random.key(0), mode=mode, guidance_scales=guidance_scales,
                             uncond=batch.get("uncond"), **dict(options or {}))

    modules = {f"{type(d.module).__name__} {i}": d.module for i, d in enumerate(denoisers)}
    return CallStep(name, fn, [d.params for d in denoisers], batch, description, modules, loops=loops)


# a pipeline a config names by a local folder / hub name with no preset of its own -> a preset
# of the same network and scheduler (SD3.5 Large Turbo is a LADD student of SD3.5 Large: same MMDiT config)
SAME_NETWORK = {"stable-diffusion-3.5-large": "sd35-large-turbo", "stabilityai/stable-diffusion-3.5-large":
                "sd35-large-turbo"}


def pipeline_preset(name: str):
    """The preset of a config's ``teacher.pipeline`` (a preset name, alias, hub id, or a hub id's last
    part such as "stable-diffusion-v1-5"); a plan builds the network from its published config."""
    from jdistill.convert import presets
    from jdistill.errors import InvalidArgument

    key = SAME_NETWORK.get(str(name), str(name))
    found = presets.find(key) or next((p for p in presets.PRESETS.values()
                                       if any(h.rsplit("/", 1)[-1] == key for h in p.hub_ids())), None)
    if found is None:
        raise InvalidArgument(f"pipeline {name!r}: no preset names its network, so it cannot be planned without its "
                              f"weights; known: {', '.join(presets.PRESETS)}")
    return found


def preset_denoiser(preset: str, dtype=None, **fields):
    """The Denoiser of a preset's network built from its published config (params as
    ShapeDtypeStructs, never read), with its published scheduler's schedule and prediction type;
    ``dtype`` (compute and params) and ``fields`` (e.g. a reduced depth) are set on the module."""
    from jdistill.convert.pretrained import published_module
    from jdistill.denoiser import Denoiser
    from jdistill.pipelines import scheduling

    p = pipeline_preset(preset)
    fields = dict(fields)
    if dtype is not None:
        fields.update(dtype=dtype, param_dtype=dtype)
    module = published_module(p.name, **fields)
    # the published scheduler config where the preset writes one (SDXL-Turbo, the refiner), then what it checks
    scheduler = {"_class_name": (p.components.get("scheduler") or ("",))[0], **p.configs.get("scheduler", {}),
                 **p.expect.get("scheduler", {})}
    schedule = scheduling.schedule_from_config(scheduler)
    return Denoiser.for_module(module, schedule, scheduling.prediction_type(scheduler), module_params(module)), p


def pooled_text_dim(preset) -> int | None:
    """The pooled text width an SDXL-family preset's UNet takes (its text_encoder_2's projection), else None."""
    dim = (preset.expect.get("text_encoder_2") or {}).get("projection_dim")
    return int(dim) if dim else None


def preset_sampler_call(preset: str, batch_size: int, *, guidance_scale: float | None = None, solver: str = "ddim",
                        size: int | None = None, dtype: str = "float32", name: str | None = None,
                        fields: Mapping | None = None) -> CallStep:
    """One sampler step of a preset network alone (``jdistill plan --model PRESET``), at ``batch_size``
    latents of its published size (or ``size`` latent pixels), with classifier-free guidance
    (two passes as one batch) unless ``guidance_scale`` is None or 1: what any sampling method built
    on it (T-Stitch, adaptive collaboration) runs per step of that network. The schedule and the
    prediction type are the preset's published scheduler's; ``fields`` are set on the network."""
    from jdistill.diffusion.timesteps import make_grid
    from jdistill.models import registry

    den, p = preset_denoiser(preset, dtype, **dict(fields or {}))
    module = den.module
    g = None if guidance_scale in (None, 1, 1.0) else float(guidance_scale)
    # an LCM UNet or a guidance-embedding DiT takes the scale as an input, one pass a step (as its pipeline samples)
    guidance_input = registry.guidance_input_kind(module) is not None
    if g is None:
        how = ", no guidance"
    elif guidance_input:
        how, g = f", guidance {g:g} as an input (one pass)", None
    else:
        how = f", CFG {g:g} (2 passes as one batch)"
    h, w, _ = latent_shape(module, size)
    return sampler_call(name or f"{p.name} step", [den], [1.0], make_grid(den.schedule, 1, solver), batch_size,
                        solver=solver, guidance_scales=[g], size=size, pooled_dims=[pooled_text_dim(p)],
                        description=f"one {solver} step of {p.name} ({type(module).__name__}, {dtype}) on {h}x{w} "
                        f"latents" + how)
