r"""TIAM's block operators as functions: one triple-inertial step of a single block.

Each takes the block's current value u^k, the inertia (p1, p2, p3), the history Δ = u^k − u^{k−1}, and its
weights (ρ, ν, the curvature c) as arguments, and returns the new value with what the caller needs for the
retry and the safeguard (:class:`~liftkit.methods.tiam.ops.AuxStep`, or ``None`` when backtracking failed).
None of them reads or writes the method's state: the caller (:mod:`liftkit.methods.tiam.sweep`) supplies the
first trial θ and keeps the accepted one.

With ũ = u^k + p1 Δ (the centre of the proximal term) and û = u^k + p2 Δ (the gradient point):

* W_l: S = (ρ/2)‖z_l − a W^T − 1bᵀ‖² + (μ/2)‖W‖², W⁺ = W̃ − ∇S(Ŵ)M⁻¹/θ (M: ``w_metric``), backtracking; S is
  quadratic, so the acceptance test is evaluated exactly from three inner products.
* b_l: the exact step θ = ρN: b⁺ = b̃ − mean_rows(aWᵀ + 1b̂ᵀ − z).
* z_l (l < L): θ = ρ: z⁺ = Π(z̃ − ẑ + v) with v = aWᵀ + 1bᵀ (box) or the two-candidate ν-penalty prox.
* a_l (l < L): S = (ρ/2)‖z_{l+1} − aW_{l+1}ᵀ − 1b_{l+1}ᵀ‖² (or CE_sum of the logits before an exact output),
  prox = box [h(z_l) ± ε] or the ν-penalty, backtracking (``a_metric='gram'``: in M = c W_{l+1}ᵀW_{l+1}).

The output layer's blocks (z_L, or the exact output's W_L and b_L) are in :mod:`liftkit.methods.tiam.output`.

Every step ends with the third inertia u^{k+1} = u⁺ + p3 (u⁺ − u^k).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from liftkit.activations import Activation
from liftkit.methods.tiam.config import Inertia
from liftkit.methods.tiam.ops import (
    AuxStep,
    Env,
    backtrack,
    ce_sum,
    dot,
    feasible,
    grad_ce_sum,
    grad_w,
    penalty_z,
    project_a,
    project_z,
    sq,
)
from liftkit.solvers import guarded_cholesky

__all__ = [
    "ABlock",
    "LinearFit",
    "WMetric",
    "WStep",
    "a_step",
    "b_step",
    "diagonal_metric",
    "gram_metric",
    "w_step",
    "z_step",
]


# -- the W block ----------------------------------------------------------------------------------------------------
@dataclass
class WMetric:
    """A W-step metric M acting on the right of W (n_out × n_in): a diagonal ``diag`` or a Cholesky ``factor``
    of ρ aᵀa + shift·I (float64)."""

    rho: float
    shift: float
    diag: Tensor | None = None
    factor: Tensor | None = None

    def precondition(self, G: Tensor) -> Tensor:
        """G M⁻¹."""
        if self.diag is not None:
            return G / self.diag
        assert self.factor is not None
        return torch.cholesky_solve(G.T.to(torch.float64), self.factor).T.to(G.dtype)

    def sq_norm(self, U: Tensor, a_sq: float) -> float:
        """‖U‖²_M = tr(U M Uᵀ); ``a_sq`` = ‖a Uᵀ‖² (summed over all ranks), which the Gram metric needs."""
        if self.diag is not None:
            return float((U.square() * self.diag).sum())
        return self.rho * a_sq + self.shift * sq(U)


def diagonal_metric(env: Env, a_in: Tensor, rho: float, mu: float) -> WMetric:
    """M = diag(ρ Σ_rows a² + δ), δ = μ + 1e-10·mean diag."""
    m = a_in.to(torch.float64).square().sum(dim=0)
    m = env.sum_(m)
    m = rho * m
    m += mu + 1e-10 * float(m.mean())
    return WMetric(diag=m.to(a_in.dtype), rho=rho, shift=0.0)


def gram_metric(env: Env, a_in: Tensor, rho: float, mu: float, who: str) -> WMetric:
    """M = ρ aᵀa + δI (S's exact Hessian, so with p1 = p2 the first trial θ = 1 is the exact minimiser over W),
    δ = μ + 1e-10·mean diag keeps M positive definite and M ⪰ ∇²S, so θ = 1 always passes the test."""
    a64 = a_in.to(torch.float64)
    gram = a64.T @ a64
    gram = env.sum_(gram)
    gram *= rho
    trace = float(gram.diagonal().sum())
    shift = mu + 1e-10 * trace / max(gram.shape[0], 1)
    factor = guarded_cholesky(gram, shift, trace, who=f"{who} (w_metric='gram')", fix="lower rho")
    return WMetric(factor=factor, rho=rho, shift=shift)


@dataclass
class LinearFit:
    """Layer l's W-subproblem at W^k: S(W) = (ρ/2)‖z − a Wᵀ − 1bᵀ‖² + (μ/2)‖W‖², with P0 = a W^kᵀ."""

    a: Tensor
    z: Tensor
    W: Tensor
    b: Tensor
    P0: Tensor


class WStep(NamedTuple):
    """A W step's result: W^{k+1}, a W^{k+1}ᵀ (kept by linear combination) and the raw W⁺."""

    new: Tensor
    product: Tensor
    raw: Tensor


def w_step(
    env: Env, fit: LinearFit, delta: Tensor, p: Inertia, rho: float, theta: float, metric: WMetric | None = None
) -> tuple[WStep | None, float]:
    """One inertial W-step from W^k, backtracking from ``theta``; returns (the step or None when backtracking
    fails, the last θ tried)."""
    c = env.config
    p1, p2, p3 = p
    a_in, z, W, b, P0 = fit.a, fit.z, fit.W, fit.b, fit.P0
    use_delta = (p1 != 0.0 or p2 != 0.0) and bool(delta.any())
    W_hat = W + p2 * delta
    # One pass over the data per product: a Ŵᵀ directly when p1 = p2 (then a Δᵀ is never needed).
    Pd: Tensor | None = None
    if not use_delta:
        P_hat = P0
    elif p1 == p2:
        P_hat = a_in @ W_hat.T
    else:
        Pd = a_in @ delta.T
        P_hat = P0 + p2 * Pd
    if env.comm.world_size == 1:
        G = grad_w(a_in, z, W_hat, b, rho, c.mu, aWt=P_hat)
    else:
        G = env.comm.all_reduce_sum_(rho * ((P_hat + b - z).T @ a_in)) + c.mu * W_hat
    # The step direction is G M⁻¹ in the metric M of ``w_metric`` (M = I: the paper's gradient step).
    D = G if metric is None else metric.precondition(G)
    # S is quadratic: S(û + d) − S(û) − ⟨∇S(û), d⟩ = (ρ/2)‖a dᵀ‖² + (μ/2)‖d‖², with d = (p1 − p2)Δ − D/θ,
    # so every trial is three inner products instead of a pass over the data.
    q = p1 - p2 if use_delta else 0.0
    dd, dg, gg = sq(delta), dot(delta, D), sq(D)
    PG: Tensor | None = None
    if metric is not None and metric.factor is not None and Pd is None:
        # Gram metric M = ρaᵀa + sI (over all ranks) and d ∝ D: D M = G gives ρ‖a Dᵀ‖² = ⟨D, G⟩ − s‖D‖², so the
        # test needs no product with the data, and a W^{k+1}ᵀ is one product at the end (exactly x W_1ᵀ's bits)
        ee, eg, pgpg = 0.0, 0.0, (dot(D, G) - metric.shift * gg) / metric.rho
    else:
        PG = a_in @ D.T
        ee, eg = (sq(Pd), dot(Pd, PG)) if Pd is not None else (0.0, 0.0)
        ee, eg, pgpg = env.sum_scalars(ee, eg, sq(PG))
    if metric is not None:
        # ‖d‖²_M = q²‖Δ‖²_M − (2q/θ)⟨Δ, G⟩ + ⟨D, G⟩/θ² (D M = G)
        dd_m = metric.sq_norm(delta, ee) if q else 0.0
        dg_m, gg_m = dot(delta, G), dot(D, G)
    for trial in range(c.max_doublings + 1):
        d_sq = q * q * dd - 2 * q / theta * dg + gg / theta**2
        ad_sq = q * q * ee - 2 * q / theta * eg + pgpg / theta**2
        excess = 0.5 * rho * ad_sq + 0.5 * c.mu * d_sq
        bound_sq = d_sq if metric is None else q * q * dd_m - 2 * q / theta * dg_m + gg_m / theta**2
        if excess <= 0.5 * theta * bound_sq * (1 + 1e-12):
            env.cnt.add_trials(trial, theta)
            W_plus = W_hat + q * delta - D / theta
            W_new = W_plus + p3 * (W_plus - W)
            if PG is None:
                return WStep(W_new, a_in @ W_new.T, W_plus), theta
            P_plus = P_hat - PG / theta
            if Pd is not None:
                P_plus = P_plus + q * Pd
            P_new = P_plus + p3 * (P_plus - P0)
            return WStep(W_new, P_new, W_plus), theta
        theta *= c.backtrack_factor
    env.cnt.add_trials(c.max_doublings, theta)
    env.cnt.backtrack_failures += 1
    return None, theta


# -- the b block -----------------------------------------------------------------------------------------------
def b_step(env: Env, P: Tensor, z: Tensor, b: Tensor, delta: Tensor, p: Inertia) -> tuple[Tensor, Tensor]:
    """b_l: exact step θ = ρN: b⁺ = b̃ − mean_rows(P + b̂ − z), given P = a_{l−1}W_lᵀ; returns (b^{k+1}, b⁺)."""
    b_tilde = b + p[0] * delta
    b_hat = b + p[1] * delta
    # θ = ρN, so b⁺ = b̃ − ∇S_b(b̂)/(ρN), with ∇S_b = ρ Σ_rows(P + 1b̂ᵀ − z) (see grad_b)
    if env.comm.world_size == 1:
        b_plus = b_tilde - (P + b_hat - z).mean(dim=0)
    else:
        column_sums = env.comm.all_reduce_sum_((P + b_hat - z).sum(dim=0))
        b_plus = b_tilde - column_sums / env.m_global
    return b_plus + p[2] * (b_plus - b), b_plus


# -- the z_l block (l < L) ----------------------------------------------------------------------------------------
def z_step(
    env: Env,
    act: Activation,
    z: Tensor,
    p: Inertia,
    delta: Tensor,
    v: Tensor,
    a: Tensor,
    eps: float,
    rho: float,
    nu: float,
) -> AuxStep:
    """z_l (l < L): S = (ρ/2)‖z − v‖², θ = ρ (exact): z⁺ = prox(z̃ − ẑ + v); prox = Π onto C_l(ε) in z
    (or the two-candidate ν-penalty prox). The extrapolated z is re-projected given a_l."""
    c = env.config
    margin = c.projection_margin
    # z̃ − ẑ + v, which is v itself when p1 = p2
    w = v if p[0] == p[1] else (z + p[0] * delta) - (z + p[1] * delta) + v
    z_plus = project_z(act, w, a, eps, margin) if c.constraint == "box" else penalty_z(act, w, a, rho, nu)
    z_new = z_plus + p[2] * (z_plus - z)
    if c.constraint == "box" and p[2]:
        z_new = project_z(act, z_new, a, eps, margin)
    if not (c.safeguard and any(p)):
        return AuxStep(z_new, z_plus, 0.0, 0.0)  # a p = 0 step is a descent step: nothing to compare
    if c.constraint == "box" and env.comm.world_size > 1:
        infeasible = 0.0 if feasible(act, z, a, eps) else 1.0
        f_new, f_old, infeasible = env.sum_scalars(0.5 * rho * sq(z_new - v), 0.5 * rho * sq(z - v), infeasible)
        f_old = math.inf if infeasible else f_old
    elif c.constraint == "box":
        f_new = 0.5 * rho * sq(z_new - v)
        # an old point outside C_l(ε) (ε just shrank) has F = +inf: any feasible point is a descent
        f_old = 0.5 * rho * sq(z - v) if feasible(act, z, a, eps) else math.inf
    else:
        # the memo serves these to the a_l block and the sweep's objective, which need the same terms
        memo = env.memo
        f_new = 0.5 * rho * memo.sq_diff(z_new, v) + 0.5 * nu * memo.sq_diff(a, memo.phi(act, z_new))
        f_old = 0.5 * rho * sq(z - v) + 0.5 * nu * sq(a - act.phi(z))
        f_new, f_old = env.sum_scalars(f_new, f_old)
    return AuxStep(z_new, z_plus, f_new, f_old)


# -- the a_l block (l < L) ----------------------------------------------------------------------------------------
@dataclass
class ABlock:
    """a_l's subproblem data: its activation h, z_l, layer l + 1's weights and z_{l+1}, ε; ``onehot`` when
    layer l + 1 is an exact output (then S is CE_sum of its logits and z_{l+1} is not used)."""

    act: Activation
    z_l: Tensor
    W_next: Tensor
    b_next: Tensor
    z_next: Tensor
    eps: float
    onehot: Tensor | None = None

    def objective_fn(self, rho: float) -> Callable[[Tensor], float]:
        """u ↦ S(u): (ρ/2)‖z_{l+1} − uWᵀ − 1bᵀ‖², or CE_sum(uWᵀ + 1bᵀ) before an exact output."""
        W_next, b_next, z_next, onehot = self.W_next, self.b_next, self.z_next, self.onehot
        if onehot is not None:

            def ce(u: Tensor) -> float:
                return float(ce_sum(u @ W_next.T + b_next, onehot))

            return ce

        def fit(u: Tensor) -> float:
            return 0.5 * rho * sq(u @ W_next.T + b_next - z_next)

        return fit

    def local(self, a: Tensor, rho: float, nu: float, penalty: bool) -> float:
        """Terms of F that contain a_l: (ρ/2)‖z_{l+1} − a W_{l+1}ᵀ − b‖², or CE_sum(a W_Lᵀ + b) before an exact
        output, (+ the ν-penalty when ``penalty``)."""
        v_next = a @ self.W_next.T + self.b_next
        val = float(ce_sum(v_next, self.onehot)) if self.onehot is not None else 0.5 * rho * sq(self.z_next - v_next)
        if penalty:
            val += 0.5 * nu * sq(a - self.act.phi(self.z_l))
        return val


def a_step(
    env: Env, blk: ABlock, a: Tensor, p: Inertia, delta: Tensor, rho: float, nu: float, theta: float
) -> tuple[AuxStep | None, float]:
    """a_l: S = (ρ/2)‖z_{l+1} − aWᵀ − 1bᵀ‖², prox = box [h(z_l) ± ε] (or the ν-penalty), backtracking from
    ``theta``. With ``blk.onehot`` (layer l + 1 is an exact output): S = CE_sum(aWᵀ + 1bᵀ), whose Hessian is
    bounded by ½ WᵀW (the softmax cross-entropy's Hessian in the logits is at most ½I). The Euclidean metric; the
    Gram metric is :func:`~liftkit.methods.tiam.a_gram.a_gram_step`. Returns (the step or None, the last θ
    tried)."""
    c = env.config
    act = blk.act
    a_tilde = a + p[0] * delta
    a_hat = a_tilde if p[1] == p[0] else a + p[1] * delta
    # one product a Ŵᵀ serves both S(â) and ∇S(â)
    if blk.onehot is not None:
        logits = a_hat @ blk.W_next.T + blk.b_next
        s_hat_local = float(ce_sum(logits, blk.onehot))
        grad = grad_ce_sum(logits, blk.onehot) @ blk.W_next
    else:
        residual = a_hat @ blk.W_next.T + blk.b_next - blk.z_next
        s_hat_local = 0.5 * rho * sq(residual)
        grad = rho * (residual @ blk.W_next)  # = grad_a(â, z_{l+1}, W, b, ρ)
    (s_hat,) = env.sum_scalars(s_hat_local)
    prox: Callable[[Tensor, float], Tensor]
    if c.constraint == "box":

        def prox(w: Tensor, theta: float) -> Tensor:
            return project_a(act, w, blk.z_l, blk.eps, c.projection_margin)

    else:
        hz = act.phi(blk.z_l)

        def prox(w: Tensor, theta: float) -> Tensor:
            return (theta * w + nu * hz) / (theta + nu)

    a_plus, theta = backtrack(env, a_tilde, a_hat, grad, s_hat, blk.objective_fn(rho), prox, theta)
    if a_plus is None:
        return None, theta
    a_new = a_plus + p[2] * (a_plus - a)
    if c.constraint == "box" and p[2]:
        a_new = project_a(act, a_new, blk.z_l, blk.eps, c.projection_margin)
    if not (c.safeguard and any(p)):
        return AuxStep(a_new, a_plus, 0.0, 0.0), theta
    penalty = c.constraint == "penalty"
    f_new, f_old = env.sum_scalars(blk.local(a_new, rho, nu, penalty), blk.local(a, rho, nu, penalty))
    return AuxStep(a_new, a_plus, f_new, f_old), theta
