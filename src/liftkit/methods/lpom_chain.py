r"""The lifted view of a chain of linear layers, shared by every LPOM variant: its energy and the solvers of
its X- and W-blocks as functions of explicit tensors (see :mod:`liftkit.methods.lpom` for the method and the
math, :mod:`liftkit.methods.lpom_kernels` for the tensor kernels inside the blocks)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from liftkit.activations import Activation
from liftkit.methods.lpom_kernels import (
    BlockResult,
    PinvApply,
    fused_fista,
    preact,
    rel_change,
    step_update,
    with_ones,
)
from liftkit.methods.lpom_shards import Shards
from liftkit.models import as_chain
from liftkit.solvers import batch_pinv

__all__ = ["X_SOLVERS", "LiftedChain"]

X_SOLVERS = ("auto", "fista", "fixed_point", "fista_prox")

_IDENTITY = Activation("identity")
_NO_BLOCK: AbstractContextManager[None] = contextlib.nullcontext()


def _no_block(name: str) -> AbstractContextManager[None]:
    return _NO_BLOCK


class LiftedChain:
    """The lifted view of a chain of linear layers: block solvers and the LPOM energy.

    Shared by serial, sync and async LPOM. Every solver is a function of explicit tensors (weights, neighbours,
    anchors), so the parallel variants can call it on snapshots; nothing here mutates its inputs.

    ``shards`` (data parallelism, :mod:`liftkit.methods.lpom_shards`): set when the batch rows are split over
    processes; the stopping norms, energies and W-step sums then go through it.
    """

    shards: Shards | None = None

    def __init__(self, model: nn.Module, method: str, mu: float | Sequence[float], loss: str) -> None:
        chain = as_chain(model, method=method, allow_conv=False)
        for layer in chain[1:]:
            for glue in layer.pre:
                if not isinstance(glue, nn.Flatten | nn.Identity):
                    raise ValueError(f"{method} cannot train glue module {type(glue).__name__} between layers")
        self.chain = chain
        #: dtype of the W-step's Gram and Cholesky factor (LPOMConfig.solve_dtype)
        self.solve_dtype = torch.float64
        #: names the chain's inner blocks (``gram``) for a profiler; the method sets it to its own ``block``
        self.block: Callable[[str], AbstractContextManager[None]] = _no_block
        self.linears: list[nn.Linear] = [layer.linear for layer in chain]  # type: ignore[misc]
        self.acts: list[Activation] = [layer.activation or _IDENTITY for layer in chain]
        self.output_is_bare = chain[-1].activation is None
        self.L = len(chain)
        mus = (mu,) * self.L if isinstance(mu, int | float) else tuple(float(m) for m in mu)
        if len(mus) != self.L:
            raise ValueError(
                f"mu has {len(mus)} values but the model has {self.L} linear layers; give one value or {self.L}"
            )
        self.mu: tuple[float, ...] = tuple(float(m) for m in mus)
        self.loss = loss
        #: W-steps of layers with m > guard_ratio·(n_j+1) use the ``ridge_rel_feature`` guard (LPOMConfig)
        self.guard_ratio = 1.0
        self.kappa = [a.kappa for a in self.acts]
        self.widths = [self.linears[0].in_features] + [lin.out_features for lin in self.linears]
        for j in range(1, self.L):
            if self.linears[j].in_features != self.linears[j - 1].out_features:
                raise ValueError(
                    f"{method}: layer {j} expects {self.linears[j].in_features} inputs but layer {j - 1} "
                    f"gives {self.linears[j - 1].out_features}"
                )
        if loss == "mse" and self.acts[-1].name == "elu" and self.kappa[-1] > 1:
            raise ValueError(f"{method}: an ELU output with alpha > 1 makes the output block nonconvex")

    # -- parameters ---------------------------------------------------------------------------------------
    def weights(self) -> list[Tensor]:
        return [lin.weight.detach() for lin in self.linears]

    def biases(self) -> list[Tensor | None]:
        return [None if lin.bias is None else lin.bias.detach() for lin in self.linears]

    @staticmethod
    def preact(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return preact(x, w, b)

    def forward(
        self, x0: Tensor, ws: Sequence[Tensor], bs: Sequence[Tensor | None]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Forward-pass initialisation: X (X⁰..X^L) and the pre-activations U_j = X^j W_jᵀ + b_j."""
        xs = [x0]
        pre: list[Tensor] = []
        for j in range(self.L):
            u = self.preact(xs[-1], ws[j], bs[j])
            pre.append(u)
            xs.append(self.acts[j].phi(u))
        return xs, pre

    def rel_change(self, new: Tensor, old: Tensor) -> float:
        """‖new − old‖/‖old‖ of a block over the whole (possibly sharded) batch."""
        return rel_change(new, old) if self.shards is None else self.shards.rel_change(new, old)

    def _global(self, value: float) -> float:
        return value if self.shards is None else self.shards.sum_float(value)

    # -- objective -----------------------------------------------------------------------------------------
    def data_loss(self, out: Tensor, d: Tensor) -> float:
        return self._global(self.local_data_loss(out, d))

    def local_data_loss(self, out: Tensor, d: Tensor) -> float:
        """ℓ(X^L, D) of the rows held here (:meth:`data_loss` sums it over a sharded batch)."""
        if self.loss == "ce":
            return float(-(d * tF.log_softmax(out, dim=1)).sum(dtype=torch.float64).item())
        return 0.5 * float((out - d).pow(2).sum(dtype=torch.float64).item())

    def energy(self, xs: Sequence[Tensor], pre: Sequence[Tensor], d: Tensor) -> float:
        """E = ℓ(X^L, D) + Σ_j μ_j Σ B_{φ_j}(U_j, X^{j+1}), with the given pre-activations U_j."""
        total = self.local_data_loss(xs[self.L], d)
        for j in range(self.L):
            total += self.mu[j] * self.acts[j].penalty_sum(pre[j], xs[j + 1])
        return self._global(total)

    # -- X blocks ------------------------------------------------------------------------------------------
    def resolve_solver(self, x_solver: str, k: int) -> str:
        if x_solver != "auto":
            return x_solver
        return "fista" if self.acts[k - 1].cheap_prox else "fista_prox"

    def rho(self, k: int, w: Tensor) -> float:
        """Theorem 2's contraction bound ρ = cκ_{k−1}κ_k sqrt(‖M‖₁‖M‖_∞), M = |W_k|ᵀ|W_k| (symmetric, so
        ‖M‖₁ = ‖M‖_∞ = max(|W|ᵀ(|W|1)), computed without forming M)."""
        c = self.mu[k] / self.mu[k - 1]
        a = w.abs()
        m_norm = float((a.t() @ a.sum(dim=1)).max().item())
        return c * self.kappa[k - 1] * self.kappa[k] * m_norm

    def solve_hidden(
        self,
        k: int,
        x0: Tensor,
        a: Tensor,
        x_next: Tensor,
        w: Tensor,
        b: Tensor | None,
        w_norm: float,
        *,
        solver: str,
        iters: int,
        tol: float,
        gamma: float = 0.0,
        anchor: Tensor | None = None,
        u0: Tensor | None = None,
    ) -> BlockResult:
        """Minimise μ_{k−1}ΣB_{φ_{k−1}}(A, X) + μ_kΣB_{φ_k}(XW_kᵀ + b_k, X^{k+1}) [+ (γ/2)‖X − anchor‖²] over
        X = X^k, warm-started at ``x0``. ``w_norm`` ≥ ‖W_k‖₂ sets the FISTA step; ``u0`` = x0 W_kᵀ + b_k when the
        caller holds it (it saves the first iteration's product).

        With γ > 0 (async proximal BCD, docs/methods/lpom.md §7.1) the block, divided by μ_{k−1} + γ, is s·f(X) + ½‖X −
        A'‖² + c'[…] with A' = (μA + γX̄)/(μ + γ), s = μ/(μ + γ), c' = μ_k/(μ + γ): the same solvers with f → s·f."""
        mu_prev, mu_k = self.mu[k - 1], self.mu[k]
        if gamma > 0.0:
            if anchor is None:
                raise ValueError("a proximal X-block needs its anchor")
            scale = mu_prev + gamma
            a = (mu_prev * a + gamma * anchor) / scale
            s = mu_prev / scale
            c = mu_k / scale
        else:
            s, c = 1.0, mu_k / mu_prev
        act_in, act_out = self.acts[k - 1], self.acts[k]

        if solver in ("fista", "fista_prox"):
            if solver == "fista" and not act_in.cheap_prox:
                raise ValueError(
                    f"x_solver='fista' needs a closed-form prox, which {act_in.name} lacks; "
                    "use x_solver='fista_prox' or 'fixed_point'"
                )
            lip = 1.0 + c * act_out.kappa * w_norm * w_norm
            return fused_fista(
                act_in, act_out, a, x_next, w, b, c, s, lip, x0, iters, tol,
                sq_sum=None if self.shards is None else self.shards.sum_, u0=u0,
            )
        if solver != "fixed_point":
            raise ValueError(f"unknown x_solver {solver!r}; choose one of {', '.join(X_SOLVERS)}")
        # The paper's (26): a unit-step forward-backward iteration; damped once its residual grows 3 times in a row.
        x = x0
        res = math.nan
        growth = 0
        damped = False
        it = 0
        while it < iters:
            u = u0 if (it == 0 and u0 is not None) else self.preact(x, w, b)
            y = a - c * (act_out.phi(u) - x_next) @ w
            t_x = act_in.phi(y) if s == 1.0 else act_in.prox_f(y, s)
            x_new = x + 0.5 * (t_x - x) if damped else t_x
            new_res = self.rel_change(x_new, x)
            growth = growth + 1 if (math.isfinite(res) and new_res > res) else 0
            if growth >= 3:
                damped = True
            res = new_res
            x = x_new
            it += 1
            if res <= tol:
                break
        return BlockResult(x, it, res)

    def solve_output(
        self,
        x0: Tensor,
        a: Tensor,
        d: Tensor,
        *,
        iters: int,
        tol: float,
        gamma: float = 0.0,
        anchor: Tensor | None = None,
    ) -> BlockResult:
        """Minimise ℓ(X, D) + μ_{L−1}ΣB_φ(A, X) [+ (γ/2)‖X − anchor‖²] over the output X = X^L.

        MSE (closed form, exact): X = prox_{tf}((D + μA + γX̄)/(1 + μ + γ)), t = μ/(1 + μ + γ).
        CE: the forward-backward iteration (29), X ← prox_{sf}((μA + γX̄ − (softmax(X) − D))/(μ + γ)),
        s = μ/(μ + γ) (= φ(A − (softmax(X) − D)/μ) when γ = 0)."""
        mu = self.mu[-1]
        act = self.acts[-1]
        g_anchor = gamma * anchor if (gamma > 0.0 and anchor is not None) else None
        if gamma > 0.0 and anchor is None:
            raise ValueError("a proximal output block needs its anchor")
        if self.loss == "mse":
            y = d + mu * a
            if g_anchor is not None:
                y = y + g_anchor
            denom = 1.0 + mu + gamma
            x = act.prox_f(y / denom, mu / denom)
            return BlockResult(x, 1, 0.0)
        base = mu * a if g_anchor is None else mu * a + g_anchor
        denom = mu + gamma
        s = mu / denom
        x = x0
        res = math.nan
        it = 0
        while it < iters:
            y = (base - (torch.softmax(x, dim=1) - d)) / denom
            x_new = act.phi(y) if s == 1.0 else act.prox_f(y, s)
            res = self.rel_change(x_new, x)
            x = x_new
            it += 1
            if res <= tol:
                break
        return BlockResult(x, it, res)

    # -- W blocks -------------------------------------------------------------------------------------------
    def solve_w(
        self,
        j: int,
        x_in: Tensor,
        x_out: Tensor,
        w: Tensor,
        b: Tensor | None,
        u0: Tensor | None,
        *,
        iters: int,
        side: str,
        pinv: str,
        ridge_rel: float,
        gamma: float = 0.0,
        ridge_rel_feature: float | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``iters`` APG steps on Φ_j(W̄) = ΣF*(X̄W̄ᵀ) − ⟨X^{j+1}, X̄W̄ᵀ⟩ in the metric ‖X̄(W̄ − Y)ᵀ‖
        (docs/methods/lpom.md §4.2): W̄ ← Y − (1/β)Rᵀ(X̄ᵀ)⁺ᵀ, R = φ(X̄Yᵀ) − X^{j+1}, β = κ(φ_j). ``u0`` = X̄W̄ᵀ if
        already computed.

        With γ > 0 (async, docs/methods/lpom.md §7.1) each step minimises the linearisation plus (γ/2μ_j)‖W̄ − W̄ᵏ‖² in
        addition to the metric: W̄⁺ = W̄ᵏ − (1/β)(R − βX̄(Y − W̄ᵏ)ᵀ)ᵀ(X̄X̄ᵀ + (γ/(βμ_j))I)⁻¹X̄ (Woodbury, m×m solve).
        Returns new tensors (W, b); the inputs are left untouched."""
        act = self.acts[j]
        beta = act.kappa
        has_bias = b is not None
        m = x_in.shape[0] if self.shards is None else self.shards.rows(x_in)
        extra = 0.0
        if gamma > 0.0:
            x_bar = with_ones(x_in) if has_bias else x_in
            trace = self._global(float(x_bar.pow(2).sum(dtype=torch.float64).item()))
            if trace > 0:
                extra = (gamma / (beta * self.mu[j])) * m / trace
        with self.block("gram"):
            apply_pinv = self._pinv_operator(
                x_in, has_bias, m, side=side, pinv=pinv, ridge_rel=ridge_rel, ridge_rel_feature=ridge_rel_feature,
                extra=extra,
            )
        # W̄ ← Y − (1/β) Rᵀ(X̄ᵀ)⁺ᵀ, with (X̄ᵀ)⁺ᵀ = (X̄X̄ᵀ + εI)⁻¹X̄ applied to R (see PinvApply).
        w_k, b_k = w, b
        w_prev, b_prev = w, b
        w_cur, b_cur = w, b
        th_prev = th_cur = 1.0
        for t in range(iters):
            if t == 0:
                w_y, b_y = w_cur, b_cur
                u = u0 if u0 is not None else self.preact(x_in, w_y, b_y)
            else:
                mom = th_cur * (1.0 / th_prev - 1.0)
                w_y = w_cur + mom * (w_cur - w_prev)
                b_y = None if b_cur is None or b_prev is None else b_cur + mom * (b_cur - b_prev)
                u = self.preact(x_in, w_y, b_y)
            r = act.phi(u) - x_out
            if extra > 0.0 and t > 0:
                # proximal form: the momentum away from the anchor enters through the data metric
                dw = w_y - w_k
                r = r - beta * self.preact(x_in, dw, None if b_y is None or b_k is None else b_y - b_k)
                base_w, base_b = w_k, b_k
            else:
                base_w, base_b = w_y, b_y
            if isinstance(apply_pinv, PinvApply):
                w_new, b_new = apply_pinv.update(r, base_w, base_b, beta)
            else:
                w_new, b_new = step_update(apply_pinv(r), base_w, base_b, beta)
            w_prev, b_prev = w_cur, b_cur
            w_cur, b_cur = w_new, b_new
            th_prev, th_cur = th_cur, 0.5 * (math.sqrt(th_cur**4 + 4.0 * th_cur**2) - th_cur**2)
        return w_cur, b_cur

    def _pinv_operator(
        self, x_in: Tensor, has_bias: bool, m: int, *, side: str, pinv: str, ridge_rel: float,
        ridge_rel_feature: float | None, extra: float,
    ) -> Callable[[Tensor], Tensor]:
        """R ↦ Rᵀ(X̄ᵀ)⁺ᵀ for the batch X̄ = [X, 1] (m samples over all shards) with the guard of its layer: a
        layer whose batch is not small against its inputs (m > guard_ratio·(n_j+1), or a feature-side Gram) gets
        ``ridge_rel_feature``; ``extra`` is the async proximal term's addition to the guard."""
        n1 = x_in.shape[1] + int(has_bias)
        feature = side == "feature" or (side == "auto" and m > n1)
        near = feature or m > self.guard_ratio * n1
        guard = ridge_rel_feature if (near and ridge_rel_feature is not None) else ridge_rel
        if self.shards is not None:
            x_bar = with_ones(x_in) if has_bias else x_in
            return self.shards.pinv(
                x_bar, m, side=side, pinv=pinv, guard=guard + extra, rcond=ridge_rel, extra=extra,
                dtype=self.solve_dtype,
            )
        if pinv == "svd" and extra == 0.0:
            x_bar = with_ones(x_in) if has_bias else x_in
            return PinvApply(x_in, has_bias, batch_pinv(x_bar.t(), side="svd", rcond=ridge_rel))
        return PinvApply.cholesky(x_in, has_bias, side, guard + extra, self.solve_dtype)
