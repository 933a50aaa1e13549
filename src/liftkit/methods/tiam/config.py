"""TIAM's hyperparameters and the per-iteration schedules derived from them (ε_k, the inertia p_k and the
penalty continuation ρ_k, ν_k).

The string switches are ``typing.Literal`` fields: the command-line parser reads their choices from the type,
and :meth:`TIAMConfig.validate` checks every one of them from the same annotation.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal

from liftkit.methods.base import MethodConfig

__all__ = ["AMConfig", "Inertia", "Penalties", "TIAMConfig", "eps_at", "inertia_at", "penalties_at"]

#: (p1, p2, p3): the centre of the proximal term, the gradient point, the post-update extrapolation
Inertia = tuple[float, float, float]


@dataclass
class TIAMConfig(MethodConfig):
    """TIAM hyperparameters (docs/methods/tiam.md §6). The defaults are the ``tuned`` preset, the full-batch setting
    chosen on validation data; the ``paper`` preset restores the specification's values (ρ, μ, the box constraint,
    θ0, ×2, ≤ 10 doublings from the mDLAM code; p1 = p2 = p3 = 0.3, assumption), see
    :mod:`liftkit.methods.tiam.presets`. Every (assumption) of docs/methods/tiam.md §4 is a field here."""

    rho: float = 0.3  # weight of the linear-constraint penalties (tuned; paper preset 1e-3: official code, mDLAM)
    rho_output: float | None = None  # weight of the output layer's penalty (ρ/2)‖z_L − v_L‖²; None: ρ (assumption)
    mu: float = 1.0  # weight regulariser (μ/2)‖W‖² (tuned; paper preset 0.05: official code, mDLAM)
    eps0: float = 100.0  # initial half-width of C_l(ε)
    eps_decay: float = 0.5  # ε ← max(decay·ε, eps_min) after every full-batch iteration
    eps_min: float = 1e-3
    # tuned: only the 3rd inertia, switched on (non-zero), on the 'fista' schedule; paper preset 0.3 each, constant
    p1: float = 0.0  # 1st inertia: centre of the proximal term (assumption)
    p2: float = 0.0  # 2nd inertia: gradient point (assumption)
    p3: float = 0.3  # 3rd inertia: post-update extrapolation (assumption)
    p_schedule: Literal["constant", "fista"] = "fista"  # 'fista': every non-zero p_i follows p_k = (t_{k-1} - 1)/t_k
    safeguard: bool = True  # redo a block with p = 0 when its local objective rises (assumption)
    # 'extrapolated': Δ = u^k − u^{k−1}; 'raw': Δ between raw prox outputs u⁺
    history: Literal["extrapolated", "raw"] = "extrapolated"
    zL_solver: Literal["prox_step", "fista"] = "prox_step"  # 'prox_step' (assumption) | 'fista' (mDLAM)
    # 'target': z_L = 2y − 1 (mDLAM) | 'forward': the logits (always, for output='exact')
    zL_init: Literal["target", "forward"] = "target"
    theta0: float = 1.0  # first trial θ of every backtracking call (mDLAM)
    backtrack_factor: float = 2.0
    max_doublings: int = 40  # tuned (paper preset 10: mDLAM)
    theta_warm_start: bool = False  # start each block's backtracking at its last accepted θ (assumption)
    # 'box': C_l(ε) (paper preset) | 'penalty': (ν/2)‖a_l − h(z_l)‖² (tuned; assumption; ReLU and leaky ReLU)
    constraint: Literal["box", "penalty"] = "penalty"
    nu: float = 3.0  # weight of the 'penalty' constraint (tuned; paper preset 1e-3)
    init: Literal["pytorch", "mdlam"] = "pytorch"  # 'pytorch': the model's own weights | 'mdlam': W, b ~ N(0, 0.1²)
    mode: Literal["auto", "full", "minibatch"] = "auto"
    minibatch_sweeps: int = 1
    projection_margin: float = 1e-9  # shrink the bounds of C_l(ε) inward (mDLAM)
    fista_step: float = 4.0  # step of zL_solver='fista' (mDLAM)
    fista_max_iter: int = 500
    fista_tol: float = 1e-4  # relative-change stop of the shared projected_fista
    # metric of the W backtracking: 'identity' (paper) | 'diagonal' | 'gram' (tuned; assumption)
    w_metric: Literal["identity", "diagonal", "gram"] = "gram"
    # metric of the a backtracking: 'identity' (paper) | 'gram' (tuned; penalty only; assumption)
    a_metric: Literal["identity", "gram"] = "gram"
    penalty_growth: float = 1.0  # ρ and ν are multiplied by growth^k at iteration k (continuation; assumption)
    penalty_growth_max: float = 100.0  # cap on that factor
    # 'penalty': z_L is an auxiliary block tied to v_L by (ρ/2)‖z_L − v_L‖² (spec, paper preset) | 'exact'
    # (tuned): z_L = v_L is kept exactly and CE acts on the network's own logits; W_L, b_L, a_{L-1} take majorised
    # CE steps (assumption)
    output: Literal["penalty", "exact"] = "exact"
    # curvature c of the exact output's majorised steps (metrics c·aᵀa, c·N, c·W_LᵀW_L); 0.5 (paper preset) bounds
    # the softmax cross-entropy's Hessian, so θ = 1 is always accepted; a smaller c (tuned 0.1) tries longer steps
    # first (assumption)
    output_curvature: float = 0.1
    # full mode: every this many iterations, reset z_l, a_l (and their inertia) to a forward pass of the current
    # network, as at the start; 0 = never, the paper's schedule (assumption)
    resync_every: int = 0
    # 'forward': l = 1..L, blocks W_l b_l z_l a_l (paper) | 'backward': l = L..1, z_l W_l b_l a_{l-1} (assumption)
    block_order: Literal["forward", "backward"] = "forward"

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
        self._check_literals()
        self._check_combinations()
        for name in ("penalty_growth", "penalty_growth_max"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 1.0):
                raise ValueError(f"{name} must be a finite number >= 1, got {v!r}")

    def _check_literals(self) -> None:
        """Every ``Literal`` field holds one of its choices (the annotation is the one list of them)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if typing.get_origin(hints[f.name]) is Literal:
                self._choice(f.name, typing.get_args(hints[f.name]))

    def _check_combinations(self) -> None:
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
        if self.a_metric == "gram" and self.constraint != "penalty":
            raise ValueError(
                "a_metric='gram' needs constraint='penalty' (the box prox has no closed form in that metric); "
                "with constraint=box also set a_metric=identity, or use constraint=penalty"
            )


