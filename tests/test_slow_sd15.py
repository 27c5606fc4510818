"""The full-size Stable Diffusion 1.5 UNet against diffusers (slow: excluded by default; run
with ``pytest -m slow -s tests/test_slow_sd15.py`` to see the memory report).

The public runwayml/stable-diffusion-v1-5 ``unet/config.json`` values, random weights in
PyTorch (every parameter redrawn), saved with ``save_pretrained`` as safetensors, converted
by the streaming engine from a lazily read safetensors file in a fresh process, run at 64x64
latents with 77 text tokens; <= 1e-4 relative. The conversion's process reports its peak
memory: its peak resident set (which also counts the pages of the memory-mapped
checkpoint it has touched; read from /proc/self/status, as ``ru_maxrss`` would inherit the
parent's peak), the split of what is resident at the end of the conversion, and the
tracemalloc peak of the conversion (the arrays Python allocated), next to the size of the
converted params.
"""

import gc
import json
import subprocess
import sys
import time

import diffusers
import numpy as np
import pytest
import torch
from test_unet_cond import randomize_

from jdistill.testing import assert_close, nchw, nhwc

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# Runs in a fresh process, so that its peak memory is the conversion's and the JAX forward's
# alone: convert from the lazily read file, record, run the jitted UNet, save its output.
CONVERT_AND_RUN = r"""
import json, sys, time, tracemalloc
from collections.abc import Mapping

import jax
import numpy as np
from safetensors import safe_open

jax.config.update("jax_default_matmul_precision", "highest")
from jdistill.convert import unet_cond

folder, inputs_path, out_path = sys.argv[1:4]
GiB = 2 ** 30


def memory():
    # this process's own counters (ru_maxrss would carry over the parent's peak through fork + exec):
    # VmHWM the peak resident set so far, RssAnon / RssFile what is resident now in allocated
    # memory / in file pages (the memory-mapped checkpoint)
    out = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024 / GiB  # kB
    return out


class LazySafetensors(Mapping):
    # one tensor read (copied out of the file mapping) per access, nothing cached
    def __init__(self, handle):
        self.handle, self.names = handle, list(handle.keys())

    def __getitem__(self, key):
        return self.handle.get_tensor(key)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


report = {"peak_rss_after_imports_gib": memory()["VmHWM"]}
config = json.load(open(f"{folder}/config.json"))
module = unet_cond.module_from_config(config)
t0 = time.perf_counter()
tracemalloc.start()
with safe_open(f"{folder}/diffusion_pytorch_model.safetensors", framework="numpy") as handle:
    params = unet_cond.load_params(LazySafetensors(handle), module)
    now = memory()
report["conversion_tracemalloc_peak_gib"] = tracemalloc.get_traced_memory()[1] / GiB
tracemalloc.stop()
report["conversion_s"] = time.perf_counter() - t0
report["conversion_peak_rss_gib"] = memory()["VmHWM"]
report["rss_anon_gib"], report["rss_file_gib"] = now["RssAnon"], now["RssFile"]
report["params_gib"] = sum(x.nbytes for x in jax.tree.leaves(params)) / GiB
report["tensors"] = len(jax.tree.leaves(params))

inputs = np.load(inputs_path)
t0 = time.perf_counter()
out = jax.jit(module.apply)({"params": params}, inputs["sample"], inputs["timestep"],
                            inputs["encoder_hidden_states"])
out = np.asarray(out)
report["jax_compile_and_run_s"] = time.perf_counter() - t0
report["total_peak_rss_gib"] = memory()["VmHWM"]
np.save(out_path, out)
print(json.dumps(report))
"""


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers(tmp_path):
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model = randomize_(diffusers.UNet2DConditionModel.from_config(SD15_UNET), seed=0).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 850_000_000  # the real SD 1.5 UNet has 859.5M
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["block_out_channels"] == [320, 640, 1280, 1280]

    rng = np.random.default_rng(0)
    inputs = dict(sample=rng.standard_normal((1, 64, 64, 4)).astype(np.float32), timestep=np.array([500]),
                  encoder_hidden_states=rng.standard_normal((1, 77, 768)).astype(np.float32))
    np.savez(tmp_path / "inputs.npz", **inputs)
    t0 = time.perf_counter()
    with torch.no_grad():
        expected = nhwc(model(torch.from_numpy(nchw(inputs["sample"])), torch.from_numpy(inputs["timestep"]),
                              torch.from_numpy(inputs["encoder_hidden_states"])).sample.numpy())
    torch_s = time.perf_counter() - t0
    del model
    gc.collect()

    proc = subprocess.run([sys.executable, "-c", CONVERT_AND_RUN, str(tmp_path), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    out = np.load(tmp_path / "out.npy")
    err = assert_close(out, expected, 1e-4, "SD 1.5 UNet")
    print(f"\nSD 1.5 UNet ({n_params / 1e6:.1f}M params, {report['tensors']} tensors, "
          f"{report['params_gib']:.2f} GiB fp32): relative error {err:.2e}\n"
          f"  conversion: {report['conversion_s']:.1f} s, peak RSS {report['conversion_peak_rss_gib']:.2f} GiB "
          f"(after imports {report['peak_rss_after_imports_gib']:.2f} GiB; at its end "
          f"{report['rss_anon_gib']:.2f} GiB allocated + {report['rss_file_gib']:.2f} GiB of mapped checkpoint "
          f"pages), tracemalloc peak {report['conversion_tracemalloc_peak_gib']:.2f} GiB\n"
          f"  JAX compile + forward {report['jax_compile_and_run_s']:.1f} s, process peak RSS "
          f"{report['total_peak_rss_gib']:.2f} GiB; PyTorch forward {torch_s:.1f} s; "
          f"test total {time.perf_counter() - t_start:.1f} s")
