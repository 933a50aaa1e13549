r"""LPOM: lifted proximal operator machines (serial block coordinate descent).

Li, Fang, Lin, "Lifted Proximal Operator Machines", AAAI 2019 (arXiv 1811.01501), and Li, Xiao, Fang, Dai, Xu,
Lin, "Training Neural Networks by Lifted Proximal Operator Machines", IEEE TPAMI 2021
(DOI 10.1109/TPAMI.2020.3048430). Specification: docs/methods/lpom.md. No official code exists; where the papers are
silent the choices below are (assumption)s, each switchable through :class:`LPOMConfig`, and results carry the
reporting name ``LPOM (reconstructed schedule)``.

Model (row-major here, the PyTorch layout; the papers are column-major). The network is a chain of L linear
layers, layer j computing ``X^{j+1} = φ_j(X^j W_jᵀ + 1 b_jᵀ)``; X⁰ is the flattened input batch (m × n₀). The
lifted variables are X¹..X^L (the output X^L included: the papers apply φ at the output). LPOM minimises, per
mini-batch (everything summed, docs/methods/conventions.md §3),

.. math::

    E(W, X) = \ell(X^L, D)
      + \sum_{j=0}^{L-1} \mu_j \sum_{\mathrm{elem}} B_{\varphi_j}(X^j W_j^\top + 1b_j^\top,\, X^{j+1}),
    \qquad B_\varphi(u, x) = F(x) + F^*(u) - xu \ge 0,

with ℓ = ½‖X^L − D‖² (one-hot D, or float targets for autoencoders) or, as an option, summed softmax
cross-entropy. B is the Fenchel–Young gap of φ (``liftkit.activations``); it vanishes exactly at the forward pass.

Per mini-batch (docs/methods/lpom.md §5):

1. **Initialise** X by a forward pass (``x_init='forward'``), or from a per-sample cache kept across epochs
   (``'persistent'``, needs ``idx``).
2. **X-phase**: ``x_sweeps`` sweeps (default 1; the paper's n−1 = L) over the lifted layers, in order
   L → 1 (``x_sweep_order='backward'``, the default) or 1 → L (``'forward'``, the paper's), stopping early once
   every block moves by at most ``x_tol`` relative. A forward-ordered sweep from the forward initialisation moves
   only the output (the hidden blocks already sit at their minimisers), so sweep s first moves X^{L−s+1}. Those no-op
   solves are skipped: from the forward initialisation a hidden block is solved only once a neighbour has moved
   (:meth:`LPOM.sweep_x`), and every solve starts from the cached pre-activation of its warm start.

   * Hidden block k (subproblem (24)): divided by μ_{k−1} it is f(X) + S(X) with f = F − x²/2 of φ_{k−1},
     A = X^{k−1}W_{k−1}ᵀ + b, c = μ_k/μ_{k−1} and
     S(X) = ½‖X − A‖² + c[Σ F*_k(XW_kᵀ + b_k) − ⟨X^{k+1}, XW_kᵀ + b_k⟩],
     ∇S(X) = X − A + c(φ_k(XW_kᵀ + b_k) − X^{k+1})W_k, Lipschitz with L_S = 1 + cκ_k‖W_k‖₂².
     ``x_solver='fista'``: projected FISTA with step 1/L_S and prox_{f/L_S} (a projection for ReLU, identity,
     hardtanh; closed form for leaky ReLU) — the default for these φ, because the paper's iteration collapses
     training once cκ‖W‖₂² grows past 1 (docs/methods/lpom.md §3.3). ``'fixed_point'``: the paper's φ-only iteration
     (26), X ← φ_{k−1}(A − c(φ_k(XW_kᵀ + b_k) − X^{k+1})W_k), with Theorem 2's ρ logged and a damping safeguard
     (selectable for every φ). ``'fista_prox'``: FISTA with the exact element-wise prox (bisection) for any φ —
     the default for sigmoid, tanh, ELU and softplus, because (26) diverged for tanh in the unit tests here
     (an early version of the specification named (26) as that default, docs/methods/lpom.md §3.3; it is an (assumption)
     and this is the switch).
   * Output block: MSE has the closed form X^L = prox_{t f}((D + μA)/(1 + μ)), t = μ/(1 + μ) (for ReLU
     max(0, (μA + D)/(μ + 1)); for a bare output layer (μA + D)/(μ + 1)); cross-entropy iterates (29),
     X ← φ(A − (softmax(X) − D)/μ), ``output_iters`` times.

3. **W-phase** (all layers independent; docs/methods/lpom.md §4): ``w_iters`` accelerated steps in the data metric,
   W̄ ← Y − (1/β)(φ(X̄Ȳᵀ) − X^{j+1})ᵀ(X̄ᵀ)⁺ with β = κ(φ_j) and the pseudo-inverse built from a Cholesky of the
   m×m batch Gram (``pinv='cholesky'``, guard ε = ``ridge_rel``·tr/m; Gram and factor in ``solve_dtype``, float64
   on the CPU) or an SVD (``'svd'``). When a layer
   has more samples than inputs (m > n_j+1) the Gram is on the feature side and the step is an exact
   least-squares fit of the batch; with m ≥ n_j+1 it interpolates the batch. Near m ≈ n_j+1 either Gram is
   ill-conditioned (the smallest singular value of an m × (n_j+1) matrix vanishes as m/(n_j+1) → 1), so every
   layer with m > ``guard_ratio``·(n_j+1) (default 0.5) gets the guard ``ridge_rel_feature`` (0.1) instead of
   ``ridge_rel`` ((assumption): the spec's 1e-10 let near-dead units blow the weights up, on the feature side of
   a 64-32-10 net and on the batch side of the 100 → 50 layer of 784-400-200-100-50-10, docs/history/lpom.md).
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
hidden solver ends above ``collapse_tol`` (a one-time warning names the fix). The energies are computed on every
``monitor_every``-th step (the first included), the other diagnostics on every step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from liftkit.distributed import Communicator
from liftkit.methods import lpom_defaults
from liftkit.methods.base import Method, MethodConfig, StepStats, evaluate_loss, register, targets_for
from liftkit.methods.lpom_chain import X_SOLVERS, LiftedChain
from liftkit.methods.lpom_kernels import SPECTRAL_SAFETY, BlockResult, warm_power
from liftkit.methods.lpom_shards import Shards
from liftkit.solvers import resolve_solve_dtype

__all__ = ["LPOM", "BlockResult", "LPOMConfig", "LPOMState", "LiftedChain", "XSweep"]

SWEEP_ORDERS = ("forward", "backward")
PINV_KINDS = ("cholesky", "svd")
W_SIDES = ("auto", "batch", "feature")
X_INITS = ("forward", "persistent")
MONITORS = ("off", "basic", "full")
SOLVE_DTYPES = ("auto", "float64", "float32")
ONEHOT_OFF = ("zero", "floor")

_T = TypeVar("_T")


@dataclass
class LPOMConfig(MethodConfig):
    """LPOM hyperparameters (docs/methods/lpom.md §9). Defaults: μ = 5, one backward X-sweep of 3 FISTA iterations
    per block, one W step. μ and T_w are the best setting of a prototype sweep on MNIST 784-500-10 at batch 100
    (μ ∈ {2, 5, 20, 50}, T_x ∈ {5, 10, 20}, T_w ∈ {1, 3}); the sweep schedule (one backward sweep instead of L
    forward ones) and T_x = 3 were chosen on the validation split of MNIST 784-500-10 and 784-2048-2048-2048-10,
    where they are as accurate as L forward sweeps of 5 iterations at a fraction of the X-phase's work (figures
    in docs/methods/lpom.md, "Presets"; history in docs/history/lpom.md)."""

    #: penalty weight μ, one value for every layer or one per linear layer (μ_j weighs layer j's penalty)
    mu: float | tuple[float, ...] = 5.0
    #: hidden X-block solver: 'auto' = 'fista' for ReLU/leaky ReLU/identity/hardtanh, 'fista_prox' otherwise
    #: (the paper's 'fixed_point' (26) collapsed training for tanh too, see docs/history/lpom.md)
    x_solver: str = "auto"
    #: T_x: iterations per hidden X-block solve (validation-tuned with one backward sweep on MNIST 784-500-10 and
    #: 784-2048-2048-2048-10: 3 is as accurate as 5 there, and each iteration is two products with W_k)
    x_iters: int = 3
    #: S_x: X sweeps per mini-batch; 0 = the number of linear layers L (the paper's n−1). One backward sweep
    #: reaches every block; L forward sweeps are needed before X¹ moves (docs/methods/lpom.md §5)
    x_sweeps: int = 1
    #: sweep order: 'backward' (L → 1; one sweep reaches every layer) or 'forward' (the paper's, 1 → L)
    x_sweep_order: str = "backward"
    #: stop an X-solver (and the sweeps) once ‖ΔX‖ ≤ x_tol‖X‖
    x_tol: float = 1e-4
    #: iterations of (29) for the cross-entropy output block (MSE uses a closed form)
    output_iters: int = 20
    #: T_w: accelerated W steps per layer and mini-batch
    w_iters: int = 1
    #: side of the pseudo-inverse Gram: 'auto' (batch side when m ≤ n_j+1), 'batch' or 'feature'
    w_side: str = "auto"
    #: pseudo-inverse: Cholesky of the Gram (in solve_dtype) with a relative guard, or float64 SVD
    pinv: str = "cholesky"
    #: relative guard ε = ridge_rel·tr(X̄X̄ᵀ)/m of the Cholesky pseudo-inverse (SVD: relative rcond), batch side
    ridge_rel: float = 1e-10
    #: the guard of a layer whose batch is not small against its inputs (m > guard_ratio·(n_j+1)): its W-step
    #: (nearly) interpolates the batch through an ill-conditioned Gram, and near-dead units blow the weights up
    #: ((assumption), chosen on the validation split of 784-400-200-100-50-10; figures in docs/history/lpom.md)
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
    #: the energies (pure diagnostics) are computed every monitor_every-th step, the first included; the
    #: residuals and ‖W‖₂ every step (the monitored ‖W‖₂ also advances the next step's power iteration). The
    #: asynchronous variant's energies steer its γ and are computed every step
    monitor_every: int = 10
    #: dtype of the W-step's Gram and Cholesky factor: 'float64', 'float32', or 'auto' (float64 on the CPU,
    #: float32 on CUDA)
    solve_dtype: str = "auto"
    #: MSE to class labels: the one-hot "off" value, 'zero' (the papers') or 'floor' (the lower end of the
    #: output φ's range where that is finite and not 0: −1 for tanh and hardtanh, −α for ELU; see lpom_defaults)
    onehot_off: str = "floor"

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
        self._choice("solve_dtype", SOLVE_DTYPES)
        self._choice("onehot_off", ONEHOT_OFF)
        self._int_at_least("x_iters", 1)
        self._int_at_least("monitor_every", 1)
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
class XSweep:
    """What an X-phase did: every block's last solve, the inner iterations in all and the rounds run."""

    last: dict[int, BlockResult] = field(default_factory=dict)
    iters: int = 0
    rounds: int = 0


