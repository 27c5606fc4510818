"""CoDi: adapters that change nothing at init, conditional tasks derived from the data, the CoDi loss
against its formula with the target read as it is now, PE-CoDi leaving every backbone param
bit-identical, 8 devices == 1 device, and `jdistill distill` killed by SIGKILL resuming bit-identically
(then `jdistill sample --condition` and `jdistill eval` on its workdir)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_helpers import REPO, run_cli, sigkill_at_checkpoint

from jdistill import config as config_lib
from jdistill.data import conditions
from jdistill.denoiser import Denoiser
from jdistill.diffusion import schedules
from jdistill.diffusion.consistency import consistency_output
from jdistill.errors import InvalidArgument
from jdistill.models import adapters, dit, unet2d
from jdistill.objectives.codi import codi_loss
from jdistill.recipes import codi, conditional, runs, stages
from jdistill.recipes import teacher as teacher_lib
from jdistill.train import mesh as mesh_lib

TINY_TEACHER = ["--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
                "--config.data.batch_size=16", "--config.train.steps=2", "--config.train.sample_every=0",
                "--config.optim.warmup=1"]


def perturbed(params, scale=0.05, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _dit():
    return dit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _unet():
    return unet2d.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                              layers_per_block=1, norm_num_groups=4)


@pytest.mark.parametrize("backbone,kind", [(_dit, "gated"), (_dit, "controlnet"),
                                           pytest.param(_unet, "gated", marks=pytest.mark.slow)],  # a minute
                         ids=["dit-gated", "dit-controlnet", "unet-gated"])
def test_adapter_at_init_changes_nothing(backbone, kind):
    bb = backbone()
    from jdistill.recipes.common import init_params

    params = perturbed(init_params(bb, 0))  # a backbone whose zero-initialised layers are not zero
    net = adapters.Adapted(bb, adapters.make_adapter(kind, bb), 2)
    full = adapters.init_adapted(net, params, jax.random.key(4))
    x, t = jax.random.normal(jax.random.key(2), (3, 8, 8, 1)), jnp.asarray([3.0, 400.0, 990.0])
    c = jax.random.normal(jax.random.key(3), (3, 8, 8, 2))
    kw = {"class_labels": jnp.asarray([1, 2, 10])} if isinstance(bb, dit.DiT) else {}
    want = bb.apply({"params": params}, x, t, **kw)
    np.testing.assert_array_equal(net.apply({"params": full}, x, t, condition=c, **kw), want)
    # the same composite with a trained-looking adapter does read the condition
    moved = dict(full, adapter=perturbed(full["adapter"], 0.1, 5))
    assert float(jnp.abs(net.apply({"params": moved}, x, t, condition=c, **kw) - want).max()) > 1e-3
    if kind == "controlnet":  # the copy starts as the backbone's own first block
        np.testing.assert_array_equal(full["adapter"]["copy"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"],
                                      params["transformer_blocks_0"]["attn1"]["to_q"]["kernel"])



def test_a_controlnet_copy_deeper_than_the_dit_is_refused_by_name():
    bb = _dit()
    assert adapters.make_adapter("controlnet", bb, copy_depth=bb.depth).copy_depth == bb.depth  # all blocks
    for depth in (bb.depth + 1, -1):
        with pytest.raises(ValueError, match=f"adapter copy_depth {depth}: the ControlNet copies 1 to {bb.depth}"):
            adapters.make_adapter("controlnet", bb, copy_depth=depth)

def test_conditions_are_derived_from_the_images():
    x = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32)
    sr = conditions.make(conditions.parse("sr2"), x)
    np.testing.assert_allclose(sr[:, :2, :2].mean(axis=(1, 2)), x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-5)
    assert sr.shape == (6, 8, 8, 1) and np.all(sr[:, 0, 0] == sr[:, 1, 1])
    spec = conditions.parse("inpaint")
    a = conditions.make(spec, x, np.random.default_rng(1))
    b = conditions.make(spec, x, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    mask = (a[..., 1:] + 1) / 2
    assert a.shape == (6, 8, 8, 2) and np.all(mask.sum(axis=(1, 2, 3)) == 32)  # one half masked
    np.testing.assert_array_equal(a[..., :1] * (1 - mask), a[..., :1])
    np.testing.assert_array_equal(a[..., :1], x * (1 - mask))
    edges = conditions.make(conditions.parse("edges"), np.repeat(x, 3, axis=-1))
    assert edges.shape == (6, 8, 8, 1) and set(np.unique(edges)) <= {-1.0, 1.0}
    with pytest.raises(InvalidArgument, match="unknown condition"):
        conditions.parse("sr")


def test_condition_files(tmp_path):
    spec, shape = conditions.parse("sr2"), (8, 8, 1)
    low = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 1)).astype(np.uint8)
    np.savez(tmp_path / "low.npz", condition=low)
    got = conditions.read_condition_file(str(tmp_path / "low.npz"), spec, shape)
    np.testing.assert_allclose(got[:, ::2, ::2], low.astype(np.float32) / 127.5 - 1, rtol=1e-6)
    np.savez(tmp_path / "bad.npz", condition=np.zeros((5, 3, 3, 1), np.float32))
    with pytest.raises(InvalidArgument, match="reads conditions of shape"):
        conditions.read_condition_file(str(tmp_path / "bad.npz"), spec, shape)
    np.savez(tmp_path / "none.npz", images=low)
    with pytest.raises(InvalidArgument, match="no 'condition'"):
        conditions.read_condition_file(str(tmp_path / "none.npz"), spec, shape)


def test_codi_loss_formula_reads_the_target_and_the_teacher_option():
    bb = _dit()
    from jdistill.recipes.common import init_params

    prior = Denoiser.for_module(bb, schedules.CosineVP(), "v", perturbed(init_params(bb, 0)))
    net = adapters.Adapted(bb, adapters.make_adapter("gated", bb), 1)
    model = Denoiser.for_module(net, prior.schedule, "v")
    online = perturbed(adapters.init_adapted(net, prior.params, jax.random.key(1)), 0.02, 2)
    target = perturbed(online, 0.02, 3)
    x = jax.random.uniform(jax.random.key(4), (4, 8, 8, 1), minval=-1, maxval=1)
    batch = {"image": x, "condition": x * 0.5}
    null = {"class_labels": jnp.full((4,), 10)}

    def cond_fn(b):
        return {**null, "condition": b["condition"]}

    rng = jax.random.key(9)
    for ode in ("model", "teacher"):
        loss_fn = codi_loss(model, prior.replace(params=None), cond_fn=cond_fn, teacher_cond_fn=lambda b: null,
                            num_steps=10, guidance_weight=0.7, ode=ode)
        got, metrics = loss_fn(online, {"target": target, "teacher": prior.params}, batch, rng)
        # by hand: the same draws, the PF-ODE step by theta^- (or the prior), f at both ends
        k_t, k_eps, _ = jax.random.split(rng, 3)
        idx = jax.random.randint(k_t, (4,), 0, 10)
        t, s = (idx + 1) / 10, idx / 10
        eps = jax.random.normal(k_eps, x.shape)
        a, sig = model.alpha_sigma(t, x)
        z = a * x + sig * eps
        stepper = model.replace(params=target) if ode == "model" else prior
        pred = stepper.predict(z, t, cond_fn(batch) if ode == "model" else null)
        (a_s, s_s) = model.alpha_sigma(s, x)
        z_s = a_s * pred.x0 + s_s * pred.eps
        x0 = model.replace(params=online).predict(z, t, cond_fn(batch)).x0
        f_on = consistency_output(model.schedule, z, x0, t)
        f_tg = consistency_output(model.schedule, z_s, model.replace(params=target).predict(z_s, s, cond_fn(batch)).x0, s)
        want = jnp.mean((f_on - f_tg) ** 2) + 0.7 * jnp.mean((x0 - x) ** 2)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=ode)
        np.testing.assert_allclose(float(metrics["x_mse"]), float(jnp.mean((x0 - x) ** 2)), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("codi_teacher")
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_teacher.py"), TINY_TEACHER)
    teacher_lib.train(cfg, str(root / "teacher"), progress=False)
    return str(root / "teacher")


def codi_cfg(teacher_dir, *extra):
    return config_lib.load_config(os.path.join(REPO, "configs", "digits_codi.py"), [
        f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config=", "--config.data.batch_size=16",
        "--config.codi.steps=3", "--config.finetune.steps=2", "--config.lcm.steps=2",
        "--config.two_stage.finetune_steps=2", "--config.optim.warmup=1", "--config.train.ckpt_every=2", *extra])


def _steps(stage, task, mesh, n=3):
    s = stages.setup(stage, None, config_lib.from_dict({"ckpt_every": 100, "keep": 1}), mesh)
    state = s.state
    for k in range(n):
        state, _ = s.step_fn(state, stage.frozen, mesh_lib.global_batch(task.source[k], mesh))
    return jax.device_get(state)


def test_pe_codi_leaves_every_backbone_param_bit_identical(tiny_teacher):
    cfg = codi_cfg(tiny_teacher)
    task = conditional.make_task(cfg)
    stage = codi.codi_stage(cfg, task, "pe_codi")
    state = _steps(stage, task, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    start = stage.init()["student"]
    for a, b in zip(jax.tree.leaves(state.params()["backbone"]), jax.tree.leaves(start["backbone"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params()["adapter"]),
                                                          jax.tree.leaves(start["adapter"]))]
    assert max(moved) > 0  # the adapter did train
    # Adam's moments exist for the adapter alone: the backbone has no optimizer state to move it
    adam = next(s for s in jax.tree.leaves(state.parts["student"].opt_state,
                                           is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
    assert jax.tree.leaves(adam.mu["backbone"]) == []
    assert [np.shape(m) for m in jax.tree.leaves(adam.mu["adapter"])] == [np.shape(p) for p in
                                                                         jax.tree.leaves(start["adapter"])]


@pytest.mark.slow  # two meshes, two compilations of the CoDi step
def test_codi_8_devices_equal_1_device(tiny_teacher):
    cfg = codi_cfg(tiny_teacher)
    task = conditional.make_task(cfg)
    one = _steps(codi.codi_stage(cfg, task), task, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    eight = _steps(codi.codi_stage(cfg, task), task, mesh_lib.make_mesh(4, 2))
    for a, b in zip(jax.tree.leaves(eight.parts), jax.tree.leaves(one.parts), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # five CLI subprocesses (train, killed, resumed, sample, eval): minutes on 2 cores
def test_distill_killed_resumes_bit_identical_then_samples_conditions(tiny_teacher, tmp_path):
    args = ["distill", "--config", os.path.join(REPO, "configs", "digits_codi.py"), "--quiet",
            f"--config.teacher.workdir={tiny_teacher}", "--config.teacher.config=", "--config.data.batch_size=16",
            "--config.methods=('codi',)", "--config.codi.steps=12", "--config.optim.warmup=1",
            "--config.train.ckpt_every=4", "--config.train.keep=10"]
    full = run_cli([*args, "--workdir", str(tmp_path / "full")], devices=1)
    victim = run_cli([*args, "--workdir", str(tmp_path / "killed")], devices=1)
    # a generous wait: the subprocess imports, loads the teacher and compiles the CoDi step first
    done = sigkill_at_checkpoint(victim, tmp_path / "killed" / "codi" / "checkpoints", 4, timeout=900)
    assert done[-1] < 12, f"the run finished before it was killed: {done}"
    resumed = run_cli([*args, "--workdir", str(tmp_path / "killed")], devices=1)
    for p in (full, resumed):
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    for part_average in (None, "target", "ema"):
        a = runs.read_params(str(tmp_path / "full"), "codi", part="student", average=part_average)
        b = runs.read_params(str(tmp_path / "killed"), "codi", part="student", average=part_average)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    low = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 1)).astype(np.uint8)
    np.savez(tmp_path / "low.npz", condition=low)
    out_file = tmp_path / "out.npz"
    p = run_cli(["sample", "--workdir", str(tmp_path / "full" / "codi"), "--condition", str(tmp_path / "low.npz"),
                 "--steps", "2", "--out", str(out_file)], devices=1)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    with np.load(out_file) as f:
        assert f["images"].shape == (6, 8, 8, 1) and f["condition"].shape == (6, 8, 8, 1)
    # FD fits a Gaussian to 64-d features: at least 65 samples
    p = run_cli(["eval", str(tmp_path / "full" / "codi"), "--num", "80", "--steps", "2"], devices=1)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    scores = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert 0 < float(scores["psnr"]) < 100 and -1 <= float(scores["ssim"]) <= 1, scores
    assert np.isfinite(float(scores["fd"])) and 0 <= float(scores["class_acc"]) <= 1, scores
    # the table over two sampling seeds: each metric the mean of what seeds 0 and 1 give alone
    from jdistill.recipes import codi_table

    full = [str(tmp_path / "full")]
    seed0, seed1 = (codi_table.results_table(full, num=80, progress=False, seed=s) for s in (0, 1))
    two = codi_table.results_table(full, num=80, progress=False, seeds=2)
    assert [r["steps"] for r in two["rows"]] == [1, 2, 4] and two["seeds"] == [0, 1]
    for a, b, both in zip(seed0["rows"], seed1["rows"], two["rows"], strict=True):
        assert both["fd_per_seed"] == [a["fd"], b["fd"]] and both["fd"] == np.mean([a["fd"], b["fd"]])
        assert both["psnr"] == np.mean([a["psnr"], b["psnr"]]) and both["ssim"] == np.mean([a["ssim"], b["ssim"]])
    assert "metrics the mean over seeds 0, 1" in codi_table.format_results(two)


def test_the_config_names_the_consistency_samplers_spacing_and_other_solvers_refuse_one():
    from jdistill.recipes import consistency

    cfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_codi.py"))
    assert consistency.spacing_of(cfg, "codi") == "quadratic" and consistency.spacing_of(cfg, "lcm", "lcm") == "lcm"
    del cfg.sample["spacing"]  # a run written before the key samples as it did: LCMScheduler's picks
    assert consistency.spacing_of(cfg, "codi") == "lcm"
    assert consistency.spacing_of(cfg, "ddim") is None
    with pytest.raises(InvalidArgument, match="--spacing picks a consistency sampler's timesteps.*'ddim' takes none"):
        consistency.spacing_of(cfg, "ddim", "quadratic")
    cosine = schedules.CosineVP()
    with pytest.raises(InvalidArgument, match="unknown consistency spacing 'trailing'"):
        consistency.sampler_grid(cfg, cosine, "codi", 50, 4, "trailing")
    grid, steps, spacing = consistency.sampler_grid(cfg, cosine, "codi", 50)  # the config's: 4 steps, LCM's picks
    assert (steps, spacing) == (4, "lcm") and np.allclose(grid.t, [1.0, 0.76, 0.5, 0.26])
    # a timestep list sets the step count, and goes with no spacing and no other count
    grid, steps, spacing = consistency.sampler_grid(cfg, cosine, "codi", 50, None, None, [1.0, 0.5])
    assert (steps, spacing) == (2, None) and np.allclose(grid.t, [1.0, 0.5]) and np.allclose(grid.t_next, [0.5, 0.0])
    with pytest.raises(InvalidArgument, match="--timesteps and --spacing both choose"):
        consistency.sampler_grid(cfg, cosine, "codi", 50, None, "lcm", [1.0, 0.5])
    with pytest.raises(InvalidArgument, match=r"--steps 4 but 2 --timesteps \[1.0, 0.5\]"):
        consistency.sampler_grid(cfg, cosine, "codi", 50, 4, None, [1.0, 0.5])


def test_the_two_stage_baseline_samples_on_its_lcm_priors_skip_grid_and_codi_on_its_own():
    from jdistill.recipes import codi, consistency

    cfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_codi.py"))
    assert (cfg.lcm.num_steps, cfg.codi.num_steps) == (50, 20)  # the config trains them on different grids
    assert codi.skip_grid_steps("two_stage", cfg) == 50 and codi.skip_grid_steps("codi", cfg) == 20
    assert codi.skip_grid_steps("pe_codi", cfg) == 20
    grid = {stage: consistency.sampler_grid(cfg, schedules.CosineVP(), "lcm", codi.skip_grid_steps(stage, cfg))[0]
            for stage in ("two_stage", "codi")}
    np.testing.assert_allclose(grid["two_stage"].t, [1.0, 0.56, 0.24, 0.06], rtol=1e-6)  # on the 50-step grid
    np.testing.assert_allclose(grid["codi"].t, [1.0, 0.55, 0.25, 0.05], rtol=1e-6)  # on the 20-step grid


def test_an_unconditional_prior_reads_no_condition():
    """The photo prior has no class input: its task's condition is empty for training batches and
    for evaluation samples (the two-stage baseline's LCM stage of it stopped with a TypeError on
    class labels modulo None), and the prior runs on it."""
    from jdistill.recipes import tasks

    module = dit.DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=0)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))["params"]
    prior = Denoiser(params=params, schedule=schedules.CosineVP(), module=module, prediction="v")
    task = tasks.from_teacher(prior)
    batch = {"image": np.zeros((2, 8, 8, 3), np.float32)}  # photo_patches batches carry no label
    assert task.num_classes is None and task.cond_fn(batch) == {} and task.sample_cond(3) is None
    out = prior.output(jnp.zeros((2, 8, 8, 3)), jnp.full((2,), 0.5), task.cond_fn(batch))
    assert out.shape == (2, 8, 8, 3)


def test_fd_ratio_claims_carry_the_standard_error_of_the_per_seed_ratios():
    from jdistill.recipes import codi_table, evaluation

    def row(method, steps, per_seed):
        return {"task": "digits inpaint", "method": method, "steps": steps, "fd": float(np.mean(per_seed)),
                "psnr": 15.0, "s_per_1000": 50.0 / steps, "fd_per_seed": per_seed}

    ft50, codi4, pe4 = row("finetune", 50, [10.0, 12.0, 14.0]), row("codi", 4, [11.0, 12.0, 16.0]), \
        row("pe_codi", 4, [12.0, 15.0, 14.0])
    checks = {c["claim"]: c for c in codi_table.claims([ft50, codi4, pe4])}
    fd_claim = checks["CoDi 4 steps: FD at most 1.10x the 50-step conditional model's"]
    ratios = np.array([1.1, 1.0, 16.0 / 14.0])
    assert fd_claim["value"] == pytest.approx(13.0 / 12.0)  # the ratio of the means, not the mean ratio
    assert fd_claim["se"] == pytest.approx(ratios.std(ddof=1) / np.sqrt(3))
    assert checks["PE-CoDi 4 steps: FD at most 1.25x the 50-step conditional model's"]["se"] > 0
    assert f"| 1.083 ± {fd_claim['se']:.3f} | <= 1.10 | yes |" in evaluation.claims_table(list(checks.values()))
    # one seed: no spread to report, and the table reads as before
    single = codi_table.claims([{**r, "fd_per_seed": None} for r in (ft50, codi4)])
    assert all("se" not in c for c in single) and "±" not in evaluation.claims_table(single)


# --------------------------------------------------------------------------- CoDi in a collaboration


@pytest.fixture(scope="module")
def codi_run(tiny_teacher, tmp_path_factory):
    """A tiny inpainting CoDi run with its fine-tuned conditional model (the collaboration's teacher)."""
    workdir = str(tmp_path_factory.mktemp("codi_collab") / "inpaint")
    codi.train(codi_cfg(tiny_teacher, "--config.condition.kind=inpaint", "--config.methods=('finetune','codi')"),
               workdir, progress=False)
    return workdir


def test_a_codi_student_collaborates_with_its_runs_conditional_model(codi_run, tiny_teacher):
    """The student samples for condition images; the teacher (the run's fine-tuned model) refines each
    selected sample for its own condition: k = 0 is the student alone bit for bit, the refined rows are
    what the teacher's own sampler gives from the re-noised Z with those rows' conditions, the rest are
    the student's; tau's calibration draws the train split's conditions; mismatched pairs are refused."""
    from jdistill.metrics import oracles
    from jdistill.recipes import collab, collab_sweep
    from jdistill.sampling import collaborate
    from jdistill.sampling.generate import generate

    student = collab.load_student(os.path.join(codi_run, "codi"), steps=1, guidance_scale=1.5)
    assert student.condition_kind == "inpaint" and student.evaluations == 1
    assert student.settings["guidance_scale"] is None  # the teacher's CFG scale is not a CoDi model's input
    calib_conds = student.calibration_sampler.conditions["condition"]
    assert calib_conds.shape[1:] == student.sampler.conditions["condition"].shape[1:]
    assert len(calib_conds) != len(student.sampler.conditions["condition"])  # the train split, not the test one
    teacher, members = collab.load_teacher(os.path.join(codi_run, "finetune"), guidance_scale=1.5)
    assert teacher.passes == (1,) and members[0].condition_kind == "inpaint"
    oracle = oracles.get("digits_confidence")

    n = 16
    cond = {"condition": jnp.asarray(student.sampler.conditions["condition"][:n])}
    noise = jax.random.normal(jax.random.key(3), (n, *student.sampler.image_shape))
    key = jax.random.key(4)
    alone = student.sampler.fn(noise, cond, key)
    r = collaborate.Refinement("paper", 0.6, 3, "ddim")  # the student's own sample enters the refinement
    none = collab.collab_sampler(student, oracle, teacher, members, r, float("-inf"), buckets=4)
    np.testing.assert_array_equal(np.asarray(none.fn(noise, cond, key)), np.asarray(alone))

    scores = oracle.score(alone)  # the oracle sees the sample alone, never the condition's ground truth
    tau = float(np.median(scores))
    chosen = scores < tau
    # two training steps leave the zero-initialised adapter all but silent: perturbed, the teacher's
    # output depends on the condition, so a row refined with another row's condition would show
    member = dataclasses.replace(members[0], denoiser=members[0].denoiser.replace(
        params=perturbed(members[0].denoiser.params, 0.3)))
    loud = collaborate.Teacher((member.denoiser,), (None,))
    some = collab.collab_sampler(student, oracle, loud, [member], r, tau, buckets=4)
    got = np.asarray(some.fn(noise, cond, key))
    assert 0 < chosen.sum() < n and some.plan.budget()["refined_share"] == chosen.mean()
    np.testing.assert_array_equal(got[~chosen], np.asarray(alone)[~chosen])
    # the run's own conditional sampler on the paper's grid from sigma 0.6 (3 DDIM steps), on the whole
    # batch re-noised with the same Z, and the same teacher key
    task = conditional.make_task(runs.open_run(os.path.join(codi_run, "finetune")).stage_config("finetune"),
                                 with_data=False)
    schedule = member.denoiser.schedule
    own = codi.conditional_fn(task, member.denoiser, collaborate.paper_grid(schedule, 0.6, 3), "ddim")
    z = np.sqrt(0.4) * alone + np.sqrt(0.6) * jax.random.normal(
        jax.random.fold_in(key, collaborate.RENOISE_STREAM), noise.shape)
    rng = jax.random.fold_in(key, collaborate.TEACHER_STREAM)
    want = np.asarray(own(z, cond, rng))
    np.testing.assert_allclose(got[chosen], want[chosen], atol=1e-5)  # a sub-batch: GEMMs block differently
    swapped = np.asarray(own(z, {"condition": cond["condition"][::-1]}, rng))
    assert np.abs(swapped[chosen] - want[chosen]).max() > 1e-2

    calib = collab.calibrate(student, oracle, num=20, batch_size=10)
    assert calib.settings["student"]["calibration_conditions"] == "train split" and len(calib.scores) == 20

    def scores_on(sampler):  # what calibration draws, by hand, from a sampler's conditions
        images, _ = generate(sampler.fn, sampler.image_shape, None, num=20, batch_size=10, seed=calib.settings["seed"],
                             conditions=sampler.cycled(20))
        return np.sort(oracle.score(images))

    np.testing.assert_array_equal(calib.scores, scores_on(student.calibration_sampler))
    assert not np.array_equal(calib.scores, scores_on(student.sampler))  # not the evaluation's conditions

    # pairs that do not read the same conditions are refused by name
    tchr, class_members = collab.load_teacher(tiny_teacher, guidance_scale=1.5)
    with pytest.raises(InvalidArgument, match="inpaint condition images.*class labels"):
        collab.collab_sampler(student, oracle, tchr, class_members, r, tau)
    class_student = collab.load_student(tiny_teacher, steps=1, guidance_scale=1.5)
    with pytest.raises(InvalidArgument, match="class labels.*inpaint condition images"):
        collab.collab_sampler(class_student, oracle, teacher, members, r, tau)
    with pytest.raises(InvalidArgument, match="few-step model.*'finetune' stage"):
        collab.load_teacher(os.path.join(codi_run, "codi"), guidance_scale=1.5)

    # the sweep: PSNR beside FD, the teacher without CFG (one evaluation a step)
    result = collab_sweep.sweep(os.path.join(codi_run, "codi"), os.path.join(codi_run, "finetune"), budgets=(3,),
                                ks=(50,), sigmas=(0.6,), num=70, reference_steps=4, repeats=1, progress=False,
                                out_dir=os.path.join(codi_run, "..", "sweep"))
    assert not result["teacher_cfg"] and result["condition_kind"] == "inpaint"
    teacher_row = next(r for r in result["rows"] if r["strategy"] == "teacher" and r["budget"] == 3)
    assert teacher_row["teacher_steps"] == 3 and teacher_row["avg_evals"] == 3
    assert all(r["psnr"] is not None and 0 <= r["class_acc"] <= 1 for r in result["rows"])
    with open(os.path.join(codi_run, "..", "sweep", "results.md")) as f:
        table = f.read()
    assert "teacher alone (DDIM) |" in table and "| PSNR |" in table and "digits (inpaint)" in table
