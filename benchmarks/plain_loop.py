"""A plain PyTorch training loop, the reference for the trainer's overhead (Adam at the speed of a plain loop).

Same data tensors, initial weights and batch order as ``liftkit train --method adam``; only the loop differs.
Usage::

    PYTHONPATH=src python benchmarks/plain_loop.py --dataset mnist --model 784-500-10 --epochs 5 --batch-size 100
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from common import base_parser, emit_json, load_data
from liftkit.data import batch_indices
from liftkit.models import build_model


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args()
    data = load_data(args)
    model = build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = data.x_train.shape[0]
    seconds = 0.0
    history: list[dict[str, Any]] = []
    acc = float("nan")
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
    emit_json({"seconds_per_epoch": seconds / max(args.epochs, 1), "test_accuracy": acc, "history": history},
              args.json)


if __name__ == "__main__":
    main()
