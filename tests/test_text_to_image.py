"""Text-to-image pipelines against diffusers' (fp32): the same prompts, negative prompts and
initial latents through a tiny diffusers pipeline and through jdistill's, converted from the
folder the diffusers pipeline saved.

Each pipeline is built from real component classes at tiny sizes (CLIP / T5 towers, UNet or
SD3 transformer, VAE) with every weight re-drawn at random, and tokenizers written offline
from a small vocabulary; ``save_pretrained`` writes the pipeline folder, ``jdistill convert``
converts it, :meth:`TextToImage.from_pretrained` loads the result. Compared: the prompt
embeddings (``encode_prompt``), the final latents (diffusers' ``output_type="latent"``) and the
decoded images (``output_type="np"``), all to <= 1e-4 relative to the tensor's scale.
Cases: SD 1.x with DDIM and DPM-Solver++ 2M, an SD 2.x-like v-prediction model, SDXL with its
EulerDiscreteScheduler and zeroed negative embeddings, SD3 with FlowMatchEuler (shift 3).
Then the scheduler-config mapping against diffusers' schedulers' own timesteps, and the
configs it refuses.
"""

import dataclasses
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_mmdit import randomise as randomise_mmdit
from test_text_encoders import randomise as randomise_text
from test_unet_cond import randomize_

from jdistill.convert import pretrained
from jdistill.pipelines import TextToImage, scheduling
from jdistill.sampling import samplers
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
TOKENS = 16  # CLIP tokenizers' model_max_length (and the towers' positions)
T5_TOKENS = 8  # SD3's max_sequence_length
IMAGE = 16  # pixels; the VAEs halve once: 8 x 8 latents
STEPS = 6
WORDS = ("a", "photo", "of", "cat", "dog", "blurry", "red")
PROMPTS = ["a photo of a cat", "a red dog"]
NEGATIVE = ["blurry", "a photo of a dog"]
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


# ------------------------------------------------------------------------------- components


def write_clip_tokenizer(folder, pad="<|endoftext|>"):
    """vocab.json + merges.txt of WORDS (each built by left-to-right merges, the last piece with
    CLIP's end-of-word mark), start / end of text last (end of text the largest id, which SD's
    legacy pooling rule relies on). ``pad="!"`` pads as OpenCLIP's tokenizers (SD 2.x, SDXL's
    tokenizer_2) do, with id 0."""
    letters = sorted(set("".join(WORDS)))
    pieces = (["!", "!</w>"] if pad == "!" else []) + letters + [c + "</w>" for c in letters]
    vocab = {t: i for i, t in enumerate(pieces)}
    merges = []
    for word in WORDS:
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + "</w>" if i == len(word) - 1 else ch
            merges.append(f"{prefix} {piece}")
            prefix += piece
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=TOKENS, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token=pad, unk_token="<|endoftext|>")))
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True), len(vocab)


def t5_tokenizer(folder):
    pieces = [f"▁{w}" for w in WORDS] + ["▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in pieces]
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True), len(vocab)


def clip_tower(vocab_size, seed, hidden=32, act="quick_gelu", projection=None):
    """SD's towers keep the legacy eos_token_id 2 of their configs (pooling at the largest id)."""
    cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TOKENS,
                                      hidden_act=act, eos_token_id=2, projection_dim=projection or hidden)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomise_text(cls(cfg), seed)


def vae(seed, **kw):
    cfg = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=IMAGE,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return randomize_(diffusers.AutoencoderKL(**{**cfg, **kw}), seed=seed).eval()


