r"""Fenchel lifted networks (Gu, Askari, El Ghaoui, AISTATS 2020), in the form the official code optimises.

docs/methods/fenchel.md (row-major). ``X_0`` is the input batch (m samples), layers ``l = 0..L-1`` are activation layers
and layer ``L`` is affine and produces the logits. The lifted variables ``X_1..X_L`` are the layer *inputs*, stored
before any parameter-free glue of the next layer (LeNet-5 keeps them un-pooled): with ``𝒜_l`` the linear operator
of layer ``l`` (glue such as zero padding / average pooling / flatten, then the bias-free Linear or Conv2d) and
``U_l = 𝒜_l(X_l) + b_l``, the relaxed (lifted) objective is

.. math::

    J(W, X) = \sum_{l<L} 2\lambda_l \sum B_\varphi(U_l, X_{l+1}) + \mathrm{CE}_{sum}(Y, 𝒜_L(X_L) + b_L),
    \qquad X_l \in \operatorname{dom} F,

where :math:`B_\varphi(u, x) = F(x) + F^*(u) - xu \ge 0` is the Fenchel–Young gap of :mod:`liftkit.activations`
(for ReLU, ``2B`` is the official code's ``neo(X, U) = Σ(X² − 2U⊙X + (U)_+²)``, docs/methods/conventions.md §6). ``J``
is zero penalty and equal to the ordinary summed cross-entropy at the forward pass, so for fixed weights
``min_X J(W, X) <= CE_sum(W)``: the relaxation is a lower bound (paper).

Per mini-batch (official code, docs/methods/fenchel.md §5):

1. ``X_l`` re-initialised by a forward pass; the proximal anchor ``(W⁰, b⁰)`` set to the current weights;
2. ``alternations`` times: the backward X-sweep ``l = L .. 1``, each block

   * ``X_l (l < L)``: ``min 2λ_{l-1} ΣB(U_{l-1}, X_l) + 2c_lλ_l ΣB(𝒜_l X_l + b_l, X_{l+1})``,
   * ``X_L``: ``min 2λ_{L-1} ΣB(U_{L-1}, X_L) + c_L CE_sum(Y, 𝒜_L X_L + b_L)``,

   over ``X ∈ dom F``, then every weight block independently

   * ``(W_l, b_l)``: ``min 2λ_l ΣB(𝒜_l(X_l; W) + b, X_{l+1}) + ρ_d,l(‖W − W⁰‖² + ‖b − b⁰‖²) + ρ‖W‖²``
     (the output block has ``CE_sum`` in place of the penalty).

``c_l`` (``lbd_coef``) weights the downstream term of the X-objectives only; with ``c != 1`` the block steps no
longer minimise one common objective (docs/methods/fenchel.md §2.3). Loss scaling follows the official code (summed CE,
penalty ``2B``; docs/methods/conventions.md §3), so ``λ``, ``ρ_d`` and ``c`` are tied to the batch size (500 by
default).

Solvers (assumption, docs/methods/fenchel.md §4; the official code uses SciPy L-BFGS-B / L-BFGS, so results are reported
as "Fenchel (PyTorch solvers)"):

* X-blocks: projected FISTA (:func:`liftkit.solvers.projected_fista`) with step ``1/L_x``,
  ``L_x = 2λ_{l-1}·sup F'' + 2c_lλ_l κ ‖𝒜_l‖₂²`` (``+ (c_L/2)‖𝒜_L‖₂²`` for the CE block, whose Hessian in the logits
  is ``<= ½I``), ``‖𝒜_l‖₂`` by power iteration; ``'pgd'`` (projected gradient, same step) and ``'scipy_lbfgsb'``
  (the official bounded L-BFGS-B, CPU float64 reference) are selectable.
* W-blocks (default ``'mm'``): accelerated majorize–minimize in the data metric ``H = a·P̄ᵀP̄ + 2(ρ_d + ρ)I``
  (``P̄`` the glued layer input with a ones column, unfolded for convolutions; ``a`` bounds the data term's
  curvature), i.e. FISTA with unit step in the ``H``-norm, ``w_iters`` iterations (5). Each step minimises a
  quadratic upper bound of the block, so it never increases the block objective, and it is invariant to the input
  scaling that makes plain gradient steps crawl (``‖P̄‖₂²`` is ~10⁴ for a 500-image MNIST batch). The specification's
  default (docs/methods/fenchel.md §4.2), ``torch.optim.LBFGS`` (strong Wolfe, history 10, stop at ``‖∇‖_∞ <=
  w_tol·max(1, ‖∇₀‖_∞)``), is ``'lbfgs'``; a plain accelerated gradient with step ``1/L`` is ``'fista'``. How they
  compare in accuracy and time is recorded in docs/history/fenchel.md.

Cost (none of this changes what a block solves beyond rounding): within a step, the forward pass's pre-activations
feed the X-blocks' ``U_{l-1}`` and the final monitor; an ``mm`` metric and its factorisation are kept while the
block's input X_l is unchanged (the first layer's input batch: once per step, not per alternation); a fully
connected ``mm`` block with fewer samples than inputs runs in the sample space (:mod:`liftkit.methods.fenchel_mm`:
the same iterates at one m × m × out product per iteration, and for the first layer valid across alternations,
with its weights written once per step); the power iterations of the X-block steps start from the previous
step's vectors (``power_iters_warm``; kept in :meth:`Fenchel.extra_state`); ReLU / hardtanh X-blocks use a fused
projected FISTA (:func:`liftkit.methods.fenchel_ops.box_fista`). ``solve_dtype`` (``auto``: the model's dtype) is
the dtype of the ``mm`` factorisations; the products run in the model's dtype. A conv ``mm`` W-block keeps its
patches transposed; narrow ones iterate by plain products with them (``U = P̄θᵀ``, ``GᵀP̄``), wide ones by the
convolution kernels. The post-step objective terms,
which only feed the logs, are computed every ``monitor_every`` steps.

Data parallelism (docs/methods/fenchel.md §7): the lifted X_l are per sample and stay on each process's shard; the
X-blocks are column-separable given the replicated weights and step 1/L_x, so only the FISTA/PGD stopping norms are
all-reduced. W-blocks: ``mm`` all-reduces the Gram P̄ᵀP̄ (in ``solve_dtype``) once and the (W, b) data gradient
at every iteration (the sample-space form, whose m × m kernel spans the global batch, is single-process only);
``fista`` the power iteration of ‖P̄‖₂ and the gradient; ``lbfgs`` the gradient and (float64) the value of every
evaluation, so the line search takes the same decisions. The objective terms reported (and
the divergence check) are all-reduced. ``x_solver=scipy_lbfgsb`` is single-process only.

Hidden activations: ReLU (the paper's), and the other activations whose ``F`` is smooth with bounded curvature on a
closed domain, so that a projected first-order X-solver applies (leaky ReLU, hardtanh). Sigmoid, tanh, ELU and
softplus need ``F`` with unbounded curvature at the domain boundary and raise ``ValueError``.

Reference: F. Gu, A. Askari, L. El Ghaoui, "Fenchel Lifted Networks: A Lagrange Relaxation of Neural Network
Training", AISTATS 2020, PMLR 108:3362–3371, arXiv 1811.08039; code ``beeperman/Fenchel_Lifted_Networks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from liftkit.activations import Activation
from liftkit.methods.base import Method, MethodConfig, StepStats, register
from liftkit.methods.fenchel_ops import LayerOperator, box_fista
from liftkit.methods.fenchel_ops import _gram64 as _gram64  # re-exported: tests import them from here
from liftkit.methods.fenchel_ops import _patch_matrix as _patch_matrix
from liftkit.methods.fenchel_wblocks import FenchelWBlocks, _StepCache
from liftkit.models import as_chain
from liftkit.solvers import SOLVE_DTYPES, projected_fista

__all__ = ["Fenchel", "FenchelConfig", "LayerOperator"]

# Activations whose F = ∫φ⁻¹ is C¹ with bounded curvature on a closed domain: the X-blocks are then smooth
# convex problems over a box, which projected first-order methods solve with a fixed step.
SUPPORTED_ACTIVATIONS = ("relu", "leaky_relu", "hardtanh")

X_SOLVERS = ("fista", "pgd", "scipy_lbfgsb")
W_SOLVERS = ("lbfgs", "fista", "mm")
INITS = ("keep", "official")

PerLayer = float | tuple[float, ...]

#: the tuned preset's proximal anchors of an MLP (hidden ρ_d, output ρ_d). Stronger than the Config defaults
#: (10 / 30, chosen at batch 500 on MNIST): each batch's solve fits that batch closely, and at batch 100 the
#: weaker anchors let it over-fit every batch (a wide train/validation gap on Fashion-MNIST); the validation
#: figures at batch 100 and 500 are in docs/methods/fenchel.md, "Presets".
TUNED_MLP_ANCHORS: dict[str, float] = {"rho_d": 30.0, "rho_d_output": 100.0}


def _curvature_of_F(act: Activation) -> float:
    """sup F'' on dom F, i.e. 1 / inf φ' over the pre-images of the domain's interior."""
    if act.name == "leaky_relu":
        assert act.alpha is not None
        return 1.0 / act.alpha
    return 1.0


def _extended_F_prime(act: Activation, x: Tensor) -> Tensor:
    """F'(x) = φ⁻¹(x) on dom F, continued outside as the C¹ quadratic extension of F.

    FISTA evaluates gradients at extrapolated points that may leave dom F; the extension (F(x) = x²/2 beyond the
    ReLU / hardtanh bounds) keeps the gradient finite and Lipschitz without changing it on the domain.
    """
    if act.name in ("relu", "hardtanh"):
        return x  # φ⁻¹ is the identity on dom F and the extension continues it linearly
    inside = act.project(x)
    return act.inverse(inside) + (x - inside)


@dataclass
class FenchelConfig(MethodConfig):
    """Hyperparameters of Fenchel lifted networks (docs/methods/fenchel.md §2, §4, §6).

    Per-layer values are one number for every layer or a comma list: ``lambdas`` has one value per activation
    layer (``L``), ``rho_d`` one per weight layer (``L+1``, output last), ``lbd_coef`` one per layer that
    consumes a lifted variable (layers ``1..L``, output last). Scaling is the official code's (summed CE,
    penalty 2B), tied to the batch size.

    * ``lambdas``: Lagrange weights λ_l of the layer penalties (official: 1).
    * ``rho``: ridge ρ‖W‖² on the weights (official: 0).
    * ``rho_d``: proximal anchor weight ρ_d‖W − W⁰‖² to the weights at the start of each batch.
    * ``rho_d_output``: when set, overrides the output layer's ρ_d (so one number for the hidden layers and one
      for the output reproduce the official FC script's 10 / 100); ``none`` keeps ``rho_d``'s value.
    * ``lbd_coef``: c_l, extra weight on the downstream term of the X-objectives (1 = the pure method).
    * ``alternations``: X-sweep + W-sweep rounds per batch (official scripts: 1).
    * ``x_solver``: ``fista`` (default), ``pgd`` or ``scipy_lbfgsb`` (official L-BFGS-B; CPU float64, slow).
    * ``x_iters`` / ``x_tol``: per-block iteration cap and relative-change stop ‖ΔX‖ <= x_tol‖X‖.
    * ``w_solver``: ``mm`` (default: accelerated majorize–minimize in the data metric, see
      :meth:`Fenchel._w_block_mm`), ``lbfgs`` (torch.optim.LBFGS, strong Wolfe, history 10; the specification's default,
      docs/methods/fenchel.md §4.2) or ``fista`` (plain accelerated gradient, step 1/L).
    * ``w_iters`` / ``w_tol``: per-block iteration cap; stop at ‖Δθ‖ <= w_tol‖θ‖ (``mm``, ``fista``) or at the
      gradient test above (``lbfgs``).
    * ``power_iters``: power iterations for the operator norms in the FISTA steps (×1.05 safety), from a fixed
      start vector; ``power_iters_warm``: the iterations once the previous step's vector of the same layer is
      known (it is kept with the method's state, so a resumed run takes the same steps).
    * ``solve_dtype``: ``auto`` (the model's dtype for float32 / float64 models; otherwise float64 on the CPU,
      float32 on CUDA), ``float64`` or ``float32``: the dtype in which the ``mm`` W-blocks factorise their data
      metric (:mod:`liftkit.methods.fenchel_mm`; a float32 Cholesky that breaks down is redone in float64);
      products run in the model's dtype either way.
    * ``monitor``: ``basic`` reports the relaxed objective after the step; ``full`` also reports it after each
      X-sweep (``relaxed_objective_after_x``, one more pass over the lifted layers per alternation).
    * ``monitor_every``: compute those objective terms (``relaxed_objective``, ``loss_after``, ``penalty_l*``;
      a forward pass of the updated network and the layer penalties) on every k-th step only, the first included;
      they feed the logs, not the training. The other steps report the iteration counts and weight norms, and
      test the updated weights for finiteness instead (the divergence check).
    * ``init``: ``keep`` (default: train the model's own initial weights, so benchmarks are like for like) or
      ``official`` (re-initialise at construction as the official code: Xavier-uniform FC weights, truncated
      normal σ=0.1 conv weights, biases 0.1).

    Defaults (assumption): λ 1, ρ 0 and c 1 are the pure method; ρ_d 10 (hidden) / 30 (output), 20 FISTA
    iterations per X-block and 5 ``mm`` iterations per W-block were chosen on the MNIST validation split at batch
    500 for 784-300-10 (docs/history/fenchel.md). The official scripts' values are in ``configs/fenchel-*.json``.
    LeNet-5 wants far weaker hidden anchors: its validation split preferred the official hidden ρ_d divided by 100
    (1e-6 / 1e-4 / 1e-2 / 1e-2) with the official output anchor 10 and c 1 (``configs/fenchel-*-lenet5-tuned.json``;
    the MNIST one also uses 20 X-iterations and c 0.3 / 0.3 / 1 / 1, which gained 0.2 pt on validation over 3 epochs);
    its fc layers have fewer inputs than a batch has samples, so their W-blocks are well posed without much damping,
    while a weak output anchor lets ‖W_L‖ grow until the X_L-block's step 1/L_x stalls the lower layers.
    """

    lambdas: PerLayer = 1.0
    rho: float = 0.0
    rho_d: PerLayer = 10.0
    rho_d_output: float | None = 30.0
    lbd_coef: PerLayer = 1.0
    alternations: int = 2
    x_solver: str = "fista"
    x_iters: int = 20
    x_tol: float = 5e-4
    w_solver: str = "mm"
    w_iters: int = 5
    w_tol: float = 1e-5
    power_iters: int = 20
    power_iters_warm: int = 5
    solve_dtype: str = "auto"
    init: str = "keep"
    monitor: str = "basic"
    monitor_every: int = 10

    def validate(self) -> None:
        self._positive("lambdas", "lbd_coef", "x_tol", "w_tol")
        self._nonnegative("rho")
        if self.rho_d_output is not None:
            self._nonnegative("rho_d_output")
        values = self.rho_d if isinstance(self.rho_d, tuple | list) else (self.rho_d,)
        if not values or any(
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0 for v in values
        ):
            raise ValueError(f"rho_d must be non-negative finite numbers, got {self.rho_d!r}")
        for name in ("lambdas", "lbd_coef"):
            v = getattr(self, name)
            if isinstance(v, tuple | list) and not v:
                raise ValueError(f"{name} must be a number or a non-empty comma list, got {v!r}")
        self._int_at_least("alternations", 1)
        self._int_at_least("x_iters", 1)
        self._int_at_least("w_iters", 1)
        self._int_at_least("power_iters", 1)
        self._int_at_least("power_iters_warm", 1)
        self._int_at_least("monitor_every", 1)
        self._choice("solve_dtype", SOLVE_DTYPES)
        self._choice("x_solver", X_SOLVERS)
        self._choice("w_solver", W_SOLVERS)
        self._choice("init", INITS)
        self._choice("monitor", ("basic", "full"))


def _per_layer(value: PerLayer, count: int, name: str, meaning: str) -> list[float]:
    if isinstance(value, tuple | list):
        if len(value) == 1:
            return [float(value[0])] * count
        if len(value) != count:
            raise ValueError(
                f"{name} has {len(value)} values but this model needs 1 or {count} ({meaning}); got {tuple(value)}"
            )
        return [float(v) for v in value]
    return [float(value)] * count


@register
class Fenchel(FenchelWBlocks, Method):
    """Fenchel lifted networks: block-coordinate descent on the Lagrange relaxation (see the module docstring)."""

    name = "fenchel"
    Config = FenchelConfig
    config: FenchelConfig
    default_loss = "ce"
    supported_losses = ("ce",)
    model_output_activation = None
    reporting_name = "Fenchel (PyTorch solvers)"
    paper = (
        "Gu, Askari, El Ghaoui, Fenchel Lifted Networks: A Lagrange Relaxation of Neural Network Training, "
        "AISTATS 2020 (arXiv 1811.08039)"
    )
    default_batch_size = 500
    supports_data_parallel = True

    @classmethod
    def preset_values(cls, preset: str, model: nn.Module) -> dict[str, Any]:
        """``paper``: the official scripts' settings (docs/methods/fenchel.md, Presets), for an MLP or for
        LeNet-5; ``tuned``: the stronger MLP anchors :data:`TUNED_MLP_ANCHORS` over the Config defaults for MLPs,
        and the validation-tuned LeNet-5 setting for convolutional models, whose fc layers are well posed with far
        weaker hidden anchors."""
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        linears = sum(isinstance(m, nn.Linear) for m in model.modules())
        hidden = convs + linears - 1  # activation layers L; weight layers L + 1
        if preset == "paper":
            common: dict[str, Any] = {"lambdas": 1.0, "rho": 0.0, "alternations": 1, "init": "official", "x_tol": 1e-6}
            if convs == 0:
                coef: float | tuple[float, ...] = 10.0 if hidden == 1 else (1.0,) * (hidden - 1) + (10.0,)
                return {**common, "rho_d": 10.0, "rho_d_output": 100.0, "lbd_coef": coef}
            anchors = tuple(float(f"{1e-4 * 100.0**k:.0e}") for k in range(convs)) + (1.0,) * (linears - 1) + (10.0,)
            lenet = (1.0, 5.0, 1.0, 5.0) if (convs, linears) == (2, 3) else 1.0
            return {**common, "rho_d": anchors, "rho_d_output": 10.0, "lbd_coef": lenet, "x_iters": 5}
        if convs == 0:
            return dict(TUNED_MLP_ANCHORS)
        anchors = tuple(float(f"{1e-6 * 100.0**k:.0e}") for k in range(convs)) + (1e-2,) * (linears - 1) + (10.0,)
        coef = (0.3,) * convs + (1.0,) * (hidden - convs)
        return {"rho_d": anchors, "rho_d_output": 10.0, "lbd_coef": coef, "alternations": 1, "x_iters": 20}

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.chain = as_chain(
            model, method=self.name, allow_conv=True, allowed_activations=SUPPORTED_ACTIVATIONS
        )
        self.L = len(self.chain) - 1
        if self.chain[-1].activation is not None:
            raise ValueError(
                f"fenchel needs bare logits from the last layer (affine output with cross-entropy); remove the "
                f"{self.chain[-1].activation.name} after module {self.chain[-1].index}"
            )
        for layer in self.chain:
            if isinstance(layer.linear, nn.Conv2d) and layer.linear.groups != 1:
                # the W-blocks' data metric is built from full im2col patches, i.e. for groups=1
                raise ValueError(
                    f"fenchel cannot train module {layer.index} (Conv2d with groups={layer.linear.groups}); "
                    "use groups=1"
                )
            if layer.bias is None:
                raise ValueError(
                    f"fenchel needs a bias in module {layer.index} ({type(layer.linear).__name__}); "
                    "build the layer with bias=True"
                )
        c = self.config
        self.lambdas = _per_layer(c.lambdas, self.L, "lambdas", "one per activation layer")
        self.rho_d = _per_layer(c.rho_d, self.L + 1, "rho_d", "one per weight layer, output last")
        if c.rho_d_output is not None:
            self.rho_d[-1] = float(c.rho_d_output)
        self.lbd_coef = _per_layer(c.lbd_coef, self.L, "lbd_coef", "one per layer after the first, output last")
        self._ops: list[LayerOperator] | None = None
        self._ops_key: tuple[int, ...] | None = None
        self._cache: _StepCache | None = None
        self._weight_version = [0] * (self.L + 1)
        # the last power-iteration vector of each X-block's operator, the warm start of the next step's estimate
        self._power_vectors: dict[int, Tensor] = {}
        self._patch_buffers: dict[int, Tensor] = {}
        if c.init == "official":
            self._official_init()

    # -- data parallelism (docs/methods/fenchel.md §7) -----------------------------------------------------------------
    def single_process_only(self) -> str | None:
        if self.config.x_solver == "scipy_lbfgsb":
            return (
                "fenchel with x_solver=scipy_lbfgsb runs in a single process only (L-BFGS-B couples the samples "
                "of a block through its inner products); use x_solver=fista or pgd under torchrun"
            )
        return None

    # -- state ------------------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """The warm starts of the power iterations (so that a resumed run takes bit-identical steps)."""
        return {"power_vectors": {str(l): v.detach().clone() for l, v in self._power_vectors.items()}}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        vectors = state.get("power_vectors", {})
        unknown = sorted(set(state) - {"power_vectors"})
        if unknown:
            raise ValueError(f"fenchel has no extra state {unknown}; expected only 'power_vectors'")
        weight = self.chain[0].linear.weight
        self._power_vectors = {
            int(l): torch.as_tensor(v, dtype=weight.dtype, device=weight.device) for l, v in vectors.items()
        }

    # -- setup ------------------------------------------------------------------------------------------------------
    def _official_init(self) -> None:
        with torch.no_grad():
            for layer in self.chain:
                W = layer.linear.weight
                if layer.is_conv:
                    nn.init.trunc_normal_(W, std=0.1, a=-0.2, b=0.2)
                else:
                    nn.init.xavier_uniform_(W)
                assert layer.linear.bias is not None
                layer.linear.bias.fill_(0.1)

    def operators(self, x: Tensor) -> list[LayerOperator]:
        """The per-layer operators 𝒜_l for inputs shaped like ``x`` (cached per input shape)."""
        key = tuple(x.shape[1:])
        if self._ops is None or self._ops_key != key:
            ops = []
            shape: tuple[int, ...] = key
            for layer in self.chain:
                op = LayerOperator(layer, shape)
                ops.append(op)
                shape = op.out_shape
            self._ops, self._ops_key = ops, key
        return self._ops

    def _act(self, l: int) -> Activation:
        act = self.chain[l].activation
        assert act is not None
        return act

    # -- the relaxed problem ---------------------------------------------------------------------------------------
    def lift(self, x: Tensor) -> list[Tensor]:
        """Forward initialisation ``[X_0, X_1, .., X_L]`` (X_l the stored input of layer l)."""
        self.operators(x)
        xs = [x]
        with torch.no_grad():
            for l in range(self.L):
                xs.append(self._act(l).phi(self._preact(l, xs)))
        return xs

    def _preact(self, l: int, xs: Sequence[Tensor]) -> Tensor:
        """U_l = 𝒜_l(X_l) + b_l at the current weights, from the step's cache where it is still valid."""
        cache = self._cache
        hit = None if cache is None else cache.preact.get(l)
        if hit is not None and hit[0] is xs[l] and hit[1] == self._weight_version[l]:
            return hit[2]
        U = self.operators(xs[0])[l].apply(xs[l])
        if cache is not None:
            cache.preact[l] = (xs[l], self._weight_version[l], U)
        return U

    def _weights_changed(self, l: int) -> None:
        """Invalidate the cached pre-activations of layer l (its weights were written)."""
        self._weight_version[l] += 1

    def layer_penalties(self, xs: Sequence[Tensor]) -> list[float]:
        """Σ B_φ(U_l, X_{l+1}) for l < L (float64 sums; zero at the forward pass)."""
        with torch.no_grad():
            return [self._act(l).penalty_sum(self._preact(l, xs), xs[l + 1]) for l in range(self.L)]

    def relaxed_objective(self, xs: Sequence[Tensor], y: Tensor, penalties: Sequence[float] | None = None) -> float:
        """J(W, X) = Σ_l 2λ_l ΣB(U_l, X_{l+1}) + CE_sum (no anchor/ridge terms, no c_l): the lower bound.

        ``penalties`` may pass in :meth:`layer_penalties` already computed at the same point.
        """
        with torch.no_grad():
            z = self._preact(self.L, xs)
            ce = float(tF.cross_entropy(z, y, reduction="sum").double())
        pens = self.layer_penalties(xs) if penalties is None else penalties
        return ce + sum(2.0 * lam * p for lam, p in zip(self.lambdas, pens))

    # X-blocks -------------------------------------------------------------------------------------------------
    def x_block_objective(self, l: int, xs: Sequence[Tensor], y: Tensor, X: Tensor) -> Tensor:
        """Objective of the X_l block (1 <= l <= L) at X, others fixed at ``xs`` (float64 scalar tensor)."""
        ops = self.operators(xs[0])
        act = self._act(l - 1)
        U_prev = self._preact(l - 1, xs)
        value = 2.0 * self.lambdas[l - 1] * act.penalty(U_prev, X).sum(dtype=torch.float64)
        U = ops[l].apply(X)
        if l == self.L:
            return value + self.lbd_coef[l - 1] * tF.cross_entropy(U, y, reduction="sum").double()
        return value + 2.0 * self.lbd_coef[l - 1] * self.lambdas[l] * self._act(l).penalty(
            U, xs[l + 1]
        ).sum(dtype=torch.float64)

    def _x_block_parts(
        self, l: int, xs: Sequence[Tensor], y_onehot: Tensor
    ) -> tuple[Callable[[Tensor], Tensor], float]:
        """Gradient of the X_l block objective (extended smoothly outside dom F) and its Lipschitz constant."""
        ops = self.operators(xs[0])
        act = self._act(l - 1)
        lam_prev = self.lambdas[l - 1]
        coef = self.lbd_coef[l - 1]
        op = ops[l]
        U_prev = self._preact(l - 1, xs)
        with self.block("power_iteration"):
            start = self._power_vectors.get(l)
            iters = self.config.power_iters if start is None else self.config.power_iters_warm
            norm, self._power_vectors[l] = op.norm_and_vector(iters, start)
        if l == self.L:

            def grad(X: Tensor) -> Tensor:
                Z = op.apply(X)
                return 2.0 * lam_prev * (_extended_F_prime(act, X) - U_prev) + coef * op.adjoint(
                    torch.softmax(Z, dim=1) - y_onehot
                )

            lipschitz = 2.0 * lam_prev * _curvature_of_F(act) + 0.5 * coef * norm**2
        else:
            act_next = self._act(l)
            target = xs[l + 1]
            weight = 2.0 * coef * self.lambdas[l]

            def grad(X: Tensor) -> Tensor:
                U = op.apply(X)
                return 2.0 * lam_prev * (_extended_F_prime(act, X) - U_prev) + weight * op.adjoint(
                    act_next.grad_u(U, target)
                )

            lipschitz = 2.0 * lam_prev * _curvature_of_F(act) + weight * act_next.kappa * norm**2
        return grad, lipschitz

    def solve_x_block(self, l: int, xs: list[Tensor], y: Tensor) -> tuple[Tensor, int]:
        """Minimise the X_l block from the current ``xs[l]``; returns (new X_l, iterations)."""
        c = self.config
        act = self._act(l - 1)
        y_onehot = tF.one_hot(y, self.chain[-1].linear.weight.shape[0]).to(xs[l].dtype)
        if c.x_solver == "scipy_lbfgsb":
            return self._x_block_lbfgsb(l, xs, y, act)
        if c.x_solver == "fista" and act.name in ("relu", "hardtanh"):
            return self._x_block_box_fista(l, xs, y_onehot)
        grad, lipschitz = self._x_block_parts(l, xs, y_onehot)

        def prox(v: Tensor, t: float) -> Tensor:
            return act.project(v)

        reduce = self._reduce
        if c.x_solver == "fista":
            X, iters, _ = projected_fista(grad, lipschitz, prox, xs[l], c.x_iters, c.x_tol, sq_sum=reduce)
            return X, iters
        X = xs[l]
        step = 1.0 / lipschitz
        iters = 0
        while iters < c.x_iters:
            X_new = act.project(X - step * grad(X))
            iters += 1
            if reduce is None:
                done = float((X_new - X).norm()) <= c.x_tol * float(X.norm())
            else:
                sq = reduce(torch.stack([(X_new - X).pow(2).sum(), X.pow(2).sum()]).to(torch.float64))
                done = math.sqrt(float(sq[0])) <= c.x_tol * math.sqrt(float(sq[1]))
            X = X_new
            if done:
                break
        return X, iters

    def _x_block_box_fista(self, l: int, xs: list[Tensor], y_onehot: Tensor) -> tuple[Tensor, int]:
        """Projected FISTA on the X_l block with the fused iteration of :func:`box_fista` (ReLU / hardtanh: F' is
        the identity on the extension); the same iterates as the generic path up to rounding."""
        c = self.config
        act = self._act(l - 1)
        op = self.operators(xs[0])[l]
        _, lipschitz = self._x_block_parts(l, xs, y_onehot)
        step = 1.0 / lipschitz
        alpha = 2.0 * self.lambdas[l - 1] * step
        coef = self.lbd_coef[l - 1]
        if l == self.L:
            scale = -step * coef

            def descend_(out: Tensor, V: Tensor) -> None:
                op.adjoint_add_(out, torch.softmax(op.apply(V), dim=1).sub_(y_onehot), scale)

        else:
            act_next, target = self._act(l), xs[l + 1]
            scale = -step * 2.0 * coef * self.lambdas[l]

            def descend_(out: Tensor, V: Tensor) -> None:
                op.adjoint_add_(out, act_next.grad_u(op.apply(V), target), scale)

        lo, hi = act.domain

        def project_(X: Tensor) -> Tensor:
            return X.clamp_(min=lo) if math.isinf(hi) else X.clamp_(lo, hi)

        anchor = alpha * self._preact(l - 1, xs)
        return box_fista(descend_, anchor, 1.0 - alpha, project_, xs[l], c.x_iters, c.x_tol, self._reduce)

    def _x_block_lbfgsb(self, l: int, xs: list[Tensor], y: Tensor, act: Activation) -> tuple[Tensor, int]:
        """The official X-solver: SciPy L-BFGS-B with the domain as bounds (float64 on the CPU)."""
        import numpy as np
        from scipy.optimize import minimize

        shape, dtype, device = xs[l].shape, xs[l].dtype, xs[l].device
        lo, hi = act.domain
        bounds = [(None if math.isinf(lo) else lo, None if math.isinf(hi) else hi)] * xs[l].numel()

        def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
            X = torch.from_numpy(flat).to(device=device, dtype=dtype).reshape(shape).requires_grad_(True)
            with torch.enable_grad():
                value = self.x_block_objective(l, xs, y, X)
                (g,) = torch.autograd.grad(value, X)
            return float(value.detach()), g.detach().double().cpu().numpy().ravel()

        x0 = xs[l].detach().double().cpu().numpy().ravel()
        res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": self.config.x_iters})
        X = torch.from_numpy(res.x).to(device=device, dtype=dtype).reshape(shape)
        return act.project(X), int(res.nit)

    # -- the step ---------------------------------------------------------------------------------------------------
    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"fenchel: x has {x.shape[0]} samples but y has {y.shape[0]}; pass matching batches")
        if y.dtype.is_floating_point or y.ndim != 1:
            raise ValueError("fenchel trains classifiers: y must be a 1-D tensor of integer class labels")
        n_classes = self.chain[-1].linear.weight.shape[0]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(f"fenchel: labels must lie in [0, {n_classes}); got {int(y.min())}..{int(y.max())}")

    @staticmethod
    def _check_finite_input(x: Tensor) -> None:
        # A scan of the whole batch, run only after something came out non-finite (the lifted loss, or the
        # step's weights): a NaN input always reaches the loss, an inf one at the latest the first W-block.
        if not bool(torch.isfinite(x).all()):
            raise ValueError("fenchel: the input batch contains NaN or inf; clean the data")

    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        self._check_batch(x, y)
        x = x.to(device=self.device, dtype=self.dtype)
        y = y.to(self.device).long()
        self.model.train()
        anchors = [(layer.linear.weight.detach().clone(), layer.linear.bias.detach().clone())  # type: ignore[union-attr]
                   for layer in self.chain]
        # the post-step objective terms only feed the logs: every monitor_every-th step (the first included)
        monitored = self.steps_taken % self.config.monitor_every == 0
        terms: tuple[float, float, list[float], int] | None = None
        self._cache = _StepCache()
        try:
            with torch.no_grad():
                with self.block("lift"):
                    xs = self.lift(x)
                    loss = float(tF.cross_entropy(self._preact(self.L, xs), y))
                if not math.isfinite(loss):
                    self._check_finite_input(x)
                try:
                    x_iters, w_iters, relaxed_after_x = self._sweeps(xs, y, anchors, monitored)
                except (ArithmeticError, RuntimeError):  # a factorisation that met an inf input, among others
                    if not bool(torch.isfinite(x).all()):
                        self._restore(anchors, x)  # raises the input error
                    raise
                with self.block("monitor"):
                    if monitored:
                        terms = self._objective_terms(xs, y)
                        finite = math.isfinite(terms[0]) and math.isfinite(terms[1])
                    else:
                        finite = self._weights_finite()
        finally:
            self._cache = None
        if not finite:
            self._restore(anchors, x)
        self.steps_taken += 1
        info: dict[str, float] = {}
        if terms is not None:
            relaxed, loss_after, pens, m = terms
            info["relaxed_objective"] = relaxed / m
            if self.config.monitor == "full":
                info["relaxed_objective_after_x"] = relaxed_after_x / m
            info["loss_after"] = loss_after
            for l in range(self.L):
                info[f"penalty_l{l}"] = pens[l] / m
        for l in range(1, self.L + 1):
            info[f"x_iters_l{l}"] = float(x_iters[l])
        for l in range(self.L + 1):
            info[f"w_iters_l{l}"] = float(w_iters[l])
            info[f"w_norm_l{l}"] = float(self.chain[l].linear.weight.detach().norm())
        return StepStats(loss=loss, info=info)

    def _weights_finite(self) -> bool:
        """Whether every weight and bias is finite: the divergence test of a step without the monitor (the weights
        are replicated, so every process takes the same decision)."""
        total = 0.0
        for layer in self.chain:
            total += float(layer.linear.weight.detach().sum()) + float(layer.linear.bias.detach().sum())  # type: ignore[union-attr]
        return math.isfinite(total)

    def _restore(self, anchors: Sequence[tuple[Tensor, Tensor]], x: Tensor) -> None:
        """Put the batch-start weights back and raise: the input was not finite, or the relaxed problem diverged."""
        with torch.no_grad():
            for l, (layer, (W0, b0)) in enumerate(zip(self.chain, anchors)):
                layer.linear.weight.copy_(W0)
                layer.linear.bias.copy_(b0)  # type: ignore[union-attr]
                self._weights_changed(l)
        self._check_finite_input(x)
        raise FloatingPointError(
            "fenchel: the relaxed problem produced non-finite values (weights restored to the batch start); "
            "increase rho_d or lower lbd_coef/lambdas"
        )

    def _sweeps(
        self, xs: list[Tensor], y: Tensor, anchors: Sequence[tuple[Tensor, Tensor]], monitored: bool = True
    ) -> tuple[list[int], list[int], float]:
        """``alternations`` rounds of the backward X-sweep and the W-sweep; returns the iteration counts per
        block and the relaxed objective after the last X-sweep (``monitor=full`` on a monitored step, else NaN)."""
        x_iters = [0] * (self.L + 1)
        w_iters = [0] * (self.L + 1)
        relaxed_after_x = math.nan
        for _ in range(self.config.alternations):
            for l in range(self.L, 0, -1):
                with self.block(f"x_block[{l}]"):
                    xs[l], its = self.solve_x_block(l, xs, y)
                x_iters[l] += its
            if self.config.monitor == "full" and monitored:
                relaxed_after_x = self.relaxed_objective(xs, y)
                if self.comm.world_size > 1:
                    relaxed_after_x = self.comm.sum_scalars(relaxed_after_x)[0]
            for l in range(self.L + 1):
                W0, b0 = anchors[l]
                with self.block(f"w_block[{l}]"):
                    # no X-block reads the first layer's weights (only its pre-activation, which stays cached)
                    w_iters[l] += self.solve_w_block(l, xs, y, W0, b0, defer_write=l == 0)
        self._flush_weights()
        return x_iters, w_iters, relaxed_after_x

    def _forward_logits(self, xs: Sequence[Tensor]) -> Tensor:
        """The network's logits on the batch X_0 (a plain forward pass, reusing the cached U_0)."""
        ops = self.operators(xs[0])
        U = self._preact(0, xs)
        for l in range(1, self.L + 1):
            U = ops[l].apply(self._act(l - 1).phi(U))
        return U.reshape(xs[0].shape[0], -1)

    def _objective_terms(self, xs: Sequence[Tensor], y: Tensor) -> tuple[float, float, list[float], int]:
        """(relaxed objective J, mean CE of the updated network, Σ B per layer, batch size) after the step, all
        of the global batch in data-parallel mode (one float64 all-reduce): they decide the divergence branch of
        :meth:`step`, so every process must see the same numbers."""
        m = xs[0].shape[0]
        pens = self.layer_penalties(xs)
        if self.comm.world_size == 1:
            relaxed = self.relaxed_objective(xs, y, pens)
            return relaxed, float(tF.cross_entropy(self._forward_logits(xs), y)), pens, m
        m_global = self.global_batch_size(m)
        ce = float(tF.cross_entropy(self._preact(self.L, xs), y, reduction="sum").double())
        after_sum = float(tF.cross_entropy(self._forward_logits(xs), y, reduction="sum"))
        ce, after_sum, *pens = self.comm.sum_scalars(ce, after_sum, *pens)
        relaxed = ce + sum(2.0 * lam * p for lam, p in zip(self.lambdas, pens))
        return relaxed, after_sum / m_global, list(pens), m_global
