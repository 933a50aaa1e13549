"""Step-size stability of ProxProp vs backprop: the experiment of the paper's Table 1 (docs/methods/proxprop.md §6.4).

For every step size τ (the optimizer's lr) and every method (backprop = ProxProp's ``gradient`` mode, and
ProxProp cg1/cg3/cg5/exact), train an MLP from the same initial weights with SGD, Nesterov momentum 0.95, and
report the full-batch training loss (eval mode, mean CE over the whole training set) after the epoch budget.
A run whose loss becomes non-finite is stopped and shown as "–". Writes ``stability.md`` (the table),
``stability.png`` (loss against τ) and ``stability.json`` into ``--out``.

Defaults: MNIST 784-500-10, batch 500, τ_θ = 1 (the assumption of docs/methods/proxprop.md §6.4 for Table 1), 3 epochs,
τ over the
paper's grid 50 … 5e-4. Example::

    PYTHONPATH=src python benchmarks/proxprop_stability.py --epochs 3 --out proxprop-stability
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from common import base_parser, load_data
from liftkit.data import Dataset, batch_indices
from liftkit.methods import get
from liftkit.models import build_model

TAUS = (50.0, 10.0, 5.0, 1.0, 0.5, 0.1, 0.05, 5e-3, 5e-4)
METHODS = {
    "BackProp": {"solver": "gradient"},
    "ProxProp cg1": {"solver": "cg1"},
    "ProxProp cg3": {"solver": "cg3"},
    "ProxProp cg5": {"solver": "cg5"},
    "ProxProp exact": {"solver": "exact"},
}


def full_batch_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 10000) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(y), chunk):
            total += float(torch.nn.functional.cross_entropy(model(x[i:i + chunk]), y[i:i + chunk],
                                                             reduction="sum"))
    model.train()
    return total / len(y)


def run_one(
    data: Dataset, model_spec: str, hparams: dict, epochs: int, batch: int, seed: int
) -> tuple[float, float]:
    model = build_model(model_spec, input_shape=data.input_shape, num_classes=data.num_classes, seed=seed)
    method = get("proxprop")(model, **hparams)
    start = time.perf_counter()
    for epoch in range(epochs):
        for idx in batch_indices(len(data.y_train), batch, seed=seed, epoch=epoch):
            stats = method.step(data.x_train[idx], data.y_train[idx])
            if not math.isfinite(stats.loss):
                return math.nan, time.perf_counter() - start
    seconds = time.perf_counter() - start
    loss = full_batch_loss(model, data.x_train, data.y_train)
    return loss, seconds


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "–"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}"


def main() -> None:
    ap = base_parser(__doc__, batch_size=500, threads=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tau-theta", type=float, default=1.0)
    ap.add_argument("--momentum", type=float, default=0.95)
    ap.add_argument("--taus", default=",".join(str(t) for t in TAUS))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the default")
    ap.add_argument("--out", default="proxprop-stability", help="output directory")
    ap.add_argument("--good-loss", type=float, default=0.5, help="second, stricter 'trains' threshold")
    ap.add_argument("--from-json", default=None, help="re-render the table and plot from a stability.json")
    args = ap.parse_args()
    taus = [float(t) for t in args.taus.split(",")]
    names = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        saved["args"]["good_loss"] = args.good_loss
        report(out, saved["args"], saved["initial_loss"], saved["results"], saved["seconds"])
        return
    data = load_data(args)
    init = build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=args.seed)
    initial_loss = full_batch_loss(init, data.x_train, data.y_train)
    results: dict[str, dict[str, dict[str, float]]] = {}
    wall = time.perf_counter()
    for name in names:
        results[name] = {}
        for tau in taus:
            hp = dict(METHODS[name], optimizer="sgd", lr=tau, momentum=args.momentum, nesterov=True,
                      tau_theta=args.tau_theta, diagnostics=False)
            loss, seconds = run_one(data, args.model, hp, args.epochs, args.batch_size, args.seed)
            results[name][str(tau)] = {"loss": loss, "seconds": seconds}
            print(f"{name:16s} tau={tau:<8g} loss={fmt(loss):>8s} ({seconds:.1f} s)", flush=True)
    total = time.perf_counter() - wall
    settings = dict(vars(args), taus=taus, methods=names)
    (out / "stability.json").write_text(json.dumps({"args": settings, "initial_loss": initial_loss,
                                                    "results": results, "seconds": total}, indent=1))
    report(out, settings, initial_loss, results, total)


def report(out: Path, args: dict, initial_loss: float, results: dict, total: float) -> None:
    """Write stability.md (table and the largest τ that trains per method) and stability.png."""
    taus = [float(t) for t in args["taus"]] if isinstance(args["taus"], list) else \
        [float(t) for t in str(args["taus"]).split(",")]
    names = list(results)
    good = float(args.get("good_loss", 0.5))
    head = "| τ | " + " | ".join(f"{t:g}" for t in taus) + " |"
    lines = [
        f"Full-batch training loss after {args['epochs']} epoch(s); {args['dataset']} {args['model']}, batch "
        f"{args['batch_size']}, SGD Nesterov {args['momentum']}, lr = τ, τ_θ = {args['tau_theta']}, seed "
        f"{args['seed']}; initial loss {initial_loss:.3f}; \"–\" = non-finite loss (diverged).",
        "",
        head,
        "|" + "---|" * (len(taus) + 1),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt(results[name][str(t)]["loss"]) for t in taus) + " |")
    lines.append("")
    for name in names:
        losses = {t: results[name][str(t)]["loss"] for t in taus}
        below_init = [t for t in taus if math.isfinite(losses[t]) and losses[t] < initial_loss]
        below_good = [t for t in taus if math.isfinite(losses[t]) and losses[t] < good]
        lines.append(
            f"- {name}: largest τ with a finite loss below the initial {initial_loss:.3f}: "
            f"{max(below_init) if below_init else 'none'}; "
            f"below {good:g}: {max(below_good) if below_good else 'none'}"
        )
    lines.append(f"- total wall time {total:.0f} s")
    (out / "stability.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = 10 * initial_loss  # larger (or non-finite) losses are drawn at the cap to keep the plot readable
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in names:
        values = [results[name][str(t)]["loss"] for t in taus]
        shown = [min(v, cap) if math.isfinite(v) else cap for v in values]
        line = ax.plot(taus, shown, marker="o", label=name)[0]
        over = [t for t, v in zip(taus, values) if not (math.isfinite(v) and v <= cap)]
        if over:
            ax.scatter(over, [cap] * len(over), marker="^", s=70, color=line.get_color(), zorder=3)
    ax.axhline(initial_loss, color="grey", lw=0.8, ls="--", label="initial loss")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step size τ (SGD lr)")
    ax.set_ylabel(f"training loss after {args['epochs']} epoch(s)")
    title = f"{args['dataset']} {args['model']}, τ_θ = {args['tau_theta']}: ▲ = loss > {cap:.3g} or diverged"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
