"""MMDiT: the Stable Diffusion 3 / 3.5 transformer (Esser et al., "Scaling Rectified Flow
Transformers", arXiv 2403.03206), as diffusers' ``SD3Transformer2DModel``.

Two token streams, image and text, each with its own weights (adaLN-Zero modulation,
projections, MLP), meet in one joint attention per block:

* image tokens: a stride-p patch conv (``pos_embed/proj``) plus a fixed 2D sin-cos table
  *cropped* from a ``pos_embed_max_size``^2 grid (see :class:`PatchEmbed`);
* text tokens: ``context_embedder`` (Linear) of the text encoders' hidden states;
* conditioning c = MLP(sin-cos features of t) + MLP(pooled text) (``time_text_embed``);
* each block attends over the concatenation [image tokens, text tokens] -- image first,
  as diffusers' ``JointAttnProcessor2_0`` concatenates (Flux puts text first);
* the last block is ``context_pre_only``: its text stream only supplies keys and values
  (its norm is ``AdaLayerNormContinuous``; it has no ``to_add_out`` / ``ff_context``) and
  the text tokens are not returned;
* SD3.5: ``qk_norm="rms_norm"`` normalises q and k of both streams per head, and the blocks
  in ``dual_attention_layers`` add an image-only self-attention ``attn2`` with its own
  shift / scale / gate (``SD35AdaLayerNormZeroX``: 9 modulation vectors instead of 6);
* output: ``norm_out`` (``AdaLayerNormContinuous``) -> ``proj_out`` -> unpatchify.

Submodule names are diffusers' attribute names, so a diffusers checkpoint converts through
the generic engine rule alone (``jdistill.convert.mmdit``). The stored position table
``pos_embed.pos_embed`` is a persistent buffer in diffusers and a param here (see
:func:`trainable_mask`).

Call: ``module.apply({"params": p}, x, t, encoder_hidden_states, pooled_projections)``
with x NHWC latents (B, H, W, in_channels), t (B,) model time in [0, 1000] (SD3 is a
rectified-flow model: ``RectifiedFlow(shift=3)``, model time ``1000 t``),
encoder_hidden_states (B, L, joint_attention_dim) and pooled_projections
(B, pooled_projection_dim). Returns (B, H, W, out_channels), the flow velocity. Each
block's output image tokens (B, T, D), T = (H/p)(W/p) in row-major (h, w) order, are sown
as ``intermediates/block_{i}``; :func:`block_features` reads them (LADD's discriminator).
"""

from __future__ import annotations

from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jdistill.models import layers
from jdistill.models.dit import FeedForward
from jdistill.train import partitioning

Dtype = layers.Dtype

TIMESTEP_FEATURES = 256  # diffusers' CombinedTimestepTextProjEmbeddings: Timesteps(256, flip_sin_to_cos, shift 0)
QK_NORMS = (None, "rms_norm", "layer_norm")


class PatchEmbed(nn.Module):
    """Patch conv (``proj``) plus SD3's position table.

    With ``pos_embed_max_size`` m (every SD3 / SD3.5 config) the table is a param
    ``pos_embed`` (1, m*m, dim) -- diffusers saves it in the checkpoint -- initialised to the
    2D sin-cos table of an m x m grid whose positions are scaled to ``base_size =
    sample_size // patch``. An input of gh x gw patches reads the centred window starting
    at row (m - gh) // 2 and column (m - gw) // 2 (rounded down, as diffusers'
    ``cropped_pos_embed``), so every resolution up to m * patch sees the positions
    of the middle of one fixed grid. No gradient reaches the table: it is a buffer in
    diffusers and in the original SD3.

    With ``pos_embed_max_size=None`` the table is computed for the input's grid with
    diffusers' base-size rescaling, and holds no param.
    """

    dim: int
    patch_size: int
    sample_size: int
    pos_embed_max_size: int | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p, d = self.patch_size, self.dim
        b, h, w, _ = x.shape
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        gh, gw, base = h // p, w // p, self.sample_size // p
        proj = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                       name="proj")
        tokens = proj(x).reshape(b, gh * gw, d)

        m = self.pos_embed_max_size
        if m:
            if gh > m or gw > m:
                raise ValueError(f"a {gh}x{gw} patch grid exceeds pos_embed_max_size {m} (input {h}x{w}, patch {p})")

            def init(_):
                # The numpy table (float64, rounded once, as diffusers builds it) goes through a
                # callback so that abstract_params (eval_shape) does not build a table of up to
                # 384^2 x 1536 float64 only to discard it.
                shape = jax.ShapeDtypeStruct((1, m * m, d), jnp.float32)
                table = jax.pure_callback(lambda: layers.sincos_pos_embed_2d(d, m, m, base_size=base)[None], shape)
                return table.astype(self.param_dtype)

            table = jax.lax.stop_gradient(self.param("pos_embed", init)).reshape(m, m, d)
            top, left = (m - gh) // 2, (m - gw) // 2
            table = table[top:top + gh, left:left + gw].reshape(gh * gw, d)
        else:
            table = jnp.asarray(layers.sincos_pos_embed_2d(d, gh, gw, base_size=base))
        return (tokens.astype(jnp.float32) + table.astype(jnp.float32)).astype(self.dtype)


