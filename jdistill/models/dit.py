"""DiT: the class-conditional latent diffusion transformer (Peebles & Xie, ICCV 2023).

One module covers both public weight layouts:

* diffusers' ``DiTTransformer2DModel`` (and the ``Transformer2DModel`` configs that
  diffusers remaps to it) gives every block its own timestep + label embedder
  (``transformer_blocks.N.norm1.emb``) and conditions the final layer on block 0's;
* the original facebookresearch code has one shared ``t_embedder`` / ``y_embedder``.

``shared_embedder`` switches between them. The two also differ in two numbers that
the weights do not carry, so they are fields as well:

* ``freq_shift``: the timestep features are [cos, sin] at frequencies
  exp(-log(10000) i / (128 - freq_shift)); the original uses 0, diffusers'
  ``CombinedTimestepLabelEmbeddings`` hard-codes ``downscale_freq_shift=1``;
* ``norm_eps``: the LayerNorm before the MLP (diffusers' ``norm3``) has eps 1e-6 in
  the original and the config's ``norm_eps`` in diffusers (1e-5 unless set). The
  LayerNorms before attention and before the output layer are 1e-6 in both.

So a diffusers DiT converted from an original checkpoint is not bit-for-bit the
original network; jdistill reproduces whichever one the weights came from.
``dit_config(name, layout=...)`` and ``jdistill.convert.dit.config_from_diffusers``
set all three together.

Submodule names are diffusers' attribute names, so the diffusers layout converts
through the generic rule alone; the original layout adds renames and a qkv split
(``jdistill.convert.dit``). The 2D sin-cos position table is computed, never a param.

Call: ``module.apply({"params": p}, x, t, class_labels)`` with x NHWC (B, H, W, C),
t (B,) float timesteps (0..999 for the public checkpoints) and integer labels
(B,) in [0, num_classes], ``num_classes`` being the null (unconditional) label
(``num_classes=0``: an unconditional DiT without a label table, called without labels).
Label dropout for classifier-free training is the caller's business (pass the
null label); the module is deterministic. Returns (B, H, W, out_channels), the
first ``in_channels`` channels the noise prediction and, with a learned sigma,
the rest the variance interpolation values. Each block's output tokens (B, T, D)
are sown as ``intermediates/block_{i}``.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax.numpy as jnp

from jdistill.models import layers
from jdistill.train import partitioning

Dtype = layers.Dtype

# depth, hidden size, heads (DiT paper, Table 1)
PRESETS = {
    "DiT-S": (12, 384, 6),
    "DiT-B": (12, 768, 12),
    "DiT-L": (24, 1024, 16),
    "DiT-XL": (28, 1152, 16),
}

# What the two layouts mean beyond their key names (see the module docstring).
LAYOUTS = {
    "original": dict(shared_embedder=True, freq_shift=0.0, norm_eps=1e-6),
    "diffusers": dict(shared_embedder=False, freq_shift=1.0, norm_eps=1e-5),
}

TIMESTEP_FEATURES = 256

# Initialisation, for training from scratch (converted checkpoints replace it). As in
# the DiT paper: adaLN-Zero modulation and output layers at zero, so every block starts
# as the identity and the output at zero; xavier-uniform MLP / patch weights; label
# table N(0, 0.02). The attention and timestep-MLP linears keep layers.py's defaults.
_zeros = nn.initializers.zeros
_xavier = nn.initializers.xavier_uniform()


def _dense(features, name, module, use_bias=True, zero=False):
    return layers.dense(features, name, use_bias, dtype=module.dtype, param_dtype=module.param_dtype,
                        kernel_init=_zeros if zero else _xavier)


class LabelEmbedding(nn.Module):
    """diffusers' ``LabelEmbedding`` / DiT's ``LabelEmbedder``: a table of ``num_classes``
    rows plus, with ``null_class``, one more for the unconditional label."""

    num_classes: int
    dim: int
    null_class: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels):
        table = nn.Embed(self.num_classes + int(self.null_class), self.dim, dtype=self.dtype,
                         param_dtype=self.param_dtype, embedding_init=nn.initializers.normal(0.02),
                         name="embedding_table")
        return table(jnp.asarray(labels, jnp.int32))


class TimestepLabelEmbedding(nn.Module):
    """diffusers' ``CombinedTimestepLabelEmbeddings``: MLP(sin-cos features of t) + label table."""

    dim: int
    num_classes: int
    freq_shift: float
    null_class: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, labels):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feats = layers.timestep_embedding(t, TIMESTEP_FEATURES, flip_sin_to_cos=True, freq_shift=self.freq_shift)
        t_emb = layers.TimestepEmbedding(self.dim, name="timestep_embedder", **kw)(feats.astype(self.dtype))
        if not self.num_classes:  # an unconditional DiT: no label table
            return t_emb
        y_emb = LabelEmbedding(self.num_classes, self.dim, self.null_class, name="class_embedder", **kw)(labels)
        return t_emb + y_emb


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv (``proj``) + the fixed 2D sin-cos position table.

    Inputs of a size other than ``input_size`` get diffusers' rescaled positions
    (the original code only runs at its training size, where both agree).
    """

    dim: int
    patch_size: int
    input_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        b, h, w, _ = x.shape
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        # DiT initialises the patch conv as a Linear on the flattened (kh, kw, in) patch
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
        proj = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", kernel_init=init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="proj")
        tokens = proj(x).reshape(b, (h // p) * (w // p), self.dim)
        table = layers.sincos_pos_embed_2d(self.dim, h // p, w // p, base_size=self.input_size // p)
        return (tokens.astype(jnp.float32) + table).astype(self.dtype)


class AdaLayerNormZero(nn.Module):
    """Block conditioning (diffusers' ``AdaLayerNormZero``, DiT's ``adaLN_modulation``):
    SiLU(c) -> ``linear`` to 6 D = shift / scale / gate for attention, then for the MLP.

    With ``own_embedder`` the conditioning c is computed here by ``emb`` (diffusers'
    per-block embedder) instead of being passed in. Returns the modulated, normalised
    tokens, the remaining four modulation vectors and the conditioning it used.
    """

    dim: int
    own_embedder: bool
    num_classes: int
    freq_shift: float
    null_class: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond, t, labels, extra=None):
        if self.own_embedder:
            cond = TimestepLabelEmbedding(self.dim, self.num_classes, self.freq_shift, self.null_class, name="emb",
                                          dtype=self.dtype, param_dtype=self.param_dtype)(t, labels)
            if extra is not None:
                cond = cond + extra
        mod = _dense(6 * self.dim, "linear", self, zero=True)(nn.silu(cond))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = layers.layer_norm("norm", 1e-6, affine=False, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h = h * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return h, (gate_msa, shift_mlp, scale_mlp, gate_mlp), cond


class ActProjection(nn.Module):
    """diffusers' ``GELU`` module: ``proj`` then the activation (``ff.net.0``)."""

    features: int
    activation: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return layers.activation(self.activation)(_dense(self.features, "proj", self)(x))


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` as DiT uses it (timm's ``Mlp``): ``net_0`` (Linear + GELU)
    then ``net_2`` (Linear); ``net.1`` is a dropout and holds no weights."""

    dim: int
    inner_dim: int
    activation: str = "gelu_tanh"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ActProjection(self.inner_dim, self.activation, name="net_0", **kw)(x)
        return _dense(self.dim, "net_2", self)(x)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + g_a * Attn(mod(LN(x))), then x + g_m * MLP(mod(LN(x)))."""

    dim: int
    num_heads: int
    mlp_ratio: float
    own_embedder: bool
    num_classes: int
    freq_shift: float
    null_class: bool
    norm_eps: float
    norm_elementwise_affine: bool
    attention_bias: bool
    activation: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond, t, labels, extra=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = partitioning.constrain_batch(x)
        h, (gate_msa, shift_mlp, scale_mlp, gate_mlp), cond = AdaLayerNormZero(
            self.dim, self.own_embedder, self.num_classes, self.freq_shift, self.null_class, name="norm1", **kw,
        )(x, cond, t, labels, extra)
        attn = layers.Attention(self.num_heads, self.dim // self.num_heads, bias=self.attention_bias,
                                out_bias=True, name="attn1", **kw)
        x = x + gate_msa[:, None] * attn(h)
        h = layers.layer_norm("norm3", self.norm_eps, affine=self.norm_elementwise_affine, **kw)(x)
        h = h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = FeedForward(self.dim, int(self.dim * self.mlp_ratio), self.activation, name="ff", **kw)(h)
        return layers.materialize_cotangent(x + gate_mlp[:, None] * h), cond


class DiT(nn.Module):
    """The DiT network; see the module docstring for the call and the layout fields.

    ``out_channels`` defaults to ``in_channels`` (2 * in_channels for a learned sigma).
    ``guidance_embed`` adds ``layers.GuidanceEmbedding`` of the ``guidance`` input to the
    conditioning (guidance-distilled students); it starts at exactly zero.

    Training levers, which change neither the function nor (at the checkpoint boundary) the
    params: ``remat`` ("none", "full" or "dots", ``layers.REMAT_POLICIES``) rematerialises each
    block in the backward pass; ``scan_blocks`` runs the blocks as one ``nn.scan`` (one compiled
    block instead of ``depth``), its params stacked under ``transformer_blocks_0_to_{depth-1}``:
    :meth:`scanned_params` / :meth:`per_block_params` convert to and from the per-block tree that
    checkpoints and ``jdistill.convert`` use.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    null_class: bool = True
    shared_embedder: bool = True
    freq_shift: float = 0.0
    norm_eps: float = 1e-6
    norm_elementwise_affine: bool = False
    attention_bias: bool = True
    activation: str = "gelu_tanh"
    guidance_embed: bool = False
    remat: str = "none"
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _runs(self):
        return [(0, self.depth)] if self.scan_blocks else []

    def scanned_params(self, params):
        """Per-block params -> this module's tree (stacked blocks when ``scan_blocks``)."""
        return layers.stack_blocks(params, "transformer_blocks", self._runs())

    def per_block_params(self, params):
        """This module's params -> the per-block tree checkpoints use (the inverse of :meth:`scanned_params`)."""
        return layers.unstack_blocks(params, "transformer_blocks", self._runs())

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def learned_sigma(self) -> bool:
        return self.output_channels == 2 * self.in_channels

    @nn.compact
    def __call__(self, x, t, class_labels=None, guidance=None, *, block_controls=None, input_residual=None,
                 return_blocks: bool = False):
        """``block_controls``: an adapter's control of each block's output tokens (``layers.fuse``:
        None, a residual, or a gated-fusion pair), one per block. ``input_residual``: tokens added to
        the patch embedding (a ControlNet copy's condition). ``return_blocks``: return the blocks'
        output tokens instead of the image (no output layer is built: a ControlNet copy)."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if (class_labels is None) != (not self.num_classes):
            raise ValueError("class_labels go with a class-conditional DiT (num_classes > 0), and only with one")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p, c_out = self.hidden_size, self.patch_size, self.output_channels
        b, height, width, _ = x.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))

        h = PatchEmbed(d, p, self.input_size, name="pos_embed", **kw)(jnp.asarray(x, self.dtype))
        if input_residual is not None:
            h = h + input_residual.astype(h.dtype)
        if block_controls is not None and len(block_controls) != self.depth:
            raise ValueError(f"{len(block_controls)} block controls for a DiT of depth {self.depth}")

        extra = None
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("this DiT was built with guidance_embed=True: pass `guidance` (B,)")
            extra = layers.GuidanceEmbedding(d, name="guidance_embedder", **kw)(
                jnp.broadcast_to(jnp.asarray(guidance, jnp.float32).reshape(-1), (b,)))
        elif guidance is not None:
            raise ValueError("`guidance` given to a DiT built without guidance_embed")

        cond = None
        if self.shared_embedder:
            cond = TimestepLabelEmbedding(d, self.num_classes, self.freq_shift, self.null_class, name="emb",
                                          **kw)(t, class_labels)
            if extra is not None:
                cond = cond + extra

        block = layers.remat(DiTBlock, self.remat)
        fields = (d, self.num_heads, self.mlp_ratio, not self.shared_embedder, self.num_classes, self.freq_shift,
                  self.null_class, self.norm_eps, self.norm_elementwise_affine, self.attention_bias, self.activation)
        if self._runs():
            if block_controls is not None or return_blocks:
                raise ValueError("block controls and return_blocks need per-block DiT params (scan_blocks=False)")
            scanned = block(*fields, name=layers.scanned_name("transformer_blocks", 0, self.depth), **kw)
            (h,), (outs, conds) = layers.scan_blocks(scanned, self.depth, (h,), cond, t, class_labels, extra)
            final_cond = conds[0]  # diffusers' output layer reads block 0's embedder
            for i in range(self.depth):
                self.sow("intermediates", f"block_{i}", outs[i])
        else:
            final_cond, blocks = cond, []
            for i in range(self.depth):
                h, block_cond = block(*fields, name=f"transformer_blocks_{i}", **kw)(h, cond, t, class_labels, extra)
                if i == 0:
                    final_cond = block_cond  # diffusers' output layer reads block 0's embedder
                if block_controls is not None:
                    h = layers.fuse(h, block_controls[i])
                self.sow("intermediates", f"block_{i}", h)
                blocks.append(h)
            if return_blocks:
                return tuple(blocks)

        shift, scale = jnp.split(_dense(2 * d, "proj_out_1", self, zero=True)(nn.silu(final_cond)), 2, axis=-1)
        h = layers.layer_norm("norm_out", 1e-6, affine=False, **kw)(h)
        h = h * (1 + scale[:, None]) + shift[:, None]
        h = _dense(p * p * c_out, "proj_out_2", self, zero=True)(h)

        # tokens (h, w) each holding a (p, q, c) patch -> NHWC
        gh, gw = height // p, width // p
        h = h.reshape(b, gh, gw, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, gh * p, gw * p, c_out)


def parse_name(name: str) -> tuple[str, int]:
    """``"DiT-XL/2"`` -> ``("DiT-XL", 2)``."""
    m = re.fullmatch(r"(DiT-(?:S|B|L|XL))/(\d+)", name)
    if not m:
        raise ValueError(f"unknown DiT {name!r}; expected one of {sorted(PRESETS)} with '/2', '/4' or '/8'")
    return m.group(1), int(m.group(2))


def dit_config(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
               learn_sigma: bool = True, layout: str = "original", **overrides) -> DiT:
    """A DiT module by its paper name, e.g. ``dit_config("DiT-XL/2", input_size=32)`` (256 px
    images through the SD VAE). ``layout`` ("original" or "diffusers") picks the embedder
    sharing, timestep frequency shift and MLP-norm eps of that codebase; ``overrides`` set
    any other field (``dtype``, ``guidance_embed``, ...)."""
    family, patch = parse_name(name)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    depth, hidden, heads = PRESETS[family]
    fields = dict(input_size=input_size, patch_size=patch, in_channels=in_channels,
                  out_channels=2 * in_channels if learn_sigma else in_channels, hidden_size=hidden, depth=depth,
                  num_heads=heads, num_classes=num_classes, **LAYOUTS[layout])
    fields.update(overrides)
    return DiT(**fields)


def example_inputs(module: DiT, batch: int = 1) -> dict:
    """Arguments of the right shapes and dtypes for ``module.init`` / ``abstract_params``."""
    s = module.input_size
    out = dict(x=jnp.zeros((batch, s, s, module.in_channels), module.dtype), t=jnp.zeros((batch,), jnp.float32))
    if module.num_classes:
        out["class_labels"] = jnp.zeros((batch,), jnp.int32)
    if module.guidance_embed:
        out["guidance"] = jnp.zeros((batch,), jnp.float32)
    return out
