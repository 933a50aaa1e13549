"""Interleaved per-step timing of ProxProp against Adam (and backprop through ProxProp's own code path).

On a shared, noisy machine, sequential runs see different loads; this script alternates short blocks of
steps of each method on the same batches, so every method sees the same load, and reports the median
seconds per step and the ratio to Adam. Training steps only (no evaluation). Examples::

    PYTHONPATH=src python benchmarks/proxprop_timing.py --blocks 20 --steps 30 --threads 2
    PYTHONPATH=src python benchmarks/proxprop_timing.py --dataset fashion-mnist --model resnet8 --batch-size 128 \\
        --solvers exact,cg1,cg2,cg3,gradient --blocks 5 --steps 5 --threads 1
"""

from __future__ import annotations

import math

from common import base_parser, build_method, emit_json, interleaved_timing, load_data, medians, training_batches

RUNS: dict[str, tuple[str, dict[str, str]]] = {
    "adam": ("adam", {}),
    "proxprop (default)": ("proxprop", {}),
    "proxprop gradient mode": ("proxprop", {"solver": "gradient"}),
    "proxprop cg3": ("proxprop", {"solver": "cg3"}),
}


def main() -> None:
    ap = base_parser(__doc__, threads=2)
    ap.add_argument("--blocks", type=int, default=20, help="interleaved rounds after the warm-up round")
    ap.add_argument("--steps", type=int, default=30, help="steps per method and round")
    ap.add_argument("--solvers", default=None,
                    help="comma-separated ProxProp solvers to time beside Adam (default: the fixed set above)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    runs = RUNS
    if args.solvers:
        runs = {"adam": ("adam", {})}
        runs.update({f"proxprop {s}": ("proxprop", {"solver": s}) for s in args.solvers.split(",")})
    data = load_data(args)
    batches = training_batches(data, args.batch_size, args.steps * (args.blocks + 1), seed=args.seed)
    methods = {label: build_method(name, hp, data, args) for label, (name, hp) in runs.items()}
    med = medians(interleaved_timing(methods, batches, blocks=args.blocks, steps=args.steps))
    per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    print(f"{args.dataset} {args.model}, batch {args.batch_size}, {args.threads} threads, "
          f"{args.blocks} interleaved blocks of {args.steps} steps")
    print("| run | median ms/step | x Adam | s/epoch equivalent |")
    print("|---|---|---|---|")
    for label, seconds in med.items():
        print(f"| {label} | {1000 * seconds:.2f} | {seconds / med['adam']:.2f} | {seconds * per_epoch:.2f} |")
    if args.json:
        emit_json({"settings": vars(args), "seconds_per_step": med}, args.json)


if __name__ == "__main__":
    main()
