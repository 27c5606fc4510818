"""Reading a user's ``.npz`` safely, and saying what a file is when it is not one.

numpy's own errors mislead here: a text file renamed ``.npz`` is reported as "pickled data"
with the advice to load it with ``allow_pickle`` (a wrong diagnosis, and unsafe advice), an
empty file as an EOFError, a truncated archive as "not a zip file". :func:`read` looks at
the file's first bytes first and names what it is; it never unpickles anything.
"""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

from jdistill.errors import InvalidArgument, MissingInput

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with entries, an empty zip
NPY_MAGIC = b"\x93NUMPY"


def describe(head: bytes) -> str:
    """What a file starting with ``head`` is, in words (for files that are not .npz archives)."""
    if head.startswith(NPY_MAGIC):
        return "a single .npy array, not an .npz archive (save with np.savez(path, images=...))"
    if head[:1] == b"\x80" and len(head) > 1 and head[1:2] in bytes(range(2, 6)):
        return "a Python pickle (jdistill never unpickles files; save arrays with np.savez)"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"an unknown binary file (starts with {head[:8]!r})"
    if text.lstrip().startswith(("{", "[")):
        return "a JSON / text file"
    return f"a text file (starts with {text[:40]!r})"


def read(path: str, what: str = "samples file") -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path``; a named error when it is missing, empty, not an .npz,
    damaged, or holds a pickled object array (which is never loaded)."""
    if os.path.isdir(path):
        raise InvalidArgument(f"{path} is a directory; expected a {what} (.npz)")
    if not os.path.isfile(path):
        raise MissingInput(f"no {what} at {path}")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise InvalidArgument(f"{path} is empty (0 bytes); expected a {what} (.npz)")
    if not head.startswith(ZIP_MAGICS):
        raise InvalidArgument(f"{path} is not an .npz archive: it is {describe(head)}")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            arrays = {}
            for name in names:
                try:
                    arrays[name] = f[name]
                except ValueError as e:
                    if "allow_pickle" in str(e) or "Object arrays" in str(e):
                        raise InvalidArgument(f"{path}: array {name!r} holds Python objects (a pickle); jdistill "
                                              "never unpickles files: save numeric arrays (np.savez(path, "
                                              "images=uint8_array, labels=int_array))") from None
                    raise InvalidArgument(f"{path}: array {name!r} cannot be read ({e})") from None
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise InvalidArgument(f"{path} is a damaged or truncated .npz (zip) archive "
                              f"({os.path.getsize(path)} bytes; {type(e).__name__}: {e})") from None
    return arrays
