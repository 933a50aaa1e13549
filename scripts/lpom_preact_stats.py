"""Hidden pre-activation statistics of LPOM on MNIST 784-500-10 (why some activations stay near-linear).

Trains serial LPOM with the library defaults on the validation split's training part (its own seeded batch order,
not the trainer's) and prints, after every epoch, on the 6 000 validation images: accuracy, mean |U| of the
hidden pre-activations, the fractions of U below 0, −0.5 and −1, mean |φ(U) − U| (how far the hidden layer is from
the identity) and ‖W₀‖₂. Usage:

    LIFTKIT_DATA_DIR=../shared/data PYTHONPATH=src python scripts/lpom_preact_stats.py --activation elu --epochs 3
"""

from __future__ import annotations

import argparse

import torch

from liftkit.activations import get_activation
from liftkit.data import load_dataset
from liftkit.methods import get
from liftkit.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activation", default="elu")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("mnist", split="validation")
    x, y = ds.x_train, ds.y_train
    model = build_model(
        "784-500-10", input_shape=(1, 28, 28), num_classes=10, activation=args.activation,
        output_activation="hidden", seed=0,
    )
    first = next(m for m in model if isinstance(m, torch.nn.Linear))
    phi = get_activation(args.activation).phi
    method = get("lpom")(model)

    def report(tag: str) -> None:
        with torch.no_grad():
            u = first(ds.x_test.flatten(1))
            acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
            w_norm = torch.linalg.matrix_norm(first.weight, ord=2)
            print(
                f"{tag}: val acc {acc:.4f}  mean|U| {u.abs().mean():.4f}  U<0 {(u < 0).float().mean():.4f}  "
                f"U<-0.5 {(u < -0.5).float().mean():.4f}  U<-1 {(u < -1).float().mean():.4f}  "
                f"mean|phi(U)-U| {(phi(u) - u).abs().mean():.5f}  ||W0||2 {w_norm:.3f}",
                flush=True,
            )

    report("init")
    g = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for start in range(0, x.shape[0], 100):
            batch = perm[start : start + 100]
            method.step(x[batch], y[batch])
        report(f"epoch {epoch + 1}")


if __name__ == "__main__":
    main()
