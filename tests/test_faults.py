"""Fault injection (issue 14): bad arguments, bad files, non-finite training, damaged checkpoints.

Each case was once taken silently (a wrong result with exit 0), ended in a traceback, or left a
run unable to go on. Now: a named error with exit 2 and nothing written, or the right result.
The default cases run in-process on tiny states; the CLI trainings of the digits teacher (lr
1e30, lr 1e6 under clipping, every file of a checkpoint damaged) are ``slow``.
"""

import json
import os
import pickle
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from cli_helpers import REPO

from jdistill import cli
from jdistill.errors import DamagedCheckpointWarning, NonFiniteOutput
from jdistill.recipes import stages
from jdistill.sampling.generate import generate
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import engine as engine_lib
from jdistill.train import mesh as mesh_lib
from jdistill.train.loop import NonFiniteError

TEACHER = os.path.join(REPO, "configs", "digits_teacher.py")


def refused(argv, capsys) -> str:
    """cli.main(argv) must end with exit status 2 (argparse's or a UserError's); its stderr."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse refuses before any command runs
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"{argv} exited {rc}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    return err


# -- arguments ---------------------------------------------------------------------------

ARGUMENTS = [
    # argv after the command (W: a workdir that does not exist, O: the output path), stderr must match
    (["sample", "--workdir", "W", "--steps", "0"], r"--steps: expected an integer >= 1, got 0"),
    (["sample", "--workdir", "W", "--steps", "-1"], r"--steps: expected an integer >= 1, got -1"),
    (["sample", "--workdir", "W", "--num", "0"], r"--num: expected an integer >= 1, got 0"),
    (["sample", "--workdir", "W", "--num", "-5"], r"--num: expected an integer >= 1, got -5"),
    (["sample", "--workdir", "W", "--guidance", "nan"], r"--guidance: expected a finite number, got nan"),
    (["sample", "--workdir", "W", "--guidance", "inf"], r"--guidance: expected a finite number, got inf"),
    (["sample", "--workdir", "W", "--batch-size", "0"], r"--batch-size: expected an integer >= 1, got 0"),
    (["sample", "--workdir", "W", "--seed", "-1"], r"--seed: expected an integer >= 0"),
    (["sample", "--workdir", "W", "--seed", str(2 ** 32)], r"--seed: expected a seed in \[0, 2\*\*32\)"),
    (["sample", "--workdir", "W", "--fractions", "1.5"], r"--fractions: expected a fraction in \[0, 1\], got 1.5"),
    (["sample", "--workdir", "W", "--stitch-mode", "step"], r"--stitch-mode goes with --stitch"),
    (["sample", "--workdir", "W", "--stitch", "W", "--fractions", "0.5", "--condition", "c.npz"],
     r"--condition: not available for stitched sampling"),
    (["sample", "--workdir", "W", "--out", "O.png"], r"samples.png: the output file must end in .npz"),
    (["sample", "--workdir", "W"], r"no checkpoint directory at .*/W/checkpoints: .*/W does not exist"),
    (["eval", "O.npz"], r"no samples file at .*/out/samples.npz"),
    (["sample"], r"sample needs --workdir"),
    (["eval", "W", "--num", "0"], r"--num: expected an integer >= 1"),
    (["stitch-sweep", "--small", "W", "--large", "W", "--fraction-step", "0"], r"expected a step in \[0.01, 1\]"),
    (["stitch-sweep", "--small", "W", "--large", "W", "--fractions", "-0.1"], r"expected a fraction in \[0, 1\]"),
    (["stitch-sweep", "--small", "W", "--large", "W", "--steps", "0"], r"--steps: expected an integer >= 1"),
    (["stitch-sweep", "--small", "W", "--large", "W", "--guidance", "nan"], r"--guidance: expected a finite"),
    (["stitch-sweep", "--small", "W", "--large", "W", "--solver", "rk9", "--out", "O"], r"solver='rk9'; expected one of"),
    (["stitch-pick", "O", "--budget", "0"], r"--budget: expected a number > 0"),
    (["stitch-pick", "O", "--seconds", "nan"], r"--seconds: expected a finite number"),
    (["stitch-pick", "O", "--budget", "0.5"], r"no results file at .*out"),
    (["guided-table", "--workdir", "W", "--num", "0"], r"--num: expected an integer >= 1"),
    (["guided-table", "--workdir", "W", "--guidance", "inf"], r"--guidance: expected a finite number"),
    # options a path would otherwise drop without a word
    (["sample", "--pretrained", "sdxl-turbo", "--prompt", "a", "--timesteps", "999", "499"],
     r"--timesteps: not for text-to-image"),
    (["sample", "--pretrained", "sdxl-turbo", "--prompt", "a", "--spacing", "quadratic"],
     r"--spacing: not for text-to-image"),
    (["sample", "--config", os.path.join(REPO, "configs", "stitch_dit_s_xl.py"), "--steps", "8", "--solver", "euler"],
     r"--steps, --solver: `sample --config` samples as the config's sample section says"),
    (["sample", "--config", os.path.join(REPO, "configs", "stitch_dit_s_xl.py"), "--guidance", "0",
      "--stitch-mode", "step"], r"--guidance, --stitch-mode: `sample --config` samples as the config's"),
    (["sample", "--pretrained", "sdxl-turbo", "--prompt", "a", "--stitch-mode", "step"],
     r"--stitch-mode: not for text-to-image"),
    (["codi-table", "--workdir", "W", "--spacing", "quadratc"], r"--spacing 'quadratc': expected one of lcm, quadratic"),
    (["codi-table", "--workdir", "W", "--solver", "ddim"], r"--solver 'ddim': the consistency rows sample with"),
]


@pytest.mark.parametrize("argv,message", ARGUMENTS, ids=[" ".join(a) for a, _ in ARGUMENTS])
def test_bad_arguments_are_named_and_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    paths = {"W": str(tmp_path / "W"), "O": str(out), "O.png": str(out / "samples.png"),
             "O.npz": str(out / "samples.npz")}
    argv = [paths.get(a, a) for a in argv]
    if argv[0] == "sample" and "--out" not in argv and "--workdir" in argv:
        argv += ["--out", str(out / "samples.npz")]
    err = refused(argv, capsys)
    assert re.search(message, err), err
    assert not out.exists() and not (tmp_path / "W").exists(), "a refused command wrote output"


TRAIN_CONFIG = [
    ("--config.train.steps=-5", r"--config.train.steps must be an integer >= 1, got -5"),
    ("--config.optim.lr=-1.0", r"--config.optim.lr must be > 0"),
    ("--config.optim.lr=nan", r"--config.optim.lr: expected float like 0.001, got 'nan'"),
    ("--config.optim.lr=0.0", r"--config.optim.lr must be > 0, got 0"),
    ("--config.optim.decay=exp", r"--config.optim.decay='exp'; expected one of"),
    ("--config.optim.b2=1.0", r"--config.optim.b2 must be in \[0, 1\)"),
    ("--config.optim.clip_norm=-1.0", r"--config.optim.clip_norm must be a number >= 0"),
    ("--config.train.ema_decay=1.0", r"--config.train.ema_decay must be in \[0, 1\)"),
    ("--config.train.keep=0", r"--config.train.keep must be an integer >= 1"),
    ("--config.train.nonfinite=ignore", r"--config.train.nonfinite='ignore'; expected one of"),
    ("--config.train.max_update_ratio=0", r"--config.train.max_update_ratio must be > 0 \(None: no divergence"),
    ("--config.data.batch_size=12", r"batch_size=12 does not split over the 8 data-parallel devices"),
    ("--config.loss.cond_drop_prob=2.0", r"--config.loss.cond_drop_prob must be in \[0, 1\]"),
    ("--config.sample.solver=rk9", r"--config.sample.solver='rk9'; expected one of"),
    ("--config.sample.steps=0", r"--config.sample.steps must be an integer >= 1"),
]
GUIDED = os.path.join(REPO, "configs", "digits_guided.py")
DISTILL_CONFIG = [
    ("--config.progressive.end_steps=64", r"end_steps=64 is more than start_steps=32"),
    ("--config.stage1.optim.lr=0.0", r"--config.stage1.optim.lr must be > 0"),
    ("--config.progressive.optim.b1=1.5", r"--config.progressive.optim.b1 must be in \[0, 1\)"),
    ("--config.train.log_every=0", r"--config.train.log_every must be an integer >= 1"),
]


# the distillations that train through the same checks (each recipe's train() calls them first)
OTHER_RECIPES = [os.path.join(REPO, "configs", f"digits_{name}.py") for name in ("lcm", "codi", "ladd")]
RECIPE_CONFIG = [
    ("--config.data.batch_size=12", r"batch_size=12 does not split over the 8 data-parallel devices"),
    ("--config.train.nonfinite=ignore", r"--config.train.nonfinite='ignore'; expected one of"),
]


CONFIG_CASES = ([("train", TEACHER, *c) for c in TRAIN_CONFIG] + [("distill", GUIDED, *c) for c in DISTILL_CONFIG]
                + [("distill", config, *c) for config in OTHER_RECIPES for c in RECIPE_CONFIG])


@pytest.mark.parametrize("command,config,override,message", CONFIG_CASES,
                         ids=[f"{c[0]} {os.path.basename(c[1])} {c[2]}" for c in CONFIG_CASES])
def test_bad_training_config_is_named_before_anything_is_written(command, config, override, message, tmp_path, capsys):
    err = refused([command, "--config", config, "--workdir", str(tmp_path / "run"), "--quiet", override], capsys)
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists(), "a refused training left a workdir behind"


# -- files a user hands in ------------------------------------------------------------------


def _zip_truncated(path):
    np.savez(path, images=np.zeros((4, 8, 8, 1), np.uint8))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


SAMPLE_FILES = [
    ("text renamed .npz", lambda p: open(p, "w").write("hello, I am text\n"), r"not an .npz archive: it is a text file"),
    ("0 bytes", lambda p: open(p, "wb").close(), r"is empty \(0 bytes\)"),
    ("truncated zip", _zip_truncated, r"damaged or truncated .npz"),
    ("a pickle", lambda p: open(p, "wb").write(pickle.dumps({"images": 1})), r"a Python pickle \(jdistill never unpickles"),
    ("a .npy", lambda p: np.save(open(p, "wb"), np.zeros(3)), r"a single .npy array, not an .npz"),
    ("object array", lambda p: np.savez(p, images=np.array([{"x": 1}], dtype=object)), r"holds Python objects"),
    ("no images", lambda p: np.savez(p, pictures=np.zeros((2, 8, 8, 1), np.uint8)), r"has no 'images' array"),
    ("float images", lambda p: np.savez(p, images=np.zeros((2, 8, 8, 1), np.float32)), r"must be uint8 .*to_uint8"),
    ("labels of the wrong length", lambda p: np.savez(p, images=np.zeros((4, 8, 8, 1), np.uint8),
                                                      labels=np.zeros(3, np.int64)), r"one integer per image"),
    ("labels out of range", lambda p: np.savez(p, images=np.zeros((4, 8, 8, 1), np.uint8),
                                               labels=np.full(4, 10)), r"labels' must be in 0..9"),
    ("no samples", lambda p: np.savez(p, images=np.zeros((0, 8, 8, 1), np.uint8)), r"holds no samples"),
]


@pytest.mark.parametrize("name,write,message", SAMPLE_FILES, ids=[c[0] for c in SAMPLE_FILES])
def test_samples_file_is_diagnosed_without_unsafe_advice(name, write, message, tmp_path, capsys):
    path = str(tmp_path / "samples.npz")
    write(path)
    err = refused(["eval", path], capsys)
    assert re.search(message, err), err
    assert "allow_pickle" not in err  # numpy's advice to unpickle is never passed on


def test_legacy_torch_pickle_is_refused_by_name(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    src = tmp_path / "legacy.pt"
    # a legacy (non-zip) checkpoint whose pickle names a class weights_only refuses
    torch.save({"w": torch.zeros(2), "opt": ml_collections.ConfigDict({"lr": 1.0})}, src,
               _use_new_zipfile_serialization=False)
    err = refused(["convert", str(src), str(tmp_path / "out")], capsys)
    assert re.search(r"legacy \(non-zip\) PyTorch pickle whose pickle needs ml_collections", err), err
    assert "weights_only=False" not in err and not (tmp_path / "out").exists()
    open(src, "wb").close()
    assert "is empty (0 bytes)" in refused(["convert", str(src), str(tmp_path / "out")], capsys)


def test_sampling_refuses_non_finite_output():
    """NaN samples became black uint8 images with exit 0; now nothing is written."""
    def nan_model(noise, cond, key):
        return noise * jnp.nan

    with pytest.raises(NonFiniteOutput, match="non-finite samples .* Nothing was written"):
        generate(nan_model, (8, 8, 1), None, num=4, batch_size=4)


# -- training: a tiny engine through stages.run -------------------------------------------


def _stage(steps, *, lr=0.1, ema=0.0, config_steps=6, seed=0):
    """w pulled toward 0 by clipped Adam on sum(w^2) * batch["scale"] (an optimizer state of tuples, as
    the recipes' chains have); config as a recipe would store it."""
    def loss(p, inputs, batch, rng):
        return jnp.sum(p["w"] ** 2) * batch["scale"][0] + 1e-3 * jax.random.normal(rng), {}

    engine = engine_lib.single(loss, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr)), ema_decay=ema or None)
    config = {"seed": seed, "optim": {"lr": lr}, "train": {"steps": config_steps, "ema_decay": ema}, "model": {"w": 4}}
    return stages.Stage("", steps, engine, lambda: {"student": {"w": jnp.arange(1.0, 5.0)}}, 1 + seed, config)


