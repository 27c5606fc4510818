"""Writers of tiny single-file checkpoints in the original layouts, for the tests.

diffusers' package converts original layouts to its own but not back (its writers are
repository scripts, not installed), so these write the original keys by inverting
jdistill's key tables. That alone would be circular; it is not, because every file written
here is first read back by diffusers' ``from_single_file`` and must give the very tensors of
the diffusers models it was written from: diffusers, not jdistill, certifies each file (see
tests/test_single_file.py), and only then is jdistill's reading of it compared with diffusers'.
"""

import numpy as np
import torch

from jdistill.convert import clip, engine, mmdit, unet_cond, vae


def _inverse(table):
    return {v: k for k, v in table.items()}


def _t(x):
    return x.detach().clone().contiguous() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def unet(model, prefix="model.diffusion_model."):
    inv = _inverse(unet_cond.ldm_table(dict(model.config)))
    out = {}
    for k, v in model.state_dict().items():
        new = engine.rename_by_table(k, inv)
        assert new is not None, f"no original name for {k}"
        out[prefix + new] = _t(v)
    return out


def vae_(model, prefix="first_stage_model."):
    inv = _inverse(vae.ldm_table(dict(model.config)))
    out = {}
    for k, v in model.state_dict().items():
        new = engine.rename_by_table(k, inv) or k  # conv_in / conv_out / quant convs share their names
        if ".mid.attn_1." in new and new.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original stores the attention projections as 1x1 convolutions
        out[prefix + new] = _t(v)
    return out


def hf_clip(model, prefix):
    """A transformers CLIP tower under ``prefix``, ``text_model.`` spelled out (transformers 5 drops
    it from CLIPTextModel; the single files, written by transformers 4, have it)."""
    out = {}
    for k, v in model.state_dict().items():
        key = k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"
        out[prefix + key] = _t(v)
    return out


def openclip(model, prefix, extra_layer=None):
    """A CLIPTextModel(WithProjection) as an OpenCLIP tower: q / k / v fused into ``in_proj``, the
    projection as ``x @ P``. ``extra_layer``: the state dict of one more resblock to append (SD 2.x
    files hold a last layer the pipeline does not use), and a projection to go with it."""
    sd = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
          for k, v in model.state_dict().items()}
    n = model.config.num_hidden_layers
    inv = _inverse(clip.openclip_table(n))
    out = {}
    for k, v in sd.items():
        if ".self_attn.q_proj." in k:
            leaf = k.rsplit(".", 1)[1]
            qkv = [sd[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            base = engine.rename_by_table(k.replace(".q_proj." + leaf, ""), inv)
            out[f"{prefix}{base}.in_proj_{leaf}"] = torch.cat(qkv)
            continue
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k or k.endswith("position_ids"):
            continue
        new = engine.rename_by_table(k, inv)
        assert new is not None, k
        if k == "text_projection.weight":
            v = v.T
        out[prefix + new] = _t(v)
    if extra_layer is not None:
        for k, v in extra_layer.items():
            out[f"{prefix}transformer.resblocks.{n}.{k}"] = _t(v)
    return out


def mmdit_(model, prefix="model.diffusion_model."):
    config = dict(model.config)
    inv = _inverse(mmdit.original_table(config["num_layers"]))
    last = config["num_layers"] - 1
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if any(f".{p}." in k for p in ("to_k", "to_v", "add_k_proj", "add_v_proj")):
            continue
        if ".to_q." in k or ".add_q_proj." in k:
            q = ".to_q." if ".to_q." in k else ".add_q_proj."
            names = (".to_q.", ".to_k.", ".to_v.") if q == ".to_q." else (".add_q_proj.", ".add_k_proj.", ".add_v_proj.")
            v = torch.cat([sd[k.replace(q, n)] for n in names])
            k = k.replace(q, ".qkv." if q == ".to_q." else ".add_qkv.")
        if k.startswith("norm_out.linear.") or k.startswith(f"transformer_blocks.{last}.norm1_context.linear."):
            a, b = torch.chunk(v, 2)
            v = torch.cat([b, a])
        new = engine.rename_by_table(k, inv) or k
        out[prefix + new] = _t(v)
    return out


def prefixed(model, prefix):
    return {prefix + k: _t(v) for k, v in model.state_dict().items()}
