"""Interleaved 1-vs-2-worker timing of lpom-sync / lpom-async on MNIST 784-500-10 (validation split).

All four variants live in one process and take turns on blocks of 20 batches, so a change in the machine's load
hits them alike; the first block is dropped as warm-up and the median ms per batch is reported. Torch runs one
thread per worker. Usage:

    LIFTKIT_DATA_DIR=../shared/data REPS=8 PYTHONPATH=src python scripts/lpom_parallel_timing.py
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from liftkit.data import load_dataset
from liftkit.methods import get
from liftkit.models import build_model

BATCHES_PER_BLOCK = 20
RUNS = {
    "sync-w1": ("lpom-sync", 1),
    "sync-w2": ("lpom-sync", 2),
    "async-w1": ("lpom-async", 1),
    "async-w2": ("lpom-async", 2),
}


def main() -> None:
    torch.set_num_threads(1)
    ds = load_dataset("mnist", split="validation")
    xs, ys = ds.x_train, ds.y_train
    methods = {}
    for label, (name, workers) in RUNS.items():
        model = build_model("784-500-10", input_shape=(1, 28, 28), num_classes=10, output_activation="hidden", seed=0)
        methods[label] = get(name)(model, workers=workers)
    ms_per_batch: dict[str, list[float]] = {label: [] for label in methods}
    for rep in range(int(os.environ.get("REPS", "6"))):
        for label, method in methods.items():
            start = time.perf_counter()
            for b in range(rep * BATCHES_PER_BLOCK, (rep + 1) * BATCHES_PER_BLOCK):
                method.step(xs[b * 100 : (b + 1) * 100], ys[b * 100 : (b + 1) * 100])
            if rep:
                ms_per_batch[label].append((time.perf_counter() - start) / BATCHES_PER_BLOCK * 1000)
    median = {label: statistics.median(v) for label, v in ms_per_batch.items()}
    print("ms/batch median", {label: round(v, 2) for label, v in median.items()})
    print(
        f"speed-up w1/w2: sync {median['sync-w1'] / median['sync-w2']:.2f} "
        f"async {median['async-w1'] / median['async-w2']:.2f}"
    )
    print("all blocks", {label: [round(v, 1) for v in vals] for label, vals in ms_per_batch.items()})


if __name__ == "__main__":
    main()
