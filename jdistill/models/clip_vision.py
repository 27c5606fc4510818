"""CLIP's image tower, the full CLIP model, image preprocessing and CLIPScore, in Flax.

* :class:`CLIPVisionEncoder`: transformers' ``CLIPVisionModel`` (``projection_dim=None``) or
  ``CLIPVisionModelWithProjection``: patch embedding (a bias-free ``patch_size`` stride
  convolution), a learned class token, learned positions, ``pre_layrnorm``, the same
  pre-LN encoder as the text tower (no causal mask), then ``post_layernorm`` of the class
  token as the pooled output and ``visual_projection`` of it as ``image_embeds``. As in
  transformers, ``last_hidden_state`` is the encoder's output *without* the post norm.
* :class:`CLIPModel`: transformers' ``CLIPModel``, both towers with their projections and
  ``logit_scale``; :meth:`CLIPModel.get_text_features` / :meth:`CLIPModel.get_image_features`.
* :func:`preprocess`: ``CLIPImageProcessor`` in JAX: resize the shortest side to 224 with
  bicubic (antialiased, Keys a = -0.5, as PIL; horizontal then vertical, each pass rounded to
  8 bits as PIL's uint8 resize is), center crop 224, scale to [0, 1] and normalise by CLIP's
  mean / std. Against transformers' PIL processor on real photographs: equal but for at most
  one 8-bit step on under 0.1% of the values (tests/test_clip_vision.py).
* :func:`clip_score`: 100 x the cosine of image and text embeddings per pair (the
  torchmetrics / Hessel et al. CLIPScore scale; torchmetrics also clamps its mean at 0).

Param names follow transformers (``vision_model/embeddings/patch_embedding/kernel``,
``vision_model/pre_layrnorm``, ``visual_projection``...), so the generic converter rule maps
every key (``jdistill.convert.clip_vision``, ``jdistill.convert.clip_model``). Images are NHWC.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jdistill.models import layers
from jdistill.models.clip import CLIPEncoder, CLIPTextTransformer

Dtype = layers.Dtype

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # (B, 1 + patches, D): the encoder's output (no post norm)
    pooler_output: jax.Array  # (B, D): post_layernorm of the class token
    # num_layers + 1 arrays: the embeddings after pre_layrnorm, then each layer's output
    hidden_states: tuple
    image_embeds: jax.Array | None = None  # (B, projection_dim)


class CLIPVisionEmbeddings(nn.Module):
    hidden_size: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"images of {h}x{w}: this tower takes {self.image_size}x{self.image_size} "
                             "(preprocess() resizes and crops)")
        p = self.patch_size
        patches = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(
            pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, self.hidden_size)  # row-major over the grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(self.hidden_size ** -0.5), (self.hidden_size,),
                         self.param_dtype)
        tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.hidden_size)), patches], 1)
        positions = nn.Embed(tokens.shape[1], self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                             embedding_init=nn.initializers.normal(0.02), name="position_embedding")(
            jnp.arange(tokens.shape[1]))
        return tokens + positions[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPVisionModel`` body (``vision_model``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values) -> CLIPVisionOutput:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, self.num_channels,
                                 name="embeddings", **kw)(jnp.asarray(pixel_values))
        h = layers.layer_norm("pre_layrnorm", self.layer_norm_eps, **kw)(h)  # transformers' spelling
        hidden_states = CLIPEncoder(self.num_layers, self.hidden_size, self.num_heads, self.intermediate_size,
                                    self.hidden_act, self.layer_norm_eps, name="encoder", **kw)(h, None)
        last = hidden_states[-1]
        pooled = layers.layer_norm("post_layernorm", self.layer_norm_eps, **kw)(last[:, 0])
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)


class CLIPVisionEncoder(nn.Module):
    """``CLIPVisionModel`` (``projection_dim=None``) or ``CLIPVisionModelWithProjection``. Defaults
    are OpenAI CLIP ViT-B/32's image tower."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values) -> CLIPVisionOutput:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = CLIPVisionTransformer(self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads,
                                    self.image_size, self.patch_size, self.num_channels, self.hidden_act,
                                    self.layer_norm_eps, name="vision_model", **kw)(pixel_values)
        if self.projection_dim is None:
            return out
        embeds = layers.dense(self.projection_dim, "visual_projection", use_bias=False, **kw)(out.pooler_output)
        return out.replace(image_embeds=embeds)


@flax.struct.dataclass
class CLIPOutput:
    logits_per_image: jax.Array  # (B_images, B_texts): logit_scale.exp() * cosine
    text_embeds: jax.Array  # (B_texts, projection_dim), unit length (as transformers' CLIPModel returns them)
    image_embeds: jax.Array  # (B_images, projection_dim), unit length


