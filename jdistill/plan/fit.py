"""Does a planned step fit an accelerator, by how much not, and which setting would make it fit.

Capacities are the memory one JAX device has (one chip; a TPU v5p chip's two TensorCores
are one device, so a "v5p-64" slice is 32 devices). Peak FLOPs are the published dense
bf16 figures, used only for the compute-bound lower bound on a step's time.

The advice is estimated from the plan's own figures, each stated with its assumption:

* bf16 params: float32 params, optimizer moments, averages and frozen weights take half;
* more fsdp: move a factor k from the data axis to fsdp (same devices, same per-device
  batch): sharded state / k; where no such move fits, fsdp over twice the devices (the same
  per-device batch, so twice the global one): sharded state / 2;
* remat: activations (most of ``temp``) are recomputed in the backward pass instead of
  kept, about a third more compute; offered where the network has the option;
* a smaller per-device batch: ``temp`` scales about linearly with it.

Re-plan with the setting to confirm (the report prints the command).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    title: str
    memory: int  # bytes per device
    peak_flops: float  # dense bf16 FLOP/s per device


ACCELERATORS = {a.name: a for a in (
    Accelerator("v5e", "TPU v5e", 16 * GiB, 197e12),
    Accelerator("v5p", "TPU v5p", 95 * GiB, 459e12),
    Accelerator("h100", "H100 80GB", 80 * GiB, 989e12),
    Accelerator("h200", "H200", 141 * GiB, 989e12),
)}


def get(name: str) -> Accelerator:
    from jdistill.errors import InvalidArgument

    key = str(name).lower().replace("tpu", "").replace("-", "").replace(" ", "")
    if key not in ACCELERATORS:
        raise InvalidArgument(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]


STATE_KINDS = ("params", "optimizer", "averages", "frozen")


def fit(result: dict, acc: Accelerator) -> dict:
    peak = result["memory"]["peak"]
    return {"accelerator": acc.name, "title": acc.title, "capacity": acc.memory, "peak": peak,
            "fits": peak <= acc.memory, "headroom": acc.memory - peak,
            "ideal_seconds": result["flops"] / acc.peak_flops if acc.peak_flops else None}


def advice(result: dict, acc: Accelerator, mesh: dict) -> list[dict]:
    """Settings that change the per-device peak, each with its estimated peak and whether that fits."""
    mem, nbytes, options = result["memory"], result["bytes"], result.get("options", {})
    peak, temp = mem["peak"], mem["temp"]
    state = sum(nbytes.get(k, 0) for k in STATE_KINDS)
    out = []

    def setting_text(option, value):
        if option.get("in_config"):
            return f"--config.{option['key']}={value}"
        return f"add {option['key']}={value} to the config"

    def add(setting, how, estimate, note):
        out.append({"setting": setting, "how": how, "estimated_peak": int(estimate), "fits": estimate <= acc.memory,
                    "note": note})

    dtype = options.get("param_dtype", {})
    counts = result.get("param_counts", {})
    fp32 = sum(c["dtypes"].get("float32", 0) for c in counts.values())
    total = sum(c["count"] for c in counts.values()) or 1
    if dtype.get("available") and fp32:
        add("bf16 params", setting_text(dtype, "bfloat16"), peak - 0.5 * state * fp32 / total,
            "float32 params, moments, averages and frozen weights at half the bytes")
    data = int(mesh.get("data", 1))
    k = 2
    while k <= data and data % k == 0:
        estimate = peak - state + state / k
        add(f"fsdp x{k}", f"--mesh data={data // k},fsdp={int(mesh.get('fsdp', 1)) * k}"
            + (f",tensor={mesh['tensor']}" if int(mesh.get("tensor", 1)) > 1 else ""), estimate,
            "same devices and per-device batch; sharded state / k")
        if estimate <= acc.memory:
            break
        k *= 2
    if not any(a["fits"] for a in out if a["setting"].startswith("fsdp x")):
        fsdp, tensor = int(mesh.get("fsdp", 1)), int(mesh.get("tensor", 1))
        add("fsdp over twice the devices", f"--mesh data={data},fsdp={2 * fsdp}" + (f",tensor={tensor}" if tensor > 1
            else "") + f" --devices {2 * data * fsdp * tensor}", peak - state / 2,
            "the same per-device batch (twice the global batch); sharded state / 2")
    remat = options.get("remat", {})
    # the networks' remat is a policy name (layers.REMAT_POLICIES: "none", "dots", "full")
    if remat.get("available") and set(remat.get("values", [])) <= {"none"}:
        add("remat", setting_text(remat, "full"), peak - 0.5 * temp,
            "each block's activations recomputed in the backward pass (about 1/3 more compute); half of temp is a "
            "guess: re-plan")
    elif not remat.get("available"):
        out.append({"setting": "remat", "how": "", "estimated_peak": None, "fits": None,
                    "note": "this network has no activation-checkpointing option yet"})
    if result.get("batch_per_device", 0) >= 2:
        add("half the per-device batch", "half --config.data.batch_size, or twice the devices",
            peak - 0.5 * temp, "temp taken as proportional to the per-device batch")
    return out


def fix(result: dict, acc: Accelerator, mesh: dict) -> dict | None:
    """The first estimated setting that makes an over-capacity step fit (None when it fits already or none does)."""
    if result["memory"]["peak"] <= acc.memory:
        return None
    return next((a for a in advice(result, acc, mesh) if a["fits"]), None)
