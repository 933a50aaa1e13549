"""Fenchel's cost per step against Adam's, in one process: ms per step, the ratio, FLOPs and a per-block profile.

Both methods start from the same initial weights and see the same batches (default: MNIST, validation split).
Timing is the median over ``--steps`` steps after ``--warmup``, the two methods stepping in turn; the profile
comes from :func:`liftkit.profiling.profile` on the method's named blocks (exclusive time and matrix-product
FLOPs per block). A single method's profile alone is ``liftkit bench --profile``. Usage::

    PYTHONPATH=src python benchmarks/fenchel_cost.py --model 784-300-10 --batch-size 500 --steps 20 \\
        --set alternations=1
"""

from __future__ import annotations

from typing import Any

from torch.utils.flop_counter import FlopCounterMode

from common import base_parser, build_method, emit_json, interleaved_timing, load_data, medians, training_batches
from liftkit.profiling import profile


def main() -> None:
    ap = base_parser(__doc__, model="784-300-10", batch_size=500, split="validation")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=3, help="steps per method before timing")
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fenchel hyperparameter")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args()
    data = load_data(args)
    batches = training_batches(data, args.batch_size, args.warmup + args.steps, seed=args.seed)
    hp = dict(kv.split("=", 1) for kv in args.set)
    methods = {"fenchel": build_method("fenchel", hp, data, args),
               "adam": build_method("adam", {"lr": args.adam_lr}, data, args)}
    # one step per round, the two methods in turn; the first `warmup` rounds are not timed
    med = medians(interleaved_timing(methods, batches, blocks=args.steps, steps=1, warmup=args.warmup))
    gflop: dict[str, float] = {}
    for name, method in methods.items():
        with FlopCounterMode(display=False) as counter:
            method.step(*batches[0])
        gflop[name] = counter.get_total_flops() / 1e9
    with profile(methods["fenchel"]) as prof:
        for x, y in batches[: max(3, args.steps // 2)]:
            methods["fenchel"].step(x, y)
    report = prof.report()
    out: dict[str, Any] = {
        "model": args.model, "batch": args.batch_size, "threads": args.threads, "set": hp,
        "ms_per_step": {k: 1e3 * v for k, v in med.items()}, "ratio": med["fenchel"] / med["adam"],
        "gflop_per_step": gflop,
        "profile_ms_per_step": {b["name"]: round(1e3 * b["seconds_per_step"], 2) for b in report["blocks"]},
        "profile_calls_per_step": {b["name"]: b["calls_per_step"] for b in report["blocks"]},
        "profiled_step_ms": 1e3 * report["seconds_per_step"],
    }
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