@register
class LPOM(Method):
    """Serial LPOM (docs/methods/lpom.md §2–§5): forward init, X sweeps, then one APG W-phase per mini-batch."""

    name = "lpom"
    Config = LPOMConfig
    config: LPOMConfig
    default_loss = "mse"
    supported_losses = ("mse", "ce")
    # The papers apply φ at the output too (docs/methods/lpom.md §2.1): a model built from a spec string ends in the
    # same activation as its hidden layers (ReLU by default).
    model_output_activation = "hidden"
    reporting_name = "LPOM (reconstructed schedule)"
    paper = (
        "Li, Fang, Lin, Lifted Proximal Operator Machines, AAAI 2019; Li et al., Training Neural Networks by "
        "Lifted Proximal Operator Machines, IEEE TPAMI 2021"
    )
    default_batch_size = 100
    supports_data_parallel = True

    @classmethod
    def preset_values(cls, preset: str, model: nn.Module) -> dict[str, Any]:
        """``tuned``: μ per layer from the activation it applies; ``paper``: TPAMI's μ (2 for classification,
        20 for autoencoders) with the specification's schedule (:mod:`liftkit.methods.lpom_defaults`)."""
        return lpom_defaults.preset_values(preset, model)

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.lifted = LiftedChain(model, self.name, self.config.mu, self.loss)
        self.lifted.guard_ratio = self.config.guard_ratio
        self.lifted.solve_dtype = resolve_solve_dtype(self.config.solve_dtype, self.device)
        c = self.config
        for k in range(1, self.lifted.L):
            solver = self.lifted.resolve_solver(c.x_solver, k)
            if solver == "fista" and not self.lifted.acts[k - 1].cheap_prox:
                raise ValueError(
                    f"x_solver='fista' needs a closed-form prox, which {self.lifted.acts[k - 1].name} (layer "
                    f"{k - 1}) lacks; use x_solver='fista_prox', 'fixed_point' or 'auto'"
                )
        self.lifted.block = self.block  # the chain names its inner blocks (gram, power_iteration) through the hook
        self.state = LPOMState(power_vectors=[None] * self.lifted.L)
        self._warned: set[str] = set()

    def set_comm(self, comm: Communicator) -> None:
        """Data-parallel LPOM (docs/methods/lpom.md §10, :mod:`liftkit.methods.lpom_shards`): X stays on the shard, the
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

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The checked input batch X⁰ (m × n₀, the method's dtype) and the targets D (m × n_L)."""
        x0 = self._input(x)
        return x0, self._targets(y, x0.shape[0])

    def check_finite_input(self, x0: Tensor, loss: float) -> None:
        """Raise a clear error when the batch holds NaN or inf (checked only when ``loss`` is not finite)."""
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
        if self._floors_targets(y):
            # the "off" entries at the bottom of φ's range (tanh: −1), where φ saturates, rather than at a
            # value φ reaches only on a linear stretch (lpom_defaults)
            d = lpom_defaults.floor_onehot(d, self.lifted.acts[-1].domain[0])
        return d

    def _floors_targets(self, y: Tensor) -> bool:
        """Whether :meth:`_targets` moves the one-hot "off" entries (else D is the reported loss's target)."""
        low = self.lifted.acts[-1].domain[0]
        return (
            self.config.onehot_off == "floor" and self.loss == "mse" and not y.dtype.is_floating_point
            and low != 0.0 and math.isfinite(low)
        )

    def _forward_loss(self, out: Tensor, y: Tensor, d: Tensor) -> tuple[float, float | None]:
        """The reported loss of the forward output and, where the same squared errors give it, the data term
        ℓ(X^L, D) = ½‖X^L − D‖² (MSE to the reported loss's own targets, one process); else ``None``."""
        if self.loss != "mse" or self.lifted.shards is not None or self._floors_targets(y):
            return float(evaluate_loss(self.loss, out, y.to(out.device))), None
        sq = (out - d).pow(2)  # the terms of evaluate_loss's MSE and of LiftedChain.data_loss, computed once
        return float(sq.sum(dim=1).mean()), 0.5 * float(sq.sum(dtype=torch.float64).item())

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _w_norms(self, ws: Sequence[Tensor], layers: Sequence[int], iters: int) -> dict[int, float]:
        out: dict[int, float] = {}
        with self.block("power_iteration"):
            for j in layers:
                sigma, v = warm_power(ws[j], self.state.power_vectors[j], iters)
                self.state.power_vectors[j] = v
                out[j] = sigma
        return out

    def energies_due(self) -> bool:
        """Whether this step computes the monitored energies (every ``monitor_every``-th, the first included)."""
        return self.config.monitor != "off" and self.steps_taken % self.config.monitor_every == 0

    def monitored_w_norms(self, ws: Sequence[Tensor], layers: Sequence[int]) -> dict[int, float]:
        """‖W_j‖₂ of the given layers for the diagnostics (one more warm power iteration each)."""
        return self._w_norms(ws, layers, 1)

    def power_vectors(self) -> list[Tensor | None]:
        """The warm power-iteration vectors, one per layer (the list itself: callers may replace entries)."""
        return self.state.power_vectors

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

    # -- the X-phase: one sweep engine for the serial, sync and layer-parallel schedules -------------------------
    def _block_order(self) -> list[int]:
        blocks = list(range(1, self.lifted.L + 1))
        return blocks[::-1] if self.config.x_sweep_order == "backward" else blocks

    def x_groups(self) -> list[list[int]]:
        """The X-blocks of one sweep as groups run in order; the blocks of a group are solved from the same
        values (no two are neighbours). Serial LPOM: one block per group, in the sweep order."""
        return [[k] for k in self._block_order()]

    @property
    def x_momentum(self) -> float:
        """β_m of the moving average X̂ ← β_mX̂ + (1 − β_m)X_new exposed after a block update (0: none)."""
        return 0.0

    def map_blocks(self, fn: Callable[[int], _T], items: Sequence[int]) -> list[_T]:
        """``[fn(k) for k in items]``; the parallel variants run independent blocks on a thread pool."""
        return [fn(k) for k in items]

    def solve_x_block(
        self,
        k: int,
        xs: Sequence[Tensor],
        pre: Sequence[Tensor],
        d: Tensor,
        ws: Sequence[Tensor],
        bs: Sequence[Tensor | None],
        w_norms: Mapping[int, float],
    ) -> BlockResult:
        """Solve block k from the current values (hidden: the docs/methods/lpom.md §3 solver; k = L: the output update);
        mutates nothing. ``pre[k]`` must be U_k of the current ``xs[k]`` (the sweep keeps it so): the solver starts from
        it."""
        c = self.config
        lifted = self.lifted
        with self.block(f"x_block[{k}]"):
            if k == lifted.L:
                return lifted.solve_output(xs[k], pre[k - 1], d, iters=c.output_iters, tol=c.x_tol)
            return lifted.solve_hidden(
                k, xs[k], pre[k - 1], xs[k + 1], ws[k], bs[k], w_norms[k],
                solver=lifted.resolve_solver(c.x_solver, k), iters=c.x_iters, tol=c.x_tol, u0=pre[k],
            )

    def refresh_preact(self, k: int, xs: Sequence[Tensor], ws: Sequence[Tensor], bs: Sequence[Tensor | None]) -> Tensor:
        """U_k = X^k W_kᵀ + b_k after block k moved (the anchor of block k + 1 and the first W_k-step's U)."""
        with self.block(f"preact[{k}]"):
            return self.lifted.preact(xs[k], ws[k], bs[k])

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
        res = self.solve_x_block(k, xs, pre, d, ws, bs, w_norms)
        xs[k] = res.value
        if k < self.lifted.L:
            pre[k] = self.refresh_preact(k, xs, ws, bs)
        return res

    def sweep_x(
        self,
        xs: list[Tensor],
        pre: list[Tensor],
        d: Tensor,
        ws: Sequence[Tensor],
        bs: Sequence[Tensor | None],
        w_norms: Mapping[int, float],
        groups: Sequence[Sequence[int]],
        *,
        sweeps: int,
        at_forward: bool = False,
        owned: Container[int] | None = None,
        after_group: Callable[[int], None] | None = None,
        round_moved: Callable[[float], float] | None = None,
    ) -> XSweep:
        """Up to ``sweeps`` rounds over ``groups`` on ``xs`` and ``pre`` (in place), stopping after the first round
        in which no block moved by more than ``x_tol`` relative.

        Per group: every block is solved from the same values (:meth:`map_blocks`), exposed through the
        :attr:`x_momentum` average, and its pre-activation refreshed; then ``after_group(i)`` runs (the layer-
        parallel boundary exchange). Only the ``owned`` blocks are solved here (default: all). ``round_moved``
        turns this process's largest change of a round into the global one (a maximum over the ranks). Without
        it the last round's change is not measured (it would stop nothing), so one sweep pays no stopping test.

        ``at_forward``: ``xs`` is the forward pass of the current weights. A hidden block whose neighbours still
        hold their forward values then sits at a minimiser of its subproblem (both of its penalties vanish), so
        it is skipped (reported with 0 iterations) until a neighbour moves. The bookkeeping follows the whole
        schedule, so every process of a layer split skips the same blocks."""
        beta_m = self.x_momentum
        lifted = self.lifted
        clean = set(range(1, lifted.L)) if at_forward else set()
        out = XSweep()
        for sweep in range(sweeps):
            moved = 0.0
            # the last round's largest change decides nothing (unless the ranks compare it): not measured then
            measure = sweep < sweeps - 1 or round_moved is not None
            with self.block("x_sweep"):
                for i, group in enumerate(groups):
                    here = [k for k in group if owned is None or k in owned]
                    todo = [k for k in here if k not in clean]
                    for k in here:
                        if k in clean:
                            out.last.setdefault(k, BlockResult(xs[k], 0, 0.0))
                    olds = {k: xs[k] for k in todo}
                    results = self.map_blocks(lambda k: self.solve_x_block(k, xs, pre, d, ws, bs, w_norms), todo)
                    for k, res in zip(todo, results):
                        xs[k] = res.value if beta_m == 0.0 else beta_m * olds[k] + (1.0 - beta_m) * res.value
                        out.last[k] = res
                        out.iters += res.iters
                        if measure:
                            moved = max(moved, lifted.rel_change(xs[k], olds[k]))
                    inner = [k for k in todo if k < lifted.L]
                    for k, u in zip(inner, self.map_blocks(lambda k: self.refresh_preact(k, xs, ws, bs), inner)):
                        pre[k] = u
                    for k in group:  # a solved block leaves its neighbours off their minimisers
                        if k not in clean:
                            clean.difference_update((k - 1, k + 1))
                    if after_group is not None:
                        after_group(i)
            out.rounds += 1
            if round_moved is not None:
                moved = round_moved(moved)
            if moved <= self.config.x_tol:
                break
        return out

    def x_phase(
        self,
        xs: list[Tensor],
        pre: list[Tensor],
        d: Tensor,
        ws: Sequence[Tensor],
        bs: Sequence[Tensor | None],
        info: dict[str, float],
        sweeps: int | None = None,
        *,
        at_forward: bool = False,
    ) -> None:
        """The X-phase of docs/methods/lpom.md §5 on ``xs`` (in place): ``sweeps`` sweeps with early stopping;
        ``at_forward``: ``xs`` is the forward pass of ``ws`` (see :meth:`sweep_x`)."""
        w_norms = self._x_phase_norms(ws, info)
        out = self.sweep_x(
            xs, pre, d, ws, bs, w_norms, self.x_groups(), sweeps=sweeps if sweeps is not None else self.sweeps,
            at_forward=at_forward,
        )
        self.report_x_phase(info, out.last, out.iters, out.rounds)

    def hidden_w_norms(self, ws: Sequence[Tensor], blocks: Sequence[int]) -> dict[int, float]:
        """Safety-scaled ‖W_k‖₂ of hidden blocks k (their FISTA steps), by warm-started power iterations."""
        return {k: s * SPECTRAL_SAFETY for k, s in self._w_norms(ws, blocks, self.config.power_iters).items()}

    def _x_phase_norms(self, ws: Sequence[Tensor], info: dict[str, float]) -> dict[int, float]:
        """:meth:`hidden_w_norms` of every hidden block; logs Theorem 2's ρ_k when a block uses the paper's fixed
        point, whose contraction it decides."""
        c = self.config
        lifted = self.lifted
        hidden = list(range(1, lifted.L))
        w_norms = self.hidden_w_norms(ws, hidden)
        if any(lifted.resolve_solver(c.x_solver, k) == "fixed_point" for k in hidden):
            for k in hidden:
                info[f"rho_{k}"] = lifted.rho(k, ws[k])
        return w_norms

    def report_x_phase(self, info: dict[str, float], last: Mapping[int, BlockResult], total: int, sweeps: int) -> None:
        """Log the X-phase's sweeps, iterations and final residuals, and flag (once, with the fix) a hidden
        solver that ended above ``collapse_tol``: the silent-collapse trap of docs/methods/lpom.md §3.3."""
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

    # -- the W-phase ---------------------------------------------------------------------------------------------
    def solve_w_block(
        self, j: int, xs: Sequence[Tensor], pre: Sequence[Tensor], ws: Sequence[Tensor], bs: Sequence[Tensor | None]
    ) -> tuple[Tensor, Tensor | None]:
        """The APG W-steps of layer j (docs/methods/lpom.md §4) given X; returns its new (W, b)."""
        c = self.config
        with self.block(f"w_block[{j}]"):
            return self.lifted.solve_w(
                j, xs[j], xs[j + 1], ws[j], bs[j], pre[j],
                iters=c.w_iters, side=c.w_side, pinv=c.pinv, ridge_rel=c.ridge_rel,
                ridge_rel_feature=c.ridge_rel_feature,
            )

    def w_phase(
        self, xs: Sequence[Tensor], pre: Sequence[Tensor], ws: Sequence[Tensor], bs: Sequence[Tensor | None]
    ) -> list[tuple[Tensor, Tensor | None]]:
        """All W-blocks (independent given X); returns the new (W, b) of every layer."""
        return [self.solve_w_block(j, xs, pre, ws, bs) for j in range(self.lifted.L)]

    def commit(self, new: Sequence[tuple[Tensor, Tensor | None]]) -> None:
        self.commit_layers(dict(enumerate(new)))

    def commit_layers(self, new: Mapping[int, tuple[Tensor, Tensor | None]]) -> None:
        """Copy the new (W_j, b_j) of the given layers into the model."""
        with torch.no_grad():
            for j, (w, b) in new.items():
                lin = self.lifted.linears[j]
                lin.weight.copy_(w)
                if lin.bias is not None and b is not None:
                    lin.bias.copy_(b)

    # -- the step -----------------------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        c = self.config
        lifted = self.lifted
        with torch.no_grad():
            x0, d = self.prepare_batch(x, y)
            ws, bs = lifted.weights(), lifted.biases()
            with self.block("forward"):
                xs, pre, out = self._init_x(x0, idx, ws, bs)
            loss, data_init = self._forward_loss(out, y, d)
            self.check_finite_input(x0, loss)
            info: dict[str, float] = {}
            energies = self.energies_due()
            if energies:
                # At the forward initialisation every penalty vanishes (tested), so E = ℓ there.
                if c.x_init == "persistent":
                    info["energy_init"] = lifted.energy(xs, pre, d)
                else:
                    info["energy_init"] = data_init if data_init is not None else lifted.data_loss(xs[-1], d)
            for p in range(c.outer_passes):
                if p > 0:
                    ws, bs = lifted.weights(), lifted.biases()
                    pre = [lifted.preact(xs[j], ws[j], bs[j]) for j in range(lifted.L)]
                self.x_phase(xs, pre, d, ws, bs, info, at_forward=p == 0 and c.x_init == "forward")
                if energies:
                    info["energy"] = lifted.energy(xs, pre, d)
                self.commit(self.w_phase(xs, pre, ws, bs))
            self._finish(xs, d, idx, info)
        self.steps_taken += 1
        return StepStats(loss=loss, info=info)

    def _finish(self, xs: Sequence[Tensor], d: Tensor, idx: Tensor | None, info: dict[str, float]) -> None:
        c = self.config
        lifted = self.lifted
        ws, bs = lifted.weights(), lifted.biases()
        if c.monitor == "full" and self.energies_due():
            pre = [lifted.preact(xs[j], ws[j], bs[j]) for j in range(lifted.L)]
            info["energy_w"] = lifted.energy(xs, pre, d)
        if c.monitor != "off":
            for j, sigma in self.monitored_w_norms(ws, range(lifted.L)).items():
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
