"""TIAM's building blocks: the gradients of the smooth parts, the constraint set C_l(ε) and its projections,
the ν-penalty prox, and the backtracking line search that every non-exact block step runs.

Row-major throughout (one sample per row, weights stored as in ``nn.Linear``). ``Env`` carries what a block
step reads besides its operands and its weights ρ, ν, c (which are arguments): the static switches of the
configuration, the collectives of data-parallel runs, the global batch size and the step's counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as tF
from torch import Tensor

from liftkit.activations import Activation
from liftkit.distributed import Communicator
from liftkit.methods.tiam.config import TIAMConfig

__all__ = [
    "AuxStep",
    "Counters",
    "Env",
    "SweepMemo",
    "ce_sum",
    "dot",
    "feasible",
    "grad_a",
    "grad_b",
    "grad_ce_sum",
    "grad_w",
    "penalty_z",
    "project_a",
    "project_z",
    "risen",
    "sq",
]


@dataclass
class Counters:
    backtracks: int = 0
    backtrack_failures: int = 0
    safeguard_restarts: int = 0
    fista_iters: int = 0
    theta_max: float = 0.0

    def add_trials(self, trials: int, theta: float) -> None:
        self.backtracks += trials
        self.theta_max = max(self.theta_max, theta)


@dataclass
class AuxStep:
    """One block's result: u^{k+1}, the raw prox output u⁺, and the block's local objective (the terms of F
    containing it) at u^{k+1} and at u^k."""

    new: Tensor
    raw: Tensor
    f_new: float
    f_old: float


class SweepMemo:
    """h(z) and ‖u − w‖² of one sweep's row tensors, each computed once however many blocks need it.

    A sweep replaces its auxiliary rows but never writes into them, so a value is keyed by its operands' identity
    and version counter (which an in-place write bumps); an entry holds its operands, so their ids cannot be reused.
    Only the last few entries are kept (each holds N-row tensors)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._phi: list[tuple[Activation, Tensor, int, Tensor]] = []
        self._sq: list[tuple[Tensor, int, Tensor, int, float]] = []

    def phi(self, act: Activation, z: Tensor) -> Tensor:
        """h(z) (the returned tensor is shared: never write into it)."""
        for a, t, version, out in self._phi:
            if a is act and t is z and version == z._version:
                return out
        out = act.phi(z)
        self._phi = [*self._phi, (act, z, z._version, out)][-self.size :] if self.size else []
        return out

    def sq_diff(self, u: Tensor, w: Tensor) -> float:
        """‖u − w‖² (this process's rows)."""
        for t1, v1, t2, v2, value in self._sq:
            if t1 is u and t2 is w and v1 == u._version and v2 == w._version:
                return value
        value = sq(u - w)
        self._sq = [*self._sq, (u, u._version, w, w._version, value)][-self.size :] if self.size else []
        return value


@dataclass
class Env:
    """What a block step reads besides its operands: ``config`` for the static switches (backtracking,
    history, safeguard, constraint, metrics; never ρ, ν or the curvature, which the callers pass), the
    communicator, N_global of the batch (the b-step's exact mean divides by it), the step's counters and the
    method's named-block hook (``block(name)`` brackets a unit of work for a profiler; a no-op by default)."""

    config: TIAMConfig
    name: str  # the method's registry name, for error messages
    comm: Communicator
    m_global: int
    cnt: Counters
    block: Callable[[str], AbstractContextManager[None]]
    memo: SweepMemo = field(default_factory=SweepMemo)

    def sum_scalars(self, *values: float) -> tuple[float, ...]:
        """Sums of per-process scalars over all processes (the values themselves in one process)."""
        return self.comm.sum_scalars(*values) if self.comm.world_size > 1 else values

    def sum_(self, t: Tensor) -> Tensor:
        """The in-place sum of ``t`` over all processes (``t`` itself in one process)."""
        return self.comm.all_reduce_sum_(t) if self.comm.world_size > 1 else t

    def theta_start(self, stored: float) -> float:
        """The first trial θ of a backtracking block: its last accepted θ with ``theta_warm_start``, else θ0."""
        return stored if self.config.theta_warm_start else self.config.theta0


