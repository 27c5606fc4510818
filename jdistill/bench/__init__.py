"""Benchmarks of jdistill against PyTorch (diffusers) on the same models and weights.

``python -m jdistill.bench`` (or ``jdistill bench``); see :mod:`jdistill.bench.cli`.
"""


def main(argv=None) -> int:
    from jdistill.bench.cli import main as cli_main

    return cli_main(argv)
