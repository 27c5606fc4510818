"""LoRA adapters against diffusers / PEFT (fp32): merged, unmerged and trained, saved back.

Tiny pipelines with random weights are saved as diffusers folders and converted by jdistill;
LoRAs are made by PEFT on the PyTorch models (``init_lora_weights=False``, so both factors
are random and every delta is non-zero), saved by diffusers' ``save_lora_weights`` with
their adapter metadata (ranks and alphas that differ per module), and:

* merged: jdistill's ``lora.merge`` of the converted params equals diffusers'
  ``load_lora_weights`` + ``fuse_lora(lora_scale)`` for the SD UNet (conv and linear modules)
  and the SD3 MMDiT, and PEFT's own merge for the CLIP and T5 text encoders (<= 1e-4
  relative). (diffusers loads text-encoder LoRAs through transformers' PEFT integration, which
  in transformers 5.24 wants peft >= 0.22; the registry's newest is 0.21.2, which PEFT's own
  ``inject_adapter_in_model`` works with, so the text encoders are compared with PEFT.)
* unmerged: the same merge inside a jitted forward equals the merged params' forward, and its
  gradient with respect to the factors equals PyTorch autograd's on PEFT's lora_A / lora_B;
* kohya: the same adapter written in kohya's layout, with diffusers' names (SD 1.x trainers)
  and with the original UNet's (SDXL trainers), reads to exactly the factors of the PEFT file,
  and diffusers fuses it to the same UNet;
* saved: factors jdistill made and changed are saved in diffusers' layout and diffusers'
  ``load_lora_weights`` reproduces jdistill's merge;
* refused: DoRA, a LoRA for another model, a component not given.
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
import transformers
from test_text_to_image import clip_tower, vae, write_clip_tokenizer
from test_unet_cond import randomize_

from jdistill.convert import engine, lora, pretrained, unet_cond
from jdistill.testing import assert_close, nchw, nhwc

TOL = 1e-4
SCALE = 0.7
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def tiny_unet(seed, **kw):
    cfg = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=32, attention_head_dim=2,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return randomize_(diffusers.UNet2DConditionModel(**{**cfg, **kw}), seed=seed).eval()


def peft_config(targets, r=4, alpha=8, **kw):
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)


def metadata(config):
    """A LoraConfig as diffusers' save_lora_weights stores it (JSON-able)."""
    return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD pipeline (converted by jdistill) and a PEFT LoRA of its UNet and text encoder,
    with per-module ranks and alphas, saved by diffusers."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tok, n = write_clip_tokenizer(root / "tok")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae(1), text_encoder=clip_tower(n, 2), tokenizer=tok, unet=tiny_unet(3),
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(root / "diffusers")
    pretrained.convert(root / "diffusers", root / "jdistill")
    unet_cfg = peft_config(UNET_TARGETS, rank_pattern={"proj_in": 2}, alpha_pattern={"conv1": 3})
    te_cfg = peft_config(TE_TARGETS, r=3, alpha=5)
    torch.manual_seed(1)
    pipe.unet.add_adapter(unet_cfg)
    peft.inject_adapter_in_model(te_cfg, pipe.text_encoder)
    layers = {"unet_lora_layers": peft.get_peft_model_state_dict(pipe.unet),
              "text_encoder_lora_layers": peft.get_peft_model_state_dict(pipe.text_encoder)}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root / "lora", **layers, unet_lora_adapter_metadata=metadata(unet_cfg),
        text_encoder_lora_adapter_metadata=metadata(te_cfg))
    targets = {name: pretrained.load_pretrained(root / "jdistill", name) for name in ("unet", "text_encoder")}
    return dict(root=root, pipe=pipe, layers=layers, targets=targets, te_cfg=te_cfg,
                file=root / "lora" / "pytorch_lora_weights.safetensors")