def risen(new: float, old: float, dtype: torch.dtype) -> bool:
    # A rise below a few ulps of the compared sums is rounding, not an ascent.
    return new > old + 64 * torch.finfo(dtype).eps * max(abs(old), abs(new), 1e-30)


def grad_w(a_in: Tensor, z: Tensor, W: Tensor, b: Tensor, rho: float, mu: float, aWt: Tensor | None = None) -> Tensor:
    """∇_W of S_W = (ρ/2)‖z − a Wᵀ − 1bᵀ‖² + (μ/2)‖W‖² (row-major: ρ(aWᵀ + 1bᵀ − z)ᵀa + μW).
    ``aWt`` is a precomputed a Wᵀ (saves the pass over the data)."""
    if aWt is None:
        aWt = a_in @ W.T
    return rho * ((aWt + b - z).T @ a_in) + mu * W


def grad_b(a_in: Tensor, z: Tensor, W: Tensor, b: Tensor, rho: float) -> Tensor:
    """∇_b of S_b = (ρ/2)‖z − a Wᵀ − 1bᵀ‖²: ρ Σ_rows(aWᵀ + 1bᵀ − z)."""
    return rho * (a_in @ W.T + b - z).sum(dim=0)


def grad_a(a: Tensor, z_next: Tensor, W_next: Tensor, b_next: Tensor, rho: float) -> Tensor:
    """∇_a of S_a = (ρ/2)‖z_{l+1} − a W_{l+1}ᵀ − 1b_{l+1}ᵀ‖²: ρ(aWᵀ + 1bᵀ − z_{l+1})W."""
    return rho * ((a @ W_next.T + b_next - z_next) @ W_next)


def grad_ce_sum(z: Tensor, onehot: Tensor) -> Tensor:
    """∇_z of CE_sum(y, z) = −Σ y ⊙ log softmax(z): softmax(z) − y."""
    return torch.softmax(z, dim=1) - onehot


def ce_sum(z: Tensor, onehot: Tensor) -> Tensor:
    """CE_sum(y, z) = −Σ y ⊙ log softmax(z) (summed over the samples)."""
    return -(onehot * tF.log_softmax(z, dim=1)).sum()


def dot(u: Tensor, v: Tensor) -> float:
    # one fused pass, no temporary (these run on N x width arrays several times per block)
    return float(torch.vdot(u.detach().reshape(-1), v.detach().reshape(-1)))


def sq(u: Tensor) -> float:
    return float(torch.linalg.vector_norm(u.detach())) ** 2


# -- the box C_l(ε) and the ν-penalty ---------------------------------------------------------------------------
def project_z(act: Activation, w: Tensor, a: Tensor, eps: float, margin: float) -> Tensor:
    """Euclidean projection of w onto {z : h(z) ∈ [a − ε, a + ε]} (element-wise, exact); the bounds are shrunk
    inward by ``margin``."""
    lo_a, hi_a = a - eps + margin, a + eps - margin
    if act.name == "relu":
        # z ≤ a + ε always; z ≥ a − ε only where a − ε > 0 (elsewhere h(z) ≥ a − ε holds for every z)
        return torch.clamp(w, min=lo_a.masked_fill_(lo_a <= 0, -math.inf), max=hi_a)
    if act.name == "elu":
        floor = -act._a
        lo = torch.where(lo_a > floor, act.inverse(torch.clamp(lo_a, min=floor)), -math.inf)
        # keep the upper bound strictly above ELU's floor −α in the working dtype: at 1 − 1e-12 float32 rounds
        # to −α itself and h⁻¹(−α) = −inf (seen on MNIST at ρ = 1: NaN objective after ~8 iterations)
        hi = act.inverse(torch.clamp(hi_a, min=floor * (1 - 64 * torch.finfo(hi_a.dtype).eps)))
        return torch.minimum(torch.maximum(w, lo), hi)
    lo, hi = act.inverse(lo_a), act.inverse(hi_a)  # leaky ReLU: bijective
    return torch.minimum(torch.maximum(w, lo), hi)


def project_a(act: Activation, w: Tensor, z: Tensor, eps: float, margin: float) -> Tensor:
    """Projection of w onto the box [h(z) − ε, h(z) + ε] (shrunk inward by ``margin``)."""
    hz = act.phi(z)
    return torch.clamp(w, min=hz - (eps - margin), max=hz + (eps - margin))


