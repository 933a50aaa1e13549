"""Measure data-parallel training: bytes sent per step per process and seconds per epoch, 1 vs 2 processes.

For each method: one process with ``--threads 2``, then ``torchrun --nproc_per_node=2`` with ``--threads 1`` per
process, same data, model, batch size, seed and epochs. Prints a markdown table and writes ``results.json`` with
the summaries and the relative difference of the two runs' final weights.

    PYTHONPATH=src LIFTKIT_DATA_DIR=/work/shared/data flock /tmp/liftkit-bench.lock \\
        .venv/bin/python scripts/dist_measure.py --methods sgd,adam,lbfgs,tiam,am --out dist-measure
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="sgd,adam,lbfgs,tiam,am")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--model", default="784-500-10")
    p.add_argument("--batch-size", default="100")
    p.add_argument("--epochs", default="1")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="dist-measure")
    p.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(["src", env.get("PYTHONPATH", "")])
    bin_dir = Path(sys.executable).parent
    rows = []
    for method in args.methods.split(","):
        sets = [item.split(".", 1)[1] for item in args.set if item.startswith(method + ".")]
        common = [
            "-m", "liftkit", "train", "--method", method, "--dataset", args.dataset, "--model", args.model,
            "--batch-size", args.batch_size, "--epochs", args.epochs, "--dtype", args.dtype, "--quiet",
            *[x for s in sets for x in ("--set", s)],
        ]
        one = out / f"{method}-1proc"
        two = out / f"{method}-2proc"
        subprocess.run([sys.executable, *common, "--threads", "2", "--out", str(one)], env=env, check=True)
        subprocess.run(
            [
                str(bin_dir / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", *common, "--threads", "1", "--out", str(two),
            ],
            env={**env, "OMP_NUM_THREADS": "1"},
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
    print("| method | s/epoch 1 proc (2 threads) | s/epoch 2 procs (1 thread each) | method bytes/step/proc | "
          "all-reduce calls/step | trainer bytes/step | test acc 1 / 2 | weights rel. diff |")
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