def unet(seed, cross_attention_dim, **kw):
    """One level of cross-attention down / up blocks and no mid block: the UNet's own parity over
    every block type is tests/test_unet_cond.py's, and a small graph compiles fast."""
    cfg = dict(sample_size=IMAGE // 2, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
               cross_attention_dim=cross_attention_dim, attention_head_dim=2, mid_block_type=None,
               down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    return randomize_(diffusers.UNet2DConditionModel(**{**cfg, **kw}), seed=seed).eval()


def save_and_convert(pipe, root, direct=False):
    """The diffusers pipeline's folder, converted by ``jdistill convert`` and loaded as a
    TextToImage; ``direct``: loaded from the diffusers folder itself (each component converted
    into a conversion cache on first use)."""
    pipe.save_pretrained(root / "diffusers")
    if direct:
        return TextToImage.from_pretrained(root / "diffusers", cache_dir=root / "cache")
    pretrained.convert(root / "diffusers", root / "jdistill")
    return TextToImage.from_pretrained(root / "jdistill")


def sd_pipeline(root, seed, *, tower, pad, unet_kw, scheduler, direct=False):
    tok, vocab_size = write_clip_tokenizer(root / "tok", pad)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae(seed), text_encoder=tower(vocab_size), tokenizer=tok, unet=unet(seed + 1, 32, **unet_kw),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, save_and_convert(pipe, root, direct)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return sd_pipeline(tmp_path_factory.mktemp("sd1"), 0, tower=lambda n: clip_tower(n, 1), pad="<|endoftext|>",
                       unet_kw={}, scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER))


