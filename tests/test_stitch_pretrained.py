"""The shipped pretrained-pair stitch configs on tiny converted models: DiT-S/2 -> DiT-XL/2 from
original-layout .pt files (and a diffusers VAE), BK-SDM-tiny -> SD1.5 from pipeline folders.
At fraction 0 a config's output is the large model's own sampling; in between, both run."""

import functools
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from test_dit import RefDiT, randomise
from test_text_to_image import IMAGE, clip_tower, unet, vae, write_clip_tokenizer

from jdistill import cli
from jdistill import config as config_lib
from jdistill.convert.pretrained import load_pretrained
from jdistill.denoiser import Denoiser, NullClass
from jdistill.diffusion import schedules
from jdistill.diffusion.timesteps import make_grid
from jdistill.images import to_uint8
from jdistill.pipelines import TextToImage
from jdistill.recipes import stitch_pretrained as stitch_lib
from jdistill.sampling import samplers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name, *overrides):
    return config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), list(overrides))


@pytest.fixture(scope="module")
def dit_pair(tmp_path_factory):
    """Two original-layout DiTs at DiT-S width (384, 6 heads: the width fixes the head count),
    depths 1 and 2, 4x4 latents, 10 classes, learned sigma; plus a tiny SD-style VAE folder."""
    root = tmp_path_factory.mktemp("dit_pair")
    for name, depth, seed in (("small.pt", 1, 0), ("large.pt", 2, 1)):
        ref = randomise(RefDiT(4, 2, 4, 384, depth, 6, 10, True).eval(), std=0.05, seed=seed, skip=("pos_embed",))
        torch.save({"model": ref.state_dict(), "ema": ref.state_dict()}, root / name)
    vae(2, latent_channels=4).save_pretrained(root / "vae")
    return root


def dit_config(root, *extra):
    return config("stitch_dit_s_xl", f"--config.models_dir={root}", "--config.small.checkpoint=small.pt",
                  "--config.large.checkpoint=large.pt", "--config.vae=vae", f"--config.cache_dir={root / 'cache'}",
                  "--config.sample.steps=10", "--config.sample.labels=(1, 5, 7)", *extra)


def denoiser_by_hand(root, name):
    """A converted DiT of the pair as a Denoiser with every field written out: DiT's linear betas,
    eps with a learned variance (8 channels out for 4 in), the null class 10 for guidance."""
    loaded = load_pretrained(str(root / name), cache_dir=str(root / "cache"))
    assert loaded.module.num_classes == 10 and loaded.module.output_channels == 8
    return Denoiser(params=loaded.params, schedule=schedules.DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02),
                    module=loaded.module, prediction="eps", learned_variance=True, null_cond=NullClass(10))


def decode_by_hand(root, z):
    """The VAE's decoder on z / scaling_factor (SD's VAE has no shift), as uint8."""
    vae = load_pretrained(str(root / "vae"), cache_dir=str(root / "cache"))
    decoded = vae.module.apply({"params": vae.params}, z / vae.module.scaling_factor, method="decode")
    return to_uint8(np.clip(np.asarray(decoded), -1, 1))


@functools.partial(jax.jit, static_argnames=("split",))
def two_segments(small, large, noise, labels, key, split):
    """DDIM, 10 steps, CFG 1.5: the small DiT for grid steps [0, split), the large one for the rest."""
    grid = make_grid(large.schedule, 10, "ddim")
    cond = {"class_labels": labels}
    state = samplers.init_state(noise)
    state = samplers.run_steps(small, state, grid, 0, split, rng=key, solver="ddim", cond=cond, guidance_scale=1.5)
    return samplers.run_steps(large, state, grid, split, 10, rng=key, solver="ddim", cond=cond,
                              guidance_scale=1.5).z


def test_dit_pair_at_fraction_zero_is_the_large_model(dit_pair):
    cfg = dit_config(dit_pair)
    images, labels, desc = stitch_lib.run_config(cfg, fraction=0.0, seed=3)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8 and list(labels) == [1, 5, 7]

    # the large DiT alone, by hand: same noise, sampler, guidance and VAE decode
    den = denoiser_by_hand(dit_pair, "large.pt")
    assert den.module.depth == 2
    key_noise, key_steps = jax.random.split(jax.random.key(3))
    noise = jax.random.normal(key_noise, (3, 4, 4, 4))
    z = two_segments(den, den, noise, np.array([1, 5, 7], np.int32), key_steps, split=0)
    np.testing.assert_array_equal(images, decode_by_hand(dit_pair, z))


