"""Single-file checkpoints (SD 1.x / 2.x / SDXL / SDXL refiner / SD3-3.5 original layouts, as
.safetensors and .ckpt) against diffusers' ``from_single_file`` on the same tiny file.

Each case builds a tiny diffusers pipeline with random weights and saves it as a folder; a
writer (tests/original_layouts.py) puts its models into one file in the original layout.
diffusers' ``from_single_file(file, config=folder)`` must give back every tensor of the
pipeline it came from (the file is then a correct original-layout file by diffusers'
reading); jdistill then converts the file with configs read off the tensor shapes, and:

* each converted model is the module built from the diffusers config (up to the training
  resolution ``sample_size``, which no weight says) and its params are bit-identical to those
  converted from the diffusers folder;
* each model's outputs equal those of diffusers' ``from_single_file`` model (<= 1e-4
  relative, fp32): UNet / MMDiT forward, VAE reconstruction, text encoders' hidden states and
  pooled / projected outputs.

Then: the keys no component reads are reported, a pipeline folder given as ``config`` gives
a pipeline TextToImage loads, and wrong files get named errors.
"""

import json
import pathlib

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from test_text_encoders import randomise as randomise_text
from test_text_to_image import t5_tokenizer, write_clip_tokenizer
from test_unet_cond import randomize_

import original_layouts as write
from jdistill.convert import io, pretrained, registry
from jdistill.convert.engine import ConversionError
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
TOKENS = 16


def clip_tower(vocab, seed, hidden, act, projection=None, layers=2):
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      max_position_embeddings=TOKENS, hidden_act=act, eos_token_id=2,
                                      bos_token_id=0, pad_token_id=1, projection_dim=projection or hidden)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomise_text(cls(cfg), seed)


def sd_vae(seed, **kw):
    cfg = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32, sample_size=16,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return randomize_(diffusers.AutoencoderKL(**{**cfg, **kw}), seed=seed).eval()


def sd_unet(seed, **kw):
    cfg = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return randomize_(diffusers.UNet2DConditionModel(**{**cfg, **kw}), seed=seed).eval()


# ------------------------------------------------------------------------------- the cases