@dataclass
class AMConfig(TIAMConfig):
    """``am``: the TIAM code with the three inertias switched off (p1 = p2 = p3 = 0); every other default is
    TIAM's, so that the two compare on one base setting."""

    p1: float = 0.0
    p2: float = 0.0
    p3: float = 0.0
    p_schedule: Literal["constant", "fista"] = "constant"  # no inertia to schedule

    def validate(self) -> None:
        super().validate()
        if self.p1 or self.p2 or self.p3:
            raise ValueError("am has p1 = p2 = p3 = 0 by definition; use method tiam for inertia")


@dataclass(frozen=True)
class Penalties:
    """The penalty weights one sweep runs with: ρ of the linear constraints, ``rho_output`` of the output layer's
    (None: ρ) and ν of the activation penalty. ``penalties_at`` scales the configured ones per iteration."""

    rho: float
    nu: float
    rho_output: float | None

    def rho_of(self, l: int, n_layers: int) -> float:
        """ρ_l, the weight of layer l's penalty (ρ_l/2)‖z_l − a_{l−1}W_lᵀ − 1b_lᵀ‖² (0-based l of ``n_layers``):
        ``rho_output`` for the output layer when set, else ρ."""
        return self.rho_output if (self.rho_output is not None and l == n_layers - 1) else self.rho


def penalties_at(config: TIAMConfig, k: int) -> Penalties:
    """ρ and ν of iteration k: ρ_k = ρ·min(growth^k, cap) and the same factor on ν and ``rho_output`` (the
    quadratic-penalty continuation; with growth = 1, the configured values)."""
    growth, cap = config.penalty_growth, config.penalty_growth_max
    factor = cap if k * math.log(growth) >= math.log(cap) else growth**k  # no float overflow for large k
    if factor == 1.0:
        return Penalties(config.rho, config.nu, config.rho_output)
    rho_output = None if config.rho_output is None else config.rho_output * factor
    return Penalties(config.rho * factor, config.nu * factor, rho_output)


def eps_at(config: TIAMConfig, k: int) -> float:
    """ε_k = max(ε_0 · decay^k, ε_min), the half-width of C_l(ε) at iteration (or mini-batch sweep) k."""
    return max(config.eps0 * config.eps_decay**k, config.eps_min)


def inertia_at(config: TIAMConfig, k: int) -> Inertia:
    """(p1, p2, p3) of iteration k. 'fista' (docs/methods/tiam.md §4.4, assumption): t_0 = 1,
    t_k = (1 + sqrt(1 + 4 t_{k-1}^2))/2, p_k = (t_{k-1} - 1)/t_k (0 at k = 0, then rising towards 1); every
    p_i that is switched on (non-zero) takes p_k, so am (all zero) stays un-accelerated."""
    if config.p_schedule == "constant":
        return (config.p1, config.p2, config.p3)
    t_prev, t = 1.0, 1.0
    for _ in range(k):
        t_prev, t = t, 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
    pk = (t_prev - 1.0) / t if k else 0.0
    return (pk if config.p1 else 0.0, pk if config.p2 else 0.0, pk if config.p3 else 0.0)