def fused_unet(root, lora_path, scale=SCALE):
    """A fresh diffusers UNet from the folder with the LoRA file's UNet part loaded and fused."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "diffusers")
    # unet_config lets diffusers map the original (SGM) block names of SDXL trainers, as its SDXL loader does
    state, alphas, meta = pipe.lora_state_dict(lora_path, return_lora_metadata=True, unet_config=pipe.unet.config)
    pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, metadata=meta, _pipeline=pipe)
    pipe.fuse_lora(components=["unet"], lora_scale=scale)
    return pipe.unet


def peft_merged(model, config, state, scale=SCALE):
    """``model`` with a PEFT adapter of ``config`` set to ``state`` (PEFT keys, no prefix) and merged
    by PEFT at ``scale``."""
    peft.inject_adapter_in_model(config, model)
    result = peft.set_peft_model_state_dict(model, state)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name in module.scaling:
                module.scaling[name] *= scale
            module.merge()
    return model.eval()


def unet_io(module, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((2, 8, 8, module.in_channels)).astype(np.float32)
    t = np.array([981.0, 5.0], np.float32)
    ctx = rng.standard_normal((2, 6, module.context_dim)).astype(np.float32)
    return z, t, ctx


def unet_pair(target, params, torch_unet, seed=0):
    z, t, ctx = unet_io(target.module, seed)
    ours = target.module.apply({"params": params}, jnp.asarray(z), jnp.asarray(t), jnp.asarray(ctx))
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(nchw(z)), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    return np.asarray(ours), nhwc(ref.numpy())


def text_pair(target, params, torch_te, seed=0):
    ids = np.random.default_rng(seed).integers(0, torch_te.config.vocab_size, (2, 16))
    ours = target.module.apply({"params": params}, jnp.asarray(ids)).last_hidden_state
    with torch.no_grad():
        ref = torch_te(torch.from_numpy(ids)).last_hidden_state
    return np.asarray(ours), ref.numpy()


def test_merged_equals_diffusers_fuse_lora(sd):
    factors = lora.read(sd["file"], sd["targets"])
    assert sorted(factors) == ["text_encoder", "unet"]
    unet, te = sd["targets"]["unet"], sd["targets"]["text_encoder"]
    assert len(factors["unet"]) == len(sd["layers"]["unet_lora_layers"]) // 2
    # the per-module ranks and alphas of the metadata arrived
    proj_in = next(f for p, f in factors["unet"].items() if p[-2] == "proj_in")
    conv1 = next(f for p, f in factors["unet"].items() if p[-2] == "conv1")
    assert (proj_in.rank, proj_in.ratio, conv1.rank, conv1.ratio) == (2, 4.0, 4, 0.75)
    assert conv1.down.ndim == 4 and conv1.down.shape[:2] == (3, 3)  # a 3x3 LoRA convolution
    theirs = fused_unet(sd["root"], sd["file"])
    ours, ref = unet_pair(unet, lora.merge(unet.params, factors["unet"], SCALE), theirs)
    assert_close(ours, ref, TOL, "UNet with the LoRA fused")
    base, _ = unet_pair(unet, unet.params, theirs)
    assert np.abs(base - ref).max() > 100 * TOL * np.abs(ref).max()  # the LoRA changes the output
    te_ref = peft_merged(transformers.CLIPTextModel.from_pretrained(sd["root"] / "diffusers" / "text_encoder"),
                         sd["te_cfg"], sd["layers"]["text_encoder_lora_layers"])
    ours, ref = text_pair(te, lora.merge(te.params, factors["text_encoder"], SCALE), te_ref)
    assert_close(ours, ref, TOL, "text encoder with the LoRA merged")


def test_unmerged_equals_merged_and_trains_like_peft(sd):
    """The factors kept apart: merged inside the jitted forward equals the merged params, and the
    gradient of a loss with respect to the factors is PyTorch's on PEFT's lora_A / lora_B."""
    te = sd["targets"]["text_encoder"]
    factors = lora.read(sd["file"], sd["targets"])["text_encoder"]
    ids = np.random.default_rng(3).integers(0, 50, (2, 16))
    weights = np.random.default_rng(4).standard_normal((2, 16, te.module.hidden_size)).astype(np.float32)

    def loss(f, base):
        out = te.module.apply({"params": lora.merge(base, f, 1.0)}, jnp.asarray(ids)).last_hidden_state
        return jnp.sum(out * weights)

    merged = lora.merge(te.params, factors, 1.0)
    direct = te.module.apply({"params": merged}, jnp.asarray(ids)).last_hidden_state
    assert_close(jax.jit(lambda f: te.module.apply({"params": lora.merge(te.params, f, 1.0)},
                                                   jnp.asarray(ids)).last_hidden_state)(factors), direct, 1e-6,
                 "merged in the forward vs merged before")
    grads = jax.jit(jax.grad(loss))(factors, te.params)
    assert set(grads) == set(factors) and all(g.ratio == f.ratio for g, f in zip(grads.values(), factors.values()))

    torch_te = sd["pipe"].text_encoder  # PEFT's unmerged adapter, scale alpha / r
    torch_te.zero_grad()
    out = torch_te(torch.from_numpy(ids)).last_hidden_state
    (out * torch.from_numpy(weights)).sum().backward()
    named = dict(torch_te.named_parameters())
    for path, g in grads.items():
        module = ".".join(path[1:-1]).replace("layers_", "layers.")  # text_model/encoder/layers_0/... -> torch
        a = named[f"{module}.lora_A.default.weight"].grad.numpy()
        b = named[f"{module}.lora_B.default.weight"].grad.numpy()
        assert_close(g.down, a.T, TOL, f"d loss / d down {module}")
        assert_close(g.up, b.T, TOL, f"d loss / d up {module}")


def kohya(layers, alphas, name_map=lambda m: m):
    """A PEFT state dict in kohya's layout: lora_unet_ / lora_te_ prefixes, module dots flattened,
    lora_down / lora_up, one alpha per module. ``name_map`` renames UNet modules first."""
    out = {}
    for prefix, sd in layers.items():
        for key, v in sd.items():
            module, part = key.rsplit(".lora_", 1)
            new = (name_map(module) if prefix == "lora_unet_" else module).replace(".", "_")
            out[f"{prefix}{new}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v.contiguous()
            if part.startswith("A"):
                out[f"{prefix}{new}.alpha"] = torch.tensor(float(alphas(prefix, module)))
    return out


def test_kohya_layouts_equal_their_diffusers_counterpart(sd, tmp_path):
    peft_factors = lora.read(sd["file"], sd["targets"])

    def alpha_of(prefix, module):  # the fixture's PEFT configs: UNet alpha 8 (conv1: 3), text encoder 5
        if prefix == "lora_te_":
            return 5
        return 3 if module.endswith("conv1") else 8

    layers = {"lora_unet_": sd["layers"]["unet_lora_layers"], "lora_te_": sd["layers"]["text_encoder_lora_layers"]}
    config = dict(sd["pipe"].unet.config)
    inverse = {v: k for k, v in unet_cond.ldm_table(config).items()}
    for name, name_map in (("diffusers-names", lambda m: m), ("original-names", lambda m: engine.rename_by_table(m, inverse))):
        file = tmp_path / f"kohya-{name}.safetensors"
        safetensors.torch.save_file(kohya(layers, alpha_of, name_map), file)
        got = lora.read(file, sd["targets"])
        for comp in ("unet", "text_encoder"):
            assert got[comp].keys() == peft_factors[comp].keys(), (name, comp)
            for p, f in got[comp].items():
                g = peft_factors[comp][p]
                np.testing.assert_array_equal(f.down, g.down)
                np.testing.assert_array_equal(f.up, g.up)
                assert f.ratio == pytest.approx(g.ratio, rel=1e-6), (name, p)
        # and diffusers reads the kohya file to the same fused UNet
        theirs = fused_unet(sd["root"], file)
        unet = sd["targets"]["unet"]
        ours, ref = unet_pair(unet, lora.merge(unet.params, got["unet"], SCALE), theirs)
        assert_close(ours, ref, TOL, f"UNet with the kohya ({name}) LoRA fused")


def test_saved_lora_reloads_in_diffusers(sd, tmp_path):
    """Fresh factors (init: the merge is the base model exactly), changed as a train step would
    change them, saved in diffusers' layout: diffusers fuses them to jdistill's merge."""
    unet, te = sd["targets"]["unet"], sd["targets"]["text_encoder"]
    fresh = lora.init(unet.params, 4, jax.random.key(0), targets=("to_q", "to_v", "proj_in", "conv1"), alpha=2.0)
    assert all(f.ratio == 0.5 for f in fresh.values())
    base = unet.params
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(lora.merge(base, fresh)), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
    rng = np.random.default_rng(5)
    # conv1 with its own alpha: the saved metadata needs an alpha_pattern for it
    trained = {p: lora.Factor(f.down, jnp.asarray(0.05 * rng.standard_normal(f.up.shape), jnp.float32),
                              1.25 if p[-2] == "conv1" else f.ratio) for p, f in fresh.items()}
    trained_te = {p: lora.Factor(f.down, jnp.asarray(0.05 * rng.standard_normal(f.up.shape), jnp.float32), 1.5)
                  for p, f in lora.init(te.params, 2, jax.random.key(1), targets=("q_proj", "fc2")).items()}
    path = lora.save(tmp_path / "saved", {"unet": trained, "text_encoder": trained_te}, sd["targets"])
    again = lora.read(path, sd["targets"])
    for p, f in trained.items():
        np.testing.assert_allclose(again["unet"][p].down, f.down, rtol=0, atol=0)
        assert again["unet"][p].ratio == pytest.approx(f.ratio)
    theirs = fused_unet(sd["root"], path, scale=1.0)
    ours, ref = unet_pair(unet, lora.merge(unet.params, trained), theirs)
    assert_close(ours, ref, TOL, "UNet with the saved LoRA, fused by diffusers")
    # the text encoder's part, as diffusers would hand it to PEFT: the metadata's config, the keys unprefixed
    state, _, meta = diffusers.StableDiffusionPipeline.lora_state_dict(path, return_lora_metadata=True)
    config = peft.LoraConfig(**{k[len("text_encoder."):]: v for k, v in meta.items() if k.startswith("text_encoder.")})
    te_state = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    te_ref = peft_merged(transformers.CLIPTextModel.from_pretrained(sd["root"] / "diffusers" / "text_encoder"),
                         config, te_state, scale=1.0)
    ours, ref = text_pair(te, lora.merge(te.params, trained_te), te_ref)
    assert_close(ours, ref, TOL, "text encoder with the saved LoRA, merged by PEFT")


def test_refused_loras(sd, tmp_path):
    layers = {**{f"unet.{k}": v for k, v in sd["layers"]["unet_lora_layers"].items()}}
    # DoRA
    dora = tmp_path / "dora.safetensors"
    key = next(k for k in layers if "lora_A" in k).replace("lora_A.weight", "lora_magnitude_vector")
    safetensors.torch.save_file({**layers, key: torch.ones(3)}, dora)
    with pytest.raises(lora.LoRAError, match="DoRA"):
        lora.read(dora, sd["targets"])
    # a LoRA for another UNet (wider cross-attention: every to_k / to_v shape differs)
    other = tiny_unet(9, cross_attention_dim=48)
    other.add_adapter(peft_config(["to_k", "to_v"]))
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({f"unet.{k}": v.contiguous() for k, v in peft.get_peft_model_state_dict(other).items()},
                                foreign)
    with pytest.raises(lora.LoRAError, match=r"(?s)do not fit the models given.*attn2.to_k.*do not fit the kernel"):
        lora.read(foreign, sd["targets"])
    # a component the caller did not give
    with pytest.raises(lora.LoRAError, match=r"adapts \['text_encoder'\], which were not given"):
        lora.read(sd["file"], {"unet": sd["targets"]["unet"]})
    assert sorted(lora.read(sd["file"], {"unet": sd["targets"]["unet"]}, components=["unet"])) == ["unet"]


# ------------------------------------------------------------------------------- SD3 MMDiT and T5


def test_sd3_transformer_lora(tmp_path):
    from test_mmdit import randomise as randomise_mmdit
    from test_text_to_image import t5_tokenizer

    tok1, n1 = write_clip_tokenizer(tmp_path / "tok1")
    tok2, n2 = write_clip_tokenizer(tmp_path / "tok2", pad="!")
    tok3, n3 = t5_tokenizer(tmp_path / "tok3")
    torch.manual_seed(0)
    transformer = randomise_mmdit(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=40,
        pos_embed_max_size=8).eval(), seed=30)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=n3, d_model=48, d_kv=8, d_ff=64, num_layers=2,
                                                           num_heads=3, feed_forward_proj="gated-gelu"))
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae(31, use_quant_conv=False, use_post_quant_conv=False), text_encoder=clip_tower(n1, 32, 16, projection=16),
        tokenizer=tok1, text_encoder_2=clip_tower(n2, 33, 24, "gelu", projection=24), tokenizer_2=tok2,
        text_encoder_3=t5.eval(), tokenizer_3=tok3)
    pipe.save_pretrained(tmp_path / "diffusers")
    pretrained.convert(tmp_path / "diffusers", tmp_path / "jdistill", components=["transformer", "text_encoder_3"])
    target = pretrained.load_pretrained(tmp_path / "jdistill", "transformer")
    t5_target = pretrained.load_pretrained(tmp_path / "jdistill", "text_encoder_3")

    cfg = peft_config(["to_q", "to_k", "to_v", "add_k_proj", "to_add_out", "ff.net.2", "norm1.linear", "proj_out"])
    torch.manual_seed(2)
    pipe.transformer.add_adapter(cfg)
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=peft.get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=metadata(cfg))
    # T5: diffusers' SD3 loader has no T5 LoRA; PEFT's own adapter on it, saved with its component prefix
    t5_cfg = peft_config(["q", "k", "v", "o", "wi_0", "wo"], r=2, alpha=3)
    t5_lora = peft.inject_adapter_in_model(t5_cfg, transformers.T5EncoderModel.from_pretrained(
        tmp_path / "diffusers" / "text_encoder_3").eval())
    raw = peft.get_peft_model_state_dict(t5_lora)
    t5_state = {f"text_encoder_3.{k}": v.contiguous() for k, v in raw.items()}
    safetensors.torch.save_file(t5_state, tmp_path / "t5_lora.safetensors",
                                metadata={lora.METADATA_KEY: json.dumps({f"text_encoder_3.{k}": v for k, v in
                                                                         metadata(t5_cfg).items()})})

    factors = lora.read(tmp_path / "lora", {"transformer": target})["transformer"]
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "diffusers")
    theirs.load_lora_weights(tmp_path / "lora")
    theirs.fuse_lora(components=["transformer"], lora_scale=SCALE)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([900.0, 3.0], np.float32)
    ctx = rng.standard_normal((2, 7, 48)).astype(np.float32)
    pooled = rng.standard_normal((2, 40)).astype(np.float32)
    ours = target.module.apply({"params": lora.merge(target.params, factors, SCALE)}, jnp.asarray(z), jnp.asarray(t),
                               encoder_hidden_states=jnp.asarray(ctx), pooled_projections=jnp.asarray(pooled))
    with torch.no_grad():
        ref = theirs.transformer(hidden_states=torch.from_numpy(nchw(z)), timestep=torch.from_numpy(t),
                                 encoder_hidden_states=torch.from_numpy(ctx),
                                 pooled_projections=torch.from_numpy(pooled)).sample
    assert_close(ours, nhwc(ref.numpy()), TOL, "SD3 transformer with the LoRA fused")

    t5_factors = lora.read(tmp_path / "t5_lora.safetensors", {"text_encoder_3": t5_target})["text_encoder_3"]
    assert len(t5_factors) == len(t5_state) // 2
    ids = rng.integers(0, n3, (2, 9))
    ours = t5_target.module.apply({"params": lora.merge(t5_target.params, t5_factors, SCALE)}, jnp.asarray(ids))
    t5_ref = peft_merged(transformers.T5EncoderModel.from_pretrained(tmp_path / "diffusers" / "text_encoder_3"),
                         t5_cfg, raw)
    with torch.no_grad():
        ref = t5_ref(torch.from_numpy(ids)).last_hidden_state
    assert_close(ours.last_hidden_state, ref.numpy(), TOL, "T5 with the LoRA merged")


def test_text_to_image_with_lora(sd):
    """TextToImage.with_lora merges the file into the network and the towers it adapts."""
    from jdistill.pipelines import TextToImage

    t2i = TextToImage.from_pretrained(sd["root"] / "jdistill")
    adapted = t2i.with_lora(sd["file"], SCALE)
    factors = lora.read(sd["file"], sd["targets"])
    for got, want in ((adapted.params["network"], lora.merge(t2i.params["network"], factors["unet"], SCALE)),
                      (adapted.params["text_encoders"][0],
                       lora.merge(t2i.params["text_encoders"][0], factors["text_encoder"], SCALE))):
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
    assert adapted.params["vae"] is t2i.params["vae"]
