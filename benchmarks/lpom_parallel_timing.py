"""Interleaved 1-vs-2-worker timing of lpom-sync / lpom-async (default: MNIST 784-500-10, validation split).

All four variants live in one process and take turns on blocks of batches, so a change in the machine's load
hits them alike; the first block is dropped as warm-up and the median ms per batch is reported. Torch runs one
thread per worker. Usage::

    PYTHONPATH=src python benchmarks/lpom_parallel_timing.py --blocks 8 --data-dir DATA
"""

from __future__ import annotations

from common import base_parser, build_method, emit_json, interleaved_timing, load_data, medians, training_batches

RUNS = {
    "sync-w1": ("lpom-sync", 1),
    "sync-w2": ("lpom-sync", 2),
    "async-w1": ("lpom-async", 1),
    "async-w2": ("lpom-async", 2),
}


def main() -> None:
    ap = base_parser(__doc__, split="validation")
    ap.add_argument("--blocks", type=int, default=5, help="interleaved rounds after the warm-up round")
    ap.add_argument("--steps", type=int, default=20, help="batches per method and round")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    data = load_data(args)
    batches = training_batches(data, args.batch_size, args.steps * (args.blocks + 1), seed=args.seed)
    methods = {label: build_method(name, {"workers": w}, data, args) for label, (name, w) in RUNS.items()}
    times = interleaved_timing(methods, batches, blocks=args.blocks, steps=args.steps)
    med = {label: 1000 * v for label, v in medians(times).items()}
    print("ms/batch median", {label: round(v, 2) for label, v in med.items()})
    print(f"speed-up w1/w2: sync {med['sync-w1'] / med['sync-w2']:.2f} async {med['async-w1'] / med['async-w2']:.2f}")
    print("all blocks", {label: [round(1000 * v, 1) for v in vals] for label, vals in times.items()})
    if args.json:
        emit_json({"settings": vars(args), "ms_per_batch_median": med}, args.json)


if __name__ == "__main__":
    main()
