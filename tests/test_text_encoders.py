"""CLIP text encoders and the T5 encoder in Flax against transformers (fp32, <= 1e-4 relative).

Real transformers models at tiny sizes (2 layers, width 32, 4 heads, vocab 1000, 16
positions), every parameter re-randomised (norm scales around 1, everything else around
0, so no parameter sits at an init value that could hide a swapped or skipped tensor),
saved with ``save_pretrained`` (safetensors), read back with safetensors, and converted
through the family protocol: ``module_from_config(config.json)``, ``load_params``.
Compared: last hidden state, pooled output, every layer's hidden state (the
penultimate one included), text_embeds; T5 with a padding mask. Then the error paths,
export back to transformers' keys, and tokenisation from local tokenizer folders.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import traverse_util

from jdistill.convert import clip as convert_clip
from jdistill.convert import engine
from jdistill.convert import t5 as convert_t5
from jdistill.convert.engine import ConversionError
from jdistill.models import clip as clip_lib
from jdistill.models import t5 as t5_lib
from jdistill.models import tokenizers
from jdistill.testing import assert_close

TOL = 1e-4
VOCAB, HIDDEN, HEADS, LAYERS, POSITIONS, BATCH = 1000, 32, 4, 2, 16, 3
CLIP_EOS, CLIP_BOS = VOCAB - 1, VOCAB - 2  # as in CLIP's vocab: end-of-text is the largest id


def randomise(model, seed):
    """Every parameter redrawn: norm scales N(1, 0.2), biases N(0, 0.1), tables (token, position,
    relative-bias) N(0, 1), Linear weights N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                torch.nn.init.normal_(p, 1.0, 0.2, generator=gen)
            elif p.ndim <= 1:  # biases, CLIPModel's logit_scale
                torch.nn.init.normal_(p, 0.0, 0.1, generator=gen)
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                torch.nn.init.normal_(p, 0.0, 1.0, generator=gen)
            else:
                torch.nn.init.normal_(p, 0.0, p.shape[1] ** -0.5, generator=gen)
    return model.eval()


def save_and_read(model, folder):
    """save_pretrained as safetensors, then what a loader sees: config.json and the tensors."""
    model.save_pretrained(folder)
    with open(folder / "config.json") as f:
        config = json.load(f)
    return config, safetensors.numpy.load_file(folder / "model.safetensors")


def clip_text_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=POSITIONS, bos_token_id=CLIP_BOS,
                pad_token_id=CLIP_EOS)
    return transformers.CLIPTextConfig(**{**base, **kw})


def clip_ids(eos, pad, seed=0):
    """(BATCH, POSITIONS) rows [bos, words..., eos, pad...] with the eos at 6, at the very end and at 3.
    Words are drawn from the whole vocab (bos / eos aside), so with an eos below the largest id the
    argmax-of-ids rule and the first-eos rule pick different tokens."""
    rng = np.random.default_rng(seed)
    words = np.setdiff1d(np.arange(1, VOCAB - 2), [eos])
    ids = rng.choice(words, (BATCH, POSITIONS)).astype(np.int64)
    ids[:, 0] = CLIP_BOS
    mask = np.ones_like(ids)
    for row, end in enumerate((6, POSITIONS - 1, 3)):
        ids[row, end] = eos
        ids[row, end + 1:] = pad
        mask[row, end + 1:] = 0
    return ids, mask


# name -> (transformers class, config overrides, eos token in the ids, pad token in the ids)
CLIP_CASES = {
    # OpenAI CLIP-L as SD 1.x / SDXL ship it: quick_gelu, the legacy eos_token_id 2 (argmax-of-ids
    # pooling), padded with the eos token
    "clip-l": (transformers.CLIPTextModel, dict(hidden_act="quick_gelu", eos_token_id=2), CLIP_EOS, CLIP_EOS),
    # OpenCLIP-H / bigG style: gelu, projection, a real eos_token_id below the largest word ids
    # (first-eos pooling), padded with id 0 (bigG's "!")
    "open-clip-proj": (transformers.CLIPTextModelWithProjection,
                       dict(hidden_act="gelu", eos_token_id=500, projection_dim=24), 500, 0),
}


