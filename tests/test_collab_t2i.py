"""Text-to-image collaboration (recipes/collab_t2i.py, configs/collab_*.py) on tiny converted
pipelines: an SDXL base teacher, an LCM-SDXL-like student (w-embedding UNet, LCMScheduler), an SDXL
refiner teacher (text_encoder_2 alone, aesthetic-score time ids), an SDXL-Turbo-like student
(trailing Euler ancestral, no guidance) and a tiny CLIPModel as the oracle, all built from real
diffusers / transformers classes with random weights (tests/test_text_to_image.py's helpers).

The refinement of the selected latents equals diffusers' StableDiffusionXLImg2ImgPipeline given the
same latents and noise (its ``randn_tensor`` returning ours) to 1e-4, for the base and the refiner;
the configs run end to end, k = 0 giving the student pipeline's images unchanged."""

import os

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as sdxl_img2img
from test_clip_vision import VISION
from test_text_encoders import randomise
from test_text_to_image import IMAGE, PROMPTS, clip_tower, save_and_convert, unet, vae, write_clip_tokenizer

from jdistill import config as config_lib
from jdistill.images import to_uint8
from jdistill.recipes import collab_t2i, get_recipe
from jdistill.recipes.collab_calibration import CalibrationMismatch
from jdistill.sampling import collaborate
from jdistill.testing import assert_close, nchw, nhwc

# four tiny SDXL pipelines converted and sampled: minutes on 2 cores (`make test-slow`)
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
EULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
             timestep_spacing="leading")
POOLED, TIME = 16, 4


def sdxl(tok1, n1, tok2, n2, seed, scheduler, **unet_kw):
    return diffusers.StableDiffusionXLPipeline(
        vae=vae(20), text_encoder=clip_tower(n1, 21), text_encoder_2=clip_tower(n2, 22, 24, "gelu", POOLED),
        tokenizer=tok1, tokenizer_2=tok2, scheduler=scheduler, add_watermarker=False,
        unet=unet(seed, 32 + 24, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=TIME, projection_class_embeddings_input_dim=POOLED + 6 * TIME, **unet_kw))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("collab_t2i")
    tok1, n1 = write_clip_tokenizer(root / "tok1")
    tok2, n2 = write_clip_tokenizer(root / "tok2", pad="!")
    base = sdxl(tok1, n1, tok2, n2, 23, diffusers.EulerDiscreteScheduler(**EULER))
    lcm = sdxl(tok1, n1, tok2, n2, 24, diffusers.LCMScheduler.from_config(base.scheduler.config),
               time_cond_proj_dim=8)
    turbo = sdxl(tok1, n1, tok2, n2, 25, diffusers.EulerAncestralDiscreteScheduler.from_config(
        base.scheduler.config, timestep_spacing="trailing"))
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae(20), text_encoder=None, tokenizer=None, text_encoder_2=clip_tower(n2, 22, 24, "gelu", POOLED),
        tokenizer_2=tok2, scheduler=diffusers.EulerDiscreteScheduler(**EULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
        unet=unet(26, 24, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME,
                  projection_class_embeddings_input_dim=POOLED + 5 * TIME))
    out = {}
    for name, pipe in (("base", base), ("lcm", lcm), ("turbo", turbo), ("refiner", refiner)):
        save_and_convert(pipe, root / name)
        out[name] = (pipe, str(root / name / "jdistill"))
    tok, n = write_clip_tokenizer(root / "clip")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, eos_token_id=2, bos_token_id=0, pad_token_id=1),
        vision_config=VISION, projection_dim=20)
    torch.manual_seed(0)
    randomise(transformers.CLIPModel(config), 5).save_pretrained(root / "clip")
    return root, out


def config(name, pipes, **over):
    root, out = pipes
    student, teacher = ("lcm", "base") if name == "collab_lcm_sdxl" else ("turbo", "refiner")
    cfg = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), [
        f"--config.student.pipeline={out[student][1]}", f"--config.teacher.pipeline={out[teacher][1]}",
        f"--config.oracle.model={root / 'clip'}", "--config.oracle.name=clip_score", "--config.oracle.size=32",
        f"--config.cache_dir={root / 'cache'}"])
    cfg.sample.size = (IMAGE, IMAGE)
    cfg.sample.prompts = PROMPTS
    cfg.calibration.prompts = PROMPTS + ["a red cat", "a photo of a dog"]
    for key, value in over.items():  # section__field=value
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


