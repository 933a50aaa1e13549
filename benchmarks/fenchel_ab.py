"""Two Fenchel settings and Adam in one process, stepping in turn on the same batches: ms per step and the ratios.

For before/after comparisons of a cost switch on a loaded machine (the switch's 'before' value passed as
``--before KEY=VALUE``, e.g. ``--before solve_dtype=float64 --before monitor_every=1``): a change in load hits the
three alike. A change inside ``liftkit/methods/fenchel_wblocks.py`` that no hyperparameter switches is compared with
``--before-wblocks FILE``: 'before' then takes its W-block methods from that file (another revision's, e.g.
``git show main:src/liftkit/methods/fenchel_wblocks.py > main_wblocks.py``), everything else from this checkout.
``--check N`` runs N steps of both Fenchels instead and prints how far their weights and iteration counts drift
apart. Usage::

    PYTHONPATH=src python benchmarks/fenchel_ab.py --model 784-300-10 --batch-size 500 --steps 20 \\
        --before solve_dtype=float64 --before monitor_every=1
    PYTHONPATH=src python benchmarks/fenchel_ab.py --model lenet5 --adam-lr 0.03 --threads 2 --steps 15 \\
        --before-wblocks main_wblocks.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from common import base_parser, build_method, emit_json, interleaved_timing, load_data, medians, training_batches
from liftkit.methods import Method
from liftkit.methods.fenchel import Fenchel


def _with_wblocks(path: Path) -> type[Fenchel]:
    """A Fenchel subclass whose W-block methods are those of the ``FenchelWBlocks`` in the file at ``path``."""
    spec = importlib.util.spec_from_file_location("fenchel_wblocks_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    methods = {k: v for k, v in vars(module.FenchelWBlocks).items() if callable(v) and not k.startswith("__")}
    return type("FenchelBefore", (Fenchel,), methods)


def _drift(before: Method, after: Method, batches: list, steps: int) -> dict[str, Any]:
    """Max |weight difference| per parameter after ``steps`` steps of both, and the last step's iteration counts."""
    for x, y in batches[:steps]:
        info = {"before": before.step(x, y).info, "after": after.step(x, y).info}
    pairs = zip(before.model.named_parameters(), after.model.parameters())
    return {
        "max_abs_weight_difference": {n: float((p - q).detach().abs().max()) for (n, p), q in pairs},
        "iterations": {k: (info["before"][k], info["after"][k]) for k in info["before"] if "iters" in k},
    }


def main() -> None:
    ap = base_parser(__doc__, model="784-300-10", batch_size=500, split="validation")
    ap.add_argument("--steps", type=int, default=20, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="rounds before timing")
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fenchel hyperparameter (both)")
    ap.add_argument("--before", action="append", default=[], metavar="KEY=VALUE", help="the 'before' setting only")
    ap.add_argument("--before-wblocks", type=Path, default=None, help="fenchel_wblocks.py of the 'before' revision")
    ap.add_argument("--check", type=int, default=0, help="compare the weights after this many steps instead")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args()
    data = load_data(args)
    batches = training_batches(data, args.batch_size, max(args.check, args.warmup + args.steps), seed=args.seed)
    common = dict(kv.split("=", 1) for kv in args.set)
    before = {**common, **dict(kv.split("=", 1) for kv in args.before)}
    before_method = build_method("fenchel", before, data, args)
    if args.before_wblocks is not None:
        before_method = _with_wblocks(args.before_wblocks)(before_method.model, **before)
    methods = {"before": before_method, "after": build_method("fenchel", common, data, args)}
    settings = {"threads": args.threads, "model": args.model, "before": before, "after": common,
                "before_wblocks": None if args.before_wblocks is None else str(args.before_wblocks)}
    if args.check:
        emit_json({**_drift(methods["before"], methods["after"], batches, args.check), **settings}, args.json)
        return
    methods["adam"] = build_method("adam", {"lr": args.adam_lr}, data, args)
    med = medians(interleaved_timing(methods, batches, blocks=args.steps, steps=1, warmup=args.warmup))
    emit_json({
        "ms_per_step": {k: round(1e3 * v, 2) for k, v in med.items()},
        "ratio_to_adam": {k: round(med[k] / med["adam"], 2) for k in ("before", "after")},
        "after_over_before": round(med["after"] / med["before"], 3),
        **settings,
    }, args.json)


if __name__ == "__main__":
    main()
