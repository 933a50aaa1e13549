"""Quick TIAM/AM sweeps on a validation split (tuning only: never evaluates on the test set).

Usage: PYTHONPATH=src python scripts/tiam_tune.py --dataset mnist --iters 30 --every 5 \
           --run tiam:rho=1e-3 --run am:rho=1e-3,theta0=0.01
Each --run is METHOD[:key=value,...]; all runs share the seed-0 initial weights of the 784-100-100-10 MLP.
"""

from __future__ import annotations

import argparse
import time

import torch

from liftkit.data import Dataset, load_dataset
from liftkit.methods import get
from liftkit.models import build_model


def parse_run(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    hp = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, hp


def validation_subset(
    dataset: str, subset: int
) -> tuple[Dataset, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The validation split's training part (first 90 % of the training set), cut to its first ``subset``
    samples when ``subset`` > 0, with the full-batch sample index TIAM's per-sample state is keyed by."""
    ds = load_dataset(dataset, split="validation")
    x, y = ds.x_train, ds.y_train
    if subset:
        x, y = x[:subset], y[:subset]
    return ds, x, y, torch.arange(x.shape[0])


def run_parser(subset: int) -> argparse.ArgumentParser:
    """The options shared by the TIAM tuning scripts (this one and ``tiam_diag.py``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="784-100-100-10")
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--subset", type=int, default=subset, help="use only the first N training samples")
    ap.add_argument("--run", action="append", required=True)
    ap.add_argument("--threads", type=int, default=1)
    return ap


def main() -> None:
    args = run_parser(subset=0).parse_args()
    torch.set_num_threads(args.threads)
    ds, x, y, idx = validation_subset(args.dataset, args.subset)
    for spec in args.run:
        name, hp = parse_run(spec)
        model = build_model(
            args.model, input_shape=x.shape[1:], num_classes=ds.num_classes, activation=args.activation, seed=0
        )
        method = get(name)(model, **hp)
        t_train = 0.0
        for k in range(1, args.iters + 1):
            t0 = time.perf_counter()
            stats = method.step(x, y, idx=idx) if name in ("tiam", "am") else method.step(x, y)
            t_train += time.perf_counter() - t0
            if k % args.every == 0 or k == args.iters:
                with torch.no_grad():
                    acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
                    tr = torch.nn.functional.cross_entropy(model(x), y).item()
                info = stats.info
                print(
                    f"{spec} it={k} t={t_train:.1f}s trainCE={tr:.4f} val={acc:.4f} "
                    f"F={info.get('objective', float('nan')):.4g} ce={info.get('ce_sum', float('nan')):.4g} "
                    f"rl={info.get('residual_linear', float('nan')):.4g} "
                    f"ra={info.get('residual_activation', float('nan')):.4g} "
                    f"bt={info.get('backtracks', 0):.0f} fail={info.get('backtrack_failures', 0):.0f} "
                    f"sg={info.get('safeguard_restarts', 0):.0f} thmax={info.get('theta_max', 0):.3g}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