@pytest.fixture(scope="module", params=sorted(CLIP_CASES))
def clip_case(request, tmp_path_factory):
    cls, overrides, eos, pad = CLIP_CASES[request.param]
    torch.manual_seed(0)
    model = randomise(cls(clip_text_config(**overrides)), seed=1)
    config, sd = save_and_read(model, tmp_path_factory.mktemp(request.param))
    module = convert_clip.module_from_config(config)
    return dict(name=request.param, model=model, config=config, sd=sd, module=module,
                params=convert_clip.load_params(sd, module), eos=eos, pad=pad)


def torch_clip(model, ids, mask=None):
    text_model = getattr(model, "text_model", model)  # the pooled output is only on the inner model
    kw = dict(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    if mask is not None:
        kw["attention_mask"] = torch.from_numpy(mask)
    with torch.no_grad():
        out = text_model(**kw)
        embeds = model.text_projection(out.pooler_output) if hasattr(model, "text_projection") else None
    return out, embeds


def flax_clip(module, params, ids, mask=None):
    return jax.jit(module.apply)({"params": params}, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))


def assert_clip_parity(module, params, model, ids, mask=None, what=""):
    ref, ref_embeds = torch_clip(model, ids, mask)
    out = flax_clip(module, params, ids, mask)
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for i, (a, e) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, e.numpy(), TOL, f"{what}: hidden_states[{i}]")
    assert_close(out.hidden_states[-2], ref.hidden_states[-2].numpy(), TOL, f"{what}: penultimate layer")
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), TOL, f"{what}: last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output.numpy(), TOL, f"{what}: pooled output")
    if ref_embeds is None:
        assert out.text_embeds is None and module.projection_dim is None
    else:
        assert out.text_embeds.shape == (BATCH, module.projection_dim)
        assert_close(out.text_embeds, ref_embeds.numpy(), TOL, f"{what}: text_embeds")
    return out


def test_clip_parity(clip_case):
    c = clip_case
    ids, _ = clip_ids(c["eos"], c["pad"])
    out = assert_clip_parity(c["module"], c["params"], c["model"], ids, what=c["name"])
    # the pooled token is the end-of-text token of each row, under either pooling rule
    ends = [6, POSITIONS - 1, 3]
    np.testing.assert_array_equal(np.asarray(out.pooler_output),
                                  np.asarray(out.last_hidden_state)[np.arange(BATCH), ends])


def test_clip_parity_with_padding_mask(clip_case):
    c = clip_case
    ids, mask = clip_ids(c["eos"], c["pad"], seed=3)
    assert_clip_parity(c["module"], c["params"], c["model"], ids, mask, what=f"{c['name']} + attention mask")


def test_clip_pooling_rules():
    ids = np.array([[7, 50, 999, 3, 999], [7, 999, 500, 500, 0], [1, 2, 3, 4, 5]])
    # legacy (eos_token_id 2): the largest id, first of equals
    np.testing.assert_array_equal(clip_lib.eos_positions(ids, 2), [2, 1, 4])
    # otherwise: the first eos, 0 when there is none
    np.testing.assert_array_equal(clip_lib.eos_positions(ids, 500), [0, 2, 0])


def test_clip_config_fields(clip_case):
    m, cfg = clip_case["module"], clip_case["config"]
    assert (m.hidden_act, m.eos_token_id, m.num_layers) == (cfg["hidden_act"], cfg["eos_token_id"], LAYERS)
    assert (m.projection_dim is not None) == ("CLIPTextModelWithProjection" in cfg["architectures"])
    # the projection is the caller's to override (a CLIPTextConfig always has a projection_dim)
    assert convert_clip.module_from_config(cfg, with_projection=False).projection_dim is None


