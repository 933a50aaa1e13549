"""Short data-parallel measurements on a slice of MNIST: bytes sent per step per process and seconds per step,
one process (``--threads 2``) against two (``torchrun --nproc_per_node=2``, 1 thread each).

Unlike ``benchmarks/dist_measure.py`` (full epochs through ``liftkit train``), this trains one pass over the first
``--n-train`` training images (default 6000, i.e. 60 steps of 100), so every method fits in a short locked run;
seconds per full epoch are then 600 × seconds per step (stated as a projection). Each rank writes what it
sent, so layer-parallel runs (whose ranks send different amounts) are reported per rank.

    PYTHONPATH=src python benchmarks/dist_step_measure.py --methods proxprop,sibp,lpom --out dist-step-measure

Run it alone on the machine (it times), or with ``--bytes-only`` (no timing) at any time.

``--methods`` takes ``name`` or ``name@label`` with ``--set label.key=value`` (e.g.
``lpom-sync@layers --set layers.parallel=layers``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import base_parser, build_method, child_env, free_port, load_data, parse_sets


def worker(args: argparse.Namespace) -> None:
    import liftkit
    from liftkit.distributed import comm_from_env

    comm = comm_from_env(timeout_s=600)
    data = load_data(args, dtype=torch.float32)
    data.x_train, data.y_train = data.x_train[: args.n_train], data.y_train[: args.n_train]
    data.x_test, data.y_test = data.x_test[: args.n_test], data.y_test[: args.n_test]
    sets = parse_sets(args.set)
    rows = {}
    for entry in args.methods.split(","):
        name, _, label = entry.partition("@")
        label = label or name
        method = build_method(name, sets.get(label, {}), data, args)
        torch.manual_seed(args.seed)
        comm.barrier()
        comm.reset_counters()
        t0 = time.perf_counter()
        summary = liftkit.fit(method, data, epochs=1, batch_size=args.batch_size, seed=args.seed, progress=False,
                              comm=comm)
        wall = time.perf_counter() - t0
        steps = -(-args.n_train // args.batch_size)
        rows[label] = {
            "method": name,
            "hparams": sets.get(label, {}),
            "steps": steps,
            "train_seconds": summary["train_seconds"],
            "seconds_per_step": summary["train_seconds"] / steps,
            "wall_seconds": wall,
            "test_accuracy_subset": summary["test_accuracy"],
            "bytes_per_step": {op: n / steps for op, n in comm.bytes_sent.items()},
            "calls_per_step": {op: n / steps for op, n in comm.calls.items()},
        }
        # written after every method, so a run cut short keeps what it measured
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.tag}-rank{comm.rank}.json").write_text(json.dumps(rows, indent=2) + "\n")
    comm.close()


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--methods", default="proxprop,sibp,fenchel,lpom,lpom-sync,lpom-async",
                   help="comma-separated NAME or NAME@LABEL")
    p.add_argument("--n-train", type=int, default=6000, help="training images used (one pass)")
    p.add_argument("--n-test", type=int, default=2000, help="test images used")
    p.add_argument("--set", action="append", default=[], help="LABEL.KEY=VALUE")
    p.add_argument("--out", default="dist-step-measure")
    p.add_argument("--bytes-only", action="store_true",
                   help="only the 2-process run, and print bytes and calls per step (no timing: needs no lock)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    base = [
        __file__, "--worker", "--methods", args.methods, "--dataset", args.dataset, "--model", args.model,
        "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--split", args.split,
        "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--out", args.out,
        *[x for s in args.set for x in ("--set", s)],
    ] + (["--data-dir", args.data_dir] if args.data_dir else [])
    env = child_env()
    if not args.bytes_only:
        single_runs(base, env)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    subprocess.run(
        [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *base,
         "--threads", "1", "--tag", "2proc"],
        env=child_env(OMP_NUM_THREADS="1"), check=True,
    )
    out = Path(args.out)
    two = [json.loads((out / f"2proc-rank{r}.json").read_text()) for r in range(2)]
    if args.bytes_only:
        print("| method | bytes/step rank 0 (by call) | bytes/step rank 1 | calls/step rank 0 |")
        print("|---|---|---|---|")
        for label, r2 in two[0].items():
            print(f"| {label} | {r2['bytes_per_step']} | {two[1][label]['bytes_per_step']} | {r2['calls_per_step']} |")
        return
    report(out, two)


def single_runs(base: list[str], env: dict[str, str]) -> None:
    subprocess.run([sys.executable, *base, "--threads", "2", "--tag", "1proc"], env=env, check=True)
    # the same single process with 1 thread: on a shared 2-core machine a 2-thread process can stall at
    # OpenMP barriers, so this row separates that effect from the cost of the collectives
    subprocess.run([sys.executable, *base, "--threads", "1", "--tag", "1proc1t"], env=env, check=True)


def report(out: Path, two: list[dict[str, Any]]) -> None:
    one = json.loads((out / "1proc-rank0.json").read_text())
    one_t1 = json.loads((out / "1proc1t-rank0.json").read_text())
    print("| method | s/step 1 proc (2 threads) | s/step 1 proc (1 thread) | s/step 2 procs (1 thread each) | "
          "bytes/step rank 0 | bytes/step rank 1 | collectives+p2p/step rank 0 | acc 1 / 2 procs (subset) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r1 in one.items():
        r2 = two[0][label]
        # per step: leave out the trainer's reductions and the once-per-epoch weight broadcast (layer mode)
        per_epoch = ("trainer", "broadcast")
        b0 = sum(v for k, v in r2["bytes_per_step"].items() if k not in per_epoch)
        b1 = sum(v for k, v in two[1][label]["bytes_per_step"].items() if k not in per_epoch)
        calls = sum(v for k, v in r2["calls_per_step"].items() if k not in (*per_epoch, "recv"))
        print(
            f"| {label} | {r1['seconds_per_step']:.4f} | {one_t1[label]['seconds_per_step']:.4f} | "
            f"{r2['seconds_per_step']:.4f} | {b0:,.0f} | {b1:,.0f} | {calls:.1f} | "
            f"{r1['test_accuracy_subset']:.4f} / {r2['test_accuracy_subset']:.4f} |"
        )
    (out / "summary.json").write_text(json.dumps({"1proc": one, "1proc1t": one_t1, "2proc": two}, indent=2) + "\n")


if __name__ == "__main__":
    main()
