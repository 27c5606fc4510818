"""LoRA adapters: read (diffusers / PEFT and kohya layouts), merge, train, save.

An adapter is held as plain data, per model (component)::

    {param path: Factor(down, up, ratio)}      e.g. ("down_blocks_0", ..., "to_q", "kernel")

with the factors in the Flax kernel's layout: a Dense kernel (in, out) gets ``down`` (in, r)
and ``up`` (r, out); a Conv kernel (kh, kw, in, out) gets ``down`` (kh, kw, in, r) (the
LoRA's first convolution) and ``up`` (r, out) (its 1x1 second). ``ratio`` is alpha / r
(alpha / sqrt(r) for rsLoRA), static: it is not a parameter. :func:`merge` adds
``scale * ratio * down @ up`` to each kernel; it is a pure jnp function, so a train step can
differentiate a loss of ``merge(base, factors, scale)`` with respect to the factors alone
(the LCM-LoRA route: only the low-rank factors train). :func:`init` makes fresh factors
(``up`` zero, so the merged model starts as the base model) for chosen modules.

Layouts read (:func:`read`), each mapped through the target family's own key rules, so no
module name is guessed:

* diffusers / PEFT: ``{component}.{module}.lora_A.weight`` / ``lora_B.weight`` (and PEFT's
  ``base_model.model.{module}...`` for a single model), alphas from the safetensors
  ``lora_adapter_metadata`` (diffusers' ``save_lora_weights``), an ``adapter_config.json``
  beside the file (PEFT's ``save_pretrained``) or ``.alpha`` tensors; none means alpha = r;
  the older attention-processor names (``attn1.processor.to_q_lora.down.weight``,
  ``q_proj.lora_linear_layer.down.weight``);
* kohya: ``lora_unet_*`` / ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*`` / ``lora_te3_*``
  with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; module names with the dots
  flattened to underscores, in diffusers' names (SD 1.x trainers) or the original UNet's
  (``input_blocks_4_1_...``: SDXL trainers), resolved through the same table single-file
  checkpoints use (``unet_cond.ldm_table``).

Refused by name: DoRA (``dora_scale``, ``lora_magnitude_vector``), LyCORIS LoHa / LoKr /
Tucker (``hada_``, ``lokr_``, ``lora_mid``), LoRA biases, full weight diffs, and any module
the target model does not have or whose shape it does not fit (a LoRA for another model).

:func:`save` writes the diffusers / PEFT layout with its ``lora_adapter_metadata``, which
diffusers' ``load_lora_weights`` reads.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdistill.convert import engine, io, registry
from jdistill.convert.engine import ConversionError

# The names diffusers' LoRA files give the models of a pipeline (and PEFT's single-model prefix).
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet")
KOHYA = {"lora_unet_": ("unet", "transformer"), "lora_transformer_": ("transformer",), "lora_te_": ("text_encoder",),
         "lora_te1_": ("text_encoder",), "lora_te2_": ("text_encoder_2",), "lora_te3_": ("text_encoder_3",)}
_REFUSED = (("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("hada_", "LyCORIS LoHa"),
            ("lokr_", "LyCORIS LoKr"), ("lora_mid", "LyCORIS LoCon with a Tucker core"),
            (".diff", "a full weight difference"), ("lora_B.bias", "LoRA biases"), ("lora_up.bias", "LoRA biases"))
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header


class LoRAError(ConversionError):
    """A LoRA file that does not fit the models given (names the modules and why)."""


@flax.struct.dataclass
class Factor:
    """One low-rank update of a kernel: ``ratio * down @ up`` (see the module docstring)."""

    down: jax.Array
    up: jax.Array
    ratio: float = flax.struct.field(pytree_node=False, default=1.0)

    def __iter__(self):  # down, up, ratio = factor
        return iter((self.down, self.up, self.ratio))

    @property
    def rank(self) -> int:
        return int(self.up.shape[0])

    def delta(self):
        """``ratio * down @ up`` in the kernel's layout."""
        return self.ratio * jnp.tensordot(self.down, self.up, axes=1)