def test_clip_legacy_layout_and_position_ids():
    """transformers 5 writes CLIPTextModel without the text_model. prefix; transformers 4 checkpoints
    (SD's text_encoder folders) have it, older ones with the position_ids buffer as well."""
    cls, overrides, _, _ = CLIP_CASES["clip-l"]
    model = randomise(cls(clip_text_config(**overrides)), seed=5)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert not any(k.startswith("text_model.") for k in sd)
    legacy = {f"text_model.{k}": v for k, v in sd.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(POSITIONS)[None]
    module = convert_clip.module_from_config(model.config.to_dict())
    a = traverse_util.flatten_dict(convert_clip.load_params(sd, module))
    b = traverse_util.flatten_dict(convert_clip.load_params(legacy, module))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))


def test_clip_full_clipmodel_checkpoint(tmp_path):
    """A full CLIPModel: module_from_config takes its text_config and projection_dim, load_params
    its text tower and text_projection (the image tower is skipped)."""
    config = transformers.CLIPConfig(
        text_config=clip_text_config(hidden_act="gelu", eos_token_id=CLIP_EOS).to_dict(),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=20)
    model = randomise(transformers.CLIPModel(config), seed=7)
    cfg, sd = save_and_read(model, tmp_path)
    assert any(k.startswith("vision_model.") for k in sd)
    module = convert_clip.module_from_config(cfg)
    assert module.projection_dim == 20
    params = convert_clip.load_params(sd, module)
    ids, _ = clip_ids(CLIP_EOS, CLIP_EOS)
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids))
    out = flax_clip(module, params, ids)
    assert_close(out.text_embeds, ref.pooler_output.numpy(), TOL, "CLIPModel text features")
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), TOL, "CLIPModel last_hidden_state")


# ----------------------------------------------------------------------------------------- T5

T5_BUCKETS, T5_MAX_DISTANCE = 8, 12  # small, so that 16 tokens reach the log-spaced and the last buckets


def t5_config(feed_forward):
    return transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN,
                                 num_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=T5_BUCKETS,
                                 relative_attention_max_distance=T5_MAX_DISTANCE, feed_forward_proj=feed_forward,
                                 dropout_rate=0.0)


@pytest.fixture(scope="module", params=["relu", "gated-gelu"])
def t5_case(request, tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(transformers.T5EncoderModel(t5_config(request.param)), seed=2)
    config, sd = save_and_read(model, tmp_path_factory.mktemp(request.param))
    module = convert_t5.module_from_config(config)
    return dict(name=request.param, model=model, config=config, sd=sd, module=module,
                params=convert_t5.load_params(sd, module))


def t5_inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, (BATCH, POSITIONS))
    mask = np.ones_like(ids)
    for row, length in enumerate((POSITIONS, 10, 3)):
        ids[row, length - 1] = 1  # </s>
        ids[row, length:] = 0  # <pad>
        mask[row, length:] = 0
    return ids, mask


def test_t5_parity_with_padding_mask(t5_case):
    c = t5_case
    ids, mask = t5_inputs()
    with torch.no_grad():
        ref = c["model"](input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         output_hidden_states=True)
    out = jax.jit(c["module"].apply)({"params": c["params"]}, jnp.asarray(ids), jnp.asarray(mask))
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), TOL, f"T5 {c['name']}: last_hidden_state")
    # transformers 5 reports the embeddings and each block's output but the last, replaced by the final one
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for i in range(LAYERS):
        assert_close(out.hidden_states[i], ref.hidden_states[i].numpy(), TOL, f"T5 {c['name']}: hidden_states[{i}]")
    # the mask matters: without it the padded rows differ
    unmasked = jax.jit(c["module"].apply)({"params": c["params"]}, jnp.asarray(ids))
    assert np.abs(np.asarray(unmasked.last_hidden_state)[1:] - ref.last_hidden_state.numpy()[1:]).max() > 1e-2


