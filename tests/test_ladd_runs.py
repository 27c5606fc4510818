"""LADD end to end: synthetic data written once and resumed exactly, `jdistill distill` killed
(SIGKILL) and run again ends bit-identical, the results table (with the progressive and consistency
students of the same teacher), and the SD3 config trained for a few steps on a tiny converted SD3
pipeline (feature shapes, finite losses)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from cli_helpers import REPO, run_cli, sigkill_at_checkpoint

from jdistill import config as config_lib
from jdistill.errors import InvalidArgument, MissingInput
from jdistill.metrics import oracles
from jdistill.recipes import collab, collab_sweep, consistency, guided, ladd, ladd_table, runs, synth, teacher
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train.loop import read_metrics

# every test here trains a teacher, generates data or runs the CLI: minutes on 2 cores
pytestmark = pytest.mark.slow


def ladd_args(teacher_dir, synth_dir, extra=()):
    return [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config=", f"--config.synth.dir={synth_dir}",
            "--config.synth.num=40", "--config.synth.shard_size=16", "--config.synth.batch_size=8",
            "--config.synth.steps=3", "--config.data.batch_size=8", "--config.discriminator.blocks=(0,)",
            "--config.discriminator.width=8", "--config.ladd.g_every=2", *extra]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 2-step tiny flow teacher and its synthetic data."""
    root = tmp_path_factory.mktemp("ladd")
    tcfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_flow_teacher.py"), [
        "--config.model.hidden_size=16", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.data.batch_size=16", "--config.train.steps=2", "--config.train.sample_every=0",
        "--config.optim.warmup=1"])
    teacher.train(tcfg, str(root / "teacher"), progress=False)
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "digits_ladd.py"),
                                 ladd_args(root / "teacher", root / "synth"))
    synth.generate(cfg, progress=False)
    return root, cfg


def test_synthetic_data_resume_exactly_and_refuse_other_settings(made):
    root, cfg = made
    directory = synth.synth_dir(cfg)
    m = synth.manifest(cfg)
    assert synth.num_shards(m) == 3 and m["condition"] == "label"
    images, labels = synth.load(directory, m)
    assert images.shape == (40, 8, 8, 1) and images.dtype == np.float32 and np.isfinite(images).all()
    np.testing.assert_array_equal(labels, np.arange(40) % 10)  # balanced classes
    # a run killed mid-shard leaves a temporary file and a missing shard: the rerun writes the same bytes
    before = {k: np.load(synth.shard_path(directory, k))["image"] for k in range(3)}
    os.remove(synth.shard_path(directory, 1))
    with open(synth.shard_path(directory, 1) + ".tmp.npz", "wb") as f:
        f.write(b"half a shard")
    with pytest.raises(MissingInput, match="1 of 3 shards missing"):
        synth.load(directory, m)
    synth.generate(cfg, progress=False)
    for k in range(3):
        np.testing.assert_array_equal(np.load(synth.shard_path(directory, k))["image"], before[k])
    other = config_lib.apply_overrides(cfg, ["--config.synth.guidance_scale=3.0"])
    with pytest.raises(InvalidArgument, match="guidance_scale: 1.5 there vs 3.0"):
        synth.generate(other, progress=False)
    # the training source reads them, labels and all
    batch = synth.task(cfg).source[0]
    assert batch["image"].shape == (8, 8, 8, 1) and batch["label"].dtype == np.int32