# ---------------------------------------------------------------- merging and training


def merge(params, factors: Mapping[tuple, Factor], scale: float = 1.0):
    """``params`` with ``scale * ratio * down @ up`` added to each kernel ``factors`` names: a pure
    function of both trees (differentiate through it to train the factors)."""
    flat = traverse_util.flatten_dict(params)
    missing = [p for p in factors if p not in flat]
    if missing:
        raise LoRAError(f"the params have no {['/'.join(p) for p in missing[:5]]} ({len(missing)} paths)")
    for path, f in factors.items():
        base = flat[path]
        flat[path] = base + (scale * f.delta()).astype(base.dtype)
    return traverse_util.unflatten_dict(flat)


DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")


def init(params, rank: int, rng: jax.Array, *, targets: Iterable[str] = DEFAULT_TARGETS, alpha: float | None = None,
         dtype=jnp.float32) -> dict[tuple, Factor]:
    """Fresh factors of ``rank`` for every kernel of ``params`` (or of its abstract tree) whose
    module name is one of ``targets`` (the last path segment before ``kernel``, e.g. ``to_q``,
    ``proj_in``, ``q_proj``; a regex matches too). ``down`` is drawn as PEFT draws lora_A
    (uniform in +-1/sqrt(fan_in)), ``up`` is zero: the merged model starts exactly as the base
    model and only ``up`` has a gradient at the first step. ``alpha`` defaults to ``rank``."""
    targets = tuple(targets)
    rx = re.compile("|".join(f"(?:{t})" for t in targets))
    chosen = [(p, leaf) for p, leaf in traverse_util.flatten_dict(params).items()
              if p[-1] == "kernel" and len(p) > 1 and rx.fullmatch(p[-2])]
    if not chosen:
        raise LoRAError(f"no kernel of a module named {list(targets)} in the params")
    out = {}
    for i, (path, leaf) in enumerate(chosen):
        *spatial_in, n_out = leaf.shape
        fan_in = int(np.prod(spatial_in))
        bound = 1.0 / math.sqrt(fan_in)
        down = jax.random.uniform(jax.random.fold_in(rng, i), (*spatial_in, rank), dtype, -bound, bound)
        out[path] = Factor(down, jnp.zeros((rank, n_out), dtype), float(alpha if alpha is not None else rank) / rank)
    return out


# ---------------------------------------------------------------- reading


def _open(src) -> tuple[Mapping, dict | None, str]:
    """(state dict, diffusers metadata or PEFT adapter config, where) of a LoRA file / folder / dict."""
    if isinstance(src, Mapping):
        return src, None, "LoRA state dict"
    path = Path(src).expanduser()
    if path.is_dir():
        names = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                 "adapter_model.bin")
        file = next((path / n for n in names if (path / n).is_file()), None)
        if file is None:
            raise io.CheckpointReadError(f"{path}: no LoRA weights ({', '.join(names)})")
        path = file
    meta = None
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="numpy") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
        except Exception as e:
            raise io.CheckpointReadError(f"{path}: cannot be read as safetensors ({e})") from e
        meta = json.loads(raw) if raw else None
    peft_config = path.parent / "adapter_config.json"
    if meta is None and peft_config.is_file():
        meta = {"": io.read_json(peft_config)}  # one model's PEFT config, no component prefix
    return io.open_state_dict(path), meta, os.fspath(path)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> (layout, module name, part): part is "down", "up" or "alpha"."""
    for pat, layout in ((r"(.+)\.lora_A(?:\.[\w-]+)?\.weight$", "peft"), (r"(.+)\.lora_B(?:\.[\w-]+)?\.weight$", "peft"),
                        (r"(.+)\.lora_down\.weight$", "kohya"), (r"(.+)\.lora_up\.weight$", "kohya"),
                        (r"(.+)\.alpha$", "alpha"),
                        (r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$", "processor"),
                        (r"(.+)\.lora_linear_layer\.(down|up)\.weight$", "linear_layer"),
                        (r"(.+)\.lora\.(down|up)\.weight$", "linear_layer")):
        m = re.fullmatch(pat, key)
        if not m:
            continue
        if layout == "processor":
            module = f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
            return "peft", module, m[3]
        if layout == "linear_layer":
            return "peft", m[1], m[2]
        if layout == "alpha":
            return "alpha", m[1], "alpha"
        part = "down" if ("lora_A" in key or "lora_down" in key) else "up"
        return layout, m[1], part
    return None


def _component(module: str, layout: str, targets: Mapping) -> tuple[str | None, str]:
    """(component, module name inside it) of a key's module name."""
    if layout == "kohya" or module.startswith("lora_"):
        for prefix, names in sorted(KOHYA.items(), key=lambda kv: -len(kv[0])):
            if module.startswith(prefix):
                name = next((n for n in names if n in targets), names[0])
                return name, module[len(prefix):]
        raise LoRAError(f"{module}: a kohya name with an unknown prefix (known: {sorted(KOHYA)})")
    for prefix in ("base_model.model.",):
        if module.startswith(prefix):
            return None, module[len(prefix):]
    head, _, rest = module.partition(".")
    if head in COMPONENTS or head in targets:
        return head, rest
    return None, module