class TimestepTextEmbedding(nn.Module):
    """diffusers' ``CombinedTimestepTextProjEmbeddings``: MLP(sin-cos features of t) + MLP(pooled
    text). The text MLP (``PixArtAlphaTextProjection`` with SiLU) has the same linear_1 -> act ->
    linear_2 shape as ``TimestepEmbedding``, so both reuse it."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, pooled):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feats = layers.timestep_embedding(t, TIMESTEP_FEATURES, flip_sin_to_cos=True, freq_shift=0.0)
        t_emb = layers.TimestepEmbedding(self.dim, name="timestep_embedder", **kw)(feats.astype(self.dtype))
        text = layers.TimestepEmbedding(self.dim, act="silu", name="text_embedder", **kw)(pooled.astype(self.dtype))
        return t_emb + text


def _qk_norm(kind, eps, name, module):
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    if kind == "layer_norm":
        return layers.layer_norm(name, eps, **kw)
    if kind == "rms_norm":
        return layers.RMSNorm(eps, name=name, **kw)
    raise ValueError(f"unknown qk_norm {kind!r}; known: {QK_NORMS}")


class JointAttention(layers.Attention):
    """diffusers' ``Attention`` with ``added_kv_proj_dim`` under ``JointAttnProcessor2_0``: the
    image stream's to_q / to_k / to_v / to_out_0 (and norm_q / norm_k) are ``layers.Attention``'s;
    the text stream adds add_q_proj / add_k_proj / add_v_proj, norm_added_q / norm_added_k and
    ``to_add_out``. One softmax runs over the keys of [image, text]; each stream's outputs are
    its own rows.

    With ``context_pre_only`` (SD3's last block) there is no ``to_add_out`` and the text
    output is None. diffusers still projects text queries there and discards their rows;
    the projection is made (its weights are in the checkpoint) but only image queries
    attend, which is the same result for image tokens since attention rows are independent.
    """

    context_pre_only: bool = False

    def setup(self):
        super().setup()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        self.add_q_proj = layers.dense(inner, "add_q_proj", self.bias, **kw)
        self.add_k_proj = layers.dense(inner, "add_k_proj", self.bias, **kw)
        self.add_v_proj = layers.dense(inner, "add_v_proj", self.bias, **kw)
        if self.qk_norm is not None:
            self.norm_added_q = _qk_norm(self.qk_norm, self.qk_norm_eps, "norm_added_q", self)
            self.norm_added_k = _qk_norm(self.qk_norm, self.qk_norm_eps, "norm_added_k", self)
        if not self.context_pre_only:
            self.to_add_out = layers.dense(self.out_dim or inner, "to_add_out", self.out_bias, **kw)

    def context_qkv(self, context):
        """The text stream's (q, k, v) as (B, L, heads, dim_head), with the optional qk norm."""
        q, k, v = (self.heads_of(f(context)) for f in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        if self.qk_norm is not None:
            q, k = self.norm_added_q(q), self.norm_added_k(k)
        return q, k, v

    def __call__(self, x, context):
        n = x.shape[1]
        q, k, v = self.qkv(x)
        cq, ck, cv = self.context_qkv(context)
        k, v = jnp.concatenate([k, ck], axis=1), jnp.concatenate([v, cv], axis=1)
        if not self.context_pre_only:
            q = jnp.concatenate([q, cq], axis=1)
        out = layers.attention(q, k, v)
        out = out.reshape(out.shape[:2] + (-1,))
        image_out = self.to_out_0(out[:, :n])
        return image_out, (None if self.context_pre_only else self.to_add_out(out[:, n:]))


class JointTransformerBlock(nn.Module):
    """diffusers' ``JointTransformerBlock``: adaLN-Zero per stream, joint attention, per-stream
    MLPs; with ``use_dual_attention`` an extra image self-attention ``attn2`` fed by the same
    normalised image tokens under a second shift / scale and added after the joint attention.
    Returns (image tokens, text tokens or None when ``context_pre_only``)."""

    dim: int
    num_heads: int
    head_dim: int
    context_pre_only: bool = False
    qk_norm: str | None = None
    use_dual_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, temb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, context = partitioning.constrain_batch(x), partitioning.constrain_batch(context)
        d, mod = self.dim, layers.modulate
        attn_kw = dict(heads=self.num_heads, dim_head=self.head_dim, out_dim=d, bias=True, out_bias=True,
                       qk_norm=self.qk_norm, qk_norm_eps=1e-6, **kw)

        h, chunks = layers.AdaLayerNormZero(d, 9 if self.use_dual_attention else 6, name="norm1", **kw)(x, temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]

        if self.context_pre_only:
            ch = layers.AdaLayerNormContinuous(d, eps=1e-6, elementwise_affine=False, name="norm1_context",
                                               **kw)(context, temb)
        else:
            cn, c_chunks = layers.AdaLayerNormZero(d, name="norm1_context", **kw)(context, temb)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_chunks
            ch = mod(cn, c_shift_msa, c_scale_msa)

        attn_out, context_out = JointAttention(context_pre_only=self.context_pre_only, name="attn", **attn_kw)(
            mod(h, shift_msa, scale_msa), ch)
        x = x + gate_msa[:, None] * attn_out
        if self.use_dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
            x = x + gate_msa2[:, None] * layers.Attention(name="attn2", **attn_kw)(mod(h, shift_msa2, scale_msa2))

        hh = mod(layers.layer_norm("norm2", 1e-6, affine=False, **kw)(x), shift_mlp, scale_mlp)
        x = layers.materialize_cotangent(x + gate_mlp[:, None] * FeedForward(d, 4 * d, "gelu_tanh", name="ff",
                                                                             **kw)(hh))
        if self.context_pre_only:
            return x, None

        context = context + c_gate_msa[:, None] * context_out
        ch = mod(layers.layer_norm("norm2_context", 1e-6, affine=False, **kw)(context), c_shift_mlp, c_scale_mlp)
        context = context + c_gate_mlp[:, None] * FeedForward(d, 4 * d, "gelu_tanh", name="ff_context", **kw)(ch)
        return x, layers.materialize_cotangent(context)


# Text tokens of SD3's pipelines (77 CLIP + 256 T5); only shapes for init depend on inputs,
# and no param shape depends on this length.
TEXT_TOKENS = 333


class SD3Transformer2DModel(nn.Module):
    """The SD3 / SD3.5 MMDiT; fields are diffusers' config keys (and defaults); see the module
    docstring for the call. ``out_channels=None`` means ``in_channels``.
    ``caption_projection_dim`` must equal the width ``num_attention_heads * attention_head_dim``
    (the text stream shares the blocks' width), as in every public config.

    Training levers (no change to the function, nor to the params at the checkpoint boundary):
    ``remat`` ("none", "full", "dots": ``layers.REMAT_POLICIES``) per block; ``scan_blocks`` runs
    each run of identical consecutive blocks (SD3.5's dual-attention ones, the plain ones; the
    ``context_pre_only`` last block stays alone) as one ``nn.scan``, params stacked under
    ``transformer_blocks_{first}_to_{last}``; :meth:`scanned_params` / :meth:`per_block_params`
    convert to and from the per-block tree of checkpoints and ``jdistill.convert``."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    remat: str = "none"
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _block_kind(self, i: int) -> tuple[bool, bool]:
        return i == self.num_layers - 1, i in self.dual_attention_layers  # (context_pre_only, dual attention)

    def _runs(self):
        if not self.scan_blocks:
            return []
        return layers.block_runs([self._block_kind(i) for i in range(self.num_layers)])

    def scanned_params(self, params):
        """Per-block params -> this module's tree (stacked runs of blocks when ``scan_blocks``)."""
        return layers.stack_blocks(params, "transformer_blocks", self._runs())

    def per_block_params(self, params):
        """This module's params -> the per-block tree checkpoints use (the inverse of :meth:`scanned_params`)."""
        return layers.unstack_blocks(params, "transformer_blocks", self._runs())

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def _check(self):
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal the model width "
                             f"num_attention_heads * attention_head_dim = {self.inner_dim}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm {self.qk_norm!r} not supported; known: {QK_NORMS}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside 0..{self.num_layers - 1}")

    def example_inputs(self, batch: int = 1) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the right shapes and dtypes for ``init`` / ``abstract_params``:
        latents at the config's ``sample_size``, model time, text states and pooled projections."""
        s = self.sample_size
        args = (jnp.zeros((batch, s, s, self.in_channels), self.dtype), jnp.zeros((batch,), jnp.float32))
        kwargs = dict(encoder_hidden_states=jnp.zeros((batch, TEXT_TOKENS, self.joint_attention_dim), self.dtype),
                      pooled_projections=jnp.zeros((batch, self.pooled_projection_dim), self.dtype))
        return args, kwargs

    @nn.compact
    def __call__(self, x, t, encoder_hidden_states, pooled_projections):
        self._check()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p, c_out = self.inner_dim, self.patch_size, self.output_channels
        b, height, width, _ = x.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))

        h = PatchEmbed(d, p, self.sample_size, self.pos_embed_max_size, name="pos_embed", **kw)(
            jnp.asarray(x, self.dtype))
        temb = TimestepTextEmbedding(d, name="time_text_embed", **kw)(t, jnp.asarray(pooled_projections))
        context = layers.dense(self.caption_projection_dim, "context_embedder", **kw)(
            jnp.asarray(encoder_hidden_states, self.dtype))

        block = layers.remat(JointTransformerBlock, self.remat)
        for start, stop in self._runs() or [(i, i + 1) for i in range(self.num_layers)]:
            pre_only, dual = self._block_kind(start)
            fields = dict(dim=d, num_heads=self.num_attention_heads, head_dim=self.attention_head_dim,
                          context_pre_only=pre_only, qk_norm=self.qk_norm, use_dual_attention=dual, **kw)
            if stop - start == 1:
                h, context = block(name=f"transformer_blocks_{start}", **fields)(h, context, temb)
                self.sow("intermediates", f"block_{start}", h)
                continue
            scanned = block(name=layers.scanned_name("transformer_blocks", start, stop), **fields)
            (h, context), (outs, _) = layers.scan_blocks(scanned, stop - start, (h, context), temb)
            for j, i in enumerate(range(start, stop)):
                self.sow("intermediates", f"block_{i}", outs[j])

        h = layers.AdaLayerNormContinuous(d, eps=1e-6, elementwise_affine=False, name="norm_out", **kw)(h, temb)
        h = layers.dense(p * p * c_out, "proj_out", kernel_init=nn.initializers.zeros, **kw)(h)

        # tokens (h, w) each holding a (p, q, c) patch -> NHWC
        gh, gw = height // p, width // p
        h = h.reshape(b, gh, gw, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, gh * p, gw * p, c_out)