def _cfg(nonfinite="stop", ckpt_every=2):
    return ml_collections.ConfigDict({"train": {"ckpt_every": ckpt_every, "keep": 10, "log_every": 1,
                                                "sample_every": 0, "nonfinite": nonfinite}, "mesh": {}})


def _batches(scales):
    def batches(start):
        for s in scales[start:]:
            yield {"scale": np.full((8,), s, np.float32)}

    return batches


def _params(workdir, step=None):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    return np.asarray(ckpt.read_params("student", None, step=step)["w"]) if step else np.asarray(
        ckpt.read_params("student", None)["w"])


MESH = None


def _run(stage, workdir, cfg, scales, **kw):
    global MESH
    MESH = MESH or mesh_lib.make_mesh()
    return stages.run(stage, workdir, cfg, _batches(scales), mesh=MESH, progress=False, **kw)


def _all_checkpoints_finite(workdir):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    for step in ckpt.all_steps():
        for leaf in jax.tree.leaves(ckpt.read_params("student", None, step=step)):
            assert np.isfinite(leaf).all(), f"checkpoint {step} holds a non-finite value"
    return ckpt.all_steps()


def test_nonfinite_training_stops_by_name_or_skips_and_never_saves_nan(tmp_path):
    scales = [1.0, 1.0, 1.0, np.inf, 1.0, 1.0]  # the 4th update's loss and gradient are not finite
    stop = str(tmp_path / "stop")
    with pytest.raises(NonFiniteError, match=r"at step 4 .* Last good checkpoint: step 2 in"):
        _run(_stage(6), stop, _cfg("stop"), scales)
    assert _all_checkpoints_finite(stop)[-1] == 2  # (and step 1: Orbax always saves a run's first)
    # resumed from that last good checkpoint with nonfinite=skip (a free key): the bad update is counted and refused
    state = _run(_stage(6), stop, _cfg("skip"), scales)
    assert int(state.skipped) == 1 and int(state.step) == 6 and _all_checkpoints_finite(stop)[-2:] == [4, 6]
    np.testing.assert_array_equal(np.asarray(state.parts["student"].params["w"]), _params(stop))


