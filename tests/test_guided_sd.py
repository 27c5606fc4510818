"""Guided distillation with a text-to-image teacher: the shipped SD1.5 (eps) and SD2.1 (v) configs,
run end to end on tiny converted pipelines over real captioned photographs."""

import os

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
from test_text_to_image import clip_tower, unet, vae, write_clip_tokenizer

from jdistill import config as config_lib
from jdistill.objectives.guided import with_guidance
from jdistill.recipes import guided, runs, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                   set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module", params=[("sd15_guided", "epsilon"), ("sd21_guided", "v_prediction")],
                ids=["sd15", "sd21"])
def run(request, tmp_path_factory):
    name, prediction = request.param
    root = tmp_path_factory.mktemp(name)
    tok, vocab = write_clip_tokenizer(root / "tok")
    diffusers.StableDiffusionPipeline(
        vae=vae(0), text_encoder=clip_tower(vocab, 1), tokenizer=tok, unet=unet(2, 32),
        scheduler=diffusers.DDIMScheduler(prediction_type=prediction, **SD_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "pipeline")
    cfg = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), [
        f"--config.teacher.pipeline={root / 'pipeline'}", f"--config.teacher.cache_dir={root / 'cache'}",
        "--config.data.name=photo_patches/32", "--config.data.resolution=16", "--config.data.max_examples=24",
        "--config.data.batch_size=8", "--config.stage1.steps=2", "--config.progressive.start_steps=1",
        "--config.progressive.train_steps.default=2", "--config.train.ckpt_every=2",
        "--config.sample.prompts=('a photo of cat', 'a red dog')"])
    workdir = root / "run"
    out = guided.train(cfg, str(workdir), progress=False)
    return cfg, workdir, out, prediction


def test_every_stage_trains_and_saves(run):
    cfg, workdir, out, _ = run
    assert list(out) == ["stage1", "steps_001"]
    for name in out:
        assert runs.read_config(str(workdir), name).stage.name == name


def test_teacher_is_the_pipelines_unet_and_the_student_starts_equal(run):
    cfg, _, _, prediction = run
    task = tasks.make_task(cfg)
    assert task.teacher.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    batch = task.source[0]
    assert batch["image"].shape == (8, 8, 8, 4)  # 16 px through the tiny VAE: 8x8 latents
    student = guided.student_template(task.teacher).replace(params=guided.init_student(cfg, task.teacher))
    z, t = jnp.asarray(batch["image"]), jnp.linspace(50, 900, 8)
    cond = task.cond_fn(batch)
    want = task.teacher.predict(z, t, cond).x0
    got = student.predict(z, t, with_guidance(cond, jnp.full((8,), 7.0))).x0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the teacher's CFG in stage 1 runs against the empty prompt's embeddings
    assert not np.allclose(np.asarray(task.uncond_fn(batch)["encoder_hidden_states"]),
                           np.asarray(cond["encoder_hidden_states"]))


def test_the_one_step_student_samples_images(run):
    _, workdir, _, _ = run
    sampler = guided.make_sampler(runs.open_run(str(workdir)), steps=1)
    images, labels, seconds = sampler.run(3, batch_size=3)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8 and labels is None
    assert "steps_001" in sampler.description
