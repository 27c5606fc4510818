"""What a resume may change, and a resume that gives exactness up on purpose.

A stage's config keys fall in three kinds (``Stage.identity`` / ``Stage.exact``):

* identity keys say what the params *are* (the network, the noise process, the teacher and
  stage of a distillation): a checkpoint made with others is refused, always;
* exact keys say how the run gets where it goes (the data batch size and order, the step
  count and so the schedule's length, the optimizer, the averages, the objective): changed,
  the resumed run is no longer the one an uninterrupted run would have been. Refused with
  the differences listed, unless the user passes ``--allow-inexact-resume``; then the change
  is printed loudly and recorded in every later checkpoint's meta (``inexact_resumes``);
* everything else (logging, checkpoint cadence, the mesh, the non-finite policy, the
  sampling defaults) changes freely.

An allowed inexact resume may change the state's structure (a new EMA, clipping switched
on): what the checkpoint holds under the same name and shape is restored, the rest starts
fresh from the restored params (an average as a copy of them, optimizer moments as zeros),
and that is listed too.
"""

from __future__ import annotations

import sys

import jax

from jdistill import config as config_lib

# the teacher's (a model trained from scratch); a method module sets its own on its Stages
IDENTITY_KEYS = ("model", "diffusion")
EXACT_KEYS = ("seed", "data.name", "data.batch_size", "loss", "optim", "train.steps", "train.ema_decay")
FLAG = "--allow-inexact-resume"
RECORD_KEY = "inexact_resumes"  # in the checkpoint meta: [{"step", "changes", "fresh", "dropped"}, ...]

_ABSENT = object()


def _plain(d):
    """JSON's view of a config value: tuples are lists (a stored config comes back that way)."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def _lookup(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return _plain(node)


def _leaves(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def differences(stored: dict, current: dict, keys) -> list[str]:
    """"key: checkpoint A vs config B" for every leaf under ``keys`` that differs. A key one side
    lacks entirely (a checkpoint older than the key) is not a difference."""
    out = []
    for key in keys:
        a, b = _lookup(stored, key), _lookup(current, key)
        if a is _ABSENT or b is _ABSENT or a == b:
            continue
        la, lb = _leaves(a, key), _leaves(b, key)
        for leaf in sorted(set(la) | set(lb)):
            va, vb = la.get(leaf, "<absent>"), lb.get(leaf, "<absent>")
            if va != vb:
                out.append(f"{leaf}: checkpoint {va!r} vs config {vb!r}")
    return out


def check_same_identity(stored: dict, current: dict, directory: str, keys) -> None:
    """Refuse to resume a checkpoint made by a different network, noise process or stage."""
    diffs = differences(stored, current, keys)
    if diffs:
        sections = sorted({d.split(".")[0].split(":")[0] for d in diffs})
        raise config_lib.ConfigError(f"the checkpoint in {directory} was made with a different "
                                     f"{'/'.join(sections)} config ({'; '.join(diffs)}); use a new workdir or the "
                                     "same config")


def check(stored: dict, current: dict, directory: str, identity, exact, allow_inexact: bool) -> list[str]:
    """The exact-key changes a resume makes (empty: an exact resume). Identity changes are refused;
    exact-key changes too, unless ``allow_inexact``."""
    check_same_identity(stored, current, directory, identity)
    changes = differences(stored, current, exact)
    if changes and not allow_inexact:
        raise config_lib.ConfigError(
            f"resuming {directory} with this config would not continue the same run: {'; '.join(changes)}. "
            f"Resume with the config it was made with, train into a new workdir, or pass {FLAG} to go on anyway "
            "(the result is then not what an uninterrupted run gives)")
    return changes


def seed_changed(changes) -> bool:
    """Whether the changes :func:`check` found include the run's seed."""
    return any(c.startswith("seed:") for c in changes)


def fill_fresh(restored, fresh):
    """``restored`` with its None leaves (not in the checkpoint) taken from ``fresh``."""
    flat, treedef = jax.tree_util.tree_flatten(restored, is_leaf=lambda x: x is None)
    return jax.tree_util.tree_unflatten(treedef, [f if r is None else r for r, f in
                                                  zip(flat, treedef.flatten_up_to(fresh), strict=True)])


def groups(names) -> list[str]:
    """Array names shortened to the subtrees they belong to (parts.model.opt_state, averages.ema)."""
    groups = []
    for name in names:
        parts = name.split(".")
        group = ".".join(parts[:3] if parts[0] == "parts" else parts[:2])
        if group not in groups:
            groups.append(group)
    return groups


def announce(directory: str, step: int, changes, fresh, dropped) -> dict:
    """Print the inexact resume loudly; returns its record for the checkpoint meta."""
    bar = "!" * 78
    lines = [bar, f"INEXACT RESUME of {directory} at step {step} ({FLAG}): the run goes on with a changed config",
             "and is no longer what an uninterrupted run would give. Changed:"]
    lines += [f"  {c}" for c in changes]
    if fresh:
        lines.append("Not in the checkpoint in this shape, started fresh from the restored params:")
        lines += [f"  {g}" for g in fresh]
    if dropped:
        lines.append("In the checkpoint, no longer kept:")
        lines += [f"  {g}" for g in dropped]
    lines += [f"Recorded in every later checkpoint's meta ({RECORD_KEY!r}).", bar]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return {"step": int(step), "changes": list(changes), "fresh": list(fresh), "dropped": list(dropped)}
