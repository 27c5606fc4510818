"""Which converter reads which checkpoint.

A family is a module ``jdistill.convert.<name>`` with the converter protocol:

* ``module_from_config(config: dict, dtype=jnp.float32, param_dtype=jnp.float32)`` -> Flax module;
* ``load_params(state_dict, module)`` -> param tree (raises ``ConversionError``);
* ``export_rules(module)`` -> rules for ``engine.flax_to_torch_state_dict``;
* ``example_inputs(module, batch=1)`` -> ``(args, kwargs)`` for ``module.init``.

The family of a model folder is read off its ``config.json``: diffusers' ``_class_name``,
else transformers' ``architectures``, else ``model_type``. Family modules are imported
only when asked for, so a family still being written (its file absent, or without the
protocol yet) is an :class:`UnsupportedModel` error naming it, not an import failure of
everything else. A bare checkpoint file with no config is recognised from its keys
(:func:`detect_checkpoint`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Mapping

from jdistill.convert.engine import ConversionError
from jdistill.errors import UserError

PROTOCOL = ("module_from_config", "load_params", "export_rules", "example_inputs")


class UnsupportedModel(UserError, ValueError):
    """A model class, or a checkpoint layout, that jdistill has no converter for."""


@dataclass(frozen=True)
class Family:
    name: str  # the module jdistill.convert.<name>
    description: str
    diffusers_classes: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()  # transformers config "architectures"
    model_types: tuple[str, ...] = ()  # transformers "model_type", when "architectures" is absent
    # a config's class -> the class to build for export (diffusers' own remapping of legacy names)
    export_classes: tuple[tuple[str, str], ...] = ()

    @property
    def module_name(self) -> str:
        return f"jdistill.convert.{self.name}"

    @property
    def library(self) -> str:
        return "diffusers" if self.diffusers_classes else "transformers"

    def _import(self) -> tuple[ModuleType | None, list[str]]:
        """(module, protocol functions it lacks); (None, []) when the module is absent."""
        try:
            mod = importlib.import_module(self.module_name)
        except ModuleNotFoundError as e:
            if e.name != self.module_name:
                raise  # the family exists but one of its own imports is broken: show that
            return None, []
        return mod, [f for f in PROTOCOL if not callable(getattr(mod, f, None))]

    def load(self, what: str | None = None) -> ModuleType:
        """The converter module; :class:`UnsupportedModel` if it is absent or lacks the protocol."""
        what = what or self.description
        mod, lacking = self._import()
        if mod is None:
            raise UnsupportedModel(
                f"{what} is not supported yet: it needs the '{self.name}' converter ({self.module_name}), which "
                f"this jdistill does not have. Families available now: {', '.join(available()) or 'none'}")
        if lacking:
            raise UnsupportedModel(f"{what} is not supported yet: {self.module_name} does not provide "
                                   f"{', '.join(lacking)} of the converter protocol")
        return mod

    def torch_class_name(self, config: Mapping) -> str:
        """The diffusers / transformers class whose state dict an export of ``config`` matches."""
        if self.diffusers_classes:
            name = config.get("_class_name") or self.diffusers_classes[0]
        else:
            name = next(iter(config.get("architectures") or ()), None) or self.architectures[0]
        return dict(self.export_classes).get(name, name)


FAMILIES: tuple[Family, ...] = (
    Family("unet2d", "a diffusers UNet2DModel", diffusers_classes=("UNet2DModel",)),
    Family("unet_cond", "a diffusers UNet2DConditionModel", diffusers_classes=("UNet2DConditionModel",)),
    Family("controlnet", "a diffusers ControlNetModel", diffusers_classes=("ControlNetModel",)),
    Family("vae", "a diffusers AutoencoderKL", diffusers_classes=("AutoencoderKL",)),
    # diffusers loads a Transformer2DModel config with norm_type "ada_norm_zero" as a DiT
    Family("dit", "a DiT (diffusers DiTTransformer2DModel)",
           diffusers_classes=("DiTTransformer2DModel", "Transformer2DModel"),
           export_classes=(("Transformer2DModel", "DiTTransformer2DModel"),)),
    Family("mmdit", "an SD3 transformer (diffusers SD3Transformer2DModel)",
           diffusers_classes=("SD3Transformer2DModel",)),
    Family("clip", "a CLIP text encoder (transformers CLIPTextModel)",
           architectures=("CLIPTextModel", "CLIPTextModelWithProjection"), model_types=("clip_text_model",)),
    Family("clip_vision", "a CLIP image tower (transformers CLIPVisionModel)",
           architectures=("CLIPVisionModel", "CLIPVisionModelWithProjection"), model_types=("clip_vision_model",)),
    Family("clip_model", "a full CLIP model (transformers CLIPModel)", architectures=("CLIPModel",),
           model_types=("clip",)),
    # model_type "t5" alone also means a full encoder-decoder T5: only the architecture says encoder-only
    Family("t5", "a T5 / mT5 encoder (transformers T5EncoderModel, MT5EncoderModel)",
           architectures=("T5EncoderModel", "MT5EncoderModel")),
)

# Pipeline components that hold weights but play no part in distillation: not converted, not copied.
AUXILIARY_CLASSES = {
    "StableDiffusionSafetyChecker": "the NSFW safety checker is not used by jdistill",
}


def get(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise UnsupportedModel(f"no jdistill family {name!r}; known: {[f.name for f in FAMILIES]}")


def available() -> list[str]:
    """Families whose converter is present and implements the protocol."""
    out = []
    for f in FAMILIES:
        mod, lacking = f._import()
        if mod is not None and not lacking:
            out.append(f.name)
    return out


def family_for_config(config: Mapping, where: str = "config.json") -> Family:
    """The family of a diffusers / transformers ``config.json``; :class:`UnsupportedModel`
    names the class when no family reads it."""
    cls = config.get("_class_name")
    if cls:
        if cls == "Transformer2DModel" and config.get("norm_type") != "ada_norm_zero":
            raise UnsupportedModel(f"{where}: a Transformer2DModel with norm_type {config.get('norm_type')!r} is not "
                                   "a DiT (only norm_type 'ada_norm_zero' is); jdistill has no converter for it")
        found = next((f for f in FAMILIES if cls in f.diffusers_classes), None)
    else:
        archs = list(config.get("architectures") or [])
        cls = archs[0] if archs else config.get("model_type")
        found = next((f for f in FAMILIES if any(a in f.architectures for a in archs)), None)
        if found is None and not archs:
            found = next((f for f in FAMILIES if cls in f.model_types), None)
    if not cls:
        raise UnsupportedModel(f"{where}: names no model class (no _class_name, architectures or model_type)")
    if found is None:
        supported = sorted({c for f in FAMILIES for c in f.diffusers_classes + f.architectures})
        raise UnsupportedModel(f"{where}: {cls} has no jdistill converter; supported classes: {', '.join(supported)}")
    return found


# ---------------------------------------------------------------- bare checkpoint files (no config)

# Key prefixes / substrings of layouts that need their config (or are not supported as single
# files), for the error message: (marker, what it is, what to do).
_NEEDS_CONFIG = (
    ("transformer_blocks.0.norm1.emb.", "a diffusers-layout DiT state dict", "convert the folder with its config.json"),
    ("context_embedder.", "an SD3 / MMDiT transformer state dict", "convert the folder with its config.json"),
    ("conv_in.", "a diffusers UNet / VAE state dict", "convert the folder with its config.json"),
    ("text_model.", "a CLIP text encoder state dict", "convert the folder with its config.json"),
    ("encoder.block.", "a T5 encoder state dict", "convert the folder with its config.json"),
)


def detect_checkpoint(state_dict: Mapping, where: str = "checkpoint") -> tuple[Family, dict]:
    """(family, config) of a checkpoint file that came without a config.

    Supported here: the original facebookresearch DiT layout (``DiT-XL-2-256x256.pt`` and the
    training script's checkpoints), whose config is read off the tensor shapes
    (``jdistill.convert.dit.config_from_original``) and written the way the original
    ``DiT`` constructor takes it, ``_class_name`` "DiT". (Single-file Stable Diffusion / SD3
    checkpoints are recognised before this, by :mod:`jdistill.convert.single_file`.) Anything
    else is an :class:`UnsupportedModel` saying what it looks like and what to convert instead.
    """
    keys = list(state_dict.keys())
    from jdistill.convert import dit  # the one bare-file layout; light to import

    try:
        layout = dit.detect_layout(keys)
    except ConversionError:
        layout = None
    if layout == "original":
        try:
            module = dit.config_from_original(state_dict)
        except ValueError as e:  # a width that is no DiT preset's: the head count is not in the weights
            raise UnsupportedModel(f"{where}: an original-layout DiT, but {e}") from e
        config = dict(_class_name="DiT", input_size=module.input_size, patch_size=module.patch_size,
                      in_channels=module.in_channels, hidden_size=module.hidden_size, depth=module.depth,
                      num_heads=module.num_heads, mlp_ratio=module.mlp_ratio, num_classes=module.num_classes,
                      learn_sigma=module.learned_sigma)
        return get("dit"), config
    for marker, what, todo in _NEEDS_CONFIG:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            raise UnsupportedModel(f"{where}: {what} cannot be converted without its config: {todo}")
    raise UnsupportedModel(f"{where}: no config.json and not a layout jdistill recognises from its keys (single-file "
                           "SD 1.x / 2.x / SDXL / SD3 checkpoints and the original DiT .pt are); its first keys are "
                           f"{sorted(keys)[:8]}")
