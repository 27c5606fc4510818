"""Checkpoint I/O: every public format read lazily and correctly, the family registry, the
conversion cache (reuse, atomicity), presets resolved to local copies only, export back to
diffusers / transformers, the CLI, and the memory bound of a streamed conversion.

Sources are real diffusers / transformers models with re-randomised weights, saved the way
public checkpoints are saved (``save_pretrained`` single / sharded / ``.bin`` / variant,
``torch.save`` training checkpoints, pipeline folders). A format is read correctly when the
params it converts to are bit-equal to those converted from the in-memory PyTorch state dict
(whose parity with PyTorch tests/test_dit.py and tests/test_text_encoders.py establish).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from jdistill.convert import dit as dit_conv
from jdistill.convert import cli, export, io, pretrained, presets, registry
from jdistill.convert import sources as source_kinds
from jdistill.convert.engine import ConversionError
from jdistill.testing import assert_close, nchw, nhwc

HEADS, HEAD_DIM, DEPTH, SIZE, CLASSES = 2, 16, 2, 8, 10


def randomise(model, std=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def tiny_dit(seed=0, **kw):
    cfg = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
               num_layers=DEPTH, sample_size=SIZE, num_embeds_ada_norm=CLASSES, **kw)
    return randomise(diffusers.DiTTransformer2DModel(**cfg), seed=seed)


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(k))


class CountingReads:
    """Counts checkpoint files opened (safetensors headers, torch.load) and tensors read; with
    ``fail`` set, either one fails the test."""

    def __init__(self, monkeypatch, fail=False):
        self.n, self.opened, self.fail = 0, 0, fail
        real_get, real_open = io.LazyStateDict.__getitem__, io._open_file

        def getitem(sd, key):
            self.n += 1
            if self.fail:
                raise AssertionError(f"read {key} from {sd.description}")
            return real_get(sd, key)

        def open_file(path, *args, **kwargs):
            self.opened += 1
            if self.fail:
                raise AssertionError(f"read {path}")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(io.LazyStateDict, "__getitem__", getitem)
        monkeypatch.setattr(io, "_open_file", open_file)


@pytest.fixture(scope="module")
def dit_model():
    return tiny_dit()


@pytest.fixture(scope="module")
def dit_reference(dit_model):
    """The params converted from the in-memory state dict: what every format must give."""
    config = dict(dit_model.config)
    module = dit_conv.module_from_config(config)
    return module, dit_conv.load_params(numpy_state(dit_model), module)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, dit_model):
    """The tiny DiT saved in every format a public checkpoint comes in."""
    root = tmp_path_factory.mktemp("sources")
    dit_model.save_pretrained(root / "single")
    dit_model.save_pretrained(root / "sharded", max_shard_size="30KB")
    dit_model.save_pretrained(root / "bin", safe_serialization=False)
    dit_model.save_pretrained(root / "sharded_bin", safe_serialization=False, max_shard_size="30KB")
    dit_model.save_pretrained(root / "variant", variant="fp16")  # fp32 tensors under a variant name
    return root


# ---------------------------------------------------------------- formats


FORMATS = {
    "single": "diffusion_pytorch_model.safetensors",
    "sharded": "diffusion_pytorch_model.safetensors.index.json",
    "bin": "diffusion_pytorch_model.bin",
    "sharded_bin": "diffusion_pytorch_model.bin.index.json",
    "variant": "diffusion_pytorch_model.fp16.safetensors",
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_diffusers_format_converts_to_the_same_params(fmt, sources, dit_model, dit_reference, tmp_path):
    folder = sources / fmt
    assert io.find_weights(folder).name == FORMATS[fmt]
    if fmt.startswith("sharded"):
        assert len(list(folder.glob("diffusion_pytorch_model-*"))) > 3  # really sharded
    expected = numpy_state(dit_model)
    with io.open_state_dict(folder) as sd:
        assert sorted(sd) == sorted(expected)
        for k in ("pos_embed.proj.weight", "proj_out_2.bias", "transformer_blocks.1.ff.net.2.weight"):
            np.testing.assert_array_equal(np.asarray(sd[k]), expected[k])

    loaded = pretrained.load_pretrained(folder, cache_dir=tmp_path / "cache")
    module, params = loaded
    assert loaded.family == "dit" and module == dit_reference[0]
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    assert_trees_equal(params, dit_reference[1])


def test_find_weights_prefers_plain_safetensors_then_asked_variant(tmp_path):
    def folder(name, *files):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).touch()
        return tmp_path / name

    both = folder("both", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
                  "diffusion_pytorch_model.fp16.safetensors", "config.json")
    assert io.find_weights(both).name == "diffusion_pytorch_model.safetensors"
    assert io.find_weights(both, "fp16").name == "diffusion_pytorch_model.fp16.safetensors"
    with pytest.raises(io.CheckpointReadError, match="no 'ema' variant; variants present: \\['fp16'\\]"):
        io.find_weights(both, "ema")
    tf = folder("tf", "model.safetensors", "pytorch_model.bin", "config.json")
    assert io.find_weights(tf).name == "model.safetensors"
    two = folder("two", "model.fp16.safetensors", "model.bf16.safetensors")
    with pytest.raises(io.CheckpointReadError, match=r"only variant weights \['bf16', 'fp16'\]"):
        io.find_weights(two)
    with pytest.raises(io.CheckpointReadError, match="no weights .* it holds \\['config.json'\\]"):
        io.find_weights(folder("none", "config.json"))


def original_state_dict(seed):
    """An original facebookresearch-layout DiT state dict (shapes of RefDiT in tests/test_dit.py;
    what is checked here is that the right tensors are read, not the network)."""
    from jdistill.models import layers

    rng, d, p = np.random.default_rng(seed), HEADS * HEAD_DIM, 2
    shapes = {"x_embedder.proj.weight": (d, 4, p, p), "x_embedder.proj.bias": (d,),
              "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
              "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (CLASSES + 1, d),
              "final_layer.linear.weight": (p * p * 8, d), "final_layer.linear.bias": (p * p * 8,),
              "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    for i in range(DEPTH):
        for name, out, inp in (("attn.qkv", 3 * d, d), ("attn.proj", d, d), ("mlp.fc1", 4 * d, d),
                               ("mlp.fc2", d, 4 * d), ("adaLN_modulation.1", 6 * d, d)):
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (out, inp), (out,)
    sd = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}
    grid = SIZE // p
    sd["pos_embed"] = torch.from_numpy(np.asarray(layers.sincos_pos_embed_2d(d, grid, grid), np.float32)[None])
    return sd


def test_original_dit_pt_with_training_wrappers(tmp_path, monkeypatch):
    """A training checkpoint {model, ema, opt, args}: the EMA weights are taken (what the original
    sampler loads), ``wrapper`` picks another entry; the config comes from the shapes."""
    ema, online = original_state_dict(1), original_state_dict(2)
    path = tmp_path / "0400000.pt"
    torch.save({"model": online, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, path)
    module = dit_conv.config_from_original(ema, num_heads=HEADS)
    ref_ema = dit_conv.load_params({k: v.numpy() for k, v in ema.items()}, module)
    ref_online = dit_conv.load_params({k: v.numpy() for k, v in online.items()}, module)

    # the width is no DiT preset's, so the head count cannot be read off the weights
    with pytest.raises(registry.UnsupportedModel, match="original-layout DiT, but hidden size 32 is not a DiT"):
        pretrained.convert(path, tmp_path / "refused")

    real = dit_conv.config_from_original
    with pytest.MonkeyPatch.context() as mp:  # a 32-wide preset would read 2 heads, as here
        mp.setattr(dit_conv, "config_from_original", lambda sd, **kw: real(sd, num_heads=HEADS, **kw))
        out = pretrained.load_pretrained(path, cache_dir=tmp_path / "cache")
        online_out = pretrained.load_pretrained(path, cache_dir=tmp_path / "cache", wrapper="model")
        plain = tmp_path / "plain.pt"
        torch.save(ema, plain)
        report = pretrained.convert(plain, tmp_path / "plain_out")
    assert report.kind == "file" and report.components[0].family == "dit"
    assert out.module == module and out.config == {
        "_class_name": "DiT", "input_size": SIZE, "patch_size": 2, "in_channels": 4, "hidden_size": HEADS * HEAD_DIM,
        "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 4.0, "num_classes": CLASSES, "learn_sigma": True}
    assert_trees_equal(out.params, ref_ema)
    assert_trees_equal(online_out.params, ref_online)
    manifest = json.loads((out.path / "jdistill.json").read_text())
    assert manifest["components"]["model"]["checkpoint_entry"] == "ema"
    # cached: the .pt is not opened again (not even to detect the layout)
    reads = CountingReads(monkeypatch, fail=True)
    assert_trees_equal(pretrained.load_pretrained(path, cache_dir=tmp_path / "cache").params, ref_ema)
    assert reads.opened == reads.n == 0
    assert_trees_equal(pretrained.load_pretrained(tmp_path / "plain_out").params, ref_ema)
    # the written config rebuilds the same module
    assert json.loads((tmp_path / "plain_out" / "config.json").read_text()) == out.config


def test_unwrap_rule():
    t = np.zeros(2, np.float32)
    assert io.unwrap({"a.weight": t}) == ({"a.weight": t}, "")
    assert io.unwrap({"epoch": 3, "state_dict": {"model": {"a": t}}})[1] == "state_dict.model"
    assert io.unwrap({"model": {"a": t}, "ema": {"b": t}})[1] == "ema"
    assert io.unwrap({"model": {"a": t}, "ema": {"b": t}}, "model")[1] == "model"
    with pytest.raises(io.CheckpointReadError, match=r"entries \['step'\] are not tensors"):
        io.unwrap({"a": t, "step": 3}, where="x.pt")
    with pytest.raises(io.CheckpointReadError, match="x.pt: no entry 'ema' to unwrap"):
        io.unwrap({"a": t}, "ema", where="x.pt")


def test_transformers_folder_clip(tmp_path):
    """A transformers model folder (config.json + model.safetensors): CLIPTextModelWithProjection."""
    import transformers

    from jdistill.convert import clip

    cfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = randomise(transformers.CLIPTextModelWithProjection(cfg))
    model.save_pretrained(tmp_path / "te")
    config = json.loads((tmp_path / "te" / "config.json").read_text())
    assert registry.family_for_config(config).name == "clip"
    module = clip.module_from_config(config)
    ref = clip.load_params(numpy_state(model), module)
    out = pretrained.load_pretrained(tmp_path / "te", cache_dir=tmp_path / "cache")
    assert out.family == "clip" and out.module == module
    assert_trees_equal(out.params, ref)

    # and back: transformers reads the export and holds the very same tensors
    export.export_diffusers("clip", out.module, out.params, out.config, tmp_path / "te_export")
    again = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "te_export")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


# ---------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, dit_model):
    """A DiT pipeline as diffusers saves it, plus a tokenizer-like folder to be copied."""
    root = tmp_path_factory.mktemp("pipe") / "dit-pipe"
    vae = randomise(diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                            layers_per_block=1, down_block_types=("DownEncoderBlock2D",),
                                            up_block_types=("UpDecoderBlock2D",)))
    pipe = diffusers.DiTPipeline(transformer=dit_model, vae=vae, scheduler=diffusers.DDIMScheduler(),
                                 id2label={0: "tench", 1: "goldfish"})
    pipe.save_pretrained(root)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    index = json.loads((root / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index["safety_checker"] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_pipeline_folder(pipeline_dir, dit_reference, tmp_path, capsys):
    src = source_kinds.open_source(pipeline_dir)
    assert isinstance(src, source_kinds.PipelineSource) and sorted(src.models) == ["transformer", "vae"]
    assert sorted(src.folders) == ["scheduler", "tokenizer"] and src.absent == {"safety_checker":
                                                                                 "null in model_index.json"}

    dst = tmp_path / "converted"
    assert cli.main_convert([str(pipeline_dir), str(dst), "--component", "transformer"]) == 0
    printed = capsys.readouterr().out
    assert "transformer" in printed and "tensors" in printed and "copied: scheduler, tokenizer" in printed
    manifest = json.loads((dst / "jdistill.json").read_text())
    assert list(manifest["components"]) == ["transformer"] and manifest["skipped"] == {"vae": "not selected"}
    assert manifest["components"]["transformer"]["tensors"] == len(jax.tree.leaves(dit_reference[1]))
    for f in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "transformer/config.json"):
        assert (dst / f).read_bytes() == (pipeline_dir / f).read_bytes(), f
    assert_trees_equal(pretrained.load_pretrained(dst).params, dit_reference[1])  # the only model: no component=

    # straight from the pipeline folder: only the component asked for is converted
    with pytest.raises(ValueError, match=r"holds 2 models \['transformer', 'vae'\]: pass component="):
        pretrained.load_pretrained(pipeline_dir, cache_dir=tmp_path / "cache")
    out = pretrained.load_pretrained(pipeline_dir, "transformer", cache_dir=tmp_path / "cache")
    assert_trees_equal(out.params, dit_reference[1])
    (entry,) = (tmp_path / "cache").iterdir()
    assert sorted(json.loads((entry / "jdistill.json").read_text())["components"]) == ["transformer"]


def test_pipeline_with_an_unsupported_component_names_it(pipeline_dir, tmp_path, monkeypatch):
    # the AutoencoderKL family as if its converter were not written yet
    fams = tuple(registry.Family("vae_not_written", f.description, f.diffusers_classes) if f.name == "vae" else f
                 for f in registry.FAMILIES)
    monkeypatch.setattr(registry, "FAMILIES", fams)
    with pytest.raises(registry.UnsupportedModel) as e:
        pretrained.convert(pipeline_dir, tmp_path / "out")
    msg = str(e.value)
    assert "vae:" in msg and "AutoencoderKL" in msg and "'vae_not_written' converter" in msg
    assert "components=['transformer']" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # refused before writing anything


def test_sd_pipeline_converts_every_component(tmp_path):
    """A Stable Diffusion-shaped pipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
    scheduler, tokenizer, null safety checker): every model converted by its own family."""
    import transformers

    from jdistill.convert import clip, unet_cond
    from jdistill.convert import vae as vae_conv

    root = tmp_path / "sd"
    models = {
        "unet": randomise(diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
        "vae": randomise(diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1,
                                                 down_block_types=("DownEncoderBlock2D",),
                                                 up_block_types=("UpDecoderBlock2D",))),
        "text_encoder": randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1))),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    diffusers.PNDMScheduler(skip_prk_steps=True).save_pretrained(root / "scheduler")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None], "requires_safety_checker": False}))

    report = pretrained.convert(root, tmp_path / "out")
    assert [(c.name, c.family) for c in report.components] == [("unet", "unet_cond"), ("vae", "vae"),
                                                               ("text_encoder", "clip")]
    assert sorted(report.copied) == ["scheduler", "tokenizer"] and list(report.skipped) == ["safety_checker"]
    for name, conv in (("unet", unet_cond), ("vae", vae_conv), ("text_encoder", clip)):
        out = pretrained.load_pretrained(tmp_path / "out", name)
        module = conv.module_from_config(json.loads((root / name / "config.json").read_text()))
        assert out.module == module
        assert_trees_equal(out.params, conv.load_params(numpy_state(models[name]), module))


# ---------------------------------------------------------------- cache


def test_cache_is_reused_without_reading_the_weights(sources, dit_reference, tmp_path, monkeypatch):
    src, cache = tmp_path / "src", tmp_path / "cache"
    shutil.copytree(sources / "single", src)
    reads = CountingReads(monkeypatch)
    first = pretrained.load_pretrained(src, cache_dir=cache)
    assert reads.n == len(jax.tree.leaves(dit_reference[1]))

    reads.fail = True  # any tensor read from now on fails the test
    second = pretrained.load_pretrained(src, cache_dir=cache)
    assert second.path == first.path and len(list(cache.iterdir())) == 1
    assert_trees_equal(second.params, dit_reference[1])

    # the key follows the dtype and the files' size / mtime: these convert again
    with pytest.raises(AssertionError, match="read "):
        pretrained.load_pretrained(src, dtype="bf16", cache_dir=cache)
    os.utime(src / "diffusion_pytorch_model.safetensors", ns=(1, 1))
    with pytest.raises(AssertionError, match="read "):
        pretrained.load_pretrained(src, cache_dir=cache)
    reads.fail = False
    half = pretrained.load_pretrained(src, dtype="bf16", cache_dir=cache)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    assert half.module.param_dtype == jnp.bfloat16
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


KILLED_MID_CONVERSION = textwrap.dedent("""
    import os, sys
    from jdistill.convert import pretrained

    real = pretrained.save_params

    def save_then_die(path, params):  # the params are on disk; configs and manifest are not yet
        real(path, params)
        os._exit(17)

    pretrained.save_params = save_then_die
    pretrained.load_pretrained(sys.argv[1], cache_dir=sys.argv[2])
