"""Per-layer autoencoder probe (ae:784-1000-500-250-30, MNIST validation split, batch 100): reconstruction error on
1 000 validation images, each layer's relative W-step ‖ΔW‖/‖W‖, the X-residuals and ‖W_j‖₂ every E batches.

    LIFTKIT_DATA_DIR=... PYTHONPATH=src python benchmarks/lpom_ae_layer_probe.py --batches 100 --every 50 \
        --hp '{"mu": 5.0, "x_sweep_order": "backward", "x_sweeps": 2, "ridge_rel": 1e-4, "ridge_rel_feature": 1e-4}'
"""

import argparse
import json
import time

import torch

from liftkit.data import load_dataset
from liftkit.methods import get
from liftkit.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--method", default="lpom")
p.add_argument("--batches", type=int, default=200)
p.add_argument("--every", type=int, default=100)
p.add_argument("--hp", default="{}")
p.add_argument("--preset", default=None)
p.add_argument("--tag", default="")
a = p.parse_args()
torch.set_num_threads(1)
data = load_dataset("mnist", None, split="validation")
model = build_model("ae:784-1000-500-250-30", input_shape=data.input_shape, num_classes=10, seed=0)
hp = json.loads(a.hp)
m = get(a.method)(model, loss="mse", preset=a.preset, **hp)
g = torch.Generator().manual_seed(0)
order = torch.randperm(data.x_train.shape[0], generator=g)
xv = data.x_test[:1000].reshape(1000, -1)
lins = [l for l in model.modules() if isinstance(l, torch.nn.Linear)]
t0 = time.time()
for b in range(a.batches):
    idx = order[b * 100 : (b + 1) * 100]
    xb = data.x_train[idx]
    before = [l.weight.detach().clone() for l in lins]
    st = m.step(xb, xb.reshape(100, -1), idx=idx)
    if (b + 1) % a.every == 0:
        with torch.no_grad():
            err = float((model(xv).reshape(1000, -1) - xv).pow(2).sum(1).mean())
        dw = [round(float((l.weight.detach() - w0).norm() / w0.norm()), 4) for l, w0 in zip(lins, before)]
        info = {
            k: (round(v, 5) if isinstance(v, float) else v)
            for k, v in st.info.items()
            if k.startswith(("w_norm", "x_res", "x_iters_"))
        }
        print(
            json.dumps(
                {
                    "tag": a.tag,
                    "method": a.method,
                    "hp": hp,
                    "batch": b + 1,
                    "val_err": round(err, 3),
                    "train_loss": round(float(st.loss), 3),
                    "sec": round(time.time() - t0, 1),
                    "dW_rel": dw,
                    **info,
                }
            ),
            flush=True,
        )
