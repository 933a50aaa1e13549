r"""Accelerated majorize–minimize (MM) for Fenchel's weight blocks, in the feature space and in the sample space.

A weight block of :mod:`liftkit.methods.fenchel` is, for θ = [W, b] (one row per output unit) and the glued layer
input with a ones column P̄ (m × p; im2col patches for a convolution),

.. math::

    f(θ) = D(P̄θᵀ) + ρ_d‖θ − θ⁰‖² + ρ‖W‖², \qquad 0 \preceq \nabla^2_U D \preceq a I,

with ``a = 2λκ`` for a penalty block and ``a = ½`` for the cross-entropy block. Every row then has a Hessian
⪯ ``H = a P̄ᵀP̄ + sI`` (``s = 2(ρ_d + ρ)``), and FISTA with unit step in the H-metric, ``θ⁺ = v − ∇f(v) H⁻¹``,
minimises a quadratic upper bound at every step (the *primal* form: a p × p factorisation, then
``2·m·p·out + out·p²`` multiply–adds per iteration).

**Sample-space (kernel) form.** Without the ridge (ρ = 0) and with s > 0, the gradient is ``∇f(θ) = RP̄`` with
``R = Gᵀ + s·C`` whenever θ = θ⁰ + CP̄ (G = ∂D/∂U), and the push-through identity ``P̄H⁻¹ = MP̄``,
``M = (aK + sI_m)⁻¹``, ``K = P̄P̄ᵀ``, keeps every iterate in that affine set::

    C⁺ = C_v − (M Rᵀ)ᵀ ,        Q⁺ = Q_v − (Rᵀ − s·M Rᵀ)/a        (Q = KCᵀ, so U = P̄θᵀ = U⁰ + Q),

using ``KM = (I − sM)/a``. The iterates are the primal ones exactly (in exact arithmetic), at one m × m × out
product per iteration instead of three products with p; norms and the restart test follow from the same
quantities (``‖ΔCP̄‖² = ⟨ΔC, ΔQᵀ⟩``, ``⟨∇f, Δθ⟩ = ⟨R, ΔQᵀ⟩``, ``‖θ‖² = ‖θ⁰‖² + 2⟨C, U⁰ᵀ⟩ + ⟨C, Qᵀ⟩``). It pays
when the batch has fewer rows than the layer has inputs (m < p, e.g. 500 MNIST images against 785 pixels), and it
stays valid across alternations while P̄ is unchanged (the first layer's input batch), so its factorisation and
its coordinates C are reused there.

**Factorisation dtype.** The method's ``solve_dtype`` (``float64`` | ``float32`` | ``auto``; Fenchel's ``auto`` is
the model's dtype for float32 and float64 models, else that of :func:`liftkit.solvers.resolve_solve_dtype`) is the
dtype in which H or aK + sI is factorised; the inverse is then applied in the model's dtype. A float32 Cholesky
that breaks down is redone in float64 (:func:`spd_cholesky`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KernelMM", "gram", "spd_cholesky", "spd_inverse"]

def gram(A: Tensor, dtype: torch.dtype, *, rows: bool = False, chunk: int = 16384) -> Tensor:
    """AᵀA (or AAᵀ with ``rows``) accumulated in ``dtype`` from products in A's own dtype.

    A tall A is multiplied in row chunks, so no ``dtype`` copy of it is made; each chunk's product carries A's
    rounding (relative ~1e-7 in float32), far below the ``s`` shift the factorisation relies on.
    """
    if rows:
        return (A @ A.T).to(dtype)
    G = torch.zeros((A.shape[1], A.shape[1]), dtype=dtype, device=A.device)
    for start in range(0, A.shape[0], chunk):
        block = A[start:start + chunk]
        G += (block.T @ block).to(dtype)
    return G


def spd_cholesky(H: Tensor, dtype: torch.dtype) -> Tensor:
    """The lower Cholesky factor of a symmetric positive definite H, computed in ``dtype``.

    A float32 factorisation that breaks down (a pivot lost to rounding: H too ill-conditioned for float32) is
    redone in float64, so a cheap ``solve_dtype`` never fails where float64 would succeed; the factor is then in
    float64.
    """
    factor, info = torch.linalg.cholesky_ex(H.to(dtype))
    if dtype != torch.float64 and int(info) != 0:
        return torch.linalg.cholesky(H.to(torch.float64))
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"the metric is not positive definite (leading minor {int(info)} fails)")
    return factor


def spd_inverse(H: Tensor, dtype: torch.dtype) -> Tensor:
    """H⁻¹ for a symmetric positive definite H, by Cholesky in ``dtype`` (:func:`spd_cholesky`: float64 where a
    float32 factorisation breaks down)."""
    return torch.cholesky_inverse(spd_cholesky(H, dtype))


@dataclass
class KernelMM:
    """The sample-space MM state of one weight block for a fixed P̄ (see the module docstring).

    ``M`` is (aK + sI)⁻¹ in the working dtype and ``U0 = P̄θ⁰ᵀ``; the current iterate is θ = θ⁰ + CP̄, stored as
    ``Ct = Cᵀ`` (m × out, the layout of U) with ``Q = KCᵀ``. Build it with :meth:`build`; :meth:`solve` runs the
    iterations from the current iterate.
    """

    P_bar: Tensor
    M: Tensor
    curvature: float
    shift: float
    theta0: Tensor
    U0: Tensor
    Ct: Tensor
    Q: Tensor

    @classmethod
    def build(
        cls, P_bar: Tensor, theta0: Tensor, curvature: float, shift: float, solve_dtype: torch.dtype,
        U0: Tensor | None = None,
    ) -> KernelMM:
        """Factorise aK + sI for P̄ (m × p) and start at θ = θ⁰; ``U0`` may pass P̄θ⁰ᵀ when it is known."""
        if not shift > 0.0:
            raise ValueError(f"the sample-space MM form needs a positive shift s, got {shift}")
        K = gram(P_bar, solve_dtype, rows=True)
        K.mul_(curvature).diagonal().add_(shift)
        M = spd_inverse(K, solve_dtype).to(P_bar.dtype)
        if U0 is None:
            U0 = P_bar @ theta0.T
        return cls(P_bar, M, curvature, shift, theta0, U0, torch.zeros_like(U0), torch.zeros_like(U0))

    @property
    def U(self) -> Tensor:
        """P̄θᵀ at the current iterate (m × out)."""
        return self.U0 + self.Q

    def theta(self) -> Tensor:
        """θ = θ⁰ + CP̄ (out × p)."""
        return torch.addmm(self.theta0, self.Ct.T, self.P_bar)

    def solve(self, grad_u: Callable[[Tensor], Tensor], iters: int, tol: float) -> int:
        """Run up to ``iters`` FISTA–MM iterations (gradient restart), stopping at ‖Δθ‖ <= tol‖θ‖.

        ``grad_u(U)`` is ∂D/∂U at the pre-activation U (m × out). Returns the iterations run.
        """
        a, s, M, U0 = self.curvature, self.shift, self.M, self.U0
        theta0_sq = float(self.theta0.pow(2).sum())
        Ct, Q = self.Ct, self.Q
        Cv, Qv = Ct, Q
        t = 1.0
        it = 0
        while it < iters:
            R = grad_u(U0 + Qv).add_(Cv, alpha=s)  # ∇f(v) = RᵀP̄
            MR = M @ R
            C_new = Cv - MR
            Q_new = Qv - (R - s * MR) / a
            dC, dQ = C_new - Ct, Q_new - Q
            it += 1
            if float((R * dQ).sum()) > 0:  # momentum points uphill: restart
                t = 1.0
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            beta = (t - 1.0) / t_new
            Cv, Qv = C_new + beta * dC, Q_new + beta * dQ
            step_sq = float((dC * dQ).sum())
            theta_sq = theta0_sq + float(((2.0 * U0 + Q) * Ct).sum())
            done = math.sqrt(max(step_sq, 0.0)) <= tol * max(math.sqrt(max(theta_sq, 0.0)), 1e-30)
            Ct, Q, t = C_new, Q_new, t_new
            if done:
                break
        self.Ct, self.Q = Ct, Q
        return it
