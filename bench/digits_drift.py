"""How far a code change moves training: params of the digits teacher after N steps.

Runs ``configs/digits_teacher.py`` (the model behind the README's FD figures) for ``--steps``
steps with whichever jdistill is on the path, and saves the params; ``--compare`` prints the
largest absolute difference between two such files (0.0 means bit-identical training).

    d=$(mktemp -d); git worktree add "$d" <old-commit>
    PYTHONPATH="$d" python bench/digits_drift.py --steps 20 --out old.npz
    PYTHONPATH=. python bench/digits_drift.py --steps 20 --out new.npz
    python bench/digits_drift.py --compare old.npz new.npz

The script imports only what both old and new trees have (the teacher recipe's ``setup``).
"""

import argparse
import sys

import numpy as np


def train(config: str, steps: int, out: str) -> None:
    import jax
    from flax import traverse_util

    from jdistill import config as config_lib
    from jdistill.recipes import teacher
    from jdistill.train import mesh as mesh_lib

    cfg = config_lib.load_config(config, [f"--config.train.steps={steps}"])
    s, source = teacher.setup(cfg, None)
    state, batches = s.state, source.iterate(0, steps)
    for _ in range(steps):
        state, _ = s.step_fn(state, None, mesh_lib.global_batch(next(batches), s.mesh))
    (part,) = state.parts.values()  # the teacher recipe trains one part ("model")
    flat = traverse_util.flatten_dict(jax.device_get(part.params), sep="/")
    np.savez(out, **{k: np.asarray(v) for k, v in flat.items()})
    print(f"{out}: params after {steps} steps of {config} (jax {jax.__version__})")


def compare(a: str, b: str) -> float:
    x, y = np.load(a), np.load(b)
    if sorted(x.files) != sorted(y.files):
        raise SystemExit(f"different param trees: {sorted(set(x.files) ^ set(y.files))}")
    worst = max(x.files, key=lambda k: float(np.max(np.abs(x[k] - y[k]))))
    diff = float(np.max(np.abs(x[worst] - y[worst])))
    scale = float(np.max(np.abs(x[worst])))
    identical = sum(np.array_equal(x[k], y[k]) for k in x.files)
    print(f"max |a - b| = {diff:.3g} (in {worst}, whose largest entry is {scale:.3g}); "
          f"{identical} of {len(x.files)} params bit-identical")
    return diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits_teacher.py")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="digits_params.npz")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = p.parse_args(argv)
    if args.compare:
        compare(*args.compare)
    else:
        train(args.config, args.steps, args.out)


if __name__ == "__main__":
    sys.exit(main())
