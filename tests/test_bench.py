"""``jdistill bench``'s arithmetic and its command line, without timing anything (speed is
measured by the command itself, never asserted in tests)."""

import pytest

from jdistill.bench import cli, report, run
from jdistill.bench.specs import MODELS


def result(times, *, flops=2e9, peak_bf16=None):
    """A bench result of dit-cpu's train step: ``times`` = {implementation: [seconds per round]}."""
    rows = [dict(impl=impl, task="train", times=[(t, t) for t in ts], error=None) for impl, ts in times.items()]
    build = {"jax": dict(device=dict(peak_bf16=peak_bf16), train_flops=flops, train_compile_s=3.0, params=10)}
    return dict(model="dit-cpu", spec=dict(batch=32), dtype="float32", build=build, rows=rows)


def test_ratios_throughput_and_mfu_from_medians():
    res = result({"jdistill": [1.0, 9.0, 2.0], "eager": [4.0, 3.0, 100.0], "compile": [1.0, 1.0, 1.0]},
                 flops=4e12, peak_bf16=1e12)
    rows = {e["impl"]: e for e in report.summarise([res])}
    ours = rows["jdistill"]
    assert ours["seconds"] == 2.0 and ours["best_seconds"] == 1.0  # the median, not the mean or the best
    assert ours["samples_per_s"] == 16.0
    assert ours["speed_vs_eager"] == 2.0 and ours["speed_vs_compile"] == 0.5
    assert ours["flops_per_s"] == 2e12 and ours["mfu"] == 2.0
    assert "mfu" not in rows["eager"] and rows["eager"]["speed_vs_eager"] == 1.0
    table = report.markdown([res])
    assert "| dit-cpu | float32 | train step | jdistill | 2.000 |" in table
    assert "2.00x | 0.50x | 2.000 T | 200.0%" in table


def test_a_failed_implementation_is_a_row_not_a_crash():
    res = result({"jdistill": [1.0]})
    res["rows"].append(dict(impl="eager", task="train", times=[], error="torch worker died"))
    table = report.markdown([res])
    assert "| eager | error: torch worker died |" in table
    assert "speed_vs_eager" not in report.summarise([res])[0]


@pytest.mark.parametrize("argv, message", [(["--models", "nope"], "unknown models ['nope']"),
                                           (["--tasks", "train,fly"], "unknown tasks ['fly']")])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_single_thread_pins_both_workers():
    opts = run.Options(tasks=("train",), torch_impls=("eager",), dtype="float32", rounds=1, model_timeout=1.0,
                       single_thread=True)
    assert "--xla_cpu_multi_thread_eigen=false" in opts.worker_env("jax")["XLA_FLAGS"]
    assert opts.worker_env("torch")["OMP_NUM_THREADS"] == "1"
    assert set(MODELS) >= {"dit-cpu", "sd15-unet-cpu", "sd3-mmdit-cpu", "dit-xl2", "sd15-unet"}
