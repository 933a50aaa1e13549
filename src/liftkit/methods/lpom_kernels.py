r"""LPOM's block kernels: the tensor work inside one X- or W-block, free of any schedule.

Shared by serial LPOM (:mod:`liftkit.methods.lpom`), its lifted chain (:mod:`liftkit.methods.lpom_chain`) and
the parallel variants. Row-major layout: a block X^k is m × n_k, a weight W_j is n_{j+1} × n_j.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from liftkit.activations import Activation
from liftkit.solvers import guarded_cholesky, step_change_norms

__all__ = [
    "POWER_COLD_ITERS",
    "SPECTRAL_SAFETY",
    "BlockResult",
    "PinvApply",
    "fused_fista",
    "preact",
    "rel_change",
    "step_update",
    "warm_power",
    "with_ones",
]

#: power iterations of a cold start (no warm vector yet)
POWER_COLD_ITERS = 20
#: the FISTA step uses SPECTRAL_SAFETY·(power-iteration estimate of ‖W‖₂), which never exceeds ‖W‖₂
SPECTRAL_SAFETY = 1.05


def preact(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The pre-activation X Wᵀ + 1bᵀ of a layer."""
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


@dataclass
class BlockResult:
    """The outcome of one block solve: the new block value, inner iterations and the final relative change."""

    value: Tensor
    iters: int
    residual: float


def rel_change(new: Tensor, old: Tensor) -> float:
    """‖new − old‖/‖old‖ (0 when both vanish, inf when only ``old`` does); one host synchronisation."""
    d, o = step_change_norms(new - old, old)
    return d / o if o > 0 else (0.0 if d == 0 else math.inf)



def with_ones(x: Tensor) -> Tensor:
    """X̄ = [X, 1]: the batch with the all-ones column that carries the bias."""
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def step_update(step: Tensor, w: Tensor, b: Tensor | None, beta: float) -> tuple[Tensor, Tensor | None]:
    """(W, b) of W̄ − step/β for a W-step direction ``step`` = Rᵀ(X̄ᵀ)⁺ᵀ (out × (n_j+1) with a bias column)."""
    if beta != 1.0:
        step = step.div_(beta)
    if b is None:
        return w - step, None
    return w - step[:, :-1], b - step[:, -1]


class PinvApply:
    """R ↦ Rᵀ(X̄ᵀ)⁺ᵀ, the W-step direction (out × (n_j+1)), for a fixed batch X̄ = [X, 1] (m × (n_j+1)).

    Cholesky form (docs/methods/lpom.md §4.3; docs/methods/conventions.md §4): only the Gram and its factor are in the
    solve dtype (float64 by default). Batch side (m ≤ n_j+1): (K + εI)⁻¹ with K = X̄X̄ᵀ = XXᵀ + 11ᵀ (m×m; the ones
    column is never materialised) is applied to R (out right-hand sides, not the n_j+1 of an explicit pseudo-inverse),
    then Zᵀ X̄ in the working dtype; :meth:`update` fuses that product with the subtraction from W. Feature side:
    (X̄ᵀX̄ + εI)⁻¹ applied to X̄ᵀR. The guard ε = ridge_rel·tr(X̄ᵀX̄)/m is that of
    :func:`liftkit.solvers.batch_pinv`, which provides the SVD form.

    When the solve dtype is more precise than the batch's (the float64 factor of a float32 model, the CPU
    default), the guarded Gram's inverse is formed once from the factor and applied as one matrix product:
    its rounding, about cond(K)·ε₆₄ relative, stays far below the float32 rounding of the result, and a
    product runs faster than the two triangular solves of ``cholesky_solve`` on a CPU. With
    equal dtypes (a float64 model, or float32 solves on CUDA) the triangular solves are kept.
    """

    def __init__(self, x_in: Tensor, has_bias: bool, pinv: Tensor | None = None) -> None:
        self.x_in = x_in
        self.has_bias = has_bias
        self.pinv = pinv  # explicit (X̄ᵀ)⁺ (m × (n_j+1)), SVD form
        self.factor: Tensor | None = None
        self.inverse: Tensor | None = None  # (K + εI)⁻¹ from the factor, see the class docstring
        self.batch_side = True
        self._x_bar: Tensor | None = None

    @property
    def x_bar(self) -> Tensor:
        if self._x_bar is None:
            self._x_bar = with_ones(self.x_in) if self.has_bias else self.x_in
        return self._x_bar

    @classmethod
    def cholesky(
        cls, x_in: Tensor, has_bias: bool, side: str, ridge_rel: float, dtype: torch.dtype = torch.float64
    ) -> PinvApply:
        out = cls(x_in, has_bias)
        m, n1 = x_in.shape[0], x_in.shape[1] + int(has_bias)
        out.batch_side = side == "batch" or (side == "auto" and m <= n1)
        if out.batch_side:
            xd = x_in.to(dtype)
            gram = xd @ xd.t()
            if has_bias:
                gram += 1.0
        else:
            xd = out.x_bar.to(dtype)
            gram = xd.t() @ xd
        trace = float(gram.diagonal().sum().item())
        if trace == 0.0:
            out.pinv = torch.zeros_like(out.x_bar)
            return out
        out.factor = guarded_cholesky(gram, ridge_rel * trace / m, trace)
        if torch.finfo(dtype).eps < torch.finfo(x_in.dtype).eps:
            out.inverse = torch.cholesky_inverse(out.factor)
        return out

    def _solve(self, rhs: Tensor) -> Tensor:
        """(K + εI)⁻¹ rhs in the solve dtype, returned in ``rhs``'s dtype."""
        assert self.factor is not None
        wide = rhs.to(self.factor.dtype)
        z = self.inverse @ wide if self.inverse is not None else torch.cholesky_solve(wide, self.factor)
        return z.to(rhs.dtype)

    def __call__(self, r: Tensor) -> Tensor:
        if self.pinv is not None:
            return r.t() @ self.pinv
        if self.batch_side:
            return self._solve(r).t() @ self.x_bar
        return self._solve(self.x_bar.t() @ r).t()

    def update(self, r: Tensor, w: Tensor, b: Tensor | None, beta: float) -> tuple[Tensor, Tensor | None]:
        """(W, b) of W̄ − (1/β)Rᵀ(X̄ᵀ)⁺ᵀ. Batch side: Z = (K + εI)⁻¹R/β, then W − ZᵀX as one product with the
        subtraction folded in, and b − Zᵀ1."""
        if self.factor is None or not self.batch_side:
            return step_update(self(r), w, b, beta)
        z = self._solve(r)
        if beta != 1.0:
            z = z.div_(beta)
        w_new = torch.addmm(w, z.t(), self.x_in, alpha=-1.0)
        return w_new, None if b is None else b - z.sum(dim=0)


