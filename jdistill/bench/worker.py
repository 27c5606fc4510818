"""A benchmark worker: one process per framework, driven over stdin / stdout.

    python -m jdistill.bench.worker jax|torch

Each request is one JSON line ``{"op": "build" | "prepare" | "time", "args": {...}}``; each
reply is one line ``@@bench {"ok": true, "result": ...}`` (or ``"error"``) on stdout, so that
anything a library prints is skipped. Separate processes keep each framework's thread pool
to itself: in one process, PyTorch's OpenMP threads spinning after a kernel and XLA's pool
slowed each other down by up to 2x, which no alternation of rounds would cancel.
"""

from __future__ import annotations

import json
import sys
import traceback

MARK = "@@bench "


def serve(side: str) -> None:
    if side == "jax":
        from jdistill.bench.jax_side import JaxSide as Side
    elif side == "torch":
        from jdistill.bench.torch_side import TorchSide as Side
    else:
        raise SystemExit(f"unknown worker side {side!r}; expected jax or torch")
    handler = Side()
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter goes to stderr, replies stay parseable
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": True, "result": getattr(handler, request["op"])(**request.get("args", {}))}
        except Exception as e:  # noqa: BLE001 -- the orchestrator reports it and goes on
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        out.write(MARK + json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
