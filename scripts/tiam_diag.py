"""Per-block movement diagnostics for TIAM / AM on a validation split (tuning only).

Prints, per reported iteration: validation accuracy, training CE of the forward pass, and for every layer the
relative change of W_l in this iteration, the total relative drift of W_l from its initial value, the RMS change
of z_l and a_l, and the RMS gap between the auxiliaries and the forward pass (z_l vs W_l a_{l-1} + b_l).

    PYTHONPATH=src python scripts/tiam_diag.py --subset 10000 --iters 60 --every 10 --run tiam:rho=0.1
"""

from __future__ import annotations

import time

import torch
from tiam_tune import parse_run, run_parser, validation_subset  # the sibling script (scripts/ is on sys.path when run)

from liftkit.methods import get
from liftkit.models import build_model


def rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def main() -> None:
    ap = run_parser(subset=10000)
    ap.add_argument(
        "--w-repeats", type=int, default=1, help="diagnostic only (not TIAM): repeat every W-block step this often"
    )
    ap.add_argument("--quiet", action="store_true", help="accuracy only, no per-layer lines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.w_repeats > 1:
        from liftkit.methods.tiam.sweep import Blocks

        orig = Blocks.update_w

        def repeated(self, l, a_in, z, p, P0=None):  # type: ignore[no-untyped-def]
            P = orig(self, l, a_in, z, p, P0)
            for _ in range(args.w_repeats - 1):
                P = orig(self, l, a_in, z, p, P)
            return P

        Blocks.update_w = repeated  # type: ignore[method-assign]
    ds, x, y, idx = validation_subset(args.dataset, args.subset)
    for spec in args.run:
        name, hp = parse_run(spec)
        model = build_model(
            args.model, input_shape=x.shape[1:], num_classes=ds.num_classes, activation=args.activation, seed=0
        )
        method = get(name)(model, **hp)
        chain = method.chain
        W0 = [lay.weight.detach().clone() for lay in chain]
        t_train, best = 0.0, 0.0
        for k in range(1, args.iters + 1):
            Wb = [lay.weight.detach().clone() for lay in chain]
            zb = [t.clone() for t in method.state.z] if method.state.z else None
            ab = [t.clone() for t in method.state.a] if method.state.a else None
            t0 = time.perf_counter()
            stats = method.step(x, y, idx=idx)
            t_train += time.perf_counter() - t0
            if k % args.every and k != args.iters:
                continue
            with torch.no_grad():
                acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
                tr = torch.nn.functional.cross_entropy(model(x), y).item()
                best = max(best, acc)
                info = stats.info
                print(
                    f"{spec} it={k} t={t_train:.1f}s trainCE={tr:.4f} val={acc:.4f} F={info['objective']:.5g} "
                    f"ce={info['ce_sum']:.4g} rl={info['residual_linear']:.4g} ra={info['residual_activation']:.3g} "
                    f"eps={info['eps']:.3g} fail={info['backtrack_failures']:.0f} "
                    f"sg={info['safeguard_restarts']:.0f} thmax={info['theta_max']:.3g}",
                    flush=True,
                )
                if args.quiet:
                    continue
                h = method.chain[0].apply_pre(x)
                for l, lay in enumerate(chain):
                    W = lay.weight.detach()
                    v = lay.linear(h)
                    line = (
                        f"   L{l + 1}: dW/W={float((W - Wb[l]).norm() / W.norm()):.2e} "
                        f"drift={float((W - W0[l]).norm() / W0[l].norm()):.3f} |W|={float(W.norm()):.3g}"
                    )
                    if zb is not None:
                        z = method.state.z[l]
                        line += f" dz={rms(z - zb[l]):.2e} z-v={rms(z - v):.2e} |z|={rms(z):.3g}"
                        if l < len(chain) - 1:
                            a = method.state.a[l]
                            line += f" da={rms(a - ab[l]):.2e}"  # type: ignore[index]
                    print(line, flush=True)
                    if lay.activation is not None:
                        h = lay.activation.phi(v)
        print(f"{spec} best_val={best:.4f} final_val={acc:.4f} seconds={t_train:.1f}", flush=True)


if __name__ == "__main__":
    main()
