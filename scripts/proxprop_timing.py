"""Interleaved per-step timing of ProxProp against Adam (and backprop through ProxProp's own code path).

On a shared, noisy machine, sequential runs see different loads; this script alternates short blocks of
steps of each method on the same MNIST batches, so every method sees the same load, and reports the median
seconds per step and the ratio to Adam. Training steps only (no evaluation). Examples::

    PYTHONPATH=src python scripts/proxprop_timing.py --blocks 20 --steps 30 --threads 2
    PYTHONPATH=src python scripts/proxprop_timing.py --dataset fashion-mnist --model resnet8 --batch-size 128 \
        --solvers exact,cg1,cg2,cg3,gradient --blocks 5 --steps 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from liftkit.data import batch_indices, load_dataset
from liftkit.methods import get
from liftkit.models import build_model

RUNS = {
    "adam": ("adam", {}),
    "proxprop (default)": ("proxprop", {}),
    "proxprop gradient mode": ("proxprop", {"solver": "gradient"}),
    "proxprop cg3": ("proxprop", {"solver": "cg3"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="784-500-10")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30, help="steps per block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--solvers", default=None,
                    help="comma-separated ProxProp solvers to time beside Adam (default: the fixed set above)")
    args = ap.parse_args()
    runs = RUNS
    if args.solvers:
        runs = {"adam": ("adam", {})}
        runs.update({f"proxprop {s}": ("proxprop", {"solver": s}) for s in args.solvers.split(",")})
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir)
    batches = batch_indices(len(data.y_train), args.batch_size, seed=0, epoch=0)
    methods = {}
    for label, (name, hp) in runs.items():
        model = build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=0)
        methods[label] = get(name)(model, **hp)
    times: dict[str, list[float]] = {label: [] for label in runs}
    cursor = 0
    for block in range(args.blocks + 1):
        chunk = [batches[(cursor + i) % len(batches)] for i in range(args.steps)]
        cursor += args.steps
        for label, method in methods.items():
            xs = [(data.x_train[idx], data.y_train[idx]) for idx in chunk]
            start = time.perf_counter()
            for x, y in xs:
                method.step(x, y)
            if block > 0:  # block 0 warms up allocators and caches
                times[label].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["adam"])
    print(f"{args.dataset} {args.model}, batch {args.batch_size}, {args.threads} threads, "
          f"{args.blocks} interleaved blocks of {args.steps} steps")
    print("| run | median ms/step | x Adam | s/epoch equivalent |")
    print("|---|---|---|---|")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"| {label} | {1000 * med:.2f} | {med / base:.2f} | {med * len(batches):.2f} |")


if __name__ == "__main__":
    main()