def test_dit_pair_from_the_command_line(dit_pair, tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = ["sample", "--config", os.path.join(REPO, "configs", "stitch_dit_s_xl.py"), "--out", str(out)]
    argv += [f"--config.models_dir={dit_pair}", "--config.small.checkpoint=small.pt",
             "--config.large.checkpoint=large.pt", "--config.vae=vae", f"--config.cache_dir={dit_pair / 'cache'}",
             "--config.sample.steps=10", "--config.fraction=0.5"]
    # the config's ImageNet labels do not exist in a 10-class model: refused by name
    assert cli.main(argv) == 2
    assert "outside the 10 classes" in capsys.readouterr().err
    assert cli.main(argv + ["--config.sample.labels=(0, 3, 9)", "--num=5"]) == 0
    with np.load(out) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (5, 8, 8, 3) and list(labels) == [0, 3, 9, 0, 3]
    assert out.with_suffix(".png").is_file()

    # by hand (the CLI's seed 0): the small DiT takes the steps whose timestep t / T >= 1 - 0.5
    grid_t = np.asarray(make_grid(schedules.DiscreteVP.from_betas("linear", 1000, 1e-4, 0.02), 10, "ddim").t)
    split = int(np.sum(grid_t / 1000 >= 0.5))
    assert split == 5 and list(grid_t[:6]) == [900, 800, 700, 600, 500, 400]
    key_noise, key_steps = jax.random.split(jax.random.key(0))
    noise = jax.random.normal(key_noise, (5, 4, 4, 4))
    small, large = denoiser_by_hand(dit_pair, "small.pt"), denoiser_by_hand(dit_pair, "large.pt")
    z = two_segments(small, large, noise, labels.astype(np.int32), key_steps, split=split)
    np.testing.assert_array_equal(images, decode_by_hand(dit_pair, z))
    # both models mattered: either one alone gives other images
    for den in (small, large):
        alone = decode_by_hand(dit_pair, two_segments(den, den, noise, labels.astype(np.int32), key_steps, split=0))
        assert np.abs(alone.astype(int) - images.astype(int)).max() > 8


@pytest.fixture(scope="module")
def sd_pair(tmp_path_factory):
    """A tiny SD1.5-like pipeline and a BK-SDM-like one: same text encoder and VAE weights, a
    smaller UNet (fewer layers per block), as BK-SDM-tiny is to SD1.5."""
    root = tmp_path_factory.mktemp("sd_pair")
    tok, vocab = write_clip_tokenizer(root / "tok")
    text, ae = clip_tower(vocab, 0), vae(1)
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for name, unet_kw, seed in (("sd15", dict(layers_per_block=2), 2), ("bksdm", dict(layers_per_block=1), 3)):
        diffusers.StableDiffusionPipeline(vae=ae, text_encoder=text, tokenizer=tok, unet=unet(seed, 32, **unet_kw),
                                          scheduler=sched, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False).save_pretrained(root / name)
    return root


def sd_config(root, *extra):
    return config("stitch_bksdm_sd15", f"--config.models_dir={root}", "--config.small.pipeline=bksdm",
                  "--config.large.pipeline=sd15", f"--config.cache_dir={root / 'cache'}", "--config.sample.steps=6",
                  f"--config.sample.size=({IMAGE}, {IMAGE})", "--config.sample.prompts=('a photo of a cat', 'a red dog')",
                  *extra)


def test_sd_pair_at_fraction_zero_is_the_large_pipeline(sd_pair):
    cfg = sd_config(sd_pair)
    images, prompts, _ = stitch_lib.run_config(cfg, fraction=0.0, seed=5)
    large = TextToImage.from_pretrained(sd_pair / "sd15", cache_dir=sd_pair / "cache")
    key_noise, _ = jax.random.split(jax.random.key(5))
    noise = jax.random.normal(key_noise, (2, IMAGE // 2, IMAGE // 2, 4))
    alone = large(list(prompts), num_steps=6, guidance_scale=7.5, latents=noise, solver="ddim", output_type="float")
    np.testing.assert_array_equal(images, to_uint8(alone))


def test_sd_pair_step_mode_runs_both_unets(sd_pair):
    cfg = sd_config(sd_pair)
    mixed, _, desc = stitch_lib.run_config(cfg, seed=5)  # fraction 0.4, step mode: 2 of 6 steps small
    only_large, _, _ = stitch_lib.run_config(cfg, fraction=0.0, seed=5)
    assert "step mode" in desc and mixed.shape == only_large.shape
    assert np.abs(mixed.astype(int) - only_large.astype(int)).max() > 0  # the small UNet changed the early steps