def test_t5_config_fields(t5_case):
    m, cfg = t5_case["module"], t5_case["config"]
    assert (m.gated, m.dense_act) == (cfg["is_gated_act"], cfg["dense_act_fn"])
    assert (m.relative_attention_num_buckets, m.relative_attention_max_distance) == (T5_BUCKETS, T5_MAX_DISTANCE)
    # only the first block owns the relative attention bias table
    blocks = t5_case["params"]["encoder"]
    assert "relative_attention_bias" in blocks["block_0"]["layer_0"]["SelfAttention"]
    assert "relative_attention_bias" not in blocks["block_1"]["layer_0"]["SelfAttention"]
    with pytest.raises(ValueError, match="UMT5"):
        convert_t5.module_from_config({**cfg, "model_type": "umt5"})


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (T5_BUCKETS, T5_MAX_DISTANCE), (16, 40)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_relative_position_buckets(buckets, max_distance, bidirectional):
    rel = torch.arange(-700, 701)[None, :]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance)
    out = t5_lib.relative_position_bucket(rel.numpy(), bidirectional, buckets, max_distance)
    np.testing.assert_array_equal(out, ref.numpy())


def test_t5_tied_embeddings(t5_case):
    """shared.weight alone (what save_pretrained wrote), encoder.embed_tokens.weight alone, or both
    equal all give the same params; two different tables are refused."""
    sd, module = t5_case["sd"], t5_case["module"]
    assert convert_t5.SHARED in sd and convert_t5.EMBED_TOKENS not in sd
    table = sd[convert_t5.SHARED]
    only_encoder = {(convert_t5.EMBED_TOKENS if k == convert_t5.SHARED else k): v for k, v in sd.items()}
    both = {**sd, convert_t5.EMBED_TOKENS: table.copy()}
    for variant in (only_encoder, both):
        np.testing.assert_array_equal(convert_t5.load_params(variant, module)["shared"]["embedding"], table)
    with pytest.raises(ConversionError, match="encoder.embed_tokens.weight differs from shared.weight"):
        convert_t5.load_params({**sd, convert_t5.EMBED_TOKENS: table + 1}, module)


def test_t5_full_encoder_decoder_checkpoint(t5_case):
    """A T5ForConditionalGeneration state dict loads its encoder (decoder and lm_head skipped)."""
    full = transformers.T5ForConditionalGeneration(t5_config(t5_case["name"]))
    sd = {k: v.numpy() for k, v in full.state_dict().items()}
    assert any(k.startswith("decoder.") for k in sd)
    params = convert_t5.load_params(sd, t5_case["module"])
    np.testing.assert_array_equal(params["shared"]["embedding"], sd["shared.weight"])


# ------------------------------------------------------------------------- errors and export

def _errors(family, sd, module):
    """(missing, unexpected, mis-shaped) variants of ``sd`` and what the error must name."""
    if family == "clip":
        # the text_model. prefix: CLIPTextModelWithProjection has it, transformers 5 CLIPTextModel not
        pre = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
        key, extra, path = (f"{pre}encoder.layers.1.mlp.fc2.bias", f"{pre}encoder.layers.0.mlp.fc3.weight",
                            "text_model/encoder/layers_1/mlp/fc2/bias")
        wrong = f"{pre}encoder.layers.0.self_attn.q_proj.weight"
    else:
        key, extra, path = ("encoder.block.1.layer.1.DenseReluDense.wo.weight", "encoder.block.0.layer.2.wx.weight",
                            "encoder/block_1/layer_1/DenseReluDense/wo/kernel")
        wrong = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert key in sd and wrong in sd
    missing = {k: v for k, v in sd.items() if k != key}
    unexpected = {**sd, extra: np.zeros((3, 3), np.float32)}
    misshaped = {**sd, wrong: np.zeros((HIDDEN, HIDDEN + 1), np.float32)}
    return [(missing, ["1 missing", path]), (unexpected, ["1 unexpected", extra]),
            (misshaped, ["1 shape mismatch", wrong, f"{(HIDDEN, HIDDEN + 1)}"])]