def block_features(module: SD3Transformer2DModel, params, x, t, encoder_hidden_states, pooled_projections,
                   blocks: Iterable[int] | None = None) -> dict[int, jax.Array]:
    """The image tokens (B, T, D) that blocks ``blocks`` (default: all) output, as {index: tokens}.

    For LADD's discriminator, which taps the frozen teacher: the tokens are ordinary
    functions of ``x`` (and of ``params``), so gradients flow through them to ``x``; stop
    the teacher's parameter gradients by not differentiating w.r.t. ``params``. Reshape to
    the patch grid with ``tokens.reshape(B, H // p, W // p, D)`` (row-major (h, w) order).
    Under ``jax.jit`` the blocks after the deepest tapped one and the output layer feed
    nothing returned, so XLA drops them.
    """
    blocks = tuple(range(module.num_layers)) if blocks is None else tuple(int(i) for i in blocks)
    bad = [i for i in blocks if not 0 <= i < module.num_layers]
    if bad:
        raise ValueError(f"blocks {bad} outside 0..{module.num_layers - 1}")
    _, state = module.apply({"params": params}, x, t, encoder_hidden_states, pooled_projections,
                            mutable=["intermediates"])
    inter = state["intermediates"]
    return {i: inter[f"block_{i}"][0] for i in blocks}


# Params that are buffers in diffusers / the original SD3 (fixed, never trained).
BUFFERS = (("pos_embed", "pos_embed"),)


def trainable_mask(params):
    """A pytree of bools like ``params``: False for the fixed position table, True elsewhere.
    Pass it as ``trainable_mask`` to ``jdistill.train.state.make_optimizer`` when fine-tuning
    (a student in LADD), so that weight decay does not shrink a table that gets no gradient."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k not in BUFFERS for k in flat})
