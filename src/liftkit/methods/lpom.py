r"""LPOM: lifted proximal operator machines (serial block coordinate descent).

Li, Fang, Lin, "Lifted Proximal Operator Machines", AAAI 2019 (arXiv 1811.01501), and Li, Xiao, Fang, Dai, Xu,
Lin, "Training Neural Networks by Lifted Proximal Operator Machines", IEEE TPAMI 2021
(DOI 10.1109/TPAMI.2020.3048430). Specification: METHODS.md §2. No official code exists; where the papers are
silent the choices below are (assumption)s, each switchable through :class:`LPOMConfig`, and results carry the
reporting name ``LPOM (reconstructed schedule)``.

Model (row-major here, the PyTorch layout; the papers are column-major). The network is a chain of L linear
layers, layer j computing ``X^{j+1} = φ_j(X^j W_jᵀ + 1 b_jᵀ)``; X⁰ is the flattened input batch (m × n₀). The
lifted variables are X¹..X^L (the output X^L included: the papers apply φ at the output). LPOM minimises, per
mini-batch (everything summed, METHODS.md §0.3),

.. math::

    E(W, X) = \ell(X^L, D)
      + \sum_{j=0}^{L-1} \mu_j \sum_{\mathrm{elem}} B_{\varphi_j}(X^j W_j^\top + 1b_j^\top,\, X^{j+1}),
    \qquad B_\varphi(u, x) = F(x) + F^*(u) - xu \ge 0,

with ℓ = ½‖X^L − D‖² (one-hot D, or float targets for autoencoders) or, as an option, summed softmax
cross-entropy. B is the Fenchel–Young gap of φ (``liftkit.activations``); it vanishes exactly at the forward pass.

Per mini-batch (§2.5):

1. **Initialise** X by a forward pass (``x_init='forward'``), or from a per-sample cache kept across epochs
   (``'persistent'``, needs ``idx``).
2. **X-phase**: ``x_sweeps`` sweeps (default L, i.e. the paper's n−1) over the lifted layers, in order
   1 → L (``x_sweep_order='forward'``, the paper's) or L → 1 (``'backward'``), stopping early once every block
   moves by at most ``x_tol`` relative. A forward-ordered sweep from the forward initialisation moves only the
   output (the hidden blocks already sit at their minimisers), so sweep s first moves X^{L−s+1}.

   * Hidden block k (subproblem (24)): divided by μ_{k−1} it is f(X) + S(X) with f = F − x²/2 of φ_{k−1},
     A = X^{k−1}W_{k−1}ᵀ + b, c = μ_k/μ_{k−1} and
     S(X) = ½‖X − A‖² + c[Σ F*_k(XW_kᵀ + b_k) − ⟨X^{k+1}, XW_kᵀ + b_k⟩],
     ∇S(X) = X − A + c(φ_k(XW_kᵀ + b_k) − X^{k+1})W_k, Lipschitz with L_S = 1 + cκ_k‖W_k‖₂².
     ``x_solver='fista'``: projected FISTA with step 1/L_S and prox_{f/L_S} (a projection for ReLU, identity,
     hardtanh; closed form for leaky ReLU) — the default for these φ, because the paper's iteration collapses
     training once cκ‖W‖₂² grows past 1 (PROTOTYPES.md). ``'fixed_point'``: the paper's φ-only iteration (26),
     X ← φ_{k−1}(A − c(φ_k(XW_kᵀ + b_k) − X^{k+1})W_k), with Theorem 2's ρ logged and a damping safeguard
     (selectable for every φ). ``'fista_prox'``: FISTA with the exact element-wise prox (bisection) for any φ —
     the default for sigmoid, tanh, ELU and softplus, because (26) diverged for tanh in the unit tests here
     (METHODS.md §2.3 names (26) as that default; it is an (assumption) and this is the switch).
   * Output block: MSE has the closed form X^L = prox_{t f}((D + μA)/(1 + μ)), t = μ/(1 + μ) (for ReLU
     max(0, (μA + D)/(μ + 1)); for a bare output layer (μA + D)/(μ + 1)); cross-entropy iterates (29),
     X ← φ(A − (softmax(X) − D)/μ), ``output_iters`` times.

3. **W-phase** (all layers independent; §2.4): ``w_iters`` accelerated steps in the data metric,
   W̄ ← Y − (1/β)(φ(X̄Ȳᵀ) − X^{j+1})ᵀ(X̄ᵀ)⁺ with β = κ(φ_j) and the pseudo-inverse built from a float64 Cholesky
   of the m×m batch Gram (``pinv='cholesky'``, guard ε = ``ridge_rel``·tr/m) or an SVD (``'svd'``). When a layer
   has more samples than inputs (m > n_j+1) the Gram is on the feature side and the step is an exact
   least-squares fit of the batch; with m ≥ n_j+1 it interpolates the batch. Near m ≈ n_j+1 either Gram is
   ill-conditioned (the smallest singular value of an m × (n_j+1) matrix vanishes as m/(n_j+1) → 1), so every
   layer with m > ``guard_ratio``·(n_j+1) (default 0.5) gets the guard ``ridge_rel_feature`` (0.1) instead of
   ``ridge_rel`` ((assumption): the spec's 1e-10 let near-dead units blow the weights up, on the feature side of
   a 64-32-10 net and on the batch side of the 100 → 50 layer of 784-400-200-100-50-10, docs/results/lpom.md).
   The first step reuses the pre-activations cached by the X-phase.

The method is derivative-free: the updates use φ only (plus φ's cheap prox for FISTA). Inference is the plain
forward pass of the user's ``nn.Sequential``, which is trained in place.

Model support: any chain of ``nn.Linear`` layers each followed by one of the eight activations of
``liftkit.activations`` (mixed activations allowed); a last layer without activation is treated as φ = identity
at the output. Conv layers are rejected.

Diagnostics (``StepStats.info``): ``energy_init`` (E at the forward initialisation, = ℓ), ``energy`` (after the
X-phase), ``energy_w`` (after the W-phase, ``monitor='full'`` only), per-layer ``x_res_k`` (final inner relative
change of block k's solver), ``x_iters_k``, ``w_norm_j`` (‖W_j‖₂, warm-started power iteration), ``rho_k``
(Theorem 2, ``fixed_point`` only), ``sweeps``, ``x_iters_total``, ``w_iters``, and ``x_not_converged`` = 1 when a
hidden solver ends above ``collapse_tol`` (a one-time warning names the fix).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from liftkit.activations import Activation
from liftkit.distributed import Communicator
from liftkit.methods.base import Method, MethodConfig, StepStats, evaluate_loss, register, targets_for
from liftkit.methods.lpom_shards import Shards
from liftkit.models import as_chain
from liftkit.solvers import batch_pinv, guarded_cholesky, step_change_norms

__all__ = ["LPOM", "LPOMConfig", "LPOMState", "LiftedChain"]

X_SOLVERS = ("auto", "fista", "fixed_point", "fista_prox")
SWEEP_ORDERS = ("forward", "backward")
PINV_KINDS = ("cholesky", "svd")
W_SIDES = ("auto", "batch", "feature")
X_INITS = ("forward", "persistent")
MONITORS = ("off", "basic", "full")

_IDENTITY = Activation("identity")
_POWER_COLD_ITERS = 20
_SPECTRAL_SAFETY = 1.05


@dataclass
class LPOMConfig(MethodConfig):
    """LPOM hyperparameters (METHODS.md §2.8). Defaults: μ = 5, 5 FISTA iterations, L sweeps, one W step — the
    best setting of the PROTOTYPES.md sweep on MNIST 784-500-10 at batch 100 (μ ∈ {2, 5, 20, 50},
    T_x ∈ {5, 10, 20}, T_w ∈ {1, 3}), T_x re-tuned on the validation split; results in docs/results/lpom.md."""

    #: penalty weight μ, one value for every layer or one per linear layer (μ_j weighs layer j's penalty)
    mu: float | tuple[float, ...] = 5.0
    #: hidden X-block solver: 'auto' = 'fista' for ReLU/leaky ReLU/identity/hardtanh, 'fista_prox' otherwise
    #: (the paper's 'fixed_point' (26) collapsed training for tanh too, see docs/results/lpom.md)
    x_solver: str = "auto"
    #: T_x: iterations per hidden X-block solve (validation-tuned, docs/results/lpom.md: 3, 5 and 10 within
    #: 0.1 point on MNIST 784-500-10 after 3 epochs; 5 costs half of 10)
    x_iters: int = 5
    #: S_x: X sweeps per mini-batch; 0 = the number of linear layers L (the paper's n−1)
    x_sweeps: int = 0
    #: sweep order: 'forward' (paper, 1 → L) or 'backward' (L → 1; one sweep reaches every layer)
    x_sweep_order: str = "forward"
    #: stop an X-solver (and the sweeps) once ‖ΔX‖ ≤ x_tol‖X‖
    x_tol: float = 1e-4
    #: iterations of (29) for the cross-entropy output block (MSE uses a closed form)
    output_iters: int = 20
    #: T_w: accelerated W steps per layer and mini-batch
    w_iters: int = 1
    #: side of the pseudo-inverse Gram: 'auto' (batch side when m ≤ n_j+1), 'batch' or 'feature'
    w_side: str = "auto"
    #: pseudo-inverse: float64 Cholesky of the Gram with a relative guard, or float64 SVD
    pinv: str = "cholesky"
    #: relative guard ε = ridge_rel·tr(X̄X̄ᵀ)/m of the Cholesky pseudo-inverse (SVD: relative rcond), batch side
    ridge_rel: float = 1e-10
    #: the guard of a layer whose batch is not small against its inputs (m > guard_ratio·(n_j+1)): its W-step
    #: (nearly) interpolates the batch through an ill-conditioned Gram, and near-dead units blow the weights up
    #: ((assumption); validation on 784-400-200-100-50-10: 1e-3 / 1e-2 / 1e-1 → 87.1 / 90.3 / 92.8 %, see docs)
    ridge_rel_feature: float = 0.1
    #: layers with m > guard_ratio·(n_j+1) get ridge_rel_feature; 1 = only feature-side Grams (m > n_j+1)
    guard_ratio: float = 0.5
    #: repeat (X-phase, W-phase) this many times per mini-batch
    outer_passes: int = 1
    #: X initialisation: 'forward' pass, or a per-sample cache kept across epochs ('persistent', needs idx)
    x_init: str = "forward"
    #: warm-started power iterations per hidden layer and mini-batch for the FISTA step 1/(1 + cκ‖W‖₂²)
    #: (the first call runs 20 from a fixed start; the monitored ‖W‖₂ after the W-phase adds one more)
    power_iters: int = 3
    #: a hidden X-solver ending above this relative change is reported as not converged
    collapse_tol: float = 1e-2
    #: 'basic': energy after the X-phase, residuals, norms; 'full': also the energy after the W-phase; 'off'
    monitor: str = "basic"

    def validate(self) -> None:
        self._positive("mu", "x_tol", "ridge_rel", "ridge_rel_feature", "collapse_tol", "guard_ratio")
        if isinstance(self.mu, tuple) and len(self.mu) == 0:
            raise ValueError("mu must be a positive number or one positive number per linear layer, got ()")
        self._choice("x_solver", X_SOLVERS)
        self._choice("x_sweep_order", SWEEP_ORDERS)
        self._choice("w_side", W_SIDES)
        self._choice("pinv", PINV_KINDS)
        self._choice("x_init", X_INITS)
        self._choice("monitor", MONITORS)
        self._int_at_least("x_iters", 1)
        self._int_at_least("x_sweeps", 0)
        self._int_at_least("output_iters", 1)
        self._int_at_least("w_iters", 1)
        self._int_at_least("outer_passes", 1)
        self._int_at_least("power_iters", 1)


@dataclass
class LPOMState:
    """Persistent LPOM state: warm power-iteration vectors (one per layer) and the optional per-sample X cache."""

    power_vectors: list[Tensor | None] = field(default_factory=list)
    x_cache: list[Tensor] = field(default_factory=list)
    x_seen: Tensor | None = None


@dataclass
class BlockResult:
    """The outcome of one block solve: the new block value, inner iterations and the final relative change."""

    value: Tensor
    iters: int
    residual: float


def _rel_change(new: Tensor, old: Tensor) -> float:
    d = float((new - old).norm().item())
    o = float(old.norm().item())
    return d / o if o > 0 else (0.0 if d == 0 else math.inf)


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
        return x @ w.t() if b is None else torch.addmm(b, x, w.t())

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
        return _rel_change(new, old) if self.shards is None else self.shards.rel_change(new, old)

    def _global(self, value: float) -> float:
        return value if self.shards is None else self.shards.sum_float(value)

    # -- objective -----------------------------------------------------------------------------------------
    def data_loss(self, out: Tensor, d: Tensor) -> float:
        return self._global(self._data_loss(out, d))

    def _data_loss(self, out: Tensor, d: Tensor) -> float:
        if self.loss == "ce":
            return float(-(d * tF.log_softmax(out, dim=1)).sum(dtype=torch.float64).item())
        return 0.5 * float((out - d).pow(2).sum(dtype=torch.float64).item())

    def energy(self, xs: Sequence[Tensor], pre: Sequence[Tensor], d: Tensor) -> float:
        """E = ℓ(X^L, D) + Σ_j μ_j Σ B_{φ_j}(U_j, X^{j+1}), with the given pre-activations U_j."""
        total = self._data_loss(xs[self.L], d)
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
    ) -> BlockResult:
        """Minimise μ_{k−1}ΣB_{φ_{k−1}}(A, X) + μ_kΣB_{φ_k}(XW_kᵀ + b_k, X^{k+1}) [+ (γ/2)‖X − anchor‖²] over
        X = X^k, warm-started at ``x0``. ``w_norm`` ≥ ‖W_k‖₂ sets the FISTA step.

        With γ > 0 (async proximal BCD, §2.7) the block, divided by μ_{k−1} + γ, is s·f(X) + ½‖X − A'‖² + c'[…]
        with A' = (μA + γX̄)/(μ + γ), s = μ/(μ + γ), c' = μ_k/(μ + γ): the same solvers with f → s·f."""
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
            return _fused_fista(
                act_in, act_out, a, x_next, w, b, c, s, lip, x0, iters, tol,
                sq_sum=None if self.shards is None else self.shards.sum_,
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
            y = a - c * (act_out.phi(self.preact(x, w, b)) - x_next) @ w
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
        """``iters`` APG steps on Φ_j(W̄) = ΣF*(X̄W̄ᵀ) − ⟨X^{j+1}, X̄W̄ᵀ⟩ in the metric ‖X̄(W̄ − Y)ᵀ‖ (§2.4):
        W̄ ← Y − (1/β)Rᵀ(X̄ᵀ)⁺ᵀ, R = φ(X̄Yᵀ) − X^{j+1}, β = κ(φ_j). ``u0`` = X̄W̄ᵀ if already computed.

        With γ > 0 (async, §2.7) each step minimises the linearisation plus (γ/2μ_j)‖W̄ − W̄ᵏ‖² in addition to
        the metric: W̄⁺ = W̄ᵏ − (1/β)(R − βX̄(Y − W̄ᵏ)ᵀ)ᵀ(X̄X̄ᵀ + (γ/(βμ_j))I)⁻¹X̄ (Woodbury, m×m solve).
        Returns new tensors (W, b); the inputs are left untouched."""
        act = self.acts[j]
        beta = act.kappa
        has_bias = b is not None
        x_bar = torch.cat([x_in, torch.ones_like(x_in[:, :1])], dim=1) if has_bias else x_in
        m = x_bar.shape[0] if self.shards is None else self.shards.rows(x_bar)
        extra = 0.0
        if gamma > 0.0:
            trace = self._global(float(x_bar.pow(2).sum(dtype=torch.float64).item()))
            if trace > 0:
                extra = (gamma / (beta * self.mu[j])) * m / trace
        apply_pinv: Callable[[Tensor], Tensor]
        if self.shards is not None:
            feature = side == "feature" or (side == "auto" and m > x_bar.shape[1])
            near = feature or m > self.guard_ratio * x_bar.shape[1]
            guard = ridge_rel_feature if (near and ridge_rel_feature is not None) else ridge_rel
            apply_pinv = self.shards.pinv(
                x_bar, m, side=side, pinv=pinv, guard=guard + extra, rcond=ridge_rel, extra=extra
            )
        elif pinv == "svd" and extra == 0.0:
            apply_pinv = _PinvApply(x_bar, batch_pinv(x_bar.t(), side="svd", rcond=ridge_rel))
        else:
            feature = side == "feature" or (side == "auto" and m > x_bar.shape[1])
            near = feature or m > self.guard_ratio * x_bar.shape[1]
            guard = ridge_rel_feature if (near and ridge_rel_feature is not None) else ridge_rel
            apply_pinv = _PinvApply.cholesky(x_bar, side, guard + extra)
        # W̄ ← Y − (1/β) Rᵀ(X̄ᵀ)⁺ᵀ, with (X̄ᵀ)⁺ᵀ = (X̄X̄ᵀ + εI)⁻¹X̄ applied to R (see _PinvApply).
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
            step = apply_pinv(r).div_(beta)
            w_new = base_w - (step[:, :-1] if has_bias else step)
            b_new = None if base_b is None else base_b - step[:, -1]
            w_prev, b_prev = w_cur, b_cur
            w_cur, b_cur = w_new, b_new
            th_prev, th_cur = th_cur, 0.5 * (math.sqrt(th_cur**4 + 4.0 * th_cur**2) - th_cur**2)
        return w_cur, b_cur


class _PinvApply:
    """R ↦ Rᵀ(X̄ᵀ)⁺ᵀ, the W-step direction (out × (n_j+1)), for a fixed batch X̄ (m × (n_j+1)).

    Cholesky form (METHODS.md §2.4, §0.4): only the Gram and its factor are float64. Batch side (m ≤ n_j+1):
    (K + εI)⁻¹ with K = X̄X̄ᵀ (m×m) is applied to R (out right-hand sides, not the n_j+1 of an explicit
    pseudo-inverse), then Zᵀ X̄ in the working dtype. Feature side: (X̄ᵀX̄ + εI)⁻¹ applied to X̄ᵀR. The guard
    ε = ridge_rel·tr(X̄ᵀX̄)/m is that of :func:`liftkit.solvers.batch_pinv`, which provides the SVD form.
    """

    def __init__(self, x_bar: Tensor, pinv: Tensor | None = None) -> None:
        self.x_bar = x_bar
        self.pinv = pinv  # explicit (X̄ᵀ)⁺ (m × (n_j+1)), SVD form
        self.factor: Tensor | None = None
        self.batch_side = True

    @classmethod
    def cholesky(cls, x_bar: Tensor, side: str, ridge_rel: float) -> _PinvApply:
        out = cls(x_bar)
        m, n1 = x_bar.shape
        out.batch_side = side == "batch" or (side == "auto" and m <= n1)
        x64 = x_bar.to(torch.float64)
        gram = x64 @ x64.t() if out.batch_side else x64.t() @ x64
        trace = float(gram.diagonal().sum().item())
        if trace == 0.0:
            out.pinv = torch.zeros_like(x_bar)
            return out
        out.factor = guarded_cholesky(gram, ridge_rel * trace / m, trace)
        return out

    def __call__(self, r: Tensor) -> Tensor:
        if self.pinv is not None:
            return r.t() @ self.pinv
        assert self.factor is not None
        if self.batch_side:
            z = torch.cholesky_solve(r.to(torch.float64), self.factor).to(r.dtype)
            return z.t() @ self.x_bar
        rhs = (self.x_bar.t() @ r).to(torch.float64)
        return torch.cholesky_solve(rhs, self.factor).to(r.dtype).t()


def _fused_fista(
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
) -> BlockResult:
    """Projected/proximal FISTA on s·f(X) + S(X), S(X) = ½‖X − A‖² + c[ΣF*(XWᵀ + b) − ⟨X^{k+1}, XWᵀ + b⟩]
    (METHODS.md §2.3), with the gradient step folded into one affine update per iteration:

        V − ∇S(V)/L = (1 − 1/L)V + A/L − (c/L)(φ(VWᵀ + b) − X^{k+1})W .

    The same iterates as :func:`liftkit.solvers.projected_fista` with ∇S (tested against it), but about half
    the element-wise passes over the m × n_k block: the X-phase of a wide layer is bound by those passes, not
    by its thin (n_k × n_{k+1}) products, and with several threads each pass also pays a synchronisation."""
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
        r = act_out.phi(LiftedChain.preact(v, w, b)).sub_(x_next)
        y = torch.add(step_a, v, alpha=1.0 - step).addmm_(r, w, alpha=-step * c)
        if projection:
            if lo != -math.inf or hi != math.inf:
                y.clamp_(min=None if lo == -math.inf else lo, max=None if hi == math.inf else hi)
            x_new = y
        else:
            x_new = act_in.prox_f(y, t)
        theta_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * theta * theta))
        dx = x_new - x
        v = torch.add(x_new, dx, alpha=(theta - 1.0) / theta_new)
        dnorm, xnorm = step_change_norms(dx, x, sq_sum)
        x, theta = x_new, theta_new
        it += 1
        rel = dnorm / xnorm if xnorm > 0.0 else (0.0 if dnorm == 0.0 else math.inf)
        if dnorm <= tol * xnorm:
            break
    return BlockResult(x, it, rel)


def _warm_power(w: Tensor, v: Tensor | None, iters: int) -> tuple[float, Tensor]:
    """‖W‖₂ by power iteration on WᵀW, warm-started from the previous right singular vector estimate."""
    if v is None:
        gen = torch.Generator(device="cpu").manual_seed(0x5EED)
        v = torch.randn(w.shape[1], generator=gen, dtype=w.dtype).to(w.device)
        v = v / v.norm()
        iters = max(iters, _POWER_COLD_ITERS)
    for _ in range(iters):
        z = w.t() @ (w @ v)
        nz = float(z.norm().item())
        if nz == 0.0 or not math.isfinite(nz):
            break
        v = z / nz
    return float((w @ v).norm().item()), v


@register
class LPOM(Method):
    """Serial LPOM (METHODS.md §2.2–§2.5): forward init, X sweeps, then one APG W-phase per mini-batch."""

    name = "lpom"
    Config = LPOMConfig
    config: LPOMConfig
    default_loss = "mse"
    supported_losses = ("mse", "ce")
    # The papers apply φ at the output too (METHODS.md §2.2): a model built from a spec string ends in the same
    # activation as its hidden layers (ReLU by default).
    model_output_activation = "hidden"
    reporting_name = "LPOM (reconstructed schedule)"
    paper = (
        "Li, Fang, Lin, Lifted Proximal Operator Machines, AAAI 2019; Li et al., Training Neural Networks by "
        "Lifted Proximal Operator Machines, IEEE TPAMI 2021"
    )
    default_batch_size = 100
    supports_data_parallel = True

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.lifted = LiftedChain(model, self.name, self.config.mu, self.loss)
        self.lifted.guard_ratio = self.config.guard_ratio
        c = self.config
        for k in range(1, self.lifted.L):
            solver = self.lifted.resolve_solver(c.x_solver, k)
            if solver == "fista" and not self.lifted.acts[k - 1].cheap_prox:
                raise ValueError(
                    f"x_solver='fista' needs a closed-form prox, which {self.lifted.acts[k - 1].name} (layer "
                    f"{k - 1}) lacks; use x_solver='fista_prox', 'fixed_point' or 'auto'"
                )
        self.state = LPOMState(power_vectors=[None] * self.lifted.L)
        self._warned: set[str] = set()

    def set_comm(self, comm: Communicator) -> None:
        """Data-parallel LPOM (METHODS.md §7, :mod:`liftkit.methods.lpom_shards`): X stays on the shard, the
        stopping norms, energies and W-step Gram/right-hand sides are all-reduced."""
        super().set_comm(comm)
        self.lifted.shards = Shards(comm) if comm.world_size > 1 else None

    def single_process_only(self) -> str | None:
        if self.config.x_init == "persistent":
            return (
                f"{self.name} with x_init=persistent runs in a single process only (a sample's cached X lives on "
                "the process that last held it); use x_init=forward under torchrun"
            )
        return None

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def sweeps(self) -> int:
        return self.config.x_sweeps or self.lifted.L

    def _input(self, x: Tensor) -> Tensor:
        x0 = self.lifted.chain[0].apply_pre(x)
        if x0.ndim != 2 or x0.shape[1] != self.lifted.widths[0]:
            raise ValueError(
                f"{self.name}: the first linear layer expects {self.lifted.widths[0]} features per sample, got a "
                f"batch of shape {tuple(x.shape)}; start the model with nn.Flatten() or reshape the input"
            )
        return x0.to(self.dtype)

    def _check_finite_input(self, x0: Tensor, loss: float) -> None:
        # A NaN/inf input makes the forward loss non-finite, so the (costly) element scan runs only then.
        if not math.isfinite(loss) and not bool(torch.isfinite(x0).all()):
            raise ValueError(f"{self.name}: the input batch contains NaN or inf values; clean the data")

    def _targets(self, y: Tensor, m: int) -> Tensor:
        if y.shape[0] != m:
            raise ValueError(f"{self.name}: {m} inputs but {y.shape[0]} targets in the batch")
        d = targets_for(y, self.lifted.widths[-1], self.dtype).to(self.device)
        if d.shape[1] != self.lifted.widths[-1]:
            raise ValueError(
                f"{self.name}: targets have {d.shape[1]} features per sample but the output layer has "
                f"{self.lifted.widths[-1]}"
            )
        if self.loss == "ce" and y.dtype.is_floating_point:
            raise ValueError("cross-entropy needs integer class labels; use loss='mse' for float targets")
        return d

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _w_norms(self, ws: Sequence[Tensor], layers: Sequence[int], iters: int) -> dict[int, float]:
        out: dict[int, float] = {}
        for j in layers:
            sigma, v = _warm_power(ws[j], self.state.power_vectors[j], iters)
            self.state.power_vectors[j] = v
            out[j] = sigma
        return out

    # -- initialisation ----------------------------------------------------------------------------------------
    def _init_x(
        self, x0: Tensor, idx: Tensor | None, ws: Sequence[Tensor], bs: Sequence[Tensor | None]
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """X and the pre-activations at the start of the step, and the forward output (for the loss)."""
        xs, pre = self.lifted.forward(x0, ws, bs)
        out = xs[-1]
        if self.config.x_init == "persistent":
            if idx is None:
                raise ValueError(f"{self.name}: x_init='persistent' needs the batch's dataset indices (idx)")
            idx = idx.to(torch.long).cpu()
            self._grow_cache(int(idx.max().item()) + 1, xs)
            seen = self.state.x_seen
            assert seen is not None
            mask = seen[idx].to(x0.device)
            for k in range(1, self.lifted.L + 1):
                cached = self.state.x_cache[k - 1][idx].to(x0.device)
                xs[k] = torch.where(mask[:, None], cached, xs[k])
            for j in range(1, self.lifted.L):
                pre[j] = self.lifted.preact(xs[j], ws[j], bs[j])
        return xs, pre, out

    def _grow_cache(self, size: int, xs: Sequence[Tensor]) -> None:
        st = self.state
        have = 0 if st.x_seen is None else st.x_seen.shape[0]
        if size <= have:
            return
        new_seen = torch.zeros(size, dtype=torch.bool, device="cpu")  # a host-resident cache
        if st.x_seen is not None:
            new_seen[:have] = st.x_seen
        caches = []
        for k in range(1, self.lifted.L + 1):
            c = torch.zeros(size, xs[k].shape[1], dtype=xs[k].dtype, device="cpu")
            if st.x_cache:
                c[:have] = st.x_cache[k - 1]
            caches.append(c)
        st.x_seen, st.x_cache = new_seen, caches

    def _store_x(self, idx: Tensor, xs: Sequence[Tensor]) -> None:
        idx = idx.to(torch.long).cpu()
        for k in range(1, self.lifted.L + 1):
            self.state.x_cache[k - 1][idx] = xs[k].detach().cpu()
        assert self.state.x_seen is not None
        self.state.x_seen[idx] = True

    # -- phases ---------------------------------------------------------------------------------------------
    def _block_order(self) -> list[int]:
        blocks = list(range(1, self.lifted.L + 1))
        return blocks[::-1] if self.config.x_sweep_order == "backward" else blocks

    def update_x_block(
        self,
        k: int,
        xs: list[Tensor],
        pre: list[Tensor],
        d: Tensor,
        ws: Sequence[Tensor],
        bs: Sequence[Tensor | None],
        w_norms: Mapping[int, float],
    ) -> BlockResult:
        """Solve block k in place in ``xs``, refreshing the cached pre-activation U_k it feeds."""
        c = self.config
        lifted = self.lifted
        if k == lifted.L:
            res = lifted.solve_output(xs[k], pre[k - 1], d, iters=c.output_iters, tol=c.x_tol)
        else:
            res = lifted.solve_hidden(
                k, xs[k], pre[k - 1], xs[k + 1], ws[k], bs[k], w_norms[k],
                solver=lifted.resolve_solver(c.x_solver, k), iters=c.x_iters, tol=c.x_tol,
            )
        xs[k] = res.value
        if k < lifted.L:
            pre[k] = lifted.preact(xs[k], ws[k], bs[k])
        return res

    def x_phase(
        self,
        xs: list[Tensor],
        pre: list[Tensor],
        d: Tensor,
        ws: Sequence[Tensor],
        bs: Sequence[Tensor | None],
        info: dict[str, float],
        sweeps: int | None = None,
    ) -> None:
        """The X-phase of §2.5 on ``xs`` (in place): ``sweeps`` sweeps with early stopping."""
        c = self.config
        w_norms = self._x_phase_norms(ws, info)
        total = 0
        last: dict[int, BlockResult] = {}
        done = 0
        for _ in range(sweeps if sweeps is not None else self.sweeps):
            moved = 0.0
            for k in self._block_order():
                old = xs[k]
                res = self.update_x_block(k, xs, pre, d, ws, bs, w_norms)
                last[k] = res
                total += res.iters
                moved = max(moved, self.lifted.rel_change(xs[k], old))
            done += 1
            if moved <= c.x_tol:
                break
        self._report_x_phase(info, last, total, done)

    def _x_phase_norms(self, ws: Sequence[Tensor], info: dict[str, float]) -> dict[int, float]:
        """Safety-scaled ‖W^k‖₂ of the hidden blocks (their FISTA steps); logs Theorem 2's ρ_k when a block uses
        the paper's fixed point, whose contraction it decides."""
        c = self.config
        lifted = self.lifted
        hidden = list(range(1, lifted.L))
        w_norms = {k: s * _SPECTRAL_SAFETY for k, s in self._w_norms(ws, hidden, c.power_iters).items()}
        if any(lifted.resolve_solver(c.x_solver, k) == "fixed_point" for k in hidden):
            for k in hidden:
                info[f"rho_{k}"] = lifted.rho(k, ws[k])
        return w_norms

    def _report_x_phase(self, info: dict[str, float], last: dict[int, BlockResult], total: int, sweeps: int) -> None:
        """Log the X-phase's sweeps, iterations and final residuals, and flag (once, with the fix) a hidden
        solver that ended above ``collapse_tol``: the silent-collapse trap of METHODS.md §2.3."""
        c = self.config
        lifted = self.lifted
        info["sweeps"] = float(sweeps)
        info["x_iters_total"] = float(total)
        worst = 0.0
        for k, res in last.items():
            info[f"x_res_{k}"] = res.residual
            info[f"x_iters_{k}"] = float(res.iters)
            if k < lifted.L:
                worst = max(worst, res.residual if math.isfinite(res.residual) else math.inf)
        info["x_not_converged"] = 1.0 if worst > c.collapse_tol else 0.0
        if worst > c.collapse_tol:
            solver = {lifted.resolve_solver(c.x_solver, k) for k in range(1, lifted.L)}
            fix = (
                "the paper's fixed point (26) does not contract here (see rho_k); use x_solver='fista' "
                "(ReLU-type) or 'fista_prox'"
                if "fixed_point" in solver
                else "raise x_iters"
            )
            self._warn_once(
                "x_not_converged",
                f"{self.name}: the hidden X-solver ended with relative change {worst:.2e} > collapse_tol="
                f"{c.collapse_tol:g}; training may collapse: {fix}",
            )

    def w_phase(
        self, xs: Sequence[Tensor], pre: Sequence[Tensor], ws: Sequence[Tensor], bs: Sequence[Tensor | None]
    ) -> list[tuple[Tensor, Tensor | None]]:
        """All W-blocks (independent given X); returns the new (W, b) of every layer."""
        c = self.config
        return [
            self.lifted.solve_w(
                j, xs[j], xs[j + 1], ws[j], bs[j], pre[j],
                iters=c.w_iters, side=c.w_side, pinv=c.pinv, ridge_rel=c.ridge_rel,
                ridge_rel_feature=c.ridge_rel_feature,
            )
            for j in range(self.lifted.L)
        ]

    def commit(self, new: Sequence[tuple[Tensor, Tensor | None]]) -> None:
        with torch.no_grad():
            for lin, (w, b) in zip(self.lifted.linears, new):
                lin.weight.copy_(w)
                if lin.bias is not None and b is not None:
                    lin.bias.copy_(b)

    # -- the step -----------------------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        c = self.config
        lifted = self.lifted
        with torch.no_grad():
            x0 = self._input(x)
            d = self._targets(y, x0.shape[0])
            ws, bs = lifted.weights(), lifted.biases()
            xs, pre, out = self._init_x(x0, idx, ws, bs)
            loss = float(evaluate_loss(self.loss, out, y.to(out.device)))
            self._check_finite_input(x0, loss)
            info: dict[str, float] = {}
            if c.monitor != "off":
                # At the forward initialisation every penalty vanishes (tested), so E = ℓ there.
                info["energy_init"] = (
                    lifted.energy(xs, pre, d) if c.x_init == "persistent" else lifted.data_loss(xs[-1], d)
                )
            for p in range(c.outer_passes):
                if p > 0:
                    ws, bs = lifted.weights(), lifted.biases()
                    pre = [lifted.preact(xs[j], ws[j], bs[j]) for j in range(lifted.L)]
                self.x_phase(xs, pre, d, ws, bs, info)
                if c.monitor != "off":
                    info["energy"] = lifted.energy(xs, pre, d)
                self.commit(self.w_phase(xs, pre, ws, bs))
            self._finish(xs, d, idx, info)
        self.steps_taken += 1
        return StepStats(loss=loss, info=info)

    def _finish(self, xs: Sequence[Tensor], d: Tensor, idx: Tensor | None, info: dict[str, float]) -> None:
        c = self.config
        lifted = self.lifted
        ws, bs = lifted.weights(), lifted.biases()
        if c.monitor == "full":
            pre = [lifted.preact(xs[j], ws[j], bs[j]) for j in range(lifted.L)]
            info["energy_w"] = lifted.energy(xs, pre, d)
        if c.monitor != "off":
            for j, sigma in self._w_norms(ws, range(lifted.L), 1).items():
                info[f"w_norm_{j}"] = sigma
                if not math.isfinite(sigma):
                    self._warn_once(
                        "nonfinite", f"{self.name}: layer {j} weights became non-finite; lower mu or raise ridge_rel"
                    )
            info["w_iters"] = float(c.w_iters)
        if c.x_init == "persistent" and idx is not None:
            self._store_x(idx, xs)

    # -- state ---------------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        st = self.state
        return {
            "power_vectors": [None if v is None else v.clone() for v in st.power_vectors],
            "x_cache": [t.clone() for t in st.x_cache],
            "x_seen": None if st.x_seen is None else st.x_seen.clone(),
        }

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        vectors = list(state.get("power_vectors", []))
        if len(vectors) != self.lifted.L:
            raise ValueError(
                f"{self.name}: state has {len(vectors)} power vectors but the model has {self.lifted.L} layers"
            )
        self.state = LPOMState(
            power_vectors=[None if v is None else v.to(self.device, self.dtype).clone() for v in vectors],
            x_cache=[t.clone() for t in state.get("x_cache", [])],
            x_seen=None if state.get("x_seen") is None else state["x_seen"].clone(),
        )