def latents_for(t2i, seed=0):
    """Initial unit noise for PROMPTS, NHWC."""
    shape = (len(PROMPTS), IMAGE // t2i.vae_scale_factor, IMAGE // t2i.vae_scale_factor, t2i.latent_channels)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_diffusers(pipe, latents, **kw):
    """diffusers' final latents (NHWC) and images (output_type "np": NHWC in [0, 1]) of one run;
    the latents are read at the last step through the step-end callback."""
    final = {}

    def keep_latents(pipeline, step, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        images = pipe(prompt=PROMPTS, num_inference_steps=STEPS, latents=torch.from_numpy(nchw(latents)),
                      height=IMAGE, width=IMAGE, output_type="np", callback_on_step_end=keep_latents, **kw).images
    return nhwc(final["latents"].numpy()), images


def diffusers_embeds(pipe, **kw):
    with torch.no_grad():
        return [None if e is None else e.numpy() for e in pipe.encode_prompt(**kw)]


# ------------------------------------------------------------------------------- SD 1.x / 2.x


def test_sd_prompt_embeddings(sd1):
    pipe, t2i = sd1
    assert t2i.family == "sd" and t2i.prediction == "eps" and t2i.plan(STEPS).solver == "ddim"
    ref, ref_neg = diffusers_embeds(pipe, prompt=PROMPTS, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    cond, uncond = t2i.encode_prompt(PROMPTS, NEGATIVE)
    assert_close(cond["encoder_hidden_states"], ref, TOL, "prompt embeds")
    assert_close(uncond["encoder_hidden_states"], ref_neg, TOL, "negative prompt embeds")


def test_sd_ddim_latents_and_images(sd1):
    pipe, t2i = sd1
    z = latents_for(t2i)
    kw = dict(negative_prompt=NEGATIVE, guidance_scale=7.5)
    ref, images = run_diffusers(pipe, z, **kw)
    out = t2i.generate(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=7.5, latents=z)
    assert out.latents.shape == ref.shape == (2, 8, 8, 4)
    assert_close(out.latents, ref, TOL, "SD DDIM latents")
    assert images.shape == out.images.shape == (2, IMAGE, IMAGE, 3)
    assert_close((np.asarray(out.images) + 1) / 2, images, TOL, "SD DDIM images")
    # the uint8 output is the same images, rounded as diffusers' PIL output rounds them
    u8 = t2i(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=7.5, latents=z)
    assert u8.dtype == np.uint8 and np.abs(u8.astype(int) - np.round(images * 255)).max() <= 1
    # without latents the noise comes from the seed: the same for the same seed (and the same
    # static configuration as above, so nothing is compiled again)
    a, b, c = (t2i.generate(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=3.0, seed=s).latents
               for s in (7, 7, 8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c)) and jnp.isfinite(a).all()


def test_sd_dpm_solver(sd1):
    pipe, t2i = sd1
    ddim = pipe.scheduler
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ddim.config)
    try:
        z = latents_for(t2i, seed=1)
        ref, _ = run_diffusers(pipe, z, negative_prompt=NEGATIVE, guidance_scale=7.5)
        dpm = t2i.with_scheduler(pipe.scheduler)
    finally:
        pipe.scheduler = ddim
    assert dpm.plan(STEPS).solver == "dpmpp_2m"
    ours = dpm(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=7.5, latents=z, output_type="latent")
    assert_close(ours, ref, TOL, "SD DPM-Solver++ latents")
    # the solver asked for on the DDIM folder samples on the grid DPMSolver.from_config gives
    asked = t2i(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=7.5, latents=z, output_type="latent",
                solver="dpmpp_2m")
    np.testing.assert_array_equal(np.asarray(asked), np.asarray(ours))


@pytest.mark.parametrize("cls,kw,custom", [
    (diffusers.EulerDiscreteScheduler, dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), None),
    (diffusers.HeunDiscreteScheduler, dict(), None),
    (diffusers.EulerDiscreteScheduler, dict(timestep_spacing="trailing"), [999, 749, 499, 249]),
], ids=["euler-karras-sigma_min", "heun", "euler-custom-timesteps"])
def test_sd_sigma_schedulers(sd1, cls, kw, custom):
    """Schedulers on their own sigmas through the pipeline: initial noise scale, solver options
    (Heun's second model call), custom timesteps, and the final latents in diffusers' x = z / a."""
    pipe, t2i = sd1
    ddim = pipe.scheduler
    pipe.scheduler = cls.from_config(ddim.config, **kw)
    try:
        z = latents_for(t2i, seed=2)
        ref, _ = run_diffusers(pipe, z, negative_prompt=NEGATIVE, guidance_scale=7.5,
                               **({} if custom is None else {"timesteps": custom}))
        other = t2i.with_scheduler(pipe.scheduler)
    finally:
        pipe.scheduler = ddim
    ours = other(PROMPTS, NEGATIVE, num_steps=STEPS if custom is None else None, guidance_scale=7.5, latents=z,
                 output_type="latent", timesteps=custom)
    assert_close(ours, ref, TOL, f"SD {cls.__name__} latents")


def test_guidance_distilled_student(sd1):
    """A network with a guidance embedding (a guidance-distilled student, guidance_embed=True)
    reads guidance_scale as its ``guidance`` input: one pass per step, no negative prompts."""
    _, t2i = sd1
    student = t2i.network.clone(guidance_embed=True)
    args, kwargs = student.example_inputs(1)
    shapes = jax.eval_shape(lambda: student.init(jax.random.key(0), *args, **kwargs))["params"]["guidance_embedder"]
    rng = np.random.default_rng(6)
    embedder = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32), shapes)
    params = {**t2i.params, "network": {**t2i.params["network"], "guidance_embedder": embedder}}
    s2i = dataclasses.replace(t2i, network=student, params=params)
    z = latents_for(t2i, seed=6)
    ours = s2i(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=4.0, latents=z, output_type="latent")
    cond, uncond = s2i.encode_prompt(PROMPTS, guidance=False)
    assert uncond is None
    direct = samplers.sample_jit(s2i.denoiser(), jnp.asarray(z), {**cond, "guidance": jnp.full((2,), 4.0)},
                                 grid=s2i.plan(STEPS).grid, solver="ddim")
    assert_close(ours, direct, 1e-6, "student sampled by the pipeline and by hand")
    other = s2i(PROMPTS, num_steps=STEPS, guidance_scale=2.0, latents=z, output_type="latent")
    assert not np.allclose(np.asarray(other), np.asarray(ours), atol=1e-4)