""")


def test_killed_conversion_leaves_no_cache_entry(sources, dit_reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-c", KILLED_MID_CONVERSION, str(sources / "single"), str(cache)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 17, run.stderr[-2000:]
    (left,) = cache.iterdir()  # the half-written folder, under its temporary name only
    assert left.name.startswith(".single-") and ".partial-" in left.name and (left / "params").is_dir()
    assert not (left / "jdistill.json").exists()

    reads = CountingReads(monkeypatch)
    out = pretrained.load_pretrained(sources / "single", cache_dir=cache)
    assert reads.n > 0  # converted again, not taken from the half-written folder
    assert_trees_equal(out.params, dit_reference[1])
    assert [p.name for p in cache.iterdir()] == [out.path.name]  # the dead process's folder is cleared away


def test_folder_without_manifest_is_refused(sources, dit_reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    good = pretrained.load_pretrained(sources / "single", cache_dir=cache).path
    (good / "jdistill.json").unlink()  # e.g. a copy cut short
    with pytest.raises(ConversionError, match="not a complete jdistill folder: no jdistill.json"):
        pretrained.load_pretrained(good)
    reads = CountingReads(monkeypatch)
    again = pretrained.load_pretrained(sources / "single", cache_dir=cache)  # the cache rebuilds the entry
    assert again.path == good and reads.n > 0 and (good / "jdistill.json").is_file()
    assert_trees_equal(again.params, dit_reference[1])


# ---------------------------------------------------------------- errors


def test_truncated_files_are_named(sources, tmp_path):
    for fmt, victim in (("single", "diffusion_pytorch_model.safetensors"),
                        ("sharded", "diffusion_pytorch_model-00002-of-"), ("bin", "diffusion_pytorch_model.bin")):
        folder = tmp_path / fmt
        shutil.copytree(sources / fmt, folder)
        (file,) = [f for f in folder.iterdir() if f.name.startswith(victim)]
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        with pytest.raises(io.CheckpointReadError, match=rf"{file}: .*(truncated|corrupted)"):
            pretrained.convert(folder, tmp_path / f"out-{fmt}")
        assert not (tmp_path / f"out-{fmt}").exists()


def test_config_weights_mismatch_names_keys_and_file(sources, tmp_path):
    folder = tmp_path / "deeper"
    shutil.copytree(sources / "single", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": DEPTH + 1}))
    weights = folder / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ConversionError, match=rf"(?s){weights}: .*missing from the checkpoint:.*transformer_blocks_2/"):
        pretrained.convert(folder, tmp_path / "out")

    (folder / "config.json").write_text(json.dumps({**config, "attention_head_dim": 8}))
    with pytest.raises(ConversionError, match=r"(?s)shape mismatch:.*pos_embed.proj.weight"):
        pretrained.load_pretrained(folder, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_checkpoint_of_another_family(tmp_path):
    unet = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    # a DiT config beside a UNet's weights
    tiny_dit().save_pretrained(tmp_path / "dit")
    (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").unlink()
    safetensors.torch.save_file(unet.state_dict(), tmp_path / "dit" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError, match=r"not a DiT checkpoint \(it looks like a UNet or VAE\)"):
        pretrained.convert(tmp_path / "dit", tmp_path / "out")
    # the same weights as a bare file: no config to say what it is
    bare = tmp_path / "unet.safetensors"
    safetensors.torch.save_file(unet.state_dict(), bare)
    with pytest.raises(registry.UnsupportedModel, match=rf"{bare}: a diffusers UNet / VAE state dict cannot be "
                                                        "converted without its config"):
        pretrained.convert(bare, tmp_path / "out")
    # an original-layout file cut down to one UNet tensor (single files are read: tests/test_single_file.py)
    ldm = tmp_path / "v1-5-pruned.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, ldm)
    with pytest.raises(registry.UnsupportedModel, match="original-layout UNet without cross-attention weights"):
        pretrained.load_pretrained(ldm, cache_dir=tmp_path / "cache")


def test_registry():
    fam = lambda cfg: registry.family_for_config(cfg).name  # noqa: E731
    for cls, name in (("UNet2DModel", "unet2d"), ("UNet2DConditionModel", "unet_cond"), ("AutoencoderKL", "vae"),
                      ("ControlNetModel", "controlnet"), ("DiTTransformer2DModel", "dit"),
                      ("SD3Transformer2DModel", "mmdit")):
        assert fam({"_class_name": cls}) == name
    assert fam({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"}) == "dit"
    assert fam({"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model"}) == "clip"
    assert fam({"architectures": ["CLIPTextModel"]}) == "clip"
    assert fam({"model_type": "clip_text_model"}) == "clip"
    assert fam({"architectures": ["T5EncoderModel"], "model_type": "t5"}) == "t5"
    with pytest.raises(registry.UnsupportedModel, match="norm_type 'ada_norm_single' is not a DiT"):
        fam({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single"})
    with pytest.raises(registry.UnsupportedModel, match="FluxTransformer2DModel has no jdistill converter; supported"):
        fam({"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(registry.UnsupportedModel, match="t5 has no jdistill converter"):
        fam({"model_type": "t5"})  # a full encoder-decoder T5: not the encoder family
    with pytest.raises(registry.UnsupportedModel, match="names no model class"):
        fam({"hidden_size": 3})

    assert registry.get("dit").torch_class_name({"_class_name": "Transformer2DModel"}) == "DiTTransformer2DModel"
    assert registry.get("dit").load() is dit_conv and "dit" in registry.available()
    absent = registry.Family("no_such_family", "a Foo model", ("FooModel",))
    with pytest.raises(registry.UnsupportedModel, match=r"a Foo model is not supported yet: it needs the 'no_such_"
                                                        r"family' converter \(jdistill.convert.no_such_family\)"):
        absent.load()
    without_protocol = registry.Family("engine", "a Bar model", ("BarModel",))  # a module, not a converter
    with pytest.raises(registry.UnsupportedModel, match="does not provide module_from_config, load_params"):
        without_protocol.load()


def test_dit_protocol_wrappers(dit_model, dit_reference):
    module, params = dit_reference
    assert dit_conv.module_from_config(dict(dit_model.config)) == dit_conv.config_from_diffusers(dict(dit_model.config))
    bf = dit_conv.module_from_config(dict(dit_model.config), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert (bf.dtype, bf.param_dtype) == (jnp.bfloat16, jnp.bfloat16)
    args, kwargs = dit_conv.example_inputs(module, batch=3)
    assert args == () and kwargs["x"].shape == (3, SIZE, SIZE, 4)
    assert dit_conv.export_rules(module) and callable(dit_conv.export_rules(module)[0])
    with pytest.raises(ConversionError, match="original-layout DiT .* cannot be exported"):
        dit_conv.export_rules(module.clone(shared_embedder=True))


# ---------------------------------------------------------------- presets


def test_preset_without_local_copy_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JDISTILL_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(presets.PresetNotFound) as e:
        pretrained.load_pretrained("sd15", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    for where in (tmp_path / "models" / "sd15", tmp_path / "hub" / "models--runwayml--stable-diffusion-v1-5",
                  tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"):
        assert str(where) in msg
    assert "never downloads" in msg and "huggingface-cli download runwayml/stable-diffusion-v1-5" in msg
    assert cli.main_convert(["sdxl", str(tmp_path / "x")]) == 2
    assert "preset 'sdxl'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(presets.PresetNotFound, match="dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"):
        pretrained.resolve_preset("dit-xl-2-512-original")
    with pytest.raises(FileNotFoundError, match="not a preset name"):
        pretrained.load_pretrained("sd99")


def fake_hub_snapshot(hub, repo, files: dict):
    repo_dir = hub / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / "0123abcd"
    for name, content in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(json.dumps(content))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0123abcd")
    return snap


# facebook/DiT-XL-2-256's published configs (transformer as in tests/test_dit.py)
DIT_XL_256 = {
    "model_index.json": {"_class_name": "DiTPipeline", "_diffusers_version": "0.12.0.dev0",
                         "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", "AutoencoderKL"],
                         "transformer": ["diffusers", "Transformer2DModel"]},
    "transformer/config.json": {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate",
                                "attention_bias": True, "attention_head_dim": 72, "in_channels": 4,
                                "norm_type": "ada_norm_zero", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
                                "num_layers": 28, "out_channels": 8, "patch_size": 2, "sample_size": 32},
    "vae/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 4},
    "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                                        "beta_start": 0.0001, "num_train_timesteps": 1000},
}


def test_preset_found_in_hub_cache_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("JDISTILL_MODELS", raising=False)
    snap = fake_hub_snapshot(tmp_path / "hub", "facebook/DiT-XL-2-256", DIT_XL_256)
    assert pretrained.resolve_preset("dit-xl-2-256") == snap
    assert pretrained.resolve_preset("DiT-XL/2-256") == snap and presets.find("facebook/DiT-XL-2-256").name == "dit-xl-2-256"

    config = snap / "transformer" / "config.json"
    config.write_text(json.dumps({**DIT_XL_256["transformer/config.json"], "sample_size": 64}))
    with pytest.raises(presets.PresetMismatch, match="transformer/config.json: sample_size is 64, expected 32"):
        pretrained.resolve_preset("dit-xl-2-256")
    # the published DiT config is one jdistill builds, with DiT-XL/2's shape
    module = dit_conv.module_from_config(DIT_XL_256["transformer/config.json"])
    assert (module.hidden_size, module.depth, module.input_size) == (1152, 28, 32)


def test_preset_defaults_absent_values_and_file_presets(tmp_path, monkeypatch):
    sd15_scheduler = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "beta_start": 0.00085, "num_train_timesteps": 1000, "skip_prk_steps": True}
    assert presets.check_values(sd15_scheduler, presets.get("sd15").expect["scheduler"], "s") == []  # epsilon
    assert presets.check_values(sd15_scheduler, presets.get("sd21").expect["scheduler"], "s") == [
        "s: prediction_type is 'epsilon', expected 'v_prediction'"]
    for p in presets.PRESETS.values():
        assert (p.repo_id or p.url) and p.description and (p.is_file or p.folder == "model" or
                                                            p.default_component in p.expect)

    # a single-file preset found under $JDISTILL_MODELS, checked against the shapes it holds
    monkeypatch.setenv("JDISTILL_MODELS", str(tmp_path))
    torch.save(original_state_dict(0), tmp_path / "DiT-XL-2-256x256.pt")
    with pytest.MonkeyPatch.context() as mp:
        real = dit_conv.config_from_original
        mp.setattr(dit_conv, "config_from_original", lambda sd, **kw: real(sd, num_heads=HEADS, **kw))
        with pytest.raises(presets.PresetMismatch, match="hidden_size is 32, expected 1152"):
            pretrained.load_pretrained("dit-xl-2-256-original", cache_dir=tmp_path / "cache")


def test_load_pretrained_by_preset_name(pipeline_dir, dit_reference, tmp_path, monkeypatch):
    """A preset resolves to the local copy and loads its default component."""
    tiny = presets.Preset("tiny-dit", "example/tiny-dit", "a tiny DiT pipeline", pipeline=("DiTPipeline",),
                          components={"transformer": ("DiTTransformer2DModel",)}, default_component="transformer",
                          expect={"transformer": {"num_layers": DEPTH, "sample_size": SIZE}})
    monkeypatch.setitem(presets.PRESETS, "tiny-dit", tiny)
    monkeypatch.setenv("JDISTILL_MODELS", str(pipeline_dir.parent))
    monkeypatch.setattr(presets, "hub_cache_dir", lambda: tmp_path / "hub")
    (pipeline_dir.parent / "tiny-dit").symlink_to(pipeline_dir)
    out = pretrained.load_pretrained("tiny-dit", cache_dir=tmp_path / "cache")
    assert out.component == "transformer" and out.family == "dit" and out.path.name.startswith("tiny-dit-")
    assert_trees_equal(out.params, dit_reference[1])


# ---------------------------------------------------------------- export


def test_export_round_trip_to_diffusers(dit_model, sources, tmp_path):
    loaded = pretrained.load_pretrained(sources / "single", cache_dir=tmp_path / "cache")
    dst = export.export_diffusers("dit", loaded.module, loaded.params, loaded.config, tmp_path / "exported")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    again = diffusers.DiTTransformer2DModel.from_pretrained(dst).eval()
    for k, v in dit_model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, SIZE, SIZE, 4)).astype(np.float32)
    t, y = np.array([3.0, 870.5], np.float32), np.array([1, CLASSES], np.int64)
    ours = loaded.module.apply({"params": loaded.params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))
    with torch.no_grad():
        theirs = again(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(y)).sample.numpy()
    assert_close(np.asarray(ours), nhwc(theirs), 1e-5, "Flax vs exported diffusers DiT")

    with pytest.raises(FileExistsError, match="exists"):
        export.export_diffusers("dit", loaded.module, loaded.params, loaded.config, dst)
    half = export.export_diffusers(dit_conv, loaded.module, loaded.params, loaded.config, tmp_path / "bf16",
                                   dtype="bf16")
    with safetensors.safe_open(half / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor("proj_out_2.weight").dtype == torch.bfloat16


def test_cli_dtype_and_overwrite(sources, tmp_path, capsys):
    dst = tmp_path / "bf16"
    assert cli.main_convert([str(sources / "sharded"), str(dst), "--dtype", "bf16"]) == 0
    assert "as bfloat16" in capsys.readouterr().out
    out = pretrained.load_pretrained(dst)
    assert {x.dtype for x in jax.tree.leaves(out.params)} == {jnp.dtype(jnp.bfloat16)}
    assert pretrained.load_pretrained(dst, dtype="fp32").module.param_dtype == jnp.float32
    assert cli.main_convert([str(sources / "single"), str(dst)]) == 2
    assert "exists (pass overwrite=True / --overwrite" in capsys.readouterr().err
    assert cli.main_convert([str(sources / "single"), str(dst), "--overwrite"]) == 0
    assert json.loads((dst / "jdistill.json").read_text())["dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir()] == ["bf16"]  # no temporary folder left behind


# ---------------------------------------------------------------- memory

MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    from jdistill.convert import pretrained

    def status():
        d = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon")}

    warm, big, out = sys.argv[1:4]
    pretrained.convert(warm, out + "-warm")  # imports, tracing, Orbax start-up: not the weights' cost
    peak_anon, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
            time.sleep(0.001)

    before = status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    sampler = threading.Thread(target=sample)
    sampler.start()
    report = pretrained.convert(big, out)
    done.set()
    sampler.join()
    print(json.dumps({"weights": sum(c.bytes for c in report.components),
                      "rss_peak_growth": status()["VmHWM"] - before["VmRSS"],
                      "anon_peak_growth": peak_anon[0] - before["RssAnon"]}))
""")


