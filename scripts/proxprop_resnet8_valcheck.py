"""A short validation-split check of learning rates on resnet8: train on the first N Fashion-MNIST training
images of the validation split for E epochs, report accuracy on the first 3000 validation images.

A development aid for choosing which learning rates the full-budget bench tuning should cover; the recorded
comparison is the bench run. Runs are given as JSON ``[label, method, {hyperparameters}]`` triples::

    PYTHONPATH=src LIFTKIT_DATA_DIR=/work/shared/data python scripts/proxprop_resnet8_valcheck.py 25600 2 \\
        '[["adam1e-3","adam",{"lr":1e-3}],["pp-cg2-3e-3","proxprop",{"solver":"cg2","lr":3e-3}]]'
"""

from __future__ import annotations

import json
import sys
import time

import torch

import liftkit
from liftkit.methods import get
from liftkit.models import build_model


def main() -> None:
    torch.set_num_threads(1)
    n_train, epochs, runs = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    data = liftkit.data.load_dataset("fashion-mnist", split="validation")
    xv, yv = data.x_test[:3000], data.y_test[:3000]
    for label, method, hparams in runs:
        model = build_model("resnet8", input_shape=data.input_shape, num_classes=10, seed=0)
        m = get(method)(model, **hparams)
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(n_train, generator=g)
            for i in range(0, n_train - 127, 128):
                idx = perm[i:i + 128]
                m.step(data.x_train[idx], data.y_train[idx])
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(xv[i:i + 500]).argmax(1) == yv[i:i + 500]).sum()) for i in range(0, len(xv), 500))
        print(json.dumps({"label": label, "val_acc": hits / len(xv), "train_s": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