def test_distill_killed_then_resumed_is_bit_identical_and_the_table_reads_it(made, tmp_path):
    root, cfg = made
    args = ["distill", "--config", os.path.join(REPO, "configs", "digits_ladd.py"), "--quiet",
            *ladd_args(root / "teacher", root / "synth", ["--config.train.steps=12", "--config.train.ckpt_every=4",
                                                          "--config.train.keep=10", "--config.train.log_every=2"])]
    full = run_cli([*args, "--workdir", str(tmp_path / "full")], devices=1)
    victim = run_cli([*args, "--workdir", str(tmp_path / "killed")], devices=1)
    # two CLI runs compile at once: on a shared 2-core machine the first checkpoint takes minutes
    done = sigkill_at_checkpoint(victim, tmp_path / "killed" / "checkpoints", 4, timeout=1200)
    assert done[-1] < 12, f"the run finished before it was killed: {done}"
    resumed = run_cli([*args, "--workdir", str(tmp_path / "killed")], devices=1)
    for p in (full, resumed):
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    sessions = json.loads((tmp_path / "killed" / "timing.json").read_text())
    assert sessions[0]["first_step"] in done and sessions[0]["first_step"] >= 4
    a = ckpt_lib.Checkpointer(tmp_path / "full" / "checkpoints", read_only=True)
    b = ckpt_lib.Checkpointer(tmp_path / "killed" / "checkpoints", read_only=True)
    for part, average in (("student", None), ("student", "ema"), ("discriminator", None)):
        for x, y in zip(jax.tree.leaves(a.read_params(part, average)), jax.tree.leaves(b.read_params(part, average)),
                        strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"{part} {average}")
    metrics = read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    assert all(np.isfinite(r["discriminator/loss"]) and np.isfinite(r["student/loss"]) for r in metrics)
    assert metrics[-1]["nonfinite_skipped"] == 0

    # the results table over two "seeds" (the same run twice) and the teacher
    out = tmp_path / "table"
    result = ladd_table.results_table([str(tmp_path / "full"), str(tmp_path / "killed")], num=70,  # FD: > 64 features
                                      out_dir=str(out), teacher_steps=(2, 64), student_steps=(1, 4), progress=False)
    assert [(r["model"], r["steps"]) for r in result["rows"]][:2] == [("teacher", 2), ("teacher", 64)]
    assert len([r for r in result["rows"] if r.get("method") == "ladd"]) == 4
    spread = {s["steps"]: s for s in result["seeds"]}
    assert spread[4]["worst_over_best"] == pytest.approx(1.0)  # the two runs are bit-identical
    assert [c["target"] for c in result["checks"]] == ["<= 1.10", "<= 1.50", ">= 25", "<= 1.20"]
    assert {"results.json", "results.md", "teacher_64steps.png", "ladd_seed_0_run_0_4steps.png",
            "ladd_seed_0_run_1_4steps.png"} <= set(os.listdir(out))  # one seed twice: two pictures, not one
    assert result["guidance_scale"] == cfg.synth.guidance_scale  # the teacher rows: the CFG the students learnt
    with pytest.raises(InvalidArgument, match="takes LADD runs"):
        ladd_table.results_table([str(root / "teacher")], num=10, progress=False)
    # a LADD student samples unguided
    with pytest.raises(InvalidArgument, match="unguided"):
        ladd.make_sampler(runs.open_run(str(tmp_path / "full")), guidance_scale=2.0)
    # ... so as a collaboration's student it takes no guidance scale (the teacher's is for the teacher)
    student = collab.load_student(str(tmp_path / "full"), steps=2, guidance_scale=1.5)
    assert student.evaluations == 2 and student.settings["guidance_scale"] is None
    tchr, members = collab.load_teacher(str(root / "teacher"), guidance_scale=1.5)
    calib = collab.calibrate(student, oracles.get("digits_confidence"), num=16, batch_size=8)
    sampler = collab.collab_sampler(student, oracles.get("digits_confidence"), tchr, members,
                                    collab_sweep.refinement("paper", 0.6, 1, "euler"), calib.tau(50), buckets=2)
    images, _, _ = sampler.run(16, seed=0)
    assert images.shape == (16, 8, 8, 1) and 0.0 < sampler.plan.budget()["refined_share"] < 1.0


def test_the_table_holds_the_progressive_and_consistency_students_of_the_same_teacher(made, tmp_path):
    """configs/digits_flow_guided.py and configs/digits_flow_lcm.py distil the LADD run's flow teacher;
    the table scores each at 1, 2 and 4 steps through its own recipe's sampler, with the teacher's CFG
    scale as its guidance input, and refuses a student of another teacher."""
    root, cfg = made

    def teacher_args(teacher_dir):
        return [f"--config.teacher.workdir={teacher_dir}", "--config.teacher.config=", "--config.data.batch_size=8"]

    def lcm_config(teacher_dir):
        return config_lib.load_config(os.path.join(REPO, "configs", "digits_flow_lcm.py"),
                                      [*teacher_args(teacher_dir), "--config.lcm.steps=2", "--config.optim.warmup=1"])

    ladd.train(config_lib.apply_overrides(cfg, ["--config.train.steps=2"]), str(tmp_path / "ladd"), progress=False)
    consistency.train(lcm_config(root / "teacher"), str(tmp_path / "lcm"), progress=False)
    guided.train(config_lib.load_config(os.path.join(REPO, "configs", "digits_flow_guided.py"), [
        *teacher_args(root / "teacher"), "--config.stage1.steps=2", "--config.progressive.start_steps=4",
        "--config.progressive.train_steps.default=2", "--config.progressive.train_steps.2=2",
        "--config.progressive.train_steps.1=2"]), str(tmp_path / "guided"), progress=False)
    compare = {"progressive": str(tmp_path / "guided"), "consistency": str(tmp_path / "lcm")}
    result = ladd_table.results_table([str(tmp_path / "ladd")], compare=compare, num=70, teacher_steps=(64,),
                                      student_steps=(1, 2, 4), progress=False)
    rows = {(r["model"], r["steps"]): r for r in result["rows"]}
    assert list(rows) == [("teacher", 64), *[(m, n) for m in ("ladd seed 0", "progressive", "consistency")
                                             for n in (1, 2, 4)]]
    assert rows[("progressive", 4)]["mode"] == "guided, g=1.5" and rows[("consistency", 4)]["mode"] == "lcm, g=1.5"
    for n in (1, 2, 4):  # each step count through its own sampler (the guided run: the stage distilled for it)
        assert rows[("progressive", n)]["sampler"] == f"student (steps_{n:03d}) ddim {n} steps, g=1.5"
        assert f"{n} steps" in rows[("consistency", n)]["sampler"]
        assert np.isfinite(rows[("progressive", n)]["fd"]) and np.isfinite(rows[("consistency", n)]["fd"])
    assert result["compare"] == compare and "progressive" in ladd_table.format_results(result)
    # a student of another teacher (a copy of the same network, another workdir) is refused by name
    shutil.copytree(root / "teacher", tmp_path / "other_teacher")
    consistency.train(lcm_config(tmp_path / "other_teacher"), str(tmp_path / "lcm_other"), progress=False)
    with pytest.raises(InvalidArgument, match="the table compares students of ONE teacher"):
        ladd_table.results_table([str(tmp_path / "ladd")], compare={"consistency": str(tmp_path / "lcm_other")},
                                 num=70, progress=False)


