r"""Semi-implicit backpropagation (SIBP; docs/methods/sibp.md).

Reference: R. Liu, X. Zhang, *Semi-Implicit Back Propagation*, arXiv 2002.03516 (ICLR 2020 submission);
official MATLAB code ``liur0810/semi-implicit-back-propagation``, from which the schedule below is taken.
Results are reported as ``SIBP (reconstructed)`` (docs/methods/conventions.md §1.3), because the default hidden-layer
solver is an (assumption) of ours, not the official one.

Model (row-major here, the PyTorch layout; the paper and the official code write it col-major): a fully connected ReLU
network f_0 = x, z_l = f_{l-1}W_lᵀ + 1b_lᵀ, f_l = ReLU(z_l) for l < L, and logits f_L = z_L, trained on the **summed**
softmax cross-entropy L_sum (docs/methods/conventions.md §3: no 1/m, so λ and η are tied to the batch size, 100 by
default).

One SIBP iteration on a mini-batch (docs/methods/sibp.md §3; parameters are overwritten directly, there is no
optimizer)::

    forward with (W^k, b^k), keep f_l^k and the ReLU masks M_l = 1[z_l^k > 0]
    δ_L = softmax(z_L^k) − Y ;  T_L = z_L^k − η δ_L
    W_L ← argmin_W ‖f_{L−1}^k Wᵀ + 1b_L^kᵀ − T_L‖² + λ_W ‖W − W_L^k‖²          (old b)
    b_L ← argmin_b ‖f_{L−1}^k W_Lᵀ + 1bᵀ − T_L‖² + λ_b ‖b − b_L^k‖²              (new W)
    δ_{L−1} = δ_L W_L^{new} ;  T_{L−1} = f_{L−1}^k − η δ_{L−1}
    for l = L−1 … 1:
        W_l ← argmin_W ‖ReLU(f_{l−1}^k Wᵀ + 1b_l^kᵀ) − T_l‖² + λ_W ‖W − W_l^k‖²
        b_l ← argmin_b ‖ReLU(f_{l−1}^k W_lᵀ + 1bᵀ) − T_l‖² + λ_b ‖b − b_l^k‖²
        δ_{l−1} = (δ_l ⊙ M_l) W_l^{new} ;  T_{l−1} = f_{l−1}^k − η δ_{l−1}

The targets are backprop's ∂L_sum/∂f_l, except that every Wᵀ is the layer's *already updated* weight
(docs/methods/sibp.md §5). For λ → ∞ the step becomes SGD with learning rate η·m/λ on the mean loss.

Subproblem solvers (docs/methods/sibp.md §4):

* ``output_solver="exact"`` (derived, default): the output prox is the linear ridge problem of
  docs/methods/conventions.md §7 with β = λ, solved W-only then b-only with :func:`liftkit.solvers.ridge_solve`
  (push-through; float64 factorisation, its Gram products in ``solve_dtype``). ``"fr_cg"``: the official
  Fletcher–Reeves solver (``FR4``).
* ``hidden_solver="gn_cg"`` (assumption, default): one Gauss–Newton step with the old ReLU mask frozen. Row j
  of W then solves a ridge least-squares problem on the samples where M_j = 1; in dual form, with
  E = T − z^k and K = FFᵀ (m×m, shared by all rows):
  ``M ⊙ (K (M ⊙ Λ)) + λ_W Λ = M ⊙ E``, ``W = W^k + (M ⊙ Λ)ᵀ F``, solved by
  :func:`liftkit.solvers.block_cg` (warm start 0, ``cg_iters`` iterations, tolerance ``cg_tol``; the m×m Gram
  is built once per layer; it and the CG are in ``solve_dtype``). The b-step of the masked model is
  closed form: b_j = (Σ_i M'_ij (T − F Wᵀ)_ij + λ_b b_j^k)/(Σ_i M'_ij + λ_b), where M' is the mask after the
  W-step (``b_mask="current"``, assumption: the mask at the b-prox's warm start, which makes the step a
  descent direction of the true b-prox) or the forward pass's mask (``b_mask="old"``).
  A per-row safeguard (assumption) compares each row's *true* nonlinear prox objective with its warm-start
  value and halves that row's step where it rose (at most ``max_halvings`` times, then keeps the old row).
  ``"gn_exact"``: the same GN step by batched per-row Cholesky; ``"gn_primal_cg"``: CG on the q×n primal
  unknowns; ``"fr_cg"``: the official Fletcher–Reeves + Armijo solver (``FR3``).
* ``quirks="fixed"`` (assumption, default for ``fr_cg``): correct initial gradient, the first accepted Armijo
  step is applied, restarts to −g when the direction is not a descent direction. ``quirks="official"``
  reproduces the MATLAB code (no step when the accepted exponent is 0, FR4's initial gradient without the
  bias/offset term, no restarts).

Defaults. The official code uses η = 0.1 and λ_W = λ_b = 1 at batch 100, with batches drawn with
replacement; that setting ships as ``configs/sibp-paper.json``. The library default is η = 0.3, λ = 1,
``cg_iters=3`` and CG in the model's dtype, with the Gram still built in float64. It was chosen on the MNIST
validation split (η ∈ {0.1, 0.2, 0.3, 0.5, 1}, λ ∈ {0.3, 1, 3}; the figures are in ``docs/history/sibp.md``).

Data parallelism (docs/methods/sibp.md §7): f_l, δ_l, the targets and the masks are column-wise given the replicated
weights and stay on each process's shard. All-reduced: the global loss (one scalar, for the divergence
branch); output prox (``exact``, primal n×n form): FᵀF and Fᵀ(T − z^k) in float64, then the b-step's column
sums and the count m; ``gn_cg``: Fᵀ(M ⊙ Λ) (n×q) and the CG column inner products in every iteration, and
Δw = ΛᵀF once, so the dual iterates are the single-process ones without forming the m×m Gram;
``gn_primal_cg``: Fᵀ(M ⊙ E) once and Fᵀ(M ⊙ (FV)) per iteration; the per-row safeguard objectives of every
halving; the b-step sums Σ_i M'_ij(T − zw)_ij and Σ_i M'_ij; ``fr_cg``: the data term of every objective
value and gradient (so the Armijo decisions match); the diagnostic objective sums. ``gn_exact`` is
single-process only.

Hidden activations: ReLU, or the identity (no activation module, or ``nn.Identity``), for which every hidden
solver solves the linear ridge problem of docs/methods/conventions.md §7. Convolutions and other activations raise
``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liftkit.methods.base import Method, MethodConfig, StepStats, evaluate_loss, register
from liftkit.methods.sibp_fr import QUIRKS, FRResult, Reduce, fr_cg_armijo, prox_gradient, prox_objective, reduce_sum
from liftkit.models import ChainLayer, as_chain
from liftkit.solvers import block_cg, linear_prox_direction, spd_ridge_solve

__all__ = [
    "SIBP",
    "SIBPConfig",
    "fr_cg_armijo",
    "gn_step_safeguard",
    "masked_gn_step",
    "prox_gradient",
    "prox_objective",
]

OUTPUT_SOLVERS = ("exact", "fr_cg")
HIDDEN_SOLVERS = ("gn_cg", "gn_exact", "gn_primal_cg", "fr_cg")
CG_STOPS = ("tol", "fixed")
# block_cg's guard ε in α and β is the smallest normal number of the solve dtype: ProxProp's 1e-6 is tuned to
# its gradient scale and would stall these solves well before convergence, while any ε > 0 keeps all-zero
# columns (dead neurons) at rest.


# --------------------------------------------------------------------------------------------------
# Masked Gauss–Newton step (docs/methods/sibp.md §4.2), row-major
# --------------------------------------------------------------------------------------------------


@dataclass
class GNStep:
    """One masked Gauss–Newton W-step: the pre-activation change ``delta_z = F delta_wᵀ`` (m×q), the number of
    CG iterations run (0 for the direct solve) and, for the dual solvers, the dual variable Λ (m×q, in the solve
    dtype; zero off the mask, so that delta_w = Λᵀ F). The weight step ``delta_w`` (q×n) is formed on request
    (:meth:`row_scaled_delta_w`), so that a caller who rescales rows first (the safeguard) pays for one q×m×n
    product and no q×n rescaling."""

    delta_z: Tensor
    iterations: int
    dual: Tensor | None = None
    primal: Tensor | None = None  # delta_w itself, where the solver formed it
    inputs: Tensor | None = None  # F, for delta_w = ΛᵀF

    @property
    def delta_w(self) -> Tensor:
        """The weight step (q×n), computed on each access."""
        return self.row_scaled_delta_w(None)

    def row_scaled_delta_w(self, scale: Tensor | None) -> Tensor:
        """``delta_w`` with row j multiplied by ``scale[j]`` (length q; ``None``: unscaled). For the dual solvers
        the scale is applied to Λ's columns before the product, ΛᵀF; with the safeguard's scales (0 and powers
        of two) that is bit for bit the product scaled afterwards."""
        if self.primal is not None:
            return self.primal if scale is None else self.primal * scale.unsqueeze(1)
        assert self.dual is not None and self.inputs is not None
        dual = self.dual.to(self.inputs.dtype)
        if scale is not None:
            dual = dual * scale
        return dual.T @ self.inputs

    def add_to(self, weight: Tensor, scale: Tensor | None = None) -> None:
        """``weight += row_scaled_delta_w(scale)`` in place; the dual solvers accumulate ΛᵀF into ``weight`` in
        one fused in-place product (``addmm``) without a q×n temporary (on the CPU BLAS this equals the product added
        afterwards, bit for bit; elsewhere it may differ in the last bit)."""
        if self.primal is not None:
            weight.add_(self.row_scaled_delta_w(scale))
            return
        assert self.dual is not None and self.inputs is not None
        dual = self.dual.to(self.inputs.dtype)
        # the out= form is the in-place product (addmm_) that the profiler's FLOP counter also sees
        torch.addmm(weight, (dual if scale is None else dual * scale).T, self.inputs, out=weight)


def masked_gn_step(
    inputs: Tensor,
    residual: Tensor,
    mask: Tensor | None,
    lam: float,
    *,
    solver: str = "gn_cg",
    maxit: int = 10,
    tol: float = 1e-2,
    stop: str = "tol",
    solve_dtype: torch.dtype = torch.float64,
    reduce: Reduce = None,
) -> GNStep:
    r"""One Gauss–Newton step of the hidden W-prox with the ReLU mask frozen (docs/methods/sibp.md §4.2).

    Row-major: ``inputs`` F is m×n (the layer's old input activations), ``residual`` E = T − z^k is m×q
    (targets minus the old pre-activations, so the bias is already inside), ``mask`` M is m×q with entries
    0/1 (``None``: all ones, the identity activation) and ``lam`` = λ_W > 0. For every neuron j the step
    solves

        min_w Σ_{i: M_ij=1} (F_i·(w − w_j^k) − E_ij)² + λ ‖w − w_j^k‖²,

    in one of three equivalent ways: ``"gn_cg"`` dual block CG on M ⊙ (K(M ⊙ Λ)) + λΛ = M ⊙ E with K = FFᵀ
    (the m×m Gram); ``"gn_exact"`` batched Cholesky of the same per-neuron m×m systems (float64);
    ``"gn_primal_cg"`` block CG on V ↦ Fᵀ(M ⊙ (FV)) + λV (n×q unknowns). The Gram and the CG solves are in
    ``solve_dtype``; the step is returned in F's dtype.

    ``reduce`` (data parallelism, docs/methods/sibp.md §7): the rows of F, E, M are this process's samples and
    ``reduce`` sums over the processes. ``gn_cg`` then never forms K: its operator is
    M ⊙ (F(Σ_r F_rᵀ(M ⊙ Λ)_r)) + λΛ with one n×q all-reduce per iteration, the CG column inner products are
    all-reduced, and Δw = Σ_r Λ_rᵀF_r; the iterates are the single-process ones (rows of Λ on their shard).
    ``gn_primal_cg`` all-reduces Fᵀ(M ⊙ E) once and Fᵀ(M ⊙ (FV)) per iteration. ``gn_exact`` needs the whole
    batch's per-neuron m×m systems and is single-process only.
    """
    dtype = inputs.dtype
    if solver == "gn_exact":
        solve_dtype = torch.float64
    eps = torch.finfo(solve_dtype).tiny  # see the note on block_cg's ε at the top
    rhs = residual.to(solve_dtype)
    Ms = None if mask is None else mask.to(solve_dtype)
    if Ms is not None:
        rhs = rhs * Ms
    if reduce is not None and solver == "gn_cg":
        Fs = inputs.to(solve_dtype)

        def apply_sharded(lmb: Tensor) -> Tensor:
            out = torch.addmm(lmb, Fs, reduce(Fs.T @ lmb), beta=lam)
            return out if Ms is None else Ms * out

        dual, iterations = block_cg(apply_sharded, rhs, None, maxit, tol=tol, eps=eps, stop=stop, col_sum=reduce)
        delta_w = reduce(dual.to(dtype).T @ inputs)  # formed here anyway, for Δz: kept, never reduced twice
        return GNStep(inputs @ delta_w.T, iterations, dual, primal=delta_w)
    if reduce is not None and solver == "gn_exact":
        raise ValueError("hidden_solver=gn_exact runs in a single process only; use gn_cg under torchrun")
    if solver in ("gn_cg", "gn_exact"):
        Fg = inputs.to(solve_dtype)
        K = Fg @ Fg.T
        if solver == "gn_cg":
            # Every CG iterate, residual and direction is zero off the mask (the right-hand side is, and the
            # operator keeps it so), hence M ⊙ (K(M ⊙ X)) + λX = M ⊙ (KX + λX): one fused product and one mask.
            def apply_dual(lmb: Tensor) -> Tensor:
                out = torch.addmm(lmb, K, lmb, beta=lam)
                return out if Ms is None else Ms * out

            # from Λ₀ = 0 without the product M·0 (zero, so the iterates are unchanged)
            dual, iterations = block_cg(apply_dual, rhs, None, maxit, tol=tol, eps=eps, stop=stop)
        else:
            m = K.shape[0]
            eye = torch.eye(m, dtype=torch.float64, device=K.device)
            if Ms is None:
                dual = torch.cholesky_solve(rhs, torch.linalg.cholesky(K + lam * eye))
            else:
                # One m×m system per neuron: K restricted to the neuron's active samples, λ on the diagonal
                # elsewhere (those rows of the right-hand side are zero, so Λ stays zero off the mask).
                Mt = Ms.T  # q×m
                systems = Mt[:, :, None] * K[None] * Mt[:, None, :] + lam * eye
                dual = torch.cholesky_solve(rhs.T.unsqueeze(2), torch.linalg.cholesky(systems)).squeeze(2).T
                dual = dual * Ms
            iterations = 0
        return GNStep((K @ dual).to(dtype), iterations, dual, inputs=inputs)
    if solver == "gn_primal_cg":
        Fs = inputs.to(solve_dtype)

        def apply_primal(v: Tensor) -> Tensor:
            fv = Fs @ v
            if Ms is not None:
                fv = Ms * fv
            if reduce is not None:
                return reduce(Fs.T @ fv).add_(v, alpha=lam)
            return torch.addmm(v, Fs.T, fv, beta=lam)

        primal_rhs = reduce_sum(reduce, Fs.T @ rhs)
        v, iterations = block_cg(
            apply_primal, primal_rhs, None if reduce is not None else torch.zeros_like(primal_rhs), maxit, tol=tol,
            eps=eps, stop=stop,
        )
        return GNStep((Fs @ v).to(dtype), iterations, primal=v.T.to(dtype))
    raise ValueError(f"unknown Gauss–Newton solver {solver!r}; choose gn_cg, gn_exact or gn_primal_cg")


def _row_objective(z: Tensor, targets: Tensor, relu: bool) -> Tensor:
    """Per-neuron data term Σ_i (h(z_ij) − T_ij)², a length-q vector."""
    res = (torch.relu(z) if relu else z) - targets
    return (res * res).sum(dim=0)


@dataclass
class SafeguardResult:
    """Per-row step scales after the safeguard, the objectives before and after, and the halvings used."""

    scale: Tensor
    objective_before: Tensor
    objective_after: Tensor
    halvings: int
    rows_reverted: int


def gn_step_safeguard(
    z0: Tensor,
    delta_z: Tensor,
    step_sq_norm: Tensor,
    targets: Tensor,
    lam: float,
    *,
    relu: bool,
    max_halvings: int = 10,
    reduce: Reduce = None,
) -> SafeguardResult:
    r"""Per-row safeguard of a prox step (docs/methods/sibp.md §4.4, assumption).

    Row j's true prox objective along the step is
    φ_j(t) = Σ_i (h(z0_ij + t·Δz_ij) − T_ij)² + λ t² ‖Δ_j‖² (``step_sq_norm`` holds ‖Δ_j‖²). Starting from
    t = 1, t is halved for every row with φ_j(t) > φ_j(0) (up to 16 ulps of slack), at most ``max_halvings``
    times; rows still worse get t = 0 (the old row). z is affine in t, so no new matrix product is needed.
    Returns the per-row t and the row objectives φ_j(0) and φ_j(t). ``reduce`` sums the per-row sample sums
    over data-parallel processes (``step_sq_norm`` must then be the global ‖Δ_j‖²), so every process halves
    the same rows.
    """
    # A rise below a few ulps of the objective is rounding, not a worse step (a converged row would otherwise be
    # reverted at random).
    slack = 1.0 + 16.0 * torch.finfo(z0.dtype).eps
    before = reduce_sum(reduce, _row_objective(z0, targets, relu))
    scale = torch.ones_like(before)
    after = reduce_sum(reduce, _row_objective(z0 + delta_z, targets, relu)) + lam * step_sq_norm
    worse = after > before * slack
    halvings = 0
    while bool(worse.any()):
        if halvings == max_halvings:
            scale = torch.where(worse, torch.zeros_like(scale), scale)
            after = torch.where(worse, before, after)
            break
        halvings += 1
        rows = worse.nonzero().squeeze(1)
        t = scale[rows] * 0.5
        trial = (
            reduce_sum(reduce, _row_objective(z0[:, rows] + t * delta_z[:, rows], targets[:, rows], relu))
            + lam * t.pow(2) * step_sq_norm[rows]
        )
        scale[rows] = t
        after[rows] = trial
        worse = after > before * slack
    return SafeguardResult(scale, before, after, halvings, int((scale == 0).sum().item()))


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@dataclass
class SIBPConfig(MethodConfig):
    """SIBP hyperparameters (docs/methods/sibp.md §6; defaults tuned on the MNIST validation split).

    ``lambda_w`` / ``lambda_b``: prox weights, one value for every layer or one per linear layer (first to
    last). ``cg_iters``/``cg_tol``/``cg_stop``: the block-CG budget of the GN solvers. ``fr_iters``: FR-CG
    iterations (official: 5). ``safeguard``/``max_halvings``: the per-row safeguard of the GN step.
    ``b_mask`` (assumption): the ReLU mask of the GN b-step, ``"current"`` (default: 1[z > 0] after the W-step,
    the mask of the b-prox's warm start, as in the official FR3) or ``"old"`` (the forward pass's mask,
    docs/methods/sibp.md §4.3 read literally; the safeguard then has to revert rows whose pattern the W-step changed).
    ``solve_dtype`` (assumption): dtype of the GN Gram K and CG iterations and of the exact output prox's
    Gram products, ``"float64"`` or ``"model"`` (the model's dtype); the exact factorisations (output prox,
    ``gn_exact``) always run in float64.
    """

    #: 0.2: level with 0.3 on the MNIST validation split (98.38 against 98.50 %) and 0.8 points ahead on
    #: Fashion-MNIST (89.17 against 88.40 %), 784-500-10, batch 100, 5 epochs (docs/history/defaults-validation.md)
    eta: float = 0.2
    lambda_w: float | tuple[float, ...] = 1.0
    lambda_b: float | tuple[float, ...] = 1.0
    output_solver: str = "exact"
    hidden_solver: str = "gn_cg"
    cg_iters: int = 3
    cg_tol: float = 1e-2
    cg_stop: str = "tol"
    fr_iters: int = 5
    quirks: str = "fixed"
    safeguard: bool = True
    max_halvings: int = 10
    b_mask: str = "current"
    solve_dtype: str = "model"

    def validate(self) -> None:
        if not (isinstance(self.eta, int | float) and math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a non-negative finite number, got {self.eta!r}")
        self._positive("lambda_w", "lambda_b", "cg_tol")
        for name in ("lambda_w", "lambda_b"):
            value = getattr(self, name)
            if isinstance(value, tuple) and not value:
                raise ValueError(f"{name} must be a number or a non-empty list, one per linear layer")
        self._choice("output_solver", OUTPUT_SOLVERS)
        self._choice("hidden_solver", HIDDEN_SOLVERS)
        self._choice("cg_stop", CG_STOPS)
        self._choice("quirks", QUIRKS)
        self._choice("b_mask", ("current", "old"))
        self._choice("solve_dtype", ("float64", "model"))
        self._int_at_least("cg_iters", 1)
        self._int_at_least("fr_iters", 1)
        self._int_at_least("max_halvings", 0)
        if not isinstance(self.safeguard, bool):
            raise ValueError(f"safeguard must be true or false, got {self.safeguard!r}")


def _per_layer(value: float | tuple[float, ...], n_layers: int, name: str) -> list[float]:
    if isinstance(value, tuple):
        if len(value) != n_layers:
            raise ValueError(
                f"{name} has {len(value)} values but the model has {n_layers} linear layers; "
                f"give one value or {n_layers}"
            )
        return [float(v) for v in value]
    return [float(value)] * n_layers


@register
class SIBP(Method):
    """Semi-implicit backpropagation (Liu & Zhang, arXiv 2002.03516): backward targets with the updated
    weights, proximal (implicit) W- and b-steps per layer, parameters overwritten in place. See the module
    docstring for the update rules and solver options."""

    name = "sibp"
    Config = SIBPConfig
    config: SIBPConfig
    default_loss = "ce"
    supported_losses = ("ce",)
    model_output_activation = None
    reporting_name = "SIBP (reconstructed)"
    paper = "R. Liu, X. Zhang, Semi-Implicit Back Propagation, arXiv 2002.03516"
    default_batch_size = 100
    supports_data_parallel = True

    @classmethod
    def preset_values(cls, preset: str, model: nn.Module) -> dict[str, Any]:
        """``paper``: the official code's setting (η = 0.1, Fletcher–Reeves CG with 5 iterations for every
        prox, bit-faithful quirks); its N(0, 0.05²) initialisation and with-replacement batches are the
        trainer's choices (``--sampling replacement``), not hyperparameters (docs/methods/sibp.md)."""
        if preset == "paper":
            return {"eta": 0.1, "output_solver": "fr_cg", "hidden_solver": "fr_cg", "fr_iters": 5, "quirks": "official"}
        return {}

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.chain: list[ChainLayer] = as_chain(
            model, method="sibp", allowed_activations=("relu", "identity"), require_bias=True
        )
        last = self.chain[-1]
        if last.activation is not None and last.activation.name != "identity":
            raise ValueError(
                f"sibp needs bare logits at the output, but the last layer ends in {last.activation.name}; "
                "remove the output activation"
            )
        for layer in self.chain[1:]:
            for glue in layer.pre:
                if not isinstance(glue, nn.Identity | nn.Flatten):
                    raise ValueError(f"sibp cannot train a model with {type(glue).__name__} between layers")
        n_layers = len(self.chain)
        self.lambda_w = _per_layer(self.config.lambda_w, n_layers, "lambda_w")
        self.lambda_b = _per_layer(self.config.lambda_b, n_layers, "lambda_b")

    # Data parallelism (docs/methods/sibp.md §7): the targets, masks and residuals are column-wise given the replicated
    # weights and stay on their shard; only the base class's reductions (_reduce, _sum_scalars) cross processes.
    def single_process_only(self) -> str | None:
        if self.config.hidden_solver == "gn_exact":
            return (
                "sibp with hidden_solver=gn_exact runs in a single process only (its per-neuron m×m systems need "
                "the whole batch); use hidden_solver=gn_cg or gn_primal_cg under torchrun"
            )
        return None

    def _gram_dtype(self, like: Tensor) -> torch.dtype:
        """The dtype of the exact output prox's Gram products: float64, or with ``solve_dtype="model"`` the
        model's (the factorisation is float64 either way)."""
        return torch.float64 if self.config.solve_dtype == "float64" else like.dtype

    def _is_relu(self, layer: ChainLayer) -> bool:
        return layer.activation is not None and layer.activation.name == "relu"

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, *, idx: torch.Tensor | None = None) -> StepStats:
        if y.dtype.is_floating_point:
            raise ValueError("sibp trains classifiers with softmax cross-entropy; y must hold integer labels")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        c = self.config
        eta = float(c.eta)
        chain = self.chain
        dtype = chain[0].weight.dtype
        inputs = [chain[0].apply_pre(x).to(dtype)]
        pre: list[Tensor] = []
        with self.block("forward"):
            for layer in chain:
                a = layer.apply_pre(inputs[-1]) if layer is not chain[0] else inputs[-1]
                z = F.linear(a, layer.weight, layer.bias)
                pre.append(z)
                inputs.append(torch.relu(z) if self._is_relu(layer) else z)
        logits = pre[-1]
        if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
            raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}] for this model's output width")
        loss = float(evaluate_loss("ce", logits, y))
        if self.comm.world_size > 1:
            # the global mean CE: every process must take the same divergence branch
            m_global = self.global_batch_size(int(x.shape[0]))
            loss = self.comm.sum_scalars(loss * x.shape[0] / m_global)[0]
        if not math.isfinite(loss):
            if not bool(torch.isfinite(x).all()):
                raise ValueError("the input batch contains NaN or inf values; clean the data before training")
            # Diverged weights: report the non-finite loss (the trainer stops on it) and leave the model as is.
            return StepStats(loss=loss, info={"diverged": 1.0})
        info: dict[str, float] = {}

        # Output layer: δ from the summed CE, then the linear prox (W, then b with the new W).
        delta = torch.softmax(logits, dim=1)
        delta[torch.arange(y.shape[0], device=y.device), y] -= 1.0
        targets = logits - eta * delta
        out_idx = len(chain) - 1
        with self.block(f"output_prox[{out_idx}]"):
            self._output_prox(chain[-1], inputs[-2], logits, targets, out_idx, info)
        delta = delta @ chain[-1].weight

        for l in range(len(chain) - 2, -1, -1):
            layer = chain[l]
            targets = inputs[l + 1] - eta * delta
            mask = (pre[l] > 0).to(dtype) if self._is_relu(layer) else None
            with self.block(f"hidden_prox[{l}]"):
                self._hidden_prox(layer, inputs[l], pre[l], targets, mask, l, info)
            if l > 0:
                masked = delta if mask is None else delta * mask
                delta = masked @ layer.weight

        self.steps_taken += 1
        return StepStats(loss=loss, info=info)

    # -- output layer ---------------------------------------------------------------------------------------

    def _output_prox(
        self, layer: ChainLayer, a: Tensor, z0: Tensor, targets: Tensor, l: int, info: dict[str, float]
    ) -> None:
        lam_w, lam_b = self.lambda_w[l], self.lambda_b[l]
        W0 = layer.weight.detach().clone()
        b0 = layer.bias.detach().clone()  # type: ignore[union-attr]
        reduce = self._reduce
        if self.config.output_solver == "exact" and reduce is not None:
            # The primal (n×n) form over the shards (docs/methods/sibp.md §7): Σ_r FᵀF and Σ_r Fᵀ(T − z^k) in float64 in
            # one all-reduce, the same solve on every process; then the b-step's column sums and the count m.
            a64 = a.to(torch.float64)
            n = a.shape[1]
            SR = reduce(torch.cat([a64.T @ a64, a64.T @ (targets - z0).to(torch.float64)], dim=1))
            W = W0 + spd_ridge_solve(SR[:, :n], SR[:, n:], lam_w).to(W0.dtype).T
            zw = a @ W.T
            sums = reduce(torch.cat([(targets - (zw + b0)).sum(dim=0), a.new_full((1,), float(a.shape[0]))]))
            b = b0 + sums[:-1] / (sums[-1] + lam_b)
        elif self.config.output_solver == "exact":
            # Residual form, solved for the increments from a zero warm start (ridge_solve with Θ₀ = 0, without
            # its product AΘ₀): the residual T − z^k is exactly 0 at η = 0, so the warm start comes back
            # unchanged; z^k is reused from the forward pass.
            W = W0 + linear_prox_direction(a, targets - z0, lam_w, gram_dtype=self._gram_dtype(a)).T
            zw = a @ W.T
            # the b-prox has A = 1: its (1×1) normal equation (m + λ_b)Δb = Σ_i residual_i, in float64
            residual = (targets - (zw + b0)).to(torch.float64)
            b = b0 + (residual.sum(dim=0) / (a.shape[0] + lam_b)).to(b0.dtype)
        else:
            fr_w = self._fr(a, b0.expand_as(z0), targets, W0, lam_w, relu=False)
            W = fr_w.x
            zw = a @ W.T
            fr_b = self._fr(torch.ones_like(a[:, :1]), zw, targets, b0.unsqueeze(1), lam_b, relu=False)
            b = fr_b.x.squeeze(1)
            info[f"fr_steps_{l}"] = float(fr_w.steps_taken + fr_b.steps_taken)
        self._report(info, l, z0, zw + b0, zw + b, targets, W - W0, b - b0, relu=False)
        layer.weight.copy_(W)
        layer.bias.copy_(b)  # type: ignore[union-attr]

    def _report(
        self,
        info: dict[str, float],
        l: int,
        z0: Tensor,
        z_new_w: Tensor,
        z_new: Tensor,
        targets: Tensor,
        delta_w: Tensor,
        delta_b: Tensor,
        *,
        relu: bool,
    ) -> None:
        """Relative decrease of the layer's W-prox and b-prox objectives (negative: the prox call made it
        worse, e.g. an ``fr_cg`` stall or an inexact solve) and the size of the step."""
        # one host transfer for the five sums
        sums = torch.stack([_row_objective(z, targets, relu).sum() for z in (z0, z_new_w, z_new)]
                           + [delta_w.pow(2).sum(), delta_b.pow(2).sum()]).tolist()
        base_w, fit_w, fit_b = self._sum_scalars(*sums[:3])
        step_w, step_b = sums[3:]
        info[f"prox_w_rel_decrease_{l}"] = _rel_decrease(base_w, fit_w + self.lambda_w[l] * step_w)
        info[f"prox_b_rel_decrease_{l}"] = _rel_decrease(fit_w, fit_b + self.lambda_b[l] * step_b)
        info[f"step_norm_w_{l}"] = math.sqrt(step_w)

    # -- hidden layers --------------------------------------------------------------------------------------

    def _fr(
        self, inputs: Tensor, offset: Tensor, targets: Tensor, x_old: Tensor, lam: float, *, relu: bool
    ) -> FRResult:
        return fr_cg_armijo(
            inputs,
            offset,
            targets,
            x_old,
            lam,
            relu=relu,
            maxk=self.config.fr_iters,
            quirks=self.config.quirks,
            reduce=self._reduce,
        )

    def _hidden_prox(
        self,
        layer: ChainLayer,
        a: Tensor,
        z0: Tensor,
        targets: Tensor,
        mask: Tensor | None,
        l: int,
        info: dict[str, float],
    ) -> None:
        c = self.config
        relu = mask is not None
        lam_w, lam_b = self.lambda_w[l], self.lambda_b[l]
        if c.hidden_solver == "fr_cg":
            W0 = layer.weight.detach().clone()
            b0 = layer.bias.detach().clone()  # type: ignore[union-attr]
            fr_w = self._fr(a, b0.expand_as(z0), targets, W0, lam_w, relu=relu)
            W = fr_w.x
            zw = a @ W.T
            fr_b = self._fr(torch.ones_like(a[:, :1]), zw, targets, b0.unsqueeze(1), lam_b, relu=relu)
            b = fr_b.x.squeeze(1)
            info[f"fr_steps_{l}"] = float(fr_w.steps_taken + fr_b.steps_taken)
            self._report(info, l, z0, zw + b0, zw + b, targets, W - W0, b - b0, relu=relu)
            layer.weight.copy_(W)
            layer.bias.copy_(b)  # type: ignore[union-attr]
            return

        with self.block(f"gn_solve[{l}]"):
            gn = masked_gn_step(
                a,
                targets - z0,
                mask,
                lam_w,
                solver=c.hidden_solver,
                maxit=c.cg_iters,
                tol=c.cg_tol,
                stop=c.cg_stop,
                solve_dtype=torch.float64 if c.solve_dtype == "float64" else z0.dtype,
                reduce=self._reduce,
            )
        reduce = self._reduce
        delta_z = gn.delta_z
        # ‖Δw_j‖² = Λ_jᵀKΛ_j = Σ_i Λ_ij Δz_ij in the dual: an m×q product instead of a q×n one.
        if gn.dual is not None:
            step_sq = reduce_sum(reduce, (gn.dual.to(delta_z.dtype) * delta_z).sum(dim=0))
        else:
            delta_w = gn.delta_w
            step_sq = (delta_w * delta_w).sum(dim=1)
        halvings = reverted = 0
        row_scale: Tensor | None = None
        if c.safeguard:
            with self.block(f"safeguard[{l}]"):
                guard = gn_step_safeguard(
                    z0, delta_z, step_sq, targets, lam_w, relu=relu, max_halvings=c.max_halvings, reduce=reduce
                )
            if guard.halvings:
                row_scale = guard.scale
                delta_z = delta_z * row_scale
                step_sq = step_sq * row_scale * row_scale
            halvings, reverted = guard.halvings, guard.rows_reverted
            base_w, after_w = float(guard.objective_before.sum()), float(guard.objective_after.sum())
        zw = z0 + delta_z  # pre-activations with the new W and the old b
        if not c.safeguard:
            base_w, fit = self._sum_scalars(
                float(_row_objective(z0, targets, relu).sum()), float(_row_objective(zw, targets, relu).sum())
            )
            after_w = fit + lam_w * float(step_sq.sum())

        # b-step: closed form of the masked model, then its own per-row safeguard. With b_mask="current" the
        # mask is re-read after the W-step, which makes the step a descent direction of the true b-prox (the
        # old mask need not be: rows whose activation pattern the W-step changed can get an ascent step).
        if mask is None:
            active = torch.ones_like(z0)
        elif c.b_mask == "current":
            active = (zw > 0).to(z0.dtype)
        else:
            active = mask
        q = z0.shape[1]
        sums = reduce_sum(reduce, torch.cat([active.sum(dim=0), (active * (targets - zw)).sum(dim=0)]))
        count = sums[:q]
        delta_b = sums[q:] / (count + lam_b)
        if c.safeguard:
            guard_b = gn_step_safeguard(
                zw, delta_b.expand_as(zw), delta_b * delta_b, targets, lam_b, relu=relu, max_halvings=c.max_halvings,
                reduce=reduce,
            )
            if guard_b.halvings:
                delta_b = delta_b * guard_b.scale
            halvings += guard_b.halvings
            reverted += guard_b.rows_reverted
            base_b, after_b = float(guard_b.objective_before.sum()), float(guard_b.objective_after.sum())
        else:
            base_b, fit = self._sum_scalars(
                float(_row_objective(zw, targets, relu).sum()), float(_row_objective(zw + delta_b, targets, relu).sum())
            )
            after_b = fit + lam_b * float((delta_b * delta_b).sum())
        info[f"prox_w_rel_decrease_{l}"] = _rel_decrease(base_w, after_w)
        info[f"prox_b_rel_decrease_{l}"] = _rel_decrease(base_b, after_b)
        info[f"step_norm_w_{l}"] = math.sqrt(max(float(step_sq.sum()), 0.0))
        info[f"cg_iters_{l}"] = float(gn.iterations)
        info[f"safeguard_halvings_{l}"] = float(halvings)
        info[f"safeguard_rows_reverted_{l}"] = float(reverted)
        if mask is not None:
            info[f"dead_rows_{l}"] = float((count == 0).sum())
        with self.block(f"w_update[{l}]"):
            gn.add_to(layer.weight, row_scale)
        layer.bias.add_(delta_b)  # type: ignore[union-attr]


def _rel_decrease(before: float, after: float) -> float:
    """(before − after)/before of a prox objective (0 when it was already 0); negative means it rose."""
    return (before - after) / before if before > 0 else 0.0
