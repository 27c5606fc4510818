"""LCM and CoDi with text-to-image teachers: the shipped SD1.5 (eps) and SD2.1 (v) configs run end to
end on tiny converted pipelines over real captioned photographs; the LCM student starts as the
teacher with LCM's w embedding, CoDi's ControlNet adapter leaves the UNet unchanged at init."""

import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_guided_sd import SD_SCHEDULE
from test_text_to_image import clip_tower, unet, vae, write_clip_tokenizer

from jdistill import config as config_lib
from jdistill.models import layers
from jdistill.recipes import codi, conditional, consistency, runs, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--config.data.name=photo_patches/32", "--config.data.resolution=16", "--config.data.max_examples=16",
        "--config.data.batch_size=8", "--config.train.ckpt_every=2", "--config.optim.warmup=1",
        "--config.sample.prompts=('a photo of cat', 'a red dog')"]


@pytest.fixture(scope="module", params=[("sd15", "epsilon"), ("sd21", "v_prediction")], ids=["sd15", "sd21"])
def pipeline(request, tmp_path_factory):
    name, prediction = request.param
    root = tmp_path_factory.mktemp(name)
    tok, vocab = write_clip_tokenizer(root / "tok")
    # a mid block: the ControlNet adds a residual there
    diffusers.StableDiffusionPipeline(
        vae=vae(0), text_encoder=clip_tower(vocab, 1), tokenizer=tok,
        unet=unet(2, 32, mid_block_type="UNetMidBlock2DCrossAttn"),
        scheduler=diffusers.DDIMScheduler(prediction_type=prediction, **SD_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "pipeline")
    return name, root, prediction


def _overrides(root):
    return [f"--config.teacher.pipeline={root / 'pipeline'}", f"--config.teacher.cache_dir={root / 'cache'}", *DATA]


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory):
    """A tiny SDXL base pipeline (two text encoders, pooled text and time ids into the UNet)."""
    from test_collab_t2i import EULER, sdxl

    root = tmp_path_factory.mktemp("sdxl")
    tok1, n1 = write_clip_tokenizer(root / "tok1")
    tok2, n2 = write_clip_tokenizer(root / "tok2", pad="!")
    # a mid block, as SDXL's: the ControlNet adds a residual there
    sdxl(tok1, n1, tok2, n2, 23, diffusers.EulerDiscreteScheduler(**EULER),
         mid_block_type="UNetMidBlock2DCrossAttn").save_pretrained(root / "pipeline")
    return root


def _lcm_student_starts_as_the_teacher_trains_and_samples(cfg, workdir, prediction):
    task = tasks.make_task(cfg)
    assert task.teacher.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    student = consistency.student_template(task.teacher)
    assert student.module.time_cond_proj_dim == 256
    student = student.replace(params=consistency.init_student(task.teacher, 0))
    batch = task.source[0]
    z, t, cond = jnp.asarray(batch["image"]), jnp.asarray([50, 300, 600, 900] * 2), task.cond_fn(batch)
    w_emb = layers.guidance_scale_embedding(jnp.full((8,), 8.0), 256)
    np.testing.assert_array_equal(np.asarray(student.predict(z, t, {**cond, "timestep_cond": w_emb}).x0),
                                  np.asarray(task.teacher.predict(z, t, cond).x0))
    out = consistency.train(cfg, str(workdir), progress=False)
    assert list(out) == ["lcm"]
    sampler = consistency.make_sampler(runs.open_run(str(workdir)), steps=2)
    images, _, _ = sampler.run(2, batch_size=2)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


@pytest.mark.slow  # tiny SD pipelines, trained and sampled: minutes on 2 cores
def test_lcm_student_starts_as_the_teacher_trains_and_samples(pipeline):
    name, root, prediction = pipeline
    cfg = config_lib.load_config(os.path.join(REPO, "configs", f"{name}_lcm.py"),
                                 [*_overrides(root), "--config.lcm.steps=2"])
    _lcm_student_starts_as_the_teacher_trains_and_samples(cfg, root / "lcm", prediction)


@pytest.mark.slow  # a tiny SDXL pipeline, trained and sampled
def test_sdxl_lcm_student_starts_as_the_teacher_trains_and_samples(sdxl_pipeline):
    """configs/sdxl_lcm.py: the batch's conditioning carries SDXL's nested added_cond_kwargs (pooled
    text, time ids) through the caption table, on an fsdp=2 mesh as the config shards its state."""
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "sdxl_lcm.py"),
                                 [*_overrides(sdxl_pipeline), "--config.lcm.steps=2", "--config.mesh.fsdp=2"])
    _lcm_student_starts_as_the_teacher_trains_and_samples(cfg, sdxl_pipeline / "lcm", "epsilon")


def _codi_controlnet_starts_as_the_unet_trains_and_samples(cfg, workdir):
    task = conditional.make_task(cfg)
    params = task.init_params(0)
    batch = task.source[0]
    assert batch["condition"].shape == (8, 16, 16, 3)  # sr4 of the 16 px images, in pixels
    z, t = jnp.asarray(batch["image"]), jnp.asarray([50, 300, 600, 900] * 2)
    w_emb = layers.guidance_scale_embedding(jnp.full((8,), 7.5), 256)
    got = task.model.replace(params=params).predict(z, t, {**task.cond_fn(batch), "timestep_cond": w_emb}).x0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(task.teacher.predict(z, t, task.prior_cond_fn(batch)).x0))
    out = codi.train(cfg, str(workdir), progress=False)
    assert list(out) == ["codi", "pe_codi"]
    before = params["backbone"]
    after = runs.read_params(str(workdir), "pe_codi", part="student", average=None)["backbone"]
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sampler = codi.make_sampler(runs.open_run(str(workdir / "codi")), steps=2)
    images, _, _ = sampler.run(3, batch_size=3)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8


CODI = ["--config.codi.steps=2", "--config.methods=('codi', 'pe_codi')",
        "--config.adapter.conditioning_embedding_out_channels=(4, 8)"]


@pytest.mark.slow  # tiny SD pipelines, trained and sampled: minutes on 2 cores
def test_codi_controlnet_starts_as_the_unet_trains_and_samples(pipeline):
    name, root, _ = pipeline
    cfg = config_lib.load_config(os.path.join(REPO, "configs", f"{name}_codi.py"), [*_overrides(root), *CODI])
    _codi_controlnet_starts_as_the_unet_trains_and_samples(cfg, root / "codi")


@pytest.mark.slow  # a tiny SDXL pipeline, trained and sampled
def test_sdxl_codi_controlnet_starts_as_the_unet_trains_and_samples(sdxl_pipeline):
    """configs/sdxl_codi.py: the ControlNet copied from SDXL's UNet reads the pooled text and time ids
    (its "text_time" embedding) as the UNet does; remat (the config's) leaves the function unchanged;
    state on an fsdp=2 mesh as the config shards it."""
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "sdxl_codi.py"),
                                 [*_overrides(sdxl_pipeline), *CODI, "--config.mesh.fsdp=2"])
    assert cfg.model.remat == "full"
    _codi_controlnet_starts_as_the_unet_trains_and_samples(cfg, sdxl_pipeline / "codi")
