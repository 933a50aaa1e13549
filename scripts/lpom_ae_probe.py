"""A short autoencoder comparison: LPOM vs Adam vs SGD on the same MNIST autoencoder for a fixed number of batches.

Reports the test reconstruction error (squared error summed over pixels, mean over 1000 test images) every
``--every`` batches against batches and training seconds, and writes a PNG of original vs reconstructed digits.
It exists because a full LPOM epoch of the 8-layer autoencoder did not fit the shared 2-core machine's budget;
``liftkit bench --config configs/lpom-autoencoder.json`` is the full-length run::

    PYTHONPATH=src python scripts/lpom_ae_probe.py --batches 150 --out docs/results/lpom_ae_recon.png
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from liftkit.data import load_dataset
from liftkit.methods import get
from liftkit.models import build_model

RUNS = {
    "lpom": {"mu": 5.0, "x_sweep_order": "backward", "x_sweeps": 2, "ridge_rel": 1e-4, "ridge_rel_feature": 1e-4},
    "adam": {"lr": 1e-3},
    "sgd": {"lr": 0.01, "momentum": 0.9, "nesterov": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ae:784-1000-500-250-30")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", data_dir=args.data_dir)
    x_eval = data.x_test[:1000].float()
    perm = torch.Generator().manual_seed(0)
    order = torch.randperm(data.x_train.shape[0], generator=perm)
    results = {}
    models = {}
    for name, hp in RUNS.items():
        model = build_model(args.model, input_shape=tuple(data.x_train.shape[1:]), num_classes=10, seed=0)
        method = get(name)(model, loss="mse", **hp)
        curve = []
        seconds = 0.0
        for b in range(args.batches):
            idx = order[b * 100 : (b + 1) * 100]
            xb = data.x_train[idx].float()
            t0 = time.perf_counter()
            method.step(xb, xb, idx=idx)
            seconds += time.perf_counter() - t0
            if (b + 1) % args.every == 0:
                with torch.no_grad():
                    err = float((model(x_eval).reshape(1000, -1) - x_eval.reshape(1000, -1)).pow(2).sum(1).mean())
                curve.append({"batches": b + 1, "seconds": round(seconds, 2), "test_recon_error": round(err, 3)})
        results[name] = {"hparams": hp, "curve": curve}
        models[name] = model
        print(name, json.dumps(curve), flush=True)
    count = 10
    fig, axes = plt.subplots(1 + len(models), count, figsize=(count, 1.2 * (1 + len(models))), squeeze=False)
    rows = [("original", x_eval[:count])]
    with torch.no_grad():
        rows += [(f"{n} ({args.batches} batches)", m(x_eval[:count]).reshape(count, 28, 28)) for n, m in models.items()]
    for r, (label, images) in enumerate(rows):
        for c in range(count):
            axes[r][c].imshow(images[c].reshape(28, 28).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
