r"""The a_l block in the Gram metric (``a_metric='gram'``, penalty constraint only), run in the metric's eigenbasis.

The block minimises S(a) + (ν/2)‖a − h(z_l)‖² with S(a) = (ρ/2)‖z_{l+1} − aWᵀ − 1bᵀ‖² (W = W_{l+1}), or
S(a) = CE_sum(aWᵀ + 1bᵀ) before an exact output. Its step is the backtracking of
:func:`~liftkit.methods.tiam.ops.backtrack` in the metric M = c WᵀW + δI (c = ρ: S's exact Hessian; c = the exact
output's curvature: a majorant of the CE Hessian; δ = 1e-10·mean diag keeps M positive definite):

.. math::

    a^+ = \operatorname{prox}^M_{P/θ}\big(ã − ∇S(â)M^{-1}/θ\big) = (θ w M + ν h(z_l))(θM + νI)^{-1},
    \qquad \text{accepted iff } S(a^+) ≤ S(â) + ⟨∇S(â), d⟩ + \tfrac{θ}{2}\|d\|_M^2,\ d = a^+ − â,

so with p1 = p2 the first trial θ = 1 is the exact minimiser of the a-subproblem (a Newton step on a quadratic).

Every sample's row is an n_l-vector and M acts on the right, so in M's eigenbasis M = QΛQᵀ (an n_l × n_l
eigendecomposition in float64) the gradient step, the prox and ‖d‖²_M are element-wise: with Ũ = ãQ, G = ∇S(â)Q
and H = h(z_l)Q the prox is U = (θΛŨ − G + νH)/(θΛ + ν) (no division by the tiny eigenvalues of a rank-deficient
WᵀW) and ‖d‖²_M = Σ λ_i D_i² with D = U − âQ. When S is quadratic (the penalty case) its value needs no pass over
the data either: S(â + d) = S(â) + ⟨G, D⟩ + ½ Σ (λ_i − δ) D_i², since ρWᵀW = M − δI. A trial then costs one
product (a⁺ = UQᵀ), and the block five products with the n_l-wide data in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from liftkit.methods.tiam.blocks import ABlock
from liftkit.methods.tiam.config import Inertia
from liftkit.methods.tiam.ops import AuxStep, Env, ce_sum, dot, grad_ce_sum, sq

__all__ = ["a_gram_step"]


@dataclass
class _Eigenbasis:
    """M = QΛQᵀ = c WᵀW + δI in the working dtype, with WQ (the next layer's weights in the basis)."""

    Q: Tensor
    lam: Tensor
    shift: float
    WQ: Tensor

    @classmethod
    def of(cls, W: Tensor, curvature: float, who: str) -> _Eigenbasis:
        W64 = W.to(torch.float64)
        M = curvature * (W64.T @ W64)
        shift = 1e-10 * float(M.diagonal().sum()) / max(M.shape[0], 1)
        M.diagonal().add_(shift)
        lam64, Q64 = torch.linalg.eigh(M)
        if not (math.isfinite(float(lam64.sum())) and float(lam64.min()) > 0.0):
            raise ValueError(
                f"{who} (a_metric='gram'): the metric of an a-step cannot be factorised (non-finite or zero "
                "weights?); lower rho"
            )
        Q = Q64.to(W.dtype)
        return cls(Q, lam64.to(W.dtype), shift, W @ Q)

    def excess(self, D: Tensor) -> tuple[float, float]:
        """(‖d‖²_M, d ∇²S dᵀ) = (Σ λ_i D_i², Σ (λ_i − δ) D_i²) for a quadratic S with Hessian M − δI."""
        d_sq = dot(D * self.lam, D)
        return d_sq, d_sq - self.shift * sq(D)


@dataclass
class _Expansion:
    """The block's data around the gradient point â: the basis, G = ∇S(â)Q, ÛQ = âQ, this rank's S(â), h(z_l) and
    the weights ρ, ν."""

    eig: _Eigenbasis
    G: Tensor
    U_hat: Tensor
    s_hat: float
    hz: Tensor
    rho: float
    nu: float

    def quadratic_s(self, E: Tensor) -> float:
        """S(â + e) for a quadratic S from e's coordinates E = eQ."""
        return self.s_hat + dot(self.G, E) + 0.5 * self.eig.excess(E)[1]


def a_gram_step(
    env: Env, blk: ABlock, a: Tensor, p: Inertia, delta: Tensor, rho: float, nu: float, curvature: float, theta: float
) -> tuple[AuxStep | None, float]:
    """a_l's triple-inertial step in the Gram metric, backtracking from ``theta``; returns (the step or None when
    backtracking fails, the last θ tried). ``curvature`` is c of M = c WᵀW + δI (ρ, or the exact output's c)."""
    c = env.config
    a_tilde = a if p[0] == 0.0 else a + p[0] * delta
    a_hat = a_tilde if p[1] == p[0] else (a if p[1] == 0.0 else a + p[1] * delta)
    with env.block("gram"):
        eig = _Eigenbasis.of(blk.W_next, curvature, env.name)
    # S(â) and G = ∇S(â)Q from one product â Wᵀ
    quadratic = blk.onehot is None
    if blk.onehot is not None:
        logits = a_hat @ blk.W_next.T + blk.b_next
        s_hat_local = float(ce_sum(logits, blk.onehot))
        G = grad_ce_sum(logits, blk.onehot) @ eig.WQ
    else:
        residual = a_hat @ blk.W_next.T + blk.b_next - blk.z_next
        s_hat_local = 0.5 * rho * sq(residual)
        G = rho * (residual @ eig.WQ)
    (s_hat,) = env.sum_scalars(s_hat_local)
    hz = env.memo.phi(blk.act, blk.z_l)
    U_tilde = a_tilde @ eig.Q
    ex = _Expansion(eig, G, U_tilde if a_hat is a_tilde else a_hat @ eig.Q, s_hat_local, hz, rho, nu)
    nu_h_minus_g = (hz @ eig.Q).mul_(nu).sub_(G)
    objective = blk.objective_fn(rho)
    for trial in range(c.max_doublings + 1):
        # the prox in M of ũ − ∇S(â)M⁻¹/θ: (θΛ(Ũ − GΛ⁻¹/θ) + νH)/(θΛ + ν) = (θΛŨ − G + νH)/(θΛ + ν)
        U = torch.addcmul(nu_h_minus_g, U_tilde, theta * eig.lam).div_(theta * eig.lam + nu)
        D = U - ex.U_hat
        grad_d_local = dot(G, D)
        d_sq_local, curv = eig.excess(D)
        a_plus = None if quadratic else U @ eig.Q.T
        s_plus_local = s_hat_local + grad_d_local + 0.5 * curv if a_plus is None else objective(a_plus)
        s_plus, grad_d, d_sq = env.sum_scalars(s_plus_local, grad_d_local, d_sq_local)
        # the sums carry rounding of a few ulps of S itself; without slack a tie can read as a rejection
        slack = 64 * torch.finfo(a.dtype).eps * (abs(s_hat) + abs(s_plus))
        if s_plus <= s_hat + grad_d + 0.5 * theta * d_sq + slack:
            env.cnt.add_trials(trial, theta)
            a_plus = U @ eig.Q.T if a_plus is None else a_plus
            return _third_inertia(env, blk, ex, a, a_plus, U, p), theta
        theta *= c.backtrack_factor
    env.cnt.add_trials(c.max_doublings, theta)
    env.cnt.backtrack_failures += 1
    return None, theta


def _third_inertia(env: Env, blk: ABlock, ex: _Expansion, a: Tensor, a_plus: Tensor, U: Tensor, p: Inertia) -> AuxStep:
    """a^{k+1} = a⁺ + p3(a⁺ − a^k) (U = a⁺Q) and, for the safeguard, the local objective (S plus the ν-penalty) at
    a^{k+1} and at a^k; a quadratic S is evaluated in the eigenbasis, where its inputs are known."""
    a_new = a_plus + p[2] * (a_plus - a)
    if not (env.config.safeguard and any(p)):
        return AuxStep(a_new, a_plus, 0.0, 0.0)
    at_hat = p[1] == 0.0  # â = a^k: S(a^k) and its coordinates are known
    if blk.onehot is not None:
        objective = blk.objective_fn(ex.rho)
        s_new, s_old = objective(a_new), (ex.s_hat if at_hat else objective(a))
    else:
        U_old = ex.U_hat if at_hat else a @ ex.eig.Q
        s_new = ex.quadratic_s((1.0 + p[2]) * U - p[2] * U_old - ex.U_hat)  # (a^{k+1} − â)Q
        s_old = ex.s_hat if at_hat else ex.quadratic_s(U_old - ex.U_hat)
    # ‖a^k − h(z_l)‖² is the z_l block's, ‖a^{k+1} − h(z_l)‖² the sweep objective's (shared by the memo)
    penalty_new, penalty_old = 0.5 * ex.nu * env.memo.sq_diff(a_new, ex.hz), 0.5 * ex.nu * env.memo.sq_diff(a, ex.hz)
    f_new, f_old = env.sum_scalars(s_new + penalty_new, s_old + penalty_old)
    return AuxStep(a_new, a_plus, f_new, f_old)
