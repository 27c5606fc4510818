"""The per-host input pipeline: 4 processes over loopback (jax.distributed with gloo, one CPU device
each, as 4 pod hosts) read the digits test split through BatchSource; every record index each one
asks its source for is recorded (tests/read_shard.py)."""

import json
import socket

import numpy as np
import pytest
from cli_helpers import run_script

from jdistill.data import pipeline

PROCESSES, GLOBAL_BATCH, EXAMPLES = 4, 60, 300  # 5 global batches per epoch, 15 rows per process per batch
EPOCHS = 2
STEPS = EPOCHS * EXAMPLES // GLOBAL_BATCH


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 4 processes starting JAX: 26 s on the shared machine, over this branch's default-test budget
def test_four_processes_read_disjoint_quarters_of_every_epoch(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"process_{i}.json" for i in range(PROCESSES)]
    procs = [run_script("read_shard.py", [str(port), str(i), str(PROCESSES), str(GLOBAL_BATCH), str(STEPS), str(o)],
                        devices=1) for i, o in enumerate(outs)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    results = sorted((json.loads(o.read_text()) for o in outs), key=lambda r: r["process"])
    assert [r["process"] for r in results] == list(range(PROCESSES))
    assert all(r["processes"] == PROCESSES for r in results)
    split = pipeline.load_builder("digits").as_data_source("test")
    assert len(split) == EXAMPLES
    labels = np.asarray([int(split[i]["label"]) for i in range(EXAMPLES)])
    per_process = EXAMPLES // PROCESSES
    local = GLOBAL_BATCH // PROCESSES

    for path in ("stream", "auto"):
        reads = [r[path]["read"] for r in results]
        for r, read in zip(results, reads):
            # a process reads exactly its own rows of every global batch, in order, and nothing else
            assert read == [i for rows in r[path]["rows"] for i in rows]
        for epoch in range(EPOCHS):
            quarters = [set(read[epoch * per_process:(epoch + 1) * per_process]) for read in reads]
            assert all(len(q) == per_process for q in quarters)  # no record twice within an epoch
            assert set().union(*quarters) == set(range(EXAMPLES))  # together: every record, once
            assert sum(len(q) for q in quarters) == EXAMPLES  # hence pairwise disjoint
        assert any(read[:per_process] != read[per_process:2 * per_process] for read in reads)  # reshuffled
        for k in range(STEPS):
            # the global batch is the processes' rows in process order, and the global arrays the mesh
            # assembled hold exactly those records (their labels' sum, computed under jit, agrees)
            rows = [i for r in results for i in r[path]["rows"][k]]
            assert all(r[path]["global_rows"][k] == rows for r in results)
            expected = int(labels[[i for read in reads for i in read[k * local:(k + 1) * local]]].sum())
            assert all(r[path]["label_sums"][k] == expected for r in results)
    # streaming reads nothing up front; a source deciding by size probes one record of its own shard
    for r in results:
        assert r["stream"]["probe"] == []
        assert len(r["auto"]["probe"]) == 1 and r["auto"]["probe"][0] in r["auto"]["rows"][0]
