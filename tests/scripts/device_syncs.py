"""Host synchronisations per training step on the fake GPU, for several layer and micro-batch
counts. Each count is the difference of two runs (steps 2 and 4) over the 2 extra steps, so the
set-up, the final eval and the summary are not counted.

    PYTHONPATH=tests/fakegpu:. python tests/scripts/device_syncs.py
"""

import io
import json

from cupy import _fake

from mpipipe import TrainConfig, train


def syncs(layers: int, microbatches: int, steps: int) -> int:
    cfg = TrainConfig(
        layers=layers, d_model=16, heads=2, seq_len=8, global_batch=8,
        microbatches=microbatches, steps=steps, eval_batches=1, eval_every=0,
        backend="cupy", peak_tflops=1.0, log_every=1000,
    )  # fmt: skip
    _fake.reset()
    train(cfg, out=io.StringIO())
    return _fake.counts["host_syncs"]


rows = []
for layers, m in ((2, 2), (4, 2), (8, 2), (2, 4), (2, 8)):
    per_step = (syncs(layers, m, 4) - syncs(layers, m, 2)) / 2
    rows.append({"layers": layers, "microbatches": m, "host_syncs_per_step": per_step})
print(json.dumps(rows))