def test_conversion_errors(clip_case, t5_case):
    for family, case, convert in (("clip", clip_case, convert_clip), ("t5", t5_case, convert_t5)):
        for sd, names in _errors(family, case["sd"], case["module"]):
            with pytest.raises(ConversionError) as err:
                convert.load_params(sd, case["module"])
            for name in names:
                assert name in str(err.value), f"{family}: {name!r} not in\n{err.value}"
    # each family's checkpoint given to the other's loader
    with pytest.raises(ConversionError, match=r"not a CLIP text encoder checkpoint \(it looks like a T5 encoder\)"):
        convert_clip.load_params(t5_case["sd"], clip_case["module"])
    with pytest.raises(ConversionError, match=r"not a T5 encoder checkpoint \(it looks like a CLIP text encoder\)"):
        convert_t5.load_params(clip_case["sd"], t5_case["module"])


def test_clip_projection_mismatch_is_named(clip_case):
    """A checkpoint with / without text_projection for a module without / with one."""
    flipped = convert_clip.module_from_config(clip_case["config"],
                                              with_projection=clip_case["module"].projection_dim is None)
    flipped = flipped.clone(projection_dim=flipped.projection_dim and 24)
    with pytest.raises(ConversionError, match="text_projection"):
        convert_clip.load_params(clip_case["sd"], flipped)


@pytest.mark.parametrize("family", ["clip", "t5"])
def test_export_round_trip(family, clip_case, t5_case):
    """Params -> the transformers model's own state dict keys, through the same rules."""
    case, convert = (clip_case, convert_clip) if family == "clip" else (t5_case, convert_t5)
    ref = {k: v.numpy() for k, v in case["model"].state_dict().items()}
    out = engine.flax_to_torch_state_dict(case["params"], {k: v.shape for k, v in ref.items()},
                                          convert.export_rules(case["module"]))
    assert out.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


def test_mixed_precision(clip_case, t5_case):
    """bf16 compute over fp32 params: bf16 outputs, close to the fp32 ones."""
    ids, mask = t5_inputs()
    for case, convert, args in ((clip_case, convert_clip, (clip_ids(clip_case["eos"], clip_case["pad"])[0],)),
                                (t5_case, convert_t5, (ids, mask))):
        bf16 = convert.module_from_config(case["config"], dtype=jnp.bfloat16)
        ref = case["module"].apply({"params": case["params"]}, *map(jnp.asarray, args))
        out = bf16.apply({"params": case["params"]}, *map(jnp.asarray, args))
        assert out.last_hidden_state.dtype == jnp.bfloat16
        assert_close(out.last_hidden_state, ref.last_hidden_state, 5e-2, f"{case['name']} bf16")


# ------------------------------------------------------------------------------- tokenisation

CLIP_WORDS = ("a", "photo", "of", "cat", "dog")


def write_clip_tokenizer(folder, max_length=POSITIONS):
    """A pipeline-style tokenizer/ folder: vocab.json + merges.txt + tokenizer_config.json. Each word
    is built by left-to-right merges of its letters, the last carrying CLIP's end-of-word mark."""
    letters = sorted(set("".join(CLIP_WORDS)))
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters])}
    merges = []
    for word in CLIP_WORDS:
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + "</w>" if i == len(word) - 1 else ch
            merges.append(f"{prefix} {piece}")
            prefix += piece
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    bos, eos = len(vocab), len(vocab) + 1  # last, as in CLIP's vocab (eos the largest id)
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=max_length, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")))
    return vocab


