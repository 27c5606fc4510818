"""The PyTorch state dict -> Flax param tree engine.

One generic rule covers most keys, because jdistill's modules are named
after diffusers' / transformers' attributes:

* a key is split on "."; an all-digit segment joins the one before it
  (``down_blocks.0.resnets.1.conv1.weight`` ->
  ``down_blocks_0/resnets_1/conv1/weight``);
* the leaf is translated by what the *target* tree holds at that place:
  ``weight`` -> ``kernel`` (Linear: transposed; Conv2d: OIHW -> HWIO),
  ``scale`` (norms) or ``embedding`` (tables); anything else keeps its name.

A model family adds only what the generic rule cannot know: ``rules``, each
a function ``(key, tensor) -> [(key, tensor), ...] | None`` that renames a
key, splits a fused tensor, or drops a buffer (return ``[]``). The first
rule that answers wins.

The target is an abstract tree (``jax.eval_shape`` of ``module.init``): no
random initialisation happens, and every target leaf must be filled. Any
missing, unexpected or mis-shaped key raises :class:`ConversionError` with
all of them named. Tensors are read one at a time from a lazy mapping, so
peak memory is the output tree plus one tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from flax import traverse_util

from jdistill.errors import UserError

Rule = Callable[[str, np.ndarray], "list[tuple[str, np.ndarray]] | None"]


class ConversionError(UserError, ValueError):
    """A checkpoint does not fit the model: names every missing, unexpected and mis-shaped key."""


@dataclass
class Report:
    missing: list[str] = field(default_factory=list)  # target leaves nothing filled
    unexpected: list[str] = field(default_factory=list)  # source keys that fit no target leaf
    mismatched: list[str] = field(default_factory=list)  # "key: source shape -> expected shape"
    converted: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, what: str = "checkpoint", limit: int = 20) -> str:
        lines = [f"{what} does not match the model ({self.converted} tensors converted):"]
        for title, items in (("missing from the checkpoint", self.missing),
                             ("unexpected in the checkpoint", self.unexpected),
                             ("shape mismatch", self.mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {k}" for k in items[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``a.b.0.c`` -> ``("a", "b_0", "c")``."""
    out: list[str] = []
    for seg in key.split("."):
        if seg.isdigit() and out:
            out[-1] = f"{out[-1]}_{seg}"
        else:
            out.append(seg)
    return tuple(out)


def rename(pattern: str, repl: str) -> Rule:
    """A rule that rewrites keys matching the regex ``pattern`` (``re.sub`` semantics)."""
    rx = re.compile(pattern)

    def rule(key, tensor):
        new = rx.sub(repl, key)
        return None if new == key else [(new, tensor)]

    rule.__name__ = f"rename({pattern!r} -> {repl!r})"
    return rule


def drop(pattern: str) -> Rule:
    """A rule that discards keys matching ``pattern`` (non-persistent buffers, unused heads)."""
    rx = re.compile(pattern)

    def rule(key, tensor):
        return [] if rx.search(key) else None

    return rule


def split(pattern: str, names: Iterable[str], axis: int = 0) -> Rule:
    """A rule that splits a fused tensor (``qkv``) into equal parts: the last path
    segment before the leaf is replaced by each of ``names`` in turn."""
    rx, names = re.compile(pattern), list(names)

    def rule(key, tensor):
        m = rx.search(key)
        if not m:
            return None
        parts = np.split(np.asarray(tensor), len(names), axis=axis)
        head, _, leaf = key.rpartition(".")
        stem = head.rpartition(".")[0]
        return [(f"{stem + '.' if stem else ''}{n}.{leaf}", p) for n, p in zip(names, parts)]

    return rule


def rename_table(table: Mapping[str, str], what: str = "table") -> Rule:
    """A rule that renames by module prefix: the longest dotted prefix of a key found in
    ``table`` is replaced by its value (``{"input_blocks.1.0": "down_blocks.0.resnets.0"}`` maps
    ``input_blocks.1.0.emb_layers.1.weight``). Keys with no prefix in the table pass on."""

    def rule(key, tensor):
        new = rename_by_table(key, table)
        return None if new is None else [(new, tensor)]

    rule.__name__ = f"rename_table({what})"
    return rule