@pytest.mark.parametrize("name,teacher", [("collab_lcm_sdxl", "base"), ("collab_sdxl_turbo", "refiner")])
def test_refinement_is_diffusers_img2img(pipes, name, teacher, monkeypatch):
    """The teacher's refinement of given latents, as the config runs it (img2img, the paper's strength and
    steps: 0.7 / 12 on the base, 0.3 / 4 on the refiner), against StableDiffusionXLImg2ImgPipeline."""
    cfg = config(name, pipes)
    collab = collab_t2i.TextCollab(cfg)
    strength, run = float(cfg.teacher.strength), int(cfg.teacher.steps)
    nominal = collaborate.nominal_steps(run, strength)
    assert collab.refinement.steps == nominal and collab.teacher_evaluations == 2 * run
    # the student reads its guidance as an input (LCM's w embedding) or takes none (Turbo): a pass a step
    assert collab.student_evaluations == int(cfg.student.steps)
    if name == "collab_lcm_sdxl":  # the base UNet as the student, at CFG 5: two passes a step
        cfg.student.pipeline, cfg.student.guidance_scale = cfg.teacher.pipeline, 5.0
        assert collab_t2i.TextCollab(cfg).student_evaluations == 2 * int(cfg.student.steps)
        cfg = config(name, pipes)
    latents = np.random.default_rng(3).standard_normal((len(PROMPTS), IMAGE // 2, IMAGE // 2, 4)).astype(np.float32)
    seed = 5
    refined, sel = collab.refine(latents, None, float("inf"), PROMPTS, seed)
    assert sel.rows_run == len(PROMPTS)
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), collaborate.RENOISE_STREAM), latents.shape)
    monkeypatch.setattr(sdxl_img2img, "randn_tensor", lambda shape, **kw: torch.from_numpy(nchw(np.asarray(noise))))
    pipe = pipes[1][teacher][0]
    if teacher == "base":  # the base's components in diffusers' img2img pipeline
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components, add_watermarker=False)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, image=torch.from_numpy(nchw(latents)), strength=strength, num_inference_steps=nominal,
                   guidance_scale=float(cfg.teacher.guidance_scale), output_type="latent").images
    assert_close(refined, nhwc(ref.numpy()), TOL, f"{teacher} refinement vs diffusers img2img")


def test_configs_run_end_to_end(pipes, tmp_path):
    """k = 0: the student pipeline's own images; k = 100: every sample refined and budgeted as such;
    the calibration file is written, reused, and refused for another student guidance."""
    cfg = config("collab_lcm_sdxl", pipes, calibration__file=str(tmp_path / "calib.json"), k=0.0)
    none = collab_t2i.run_config(cfg, seed=2)
    collab = collab_t2i.TextCollab(cfg)
    alone = np.concatenate([np.asarray(collab.student_batch(b, 2 + i)[1])
                            for i, b in enumerate(collab_t2i._batches(PROMPTS, 4))])
    np.testing.assert_array_equal(none["images"], to_uint8(alone))
    assert not none["refined"].any() and none["budget"]["avg_evals"] == 4
    assert os.path.isfile(tmp_path / "calib.json")

    cfg.k = 100.0
    out = get_recipe(cfg).sample_config(cfg, str(tmp_path / "all.npz"))
    with np.load(out["npz"]) as f:
        assert f["refined"].all() and f["images"].shape == (len(PROMPTS), IMAGE, IMAGE, 3)
    assert "100% refined" in out["description"] and "28.00 evaluations" in out["description"]  # 4 + 12 x 2

    cfg.student.guidance_scale = 4.0
    with pytest.raises(CalibrationMismatch, match="guidance_scale"):
        collab_t2i.run_config(cfg)

    turbo = collab_t2i.run_config(config("collab_sdxl_turbo", pipes, k=50.0), seed=1)
    assert turbo["budget"]["teacher_evaluations_per_refined"] == 8 and 0 < turbo["refined"].sum() <= len(PROMPTS)
