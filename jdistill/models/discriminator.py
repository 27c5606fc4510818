"""LADD's discriminator heads on a frozen teacher's block tokens (Sauer et al., 2024).

The feature network is the teacher itself (``Denoiser.features`` at the tapped blocks, with
gradients into its input); only these heads train. One head per tapped block:

* ``head="conv"`` (the paper): the block's image tokens (B, T, D) back on their 2-D patch grid
  (row-major (h, w), as DiT and MMDiT order them) -> 3x3 conv -> GroupNorm -> SiLU, modulated by
  the condition c -> 3x3 conv -> SiLU -> a logit per grid position, plus a projection term
  <h, P c> / sqrt(width) (a projection discriminator). c = MLP(sin-cos features of the
  re-noising level's model time) + the class embedding or a projection of the pooled text.
* ``head="stylegan_t"`` (Sana-Sprint's): unconditioned 1-D heads over the token sequence, as
  StyleGAN-T's: a k=1 conv block, then a residual k=9 (circular) conv block averaged with its
  input (/ sqrt 2), LeakyReLU 0.2, a logit per token. Sana's spectral norm and local batch norm
  carry state between steps; here the blocks normalise with GroupNorm and no spectral norm.

Call: ``module.apply({"params": p}, features, t, class_labels=None, pooled=None)`` with
``features`` ``{block name: tokens (B, T, D)}``, ``t`` (B,) the re-noising level's model time
(1000 t for flow); returns logits (B, N), N the positions of every head concatenated.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jdistill.models import layers

HEADS = ("conv", "stylegan_t")
TIME_FEATURES = 256


def _groups(width: int) -> int:
    return math.gcd(width, 32)


class ConvHead(nn.Module):
    """Tokens on their 2-D grid -> conv layers -> a logit per position, conditioned on c (B, width)."""

    width: int
    grid: tuple[int, int]

    @nn.compact
    def __call__(self, tokens, c):
        b, n, d = tokens.shape
        gh, gw = self.grid
        if gh * gw != n:
            raise ValueError(f"{n} tokens do not fill the {gh}x{gw} patch grid")
        # no bias before a GroupNorm: the norm cancels it, its gradient is rounding noise that Adam
        # would amplify into a drift (and 8 devices would drift apart from 1)
        h = nn.Conv(self.width, (3, 3), use_bias=False, name="conv_in")(tokens.reshape(b, gh, gw, d))
        h = nn.silu(nn.GroupNorm(_groups(self.width), name="norm")(h))
        scale, shift = jnp.split(nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros, name="film")(c), 2, -1)
        h = h * (1.0 + scale[:, None, None]) + shift[:, None, None]
        h = nn.silu(nn.Conv(self.width, (3, 3), name="conv_mid")(h))
        logits = nn.Conv(1, (1, 1), name="conv_out")(h)[..., 0]
        proj = nn.Dense(self.width, name="projection")(c)
        logits = logits + jnp.einsum("bhwc,bc->bhw", h, proj) / math.sqrt(self.width)
        return logits.reshape(b, gh * gw)


class TokenHead(nn.Module):
    """StyleGAN-T's head (Sana-Sprint): k=1 block, residual k=9 block, a logit per token; no condition."""

    width: int

    def _block(self, x, kernel: int, name: str):
        x = nn.Conv(self.width, (kernel,), padding="CIRCULAR", use_bias=False, name=f"{name}_conv")(x)  # normed next
        x = nn.GroupNorm(_groups(self.width), name=f"{name}_norm")(x)
        return nn.leaky_relu(x, 0.2)

    @nn.compact
    def __call__(self, tokens, c=None):
        h = self._block(tokens, 1, "block_1")
        h = (h + self._block(h, 9, "block_9")) / math.sqrt(2.0)
        return nn.Conv(1, (1,), name="conv_out")(h)[..., 0]


class Discriminator(nn.Module):
    blocks: tuple[str, ...]  # the tapped blocks' names, e.g. ("block_1", "block_3")
    grid: tuple[int, int]  # the patch grid (H / p, W / p) the tokens lie on
    width: int = 128
    head: str = "conv"
    num_classes: int = 0  # class-conditional heads (labels 0..num_classes-1)
    pooled_dim: int = 0  # text-conditional heads: width of the pooled text embedding

    def condition(self, t, class_labels, pooled):
        """c = MLP(time features of the re-noising level) + the class / pooled-text embedding."""
        c = layers.TimestepEmbedding(self.width, name="time_embedder")(
            layers.timestep_embedding(t, TIME_FEATURES, flip_sin_to_cos=True, freq_shift=0.0))
        if self.num_classes:
            if class_labels is None:
                raise ValueError("this discriminator is class-conditional: pass class_labels")
            c = c + nn.Embed(self.num_classes, self.width, name="class_embedder")(jnp.asarray(class_labels, jnp.int32))
        if self.pooled_dim:
            if pooled is None:
                raise ValueError("this discriminator is text-conditional: pass pooled")
            c = c + nn.Dense(self.width, name="text_embedder")(pooled)
        return c

    @nn.compact
    def __call__(self, features: dict, t, class_labels=None, pooled=None):
        if self.head not in HEADS:
            raise ValueError(f"unknown discriminator head {self.head!r}; expected one of {HEADS}")
        missing = [b for b in self.blocks if b not in features]
        if missing:
            raise ValueError(f"features of the tapped blocks {missing} are missing; got {sorted(features)}")
        if self.head == "conv":
            b = next(iter(features.values())).shape[0]
            t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
            c = self.condition(t, class_labels, pooled)
            logits = [ConvHead(self.width, tuple(self.grid), name=f"head_{name}")(features[name].astype(jnp.float32), c)
                      for name in self.blocks]
        else:
            logits = [TokenHead(self.width, name=f"head_{name}")(features[name].astype(jnp.float32))
                      for name in self.blocks]
        return jnp.concatenate(logits, axis=1)
