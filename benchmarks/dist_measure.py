"""Measure data-parallel training: bytes sent per step per process and seconds per epoch, 1 vs 2 processes.

For each method: one process with ``--threads`` threads (default 2), then ``torchrun --nproc_per_node=2`` with
one thread per process, same data, model, batch size, seed and epochs, both through ``liftkit train``. Prints a
markdown table and writes ``results.json`` with the summaries and the relative difference of the two runs' final
weights. Run it alone on the machine (it times)::

    PYTHONPATH=src python benchmarks/dist_measure.py --methods sgd,adam,lbfgs,tiam,am --out dist-measure
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from common import base_parser, child_env, free_port


def main() -> None:
    p = base_parser(__doc__, threads=2)
    p.add_argument("--methods", default="sgd,adam,lbfgs,tiam,am", help="comma-separated method names")
    p.add_argument("--epochs", default="1")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="dist-measure", help="output directory")
    p.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = child_env()
    bin_dir = Path(sys.executable).parent
    rows: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        sets = [item.split(".", 1)[1] for item in args.set if item.startswith(method + ".")]
        common = [
            "-m", "liftkit", "train", "--method", method, "--dataset", args.dataset, "--model", args.model,
            "--batch-size", str(args.batch_size), "--epochs", args.epochs, "--dtype", args.dtype, "--quiet",
            "--seed", str(args.seed), "--split", args.split, *[x for s in sets for x in ("--set", s)],
            *(["--data-dir", args.data_dir] if args.data_dir else []),
        ]
        one = out / f"{method}-1proc"
        two = out / f"{method}-2proc"
        subprocess.run([sys.executable, *common, "--threads", str(args.threads), "--out", str(one)], env=env,
                       check=True)
        subprocess.run(
            [
                str(bin_dir / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", *common, "--threads", "1", "--out", str(two),
            ],
            env=child_env(OMP_NUM_THREADS="1"),
            check=True,
        )
        s1 = json.loads((one / "summary.json").read_text())
        s2 = json.loads((two / "summary.json").read_text())
        w1 = torch.load(one / "checkpoint.pt", weights_only=False)["method_state"]["model"]
        w2 = torch.load(two / "checkpoint.pt", weights_only=False)["method_state"]["model"]
        rel = max(float((w1[k] - w2[k]).norm() / w1[k].norm()) for k in w1)
        comm = s2["communication"]
        rows.append(
            {
                "method": method,
                "sec_per_epoch_1proc": s1["seconds_per_epoch"],
                "sec_per_epoch_2proc": s2["seconds_per_epoch"],
                "test_accuracy_1proc": s1["test_accuracy"],
                "test_accuracy_2proc": s2["test_accuracy"],
                "weights_rel_diff": rel,
                "steps": comm["steps"],
                "bytes_per_step": comm["bytes_per_step"],
                "calls_per_step": {op: n / comm["steps"] for op, n in comm["calls"].items()},
            }
        )
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"| method | s/epoch 1 proc ({args.threads} threads) | s/epoch 2 procs (1 thread each) | "
          "method bytes/step/proc | all-reduce calls/step | trainer bytes/step | test acc 1 / 2 | weights rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["bytes_per_step"]
        print(
            f"| {r['method']} | {r['sec_per_epoch_1proc']:.2f} | {r['sec_per_epoch_2proc']:.2f} | "
            f"{b.get('all_reduce', 0):,.0f} | {r['calls_per_step'].get('all_reduce', 0):.1f} | "
            f"{b.get('trainer', 0):,.1f} | {r['test_accuracy_1proc']:.4f} / {r['test_accuracy_2proc']:.4f} | "
            f"{r['weights_rel_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