def test_sd2_v_prediction_unguided(tmp_path):
    """SD 2.x-like: OpenCLIP-style tower (gelu, "!" padding), linear-projection UNet with
    per-block head counts, v-prediction with trailing timesteps, loaded straight from the
    diffusers folder. guidance_scale 1: one conditional pass, the negative prompts unused
    (diffusers guides only above 1)."""
    scheduler = diffusers.DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction",
                                           "timestep_spacing": "trailing", "steps_offset": 0})
    pipe, t2i = sd_pipeline(tmp_path, 10, tower=lambda n: clip_tower(n, 11, act="gelu"), pad="!",
                            unet_kw=dict(use_linear_projection=True, attention_head_dim=(4,), upcast_attention=True),
                            scheduler=scheduler, direct=True)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["diffusers"] * 3
    assert t2i.prediction == "v"
    z = latents_for(t2i, seed=2)
    ref, _ = run_diffusers(pipe, z, negative_prompt=NEGATIVE, guidance_scale=1.0)
    ours = t2i(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=1.0, latents=z, output_type="latent")
    assert_close(ours, ref, TOL, "SD2 v-prediction latents")


# ------------------------------------------------------------------------------- SDXL


def test_sdxl_euler(tmp_path):
    """Two towers (penultimate states concatenated, pooled from the projecting one), text_time
    embedding with size / crop ids, SDXL's EulerDiscreteScheduler; no negative prompt, so the
    unconditional embeddings are zeros (force_zeros_for_empty_prompt)."""
    tok1, n1 = write_clip_tokenizer(tmp_path / "tok1")
    tok2, n2 = write_clip_tokenizer(tmp_path / "tok2", pad="!")
    text_dim, pooled_dim, time_dim = 32 + 24, 16, 4
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae(20), text_encoder=clip_tower(n1, 21), text_encoder_2=clip_tower(n2, 22, 24, "gelu", pooled_dim),
        tokenizer=tok1, tokenizer_2=tok2,
        unet=unet(23, text_dim, use_linear_projection=True, transformer_layers_per_block=(2,),
                  addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                  projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim),
        scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                   steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False)
    t2i = save_and_convert(pipe, tmp_path)
    assert t2i.family == "sdxl" and t2i.force_zeros_for_empty_prompt and t2i.plan(STEPS).solver == "ddim"

    ref = diffusers_embeds(pipe, prompt=PROMPTS, device="cpu", num_images_per_prompt=1,
                           do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    cond, uncond = t2i.encode_prompt(PROMPTS, NEGATIVE, height=IMAGE, width=IMAGE, original_size=(32, 24),
                                     crops_coords_top_left=(4, 2))
    assert_close(cond["encoder_hidden_states"], ref[0], TOL, "SDXL prompt embeds")
    assert_close(uncond["encoder_hidden_states"], ref[1], TOL, "SDXL negative prompt embeds")
    assert_close(cond["added_cond_kwargs"]["text_embeds"], ref[2], TOL, "SDXL pooled")
    assert_close(uncond["added_cond_kwargs"]["text_embeds"], ref[3], TOL, "SDXL negative pooled")
    np.testing.assert_array_equal(cond["added_cond_kwargs"]["time_ids"], [[32, 24, 4, 2, IMAGE, IMAGE]] * 2)

    z = latents_for(t2i, seed=3)
    ref, images = run_diffusers(pipe, z, guidance_scale=5.0)
    out = t2i.generate(PROMPTS, num_steps=STEPS, guidance_scale=5.0, latents=z)
    assert_close(out.latents, ref, TOL, "SDXL latents")
    assert_close((np.asarray(out.images) + 1) / 2, images, TOL, "SDXL images")


def test_sdxl_refiner(tmp_path):
    """The SDXL refiner: text_encoder_2 alone, 5 time ids ending in an aesthetic score (another on
    the unconditional side), no forced zero negatives. Prompt encoding and time ids against
    StableDiffusionXLImg2ImgPipeline's, the UNet on them against diffusers' UNet, and the
    pipeline's sampling against the sampler run on those embeddings by hand."""
    tok2, n2 = write_clip_tokenizer(tmp_path / "tok2", pad="!")
    pooled_dim, time_dim = 16, 4
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae(40), text_encoder=None, tokenizer=None, text_encoder_2=clip_tower(n2, 41, 24, "gelu", pooled_dim),
        tokenizer_2=tok2,
        unet=unet(42, 24, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled_dim + 5 * time_dim),
        scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                   steps_offset=1, timestep_spacing="leading"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    t2i = save_and_convert(pipe, tmp_path)
    assert t2i.family == "sdxl" and t2i.requires_aesthetics_score and not t2i.force_zeros_for_empty_prompt
    assert t2i.text_encoders[0] is None and t2i.text_encoders[1] is not None

    kw = dict(original_size=(32, 24), crops_coords_top_left=(4, 2), aesthetic_score=7.0, negative_aesthetic_score=2.0)
    for negative in (NEGATIVE, None):  # None: the refiner encodes "" (it does not force zeros)
        ref = diffusers_embeds(pipe, prompt=PROMPTS, device="cpu", num_images_per_prompt=1,
                               do_classifier_free_guidance=True, negative_prompt=negative)
        cond, uncond = t2i.encode_prompt(PROMPTS, negative, height=IMAGE, width=IMAGE, **kw)
        for ours, expected, what in ((cond["encoder_hidden_states"], ref[0], "prompt embeds"),
                                     (uncond["encoder_hidden_states"], ref[1], "negative prompt embeds"),
                                     (cond["added_cond_kwargs"]["text_embeds"], ref[2], "pooled"),
                                     (uncond["added_cond_kwargs"]["text_embeds"], ref[3], "negative pooled")):
            assert_close(ours, expected, TOL, f"refiner {what} (negative {negative})")
    ids, neg_ids = pipe._get_add_time_ids((32, 24), (4, 2), (IMAGE, IMAGE), 7.0, 2.0, (32, 24), (4, 2), (IMAGE, IMAGE),
                                          dtype=torch.float32, text_encoder_projection_dim=pooled_dim)
    np.testing.assert_array_equal(cond["added_cond_kwargs"]["time_ids"], ids.repeat(2, 1).numpy())
    np.testing.assert_array_equal(uncond["added_cond_kwargs"]["time_ids"], neg_ids.repeat(2, 1).numpy())
    assert ids.shape == (1, 5) and not np.array_equal(ids.numpy(), neg_ids.numpy())

    z = latents_for(t2i, seed=5)
    t = np.array([999.0, 101.0], np.float32)
    for c in (cond, uncond):
        ours = t2i.network.apply({"params": t2i.params["network"]}, jnp.asarray(z), jnp.asarray(t),
                                 c["encoder_hidden_states"], added_cond_kwargs=c["added_cond_kwargs"])
        with torch.no_grad():
            ref = pipe.unet(torch.from_numpy(nchw(z)), torch.from_numpy(t),
                            torch.from_numpy(np.array(c["encoder_hidden_states"])),
                            added_cond_kwargs={k: torch.from_numpy(np.array(v))
                                               for k, v in c["added_cond_kwargs"].items()}).sample
        assert_close(ours, nhwc(ref.numpy()), TOL, "refiner UNet on the encoded prompts")

    out = t2i(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=5.0, latents=z, output_type="latent", **kw)
    plan = t2i.plan(STEPS)
    cond, uncond = t2i.encode_prompt(PROMPTS, NEGATIVE, height=IMAGE, width=IMAGE, **kw)
    direct = samplers.sample_jit(t2i.denoiser(), jnp.asarray(z) * plan.noise_scale, cond, grid=plan.grid,
                                 solver=plan.solver, guidance_scale=5.0, uncond=uncond)
    assert_close(out, direct, 1e-6, "refiner sampled by the pipeline and by hand")


# ------------------------------------------------------------------------------- SD3


def test_sd3_flow_match(tmp_path):
    """CLIP-L- and CLIP-G-like towers with projections, a T5 encoder, joint tokens padded to
    T5's width, pooled projections concatenated; FlowMatchEuler with shift 3; a VAE with a
    shift factor and no quant convs."""
    tok1, n1 = write_clip_tokenizer(tmp_path / "tok1")
    tok2, n2 = write_clip_tokenizer(tmp_path / "tok2", pad="!")
    tok3, n3 = t5_tokenizer(tmp_path / "tok3")
    t5_cfg = transformers.T5Config(vocab_size=n3, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=3,
                                   feed_forward_proj="gated-gelu")
    transformer = randomise_mmdit(diffusers.SD3Transformer2DModel(
        sample_size=IMAGE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=16 + 24,
        pos_embed_max_size=12).eval(), seed=30)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(31, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip_tower(n1, 32, 16, projection=16), tokenizer=tok1,
        text_encoder_2=clip_tower(n2, 33, 24, "gelu", projection=24), tokenizer_2=tok2,
        text_encoder_3=randomise_text(transformers.T5EncoderModel(t5_cfg), 34), tokenizer_3=tok3)
    t2i = save_and_convert(pipe, tmp_path)
    assert t2i.family == "sd3" and t2i.prediction == "flow" and t2i.plan(STEPS).solver == "euler"

    ref = diffusers_embeds(pipe, prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu",
                           negative_prompt=NEGATIVE, max_sequence_length=T5_TOKENS)
    cond, uncond = t2i.encode_prompt(PROMPTS, NEGATIVE, max_sequence_length=T5_TOKENS)
    assert cond["encoder_hidden_states"].shape == (2, TOKENS + T5_TOKENS, 48)
    for ours, expected, what in ((cond["encoder_hidden_states"], ref[0], "prompt embeds"),
                                 (uncond["encoder_hidden_states"], ref[1], "negative prompt embeds"),
                                 (cond["pooled_projections"], ref[2], "pooled"),
                                 (uncond["pooled_projections"], ref[3], "negative pooled")):
        assert_close(ours, expected, TOL, f"SD3 {what}")

    # without T5 (text_encoder_3 None) both stand in zeros of the transformer's joint width
    no_t5 = dataclasses.replace(t2i, text_encoders=t2i.text_encoders[:2] + (None,),
                                tokenizers=t2i.tokenizers[:2] + (None,),
                                params={**t2i.params, "text_encoders": t2i.params["text_encoders"][:2] + (None,)})
    t5, pipe.text_encoder_3 = pipe.text_encoder_3, None
    try:
        ref_no_t5 = diffusers_embeds(pipe, prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu",
                                     negative_prompt=NEGATIVE, max_sequence_length=T5_TOKENS)
    finally:
        pipe.text_encoder_3 = t5
    cond, uncond = no_t5.encode_prompt(PROMPTS, NEGATIVE, max_sequence_length=T5_TOKENS)
    assert not np.asarray(cond["encoder_hidden_states"][:, TOKENS:]).any()
    assert_close(cond["encoder_hidden_states"], ref_no_t5[0], TOL, "SD3 prompt embeds without T5")
    assert_close(uncond["encoder_hidden_states"], ref_no_t5[1], TOL, "SD3 negative prompt embeds without T5")

    z = latents_for(t2i, seed=4)
    kw = dict(negative_prompt=NEGATIVE, guidance_scale=7.0, max_sequence_length=T5_TOKENS)
    ref, images = run_diffusers(pipe, z, **kw)
    out = t2i.generate(PROMPTS, NEGATIVE, num_steps=STEPS, guidance_scale=7.0, latents=z,
                       max_sequence_length=T5_TOKENS)
    assert_close(out.latents, ref, TOL, "SD3 latents")
    assert_close((np.asarray(out.images) + 1) / 2, images, TOL, "SD3 images")


# ------------------------------------------------------------------------------- scheduler configs


SCHEDULER_CASES = [
    (diffusers.DDIMScheduler, dict(SD_SCHEDULER), 25),
    (diffusers.DDIMScheduler, dict(timestep_spacing="trailing"), 10),
    (diffusers.DDPMScheduler, dict(beta_schedule="scaled_linear", variance_type="fixed_large"), 20),
    (diffusers.DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", timestep_spacing="linspace"), 20),
    (diffusers.EulerDiscreteScheduler, dict(steps_offset=1, timestep_spacing="leading"), 30),
    (diffusers.EulerDiscreteScheduler, dict(timestep_spacing="trailing"), 8),
    (diffusers.EulerDiscreteScheduler, dict(timestep_spacing="linspace"), 10),  # 999 / 9 = 111: integers
    (diffusers.FlowMatchEulerDiscreteScheduler, dict(shift=3.0), 28),
    # reproduced since the sigma-grid solvers (trajectories: test_schedulers_parity.py)
    (diffusers.DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", use_karras_sigmas=True), 20),
    (diffusers.DDIMScheduler, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                   prediction_type="v_prediction"), 10),
    (diffusers.EulerDiscreteScheduler, dict(timestep_spacing="linspace"), 20),  # between integer timesteps
    (diffusers.EulerDiscreteScheduler, dict(use_karras_sigmas=True), 12),
    (diffusers.UniPCMultistepScheduler, dict(timestep_spacing="trailing"), 6),
    (diffusers.LCMScheduler, dict(), 4),
]


@pytest.mark.parametrize("cls,kw,n", SCHEDULER_CASES, ids=lambda v: getattr(v, "__name__", None))
def test_plan_reproduces_scheduler_timesteps(cls, kw, n):
    ref = cls(**kw)
    ref.set_timesteps(n)
    config = {**dict(ref.config), "_class_name": cls.__name__}
    plan = scheduling.plan(config, n)
    schedule = scheduling.schedule_from_config(config)
    assert plan.solver == scheduling.SCHEDULER_SOLVERS[cls.__name__]
    assert_close(schedule.model_time(plan.grid.t), ref.timesteps.numpy(), 1e-6, "timesteps")
    assert plan.clip_x0 == (1.0 if kw.get("clip_sample", cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler))
                            and cls is not diffusers.FlowMatchEulerDiscreteScheduler else None)
    # initial latents: diffusers scales the unit noise by init_noise_sigma in its own variables;
    # in z = a x + s eps that is noise_scale
    if cls is diffusers.EulerDiscreteScheduler:
        a, _ = schedule.alpha_sigma(plan.grid.t[0])
        np.testing.assert_allclose(plan.noise_scale, float(ref.init_noise_sigma) * float(a), rtol=1e-6)
    else:  # FlowMatchEuler has none: SD3's pipeline takes the noise as it is
        assert plan.noise_scale == 1.0 == float(getattr(ref, "init_noise_sigma", 1.0))


@pytest.mark.parametrize("cls,kw,match", [
    # (Karras sigmas, sde-dpmsolver++, zero SNR and Euler between integer timesteps were refused
    # here until they were reproduced; test_scheduler_refusals.py has every refusal)
    (diffusers.DPMSolverMultistepScheduler, dict(use_lu_lambdas=True), "use_lu_lambdas"),
    (diffusers.DPMSolverMultistepScheduler, dict(solver_order=3), "solver_order"),
    (diffusers.DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     "algorithm_type"),
    (diffusers.DDIMScheduler, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), "rescale_betas_zero_snr"),
    (diffusers.DDIMScheduler, dict(thresholding=True), "thresholding"),
    (diffusers.FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    (diffusers.EulerDiscreteScheduler, dict(interpolation_type="log_linear"), "interpolation_type"),
    (diffusers.PNDMScheduler, dict(), "PNDMScheduler"),
])
def test_plan_refuses_what_it_does_not_reproduce(cls, kw, match):
    config = {**dict(cls(**kw).config), "_class_name": cls.__name__}
    with pytest.raises(ValueError, match=match):
        scheduling.plan(config, 20)
    if cls is diffusers.PNDMScheduler:  # SD 1.5's scheduler: any solver asked for by name works
        assert scheduling.plan(config, 20, "dpmpp_2m").solver == "dpmpp_2m"