def _damage(path, how):
    if how == "delete":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _files(step_dir):
    return sorted(os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir) for f in fs)


def _resume_after_damage(tmp_path, name, interrupted, rel, how, scales):
    """Damage ``rel`` of the latest step of a copy of ``interrupted``, resume to the end; (workdir, warnings)."""
    workdir = str(tmp_path / name)
    shutil.copytree(interrupted, workdir)
    latest = os.path.join(workdir, "checkpoints", "4")
    _damage(os.path.join(latest, rel), how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(_stage(6), workdir, _cfg(), scales)
    return workdir, [str(w.message) for w in caught if issubclass(w.category, DamagedCheckpointWarning)]


@pytest.fixture(scope="module")
def interrupted_and_full(tmp_path_factory):
    """A run stopped after step 4 (checkpoints 2, 4) and the same run uninterrupted to step 6."""
    root = tmp_path_factory.mktemp("damage")
    scales = [1.0] * 6
    _run(_stage(4), str(root / "interrupted"), _cfg(), scales)
    _run(_stage(6), str(root / "full"), _cfg(), scales)
    return str(root / "interrupted"), _params(str(root / "full")), scales


def _largest_data_file(step_dir):
    # Only the merged tree's files (state/d/) are read on every restore: the per-process tree's
    # root node (ocdbt.process_0/d/) is superseded by the merge, and can be the same size or a byte
    # larger, so picking by size alone damaged an unread file in about 1 run of 20.
    return max((f for f in _files(step_dir) if f.startswith("state/d/")),
               key=lambda f: os.path.getsize(os.path.join(step_dir, f)))


@pytest.mark.parametrize("how", ["truncate"])  # deleting, and every other file: the slow test below
def test_damaged_latest_checkpoint_falls_back_and_resumes_bit_identical(interrupted_and_full, tmp_path, how):
    interrupted, expected, scales = interrupted_and_full
    rel = _largest_data_file(os.path.join(interrupted, "checkpoints", "4"))
    workdir, warned = _resume_after_damage(tmp_path, how, interrupted, rel, how, scales)
    np.testing.assert_array_equal(_params(workdir), expected)
    assert any(re.search(rf"step 4 .*{re.escape(rel)}", w) for w in warned), warned
    # nothing deleted: the damaged step is kept beside, under another name
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.damaged"))


@pytest.mark.slow
def test_every_damaged_file_of_the_latest_checkpoint_falls_back(interrupted_and_full, tmp_path):
    interrupted, expected, scales = interrupted_and_full
    for i, rel in enumerate(_files(os.path.join(interrupted, "checkpoints", "4"))):
        for how in ("delete", "truncate"):
            workdir, warned = _resume_after_damage(tmp_path, f"{i}_{how}", interrupted, rel, how, scales)
            np.testing.assert_array_equal(_params(workdir), expected, err_msg=f"{how} {rel}")


def test_resume_that_changes_the_run_is_refused_or_recorded(interrupted_and_full, tmp_path):
    interrupted, _, scales = interrupted_and_full
    workdir = str(tmp_path / "run")
    shutil.copytree(interrupted, workdir)
    from jdistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim.lr: checkpoint 0.1 vs config 0.05; train.ema_decay: checkpoint "
                                          r"0.0 vs config 0.9.* --allow-inexact-resume"):
        _run(_stage(6, lr=0.05, ema=0.9), workdir, _cfg(), scales)
    state = _run(_stage(6, lr=0.05, ema=0.9), workdir, _cfg(), scales, allow_inexact=True)
    assert int(state.step) == 6 and "ema" in state.averages
    with open(os.path.join(workdir, "checkpoints", "6", "meta", "metadata")) as f:
        meta = json.load(f)
    record = meta["inexact_resumes"][0]
    assert record["step"] == 4 and "averages.ema" in record["fresh"] and len(record["changes"]) == 2