def sd1(root):
    tok, n = write_clip_tokenizer(root / "tok")
    pipe = diffusers.StableDiffusionPipeline(
        vae=sd_vae(1), text_encoder=clip_tower(n, 2, 64, "quick_gelu"), tokenizer=tok,
        unet=sd_unet(3, cross_attention_dim=64, attention_head_dim=8), scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd = {**write.unet(pipe.unet), **write.vae_(pipe.vae), **write.hf_clip(pipe.text_encoder, "cond_stage_model.transformer.")}
    # what SD 1.x files carry besides the models: the schedule and EMA bookkeeping, a position buffer
    sd.update({"alphas_cumprod": torch.linspace(1, 0, 1000), "model_ema.decay": torch.tensor(0.9999),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(TOKENS)[None]})
    return pipe, sd, {"unet", "vae", "text_encoder"}


def sd2(root):
    tok, n = write_clip_tokenizer(root / "tok", pad="!")
    te = clip_tower(n, 12, 64, "gelu")
    # the OpenCLIP tower has one layer more than the pipeline's text encoder, and a projection
    spare = randomise_text(clip_tower(n, 13, 64, "gelu", layers=1), 13).state_dict()
    extra = {"ln_1.weight": spare["encoder.layers.0.layer_norm1.weight"],
             "ln_1.bias": spare["encoder.layers.0.layer_norm1.bias"],
             "attn.in_proj_weight": torch.cat([spare[f"encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]),
             "attn.in_proj_bias": torch.cat([spare[f"encoder.layers.0.self_attn.{p}_proj.bias"] for p in "qkv"]),
             "attn.out_proj.weight": spare["encoder.layers.0.self_attn.out_proj.weight"],
             "attn.out_proj.bias": spare["encoder.layers.0.self_attn.out_proj.bias"]}
    pipe = diffusers.StableDiffusionPipeline(
        vae=sd_vae(11), text_encoder=te, tokenizer=tok,
        unet=sd_unet(14, block_out_channels=(64, 128), cross_attention_dim=64, attention_head_dim=(1, 2),
                     use_linear_projection=True),
        scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    sd = {**write.unet(pipe.unet), **write.vae_(pipe.vae), **write.openclip(te, "cond_stage_model.model.", extra)}
    sd["cond_stage_model.model.text_projection"] = torch.randn(64, 32)
    return pipe, sd, {"unet", "vae", "text_encoder"}


def sdxl_unet(seed, cross, pooled, ids):
    return sd_unet(seed, block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross,
                   attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=pooled + ids * 8)


def sdxl(root):
    tok1, n1 = write_clip_tokenizer(root / "tok1")
    tok2, n2 = write_clip_tokenizer(root / "tok2", pad="!")
    te1, te2 = clip_tower(n1, 21, 64, "quick_gelu"), clip_tower(n2, 22, 128, "gelu", projection=32)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=sd_vae(20, scaling_factor=0.13025), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        unet=sdxl_unet(23, 64 + 128, 32, 6), scheduler=diffusers.EulerDiscreteScheduler(), add_watermarker=False)
    sd = {**write.unet(pipe.unet), **write.vae_(pipe.vae),
          **write.hf_clip(te1, "conditioner.embedders.0.transformer."),
          **write.openclip(te2, "conditioner.embedders.1.model.")}
    return pipe, sd, {"unet", "vae", "text_encoder", "text_encoder_2"}


def sdxl_refiner(root):
    tok2, n2 = write_clip_tokenizer(root / "tok2", pad="!")
    te2 = clip_tower(n2, 32, 128, "gelu", projection=32)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=sd_vae(30, scaling_factor=0.13025), text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2,
        unet=sdxl_unet(33, 128, 32, 5), scheduler=diffusers.EulerDiscreteScheduler(), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    sd = {**write.unet(pipe.unet), **write.vae_(pipe.vae), **write.openclip(te2, "conditioner.embedders.0.model.")}
    return pipe, sd, {"unet", "vae", "text_encoder_2"}


def sd3(root):
    tok1, n1 = write_clip_tokenizer(root / "tok1")
    tok2, n2 = write_clip_tokenizer(root / "tok2", pad="!")
    tok3, n3 = t5_tokenizer(root / "tok3")
    te1 = clip_tower(n1, 41, 64, "quick_gelu", projection=64)
    with torch.no_grad():  # SD3's files hold no CLIP-L projection; diffusers reads it as the identity
        te1.text_projection.weight.copy_(torch.eye(64))
    te2 = clip_tower(n2, 42, 128, "gelu", projection=32)
    t5 = randomise_text(transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=n3, d_model=192, d_kv=64, d_ff=96, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu")), 43)
    from test_mmdit import randomise as randomise_mmdit

    # SD3.5's options: q/k RMS norms and a second self-attention in the first block
    transformer = randomise_mmdit(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=192, caption_projection_dim=128, pooled_projection_dim=64 + 32,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,)).eval(), seed=44)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=sd_vae(40, latent_channels=4, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                   shift_factor=0.0609),
        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3)
    clip_l = {k: v for k, v in write.hf_clip(te1, "text_encoders.clip_l.transformer.").items() if "text_projection" not in k}
    sd = {**write.mmdit_(transformer), **write.vae_(pipe.vae), **clip_l,
          **write.hf_clip(te2, "text_encoders.clip_g.transformer."), **write.prefixed(t5, "text_encoders.t5xxl.transformer.")}
    return pipe, sd, {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}


CASES = {"sd1": sd1, "sd2": sd2, "sdxl": sdxl, "sdxl-refiner": sdxl_refiner, "sd3": sd3}
PIPELINES = {"sd1": diffusers.StableDiffusionPipeline, "sd2": diffusers.StableDiffusionPipeline,
             "sdxl": diffusers.StableDiffusionXLPipeline, "sdxl-refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
             "sd3": diffusers.StableDiffusion3Pipeline}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    layout = request.param
    root = tmp_path_factory.mktemp(layout)
    torch.manual_seed(0)
    pipe, sd, names = CASES[layout](root)
    pipe.save_pretrained(root / "diffusers")
    file = root / f"{layout}.safetensors"
    safetensors.torch.save_file(sd, file)
    ours = pretrained.convert(file, root / "jdistill")
    return dict(layout=layout, root=root, pipe=pipe, sd=sd, names=names, file=file, report=ours)


@pytest.fixture(scope="module")
def from_single_file(case):
    """diffusers' reading of the file: it must give back the pipeline the file was written from."""
    theirs = PIPELINES[case["layout"]].from_single_file(case["file"], config=str(case["root"] / "diffusers"),
                                                         local_files_only=True)
    for name in case["names"]:
        getattr(theirs, name).eval()  # diffusers leaves its single-file T5 in training mode (dropout on)
        a, b = getattr(case["pipe"], name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys(), (name, sorted(set(a) ^ set(b))[:5])
        for k in a:
            assert torch.equal(a[k], b[k]), f"diffusers does not read {name}.{k} back from the file"
    return theirs


def test_components_configs_and_params(case, from_single_file):
    layout, root = case["layout"], case["root"]
    report = case["report"]
    assert report.kind == "single-file" and report.layout == layout
    assert {c.name for c in report.components} == case["names"]
    reference = pretrained.convert(root / "diffusers", root / "from-folder", components=sorted(case["names"]))
    assert len(reference.components) == len(case["names"])
    for name in case["names"]:
        ours = pretrained.load_pretrained(root / "jdistill", name)
        ref = pretrained.load_pretrained(root / "from-folder", name)
        # the training resolution is the one config value no weight says: the layout's published one
        if hasattr(ref.module, "sample_size"):
            assert ours.module.clone(sample_size=ref.module.sample_size) == ref.module, name
        else:
            assert ours.module == ref.module, name
        fa, fb = jax.tree_util.tree_leaves_with_path(ours.params), jax.tree_util.tree_leaves_with_path(ref.params)
        assert [k for k, _ in fa] == [k for k, _ in fb], name
        for (k, x), (_, y) in zip(fa, fb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{name} {jax.tree_util.keystr(k)}")


def test_outputs_equal_from_single_file(case, from_single_file):
    rng = np.random.default_rng(0)
    for name in sorted(case["names"]):
        ours = pretrained.load_pretrained(case["root"] / "jdistill", name)
        theirs = getattr(from_single_file, name)
        for got, expected, what in FORWARD[ours.family](ours, theirs, rng):
            assert_close(got, expected, TOL, f"{case['layout']} {name} {what}")


def _unet(ours, theirs, rng):
    m = ours.module
    z = rng.standard_normal((2, 8, 8, m.in_channels)).astype(np.float32)
    t = np.array([999.0, 17.0], np.float32)
    ctx = rng.standard_normal((2, 5, m.context_dim)).astype(np.float32)
    kw, tkw = {}, {}
    if m.addition_embed_type == "text_time":
        n_ids = 5 if m.projection_class_embeddings_input_dim == 32 + 5 * 8 else 6
        added = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
                 "time_ids": rng.uniform(0, 64, (2, n_ids)).astype(np.float32)}
        kw["added_cond_kwargs"] = {k: jnp.asarray(v) for k, v in added.items()}
        tkw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    got = m.apply({"params": ours.params}, jnp.asarray(z), jnp.asarray(t), jnp.asarray(ctx), **kw)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(nchw(z)), torch.from_numpy(t), torch.from_numpy(ctx), **tkw).sample
    return [(got, nhwc(ref.numpy()), "forward")]


def _mmdit(ours, theirs, rng):
    m = ours.module
    z = rng.standard_normal((2, 8, 8, m.in_channels)).astype(np.float32)
    t = np.array([900.0, 3.0], np.float32)
    ctx = rng.standard_normal((2, 7, m.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, m.pooled_projection_dim)).astype(np.float32)
    got = m.apply({"params": ours.params}, jnp.asarray(z), jnp.asarray(t), encoder_hidden_states=jnp.asarray(ctx),
                  pooled_projections=jnp.asarray(pooled))
    with torch.no_grad():
        ref = theirs(hidden_states=torch.from_numpy(nchw(z)), timestep=torch.from_numpy(t),
                     encoder_hidden_states=torch.from_numpy(ctx), pooled_projections=torch.from_numpy(pooled)).sample
    return [(got, nhwc(ref.numpy()), "forward")]


def _vae(ours, theirs, rng):
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    got = ours.module.apply({"params": ours.params}, jnp.asarray(x))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(nchw(x))).sample
    return [(got, nhwc(ref.numpy()), "reconstruction")]


def _clip(ours, theirs, rng):
    ids = rng.integers(3, theirs.config.vocab_size - 1, (2, TOKENS))
    ids[:, 7] = theirs.config.vocab_size - 1  # the end-of-text token (the largest id: SD's legacy pooling)
    got = ours.module.apply({"params": ours.params}, jnp.asarray(ids))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids), output_hidden_states=True)
    out = [(got.last_hidden_state, ref.last_hidden_state.numpy(), "last hidden state"),
           (got.hidden_states[-2], ref.hidden_states[-2].numpy(), "penultimate hidden state")]
    if got.text_embeds is not None:
        out.append((got.text_embeds, ref.text_embeds.numpy(), "text_embeds"))
    else:
        out.append((got.pooler_output, ref.pooler_output.numpy(), "pooled"))
    return out


