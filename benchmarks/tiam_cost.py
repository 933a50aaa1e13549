"""Seconds per full-batch iteration of TIAM, AM and GD in one process, interleaved, with TIAM's per-block times.

Builds the three methods with the settings of a bench config (default ``configs/tiam-mnist-full.json``), takes one
warm-up step each (it initialises TIAM's auxiliary variables and the first layer's Gram), then times ``--rounds``
rounds of one step of each in turn (interleaving keeps a shared machine's load changes out of the ratios) and
prints the medians and the ratios to GD. ``--sampling shuffle`` (the default, as the trainer's full batch) hands
every round the training set in a new permutation with its indices, ``ordered`` in dataset order; the gather of the
permuted batch is not timed. The per-block table comes from a ``time.perf_counter`` block hook (exclusive time: a
nested block's time is charged to it, not to its parent).

    PYTHONPATH=src python benchmarks/tiam_cost.py --rounds 4 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from liftkit.data import load_dataset
from liftkit.methods import Method, get
from liftkit.models import build_model


class BlockTimer:
    """A block hook that charges each interval to the innermost open block."""

    def __init__(self) -> None:
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self._stack: list[str] = []
        self._since = 0.0

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._stack.append(name)
        self.calls[name] += 1
        self._since = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[self._stack.pop()] += now - self._since
            self._since = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiam-mnist-full.json")
    ap.add_argument("--methods", default="tiam,am,sgd@gd", help="labels of the config (name@label)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sampling", choices=("shuffle", "ordered"), default="shuffle")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.config) as f:
        cfg = json.load(f)
    ds = load_dataset(cfg["dataset"])
    x_train, y_train = ds.x_train, ds.y_train
    generator = torch.Generator().manual_seed(0)
    batch: dict[str, torch.Tensor] = {}

    def next_batch() -> None:
        """The round's full batch: a new permutation (``shuffle``) or dataset order, with its indices."""
        n = x_train.shape[0]
        idx = torch.randperm(n, generator=generator) if args.sampling == "shuffle" else torch.arange(n)
        batch.update(x=x_train[idx], y=y_train[idx], idx=idx)

    next_batch()
    labels = args.methods.split(",")
    steps: dict[str, Callable[[], Any]] = {}
    timers: dict[str, BlockTimer] = {}
    for label in labels:
        name = label.split("@")[0]
        hp = {k.partition(".")[2]: v for k, v in cfg.get("set", {}).items() if k.partition(".")[0] == label}
        model = build_model(
            cfg["model"], input_shape=x_train.shape[1:], num_classes=ds.num_classes, activation=cfg["activation"],
            seed=0,
        )
        method = get(name)(model, **hp)
        # full-batch TIAM/AM keep per-sample state and need the batch's indices
        needs_idx = name in ("tiam", "am")

        def one_step(m: Method = method, with_idx: bool = needs_idx) -> object:
            x, y, idx = batch["x"], batch["y"], batch["idx"]
            return m.step(x, y, idx=idx) if with_idx else m.step(x, y)

        steps[label] = one_step
        steps[label]()  # warm-up
        timers[label] = BlockTimer()
        method.set_block_hook(timers[label])
    times: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(args.rounds):
        next_batch()
        for label in labels:
            t0 = time.perf_counter()
            steps[label]()
            times[label].append(time.perf_counter() - t0)
    median = {label: statistics.median(v) for label, v in times.items()}
    base = median[labels[-1]]
    for label in labels:
        print(f"{label:10s} {median[label]:7.3f} s/iter  ratio to {labels[-1]} {median[label] / base:5.2f}")
        timer = timers[label]
        for block, seconds in sorted(timer.seconds.items(), key=lambda kv: -kv[1]):
            calls = timer.calls[block] / args.rounds
            print(f"    {block:16s} {1000 * seconds / args.rounds:8.1f} ms/iter  {calls:4.1f} calls/iter")


if __name__ == "__main__":
    main()
