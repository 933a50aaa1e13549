"""Tuning loop for Fenchel (and the backprop baselines) on the validation split, with a per-block time profile.

Usage: python scripts/fenchel_tune.py --method fenchel --model lenet5 --batches 30 --set x_iters=20 --set w_iters=5
Same data, initial weights (seed) and batch order as ``liftkit train``; prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from liftkit.data import batch_indices, load_dataset
from liftkit.methods.base import get as get_method
from liftkit.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="fenchel")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batches", type=int, default=0, help="stop after this many batches (0: use --epochs)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N batches (0: each epoch)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="key=value hyperparameter")
    parser.add_argument("--profile", action="store_true", help="time the X- and W-blocks per layer")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = load_dataset(args.dataset, split=args.split)
    model = build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes,
                        output_activation=get_method(args.method).model_output_activation, seed=args.seed)
    hp = dict(kv.split("=", 1) for kv in args.set)
    method = get_method(args.method)(model, **hp)
    torch.manual_seed(args.seed)
    times: dict[str, float] = defaultdict(float)
    if args.profile:
        for name in ("solve_x_block", "solve_w_block"):
            orig = getattr(method, name)

            def timed(l, *a, _orig=orig, _name=name, **k):  # type: ignore[no-untyped-def]
                t0 = time.perf_counter()
                out = _orig(l, *a, **k)
                times[f"{_name[6]}{l}"] += time.perf_counter() - t0
                return out

            setattr(method, name, timed)
    n = data.x_train.shape[0]
    per_epoch = -(-n // args.batch_size)
    total = args.batches or round(args.epochs * per_epoch)
    done, seconds, epoch = 0, 0.0, 0
    stats_acc: dict[str, float] = defaultdict(float)
    count = 0

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(data.x_test[i:i + 2000]).argmax(1) == data.y_test[i:i + 2000]).sum())
                          for i in range(0, data.x_test.shape[0], 2000))
        model.train()
        return 100.0 * correct / data.x_test.shape[0]

    while done < total:
        for idx in batch_indices(n, args.batch_size, seed=args.seed, epoch=epoch):
            t0 = time.perf_counter()
            st = method.step(data.x_train[idx], data.y_train[idx], idx=idx)
            seconds += time.perf_counter() - t0
            done += 1
            count += 1
            stats_acc["step_loss"] += st.loss
            for k in ("loss_after", "relaxed_objective"):
                if k in st.info:
                    stats_acc[k] += st.info[k]
            if (args.eval_every and done % args.eval_every == 0) or done == total or done % per_epoch == 0:
                rec = {"batches": done, "val_acc": round(evaluate(), 2), "s_per_batch": round(seconds / done, 3),
                       "s_per_epoch": round(seconds / done * per_epoch, 1)}
                rec.update({k: round(v / count, 4) for k, v in stats_acc.items()})
                norms = [round(v, 1) for k, v in sorted(st.info.items()) if k.startswith("w_norm_l")]
                if norms:
                    rec["w_norms"] = norms
                if args.profile:
                    rec["profile_s_per_batch"] = {k: round(v / done, 3) for k, v in sorted(times.items())}
                print(json.dumps(rec), flush=True)
                stats_acc.clear()
                count = 0
            if done >= total:
                break
        epoch += 1



if __name__ == "__main__":
    main()