def _t5(ours, theirs, rng):
    ids = rng.integers(2, theirs.config.vocab_size, (2, 9))
    got = ours.module.apply({"params": ours.params}, jnp.asarray(ids))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids)).last_hidden_state
    return [(got.last_hidden_state, ref.numpy(), "last hidden state")]


FORWARD = {"unet_cond": _unet, "mmdit": _mmdit, "vae": _vae, "clip": _clip, "t5": _t5}


def test_unused_keys_are_reported(case):
    report, sd = case["report"], case["sd"]
    expected = {"sd1": {"alphas_cumprod", "model_ema.decay", "cond_stage_model.transformer.text_model.embeddings.position_ids"},
                "sd2": {k for k in sd if k.startswith("cond_stage_model.model.transformer.resblocks.2.")}
                | {"cond_stage_model.model.text_projection"}}.get(case["layout"], set())
    assert set(report.unused) == expected
    manifest = json.loads((pathlib.Path(report.destination) / "jdistill.json").read_text())
    assert manifest["layout"] == case["layout"] and set(manifest["unused_keys"]) == expected


# ------------------------------------------------------------------------------- .ckpt, config=, errors


@pytest.fixture(scope="module")
def sd1_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1-extra")
    torch.manual_seed(0)
    pipe, sd, names = sd1(root)
    pipe.save_pretrained(root / "diffusers")
    safetensors.torch.save_file(sd, root / "model.safetensors")
    return dict(root=root, pipe=pipe, sd=sd, names=names)


