"""Files a user hands in: saying what a file is when it is not what was expected, and reading
``.npz`` archives safely.

numpy's own errors mislead here: a text file renamed ``.npz`` is reported as "pickled data"
with the advice to load it with ``allow_pickle`` (a wrong diagnosis, and unsafe advice), an
empty file as an EOFError, a truncated archive as "not a zip file". :func:`read_npz` looks
at the file's first bytes first and names what it is; it never unpickles anything.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib

import numpy as np

from jdistill.errors import InvalidArgument, MissingInput

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with entries, an empty zip
NPY_MAGIC = b"\x93NUMPY"


def head(path: str, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def is_pickle(start: bytes) -> bool:
    """A pickle stream of protocol 2..5 (torch's legacy format starts with one)."""
    return start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


def describe(start: bytes) -> str:
    """What a file whose first bytes are ``start`` is, in words (for a file that is not what was expected)."""
    if not start:
        return "empty (0 bytes)"
    if start.startswith(ZIP_MAGICS):
        return "a zip archive"
    if start.startswith(NPY_MAGIC):
        return "a single .npy array, not an .npz archive (save with np.savez(path, images=...))"
    if is_pickle(start):
        return "a Python pickle (jdistill never unpickles files; save arrays with np.savez)"
    if start.startswith(b"\x89PNG"):
        return "a PNG image"
    if start.startswith(b"\x89HDF"):
        return "an HDF5 file"
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        return f"an unknown binary file (starts with {start[:8]!r})"
    if text.lstrip().startswith(("{", "[")):
        return "a JSON / text file"
    return f"a text file (starts with {text[:40]!r})"


def check_output_file(path: str, suffix: str) -> None:
    """An output file path: it names a ``suffix`` file, not a directory."""
    if os.path.isdir(path):
        raise InvalidArgument(f"{path} is a directory; give a file name ending in {suffix}")
    if not path.endswith(suffix):
        raise InvalidArgument(f"{path}: the output file must end in {suffix}")


def check_output_dir(path: str) -> None:
    """An output folder: it may exist, but not as a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgument(f"{path} is a file; expected a folder for the outputs")


def check_writable(path: str, flag: str, *, folder: bool = False) -> None:
    """``path`` (an output file or, with ``folder``, an output folder) can be written: the nearest
    existing folder on its way takes a temporary file. Nothing is created."""
    if folder and os.path.isfile(path):
        raise InvalidArgument(f"{flag} {path} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing != os.path.abspath(path) and not os.path.isdir(existing):
        raise InvalidArgument(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
    where = existing if os.path.isdir(existing) else os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise InvalidArgument(f"{flag} {path}: cannot write into {where} ({e.strerror})") from None


def read_npz(path: str, what: str = "samples file") -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path``; a named error when it is missing, empty, not an .npz,
    damaged, or holds a pickled object array (which is never loaded)."""
    if os.path.isdir(path):
        raise InvalidArgument(f"{path} is a directory; expected a {what} (.npz)")
    if not os.path.isfile(path):
        raise MissingInput(f"no {what} at {path}")
    start = head(path)
    if not start:
        raise InvalidArgument(f"{path} is empty (0 bytes); expected a {what} (.npz)")
    if not start.startswith(ZIP_MAGICS):
        raise InvalidArgument(f"{path} is not an .npz archive: it is {describe(start)}")
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