def rename_by_table(name: str, table: Mapping[str, str]) -> str | None:
    """``name`` (a key or a module name) with its longest dotted prefix in ``table`` replaced; None
    when no prefix is in the table."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head]] + parts[cut:])
    return None


def squeeze_1x1(pattern: str) -> Rule:
    """A rule for keys matching ``pattern`` that turns a 1x1 convolution kernel (O, I, 1, 1) or a
    1-tap Conv1d (O, I, 1) into the Linear weight (O, I) of the same map (the original SD VAE
    stores its attention projections as convolutions)."""
    rx = re.compile(pattern)

    def rule(key, tensor):
        if not rx.search(key) or np.ndim(tensor) < 3:
            return None
        x = tensor if isinstance(tensor, np.ndarray) else _to_numpy(tensor)
        if any(d != 1 for d in x.shape[2:]):
            raise ConversionError(f"{key}: a {x.shape} kernel is not a 1x1 convolution")
        return [(key, x.reshape(x.shape[:2]))]

    return rule


def swap_halves(pattern: str, axis: int = 0) -> Rule:
    """A rule that swaps the two halves of a tensor along ``axis`` (the original SD3 final
    adaLN computes (shift, scale), diffusers' (scale, shift))."""
    rx = re.compile(pattern)

    def rule(key, tensor):
        if not rx.search(key):
            return None
        a, b = np.split(np.asarray(tensor if isinstance(tensor, np.ndarray) else _to_numpy(tensor)), 2, axis=axis)
        return [(key, np.concatenate([b, a], axis=axis))]

    return rule


def transpose(pattern: str) -> Rule:
    """A rule that transposes a 2-D tensor (OpenCLIP stores its text projection as x @ P; the
    Linear weight is P.T)."""
    rx = re.compile(pattern)

    def rule(key, tensor):
        if not rx.search(key):
            return None
        return [(key, np.asarray(tensor if isinstance(tensor, np.ndarray) else _to_numpy(tensor)).T)]

    return rule


def _apply_rules(key, tensor, rules) -> list[tuple[str, object]]:
    for rule in rules:
        out = rule(key, tensor)
        if out is not None:
            # a renamed key may need further rules (e.g. rename, then split)
            return [kv for k, t in out for kv in _apply_rules(k, t, rules[rules.index(rule) + 1:])]
    return [(key, tensor)]


def _to_numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # torch.Tensor (bf16 has no numpy dtype: go through fp32)
        import torch

        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(tensor)


def _leaf_transform(path: tuple[str, ...], flat_target: Mapping):
    """Where the tensor goes and how it is laid out, decided by the target tree."""
    *mod, leaf = path
    mod = tuple(mod)
    if leaf == "weight":
        for name in ("kernel", "scale", "embedding", "weight"):
            if mod + (name,) in flat_target:
                return mod + (name,), name
    return path, leaf


def _layout(x: np.ndarray, kind: str, target_ndim: int) -> np.ndarray:
    if kind == "kernel":
        if x.ndim == 2:  # Linear (out, in) -> (in, out)
            return x.T
        if x.ndim == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
            return x.transpose(2, 3, 1, 0)
        if x.ndim == 3:  # Conv1d (O, I, k) -> (k, I, O)
            return x.transpose(2, 1, 0)
    return x


def convert_state_dict(state_dict: Mapping, target, rules: Iterable[Rule] = (), *, what: str = "checkpoint",
                       dtype=None, strict: bool = True):
    """Fill ``target`` (an abstract param tree) from a PyTorch-style state dict.

    ``state_dict`` may be any mapping whose values are read lazily (a safetensors
    handle, a dict of torch tensors or numpy arrays). Returns ``(params, report)``
    with numpy leaves in the target's dtype (or ``dtype``). Raises
    :class:`ConversionError` unless every key fits, when ``strict``.
    """
    rules = list(rules)
    flat_target = traverse_util.flatten_dict(target)
    out: dict = {}
    seen: set = set()  # leaves a mis-shaped tensor was meant for: reported once, as mismatched
    report = Report()
    for key in state_dict.keys():
        for new_key, tensor in _apply_rules(key, state_dict[key], rules):
            path, kind = _leaf_transform(torch_key_to_path(new_key), flat_target)
            if path not in flat_target:
                report.unexpected.append(key if new_key == key else f"{key} (as {new_key})")
                continue
            spec = flat_target[path]
            src = _to_numpy(tensor)
            x = _layout(src, kind, len(spec.shape))
            if tuple(x.shape) != tuple(spec.shape):
                report.mismatched.append(f"{key}: checkpoint {tuple(src.shape)}, model {'/'.join(path)} "
                                         f"{tuple(spec.shape)}" + (" (Flax layout)" if kind == "kernel" else ""))
                seen.add(path)
                continue
            if path in out:
                report.unexpected.append(f"{key} (duplicate for {'/'.join(path)})")
                continue
            # (np.ascontiguousarray would turn a 0-d param, CLIP's logit_scale, into shape (1,))
            x = np.asarray(x, dtype=dtype or spec.dtype)
            out[path] = x if x.flags.c_contiguous else np.ascontiguousarray(x)
            report.converted += 1
    report.missing = ["/".join(p) for p in flat_target if p not in out and p not in seen]
    if strict and not report.ok:
        raise ConversionError(report.describe(what))
    return traverse_util.unflatten_dict(out), report


def abstract_params(module, *args, **kwargs):
    """The param tree ``module.init`` would make, as ShapeDtypeStructs: no random numbers drawn."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return shapes["params"]


def flax_to_torch_state_dict(params, torch_keys_shapes: Mapping[str, tuple], rules: Iterable[Rule] = ()):
    """The inverse map for export: for each key a PyTorch model expects, the Flax leaf it reads.

    ``torch_keys_shapes`` comes from the PyTorch model's own state dict (e.g. a
    diffusers model built on the meta device), so no key name is guessed; keys
    are pushed through the same forward rules and the same leaf rule as loading.
    Rules that split tensors cannot be inverted and are refused.
    """
    flat = traverse_util.flatten_dict(params)
    out, missing = {}, []
    for key, shape in torch_keys_shapes.items():
        mapped = _apply_rules(key, np.zeros(0), list(rules))
        if len(mapped) != 1:
            if not mapped:
                continue
            raise ConversionError(f"cannot export {key}: its loading rule splits or drops it")
        new_key = mapped[0][0]
        path, kind = _leaf_transform(torch_key_to_path(new_key), flat)
        if path not in flat:
            missing.append(key)
            continue
        x = np.asarray(jax.device_get(flat[path]))
        if kind == "kernel":
            x = x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.transpose(2, 1, 0)
        if tuple(x.shape) != tuple(shape):
            raise ConversionError(f"export of {key}: {x.shape} does not fit {tuple(shape)}")
        out[key] = np.ascontiguousarray(x)
    if missing:
        raise ConversionError(f"export: the params hold nothing for {len(missing)} keys: {missing[:20]}")
    return out


def graft(pretrained, fresh, new: Iterable[str] = ()):
    """Start a model from ``pretrained`` params where it has extra parts (a student's guidance
    embedding, an adapter): every leaf of ``fresh`` (a newly initialised tree of the bigger model)
    is taken from ``pretrained`` at the same path, except leaves under a path containing one of
    ``new`` (e.g. ``"guidance_embedder"``), which keep their fresh initialisation.

    Anything else that does not line up (a leaf missing from ``pretrained``, one it has that the
    model has not, a shape mismatch) raises :class:`ConversionError`: nothing is initialised
    randomly by accident.
    """
    new = tuple(new)
    flat_p = traverse_util.flatten_dict(pretrained)
    flat_f = traverse_util.flatten_dict(fresh)
    report, out = Report(), {}
    for path, leaf in flat_f.items():
        if any(n in path for n in new):
            out[path] = leaf
        elif path not in flat_p:
            report.missing.append("/".join(path))
        elif tuple(flat_p[path].shape) != tuple(leaf.shape):
            report.mismatched.append(f"{'/'.join(path)}: pretrained {tuple(flat_p[path].shape)}, "
                                     f"model {tuple(leaf.shape)}")
        else:
            out[path] = flat_p[path]
            report.converted += 1
    report.unexpected = ["/".join(p) for p in flat_p if p not in flat_f]
    if not report.ok:
        raise ConversionError(report.describe("pretrained params"))
    return traverse_util.unflatten_dict(out)


def add_fresh_submodule(params: dict, name: str, submodule, target, rng, *init_args, dtype=None) -> dict:
    """Give converted ``params`` a part the checkpoint cannot have (a guidance-distilled student's
    ``guidance_embedder``): ``submodule`` is initialised alone from ``rng`` and must match the
    model's abstract ``target`` for that part exactly, or :class:`ConversionError` says how not."""
    fresh = submodule.init(rng, *init_args)["params"]
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), fresh)
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), target)
    if shapes != expected:
        raise ConversionError(f"{name}: a fresh {type(submodule).__name__} gives {shapes}, the model expects {expected}")
    return {**params, name: jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(dtype or x.dtype), fresh)}