def test_an_inexact_resume_takes_the_new_seeds_stream_and_a_fallback_is_recorded_too(interrupted_and_full, tmp_path):
    """A seed changed with --allow-inexact-resume gives the run the new seed's random stream (the old
    one was restored and the change had no effect); a resume that falls back past a damaged step to
    one made with another config is announced and recorded, as any inexact resume."""
    from jdistill.train.state import raw_key

    interrupted, _, scales = interrupted_and_full
    workdir = str(tmp_path / "seed")
    shutil.copytree(interrupted, workdir)
    state = _run(_stage(6, seed=5), workdir, _cfg(), scales, allow_inexact=True)
    np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(raw_key(jax.random.key(6))))
    with open(os.path.join(workdir, "checkpoints", "6", "meta", "metadata")) as f:
        record = json.load(f)["inexact_resumes"][0]
    assert record["changes"] == ["seed: checkpoint 0 vs config 5"] and "rng" in record["fresh"]

    # step 2 made with lr 0.1, step 4 with 0.05 and damaged: the resume falls back to step 2, and the
    # record names what that step had (with lr 0.2, not what the damaged step had either)
    def fallback_records(name, lr):
        workdir = str(tmp_path / name)
        _run(_stage(2), workdir, _cfg(), scales)
        _run(_stage(4, lr=0.05), workdir, _cfg(), scales, allow_inexact=True)
        step4 = os.path.join(workdir, "checkpoints", "4")
        _damage(os.path.join(step4, _largest_data_file(step4)), "truncate")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            _run(_stage(6, lr=lr), workdir, _cfg(), scales, allow_inexact=True)
        with open(os.path.join(workdir, "checkpoints", "6", "meta", "metadata")) as f:
            return [(r["step"], r["changes"]) for r in json.load(f)["inexact_resumes"]]

    assert fallback_records("same", 0.05) == [(2, ["optim.lr: checkpoint 0.1 vs config 0.05"])]
    assert fallback_records("changed", 0.2) == [(2, ["optim.lr: checkpoint 0.1 vs config 0.2"])]