def read(src, targets: Mapping, *, components: Iterable[str] | None = None) -> dict[str, dict[tuple, Factor]]:
    """The adapter in ``src`` (a LoRA .safetensors / .bin, a folder holding one, or a state dict)
    as factors per component, for ``targets``: component name -> a loaded model with
    ``module``, ``config`` and ``family`` (a :class:`~jdistill.convert.pretrained.Pretrained`;
    one target may stand for a LoRA without component prefixes). Every module must exist in
    its model with fitting shapes, and every component of the file must be a target (or leave
    it out with ``components``), else :class:`LoRAError` names them."""
    state, meta, where = _open(src)
    try:
        keys = list(state.keys())
        for marker, what in _REFUSED:
            bad = [k for k in keys if marker in k]
            if bad:
                raise LoRAError(f"{where}: {what} ({bad[0]}, {len(bad)} keys) is not a plain LoRA; jdistill reads "
                                "LoRA down / up pairs only")
        entries: dict[tuple[str, str], dict] = {}
        for key in keys:
            parsed = _split_key(key)
            if parsed is None:
                raise LoRAError(f"{where}: {key} is no LoRA key jdistill knows (lora_A / lora_B, lora_down / lora_up, "
                                "alpha)")
            layout, module, part = parsed
            component, inner = _component(module, layout, targets)
            if component is None:
                if len(targets) != 1:
                    raise LoRAError(f"{where}: {key} names no component; give one target or use a file whose keys "
                                    f"start with one of {COMPONENTS}")
                component = next(iter(targets))
            entries.setdefault((component, inner), {})[part] = key
        wanted = set(components) if components is not None else None
        found = sorted({c for c, _ in entries})
        foreign = [c for c in found if c not in targets and (wanted is None or c in wanted)]
        if foreign:
            raise LoRAError(f"{where}: the LoRA adapts {foreign}, which were not given (targets: {sorted(targets)}); "
                            "pass them, or components= the ones to read")
        out: dict[str, dict[tuple, Factor]] = {}
        problems: list[str] = []
        resolvers = {}
        for (component, module), parts in sorted(entries.items()):
            if wanted is not None and component not in wanted:
                continue
            if "down" not in parts or "up" not in parts:
                problems.append(f"{component}.{module}: only {sorted(parts)}")
                continue
            if component not in resolvers:
                resolvers[component] = _Resolver(targets[component])
            res = resolvers[component]
            path = res.path(module)
            if path is None:
                problems.append(f"{component}.{module}: no such module in the {res.family.name} model")
                continue
            try:
                down, up = res.factors(path, engine._to_numpy(state[parts["down"]]), engine._to_numpy(state[parts["up"]]))
            except LoRAError as e:
                problems.append(f"{component}.{module}: {e}")
                continue
            alpha = float(engine._to_numpy(state[parts["alpha"]])) if "alpha" in parts else \
                _meta_alpha(meta, component, module, up.shape[0])
            rslora = _meta(meta, component).get("use_rslora", False)
            ratio = alpha / (math.sqrt(up.shape[0]) if rslora else up.shape[0])
            if path in out.setdefault(component, {}):
                problems.append(f"{component}.{module}: a second LoRA for {'/'.join(path)}")
            out[component][path] = Factor(jnp.asarray(down), jnp.asarray(up), ratio)
        if problems:
            raise LoRAError(f"{where}: {len(problems)} LoRA modules do not fit the models given (a LoRA for another "
                            "model?):\n  " + "\n  ".join(problems[:20]) +
                            (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
        return out
    finally:
        if hasattr(state, "close"):
            state.close()


def _meta(meta: dict | None, component: str) -> dict:
    if not meta:
        return {}
    if "" in meta:
        return meta[""]
    prefix = f"{component}."
    return {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}


def _meta_alpha(meta, component: str, module: str, rank: int) -> float:
    """PEFT's alpha for ``module``: its ``alpha_pattern`` entry (matched as PEFT matches, on a
    dotted suffix), else ``lora_alpha``; with no metadata at all, alpha = rank (scale 1),
    diffusers' convention for files without alphas."""
    m = _meta(meta, component)
    for pattern, value in (m.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(value)
    return float(m.get("lora_alpha", rank))


class _Resolver:
    """Module names of one LoRA'd model -> its Flax kernel paths, through the family's rules."""

    def __init__(self, target):
        self.family = registry.get(target.family) if isinstance(target.family, str) else target.family
        self.conv = self.family.load()
        module = target.module
        args, kwargs = self.conv.example_inputs(module)
        self.flat = traverse_util.flatten_dict(engine.abstract_params(module, *args, **kwargs))
        self.rules = list(self.conv.export_rules(module))
        kernels = [p[:-1] for p in self.flat if p[-1] == "kernel"]
        # kohya flattens module names: "_".join of a Flax module path is exactly that flat name.
        # A name may also lack leading segments (a transformers 5 CLIPTextModel has no text_model.):
        # a path's tail stands for it when no other path has the same tail.
        tails: dict[str, set] = {}
        for p in kernels:
            for k in range(1, len(p)):
                tails.setdefault("_".join(p[k:]), set()).add(p)
        self.flat_names = {t: next(iter(ps)) for t, ps in tails.items() if len(ps) == 1}
        self.flat_names.update({"_".join(p): p for p in kernels})
        self.ldm = {}
        if self.family.name == "unet_cond":
            from jdistill.convert import unet_cond

            self.ldm = unet_cond.ldm_table(target.config)

    def path(self, module: str) -> tuple | None:
        for name in (module, engine.rename_by_table(module, self.ldm) if self.ldm else None):
            if not name:
                continue
            mapped = engine._apply_rules(f"{name}.weight", np.zeros(0), self.rules)
            if len(mapped) == 1:
                path, kind = engine._leaf_transform(engine.torch_key_to_path(mapped[0][0]), self.flat)
                if path in self.flat and kind == "kernel":
                    return path
        if module in self.flat_names:
            return self.flat_names[module] + ("kernel",)
        if self.ldm:  # a flattened original name: its longest flattened table prefix
            for old in sorted(self.ldm, key=len, reverse=True):
                flat_old = old.replace(".", "_")
                if module == flat_old or module.startswith(flat_old + "_"):
                    name = self.ldm[old].replace(".", "_") + module[len(flat_old):]
                    if name in self.flat_names:
                        return self.flat_names[name] + ("kernel",)
                    break
        return None

    def factors(self, path: tuple, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """lora_A / lora_down and lora_B / lora_up (PyTorch layouts) -> ``down``, ``up`` for the kernel."""
        kernel = tuple(self.flat[path].shape)
        if b.ndim == 4:
            if b.shape[2:] != (1, 1):
                raise LoRAError(f"an up projection of shape {b.shape} is not 1x1")
            b = b[:, :, 0, 0]
        if a.ndim not in (2, 4) or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(f"down {a.shape} and up {b.shape} are not a LoRA pair")
        down = a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0)  # (in, r) / (kh, kw, in, r): the kernel's layout
        if len(kernel) == 4 and down.ndim == 2 and kernel[:2] == (1, 1):
            down = down[None, None]  # a Linear LoRA on a 1x1 convolution (SD 1.x's conv proj_in)
        if len(kernel) == 2 and down.ndim == 4 and down.shape[:2] == (1, 1):
            down = down[0, 0]
        if down.shape[:-1] != kernel[:-1] or b.shape[0] != kernel[-1]:
            raise LoRAError(f"down {a.shape} / up {b.shape} do not fit the kernel {kernel} (Flax layout)")
        return np.ascontiguousarray(down, np.float32), np.ascontiguousarray(b.T, np.float32)


# ---------------------------------------------------------------- writing


def save(path, factors: Mapping[str, Mapping[tuple, Factor]], targets: Mapping) -> Path:
    """Write ``factors`` (component -> factors) as a diffusers / PEFT LoRA file: keys
    ``{component}.{module}.lora_A.weight`` / ``lora_B.weight`` in PyTorch layouts, module names
    read off the PyTorch class of each target (built on the meta device, as export does), and
    ``lora_adapter_metadata`` with each component's rank and alpha (patterns where modules
    differ), which diffusers' ``load_lora_weights`` reads. ``path``: a .safetensors file, or a
    folder (``pytorch_lora_weights.safetensors`` in it)."""
    from safetensors.numpy import save_file

    from jdistill.convert import export

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    state, meta = {}, {}
    for component, fs in factors.items():
        target = targets[component]
        family = registry.get(target.family) if isinstance(target.family, str) else target.family
        conv = family.load()
        shapes = export.torch_state_shapes(family, target.config)
        args, kwargs = conv.example_inputs(target.module)
        flat = traverse_util.flatten_dict(engine.abstract_params(target.module, *args, **kwargs))
        names = {}
        for key in shapes:
            mapped = engine._apply_rules(key, np.zeros(0), list(conv.export_rules(target.module)))
            if len(mapped) == 1 and key.endswith(".weight"):
                p, kind = engine._leaf_transform(engine.torch_key_to_path(mapped[0][0]), flat)
                if kind == "kernel":
                    names[p] = key[: -len(".weight")]
        ranks, alphas = {}, {}
        for p, f in fs.items():
            if p not in names:
                raise LoRAError(f"{component}: {'/'.join(p)} is no kernel of the PyTorch model")
            module = names[p]
            down, up = np.asarray(jax.device_get(f.down), np.float32), np.asarray(jax.device_get(f.up), np.float32)
            a = down.T if down.ndim == 2 else down.transpose(3, 2, 0, 1)
            b = up.T if down.ndim == 2 else up.T[:, :, None, None]
            state[f"{component}.{module}.lora_A.weight"] = np.ascontiguousarray(a)
            state[f"{component}.{module}.lora_B.weight"] = np.ascontiguousarray(b)
            ranks[module], alphas[module] = f.rank, f.ratio * f.rank
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        meta.update({f"{component}.r": r, f"{component}.lora_alpha": alpha,
                     f"{component}.target_modules": sorted(ranks),
                     f"{component}.rank_pattern": {m: v for m, v in ranks.items() if v != r},
                     f"{component}.alpha_pattern": {m: v for m, v in alphas.items() if v != alpha}})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, os.fspath(path), metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


__all__ = ["Factor", "LoRAError", "read", "merge", "init", "save", "DEFAULT_TARGETS"]
