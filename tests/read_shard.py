"""One process of a multi-process read of the digits test split (what a pod host does with its data).

    python tests/read_shard.py COORDINATOR_PORT PROCESS_ID NUM_PROCESSES GLOBAL_BATCH STEPS OUT.json

Joins the JAX cluster over loopback (gloo), wraps the split's random-access source so that every
record index it is asked for is recorded, and reads STEPS global batches through
``BatchSource.iterate(mesh=...)``: each process loads only its rows, the batches are assembled
into global arrays over a mesh of all processes' devices, and a jitted sum of the global labels is
taken. Two sources are read: one told to stream (the path of a split too big for memory, such as
ImageNet), and one that decides by size (made to decide "stream" by a zero memory budget), whose
size probe must also stay in the process's own shard. Writes the recorded reads, in order, the
process's rows per step and the global label sums.
"""

import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.train import distributed


class RecordingSource(Sequence):
    """A random-access source that remembers every index read from it."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(int(index))
        return self.source[index]


def main(port, process_id, num_processes, global_batch, steps, out):
    distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
    from jdistill.data import pipeline
    from jdistill.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(len(jax.devices()), 1)
    builder = pipeline.load_builder("digits")
    label_sum = jax.jit(lambda b: jnp.sum(b["label"]), out_shardings=mesh_lib.replicated(mesh))
    result = {"process": jax.process_index(), "processes": jax.process_count()}
    for name, options in (("stream", dict(in_memory=False)), ("auto", dict(in_memory=None))):
        if name == "auto":
            pipeline.IN_MEMORY_BYTES = 0  # a split "too big for memory": the size probe is the only extra read
        recording = RecordingSource(builder.as_data_source("test"))
        source = pipeline.BatchSource(recording, global_batch_size=int(global_batch), seed=3, image_shape=(8, 8, 1),
                                      name="digits[test]", **options)
        assert not source.in_memory
        probe = list(recording.read)
        sums = [int(np.asarray(label_sum(batch).addressable_data(0)))
                for batch in source.iterate(0, int(steps), mesh=mesh, num_threads=1, prefetch=1)]
        result[name] = {"probe": probe, "read": recording.read[len(probe):], "label_sums": sums,
                        "rows": [source.local_indices(k).tolist() for k in range(int(steps))],
                        "global_rows": [source.global_indices(k).tolist() for k in range(int(steps))]}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