def test_clip_tokenizer_from_pipeline_folder(tmp_path, clip_case):
    vocab = write_clip_tokenizer(tmp_path / "tokenizer")
    tok = tokenizers.load_tokenizer(tmp_path, "tokenizer")
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    w = {word: vocab[word + "</w>"] for word in CLIP_WORDS}
    ids, mask = tokenizers.tokenize(tok, ["a photo of a cat", "A  Dog", " ".join(["cat"] * 40)])
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (3, POSITIONS)
    # padded with the eos token (SD 1.x's pad token), to model_max_length
    row0 = [bos, w["a"], w["photo"], w["of"], w["a"], w["cat"], eos]
    np.testing.assert_array_equal(ids[0], row0 + [eos] * (POSITIONS - len(row0)))
    np.testing.assert_array_equal(mask[0], [1] * len(row0) + [0] * (POSITIONS - len(row0)))
    np.testing.assert_array_equal(ids[1, :4], [bos, w["a"], w["dog"], eos])  # lower-cased, spaces collapsed
    # truncated to max_length, the end-of-text token kept
    np.testing.assert_array_equal(ids[2], [bos] + [w["cat"]] * (POSITIONS - 2) + [eos])
    assert mask[2].all()
    # real tokens through the encoder: pooling finds the end-of-text token with either rule
    if clip_case["module"].eos_token_id == 2:
        assert_clip_parity(clip_case["module"], clip_case["params"], clip_case["model"], ids.astype(np.int64),
                           what="tokenised prompts")


def test_t5_tokenizer_from_folder(tmp_path):
    """A T5 tokenizer built offline from a small unigram vocab (no sentencepiece model), saved as
    transformers saves one (tokenizer.json), read back through AutoTokenizer."""
    pieces = ["▁a", "▁photo", "▁of", "▁cat", "▁dog", "▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in pieces]
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(tmp_path / "tokenizer_3")
    tok = tokenizers.load_tokenizer(tmp_path, "tokenizer_3")
    ids, mask = tokenizers.tokenize(tok, ["a photo of a cat", "a dog"], max_length=8)
    idx = {p: i for i, (p, _) in enumerate(vocab)}
    a, photo, of, cat, dog = (idx[f"▁{w}"] for w in ("a", "photo", "of", "cat", "dog"))
    np.testing.assert_array_equal(ids[0], [a, photo, of, a, cat, 1, 0, 0])
    np.testing.assert_array_equal(ids[1], [a, dog, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask, [[1] * 6 + [0] * 2, [1] * 3 + [0] * 5])
    # truncation keeps </s>
    ids, _ = tokenizers.tokenize(tok, "a photo of a cat a dog", max_length=4)
    np.testing.assert_array_equal(ids[0], [a, photo, of, 1])


def test_tokenizer_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        tokenizers.load_tokenizer(tmp_path, "tokenizer_2")


def test_mt5_encoder_through_the_registry(tmp_path):
    """An mT5 encoder folder (MT5EncoderModel, model_type "mt5": gated-gelu, untied lm head in the
    full model) converts through the registry and matches transformers with a padding mask."""
    from jdistill.convert import pretrained, registry

    cfg = transformers.MT5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN,
                                 num_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=T5_BUCKETS,
                                 relative_attention_max_distance=T5_MAX_DISTANCE, dropout_rate=0.0)
    model = randomise(transformers.MT5EncoderModel(cfg), seed=9)
    config, _ = save_and_read(model, tmp_path / "mt5")
    assert config["model_type"] == "mt5" and config["architectures"] == ["MT5EncoderModel"]
    assert registry.family_for_config(config).name == "t5"
    out = pretrained.load_pretrained(tmp_path / "mt5", cache_dir=tmp_path / "cache")
    assert out.family == "t5" and out.module.feed_forward == "gated-gelu"
    ids, mask = t5_inputs(seed=4)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    got = jax.jit(out.module.apply)({"params": out.params}, jnp.asarray(ids), jnp.asarray(mask))
    assert_close(got.last_hidden_state, ref.numpy(), TOL, "mT5 last_hidden_state")
    # and back to transformers' MT5EncoderModel keys, bit-identical
    from jdistill.convert import export

    export.export_diffusers("t5", out.module, out.params, out.config, tmp_path / "back")
    again = transformers.MT5EncoderModel.from_pretrained(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
