"""Folders that appear complete or not at all.

:func:`staging` builds a folder under a temporary name beside its destination and renames
it into place when the block completes: the rename is atomic on one filesystem, so a
process killed at any point leaves nothing under the final name. Temporaries of dead
processes (this host's only: a cache on a shared filesystem may hold another host's live
conversion) are removed the next time the same destination is staged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator

from jdistill.errors import OutputExists

_HOST = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(dst: Path) -> None:
    """Temporary folders of writes to ``dst`` whose process is gone (killed mid-write)."""
    rx = re.compile(rf"\.{re.escape(dst.name)}\.(partial|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    for p in dst.parent.iterdir():
        m = rx.fullmatch(p.name)
        if m and m["host"] == _HOST and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staging(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``dst``, renamed to ``dst`` when the block completes, removed if
    it raises. ``dst`` is either absent or complete."""
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dst)
    tag = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.parent / f".{dst.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            if not overwrite:
                raise OutputExists(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
            old = dst.parent / f".{dst.name}.old-{tag}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, dst)
            except OSError as e:  # another process renamed its own copy into place first
                raise OutputExists(f"{dst} appeared while converting: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