def assert_same_params(a, b, what=""):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [k for k, _ in fa] == [k for k, _ in fb], what
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what} {jax.tree_util.keystr(k)}")


def test_ckpt_reads_as_the_safetensors(sd1_case, tmp_path):
    """A Lightning-style .ckpt ({"state_dict": ..., "global_step": ...}) loads safely (weights_only)
    and converts to the params the .safetensors gives."""
    root = sd1_case["root"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd1_case["sd"], "global_step": 470000, "epoch": 6}, ckpt)
    for name in ("unet", "text_encoder"):
        a = pretrained.load_pretrained(ckpt, name, cache_dir=tmp_path / "cache")
        b = pretrained.load_pretrained(root / "model.safetensors", name, cache_dir=tmp_path / "cache")
        assert a.module == b.module
        assert_same_params(a.params, b.params, name)
    manifest = json.loads((a.path / "jdistill.json").read_text())
    assert manifest["components"]["text_encoder"]["checkpoint_entry"] == "state_dict"
    # only the component asked for was converted, each into its own cache entry
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 4 and all(len(json.loads((e / "jdistill.json").read_text())["components"]) == 1
                                     for e in entries)
    with pytest.raises(ValueError, match=r"holds 3 models \['unet', 'vae', 'text_encoder'\] \(sd1\): pass component="):
        pretrained.load_pretrained(ckpt, cache_dir=tmp_path / "cache")