# -- the digits teacher through the CLI --------------------------------------------------

TINY = ["--config.model.hidden_size=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.data.batch_size=16", "--config.train.sample_every=0", "--config.optim.warmup=1",
        "--config.optim.decay=constant", "--config.train.steps=4", "--config.train.ckpt_every=1",
        "--config.train.log_every=1"]


@pytest.mark.slow
@pytest.mark.parametrize("lr", ["1e30", "1e6"])  # 1e6 under the config's clipping (clip_norm=1)
def test_teacher_with_exploding_lr_stops_by_name_and_keeps_good_checkpoints(lr, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    err = refused(["train", "--config", TEACHER, "--workdir", workdir, "--quiet", *TINY, f"--config.optim.lr={lr}"],
                  capsys)
    good = int(re.search(r"Last good checkpoint: step (\d+) in", err).group(1))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ckpt.latest_step() == good
    for step in ckpt.all_steps():
        state = ckpt.read_params("model", None, step=step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state)), f"step {step} is not finite"
    # the last good checkpoint samples finite images
    out = str(tmp_path / "s.npz")
    assert cli.main(["sample", "--workdir", workdir, "--num", "8", "--steps", "2", "--out", out]) == 0
    images = np.load(out)["images"]
    assert images.shape == (8, 8, 8, 1) and np.isfinite(images).all()
    resume = ["train", "--config", TEACHER, "--workdir", workdir, "--quiet", *TINY, "--config.optim.lr=1e-3",
              "--allow-inexact-resume"]
    # the first update at that lr is refused (over train.max_update_ratio times the params' norm; at 1e30
    # also non-finite), so the last good checkpoint is not diverged: training resumes from it at a sane
    # lr, default policy, to the end
    assert cli.main(resume) == 0
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ckpt.latest_step() == 4
    for step in ckpt.all_steps():
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(ckpt.read_params("model", None, step=step)))


@pytest.mark.parametrize("argv, message", [
    (["demo", "--workdir", "{file}", "teacher"], "is a file, not a folder"),
    (["train", "--config", TEACHER, "--workdir", "{file}/run"], "is a file, so no folder can be made under it"),
    (["sample", "--workdir", "{tmp}", "--out", "{file}/s.npz"], "is a file, so no folder can be made under it"),
    (["demo", "--workdir", "/proc/jdistill_nowhere", "teacher"], "cannot write into /proc"),
    (["convert", "{tmp}", "{file}/converted"], "is a file, so no folder can be made under it"),
])
def test_an_unwritable_output_is_named_before_any_work(argv, message, tmp_path, capsys):
    obstacle = tmp_path / "obstacle"
    obstacle.write_text("a file")
    argv = [a.format(file=obstacle, tmp=tmp_path) for a in argv]
    assert message in refused(argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obstacle"]  # nothing written
