"""Two Fenchel settings and Adam in one process, stepping in turn on the same batches: ms per step and the ratios.

For before/after comparisons of a cost switch on a loaded machine (the switch's 'before' value passed as
``--before KEY=VALUE``, e.g. ``--before solve_dtype=float64 --before monitor_every=1``): a change in load hits the
three alike. Usage::

    PYTHONPATH=src python benchmarks/fenchel_ab.py --model 784-300-10 --batch-size 500 --steps 20 \\
        --before solve_dtype=float64 --before monitor_every=1
"""

from __future__ import annotations

from common import base_parser, build_method, emit_json, interleaved_timing, load_data, medians, training_batches


def main() -> None:
    ap = base_parser(__doc__, model="784-300-10", batch_size=500, split="validation")
    ap.add_argument("--steps", type=int, default=20, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="rounds before timing")
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fenchel hyperparameter (both)")
    ap.add_argument("--before", action="append", default=[], metavar="KEY=VALUE", help="the 'before' setting only")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args()
    data = load_data(args)
    batches = training_batches(data, args.batch_size, args.warmup + args.steps, seed=args.seed)
    common = dict(kv.split("=", 1) for kv in args.set)
    before = {**common, **dict(kv.split("=", 1) for kv in args.before)}
    methods = {"before": build_method("fenchel", before, data, args),
               "after": build_method("fenchel", common, data, args),
               "adam": build_method("adam", {"lr": args.adam_lr}, data, args)}
    med = medians(interleaved_timing(methods, batches, blocks=args.steps, steps=1, warmup=args.warmup))
    emit_json({
        "ms_per_step": {k: round(1e3 * v, 2) for k, v in med.items()},
        "ratio_to_adam": {k: round(med[k] / med["adam"], 2) for k in ("before", "after")},
        "after_over_before": round(med["after"] / med["before"], 3),
        "threads": args.threads, "model": args.model, "before": before, "after": common,
    }, args.json)


if __name__ == "__main__":
    main()