def test_unsafe_and_broken_files_are_refused(sd1_case, tmp_path):
    sd = sd1_case["sd"]
    # a pickle holding an object weights_only does not allow: refused, never unpickled
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": sd, "callbacks": pathlib.PurePosixPath("x")}, unsafe)
    with pytest.raises(io.CheckpointReadError, match=r"weights_only=True\) and never runs pickled code"):
        pretrained.convert(unsafe, tmp_path / "out-unsafe")
    # cut short
    cut = tmp_path / "cut.ckpt"
    data = (tmp_path / "whole.ckpt")
    torch.save({"state_dict": sd}, data)
    cut.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(io.CheckpointReadError, match="truncated"):
        pretrained.convert(cut, tmp_path / "out-cut")
    # a tensor missing: named, as the diffusers key and as the Flax param
    gone = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    partial = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({k: v for k, v in sd.items() if k != gone}, partial)
    with pytest.raises(ConversionError, match=r"(?s)partial.safetensors \(unet\).*1 missing.*down_blocks_0/resnets_0/conv1/kernel"):
        pretrained.convert(partial, tmp_path / "out-partial", components=["unet"])
    assert not (tmp_path / "out-partial").exists()
    # other single-file families are named
    for marker, what in (("double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
                         ("control_model.input_blocks.0.0.weight", "ControlNet")):
        other = tmp_path / f"{what}.safetensors"
        safetensors.torch.save_file({marker: torch.zeros(2)}, other)
        with pytest.raises(registry.UnsupportedModel, match=what):
            pretrained.convert(other, tmp_path / f"out-{what}")


def test_pipeline_folder_as_config(sd1_case, tmp_path):
    """config= a diffusers pipeline folder: its configs, scheduler and tokenizer go with the file's
    weights, and the result is a pipeline TextToImage loads, equal to the folder's own."""
    from jdistill.pipelines import TextToImage

    from jdistill.convert import cli

    root = sd1_case["root"]
    assert cli.main_convert([str(root / "model.safetensors"), str(tmp_path / "with-config"), "--config",
                             str(root / "diffusers")]) == 0
    manifest = json.loads((tmp_path / "with-config" / "jdistill.json").read_text())
    assert sorted(manifest["copied"]) == ["scheduler", "tokenizer"] and not manifest["notes"]
    pretrained.convert(root / "diffusers", tmp_path / "folder")
    a, b = TextToImage.from_pretrained(tmp_path / "with-config"), TextToImage.from_pretrained(tmp_path / "folder")
    assert a.network == b.network and a.scheduler_config == b.scheduler_config  # the folder's sample_size, not 64
    assert_same_params(a.params, b.params)
    cond, _ = a.encode_prompt(["a photo of a cat"], guidance=False)
    ref, _ = b.encode_prompt(["a photo of a cat"], guidance=False)
    np.testing.assert_array_equal(np.asarray(cond["encoder_hidden_states"]), np.asarray(ref["encoder_hidden_states"]))
    # straight from the file: each component converted into the cache, the rest from the config folder
    direct = TextToImage.from_pretrained(root / "model.safetensors", config=root / "diffusers",
                                         cache_dir=tmp_path / "cache")
    assert direct.network == b.network and direct.tokenizers[0] is not None
    assert_same_params(direct.params, b.params)
    with pytest.raises(ValueError, match="is a single file: pass config="):
        TextToImage.from_pretrained(root / "model.safetensors")
    with pytest.raises(ValueError, match="is a pipeline folder: its own configs describe it"):
        pretrained.convert(root / "diffusers", tmp_path / "x", config=root / "diffusers")


def test_config_named_by_a_preset(sd1_case, tmp_path, monkeypatch):
    """config="sd15": the preset's local copy, checked to be that checkpoint, describes the file."""
    import dataclasses

    from jdistill.convert import presets

    monkeypatch.setenv("JDISTILL_MODELS", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd15").symlink_to(sd1_case["root"] / "diffusers")
    with pytest.raises(presets.PresetMismatch, match="unet/config.json: sample_size is 8, expected 64"):
        pretrained.convert(sd1_case["root"] / "model.safetensors", tmp_path / "refused", config="sd15")
    # the tiny copy stands for SD 1.5 once the preset expects the tiny values
    monkeypatch.setitem(presets.PRESETS, "sd15", dataclasses.replace(
        presets.get("sd15"), expect={"unet": {"sample_size": 8}}, components={}, pipeline=()))
    report = pretrained.convert(sd1_case["root"] / "model.safetensors", tmp_path / "out", config="sd15")
    assert sorted(report.copied) == ["scheduler", "tokenizer"]
    assert json.loads((tmp_path / "out" / "unet" / "config.json").read_text())["sample_size"] == 8
