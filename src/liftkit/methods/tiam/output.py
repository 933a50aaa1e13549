r"""The output layer's block operators (functions, as in :mod:`liftkit.methods.tiam.blocks`).

* ``output='penalty'``: z_L is an auxiliary block with S = CE_sum(y, z_L) and the prox of (ρ/2)‖z − v_L‖²:
  z⁺ = (θw + ρv_L)/(θ + ρ), backtracking; or ``zL_solver='fista'`` (mDLAM): FISTA on the whole z_L subproblem
  from z̃.
* ``output='exact'``: there is no z_L block; W_L, then b_L, take triple-inertial majorised steps on
  S = CE_sum(a W_Lᵀ + 1b_Lᵀ) (+ (μ/2)‖W_L‖²). The softmax cross-entropy's Hessian in the logits is at most ½I per
  sample, so ½aᵀa (+ μI) bounds S's Hessian in W_L and ½N in b_L; with the curvature c of ``output_curvature`` in
  place of ½ these are the metrics of the two steps (c = ½ and p1 = p2: the first trial θ = 1 is always
  accepted, majorise–minimise; a smaller c starts from a longer step and lets the backtracking double θ back).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from liftkit.methods.tiam.blocks import WMetric
from liftkit.methods.tiam.config import Inertia
from liftkit.methods.tiam.ops import AuxStep, Env, Metric, backtrack, ce_sum, grad_ce_sum, sq
from liftkit.solvers import projected_fista

__all__ = ["OutputFit", "exact_b_step", "exact_w_step", "zL_step"]


def _identity_prox(w: Tensor, theta: float) -> Tensor:
    return w


def zL_step(
    env: Env, z: Tensor, p: Inertia, delta: Tensor, v: Tensor, onehot: Tensor, rho: float, theta: float
) -> tuple[AuxStep | None, float | None]:
    """z_L: S = CE_sum, prox of (ρ/2)‖z − v_L‖², backtracking from ``theta``; or mDLAM's FISTA on the whole
    subproblem from z̃. Returns (the step or None, the accepted θ; None for FISTA or on failure)."""
    c = env.config
    z_tilde, z_hat = z + p[0] * delta, z + p[1] * delta

    def local(u: Tensor) -> float:
        return float(ce_sum(u, onehot)) + 0.5 * rho * sq(u - v)

    accepted: float | None = None
    if c.zL_solver == "fista":

        def grad_ce(u: Tensor) -> Tensor:
            return grad_ce_sum(u, onehot)

        def prox_q(y: Tensor, t: float) -> Tensor:
            return (y + t * rho * v) / (1 + t * rho)

        z_plus, iters, _ = projected_fista(grad_ce, 1.0 / c.fista_step, prox_q, z_tilde, c.fista_max_iter, c.fista_tol)
        env.cnt.fista_iters += iters
    else:
        grad = grad_ce_sum(z_hat, onehot)
        (s_hat,) = env.sum_scalars(float(ce_sum(z_hat, onehot)))

        def prox(w: Tensor, theta: float) -> Tensor:
            return (theta * w + rho * v) / (theta + rho)

        def ce(u: Tensor) -> float:
            return float(ce_sum(u, onehot))

        z_opt, accepted = backtrack(env, z_tilde, z_hat, grad, s_hat, ce, prox, theta)
        if z_opt is None:
            return None, None
        z_plus = z_opt
    z_new = z_plus + p[2] * (z_plus - z)
    if not (c.safeguard and any(p)):
        return AuxStep(z_new, z_plus, 0.0, 0.0), accepted
    f_new, f_old = env.sum_scalars(local(z_new), local(z))
    return AuxStep(z_new, z_plus, f_new, f_old), accepted


@dataclass
class OutputFit:
    """The exact output's data: its inputs a_{L−1} (this rank's rows), the labels and the current b_L."""

    a: Tensor
    onehot: Tensor
    b: Tensor


def exact_w_step(
    env: Env, fit: OutputFit, W: Tensor, p: Inertia, delta: Tensor, metric: WMetric | None, theta: float
) -> tuple[AuxStep | None, float]:
    """W_L's majorised step on S = CE_sum(a W_Lᵀ + 1b_Lᵀ) + (μ/2)‖W_L‖² in ``metric`` (the curvature c·aᵀa + μI
    or its diagonal; None: the Euclidean step), backtracking from ``theta``. W_L is replicated over the ranks:
    its gradient is all-reduced and the weight term of S is counted on rank 0 only. Returns (step or None, θ)."""
    c = env.config
    a_in, onehot, b = fit.a, fit.onehot, fit.b
    is_main = env.comm.rank == 0  # the replicated weight term of S is counted once in the sums over ranks
    W_tilde, W_hat = W + p[0] * delta, W + p[1] * delta
    G = grad_ce_sum(a_in @ W_hat.T + b, onehot).T @ a_in
    G = env.sum_(G)
    G = G + c.mu * W_hat

    def objective(u: Tensor) -> float:
        return float(ce_sum(a_in @ u.T + b, onehot)) + (0.5 * c.mu * sq(u) if is_main else 0.0)

    in_metric: Metric | None = None
    if metric is not None:
        w_metric = metric

        def sq_norm_m(d: Tensor) -> float:
            (ad_sq,) = env.sum_scalars(sq(a_in @ d.T))
            return w_metric.sq_norm(d, ad_sq)

        in_metric = (w_metric.precondition(G), sq_norm_m)
    s_hat_local = objective(W_hat)
    (s_hat,) = env.sum_scalars(s_hat_local)
    W_plus, theta = backtrack(env, W_tilde, W_hat, G, s_hat, objective, _identity_prox, theta, in_metric, True)
    if W_plus is None:
        return None, theta
    W_new = W_plus + p[2] * (W_plus - W)
    if not any(p):
        return AuxStep(W_new, W_plus, 0.0, 0.0), theta
    # with p2 = 0 the gradient point is W^k itself, whose objective is known
    f_new, f_old = env.sum_scalars(objective(W_new), s_hat_local if p[1] == 0.0 else objective(W))
    return AuxStep(W_new, W_plus, f_new, f_old), theta


def exact_b_step(
    env: Env, P: Tensor, onehot: Tensor, b: Tensor, p: Inertia, delta: Tensor, curvature: float
) -> AuxStep | None:
    """b_L's majorised step on S = CE_sum(P + 1b_Lᵀ) (P = a W_Lᵀ at the new W_L) in the metric c·N, backtracking
    from θ0."""
    c = env.config
    half_n = curvature * env.m_global
    b_tilde, b_hat = b + p[0] * delta, b + p[1] * delta
    G = grad_ce_sum(P + b_hat, onehot).sum(dim=0)
    G = env.sum_(G)

    def objective(u: Tensor) -> float:
        return float(ce_sum(P + u, onehot))

    s_hat_local = objective(b_hat)
    (s_hat,) = env.sum_scalars(s_hat_local)
    metric = (G / half_n, lambda d: half_n * sq(d))
    b_plus, _ = backtrack(env, b_tilde, b_hat, G, s_hat, objective, _identity_prox, c.theta0, metric, True)
    if b_plus is None:
        return None
    b_new = b_plus + p[2] * (b_plus - b)
    if not any(p):
        return AuxStep(b_new, b_plus, 0.0, 0.0)
    # with p2 = 0 the gradient point is b^k itself, whose objective is known
    f_new, f_old = env.sum_scalars(objective(b_new), s_hat_local if p[1] == 0.0 else objective(b))
    return AuxStep(b_new, b_plus, f_new, f_old)
