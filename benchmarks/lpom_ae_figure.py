"""Original vs reconstructed digits for autoencoders trained with ``liftkit train`` / ``liftkit bench``.

Usage (one row of test digits per run directory, the originals on top)::

    PYTHONPATH=src python -m liftkit bench --config configs/lpom-autoencoder.json --out ae
    PYTHONPATH=src python benchmarks/lpom_ae_figure.py --model ae:784-1000-500-250-30 \
        --runs ae/runs/lpom ae/runs/adam --out lpom_ae_recon.png

Each run directory holds the ``checkpoint.pt`` the trainer writes; the model is rebuilt from ``--model`` (and
``--activation``) and loaded from the checkpoint's method state, so any method's autoencoder can be shown.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from common import base_parser, load_data
from liftkit.io import load_checkpoint
from liftkit.models import build_model


def main() -> None:
    parser = base_parser(__doc__, model="ae:784-1000-500-250-30")
    parser.add_argument("--activation", default="relu", help="hidden activation of the autoencoder (default relu)")
    parser.add_argument("--runs", nargs="+", required=True, help="run directories with checkpoint.pt")
    parser.add_argument("--count", type=int, default=10, help="digits per row")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    data = load_data(args)
    x = data.x_test[: args.count].float()
    rows = [("original", x)]
    for run in args.runs:
        state = load_checkpoint(Path(run) / "checkpoint.pt")["method_state"]
        model = build_model(args.model, input_shape=tuple(x.shape[1:]), num_classes=data.num_classes,
                            activation=args.activation)
        model.load_state_dict(state["model"])
        with torch.no_grad():
            rows.append((f"{state['method']} ({Path(run).name})", model(x).reshape(x.shape)))
    side = round(x[0].numel() ** 0.5)
    fig, axes = plt.subplots(len(rows), args.count, figsize=(args.count, 1.1 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(args.count):
            ax = axes[r][c]
            ax.imshow(images[c].reshape(side, side).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
