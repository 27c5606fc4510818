"""Prompts -> the denoising network's ``cond``, as the Stable Diffusion pipelines build it.

Three families, told apart by their components (:func:`family_of`):

* ``"sd"`` (SD 1.x / 2.x): one CLIP text tower; ``encoder_hidden_states`` is its last hidden
  state (after the final LayerNorm). SD 2.x's OpenCLIP-H tower is saved with its last layer
  already removed, so "last" is what the pipeline uses for both.
* ``"sdxl"``: two towers; ``encoder_hidden_states`` concatenates their penultimate hidden
  states (before any final norm) along the width, and ``added_cond_kwargs`` carries
  ``text_embeds`` (the projected pooled output of the tower with a projection, SDXL's
  ``text_encoder_2``) and ``time_ids`` (original size, crop corner, target size). The SDXL
  refiner has ``text_encoder_2`` alone (its states are the whole ``encoder_hidden_states``)
  and five time ids: original size, crop corner and an aesthetic score, a different one
  (``negative_aesthetic_score``) on the unconditional side.
* ``"sd3"``: CLIP-L and CLIP-G penultimate states concatenated, zero-padded to T5's width and
  followed by T5's tokens (zeros when the pipeline has no T5) as ``encoder_hidden_states``;
  the two projected pooled outputs concatenated as ``pooled_projections``.

The unconditional side of classifier-free guidance encodes the negative prompts (empty
strings by default) the same way, in the same encoder call as the prompts (a batch of 2B).
SDXL pipelines with ``force_zeros_for_empty_prompt`` instead use zeros when no negative
prompt is given (``time_ids`` stay as they are).

:class:`PromptEncoder` is hashable (it holds only Flax modules and flags), so it is a static
argument of the jitted pipeline; tokenisation happens on the host before.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.models import tokenizers as tokenizers_lib

FAMILIES = ("sd", "sdxl", "sd3")
# the pipeline folder's text encoder / tokenizer components, in the pipelines' order
TEXT_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))


def family_of(components: Sequence[str]) -> str:
    """"sd3" for a transformer with two CLIP towers; "sdxl" for a UNet with ``text_encoder_2``;
    "sd" for a UNet with one ``text_encoder``."""
    names = set(components)
    if "transformer" in names and {"text_encoder", "text_encoder_2"} <= names:
        return "sd3"
    if "unet" in names and "text_encoder_2" in names:
        return "sdxl"
    if "unet" in names and "text_encoder" in names:
        return "sd"
    raise ValueError(f"components {sorted(names)} are no text-to-image pipeline jdistill knows: SD 1.x / 2.x (unet, "
                     "text_encoder), SDXL (unet, text_encoder_2) or SD3 (transformer, text_encoder, text_encoder_2)")


def as_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def negatives(negative_prompts, batch: int) -> list[str]:
    """The negative prompt of each of ``batch`` prompts: "" when none, one string for all, or a list."""
    if negative_prompts is None:
        return [""] * batch
    out = [negative_prompts] * batch if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(out) != batch:
        raise ValueError(f"{len(out)} negative prompts for {batch} prompts")
    return out


def _apply(module, params, ids, mask=None):
    return module.apply({"params": params}, ids, mask)


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
    """The text side of a pipeline: its towers (Flax modules; ``None`` where the pipeline has
    none, e.g. SD3 without T5) in the order text_encoder, text_encoder_2, text_encoder_3."""

    family: str
    text_encoders: tuple
    # SD 1.x / 2.x pass the padding mask when the tower's config says ``use_attention_mask``
    use_attention_mask: tuple = ()
    # SD3 without T5: the zero tokens' (length, width) standing in for T5's output
    t5_placeholder: tuple[int, int] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown pipeline family {self.family!r}; one of {FAMILIES}")
        enc = self.text_encoders
        if self.family == "sd" and (not enc or enc[0] is None):
            raise ValueError("an SD pipeline needs its text_encoder")
        if self.family == "sdxl" and not any(_projects(m) for m in enc if m is not None):
            raise ValueError("an SDXL pipeline needs a text encoder with a projection (text_encoder_2, "
                             "CLIPTextModelWithProjection) for its pooled text_embeds")
        if self.family == "sd3":
            if len(enc) < 2 or not (_projects(enc[0]) and _projects(enc[1])):
                raise ValueError("an SD3 pipeline needs text_encoder and text_encoder_2 with projections "
                                 "(CLIPTextModelWithProjection)")
            if (len(enc) < 3 or enc[2] is None) and self.t5_placeholder is None:
                raise ValueError("an SD3 pipeline without text_encoder_3 needs t5_placeholder (length, width)")

    def token_lengths(self, tokenizers, max_sequence_length: int) -> tuple:
        """Each tower's token count: its tokenizer's ``model_max_length`` (CLIP: 77); SD3 pads
        both CLIP prompts to the first tokenizer's and T5's to ``max_sequence_length``."""
        out = []
        for i, (module, tok) in enumerate(zip(self.text_encoders, tokenizers)):
            if module is None:
                out.append(None)
            elif self.family == "sd3":
                out.append(max_sequence_length if i == 2 else tokenizers[0].model_max_length)
            else:
                out.append(tok.model_max_length)
        return tuple(out)

    def tokenize(self, tokenizers, prompts: Sequence[str], lengths: Sequence[int | None]) -> tuple:
        """Host-side: ``(ids, mask)`` int32 numpy per tower (None for absent towers)."""
        return tuple(None if n is None else tuple(tokenizers_lib.tokenize(tok, list(prompts), max_length=n))
                     for tok, n in zip(tokenizers, lengths))

    # ------------------------------------------------------------------ traced

    def text_cond(self, params, tokens) -> dict:
        """The text part of ``cond`` for a batch of tokenised prompts."""
        if self.family == "sd":
            ids, mask = tokens[0]
            masked = bool(self.use_attention_mask and self.use_attention_mask[0])
            out = _apply(self.text_encoders[0], params[0], ids, mask if masked else None)
            return {"encoder_hidden_states": out.last_hidden_state}
        if self.family == "sdxl":
            hidden, pooled = [], None
            for module, p, tok in zip(self.text_encoders, params, tokens):
                if module is None:
                    continue
                out = _apply(module, p, tok[0])
                hidden.append(out.hidden_states[-2])
                # diffusers keeps the first pooled output it sees: the projecting tower's
                if pooled is None and out.text_embeds is not None:
                    pooled = out.text_embeds
            return {"encoder_hidden_states": jnp.concatenate(hidden, axis=-1),
                    "added_cond_kwargs": {"text_embeds": pooled}}
        # sd3
        clip = [_apply(m, p, tok[0]) for m, p, tok in zip(self.text_encoders[:2], params[:2], tokens[:2])]
        hidden = jnp.concatenate([o.hidden_states[-2] for o in clip], axis=-1)
        pooled = jnp.concatenate([o.text_embeds for o in clip], axis=-1)
        if len(self.text_encoders) > 2 and self.text_encoders[2] is not None:
            t5 = _apply(self.text_encoders[2], params[2], tokens[2][0]).last_hidden_state
        else:
            length, width = self.t5_placeholder
            t5 = jnp.zeros((hidden.shape[0], length, width), hidden.dtype)
        if hidden.shape[-1] > t5.shape[-1]:
            raise ValueError(f"SD3: CLIP states of width {hidden.shape[-1]} are wider than T5's {t5.shape[-1]}")
        hidden = jnp.pad(hidden, ((0, 0), (0, 0), (0, t5.shape[-1] - hidden.shape[-1])))
        return {"encoder_hidden_states": jnp.concatenate([hidden, t5.astype(hidden.dtype)], axis=1),
                "pooled_projections": pooled}

    def __call__(self, params, tokens, negative_tokens=None, *, zero_uncond: bool = False, time_ids=None,
                 negative_time_ids=None):
        """``(cond, uncond)`` module kwargs for the prompts' ``tokens`` and, for guidance, the
        negative prompts' (``uncond`` is None without either ``negative_tokens`` or
        ``zero_uncond``). ``time_ids`` (1 or B, 6; the refiner's 5): SDXL's size / crop (/
        aesthetic) conditioning; ``negative_time_ids`` those of the unconditional side (default:
        the same)."""
        if negative_tokens is not None:
            # one encoder call for both halves, as the network will see them
            both = jax.tree.map(lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)]), tokens,
                                negative_tokens)
            cond, uncond = _halves(self.text_cond(params, both))
        else:
            cond = self.text_cond(params, tokens)
            uncond = jax.tree.map(jnp.zeros_like, cond) if zero_uncond else None
        if self.family == "sdxl":
            cond = _with_time_ids(cond, time_ids)
            if uncond is not None:
                uncond = _with_time_ids(uncond, time_ids if negative_time_ids is None else negative_time_ids)
        return cond, uncond


def _projects(module) -> bool:
    return getattr(module, "projection_dim", None) is not None


def _halves(tree):
    """A tree of 2B-batched arrays -> its first B rows and its last B rows."""
    return (jax.tree.map(lambda x: x[: x.shape[0] // 2], tree), jax.tree.map(lambda x: x[x.shape[0] // 2:], tree))


def _with_time_ids(cond: dict, time_ids) -> dict:
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids (original size, crop corner, target size)")
    batch = cond["encoder_hidden_states"].shape[0]
    ids = jnp.asarray(time_ids, cond["encoder_hidden_states"].dtype)
    n = ids.shape[-1]
    ids = jnp.broadcast_to(ids.reshape(-1, n), (batch, n))
    return {**cond, "added_cond_kwargs": {**cond["added_cond_kwargs"], "time_ids": ids}}


def sdxl_time_ids(height: int, width: int, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                  aesthetic_score: float | None = None):
    """SDXL's micro-conditioning: original (h, w), crop corner (top, left), then the target (h, w)
    or, for the refiner (``aesthetic_score`` given, diffusers' ``requires_aesthetics_score``), the
    aesthetic score; sizes default to the generated image's, as in diffusers."""
    original = tuple(original_size or (height, width))
    last = (aesthetic_score,) if aesthetic_score is not None else tuple(target_size or (height, width))
    return np.asarray([original + tuple(crops_coords_top_left) + last], np.float32)

