"""Tokenisation for the text encoders, from local checkpoint folders only.

Diffusion pipeline folders keep one tokenizer per text encoder (``tokenizer/``,
``tokenizer_2/``, ``tokenizer_3/``); each is read by transformers' ``AutoTokenizer``
(``CLIPTokenizer`` from vocab.json + merges.txt, ``T5TokenizerFast`` from tokenizer.json)
with ``local_files_only``: nothing is downloaded. A T5 folder with only ``spiece.model``
needs the ``sentencepiece`` package to be converted.

Prompts are tokenised as the SD / SDXL / SD3 / Flux pipelines do: padded to
``max_length`` (default: the tokenizer's ``model_max_length``, 77 for CLIP) and
truncated to it, special tokens added (CLIP's start / end of text, T5's ``</s>``).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np

# transformers' "no limit" placeholder for model_max_length (int(1e30)); anything this large
# means the tokenizer config did not say.
_UNSET_MAX_LENGTH = 10**9


class Tokens(NamedTuple):
    input_ids: np.ndarray  # (B, max_length) int32
    attention_mask: np.ndarray  # (B, max_length) int32: 1 for tokens, 0 for padding


def load_tokenizer(path: str | os.PathLike, subfolder: str | None = None):
    """A transformers tokenizer from a local folder (``subfolder`` of it, e.g. "tokenizer_2" in a
    pipeline folder). Raises ``FileNotFoundError`` for a missing folder, never downloads."""
    from transformers import AutoTokenizer  # deferred: only tokenisation needs it

    folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no tokenizer folder at {folder}")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> Tokens:
    """Padded, truncated ids and attention mask of ``prompts`` as int32 numpy (B, max_length)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    max_length = max_length or tokenizer.model_max_length
    if not max_length or max_length >= _UNSET_MAX_LENGTH:
        raise ValueError("this tokenizer has no model_max_length: pass max_length (e.g. 256 or 512 for T5)")
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    return Tokens(np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32))
