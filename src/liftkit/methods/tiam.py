r"""TIAM: triple-inertial accelerated alternating minimization, and its un-accelerated base ``am``.

Paper: C. Yan, J. Xu, Q. Wang, Z. Peng, "A Triple-Inertial Accelerated Alternating Optimization Method for
Deep Learning Training", arXiv 2503.08489. No code was released; only the paper's template is public, so this
module is the reconstruction of docs/methods/tiam.md §3–§5 on the base objective of mDLAM (Wang, Li, Zhao,
Neurocomputing 2022). Results are reported as "TIAM (reconstructed from the paper's template)".

Objective (docs/methods/tiam.md §3; written row-major here, one sample per row, weights stored as in ``nn.Linear``):

.. math::

    F(W,b,z,a) = \mathrm{CE}_{\mathrm{sum}}(y, z_L)
        + \sum_{l=1}^{L} \Big[\tfrac{\rho}{2}\|z_l - a_{l-1}W_l^\top - 1b_l^\top\|^2
        + \tfrac{\mu}{2}\|W_l\|^2\Big],
    \qquad (z_l, a_l) \in C_l(\varepsilon) = \{h(z_l) - \varepsilon \le a_l \le h(z_l) + \varepsilon\}

with a_0 = x and ε_k = max(ε_0 · decay^k, ε_min). The alternative ``constraint='penalty'`` replaces C_l(ε) by
(ν/2)‖a_l − h(z_l)‖².

Every block u ∈ {W_l, b_l, z_l, a_l, z_L} (in that order, layer by layer; docs/methods/tiam.md §4.5) takes one
triple-inertial step with Δ = u^k − u^{k−1}:

.. code-block:: text

    ũ = u^k + p1 Δ    (centre of the proximal term)      û = u^k + p2 Δ    (gradient point)
    u⁺ = prox_{P_u/θ}(ũ − ∇S_u(û)/θ)   accepted iff  S_u(u⁺) ≤ S_u(û) + ⟨∇S_u(û), u⁺ − û⟩ + θ/2 ‖u⁺ − û‖²
         (θ ← factor·θ from θ0, at most ``max_doublings`` times; then retry with p1 = p2 = 0; then keep u^k)
    u^{k+1} = u⁺ + p3 (u⁺ − u^k)       (what every later block sees)

* W_l: S = (ρ/2)‖z_l − a W^T − 1bᵀ‖² + (μ/2)‖W‖², no prox, backtracking. S is quadratic, so the acceptance
  test is evaluated exactly from three inner products (no extra pass over the data per trial).
* b_l: exact step θ = ρN: b⁺ = b̃ − mean_rows(aWᵀ + 1b̂ᵀ − z); with p1 = p2 it is the exact minimiser.
* z_l (l < L): θ = ρ: z⁺ = Π(z̃ − ẑ + v), v = aWᵀ + 1bᵀ, Π the projection onto {z : h(z) ∈ [a_l ± ε]}
  (ReLU: z = min(v', a + ε), then max(z, a − ε) where a − ε > 0; strictly increasing h: a clip to
  [h⁻¹(a − ε), h⁻¹(a + ε)]). Penalty variant: the two-candidate closed form (ReLU, leaky ReLU).
* a_l (l < L): S = (ρ/2)‖z_{l+1} − aW_{l+1}ᵀ − 1b_{l+1}ᵀ‖², prox = box [h(z_l) ± ε], backtracking.
* z_L: S = CE_sum, prox of (ρ/2)‖z − v_L‖²: z⁺ = (θw + ρv_L)/(θ + ρ); or ``zL_solver='fista'`` (mDLAM): FISTA
  on the whole z_L subproblem from z̃.

Metrics (assumption, switchable; the default is the paper's Euclidean step). The W and a steps are gradient
steps on ill-conditioned least-squares blocks (the Hessian of S_W is ρaᵀa + μI, whose spectrum on MNIST pixels
spans many decades), so with the identity metric θ settles near the largest eigenvalue and the weights move
along the small ones very slowly. ``w_metric='diagonal'`` runs the same backtracking in the metric
M = diag(ρΣ_rows a² + μ) (still no matrix inversion); ``w_metric='gram'`` in M = ρaᵀa + μI, the block's exact
Hessian, and ``a_metric='gram'`` (penalty constraint only) in M = ρW_{l+1}ᵀW_{l+1} for a_l with the prox
u = (θwM + νh(z_l))(θM + νI)⁻¹: the step is u⁺ = prox^M(ũ − ∇S(û)M⁻¹/θ), accepted iff
S(u⁺) ≤ S(û) + ⟨∇S(û), d⟩ + (θ/2)‖d‖²_M. With p1 = p2 the first trial θ = 1 is then the exact block minimiser
(a Newton step on a quadratic); the factorisations are of n_{l−1} × n_{l−1} and n_l × n_l matrices (784 × 784 for
MNIST's first layer, 100 × 100 after it), which departs from the paper's "no matrix inversion" and is reported as such.

Output penalty (assumption, switchable). ``rho_output`` weights the output layer's penalty (ρ_L/2)‖z_L − v_L‖²
separately (None: ρ, the spec). Minimising F over z_L leaves the Moreau envelope of CE with parameter 1/ρ_L at
the network's logits v_L: at a stationary point the error signal reaching W_L and a_{L−1} is y − softmax(z_L),
not y − softmax(v_L), and z_L may sit up to ‖y − softmax‖/ρ_L logits closer to the label than the network. A
small ρ_L therefore lets the auxiliary chain "classify" the training set while the network does not; a larger
ρ_L ties the loss to the network's own logits.

Exact output (assumption, switchable). ``output='exact'`` keeps the output constraint z_L = a_{L−1}W_Lᵀ + 1b_Lᵀ
exactly: there is no z_L block, CE acts on the logits of the auxiliary chain, and W_L, b_L and a_{L−1} take
majorised steps on it. The softmax cross-entropy's Hessian in the logits is at most ½I, so c·aᵀa + μI, c·N
and c·W_LᵀW_L (c = ``output_curvature``, ½ by default) take the place of ρaᵀa, ρN and ρW_LᵀW_L in the metrics;
with c = ½ the first trial θ = 1 is always accepted.

Block order (assumption, switchable). ``block_order='forward'`` is the paper's (layer by layer from the input:
W_l, b_l, z_l, a_l). ``'backward'`` runs l = L..1 with z_l, W_l, b_l, a_{l−1}: the label signal entering at
z_L then reaches W_1 within one sweep (as in dlADMM's backward pass) instead of one block per sweep.

Inertia schedule. ``p_schedule='constant'`` (default; p1 = p2 = p3 = 0.3, assumption) or ``'fista'`` (the
FISTA-like alternative of docs/methods/tiam.md §4.4): t_0 = 1, t_k = (1 + √(1 + 4t_{k−1}²))/2 and every switched-on p_i
of iteration k is p_k = (t_{k−1} − 1)/t_k (0, 0, 0.28, 0.43, … → 1). The safeguard below keeps F monotone
when the large late p_k overshoot.

After the third inertia z_l is re-projected (given a_l) and a_l (given the new z_l), so (z_l, a_l) ∈ C_l(ε).
With ``safeguard`` on, a block whose local objective (the terms of F that contain it) rises is redone with
p1 = p2 = p3 = 0, so F does not increase across the blocks of one sweep at fixed ε.

Modes. ``full`` (the paper's): the trainer passes the whole training set as one batch each step; the auxiliary
variables z_l, a_l, z_L and their previous iterates persist across steps, stored per dataset index (``idx``),
so a reshuffled batch stays aligned; ``resync_every`` = R > 0 (assumption; 0 by default) resets them and their
inertia to a forward pass of the current network every R iterations. ``minibatch``: the auxiliary variables
are fresh per batch (forward pass; z_L by ``zL_init``), ε restarts at ε_0 for each batch and decays per sweep,
``minibatch_sweeps`` sweeps run on each batch, and only the weights, biases and their inertia history persist
(assumption: the paper leaves mini-batching to future work). ``auto``: full when ``idx`` covers 0..max(idx)
exactly, otherwise minibatch.

``am`` is this same code with p1 = p2 = p3 = 0 ("AM (mDLAM base, p=0)"), so the acceleration is measured.

Data-parallel (docs/methods/tiam.md §7). Every rank holds its shard of the batch's columns of z_l, a_l and z_L
(in full mode: the same samples every epoch, since the trainer sorts the full batch before slicing it). Over
``self.comm`` go: the data part of the W-gradient ρ(aŴᵀ + 1bᵀ − z)ᵀa (n_l × n_{l−1}) and the three sample
sums of the W acceptance test; the b-step column sums Σ_rows(P + 1b̂ᵀ − z), divided by N_global; every
backtracking value (S(û), S(u⁺), ⟨∇S(û), d⟩, ‖d‖²) and every safeguard objective (with a feasibility count),
so θ and each accept / reject / restart decision are the same on every rank; and the sweep's objective terms
for the diagnostics. With ``output='exact'``, W_L and b_L are replicated blocks: their CE gradients are
all-reduced, and of their backtracking values only the CE share (S) is summed, since ⟨∇S, d⟩ and ‖d‖² are
already identical on every rank. ``zL_solver='fista'`` is single-process only (its stopping rule would need every
iteration's change reduced). Checkpoints gather the per-sample shards into full arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from liftkit.activations import Activation
from liftkit.methods.base import Method, MethodConfig, StepStats, evaluate_loss, register
from liftkit.models import ChainLayer, as_chain
from liftkit.solvers import guarded_cholesky, projected_fista

__all__ = ["AM", "TIAM", "AMConfig", "TIAMConfig", "TIAMState", "grad_a", "grad_b", "grad_ce_sum", "grad_w"]

_SUPPORTED_ACTIVATIONS = ("relu", "leaky_relu", "elu")
_PENALTY_ACTIVATIONS = ("relu", "leaky_relu")


@dataclass
class TIAMConfig(MethodConfig):
    """TIAM hyperparameters (docs/methods/tiam.md §6). Defaults: ρ, μ, ε schedule, θ0, ×2, ≤10 doublings from the
    mDLAM code; p1 = p2 = p3 = 0.3 (assumption). Every (assumption) of docs/methods/tiam.md §4 is a field here."""

    rho: float = 1e-3  # weight of the linear-constraint penalties (official code, mDLAM)
    rho_output: float | None = None  # weight of the output layer's penalty (ρ/2)‖z_L − v_L‖²; None: ρ (assumption)
    mu: float = 0.05  # weight regulariser (μ/2)‖W‖² (official code, mDLAM)
    eps0: float = 100.0  # initial half-width of C_l(ε)
    eps_decay: float = 0.5  # ε ← max(decay·ε, eps_min) after every full-batch iteration
    eps_min: float = 1e-3
    p1: float = 0.3  # 1st inertia: centre of the proximal term (assumption)
    p2: float = 0.3  # 2nd inertia: gradient point (assumption)
    p3: float = 0.3  # 3rd inertia: post-update extrapolation (assumption)
    p_schedule: str = "constant"  # 'constant' | 'fista': every non-zero p_i follows p_k = (t_{k-1} - 1)/t_k
    safeguard: bool = True  # redo a block with p = 0 when its local objective rises (assumption)
    history: str = "extrapolated"  # 'extrapolated': Δ = u^k − u^{k−1}; 'raw': Δ between raw prox outputs u⁺
    zL_solver: str = "prox_step"  # 'prox_step' (assumption) | 'fista' (mDLAM)
    zL_init: str = "target"  # 'target': z_L = 2y − 1 (mDLAM) | 'forward': the logits (always, for output='exact')
    theta0: float = 1.0  # first trial θ of every backtracking call (mDLAM)
    backtrack_factor: float = 2.0
    max_doublings: int = 10
    theta_warm_start: bool = False  # start each block's backtracking at its last accepted θ (assumption)
    constraint: str = "box"  # 'box': C_l(ε) | 'penalty': (ν/2)‖a_l − h(z_l)‖² (assumption)
    nu: float = 1e-3  # weight of the 'penalty' constraint
    init: str = "pytorch"  # 'pytorch': the model's own weights | 'mdlam': W, b ~ N(0, 0.1²)
    mode: str = "auto"  # 'auto' | 'full' | 'minibatch'
    minibatch_sweeps: int = 1
    projection_margin: float = 1e-9  # shrink the bounds of C_l(ε) inward (mDLAM)
    fista_step: float = 4.0  # step of zL_solver='fista' (mDLAM)
    fista_max_iter: int = 500
    fista_tol: float = 1e-4  # relative-change stop of the shared projected_fista
    w_metric: str = "identity"  # metric of the W backtracking: 'identity' (paper) | 'diagonal' | 'gram' (assumption)
    a_metric: str = "identity"  # metric of the a backtracking: 'identity' (paper) | 'gram' (penalty only; assumption)
    penalty_growth: float = 1.0  # ρ and ν are multiplied by growth^k at iteration k (continuation; assumption)
    penalty_growth_max: float = 100.0  # cap on that factor
    # 'penalty': z_L is an auxiliary block tied to v_L by (ρ/2)‖z_L − v_L‖² (spec) | 'exact': z_L = v_L is kept
    # exactly and CE acts on the network's own logits; W_L, b_L, a_{L-1} take majorised CE steps (assumption)
    output: str = "penalty"
    # curvature c of the exact output's majorised steps (metrics c·aᵀa, c·N, c·W_LᵀW_L); 0.5 bounds the softmax
    # cross-entropy's Hessian, so θ = 1 is always accepted; a smaller c tries longer steps first (assumption)
    output_curvature: float = 0.5
    # full mode: every this many iterations, reset z_l, a_l (and their inertia) to a forward pass of the current
    # network, as at the start; 0 = never, the paper's schedule (assumption)
    resync_every: int = 0
    # 'forward': l = 1..L, blocks W_l b_l z_l a_l (paper) | 'backward': l = L..1, z_l W_l b_l a_{l-1} (assumption)
    block_order: str = "forward"

    def validate(self) -> None:
        self._positive("rho", "nu", "eps0", "eps_min", "theta0", "fista_step", "output_curvature")
        if self.rho_output is not None:
            self._positive("rho_output")
        self._nonnegative("mu", "projection_margin", "fista_tol")
        for name in ("p1", "p2", "p3"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0.0 <= v < 1.0):
                raise ValueError(f"{name} must lie in [0, 1), got {v!r}")
        if not 0.0 < self.eps_decay <= 1.0:
            raise ValueError(f"eps_decay must lie in (0, 1], got {self.eps_decay!r}")
        if not (math.isfinite(self.backtrack_factor) and self.backtrack_factor > 1.0):
            raise ValueError(f"backtrack_factor must be a finite number > 1, got {self.backtrack_factor!r}")
        self._int_at_least("max_doublings", 0)
        self._int_at_least("minibatch_sweeps", 1)
        self._int_at_least("resync_every", 0)
        self._int_at_least("fista_max_iter", 1)
        self._choice("history", ("extrapolated", "raw"))
        self._choice("p_schedule", ("constant", "fista"))
        self._choice("zL_solver", ("prox_step", "fista"))
        self._choice("zL_init", ("target", "forward"))
        self._choice("constraint", ("box", "penalty"))
        self._choice("init", ("pytorch", "mdlam"))
        self._choice("mode", ("auto", "full", "minibatch"))
        self._choice("w_metric", ("identity", "diagonal", "gram"))
        self._choice("a_metric", ("identity", "gram"))
        self._choice("block_order", ("forward", "backward"))
        self._choice("output", ("penalty", "exact"))
        if self.output == "exact" and (self.zL_solver != "prox_step" or self.rho_output is not None):
            raise ValueError(
                "output='exact' has no z_L block: zL_solver and rho_output apply to output='penalty' only; "
                "drop them or set output=penalty"
            )
        if self.resync_every and self.mode == "minibatch":
            raise ValueError(
                "resync_every applies to full-batch mode; mode='minibatch' already starts every batch from a forward "
                "pass: drop resync_every or use mode=full/auto"
            )
        if not (math.isfinite(self.penalty_growth) and self.penalty_growth >= 1.0):
            raise ValueError(f"penalty_growth must be a finite number >= 1, got {self.penalty_growth!r}")
        if not (math.isfinite(self.penalty_growth_max) and self.penalty_growth_max >= 1.0):
            raise ValueError(f"penalty_growth_max must be a finite number >= 1, got {self.penalty_growth_max!r}")
        if self.a_metric == "gram" and self.constraint != "penalty":
            raise ValueError(
                "a_metric='gram' needs constraint='penalty' (the box prox has no closed form in that metric); "
                "set constraint=penalty or a_metric=identity"
            )


@dataclass
class AMConfig(TIAMConfig):
    """``am``: the TIAM code with the three inertias switched off (p1 = p2 = p3 = 0)."""

    p1: float = 0.0
    p2: float = 0.0
    p3: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.p1 or self.p2 or self.p3:
            raise ValueError("am has p1 = p2 = p3 = 0 by definition; use method tiam for inertia")


@dataclass
class _BlockHistory:
    """Anchor of one block's inertia: ``prev`` is u^{k−1} (or the raw r^{k−1}); ``raw`` is r^k when
    ``history='raw'``."""

    prev: Tensor
    raw: Tensor | None = None


@dataclass
class TIAMState:
    """Everything TIAM keeps across steps beyond the model's parameters.

    Weights: per-layer inertia anchors for W_l and b_l and the last accepted θ of each backtracking block.
    Full mode: the auxiliary variables per dataset index (row i belongs to sample i), their inertia anchors,
    a mask of initialised rows and the iteration counter k that drives ε_k.
    """

    W_prev: list[Tensor] = field(default_factory=list)
    b_prev: list[Tensor] = field(default_factory=list)
    W_raw: list[Tensor] = field(default_factory=list)
    b_raw: list[Tensor] = field(default_factory=list)
    theta_W: list[float] = field(default_factory=list)
    theta_a: list[float] = field(default_factory=list)
    theta_zL: float = 0.0
    iteration: int = 0
    # full-batch auxiliary variables, indexed by dataset index: z[l], a[l] (l < L) and z[L-1] = z_L
    z: list[Tensor] = field(default_factory=list)
    a: list[Tensor] = field(default_factory=list)
    z_prev: list[Tensor] = field(default_factory=list)
    a_prev: list[Tensor] = field(default_factory=list)
    z_raw: list[Tensor] = field(default_factory=list)
    a_raw: list[Tensor] = field(default_factory=list)
    initialised: Tensor | None = None


_P = tuple[float, float, float]

# the keys of TIAM.extra_state()
_STATE_KEYS = (
    "W_prev", "b_prev", "W_raw", "b_raw", "theta_W", "theta_a", "theta_zL", "iteration",
    "z", "a", "z_prev", "a_prev", "z_raw", "a_raw", "initialised",
)


@dataclass
class _Sweep:
    """What the blocks of one sweep share: the batch (x, one-hot labels), the auxiliary variables z_l, a_l
    (updated in place) with their inertia anchors, ε, the counters and the inertia (p1, p2, p3)."""

    x: Tensor
    onehot: Tensor
    z: list[Tensor]
    a: list[Tensor]
    z_hist: list[_BlockHistory]
    a_hist: list[_BlockHistory]
    eps: float
    cnt: _Counters
    p: _P


@dataclass
class _AuxStep:
    """One auxiliary block's result: u^{k+1}, the raw prox output u⁺, and the block's local objective (the
    terms of F containing it) at u^{k+1} and at u^k."""

    new: Tensor
    raw: Tensor
    f_new: float
    f_old: float


@dataclass
class _Counters:
    backtracks: int = 0
    backtrack_failures: int = 0
    safeguard_restarts: int = 0
    fista_iters: int = 0
    theta_max: float = 0.0

    def add_trials(self, trials: int, theta: float) -> None:
        self.backtracks += trials
        self.theta_max = max(self.theta_max, theta)


@dataclass
class _WMetric:
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
        return self.rho * a_sq + self.shift * _sq(U)


def _risen(new: float, old: float, dtype: torch.dtype) -> bool:
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


def _dot(u: Tensor, v: Tensor) -> float:
    # one fused pass, no temporary (these run on N x width arrays several times per block)
    return float(torch.vdot(u.detach().reshape(-1), v.detach().reshape(-1)))


def _sq(u: Tensor) -> float:
    return float(torch.linalg.vector_norm(u.detach())) ** 2


@register
class TIAM(Method):
    """TIAM (reconstructed from the paper's template): triple-inertial block steps on mDLAM's objective.

    See the module docstring for the objective, block operators and modes; hyperparameters in
    :class:`TIAMConfig`. Fully connected ``nn.Sequential`` models only (``Flatten``, ``Linear`` with bias,
    ReLU / LeakyReLU / ELU hidden activations, bare ``Linear`` output).
    """

    name = "tiam"
    Config = TIAMConfig
    config: TIAMConfig
    default_loss = "ce"
    supported_losses = ("ce",)
    reporting_name = "TIAM (reconstructed from the paper's template)"
    paper = (
        "Yan, Xu, Wang, Peng, A Triple-Inertial Accelerated Alternating Optimization Method for Deep "
        "Learning Training, arXiv 2503.08489 (reconstructed on mDLAM: Wang, Li, Zhao, Neurocomputing 2022)"
    )
    default_batch_size = 0
    supports_data_parallel = True

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self._m_global = 0  # N_global of the batch being swept (the b-step's exact mean divides by it)
        self._gram_cache: tuple[tuple[Any, ...], _WMetric] | None = None  # the first layer's W metric, full batch
        c = self.config
        self.chain: list[ChainLayer] = as_chain(
            model, method=self.name, allowed_activations=_SUPPORTED_ACTIVATIONS, require_bias=True
        )
        if len(self.chain) < 2:
            raise ValueError(f"{self.name} needs at least one hidden layer (Linear -> activation -> Linear)")
        for layer in self.chain[:-1]:
            if layer.activation is None:
                raise ValueError(
                    f"{self.name}: hidden Linear at module {layer.index} has no activation; put a ReLU, "
                    "LeakyReLU or ELU after every hidden Linear"
                )
        if self.chain[-1].activation is not None:
            raise ValueError(
                f"{self.name} trains on the output pre-activation z_L (cross-entropy on logits); remove the "
                f"output activation at module {self.chain[-1].activation_index}"
            )
        for layer in self.chain[1:]:
            if layer.pre:
                raise ValueError(f"{self.name}: only a Flatten before the first Linear is supported")
        if c.constraint == "penalty":
            for layer in self.chain[:-1]:
                act = layer.activation
                assert act is not None
                if act.name not in _PENALTY_ACTIVATIONS:
                    raise ValueError(
                        f"{self.name}: constraint='penalty' has a closed-form z-step for "
                        f"{', '.join(_PENALTY_ACTIVATIONS)} only, not {act.name}; use constraint='box'"
                    )
        if c.init == "mdlam":
            with torch.no_grad():
                for layer in self.chain:
                    layer.weight.normal_(0.0, 0.1)
                    assert layer.bias is not None
                    layer.bias.normal_(0.0, 0.1)
        self.state = TIAMState()
        with torch.no_grad():
            for layer in self.chain:
                self.state.W_prev.append(layer.weight.detach().clone())
                self.state.b_prev.append(self._bias(layer).detach().clone())
                if c.history == "raw":
                    self.state.W_raw.append(layer.weight.detach().clone())
                    self.state.b_raw.append(self._bias(layer).detach().clone())
        n_layers = len(self.chain)
        self.state.theta_W = [c.theta0] * n_layers
        self.state.theta_a = [c.theta0] * (n_layers - 1)
        self.state.theta_zL = c.theta0

    # -- data parallelism ---------------------------------------------------------------------------
    def single_process_only(self) -> str | None:
        if self.config.zL_solver == "fista":
            return (
                f"{self.name}: zL_solver='fista' runs in a single process only; use zL_solver=prox_step with "
                "several processes"
            )
        return None

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _bias(layer: ChainLayer) -> Tensor:
        b = layer.bias
        assert b is not None
        return b

    def _acts(self) -> list[Activation]:
        acts = []
        for layer in self.chain[:-1]:
            assert layer.activation is not None
            acts.append(layer.activation)
        return acts

    def _eps(self, k: int) -> float:
        c = self.config
        return max(c.eps0 * c.eps_decay**k, c.eps_min)

    @contextmanager
    def _config_as(self, **changes: Any) -> Iterator[None]:
        """Within the block: ``self.config`` with ``changes``. Every block reads its weights (ρ, ν, …) from
        ``self.config``, so the changed copy stands in for it (nothing changes when ``changes`` is empty)."""
        c = self.config
        if changes:
            self.config = replace(c, **changes)
        try:
            yield
        finally:
            self.config = c

    def _penalties_at(self, k: int) -> AbstractContextManager[None]:
        """ρ and ν of iteration k, ρ_k = ρ·min(growth^k, cap) and the same factor on ν and ``rho_output`` (the
        quadratic-penalty continuation; with growth = 1, the configured values), for one sweep."""
        c = self.config
        growth, cap = c.penalty_growth, c.penalty_growth_max
        factor = cap if k * math.log(growth) >= math.log(cap) else growth**k  # no float overflow for large k
        if factor == 1.0:
            return self._config_as()
        rho_output = None if c.rho_output is None else c.rho_output * factor
        return self._config_as(rho=c.rho * factor, nu=c.nu * factor, rho_output=rho_output)

    def _rho_of(self, l: int) -> float:
        """ρ of layer l's linear penalty (ρ_l/2)‖z_l − a_{l−1}W_lᵀ − 1b_lᵀ‖²: ``rho_output`` for the output layer
        when set, else ρ."""
        c = self.config
        return c.rho_output if (c.rho_output is not None and l == len(self.chain) - 1) else c.rho

    def _layer_penalty(self, l: int) -> AbstractContextManager[None]:
        """``config.rho`` = ρ_l, the weight of layer l's linear penalty, within the block (only the output
        layer's can differ, by ``rho_output``)."""
        rho = self._rho_of(l)
        return self._config_as() if rho == self.config.rho else self._config_as(rho=rho)

    def _inertia(self, k: int) -> _P:
        """(p1, p2, p3) of iteration k. 'fista' (docs/methods/tiam.md §4.4, assumption): t_0 = 1,
        t_k = (1 + sqrt(1 + 4 t_{k-1}^2))/2, p_k = (t_{k-1} - 1)/t_k (0 at k = 0, then rising towards 1); every
        p_i that is switched on (non-zero) takes p_k, so am (all zero) stays un-accelerated."""
        c = self.config
        if c.p_schedule == "constant":
            return (c.p1, c.p2, c.p3)
        t_prev, t = 1.0, 1.0
        for _ in range(k):
            t_prev, t = t, 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        pk = (t_prev - 1.0) / t if k else 0.0
        return (pk if c.p1 else 0.0, pk if c.p2 else 0.0, pk if c.p3 else 0.0)

    def _theta_start(self, stored: float) -> float:
        return stored if self.config.theta_warm_start else self.config.theta0

    # -- the box C_l(ε) -----------------------------------------------------------------------------
    def _project_z(self, act: Activation, w: Tensor, a: Tensor, eps: float) -> Tensor:
        """Euclidean projection of w onto {z : h(z) ∈ [a − ε, a + ε]} (element-wise, exact)."""
        m = self.config.projection_margin
        lo_a, hi_a = a - eps + m, a + eps - m
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

    def _project_a(self, act: Activation, w: Tensor, z: Tensor, eps: float) -> Tensor:
        m = self.config.projection_margin
        hz = act.phi(z)
        return torch.clamp(w, min=hz - (eps - m), max=hz + (eps - m))

    def _feasible(self, act: Activation, z: Tensor, a: Tensor, eps: float) -> bool:
        tol = 8 * torch.finfo(z.dtype).eps * (1.0 + float(a.abs().max()) if a.numel() else 1.0)
        return bool(((a - act.phi(z)).abs() <= eps + tol).all())

    def _penalty_z(self, act: Activation, w: Tensor, a: Tensor) -> Tensor:
        """argmin_z (ρ/2)(z − w)² + (ν/2)(a − h(z))², element-wise, for ReLU / leaky ReLU (two candidates)."""
        rho, nu = self.config.rho, self.config.nu
        slope = 0.0 if act.name == "relu" else act._a
        pos = torch.clamp((rho * w + nu * a) / (rho + nu), min=0.0)
        neg = torch.clamp((rho * w + nu * slope * a) / (rho + nu * slope**2), max=0.0)

        def cost(z: Tensor) -> Tensor:
            return rho * (z - w).pow(2) + nu * (a - act.phi(z)).pow(2)

        return torch.where(cost(pos) <= cost(neg), pos, neg)

    # -- objective pieces ---------------------------------------------------------------------------
    @staticmethod
    def _ce_sum(z: Tensor, onehot: Tensor) -> Tensor:
        return -(onehot * tF.log_softmax(z, dim=1)).sum()

    def _local_a(
        self, act: Activation, a: Tensor, z_l: Tensor, z_next: Tensor, v_next_of: Tensor, onehot: Tensor | None
    ) -> float:
        """Terms of F that contain a_l: (ρ/2)‖z_{l+1} − a W_{l+1}ᵀ − b‖², or CE_sum(a W_Lᵀ + b) before an exact
        output (``onehot`` given), (+ ν-penalty)."""
        c = self.config
        val = float(self._ce_sum(v_next_of, onehot)) if onehot is not None else 0.5 * c.rho * _sq(z_next - v_next_of)
        if c.constraint == "penalty":
            val += 0.5 * c.nu * _sq(a - act.phi(z_l))
        return val

    # -- the W block --------------------------------------------------------------------------------
    def _w_metric(self, l: int, a_in: Tensor) -> _WMetric | None:
        """The metric M of W_l's backtracking (``w_metric``): None for the identity (the paper's gradient step);
        'diagonal': M = diag(ρ Σ_rows a² + δ); 'gram': M = ρ aᵀa + δI (S's exact Hessian, so with p1 = p2 the
        first trial θ = 1 is the exact minimiser over W). δ = μ + 1e-10·mean diag keeps M positive definite
        and M ⪰ ∇²S, so θ = 1 always passes the test. The first layer's Gram in full-batch mode is computed
        once and reused while the inputs' fingerprint is unchanged (the same training set every iteration)."""
        c = self.config
        if c.w_metric == "identity":
            return None
        if c.w_metric == "diagonal":
            m = a_in.to(torch.float64).square().sum(dim=0)
            if self.comm.world_size > 1:
                m = self.comm.all_reduce_sum_(m)
            m = c.rho * m
            m += c.mu + 1e-10 * float(m.mean())
            return _WMetric(diag=m.to(a_in.dtype), rho=c.rho, shift=0.0)
        key: tuple[Any, ...] | None = None
        # every input of the cache decision is global (N over all ranks, summed fingerprints), so all ranks hit or
        # miss together and take part in the same collectives
        if l == 0 and self._m_global > 10 * a_in.shape[1]:
            fingerprint = self._sum_scalars(float(a_in.sum()), _sq(a_in))
            key = (self._m_global, a_in.shape[1], a_in.dtype, c.rho, c.mu, *fingerprint)
            cached = self._gram_cache
            if cached is not None and cached[0] == key:
                return cached[1]
        a64 = a_in.to(torch.float64)
        gram = a64.T @ a64
        if self.comm.world_size > 1:
            gram = self.comm.all_reduce_sum_(gram)
        gram *= c.rho
        trace = float(gram.diagonal().sum())
        shift = c.mu + 1e-10 * trace / max(gram.shape[0], 1)
        factor = guarded_cholesky(gram, shift, trace, who=f"{self.name} (w_metric='gram')", fix="lower rho")
        metric = _WMetric(factor=factor, rho=c.rho, shift=shift)
        if key is not None:
            self._gram_cache = (key, metric)
        return metric

    def _w_block(
        self, l: int, a_in: Tensor, z: Tensor, P0: Tensor, p: _P, cnt: _Counters, metric: _WMetric | None = None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """One inertial W-step from W^k (with P0 = a W^kᵀ); returns (W^{k+1}, a W^{k+1}ᵀ, W⁺), or None when
        backtracking fails."""
        c = self.config
        p1, p2, p3 = p
        layer = self.chain[l]
        W = layer.weight.detach()
        b = self._bias(layer).detach()
        delta = (self.state.W_raw[l] if c.history == "raw" else W) - self.state.W_prev[l]
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
        if self.comm.world_size == 1:
            G = grad_w(a_in, z, W_hat, b, c.rho, c.mu, aWt=P_hat)
        else:
            G = self.comm.all_reduce_sum_(c.rho * ((P_hat + b - z).T @ a_in)) + c.mu * W_hat
        # The step direction is G M⁻¹ in the metric M of ``w_metric`` (M = I: the paper's gradient step).
        D = G if metric is None else metric.precondition(G)
        PG = a_in @ D.T
        # S is quadratic: S(û + d) − S(û) − ⟨∇S(û), d⟩ = (ρ/2)‖a dᵀ‖² + (μ/2)‖d‖², with d = (p1 − p2)Δ − D/θ,
        # so every trial is three inner products instead of a pass over the data.
        q = p1 - p2 if use_delta else 0.0
        dd, dg, gg = _sq(delta), _dot(delta, D), _sq(D)
        ee, eg = (_sq(Pd), _dot(Pd, PG)) if Pd is not None else (0.0, 0.0)
        pgpg = _sq(PG)
        ee, eg, pgpg = self._sum_scalars(ee, eg, pgpg)
        if metric is not None:
            # ‖d‖²_M = q²‖Δ‖²_M − (2q/θ)⟨Δ, G⟩ + ⟨D, G⟩/θ² (D M = G)
            dd_m = metric.sq_norm(delta, ee) if q else 0.0
            dg_m, gg_m = _dot(delta, G), _dot(D, G)
        theta = self._theta_start(self.state.theta_W[l])
        for trial in range(c.max_doublings + 1):
            d_sq = q * q * dd - 2 * q / theta * dg + gg / theta**2
            ad_sq = q * q * ee - 2 * q / theta * eg + pgpg / theta**2
            excess = 0.5 * c.rho * ad_sq + 0.5 * c.mu * d_sq
            bound_sq = d_sq if metric is None else q * q * dd_m - 2 * q / theta * dg_m + gg_m / theta**2
            if excess <= 0.5 * theta * bound_sq * (1 + 1e-12):
                cnt.add_trials(trial, theta)
                self.state.theta_W[l] = theta
                W_plus = W_hat + q * delta - D / theta
                P_plus = P_hat - PG / theta
                if Pd is not None:
                    P_plus = P_plus + q * Pd
                W_new = W_plus + p3 * (W_plus - W)
                P_new = P_plus + p3 * (P_plus - P0)
                return W_new, P_new, W_plus
            theta *= c.backtrack_factor
        cnt.add_trials(c.max_doublings, theta)
        cnt.backtrack_failures += 1
        return None

    def _update_W(self, l: int, a_in: Tensor, z: Tensor, p: _P, cnt: _Counters, P0: Tensor | None = None) -> Tensor:
        """W_l ← its triple-inertial step (with retry and safeguard); returns a W_l^{k+1}ᵀ. ``P0`` is a
        precomputed a W_l^kᵀ."""
        c = self.config
        layer = self.chain[l]
        W_old = layer.weight.detach().clone()
        b = self._bias(layer).detach()
        if P0 is None:
            P0 = a_in @ W_old.T
        metric = self._w_metric(l, a_in)
        result = self._w_block(l, a_in, z, P0, p, cnt, metric)
        if result is None and (p[0] or p[1]):
            result = self._w_block(l, a_in, z, P0, (0.0, 0.0, p[2]), cnt, metric)
        if result is not None and c.safeguard and any(p):
            W_new, P_new, _ = result
            fit_old, fit_new = self._sum_scalars(_sq(z - P0 - b), _sq(z - P_new - b))
            old = 0.5 * c.rho * fit_old + 0.5 * c.mu * _sq(W_old)
            new = 0.5 * c.rho * fit_new + 0.5 * c.mu * _sq(W_new)
            if _risen(new, old, z.dtype):
                cnt.safeguard_restarts += 1
                result = self._w_block(l, a_in, z, P0, (0.0, 0.0, 0.0), cnt, metric)
        if result is None:
            W_new, P_new, W_raw = W_old, P0, W_old
        else:
            W_new, P_new, W_raw = result
        self._advance_history(self.state.W_prev, self.state.W_raw, l, W_old, W_raw)
        with torch.no_grad():
            layer.weight.copy_(W_new)
        return P_new

    def _advance_history(
        self,
        prev: list[Tensor],
        raw: list[Tensor],
        l: int,
        old: Tensor,
        raw_new: Tensor,
    ) -> None:
        if self.config.history == "raw":
            prev[l] = raw[l]
            raw[l] = raw_new.clone()
        else:
            prev[l] = old

    # -- one sweep over the blocks ------------------------------------------------------------------
    def _sweep(
        self,
        x: Tensor,
        onehot: Tensor,
        z: list[Tensor],
        a: list[Tensor],
        z_hist: list[_BlockHistory],
        a_hist: list[_BlockHistory],
        eps: float,
        cnt: _Counters,
        P_first: Tensor | None = None,
    ) -> dict[str, float]:
        """One pass over all blocks in place on z, a, in ``block_order``; returns F and residuals. ``P_first`` is
        a precomputed x W_1ᵀ (W_1 as at the start of the sweep)."""
        sw = _Sweep(x, onehot, z, a, z_hist, a_hist, eps, cnt, self._inertia(self.state.iteration))
        if self.config.block_order == "backward":
            v = self._sweep_backward(sw, P_first)
        else:
            v = self._sweep_forward(sw, P_first)
        return self._sweep_info(x, onehot, z, a, v)

    def _sweep_forward(self, sw: _Sweep, P_first: Tensor | None) -> list[Tensor]:
        """The paper's order (docs/methods/tiam.md §4.5): for l = 1..L, W_l, b_l, z_l, a_l. Returns the final
        v_l = a_{l−1}W_lᵀ + 1b_lᵀ (nothing upstream of v_l changes after layer l's z-step)."""
        z, a, p, cnt = sw.z, sw.a, sw.p, sw.cnt
        last = len(self.chain) - 1
        vs: list[Tensor] = []
        for l in range(len(self.chain)):
            a_in = sw.x if l == 0 else a[l - 1]
            if self._exact_output(l):
                z[l] = self._update_exact_output(a_in, sw.onehot, p, cnt)
                vs.append(z[l])
                continue
            with self._layer_penalty(l):
                P = self._update_W(l, a_in, z[l], p, cnt, P_first if l == 0 else None)
            v = P + self._update_b(l, P, z[l], p, cnt)
            vs.append(v)
            z[l] = self._inertial_z(l, sw, v)
            if l < last:
                a[l] = self._inertial_a(l, sw)
        return vs

    def _sweep_backward(self, sw: _Sweep, P_first: Tensor | None) -> list[Tensor]:
        """``block_order='backward'`` (assumption): for l = L..1, z_l, W_l, b_l, a_{l−1}. Every block sees the
        same neighbours' newest values as in the forward order, but the label signal entering at z_L reaches
        W_1 within one sweep instead of travelling back one block per sweep (as dlADMM's backward pass).
        Returns the final v_l = a_{l−1}W_lᵀ + 1b_lᵀ: layer l's inputs change last, in its own a_{l−1}-step."""
        z, a, p, cnt = sw.z, sw.a, sw.p, sw.cnt
        vs: list[Tensor] = []
        for l in reversed(range(len(self.chain))):
            layer = self.chain[l]
            a_in = sw.x if l == 0 else a[l - 1]
            if self._exact_output(l):
                v = self._update_exact_output(a_in, sw.onehot, p, cnt)
            else:
                P0 = P_first if (l == 0 and P_first is not None) else a_in @ layer.weight.detach().T
                z[l] = self._inertial_z(l, sw, P0 + self._bias(layer).detach())
                with self._layer_penalty(l):
                    P = self._update_W(l, a_in, z[l], p, cnt, P0)
                v = P + self._update_b(l, P, z[l], p, cnt)
            if l > 0:
                a[l - 1] = self._inertial_a(l - 1, sw)
                v = a[l - 1] @ layer.weight.detach().T + self._bias(layer).detach()
            if self._exact_output(l):
                z[l] = v
            vs.append(v)
        return vs[::-1]

    def _exact_output(self, l: int) -> bool:
        return self.config.output == "exact" and l == len(self.chain) - 1

    def _update_exact_output(self, a_in: Tensor, onehot: Tensor, p: _P, cnt: _Counters) -> Tensor:
        """``output='exact'``: W_L, then b_L, take triple-inertial majorised steps on
        S = CE_sum(a W_Lᵀ + 1b_Lᵀ) (+ (μ/2)‖W_L‖²); returns v_L = z_L at the new weights.

        The softmax cross-entropy's Hessian in the logits is at most ½I per sample, so ½aᵀa (+ μI) bounds S's
        Hessian in W_L and ½N in b_L. These (with ``output_curvature`` c in place of ½) replace ρaᵀa and ρN of
        the penalty blocks in ``w_metric`` (gram: that matrix; diagonal: its diagonal; identity: the paper's
        Euclidean step). With c = ½ and p1 = p2 the first trial θ = 1 is always accepted (majorise–minimise);
        a smaller c starts from a longer step and lets the backtracking double θ back towards the bound."""
        c = self.config
        l = len(self.chain) - 1
        layer = self.chain[l]
        st = self.state
        is_main = self.comm.rank == 0  # the replicated weight term of S is counted once in the sums over ranks
        b = self._bias(layer).detach()
        with self._config_as(rho=c.output_curvature):
            w_metric = self._w_metric(l, a_in)

        def w_step(W: Tensor, pp: _P, delta: Tensor) -> _AuxStep | None:
            W_tilde, W_hat = W + pp[0] * delta, W + pp[1] * delta
            G = grad_ce_sum(a_in @ W_hat.T + b, onehot).T @ a_in
            if self.comm.world_size > 1:
                G = self.comm.all_reduce_sum_(G)
            G = G + c.mu * W_hat

            def objective(u: Tensor) -> float:
                return float(self._ce_sum(a_in @ u.T + b, onehot)) + (0.5 * c.mu * _sq(u) if is_main else 0.0)

            metric = None
            if w_metric is not None:

                def sq_norm_m(d: Tensor) -> float:
                    (ad_sq,) = self._sum_scalars(_sq(a_in @ d.T))
                    return w_metric.sq_norm(d, ad_sq)

                metric = (w_metric.precondition(G), sq_norm_m)
            (s_hat,) = self._sum_scalars(objective(W_hat))
            theta0 = self._theta_start(st.theta_W[l])
            W_plus, theta = self._backtrack(
                W_tilde, W_hat, G, s_hat, objective, lambda w, t: w, theta0, cnt, metric, replicated=True
            )
            if W_plus is None:
                return None
            st.theta_W[l] = theta
            W_new = W_plus + pp[2] * (W_plus - W)
            f_new, f_old = self._sum_scalars(objective(W_new), objective(W)) if any(pp) else (0.0, 0.0)
            return _AuxStep(W_new, W_plus, f_new, f_old)

        W_new = self._inertial_weight(layer.weight, st.W_prev, st.W_raw, l, p, cnt, w_step)
        P = a_in @ W_new.T
        half_n = c.output_curvature * self._m_global

        def b_step(bb: Tensor, pp: _P, delta: Tensor) -> _AuxStep | None:
            b_tilde, b_hat = bb + pp[0] * delta, bb + pp[1] * delta
            G = grad_ce_sum(P + b_hat, onehot).sum(dim=0)
            if self.comm.world_size > 1:
                G = self.comm.all_reduce_sum_(G)

            def objective(u: Tensor) -> float:
                return float(self._ce_sum(P + u, onehot))

            (s_hat,) = self._sum_scalars(objective(b_hat))
            metric = (G / half_n, lambda d: half_n * _sq(d))
            b_plus, _ = self._backtrack(
                b_tilde, b_hat, G, s_hat, objective, lambda w, t: w, c.theta0, cnt, metric, replicated=True
            )
            if b_plus is None:
                return None
            b_new = b_plus + pp[2] * (b_plus - bb)
            f_new, f_old = self._sum_scalars(objective(b_new), objective(bb)) if any(pp) else (0.0, 0.0)
            return _AuxStep(b_new, b_plus, f_new, f_old)

        return P + self._inertial_weight(self._bias(layer), st.b_prev, st.b_raw, l, p, cnt, b_step)

    def _inertial_weight(
        self,
        param: Tensor,
        prev: list[Tensor],
        raw: list[Tensor],
        l: int,
        p: _P,
        cnt: _Counters,
        step: Callable[[Tensor, _P, Tensor], _AuxStep | None],
    ) -> Tensor:
        """A weight block's triple-inertial ``step`` (retry and safeguard as for the auxiliary blocks) with its
        inertia anchors ``prev[l]`` (and ``raw[l]``); writes the new value into ``param`` and returns it."""
        history_raw = self.config.history == "raw"
        hist = _BlockHistory(prev[l], raw[l] if history_raw else None)
        new = self._inertial_aux(param.detach().clone(), hist, p, cnt, step)
        prev[l] = hist.prev
        if history_raw and hist.raw is not None:
            raw[l] = hist.raw
        with torch.no_grad():
            param.copy_(new)
        return new

    def _update_b(self, l: int, P: Tensor, z: Tensor, p: _P, cnt: _Counters) -> Tensor:
        """b_l ← its exact step θ = ρN (with the safeguard), given P = a_{l−1}W_lᵀ; returns b_l^{k+1}."""
        layer = self.chain[l]
        b_old = self._bias(layer).detach().clone()
        b_new, b_raw = self._b_step(l, P, z, p, b_old)
        if self.config.safeguard and any(p):
            old, new = self._sum_scalars(_sq(z - P - b_old), _sq(z - P - b_new))
            if _risen(new, old, z.dtype):
                cnt.safeguard_restarts += 1
                b_new, b_raw = self._b_step(l, P, z, (0.0, 0.0, 0.0), b_old)
        self._advance_history(self.state.b_prev, self.state.b_raw, l, b_old, b_raw)
        with torch.no_grad():
            self._bias(layer).copy_(b_new)
        return b_new

    def _inertial_z(self, l: int, sw: _Sweep, v: Tensor) -> Tensor:
        """z_l's triple-inertial step given v_l = a_{l−1}W_lᵀ + 1b_lᵀ (and a_l for a hidden layer)."""
        step: Callable[[Tensor, _P, Tensor], _AuxStep | None]
        if l == len(self.chain) - 1:

            def step(u: Tensor, pp: _P, delta: Tensor) -> _AuxStep | None:
                return self._zL_step(u, pp, delta, v, sw.onehot, sw.cnt)

        else:
            act, a_l = self._acts()[l], sw.a[l]

            def step(u: Tensor, pp: _P, delta: Tensor) -> _AuxStep | None:
                return self._z_step(act, u, pp, delta, v, a_l, sw.eps)

        with self._layer_penalty(l):
            return self._inertial_aux(sw.z[l], sw.z_hist[l], sw.p, sw.cnt, step)

    def _inertial_a(self, l: int, sw: _Sweep) -> Tensor:
        """a_l's triple-inertial step given z_l, layer l + 1's weights and z_{l+1} (or the labels, when layer
        l + 1 is an exact output)."""
        act, nxt = self._acts()[l], self.chain[l + 1]
        z_l, W_next, b_next, z_next = sw.z[l], nxt.weight.detach(), self._bias(nxt).detach(), sw.z[l + 1]
        target = sw.onehot if self._exact_output(l + 1) else None

        def step(u: Tensor, pp: _P, delta: Tensor) -> _AuxStep | None:
            return self._a_step(l, act, u, pp, delta, z_l, W_next, b_next, z_next, sw.eps, sw.cnt, target)

        with self._layer_penalty(l + 1):  # a_l enters F through layer l + 1's penalty
            return self._inertial_aux(sw.a[l], sw.a_hist[l], sw.p, sw.cnt, step)

    def _sweep_info(
        self, x: Tensor, onehot: Tensor, z: list[Tensor], a: list[Tensor], v: list[Tensor]
    ) -> dict[str, float]:
        """F and its parts after a sweep, given v_l = a_{l−1}W_lᵀ + 1b_lᵀ at the final iterates."""
        c = self.config
        acts = self._acts()
        n_samples = x.shape[0]
        ce = float(self._ce_sum(z[-1], onehot))
        residuals = [_sq(z_l - v_l) for z_l, v_l in zip(z, v)]
        residual_linear = sum(residuals)
        penalty_linear = sum(self._rho_of(l) * r for l, r in enumerate(residuals))  # Σ_l ρ_l‖z_l − v_l‖²
        weights = sum(_sq(layer.weight.detach()) for layer in self.chain)
        residual_act = sum(_sq(a[l] - acts[l].phi(z[l])) for l in range(len(a)))
        if self.comm.world_size > 1:
            ce, residual_linear, penalty_linear, residual_act, total = self.comm.sum_scalars(
                ce, residual_linear, penalty_linear, residual_act, float(n_samples)
            )
            n_samples = round(total)
        objective = ce + 0.5 * penalty_linear + 0.5 * c.mu * weights
        if c.constraint == "penalty":
            objective += 0.5 * c.nu * residual_act
        return {
            "objective": objective,
            "ce_sum": ce,
            "residual_linear": residual_linear,
            "residual_activation": residual_act,
            "weight_norm": math.sqrt(weights),
            "n_samples": float(n_samples),
        }

    def _b_step(self, l: int, P: Tensor, z: Tensor, p: tuple[float, float, float], b: Tensor) -> tuple[Tensor, Tensor]:
        """b_l: exact step θ = ρN: b⁺ = b̃ − mean_rows(P + b̂ − z); returns (b^{k+1}, b⁺)."""
        c = self.config
        delta = (self.state.b_raw[l] if c.history == "raw" else b) - self.state.b_prev[l]
        b_tilde = b + p[0] * delta
        b_hat = b + p[1] * delta
        # θ = ρN, so b⁺ = b̃ − ∇S_b(b̂)/(ρN), with ∇S_b = ρ Σ_rows(P + 1b̂ᵀ − z) (see grad_b)
        if self.comm.world_size == 1:
            b_plus = b_tilde - (P + b_hat - z).mean(dim=0)
        else:
            column_sums = self.comm.all_reduce_sum_((P + b_hat - z).sum(dim=0))
            b_plus = b_tilde - column_sums / self._m_global
        return b_plus + p[2] * (b_plus - b), b_plus

    def _inertial_aux(
        self,
        u: Tensor,
        hist: _BlockHistory,
        p: _P,
        cnt: _Counters,
        step: Callable[[Tensor, _P, Tensor], _AuxStep | None],
    ) -> Tensor:
        """Run one auxiliary block's ``step`` with the retry (p1 = p2 = 0 when backtracking fails) and the
        safeguard (p = 0 when the block's local objective rises), then advance its inertia anchors."""
        c = self.config
        anchor = hist.raw if (c.history == "raw" and hist.raw is not None) else u
        delta = anchor - hist.prev
        out = step(u, p, delta)
        if out is None and (p[0] or p[1]):
            out = step(u, (0.0, 0.0, p[2]), delta)
        if out is not None and c.safeguard and any(p) and _risen(out.f_new, out.f_old, u.dtype):
            cnt.safeguard_restarts += 1
            out = step(u, (0.0, 0.0, 0.0), delta)
        if c.history == "raw":
            hist.prev = anchor
            hist.raw = u if out is None else out.raw
        else:
            hist.prev = u
        return u if out is None else out.new

    def _backtrack(
        self,
        u_tilde: Tensor,
        u_hat: Tensor,
        grad: Tensor,
        s_hat: float,
        objective: Callable[[Tensor], float],
        prox: Callable[[Tensor, float], Tensor],
        theta: float,
        cnt: _Counters,
        metric: tuple[Tensor, Callable[[Tensor], float]] | None = None,
        replicated: bool = False,
    ) -> tuple[Tensor | None, float]:
        """u⁺ = prox(ũ − ∇S(û)/θ, θ), θ ← factor·θ until S(u⁺) ≤ S(û) + ⟨∇S(û), d⟩ + θ/2‖d‖² (d = u⁺ − û).
        ``metric`` = (∇S(û)M⁻¹, ‖·‖²_M) runs the same test in a metric M (``prox`` must then be the prox in M).
        ``replicated``: u is a weight block, identical on every rank (its gradient already reduced), so only
        ``objective`` (this rank's share of S) is summed over ranks."""
        c = self.config
        direction, sq_norm = (grad, _sq) if metric is None else metric
        for trial in range(c.max_doublings + 1):
            u_plus = prox(u_tilde - direction / theta, theta)
            d = u_plus - u_hat
            if replicated:
                (s_plus,), grad_d, d_sq = self._sum_scalars(objective(u_plus)), _dot(grad, d), sq_norm(d)
            else:
                s_plus, grad_d, d_sq = self._sum_scalars(objective(u_plus), _dot(grad, d), sq_norm(d))
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

    def _z_step(self, act: Activation, z: Tensor, p: _P, delta: Tensor, v: Tensor, a: Tensor, eps: float) -> _AuxStep:
        """z_l (l < L): S = (ρ/2)‖z − v‖², θ = ρ (exact): z⁺ = prox(z̃ − ẑ + v); prox = Π onto C_l(ε) in z
        (or the two-candidate ν-penalty prox). The extrapolated z is re-projected given a_l."""
        c = self.config
        w = (z + p[0] * delta) - (z + p[1] * delta) + v
        z_plus = self._project_z(act, w, a, eps) if c.constraint == "box" else self._penalty_z(act, w, a)
        z_new = z_plus + p[2] * (z_plus - z)
        if c.constraint == "box" and p[2]:
            z_new = self._project_z(act, z_new, a, eps)
        if not (c.safeguard and any(p)):
            return _AuxStep(z_new, z_plus, 0.0, 0.0)  # a p = 0 step is a descent step: nothing to compare
        if c.constraint == "box" and self.comm.world_size > 1:
            infeasible = 0.0 if self._feasible(act, z, a, eps) else 1.0
            f_new, f_old, infeasible = self._sum_scalars(
                0.5 * c.rho * _sq(z_new - v), 0.5 * c.rho * _sq(z - v), infeasible
            )
            f_old = math.inf if infeasible else f_old
        elif c.constraint == "box":
            f_new = 0.5 * c.rho * _sq(z_new - v)
            # an old point outside C_l(ε) (ε just shrank) has F = +inf: any feasible point is a descent
            f_old = 0.5 * c.rho * _sq(z - v) if self._feasible(act, z, a, eps) else math.inf
        else:
            f_new = 0.5 * c.rho * _sq(z_new - v) + 0.5 * c.nu * _sq(a - act.phi(z_new))
            f_old = 0.5 * c.rho * _sq(z - v) + 0.5 * c.nu * _sq(a - act.phi(z))
            f_new, f_old = self._sum_scalars(f_new, f_old)
        return _AuxStep(z_new, z_plus, f_new, f_old)

    def _a_step(
        self,
        l: int,
        act: Activation,
        a: Tensor,
        p: _P,
        delta: Tensor,
        z_l: Tensor,
        W_next: Tensor,
        b_next: Tensor,
        z_next: Tensor,
        eps: float,
        cnt: _Counters,
        onehot: Tensor | None = None,
    ) -> _AuxStep | None:
        """a_l: S = (ρ/2)‖z_{l+1} − aWᵀ − 1bᵀ‖², prox = box [h(z_l) ± ε] (or the ν-penalty), backtracking.
        With ``onehot`` (layer l + 1 is an exact output): S = CE_sum(aWᵀ + 1bᵀ), whose Hessian is bounded by
        ½ WᵀW (the softmax cross-entropy's Hessian in the logits is at most ½I), which takes the place of ρWᵀW."""
        c = self.config
        a_tilde, a_hat = a + p[0] * delta, a + p[1] * delta
        if onehot is not None:
            target = onehot

            def objective(u: Tensor) -> float:
                return float(self._ce_sum(u @ W_next.T + b_next, target))

            grad = grad_ce_sum(a_hat @ W_next.T + b_next, target) @ W_next
            curvature = c.output_curvature
        else:

            def objective(u: Tensor) -> float:
                return 0.5 * c.rho * _sq(u @ W_next.T + b_next - z_next)

            grad = grad_a(a_hat, z_next, W_next, b_next, c.rho)
            curvature = c.rho
        (s_hat,) = self._sum_scalars(objective(a_hat))

        hz = act.phi(z_l)
        metric: tuple[Tensor, Callable[[Tensor], float]] | None = None
        if c.a_metric == "gram":
            # M = ρ WᵀW + δI, S's exact Hessian (plus a tiny δ): with p1 = p2 the first trial θ = 1 is the exact
            # minimiser of the a-subproblem. Prox in M: u = (θ w M + ν h(z))(θM + νI)⁻¹.
            W64 = W_next.to(torch.float64)
            M = curvature * (W64.T @ W64)
            M.diagonal().add_(1e-10 * float(M.diagonal().sum()) / max(M.shape[0], 1))
            eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
            factor = guarded_cholesky(M, 0.0, float(M.diagonal().sum()), who=f"{self.name} (a_metric='gram')",
                                      fix="lower rho")
            direction = torch.cholesky_solve(grad.T.to(torch.float64), factor).T.to(grad.dtype)
            M_w = M.to(a.dtype)

            def sq_norm_m(d: Tensor) -> float:
                return _dot(d @ M_w, d)

            metric = (direction, sq_norm_m)

            def prox(w: Tensor, theta: float) -> Tensor:
                rhs = theta * (w.to(torch.float64) @ M) + c.nu * hz.to(torch.float64)
                return torch.linalg.solve(theta * M + c.nu * eye, rhs.T).T.to(w.dtype)

        else:

            def prox(w: Tensor, theta: float) -> Tensor:
                if c.constraint == "box":
                    return self._project_a(act, w, z_l, eps)
                return (theta * w + c.nu * hz) / (theta + c.nu)

        theta0 = self._theta_start(self.state.theta_a[l])
        a_plus, theta = self._backtrack(a_tilde, a_hat, grad, s_hat, objective, prox, theta0, cnt, metric)
        if a_plus is None:
            return None
        self.state.theta_a[l] = theta
        a_new = a_plus + p[2] * (a_plus - a)
        if c.constraint == "box" and p[2]:
            a_new = self._project_a(act, a_new, z_l, eps)
        if not (c.safeguard and any(p)):
            return _AuxStep(a_new, a_plus, 0.0, 0.0)
        f_new = self._local_a(act, a_new, z_l, z_next, a_new @ W_next.T + b_next, onehot)
        f_old = self._local_a(act, a, z_l, z_next, a @ W_next.T + b_next, onehot)
        f_new, f_old = self._sum_scalars(f_new, f_old)
        return _AuxStep(a_new, a_plus, f_new, f_old)

    def _zL_step(self, z: Tensor, p: _P, delta: Tensor, v: Tensor, onehot: Tensor, cnt: _Counters) -> _AuxStep | None:
        """z_L: S = CE_sum, prox of (ρ/2)‖z − v_L‖²; or mDLAM's FISTA on the whole subproblem from z̃."""
        c = self.config
        rho = c.rho
        z_tilde, z_hat = z + p[0] * delta, z + p[1] * delta

        def local(u: Tensor) -> float:
            return float(self._ce_sum(u, onehot)) + 0.5 * rho * _sq(u - v)

        if c.zL_solver == "fista":

            def grad_ce(u: Tensor) -> Tensor:
                return grad_ce_sum(u, onehot)

            def prox_q(y: Tensor, t: float) -> Tensor:
                return (y + t * rho * v) / (1 + t * rho)

            z_plus, iters, _ = projected_fista(
                grad_ce, 1.0 / c.fista_step, prox_q, z_tilde, c.fista_max_iter, c.fista_tol
            )
            cnt.fista_iters += iters
        else:
            grad = grad_ce_sum(z_hat, onehot)
            (s_hat,) = self._sum_scalars(float(self._ce_sum(z_hat, onehot)))

            def prox(w: Tensor, theta: float) -> Tensor:
                return (theta * w + rho * v) / (theta + rho)

            def ce(u: Tensor) -> float:
                return float(self._ce_sum(u, onehot))

            theta0 = self._theta_start(self.state.theta_zL)
            z_opt, theta = self._backtrack(z_tilde, z_hat, grad, s_hat, ce, prox, theta0, cnt)
            if z_opt is None:
                return None
            z_plus = z_opt
            self.state.theta_zL = theta
        z_new = z_plus + p[2] * (z_plus - z)
        if not (c.safeguard and any(p)):
            return _AuxStep(z_new, z_plus, 0.0, 0.0)
        f_new, f_old = self._sum_scalars(local(z_new), local(z))
        return _AuxStep(z_new, z_plus, f_new, f_old)

    # -- auxiliary-variable initialisation ----------------------------------------------------------
    def _forward_aux(self, x: Tensor, onehot: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """z_l, a_l from a forward pass; z_L = 2y − 1 (``zL_init='target'``) or the logits."""
        z: list[Tensor] = []
        a: list[Tensor] = []
        h = x
        for layer in self.chain:
            u = layer.linear(h)
            z.append(u)
            if layer.activation is not None:
                h = layer.activation.phi(u)
                a.append(h)
        if self.config.zL_init == "target" and self.config.output == "penalty":
            z[-1] = 2 * onehot - 1
        return z, a

    def _is_full(self, idx: Tensor | None, n: int) -> bool:
        if self.comm.world_size > 1:
            return self._is_full_global(idx)
        mode = self.config.mode
        if mode == "full":
            return True
        if mode == "minibatch":
            return False
        if idx is None:
            return False
        if self.state.initialised is not None and self.state.initialised.numel() == n:
            return True
        return int(idx.max()) + 1 == n and int(idx.min()) == 0 and bool(torch.unique(idx).numel() == n)

    def _is_full_global(self, idx: Tensor | None) -> bool:
        """Full mode under data parallelism: the shards together cover the dataset indices 0..N−1 exactly
        (the trainer's shards of one global batch never share an index)."""
        mode = self.config.mode
        if mode == "minibatch":
            return False
        if idx is None:
            raise ValueError(f"{self.name} needs the batch's dataset indices (idx) when run on several processes")
        top = self.comm.all_reduce_max_(torch.tensor([float(idx.max()) + 1 if idx.numel() else 0.0]))
        count, unique = self.comm.sum_scalars(float(idx.numel()), float(torch.unique(idx).numel()))
        covers = count == unique == float(top[0])
        if mode == "full" and not covers:
            raise ValueError(
                f"{self.name}: mode='full' on several processes needs full batches (--batch-size 0), so that every "
                "sample's auxiliary variables stay on one process; use mode=minibatch for mini-batches"
            )
        return covers

    def _ensure_full_state(self, x: Tensor, onehot: Tensor, idx: Tensor) -> None:
        st = self.state
        size = int(idx.max()) + 1
        if st.initialised is None:
            st.initialised = torch.zeros(0, dtype=torch.bool, device=idx.device)
        if st.initialised.numel() < size:
            grow = size - st.initialised.numel()
            st.initialised = torch.cat([st.initialised, torch.zeros(grow, dtype=torch.bool, device=idx.device)])
            widths_z = [int(layer.weight.shape[0]) for layer in self.chain]
            widths_a = widths_z[:-1]
            raw = self.config.history == "raw"

            def grown(ts: list[Tensor], widths: list[int]) -> list[Tensor]:
                if not ts:
                    return [x.new_zeros(size, w) for w in widths]
                return [torch.cat([t, t.new_zeros(grow, t.shape[1])]) for t in ts]

            st.z, st.z_prev = grown(st.z, widths_z), grown(st.z_prev, widths_z)
            st.a, st.a_prev = grown(st.a, widths_a), grown(st.a_prev, widths_a)
            if raw:
                st.z_raw, st.a_raw = grown(st.z_raw, widths_z), grown(st.a_raw, widths_a)
        fresh = ~st.initialised[idx]
        every = self.config.resync_every
        if every and st.iteration and st.iteration % every == 0:
            fresh = torch.ones_like(fresh)  # re-synchronise every row with the network (and drop its inertia)
        if bool(fresh.any()):
            rows = idx[fresh]
            with torch.no_grad():
                z0, a0 = self._forward_aux(x[fresh], onehot[fresh])
            for store in (st.z, st.z_prev, st.z_raw):
                for l, t in enumerate(z0[: len(store)]):
                    store[l][rows] = t
            for store in (st.a, st.a_prev, st.a_raw):
                for l, t in enumerate(a0[: len(store)]):
                    store[l][rows] = t
            st.initialised[rows] = True

    # -- the contract -------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        c = self.config
        if y.dtype.is_floating_point:
            raise ValueError(f"{self.name} trains classifiers with integer labels (cross-entropy on z_L)")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}; pass matching batches")
        if idx is not None and idx.shape[0] != x.shape[0]:
            raise ValueError(f"idx has {idx.shape[0]} entries but the batch has {x.shape[0]} samples")
        dtype, device = self.dtype, self.device
        with torch.no_grad():
            x_flat = self.chain[0].apply_pre(x.to(device=device, dtype=dtype))
            if not bool(torch.isfinite(x_flat).all()):
                raise ValueError(f"{self.name}: the input batch contains NaN or inf; clean the data")
            out_features = int(self.chain[-1].weight.shape[0])
            if int(y.min()) < 0 or int(y.max()) >= out_features:
                raise ValueError(f"labels must lie in [0, {out_features}); got range [{int(y.min())}, {int(y.max())}]")
            onehot = tF.one_hot(y.to(device).long(), out_features).to(dtype)
            # the declared loss at the start of the step, by the forward pass; x W_1ᵀ is reused by the W_1 block
            P_first = x_flat @ self.chain[0].weight.T
            h = P_first + self._bias(self.chain[0])
            for prev, layer in zip(self.chain[:-1], self.chain[1:]):
                assert prev.activation is not None
                h = layer.linear(prev.activation.phi(h))
            loss = float(evaluate_loss(self.loss, h, y.to(device)))
            cnt = _Counters()
            self._m_global = self.global_batch_size(int(x.shape[0]))
            if idx is None and c.mode == "full" and self.comm.world_size == 1:
                idx = torch.arange(x.shape[0], device=device)
            full = self._is_full(idx, x.shape[0])
            if full:
                assert idx is not None
                idx = idx.to(device)
                self._ensure_full_state(x_flat, onehot, idx)
                st = self.state
                z = [t[idx] for t in st.z]
                a = [t[idx] for t in st.a]
                z_hist = [
                    _BlockHistory(st.z_prev[l][idx], st.z_raw[l][idx] if st.z_raw else None) for l in range(len(z))
                ]
                a_hist = [
                    _BlockHistory(st.a_prev[l][idx], st.a_raw[l][idx] if st.a_raw else None) for l in range(len(a))
                ]
                eps = self._eps(st.iteration)
                with self._penalties_at(st.iteration):
                    info = self._sweep(x_flat, onehot, z, a, z_hist, a_hist, eps, cnt, P_first)
                for l in range(len(z)):
                    st.z[l][idx] = z[l]
                    st.z_prev[l][idx] = z_hist[l].prev
                    z_raw = z_hist[l].raw
                    if st.z_raw and z_raw is not None:
                        st.z_raw[l][idx] = z_raw
                for l in range(len(a)):
                    st.a[l][idx] = a[l]
                    st.a_prev[l][idx] = a_hist[l].prev
                    a_raw = a_hist[l].raw
                    if st.a_raw and a_raw is not None:
                        st.a_raw[l][idx] = a_raw
                st.iteration += 1
            else:
                z, a = self._forward_aux(x_flat, onehot)
                raw = c.history == "raw"
                z_hist = [_BlockHistory(t.clone(), t.clone() if raw else None) for t in z]
                a_hist = [_BlockHistory(t.clone(), t.clone() if raw else None) for t in a]
                info = {}
                for sweep in range(c.minibatch_sweeps):
                    eps = self._eps(sweep)
                    with self._penalties_at(sweep):
                        info = self._sweep(
                            x_flat, onehot, z, a, z_hist, a_hist, eps, cnt, P_first if sweep == 0 else None
                        )
                self.state.iteration += 1
        info.update(
            {
                "eps": eps,
                "full_batch": 1.0 if full else 0.0,
                "backtracks": float(cnt.backtracks),
                "backtrack_failures": float(cnt.backtrack_failures),
                "safeguard_restarts": float(cnt.safeguard_restarts),
                "theta_max": cnt.theta_max,
            }
        )
        if c.zL_solver == "fista":
            info["fista_iters"] = float(cnt.fista_iters)
        if not math.isfinite(info["objective"]):
            raise FloatingPointError(f"{self.name}: the objective became non-finite; lower rho or theta0")
        self.steps_taken += 1
        return StepStats(loss=loss, info=info)

    # -- state --------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        st = self.state
        if self.comm.world_size > 1 and st.initialised is not None:
            return self._gathered_extra_state()

        def clone(ts: list[Tensor]) -> list[Tensor]:
            return [t.detach().clone() for t in ts]

        return {
            "W_prev": clone(st.W_prev),
            "b_prev": clone(st.b_prev),
            "W_raw": clone(st.W_raw),
            "b_raw": clone(st.b_raw),
            "theta_W": list(st.theta_W),
            "theta_a": list(st.theta_a),
            "theta_zL": st.theta_zL,
            "iteration": st.iteration,
            "z": clone(st.z),
            "a": clone(st.a),
            "z_prev": clone(st.z_prev),
            "a_prev": clone(st.a_prev),
            "z_raw": clone(st.z_raw),
            "a_raw": clone(st.a_raw),
            "initialised": None if st.initialised is None else st.initialised.clone(),
        }

    def _gathered_extra_state(self) -> dict[str, Any]:
        """The full-mode state with every rank's sample rows merged (a collective: all ranks call it). Each
        dataset index is initialised on exactly one rank, so a sum of the zero-masked shards is exact."""
        st = self.state
        assert st.initialised is not None
        size_t = self.comm.all_reduce_max_(torch.tensor([float(st.initialised.numel())]))
        size = int(size_t[0])
        mask = torch.zeros(size, dtype=torch.bool, device=st.initialised.device)
        mask[: st.initialised.numel()] = st.initialised
        owners = self.comm.all_reduce_sum_(mask.to(torch.float64))

        def merged(ts: list[Tensor]) -> list[Tensor]:
            out = []
            for t in ts:
                full = t.new_zeros(size, t.shape[1])
                full[: t.shape[0]] = t.detach()
                full[~mask] = 0.0
                out.append(self.comm.all_reduce_sum_(full, op="checkpoint"))
            return out

        state = {
            "W_prev": [t.detach().clone() for t in st.W_prev],
            "b_prev": [t.detach().clone() for t in st.b_prev],
            "W_raw": [t.detach().clone() for t in st.W_raw],
            "b_raw": [t.detach().clone() for t in st.b_raw],
            "theta_W": list(st.theta_W),
            "theta_a": list(st.theta_a),
            "theta_zL": st.theta_zL,
            "iteration": st.iteration,
        }
        for key in ("z", "a", "z_prev", "a_prev", "z_raw", "a_raw"):
            state[key] = merged(getattr(st, key))
        state["initialised"] = owners > 0
        return state

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        expected = set(_STATE_KEYS)
        if set(state) != expected:
            raise ValueError(
                f"{self.name} state has keys {sorted(state)}, expected {sorted(expected)}; "
                "was it saved by another method or version?"
            )
        st = self.state
        for key in ("W_prev", "b_prev", "W_raw", "b_raw", "z", "a", "z_prev", "a_prev", "z_raw", "a_raw"):
            setattr(st, key, [t.detach().clone() for t in state[key]])
        st.theta_W = [float(t) for t in state["theta_W"]]
        st.theta_a = [float(t) for t in state["theta_a"]]
        st.theta_zL = float(state["theta_zL"])
        st.iteration = int(state["iteration"])
        init = state["initialised"]
        st.initialised = None if init is None else init.clone()


@register
class AM(TIAM):
    """AM (mDLAM base, p=0): the TIAM code with p1 = p2 = p3 = 0, the baseline that isolates the inertia."""

    name = "am"
    Config = AMConfig
    config: AMConfig
    reporting_name = "AM (mDLAM base, p=0)"
    paper = (
        "Wang, Li, Zhao, Accelerated Gradient-free Neural Network Training by Multi-convex Alternating "
        "Optimization, Neurocomputing 2022 (the base TIAM builds on)"
    )
