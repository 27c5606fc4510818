"""``jdistill convert SRC DST``: the command line of :func:`jdistill.convert.pretrained.convert`."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jdistill.convert import presets
from jdistill.errors import UserError
from jdistill.files import check_writable
from jdistill.convert.pretrained import DTYPES, convert

# What a bad source or destination raises: reported in one line, not as a traceback.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError,)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jdistill convert", description=(
        "Convert a PyTorch checkpoint (diffusers / transformers model or pipeline folder, .safetensors, "
        ".bin / .pt / .ckpt file, a single-file SD 1.x / 2.x / SDXL / SD3 checkpoint, or a preset name) into a "
        "jdistill folder: Orbax params per model, the configs, model_index.json, scheduler and tokenizer "
        "folders; a single file's unused keys are listed. Nothing is downloaded."))
    p.add_argument("src", help=f"folder, file, or preset ({', '.join(presets.PRESETS)})")
    p.add_argument("dst", help="the folder to create")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="stored param dtype (default fp32)")
    p.add_argument("--component", action="append", help="convert only this pipeline component (repeatable)")
    p.add_argument("--variant", help="weights variant to read, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    p.add_argument("--wrapper", help="entry of a training checkpoint that holds the weights (default: ema, then "
                                     "state_dict, model, ...)")
    p.add_argument("--config", help="what describes a bare file: a config.json / model folder (a diffusers-layout "
                                    "state dict) or a diffusers pipeline folder (a single-file checkpoint: its "
                                    "configs, scheduler and tokenizers)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--models-dir", help="where preset copies live (default: $JDISTILL_MODELS, then the HF cache)")
    return p


def main_convert(argv: Sequence[str] | None = None) -> int:
    """``jdistill convert SRC DST [--dtype bf16] [--component unet ...]``: converts, prints a
    summary (components, tensor counts, bytes, time); returns the exit status (2 on a user error)."""
    args = build_parser().parse_args(argv)
    try:
        check_writable(args.dst, "DST", folder=True)
        report = convert(args.src, args.dst, dtype=args.dtype, components=args.component, variant=args.variant,
                         wrapper=args.wrapper, overwrite=args.overwrite, models_dir=args.models_dir, config=args.config)
    except USER_ERRORS as e:
        print(f"jdistill convert: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main_convert())
