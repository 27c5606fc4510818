"""Run a config's planned train step for real on this process's CPU devices and measure its memory.

    python tests/measure_step_memory.py CONFIG STEP DATA FSDP OUT.json   (JAX_NUM_CPU_DEVICES = DATA * FSDP)

The step is the one ``jdistill plan`` compiles (the recipe's ``plan`` steps), made concrete:
every weight the plan leaves abstract gets random values here (this run measures memory, not
quality), the batch is random. It is jitted with ``Engine.jit`` and run twice; before the second
call the process's peak-RSS mark is reset (``/proc/self/clear_refs``), so the peak RSS over the
call minus the RSS before it is what the step itself allocated on all devices together
(activations, gradients, gathered weights: XLA's temp buffers; the donated state is updated in
place). Also written: the bytes of the step's arguments (state, frozen tree, batch) that device
0 holds, counted over the live arrays' shards, and the temp XLA's memory analysis gives for this
process's own executable (what the plan's compile must equal).
"""

import ctypes
import json
import os
import re
import sys

# glibc raises its mmap threshold after large frees, and then serves the next step's buffers from
# heap memory the previous one freed: RSS would not grow. A fixed threshold maps every large buffer
# fresh (and unmaps it when freed), so the peak RSS over a call is what the call allocated.
LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB, no dynamic adjustment

from jdistill.plan.run import BUFFER_ASSIGNMENT_FLAGS  # noqa: E402  (imports no jax)

# the program the plan compiles: every buffer in XLA's assignment (no YNNPACK scratch beside it)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {BUFFER_ASSIGNMENT_FLAGS}".strip()
import jax  # noqa: E402  (after mallopt and the flags: XLA's allocations follow them)
import numpy as np  # noqa: E402

from jdistill import config as config_lib
from jdistill.plan.steps import abstract_value
from jdistill.recipes import get_recipe
from jdistill.train import mesh as mesh_lib
from jdistill.train import partitioning


def rss_and_peak() -> tuple[int, int]:
    status = open("/proc/self/status").read()
    kib = {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}
    return kib["VmRSS"] * 1024, kib["VmHWM"] * 1024


def random_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    made = [jax.random.randint(k, x.shape, 0, 10).astype(x.dtype) if np.issubdtype(x.dtype, np.integer)
            else 0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, made)


def device0_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def main(config, step_name, data, fsdp, out):
    cfg = config_lib.load_config(config)
    step = next(s for s in get_recipe(cfg).plan(cfg) if s.name == step_name)
    mesh = mesh_lib.make_mesh(int(data), int(fsdp))
    engine = step.engine
    params = abstract_value(step.init)
    abstract_state = jax.eval_shape(lambda p: engine.init(p, jax.random.key(step.seed)), params)
    state = jax.jit(lambda: engine.init(random_like(params, jax.random.key(1)), jax.random.key(step.seed)),
                    out_shardings=engine.shardings(abstract_state, mesh))()
    frozen = jax.jit(lambda: random_like(step.frozen, jax.random.key(2)),
                     out_shardings=partitioning.shardings(step.frozen, mesh))()
    batch = jax.device_put(random_like(step.batch, jax.random.key(3)), mesh_lib.batch_sharding(mesh))
    arguments = device0_bytes((state, frozen, batch))
    fn = engine.jit(mesh, state, frozen)
    executable_temp = fn.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes
    state, metrics = fn(state, frozen, batch)  # compiles, runs once
    jax.block_until_ready((state, metrics))
    LIBC.malloc_trim(0)  # give back what the first call freed, so the second allocates afresh
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, _ = rss_and_peak()
    state, metrics = fn(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    _, peak = rss_and_peak()
    assert np.isfinite(float(metrics["loss"])), metrics
    with open(out, "w") as f:
        json.dump({"devices": len(jax.devices()), "step_peak_all_devices": peak - before,
                   "argument_bytes_device0": arguments, "executable_temp": int(executable_temp)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
