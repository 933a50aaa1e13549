"""A plain PyTorch training loop, the reference for the trainer's overhead (issue: Adam at the speed of a plain loop).

Same data tensors, initial weights and batch order as ``liftkit train --method adam``; only the loop differs.
Usage: python scripts/plain_loop.py --dataset mnist --model 784-500-10 --epochs 5 --batch-size 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from liftkit.data import batch_indices, load_dataset
from liftkit.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="784-500-10")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_dataset(args.dataset)
    model = build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = data.x_train.shape[0]
    seconds = 0.0
    history = []
    for epoch in range(args.epochs):
        batches = batch_indices(n, args.batch_size, seed=args.seed, epoch=epoch)
        t0 = time.perf_counter()
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - t0
        with torch.no_grad():
            acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        history.append({"epoch": epoch + 1, "test_accuracy": acc, "seconds": seconds})
    print(json.dumps({"seconds_per_epoch": seconds / args.epochs, "test_accuracy": acc, "history": history}))


if __name__ == "__main__":
    main()
