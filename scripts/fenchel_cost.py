"""Fenchel's cost per step against Adam's, in one process: ms per step, the ratio, FLOPs and a per-block profile.

Usage: python scripts/fenchel_cost.py --model 784-300-10 --batch-size 500 --steps 20 [--set alternations=1]
Both methods start from the same initial weights and see the same batches (MNIST training split). Timing is the
median over ``--steps`` steps after ``--warmup``; the block profile uses the method's named-block hook
(``Method.set_block_hook``) and attributes each block's wall time to its innermost open block.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from liftkit.data import batch_indices, load_dataset
from liftkit.methods.base import get as get_method
from liftkit.models import build_model


class BlockTimer:
    """Exclusive wall time and call counts per named block (time inside a nested block goes to the inner one)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._stack.append([0.0])
        try:
            yield
        finally:
            total = time.perf_counter() - t0
            (inner,) = self._stack.pop()
            self.seconds[name] += total - inner
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][0] += total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="784-300-10")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--set", action="append", default=[], help="fenchel key=value hyperparameter")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", split="validation")
    idx_all = batch_indices(data.x_train.shape[0], args.batch_size, seed=0, epoch=0)
    batches = [(data.x_train[i], data.y_train[i]) for i in idx_all[: args.warmup + args.steps]]
    hp = dict(kv.split("=", 1) for kv in args.set)
    methods = {}
    for name, kw in (("fenchel", hp), ("adam", {"lr": args.adam_lr})):
        model = build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes,
                            output_activation=get_method(name).model_output_activation, seed=0)
        methods[name] = get_method(name)(model, **kw)
    ms: dict[str, list[float]] = defaultdict(list)
    iters: dict[str, list[float]] = defaultdict(list)  # inner iterations per block (x_tol / w_tol stop early)
    for k, (x, y) in enumerate(batches):
        for name, meth in methods.items():
            t0 = time.perf_counter()
            info = meth.step(x, y).info
            if k >= args.warmup:
                ms[name].append(1e3 * (time.perf_counter() - t0))
                for key, value in info.items():
                    if name == "fenchel" and key.startswith(("x_iters_l", "w_iters_l")):
                        iters[key].append(value)
    flops = {}
    for name, meth in methods.items():
        with FlopCounterMode(display=False) as counter:
            meth.step(*batches[0])
        flops[name] = counter.get_total_flops() / 1e9
    timer = BlockTimer()
    fen = methods["fenchel"]
    fen.set_block_hook(timer)
    t0 = time.perf_counter()
    n_prof = max(3, args.steps // 2)
    for x, y in batches[:n_prof]:
        fen.step(x, y)
    step_s = (time.perf_counter() - t0) / n_prof
    fen.set_block_hook(None)
    med = {k: statistics.median(v) for k, v in ms.items()}
    out = {
        "model": args.model, "batch": args.batch_size, "threads": args.threads, "set": hp,
        "ms_per_step": med, "ratio": med["fenchel"] / med["adam"], "gflop_per_step": flops,
        "profile_ms_per_step": {
            k: round(1e3 * v / n_prof, 2) for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])
        },
        "profile_calls_per_step": {k: v / n_prof for k, v in timer.calls.items()},
        "profiled_step_ms": 1e3 * step_s,
        "mean_iters_per_step": {k: round(statistics.mean(v), 2) for k, v in sorted(iters.items())},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
