"""Every model family survives PyTorch -> jdistill (Flax) -> diffusers/transformers folder -> PyTorch
with every tensor bit-identical (so the round trip's outputs are the parity tests' outputs)."""

import diffusers
import numpy as np
import pytest
import torch
import transformers

from jdistill.convert import export, pretrained


def unet2d():
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=4)


def unet_cond():
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                          layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                          attention_head_dim=4, norm_num_groups=4)


def controlnet():
    return diffusers.ControlNetModel(in_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16,
                                     attention_head_dim=4, norm_num_groups=4,
                                     conditioning_embedding_out_channels=(4, 8))


def vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   latent_channels=4, norm_num_groups=4)


def mmdit():
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)


def t5():
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                             num_heads=4, feed_forward_proj="gated-gelu"))


FAMILIES = {"unet2d": (unet2d, diffusers.UNet2DModel), "unet_cond": (unet_cond, diffusers.UNet2DConditionModel),
            "controlnet": (controlnet, diffusers.ControlNetModel), "vae": (vae, diffusers.AutoencoderKL),
            "mmdit": (mmdit, diffusers.SD3Transformer2DModel), "t5": (t5, transformers.T5EncoderModel)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_identical(family, tmp_path):
    build, cls = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # random everything, zero-initialised layers included
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "src")
    loaded = pretrained.load_pretrained(str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"))
    assert loaded.family == family
    out = export.export_diffusers(family, loaded.module, loaded.params, loaded.config, tmp_path / "exported")
    again = cls.from_pretrained(out).eval()
    want, got = model.state_dict(), again.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k].numpy(), v.numpy(), err_msg=k)