def test_streamed_conversion_holds_about_two_copies(tmp_path, dit_model, sources):
    """Converting a 70 MB model: peak RSS growth <= 2 copies of the weights (+ 32 MB), where
    one copy is the source's page cache mapped by safetensors / torch mmap; anonymous
    memory (what cannot be dropped) grows by about one copy, the converted tree."""
    torch.manual_seed(0)
    big = diffusers.DiTTransformer2DModel(num_attention_heads=8, attention_head_dim=64, in_channels=4,
                                          out_channels=8, num_layers=3, sample_size=16, num_embeds_ada_norm=1000)
    big.save_pretrained(tmp_path / "big_st")
    big.save_pretrained(tmp_path / "big_bin", safe_serialization=False)
    results = {}
    for fmt, warm in (("st", sources / "single"), ("bin", sources / "bin")):
        run = subprocess.run([sys.executable, "-c", MEASURE, str(warm), str(tmp_path / f"big_{fmt}"),
                              str(tmp_path / f"out_{fmt}")], capture_output=True, text=True, timeout=240,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert run.returncode == 0, run.stderr[-3000:]
        results[fmt] = r = json.loads(run.stdout.strip().splitlines()[-1])
        mb = {k: round(v / 2**20, 1) for k, v in r.items()}
        print(f"\n{fmt}: {mb} MiB")
        assert 60e6 < r["weights"] < 80e6
        assert r["rss_peak_growth"] <= 2 * r["weights"] + 32 * 2**20, mb
        assert r["anon_peak_growth"] <= 1 * r["weights"] + 32 * 2**20, mb
