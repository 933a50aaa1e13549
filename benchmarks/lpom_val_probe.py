"""Validation probe for LPOM's per-activation defaults: N mini-batches of MNIST's validation split (the first 90 %
of the training set, seeded order, batch 100), accuracy on the last 10 % every E batches, plus W-norms.

    LIFTKIT_DATA_DIR=... PYTHONPATH=src python benchmarks/lpom_val_probe.py --act tanh --batches 300 --every 150 \
        --hp '{"mu": 20.0}'
"""

import argparse
import json
import time

import torch

from liftkit.data import load_dataset
from liftkit.methods import get
from liftkit.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--act", default="tanh")
p.add_argument("--model", default="784-500-10")
p.add_argument("--batches", type=int, default=300)
p.add_argument("--every", type=int, default=100)
p.add_argument("--hp", default="{}")
p.add_argument("--tag", default="")
p.add_argument("--off", type=float, default=None)
a = p.parse_args()
torch.set_num_threads(1)
data = load_dataset("mnist", None, split="validation")
model = build_model(
    a.model, input_shape=data.input_shape, num_classes=10, activation=a.act, output_activation="hidden", seed=0
)
hp = json.loads(a.hp)
m = get("lpom")(model, loss="mse", **hp)
g = torch.Generator().manual_seed(0)
n = data.x_train.shape[0]
order = torch.cat([torch.randperm(n, generator=g) for _ in range(1 + a.batches * 100 // n)])
xv, yv = data.x_test, data.y_test.long()
t0 = time.time()
for b in range(a.batches):
    idx = order[b * 100 : (b + 1) * 100]
    yb = data.y_train[idx].long()
    if a.off is not None:
        yb = torch.nn.functional.one_hot(yb, 10).float() * (1 - a.off) + a.off
    st = m.step(data.x_train[idx], yb, idx=idx)
    if (b + 1) % a.every == 0 or b + 1 == a.batches:
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item() * 100
        info = {k: round(v, 4) for k, v in st.info.items() if k.startswith("w_norm") or k.startswith("x_iters_")}
        print(
            json.dumps(
                {
                    "tag": a.tag,
                    "act": a.act,
                    "model": a.model,
                    "hp": hp,
                    "batch": b + 1,
                    "val": round(acc, 2),
                    "sec": round(time.time() - t0, 1),
                    **info,
                }
            ),
            flush=True,
        )
