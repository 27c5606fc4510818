"""CLIP's image tower and the full CLIP model in Flax against transformers (fp32, <= 1e-4
relative), converted from local folders through the registry; the JAX image preprocessing
against transformers' CLIPImageProcessor (PIL) on real photographs from skimage.data; and
CLIPScore against the same score computed with transformers.

Tiny models (width 32, 4 heads, 2 layers, 32 px images in 8 px patches) with every weight
re-drawn (tests/test_text_encoders.py's randomise: norm scales around 1, tables N(0, 1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
import transformers
from test_text_encoders import randomise
from test_text_to_image import write_clip_tokenizer

from jdistill.convert import export, pretrained, registry
from jdistill.convert.engine import ConversionError
from jdistill.models import clip_vision
from jdistill.testing import assert_close, nchw

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="quick_gelu")


def pixels(seed=0, n=3):
    return np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("cls", ["CLIPVisionModelWithProjection", "CLIPVisionModel"])
def test_vision_tower_parity(cls, tmp_path):
    """WithProjection (keys under vision_model.) and transformers 5's CLIPVisionModel (saved
    without the prefix): hidden states, pooled output, image_embeds."""
    torch.manual_seed(0)
    model = randomise(getattr(transformers, cls)(transformers.CLIPVisionConfig(**VISION, projection_dim=24)), 3)
    model.save_pretrained(tmp_path / "tower")
    out = pretrained.load_pretrained(tmp_path / "tower", cache_dir=tmp_path / "cache")
    assert out.family == "clip_vision" and (out.module.projection_dim is not None) == cls.endswith("Projection")
    x = pixels()
    got = jax.jit(out.module.apply)({"params": out.params}, jnp.asarray(x))
    with torch.no_grad():
        ref = model(torch.from_numpy(nchw(x)), output_hidden_states=True)
        inner = ref if cls == "CLIPVisionModel" else model.vision_model(torch.from_numpy(nchw(x)),
                                                                         output_hidden_states=True)
    assert len(got.hidden_states) == len(inner.hidden_states) == 3
    for i, (a, b) in enumerate(zip(got.hidden_states, inner.hidden_states)):
        assert_close(a, b.numpy(), TOL, f"{cls} hidden_states[{i}]")
    assert_close(got.last_hidden_state, inner.last_hidden_state.numpy(), TOL, f"{cls} last_hidden_state")
    assert_close(got.pooler_output, inner.pooler_output.numpy(), TOL, f"{cls} pooled (post_layernorm)")
    if cls.endswith("Projection"):
        assert_close(got.image_embeds, ref.image_embeds.numpy(), TOL, f"{cls} image_embeds")
    # back to transformers, bit-identical
    export.export_diffusers("clip_vision", out.module, out.params, out.config, tmp_path / "back")
    again = getattr(transformers, cls).from_pretrained(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tok, n = write_clip_tokenizer(root / "tokenizer")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2, bos_token_id=0,
                         pad_token_id=1),
        vision_config=VISION, projection_dim=20)
    torch.manual_seed(0)
    model = randomise(transformers.CLIPModel(config), 5)
    model.save_pretrained(root / "clip")
    out = pretrained.load_pretrained(root / "clip", cache_dir=root / "cache")
    return dict(model=model, out=out, tok=tok, root=root)


def test_clip_model_parity(clip_model):
    model, out = clip_model["model"], clip_model["out"]
    assert out.family == "clip_model" and registry.family_for_config(out.config).name == "clip_model"
    ids = np.random.default_rng(1).integers(0, model.config.text_config.vocab_size - 1, (2, 16))
    ids[:, 9] = model.config.text_config.vocab_size - 1  # end of text: the largest id (legacy eos 2 pooling)
    x = pixels(2, n=3)
    got = jax.jit(out.module.apply)({"params": out.params}, jnp.asarray(ids), jnp.asarray(x))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(nchw(x)))
    assert_close(got.text_embeds, ref.text_embeds.numpy(), TOL, "text features")
    assert_close(got.image_embeds, ref.image_embeds.numpy(), TOL, "image features")
    assert_close(got.logits_per_image, ref.logits_per_image.numpy(), TOL, "logits_per_image")


def test_preprocess_matches_clip_image_processor():
    """Real photographs of several shapes (square, landscape, grey): equal to transformers' PIL
    processor except for at most one 8-bit step (1 / 255 / std ~ 0.015 normalised) on under 0.1%
    of the values."""
    processor = transformers.CLIPImageProcessor()
    for name in ("astronaut", "chelsea", "coffee", "camera"):
        image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = np.asarray(clip_vision.preprocess(image))[0]
        assert ours.shape == ref.shape == (224, 224, 3)
        steps = np.abs(ours - ref) * np.asarray(processor.image_std) * 255
        assert steps.max() <= 1.0 + 1e-3, f"{name}: {steps.max():.2f} steps of 8 bits"
        assert (steps > 0.5).mean() < 1e-3, f"{name}: {(steps > 0.5).mean():.2%} of values differ"
        # floats in [-1, 1] (jdistill's image convention) are the same image (a value on a rounding tie
        # may land one step off after the float round trip)
        as_float = image.astype(np.float32) / 127.5 - 1.0
        steps = np.abs(np.asarray(clip_vision.preprocess(as_float))[0] - ours) * np.asarray(processor.image_std) * 255
        assert steps.max() <= 1.0 + 1e-3 and (steps > 0.5).mean() < 1e-4


def test_clip_score(clip_model):
    """100 x cos(image, text) per pair, against the score computed from transformers' CLIPModel
    features: on pixel values given to both (1e-4), and end to end from real photographs and
    prompts through the tokenizer and each side's preprocessing (within what the 8-bit steps of
    preprocessing move it)."""
    model, out, tok = clip_model["model"], clip_model["out"], clip_model["tok"]
    prompts = ["a photo of a cat", "a red dog"]
    ids, mask = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="np").values()
    x = pixels(4, n=2)

    def torch_score(pixel_values):
        with torch.no_grad():
            img = model.get_image_features(pixel_values=pixel_values).pooler_output
            txt = model.get_text_features(input_ids=torch.from_numpy(ids),
                                          attention_mask=torch.from_numpy(mask)).pooler_output
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).numpy()

    got = clip_vision.clip_score(out.module, out.params, jnp.asarray(x), jnp.asarray(ids), jnp.asarray(mask))
    assert_close(got, torch_score(torch.from_numpy(nchw(x))), TOL, "CLIPScore on the same pixels")

    # two real photographs, 128 x 160, scored at the tiny tower's 32 px
    images = np.stack([skimage.data.chelsea()[:256:2, :320:2], skimage.data.coffee()[:384:3, :480:3]])
    assert images.shape == (2, 128, 160, 3)
    scorer = clip_vision.CLIPScorer(out.module, out.params, tok, size=32)
    assert scorer.crop_size == 32  # the tower's image size
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = torch_score(torch.from_numpy(processor(images=list(images), return_tensors="np")["pixel_values"]))
    ours = np.asarray(scorer(images, prompts))
    assert ours.shape == (2,)
    # within 0.5 score points: what the rare 8-bit steps of resizing move a score of this tiny random model
    print("CLIPScore end to end", ours, ref)
    np.testing.assert_allclose(ours, ref, atol=0.5)


def test_wrong_family_is_named(clip_model, tmp_path):
    from jdistill.convert import clip_vision as convert_vision

    module = convert_vision.module_from_config(clip_model["out"].config)
    text_only = {k: v.numpy() for k, v in clip_model["model"].state_dict().items() if k.startswith("text_model.")}
    with pytest.raises(ConversionError, match=r"not a CLIP vision tower checkpoint \(it looks like a CLIP text"):
        convert_vision.load_params(text_only, module)