def fused_fista(
    act_in: Activation,
    act_out: Activation,
    a: Tensor,
    x_next: Tensor,
    w: Tensor,
    b: Tensor | None,
    c: float,
    s: float,
    lip: float,
    x0: Tensor,
    iters: int,
    tol: float,
    sq_sum: Callable[[Tensor], Tensor] | None = None,
    u0: Tensor | None = None,
) -> BlockResult:
    """Projected/proximal FISTA on s·f(X) + S(X), S(X) = ½‖X − A‖² + c[ΣF*(XWᵀ + b) − ⟨X^{k+1}, XWᵀ + b⟩]
    (docs/methods/lpom.md §3.2), with the gradient step folded into one affine update per iteration:

        V − ∇S(V)/L = (1 − 1/L)V + A/L − (c/L)(φ(VWᵀ + b) − X^{k+1})W .

    The same iterates as :func:`liftkit.solvers.projected_fista` with ∇S (tested against it), but about half
    the element-wise passes over the m × n_k block: the X-phase of a wide layer is bound by those passes, not
    by its thin (n_k × n_{k+1}) products, and with several threads each pass also pays a synchronisation.

    ``u0`` = X0 Wᵀ + b when the caller holds it (the X-phase caches every block's pre-activation): the first
    iteration's product is then skipped; the iterates are unchanged."""
    if not (lip > 0.0 and math.isfinite(lip)):
        raise ValueError(f"lpom: the FISTA Lipschitz bound must be positive and finite, got {lip} (non-finite W?)")
    step = 1.0 / lip
    step_a = a * step
    lo, hi = act_in.domain
    projection = act_in.name in ("relu", "hardtanh", "identity")
    t = step * s
    x = x0
    v = x0
    theta = 1.0
    rel = math.nan
    it = 0
    while it < iters:
        u = u0 if (it == 0 and u0 is not None) else preact(v, w, b)
        r = act_out.phi(u)
        r = torch.sub(r, x_next) if r is u else r.sub_(x_next)  # never write into the caller's u0
        y = torch.add(step_a, v, alpha=1.0 - step).addmm_(r, w, alpha=-step * c)
        if projection:
            if lo != -math.inf or hi != math.inf:
                y.clamp_(min=None if lo == -math.inf else lo, max=None if hi == math.inf else hi)
            x_new = y
        else:
            x_new = act_in.prox_f(y, t)
        theta_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * theta * theta))
        dx = x_new - x
        dnorm, xnorm = step_change_norms(dx, x, sq_sum)
        it += 1
        rel = dnorm / xnorm if xnorm > 0.0 else (0.0 if dnorm == 0.0 else math.inf)
        if dnorm <= tol * xnorm or it == iters:
            x = x_new
            break
        v = torch.add(x_new, dx, alpha=(theta - 1.0) / theta_new)  # the extrapolation only when it is used
        x, theta = x_new, theta_new
    return BlockResult(x, it, rel)


def warm_power(w: Tensor, v: Tensor | None, iters: int) -> tuple[float, Tensor]:
    """‖W‖₂ by power iteration on WᵀW, warm-started from the previous right singular vector estimate."""
    if v is None:
        gen = torch.Generator(device="cpu").manual_seed(0x5EED)
        # the fixed start is drawn on the CPU, so that every device starts from the same vector
        v = torch.randn(w.shape[1], generator=gen, dtype=w.dtype).to(w.device)
        v = v / v.norm()
        iters = max(iters, POWER_COLD_ITERS)
    for _ in range(iters):
        z = w.t() @ (w @ v)
        nz = float(z.norm().item())
        if nz == 0.0 or not math.isfinite(nz):
            break
        v = z / nz
    return float((w @ v).norm().item()), v
