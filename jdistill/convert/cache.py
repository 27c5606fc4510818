"""Where a source's conversion is cached, and when the cached copy is still that source's.

An entry is named ``<readable slug>-<digest>`` under ``$JDISTILL_CACHE`` (default
``~/.cache/jdistill/converted``). The digest covers everything the converted folder
depends on: the source's real path, each source file's path, size and mtime (configs,
weights, shards, copied folders, a given config), a given config dict, the dtype, the
component selection, the variant / wrapper, the jdistill version and the folder format.
Only file metadata is read, so a hit opens no weights (not even a header).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import jdistill
from jdistill.convert.sources import ModelSource, PipelineSource

FORMAT_VERSION = 1  # the converted folder's layout (jdistill.convert.pretrained writes it)


def default_cache_dir() -> Path:
    return Path(os.environ.get("JDISTILL_CACHE") or "~/.cache/jdistill/converted").expanduser()


def key(source, dtype: str, components: Sequence[str] | None, variant, wrapper) -> str:
    """The digest of ``source`` (a ModelSource / PipelineSource) converted with these options."""
    root = Path(source.path).absolute()
    files = []
    selected = list(components) if components else None
    for f in (source.files(selected) if isinstance(source, PipelineSource) else source.files()):
        st = os.stat(f)  # follows hub-cache symlinks to the blobs they name
        files.append([os.path.relpath(f, root), st.st_size, st.st_mtime_ns])
    # a config given as a dict has no file whose metadata would say it changed
    given = source.config if isinstance(source, ModelSource) and source.config_file is None else None
    payload = {"source": os.path.realpath(root), "files": sorted(files), "dtype": dtype,
               "components": sorted(components or []), "variant": variant, "wrapper": wrapper,
               "config": given, "jdistill": jdistill.__version__, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def entry(source, dtype: str, components, variant, wrapper, *, name: str | None = None, cache_dir=None) -> Path:
    """The cache folder for this conversion (it may not exist yet). ``name``: a readable prefix
    (a preset's name; default the source's file or folder name, which for a hub snapshot is a
    commit hash)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name or Path(source.path).name)[:60] or "model"
    root = Path(cache_dir or default_cache_dir()).expanduser().absolute()
    return root / f"{slug}-{key(source, dtype, components, variant, wrapper)}"