def feasible(act: Activation, z: Tensor, a: Tensor, eps: float) -> bool:
    """Whether (z, a) lies in C_l(ε), up to a few ulps."""
    tol = 8 * torch.finfo(z.dtype).eps * (1.0 + float(a.abs().max()) if a.numel() else 1.0)
    return bool(((a - act.phi(z)).abs() <= eps + tol).all())


def penalty_z(act: Activation, w: Tensor, a: Tensor, rho: float, nu: float) -> Tensor:
    """argmin_z (ρ/2)(z − w)² + (ν/2)(a − h(z))², element-wise, for ReLU / leaky ReLU (two candidates).

    ReLU in closed form: the candidates are z₊ = max((ρw + νa)/(ρ + ν), 0) and z₋ = min(w, 0), and comparing
    their costs (ρν(w − a)²/(ρ + ν) against νa² where z₊ > 0 > w) reduces to: z₊ wins iff w ≥ −κ·max(a, 0) with
    κ = √(1 + ν/ρ) − 1."""
    if act.name == "relu":
        kappa = math.sqrt(1.0 + nu / rho) - 1.0
        pos = torch.add(w * (rho / (rho + nu)), a, alpha=nu / (rho + nu)).clamp_(min=0.0)
        threshold = a.clamp(min=0.0).mul_(-kappa)
        return torch.where(w >= threshold, pos, w.clamp(max=0.0))
    slope = act._a
    pos = torch.clamp((rho * w + nu * a) / (rho + nu), min=0.0)
    neg = torch.clamp((rho * w + nu * slope * a) / (rho + nu * slope**2), max=0.0)

    def cost(z: Tensor) -> Tensor:
        return rho * (z - w).pow(2) + nu * (a - act.phi(z)).pow(2)

    return torch.where(cost(pos) <= cost(neg), pos, neg)


# -- backtracking -------------------------------------------------------------------------------------------------
#: a step metric M for :func:`backtrack`: (∇S(û) M⁻¹, d ↦ ‖d‖²_M)
Metric = tuple[Tensor, Callable[[Tensor], float]]


def backtrack(
    env: Env,
    u_tilde: Tensor,
    u_hat: Tensor,
    grad: Tensor,
    s_hat: float,
    objective: Callable[[Tensor], float],
    prox: Callable[[Tensor, float], Tensor],
    theta: float,
    metric: Metric | None = None,
    replicated: bool = False,
) -> tuple[Tensor | None, float]:
    """u⁺ = prox(ũ − ∇S(û)/θ, θ), θ ← factor·θ until S(u⁺) ≤ S(û) + ⟨∇S(û), d⟩ + θ/2‖d‖² (d = u⁺ − û).
    ``metric`` = (∇S(û)M⁻¹, ‖·‖²_M) runs the same test in a metric M (``prox`` must then be the prox in M).
    ``replicated``: u is a weight block, identical on every rank (its gradient already reduced), so only
    ``objective`` (this rank's share of S) is summed over ranks. Returns (u⁺, θ), or (None, θ) on failure."""
    with env.block("backtracking"):
        c, cnt = env.config, env.cnt
        direction, sq_norm = (grad, sq) if metric is None else metric
        for trial in range(c.max_doublings + 1):
            u_plus = prox(u_tilde - direction / theta, theta)
            d = u_plus - u_hat
            if replicated:
                (s_plus,), grad_d, d_sq = env.sum_scalars(objective(u_plus)), dot(grad, d), sq_norm(d)
            else:
                s_plus, grad_d, d_sq = env.sum_scalars(objective(u_plus), dot(grad, d), sq_norm(d))
            bound = s_hat + grad_d + 0.5 * theta * d_sq
            # the sums carry rounding of a few ulps of S itself; without slack a tie can read as a rejection
            slack = 64 * torch.finfo(u_plus.dtype).eps * (abs(s_hat) + abs(s_plus))
            if s_plus <= bound + slack:
                cnt.add_trials(trial, theta)
                return u_plus, theta
            theta *= c.backtrack_factor
        cnt.add_trials(c.max_doublings, theta)
        cnt.backtrack_failures += 1
        return None, theta
