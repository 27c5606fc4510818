"""Where local model files are looked for: one resolver for every command and config.

``$JDISTILL_MODELS`` is a list of folders (``os.pathsep``-separated, like ``$PATH``); an
explicit ``models_dir`` (a config's ``models_dir``, ``--models-dir``) is searched first.
"""

from __future__ import annotations

import os
from pathlib import Path


def model_roots(models_dir: str | os.PathLike | None = None) -> list[Path]:
    """``models_dir`` (when given), then each folder of ``$JDISTILL_MODELS``, in order."""
    roots = [Path(models_dir).expanduser()] if models_dir else []
    roots += [Path(p).expanduser() for p in os.environ.get("JDISTILL_MODELS", "").split(os.pathsep) if p]
    return roots


def resolve_model(name: str, models_dir: str | os.PathLike | None = None) -> str:
    """A model path as given when it exists, else the first ``root/name`` that does; otherwise
    ``name`` unchanged (a preset name, or a missing path the loader reports with what it searched)."""
    given = Path(name).expanduser()
    if given.exists():
        return str(given)
    for root in model_roots(models_dir):
        if (root / name).exists():
            return str(root / name)
    return name