class CLIPModel(nn.Module):
    """transformers' ``CLIPModel``: ``text_model`` and ``vision_model`` (dicts of their fields:
    :class:`~jdistill.models.clip.CLIPTextTransformer` and :class:`CLIPVisionTransformer`),
    ``text_projection`` / ``visual_projection`` to ``projection_dim`` and ``logit_scale``."""

    text: tuple  # CLIPTextTransformer fields as (name, value) pairs (hashable)
    vision: tuple  # CLIPVisionTransformer fields as (name, value) pairs
    projection_dim: int = 512
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextTransformer(**dict(self.text), **kw)
        self.vision_model = CLIPVisionTransformer(**dict(self.vision), **kw)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, **kw)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype)

    def get_text_features(self, input_ids, attention_mask=None):
        """(B, projection_dim): the projected pooled text output (unnormalised)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values):
        """(B, projection_dim): the projected pooled image output (unnormalised)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> CLIPOutput:
        text = _normalise(self.get_text_features(input_ids, attention_mask))
        image = _normalise(self.get_image_features(pixel_values))
        return CLIPOutput(logits_per_image=jnp.exp(self.logit_scale) * image @ text.T, text_embeds=text,
                          image_embeds=image)


def _normalise(x):
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- preprocessing and CLIPScore


def preprocess(images, size: int = 224, crop_size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
               round_to_uint8: bool = True):
    """``CLIPImageProcessor`` in JAX: NHWC images (uint8 0..255, or floats in [-1, 1], jdistill's
    image convention) -> NHWC float32 pixel values for the tower.

    The shortest side is resized to ``size`` (the other to ``int(size * long / short)``, as
    transformers computes it) with antialiased bicubic, rounded to 8 bits as PIL's uint8 resize
    is (``round_to_uint8``), center-cropped to ``crop_size`` (top / left offsets floor-halved, as
    transformers), scaled to [0, 1] and normalised. All images share one size (a batch)."""
    x = jnp.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32)
    else:  # [-1, 1] floats -> the 0..255 scale the processor sees
        x = (x.astype(jnp.float32) + 1.0) * 127.5
    b, h, w, c = x.shape
    if w <= h:
        new_h, new_w = int(size * h / w), size
    else:
        new_h, new_w = size, int(size * w / h)
    # PIL resamples 8-bit images in two passes, horizontal first, each rounded and clipped to 8 bits
    # (overshoot at sharp edges is cut after the first pass): one 2-D resize differs from it by up to
    # 5 steps of 8 bits at edges, the two passes by at most 1 step on under 0.1% of values
    x = jax.image.resize(x, (b, h, new_w, c), method="bicubic", antialias=True)
    if round_to_uint8:
        x = jnp.clip(jnp.round(x), 0, 255)
    x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=True)
    if round_to_uint8:
        x = jnp.clip(jnp.round(x), 0, 255)
    top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    x = x[:, top:top + crop_size, left:left + crop_size]
    return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def clip_score(model: CLIPModel, params, pixel_values, input_ids, attention_mask=None):
    """(B,): 100 x cos(image embedding, text embedding) of each image with its own text (pixel
    values from :func:`preprocess`, ids from the CLIP tokenizer)."""
    image = _normalise(model.apply({"params": params}, pixel_values, method=model.get_image_features))
    text = _normalise(model.apply({"params": params}, input_ids, attention_mask, method=model.get_text_features))
    return 100.0 * jnp.sum(image * text, axis=-1)


class CLIPScorer:
    """CLIPScore of images against their prompts with a loaded CLIP model (module, params) and
    its tokenizer: ``CLIPScorer(model, params, tokenizer)(images, texts)`` -> (B,) scores."""

    def __init__(self, model: CLIPModel, params, tokenizer, size: int = 224, crop_size: int | None = None):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.size = size
        self.crop_size = crop_size or dict(model.vision)["image_size"]
        self._score = jax.jit(lambda p, px, ids, m: clip_score(self.model, p, px, ids, m))

    def __call__(self, images, texts):
        from jdistill.models import tokenizers

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, mask = tokenizers.tokenize(self.tokenizer, texts)
        pixels = preprocess(images, self.size, self.crop_size)
        if pixels.shape[0] != len(texts):
            raise ValueError(f"{pixels.shape[0]} images and {len(texts)} texts: one text per image")
        return self._score(self.params, pixels, jnp.asarray(ids), jnp.asarray(mask))