def test_sd3_config_trains_a_few_steps_on_a_tiny_converted_sd3_pipeline(tmp_path):
    """configs/sd3_ladd.py on a tiny SD3 pipeline (diffusers, random weights, converted): synthetic
    latents for a prompt list, the MMDiT's image tokens at the tapped blocks (B, (H/p)(W/p), D) on the
    heads' grid, pooled-text-conditioned heads, finite losses on both parts, the student sampling."""
    import diffusers
    import transformers
    from test_mmdit import randomise as randomise_mmdit
    from test_text_to_image import IMAGE, clip_tower, save_and_convert, t5_tokenizer, vae, write_clip_tokenizer

    from jdistill.train import mesh as mesh_lib

    tok1, n1 = write_clip_tokenizer(tmp_path / "tok1")
    tok2, n2 = write_clip_tokenizer(tmp_path / "tok2", pad="!")
    tok3, n3 = t5_tokenizer(tmp_path / "tok3")
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=n3, d_model=48, d_kv=8, d_ff=64, num_layers=2,
                                                           num_heads=3, feed_forward_proj="gated-gelu"))
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=randomise_mmdit(diffusers.SD3Transformer2DModel(
            sample_size=IMAGE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=16 + 24,
            pos_embed_max_size=12).eval(), std=0.05, seed=30),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(31, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip_tower(n1, 32, 16, projection=16), tokenizer=tok1,
        text_encoder_2=clip_tower(n2, 33, 24, "gelu", projection=24), tokenizer_2=tok2,
        text_encoder_3=t5.eval(), tokenizer_3=tok3)
    save_and_convert(pipe, tmp_path)
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "sd3_ladd.py"), [
        f"--config.teacher.pipeline={tmp_path / 'jdistill'}", f"--config.synth.dir={tmp_path / 'synth'}",
        "--config.synth.num=8", "--config.synth.shard_size=4", "--config.synth.batch_size=4", "--config.synth.steps=2",
        "--config.synth.prompts=('a photo of a cat', 'a red dog', 'a dog')", "--config.data.batch_size=4",
        "--config.discriminator.blocks=(0, 1)", "--config.discriminator.width=8", "--config.train.steps=2",
        "--config.sample.prompts=('a cat',)", "--config.model.num_layers=2", "--config.model.remat=full"])
    synth.generate(cfg, progress=False)
    m = synth.manifest(cfg)
    images, captions = synth.load(synth.synth_dir(cfg), m)
    assert images.shape == (8, 8, 8, 4) and m["condition"] == "caption"
    np.testing.assert_array_equal(captions, np.arange(8) % 3)

    mesh = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])
    s, task = ladd.setup(cfg, None, mesh)
    obj = ladd.objective(cfg, task)
    batch = task.source[0]
    cond = task.cond_fn(batch)
    feats = task.teacher.features(batch["image"], np.full((4,), 0.5, np.float32), cond, blocks=obj.blocks)
    assert {k: v.shape for k, v in feats.items()} == {"block_0": (4, 16, 16), "block_1": (4, 16, 16)}
    assert obj.discriminator.grid == (4, 4) and obj.discriminator.pooled_dim == 40
    state = s.state
    for k in range(2):
        state, metrics = s.step_fn(state, task.teacher.params, mesh_lib.global_batch(task.source[k], mesh))
        metrics = jax.device_get(metrics)
        assert np.isfinite(metrics["discriminator/loss"]) and np.isfinite(metrics["student/loss"]), metrics
    assert int(state.count("student")) == 2 and int(state.skipped) == 0
    student = task.teacher.replace(params=state.params("student"))
    out = ladd.sample_fn(task, student, 2, float(cfg.ladd.time_shift))(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)),
                                                                        None, jax.random.key(1))
    assert np.isfinite(np.asarray(out)).all()
