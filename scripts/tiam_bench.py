"""TIAM benchmark driver (issue 7): full-batch TIAM / AM / GD / L-BFGS and the mini-batch comparison.

Runs every method through the library trainer (``liftkit.train.fit``: same data pipeline, seed-0 initial
weights, evaluation after every epoch excluded from the timings) without writing per-epoch checkpoints (TIAM's
full-batch state is ~200 MB, and a checkpoint per iteration would dominate the wall clock), then writes
``results.json`` and PNG plots (objective / training loss and test accuracy against iterations and seconds).

    PYTHONPATH=src python scripts/tiam_bench.py --dataset mnist --epochs 200 --batch-size 0 \
        --run tiam:rho=0.1,max_doublings=30 --run am:rho=0.1,max_doublings=30 --run sgd:lr=0.3 --run lbfgs \
        --out docs/results/tiam-mnist
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from liftkit.data import load_dataset
from liftkit.methods import get
from liftkit.models import build_model
from liftkit.train import fit


def parse_run(text: str) -> tuple[str, str, dict[str, str]]:
    head, _, rest = text.partition(":")
    label = head
    name = head.split("@")[0]
    hp = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return label, name, hp


def plot(runs: list[dict[str, Any]], out: Path, title: str) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for r in runs:
        h = r["history"]
        it = [e["epoch"] for e in h]
        sec = [e["seconds"] for e in h]
        acc = [100 * e["test_accuracy"] for e in h]
        loss = [e["train_loss"] for e in h]
        axes[0][0].plot(it, loss, label=r["label"])
        axes[0][1].plot(sec, loss, label=r["label"])
        axes[1][0].plot(it, acc, label=r["label"])
        axes[1][1].plot(sec, acc, label=r["label"])
    for ax, (xl, yl) in zip(
        [a for row in axes for a in row],
        [
            ("iteration (epoch)", "training CE (mean)"),
            ("seconds", "training CE (mean)"),
            ("iteration (epoch)", "test accuracy %"),
            ("seconds", "test accuracy %"),
        ],
    ):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0][0].set_yscale("log")
    axes[0][1].set_yscale("log")
    axes[1][0].set_ylim(50, 100)
    axes[1][1].set_ylim(50, 100)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
    lifted = [r for r in runs if r["objective"]]
    if lifted:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in lifted:
            it = list(range(1, len(r["objective"]) + 1))
            sec = [e["seconds"] for e in r["history"]]
            axes[0].plot(it, r["objective"], label=r["label"])
            axes[1].plot(sec, r["objective"], label=r["label"])
        for ax, xl in zip(axes, ["iteration", "seconds"]):
            ax.set_xlabel(xl)
            ax.set_ylabel("lifted objective F")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(title + ": lifted objective")
        fig.tight_layout()
        fig.savefig(out / "objective.png", dpi=90)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="784-100-100-10")
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run", action="append", default=[])
    ap.add_argument(
        "--merge", nargs="+", default=[], help="merge the results.json of these output folders (runs made in "
        "separate processes) into --out and re-plot; runs nothing"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads((Path(d) / "results.json").read_text()) for d in args.merge]
        merged = {"machine": parts[0]["machine"], "settings": [p["settings"] for p in parts], "runs": []}
        for part in parts:
            merged["runs"].extend(part["runs"])
        (out / "results.json").write_text(json.dumps(merged, indent=1))
        settings = parts[0]["settings"]
        batch = settings["batch_size"] or "full"
        title = f"{settings['dataset']} {settings['model']} {settings['activation']}, batch {batch}"
        plot(merged["runs"], out, title)
        return
    if not args.run:
        ap.error("give at least one --run (or --merge)")
    data = load_dataset(args.dataset, split=args.split)
    runs: list[dict[str, Any]] = []
    for spec in args.run:
        label, name, hp = parse_run(spec)
        model = build_model(
            args.model,
            input_shape=data.x_train.shape[1:],
            num_classes=data.num_classes,
            activation=args.activation,
            seed=0,
        )
        method = get(name)(model, **hp)
        objective: list[float] = []

        def on_epoch(record: dict[str, Any], objective: list[float] = objective) -> None:
            if "objective" in record.get("info", {}):
                objective.append(record["info"]["objective"])

        t0 = time.time()
        summary = fit(
            method,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=0,
            on_epoch=on_epoch,
            run_info={"label": label, "method": name, "dataset": args.dataset, "model": args.model},
        )
        summary["objective"] = objective
        summary["hparams_set"] = hp
        summary["wall_seconds"] = time.time() - t0
        runs.append(summary)
        print(
            f"{label}: test acc {summary['test_accuracy']:.4f} best {summary['best_test_accuracy']:.4f} "
            f"train loss {summary['train_loss']:.4f} {summary['train_seconds']:.1f}s "
            f"({summary['seconds_per_epoch']:.2f}s/epoch) F_end {objective[-1] if objective else float('nan'):.5g}",
            flush=True,
        )
        (out / "results.json").write_text(
            json.dumps(
                {
                    "machine": "2-core x86_64 CPU (shared), torch " + torch.__version__ + f", {args.threads} thread(s)",
                    "settings": vars(args),
                    "runs": runs,
                },
                indent=1,
            )
        )
        plot(runs, out, f"{args.dataset} {args.model} {args.activation}, batch {args.batch_size or 'full'}")


if __name__ == "__main__":
    main()