def init_parts(module, names: Iterable[str], rng, *args, **kwargs):
    """The tree ``module.init`` would make, with real values only under paths containing one of
    ``names`` and ShapeDtypeStructs elsewhere: for :func:`graft`, which reads only shapes outside
    the new parts. Under ``jax.jit`` XLA drops the initialisers nobody asked for, so a student
    of a multi-GB teacher does not draw a multi-GB random init to throw away."""
    names = tuple(names)

    def keep(flat):
        return {p: v for p, v in flat.items() if any(n in p for n in names)}

    abstract = abstract_params(module, *args, **kwargs)
    fresh = jax.jit(lambda: keep(traverse_util.flatten_dict(module.init(rng, *args, **kwargs)["params"])))()
    flat = traverse_util.flatten_dict(abstract)
    flat.update(fresh)
    return traverse_util.unflatten_dict(flat)


class RuledView(Mapping):
    """A lazy state dict in another layout: the keys of ``state_dict`` under ``prefix`` (the prefix
    removed) pushed through ``rules``, each new key read from its source key only when indexed.

    Keys and shapes are worked out from the source's shapes alone (a zero-strided placeholder
    of each shape goes through the rules), so building the view reads no tensor data.
    ``dropped`` lists the source keys a rule discarded; ``made`` adds tensors no source key
    holds, as ``{key: (shape, make)}`` (each named by the caller, e.g. an identity projection
    diffusers also makes). Two source keys that land on one key are a ConversionError.
    """

    def __init__(self, state_dict: Mapping, rules: Iterable[Rule] = (), prefix: str = "",
                 made: Mapping[str, tuple] | None = None):
        self._sd, self._rules, self._prefix = state_dict, list(rules), prefix
        self._where: dict[str, tuple[str, int]] = {}
        self._shapes: dict[str, tuple] = {}
        self._made = dict(made or {})
        self.dropped: list[str] = []
        for old in state_dict.keys():
            if not old.startswith(prefix):
                continue
            placeholder = np.broadcast_to(np.float32(0), _shape_of(state_dict, old))
            out = _apply_rules(old[len(prefix):], placeholder, self._rules)
            if not out:
                self.dropped.append(old)
            for i, (new, part) in enumerate(out):
                if new in self._where:
                    raise ConversionError(f"{old} and {self._where[new][0]} both map to {new}")
                self._where[new], self._shapes[new] = (old, i), tuple(np.shape(part))
        for new, (shape, _) in self._made.items():
            if new in self._where:
                raise ConversionError(f"{new} is in the checkpoint ({self._where[new][0]}); it cannot also be made")
            self._shapes[new] = tuple(shape)

    @property
    def sources(self) -> list[str]:
        """The source keys this view reads (each once per new key made from it)."""
        return sorted({old for old, _ in self._where.values()})

    def source_of(self, key: str) -> str | None:
        """The source key ``key`` is read from (None for a made tensor)."""
        return self._where[key][0] if key in self._where else None

    def shape(self, key) -> tuple:
        return self._shapes[key]

    def __getitem__(self, key):
        if key in self._made:
            return self._made[key][1]()
        old, i = self._where[key]
        out = _apply_rules(old[len(self._prefix):], self._sd[old], self._rules)
        new, tensor = out[i]
        assert new == key, (new, key)  # the rules decide keys by name, never by values
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._where) + list(self._made))

    def __len__(self) -> int:
        return len(self._where) + len(self._made)

    def __contains__(self, key) -> bool:
        return key in self._where or key in self._made


def _shape_of(state_dict: Mapping, key: str) -> tuple:
    """A tensor's shape without reading it when the mapping can say (a LazyStateDict, a view)."""
    shape = getattr(state_dict, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(np.shape(state_dict[key]))
