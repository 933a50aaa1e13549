r"""ProxProp: proximal backpropagation (Frerix, Möllenhoff, Moeller, Cremers; ICLR 2018).

Backprop is a sequence of explicit gradient steps on a penalty formulation of the network (paper, Prop. 1);
ProxProp makes the parameter step of every hidden linear map implicit. For a hidden Linear or Conv2d layer
with saved input ``a``, output ``z`` and backprop signal ``G = ∂J/∂z`` (J the **mean** loss over the batch),
the layer solves the linear-layer prox (METHODS.md §1.3, §4.3–§4.5; row-major, Ā = [a, 1], Θ = [Wᵀ; bᵀ])

.. math::

    \Theta_{\mathrm{prox}} = \arg\min_\Theta \tfrac12\|\bar A\Theta - (z - G)\|^2
        + \tfrac{1}{2\tau_\theta}\|\Theta - \Theta_{\mathrm{old}}\|^2 ,
    \qquad
    \Theta_{\mathrm{old}} - \Theta_{\mathrm{prox}} = (\bar A^\top\bar A + \beta I)^{-1}\nabla_\Theta J
        = \bar A^\top(\bar A\bar A^\top + \beta I_N)^{-1} G ,\quad \beta = 1/\tau_\theta ,

where the data term is an unnormalised **sum** over the batch while G comes from the mean loss (§0.3). The
difference is written into the parameters' ``.grad`` and the wrapped ``torch.optim`` optimizer steps with
``lr = τ``; with plain SGD this is θ ← θ − τ M⁻¹∇J, M = I/τ_θ + (∇φ)(∇φ)* (paper, Prop. 2). The last
Linear/Conv2d layer keeps the explicit gradient (the CE prox has no closed form), and the backward signal
stays exactly backprop's: autograd computes ``grad_input`` with the old weights, and the weight gradients of
ProxProp layers are never formed (the solve replaces them).

Solvers (``solver``):

* ``exact``: Linear layers: Cholesky in float64 on the (n+1)×(n+1) Gram (``form="gram"``) or the N×N
  push-through system (``"push_through"``, then W.grad = Zᵀa in the model's dtype); ``"auto"`` picks the
  smaller.
  Conv2d layers: one shared Gram of the unfolded input, PᵀP + βI, accumulated in float64 over row chunks, one
  right-hand side per output channel. This conv solve is our addition (derived; in neither paper nor code) and
  is reported as ``ProxProp (exact-unfold)``.
* ``cg`` (with ``cg_iters``), or ``cgN`` as a shorthand: the official warm-started block CG (§4.6): one CG per
  output neuron of a Linear layer, and one CG per Conv2d layer over all its parameters flattened into one
  vector. Solved in difference form d = θ_old − θ from d₀ = 0, which is the official warm start x₀ = θ_old
  with the same iterates; stopping rule max_j‖r_j‖² < cg_tol²·mean_j‖r_{j,0}‖² (``cg_stop="tol"``,
  official) or exactly ``cg_iters`` iterations (``cg_stop="fixed"``, assumption, for timing). cg1 is the
  Cauchy-scaled gradient.
* ``gradient``: ``.grad = ∇J`` through the same code path: plain backprop, the paper's timing control.

Every direction is a descent direction (paper, Props. 4–5); ``StepStats.info`` reports per layer (key suffix:
the module index in the Sequential) the cosine between the direction and ∇J (``cos_i``, positive), CG
iterations (``cg_iters_i``) and, with ``residuals=True``, the relative residual of the normal equations
(``residual_i``). A non-finite batch loss returns ``loss=nan`` with the parameters left unchanged.

Data parallelism (METHODS.md §7): J is the global batch's mean (the shard's loss sum over m_global), so a
rank's a, z and G are its rows of the single-process ones and never move. What is all-reduced per layer: the
exact linear solve's ĀᵀĀ and ĀᵀG (float64, one call; the Gram form is used whatever ``form`` says, because
push-through needs the whole batch's N×N Gram), the conv solve's PᵀP and PᵀG_flat, CG's right-hand side
once and Aᵀ(Av) in every iteration, ``gradient``'s AᵀG; the last layer's gradient goes with the loss in one
all-reduce. Every rank then solves the same system, so the weights stay replicated.

Defaults: ``exact`` + Adam (lr 1e-3), τ_θ = 0.02, batch 100: the setting that trained best at batch 100 on the
MNIST validation split (docs/results/proxprop.md). The paper's settings ship as configs: the MLP uses SGD with
Nesterov momentum 0.95, lr = τ = 1, batch 500, τ_θ = 0.05; the ConvNet Adam 1e-3, τ_θ = 1, cg3/cg10.

Modules: any parameter-free module (ReLU, pooling, Flatten, Dropout...) is fine because autograd carries the
backward signal; a ProxProp layer's input and output come from the same (possibly stochastic) forward pass, so
dropout masks stay consistent. Modules with parameters other than top-level Linear/Conv2d are rejected.
Conv2d needs groups = 1, zero padding given as integers, and ``padding_mode="zeros"``.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from liftkit.methods.base import Method, MethodConfig, StepStats, evaluate_loss, register
from liftkit.solvers import (
    block_cg,
    linear_prox_direction,
    push_through_coefficients,
    spd_ridge_solve,
)

__all__ = ["ProxProp", "ProxPropConfig"]

_CG_NAME = re.compile(r"^cg(\d+)$")
_FORMS = ("auto", "gram", "push_through")


def _resolve_optimizer(name: str) -> type[torch.optim.Optimizer]:
    wanted = name.lower()
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
            and attr.lower() == wanted
        ):
            return obj
    raise ValueError(f"optimizer {name!r} is not a torch.optim optimizer; use e.g. adam, sgd, adamw, rmsprop")


@dataclass
class ProxPropConfig(MethodConfig):
    """ProxProp hyperparameters (METHODS.md §4.8).

    ``lr`` is the step size τ of the wrapped optimizer; ``tau_theta`` the proximal step τ_θ (β = 1/τ_θ, the
    Gram is a sum over the batch, so retune it when the batch size changes). ``solver``: ``exact`` |
    ``cg`` | ``cgN`` (N iterations, overrides ``cg_iters``) | ``gradient``. ``form`` picks the exact linear
    solve (``auto``: push-through when the batch is smaller than n+1). ``diagnostics=False`` skips the cosine
    (one N×N×q product per exact push-through layer, noticeable at batch 500). ``unfold_chunk_rows`` bounds
    the rows of the unfolded conv input held at once. The optimizer settings (momentum, nesterov, betas, eps,
    weight_decay) are passed to the ``torch.optim`` class named by ``optimizer`` when it accepts them; setting
    one it does not accept is an error.
    """

    solver: str = "exact"
    tau_theta: float = 0.02
    cg_iters: int = 3
    cg_tol: float = 1e-2
    cg_eps: float = 1e-6
    cg_stop: str = "tol"
    form: str = "auto"
    unfold_chunk_rows: int = 65536
    residuals: bool = False
    diagnostics: bool = True
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self) -> None:
        match = _CG_NAME.match(self.solver) if isinstance(self.solver, str) else None
        if match is None and self.solver not in ("exact", "cg", "gradient"):
            raise ValueError(
                f"solver must be exact, cg, cgN (e.g. cg3) or gradient; got {self.solver!r}"
            )
        self._int_at_least("cg_iters", 1)
        if match is not None and int(match.group(1)) < 1:
            raise ValueError(f"solver {self.solver!r} needs at least one CG iteration, e.g. cg1")
        self._positive("tau_theta", "cg_tol", "lr", "eps")
        self._nonnegative("cg_eps", "momentum", "weight_decay")
        self._choice("cg_stop", ("tol", "fixed"))
        self._choice("form", _FORMS)
        self._int_at_least("unfold_chunk_rows", 1)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        cls = _resolve_optimizer(self.optimizer)
        if cls is torch.optim.LBFGS:
            raise ValueError("optimizer lbfgs needs a loss closure and cannot consume ProxProp directions; "
                             "use adam or sgd")
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {f.name: f.default for f in fields(self)}
        for key, param in (("momentum", "momentum"), ("nesterov", "nesterov"), ("beta1", "betas"),
                           ("beta2", "betas"), ("eps", "eps"), ("weight_decay", "weight_decay")):
            if param not in accepted and getattr(self, key) != defaults[key]:
                raise ValueError(f"optimizer {self.optimizer} does not take {key}; drop it or choose an "
                                 "optimizer that does (sgd: momentum/nesterov, adam: beta1/beta2/eps)")
        if self.nesterov and self.momentum == 0:
            raise ValueError(
                "nesterov=true needs momentum > 0; set momentum=0.95 (the paper's) or nesterov=false"
            )

    @property
    def iterations(self) -> int:
        """CG iterations: N of ``cgN``, else ``cg_iters``."""
        match = _CG_NAME.match(self.solver)
        return int(match.group(1)) if match else self.cg_iters

    @property
    def mode(self) -> str:
        """``exact``, ``cg`` or ``gradient``."""
        return "cg" if _CG_NAME.match(self.solver) else self.solver

    def optimizer_kwargs(self) -> dict[str, Any]:
        accepted = inspect.signature(_resolve_optimizer(self.optimizer).__init__).parameters
        kwargs: dict[str, Any] = {"lr": self.lr}
        candidates: dict[str, Any] = {
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "betas": (self.beta1, self.beta2),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }
        kwargs.update({k: v for k, v in candidates.items() if k in accepted})
        return kwargs


@dataclass
class _Layer:
    """One ProxProp layer: its module and where it sits in the Sequential."""

    index: int
    module: nn.Linear | nn.Conv2d


def _check_model(model: nn.Module) -> tuple[list[_Layer], list[nn.Parameter]]:
    """The ProxProp layers (every top-level Linear/Conv2d but the last) and the explicitly trained
    parameters."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"proxprop needs an nn.Sequential model, got {type(model).__name__}")
    linear_layers: list[_Layer] = []
    for i, module in enumerate(model):
        where = f"module {i} ({type(module).__name__})"
        if isinstance(module, nn.Linear | nn.Conv2d):
            if isinstance(module, nn.Conv2d):
                if module.groups != 1:
                    raise ValueError(
                        f"proxprop cannot train {where}: grouped convolutions are not supported; use groups=1"
                    )
                if module.padding_mode != "zeros":
                    raise ValueError(f"proxprop cannot train {where}: padding_mode must be 'zeros'")
                if isinstance(module.padding, str):
                    raise ValueError(f"proxprop cannot train {where}: give the padding as integers, not "
                                     f"{module.padding!r}")
            linear_layers.append(_Layer(i, module))
            continue
        if any(True for _ in module.parameters()):
            raise ValueError(
                f"proxprop cannot train {where}: only top-level Linear/Conv2d layers may hold parameters "
                "(activations, pooling, flatten and dropout are fine)"
            )
    if len(linear_layers) < 2:
        raise ValueError("proxprop needs at least two Linear/Conv2d layers: the last stays explicit and the "
                         "others take proximal steps")
    explicit = list(linear_layers[-1].module.parameters())
    return linear_layers[:-1], explicit


@dataclass
class _Direction:
    weight: Tensor
    bias: Tensor | None
    cos: float
    iterations: int
    residual: float


def _cosine(dot: float, norm2_a: float, norm2_b: float) -> float:
    denom = math.sqrt(max(norm2_a, 0.0) * max(norm2_b, 0.0))
    return dot / denom if denom > 0 else 1.0


class _LinearOperator:
    """The joint map A:(W, b) ↦ z of one layer on its saved input, with adjoint Aᵀ: y ↦ (∂⟨y,z⟩/∂W, ∂/∂b)."""

    def __init__(self, module: nn.Linear | nn.Conv2d, a: Tensor) -> None:
        self.module = module
        self.has_bias = module.bias is not None
        self.w_shape = module.weight.shape
        if isinstance(module, nn.Linear):
            self.a = a.reshape(-1, module.in_features)
        else:
            self.a = a

    def forward(self, w: Tensor, b: Tensor | None) -> Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(self.a, w, b)
        return F.conv2d(self.a, w, b, m.stride, m.padding, m.dilation, m.groups)

    def adjoint(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        m = self.module
        if isinstance(m, nn.Linear):
            y2 = y.reshape(-1, m.out_features)
            return y2.T @ self.a, (y2.sum(0) if self.has_bias else None)
        gw = conv2d_weight(self.a, self.w_shape, y, m.stride, m.padding, m.dilation, m.groups)
        return gw, (y.sum(dim=(0, 2, 3)) if self.has_bias else None)


class _LinearColumns:
    """Linear layer parameters as the (n+1)×q matrix Θ = [Wᵀ; bᵀ], one column per output neuron."""

    @staticmethod
    def pack(w: Tensor, b: Tensor | None) -> Tensor:
        return w.T if b is None else torch.cat([w.T, b.unsqueeze(0)], dim=0)

    @staticmethod
    def unpack(theta: Tensor, n: int, has_bias: bool) -> tuple[Tensor, Tensor | None]:
        return theta[:n].T.contiguous(), (theta[n].contiguous() if has_bias else None)


def _flat(w: Tensor, b: Tensor | None) -> Tensor:
    parts = [w.reshape(-1)] + ([b.reshape(-1)] if b is not None else [])
    return torch.cat(parts).unsqueeze(1)


def _unflat(v: Tensor, w_shape: torch.Size, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    nw = math.prod(w_shape)
    w = v[:nw, 0].reshape(w_shape)
    return w, (v[nw:, 0] if has_bias else None)


@register
class ProxProp(Method):
    """Proximal backpropagation; see the module docstring for the update and its options."""

    name = "proxprop"
    Config = ProxPropConfig
    config: ProxPropConfig
    default_loss = "ce"
    supported_losses = ("ce", "mse")
    reporting_name = "ProxProp"
    paper = ("Frerix, Möllenhoff, Moeller, Cremers. Proximal Backpropagation. ICLR 2018 (arXiv 1706.04638); "
             "official code tfrerix/proxprop")
    default_batch_size = 100
    supports_data_parallel = True

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.layers, self._explicit = _check_model(model)
        self._prox_index = {layer.index: k for k, layer in enumerate(self.layers)}
        self._beta = 1.0 / self.config.tau_theta
        cls = _resolve_optimizer(self.config.optimizer)
        self.optimizer = cls(self.model.parameters(), **self.config.optimizer_kwargs())
        if self.config.mode == "exact" and any(isinstance(lay.module, nn.Conv2d) for lay in self.layers):
            # The per-instance name marks the derived conv solve (METHODS.md §0.1).
            self.reporting_name = "ProxProp (exact-unfold)"  # type: ignore[misc]

    # -- backward signal ----------------------------------------------------------------------------------
    def backward_signals(
        self, x: Tensor, y: Tensor
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], list[Tensor | None]]:
        """One forward and one autograd pass at the current (old) weights.

        Returns the batch loss, ``(a, G)`` for every ProxProp layer (its input and G = ∂J/∂z) and the autograd
        gradients of the explicit parameters. Only the gradients with respect to the ProxProp layers' outputs
        are requested, so autograd never forms their weight gradients.
        """
        h = x
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []
        assert isinstance(self.model, nn.Sequential)
        for i, module in enumerate(self.model):
            out = module(h)
            if i in self._prox_index:
                if not out.requires_grad:  # parameters frozen by the caller: still give G a graph node
                    out.requires_grad_(True)
                inputs.append(h.detach())
                outputs.append(out)
            h = out
        distributed = self.comm.world_size > 1
        if distributed:
            # J is the global batch's mean loss (METHODS.md §7): the shard's sum over m_global, so the G of
            # every rank is its rows of the single-process G
            loss = evaluate_loss(self.loss, h, y, reduction="sum") / self.global_batch_size(int(h.shape[0]))
        else:
            loss = evaluate_loss(self.loss, h, y)
        wanted: list[Tensor] = [p for p in self._explicit if p.requires_grad]
        grads = torch.autograd.grad(loss, outputs + wanted, allow_unused=True)
        signals = []
        for a, z, g in zip(inputs, outputs, grads[: len(outputs)]):
            signals.append((a, torch.zeros_like(z) if g is None else g))
        explicit: list[Tensor | None] = [None] * len(self._explicit)
        it = iter(grads[len(outputs):])
        for k, p in enumerate(self._explicit):
            if p.requires_grad:
                g = next(it)
                explicit[k] = torch.zeros_like(p) if g is None and distributed else g
        if distributed:
            # the last layer's ordinary gradient and the loss in one all-reduce (averaged once, never twice)
            parts = [g for g in explicit if g is not None]
            flat = self.comm.all_reduce_sum_(torch.cat([g.reshape(-1) for g in parts] + [loss.detach().reshape(1)]))
            offset = 0
            for g in parts:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            return flat[-1], signals, explicit
        return loss.detach(), signals, explicit

    def _reduce_params(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Σ over ranks of a (weight, bias)-shaped pair in one all-reduce (no-op in one process)."""
        if self.comm.world_size == 1:
            return w, b
        flat = self.comm.all_reduce_sum_(_flat(w, b)[:, 0].contiguous())
        rw, rb = _unflat(flat.unsqueeze(1), w.shape, b is not None)
        return rw.contiguous(), (rb.contiguous() if rb is not None else None)

    # -- prox directions ----------------------------------------------------------------------------------
    def direction(self, module: nn.Linear | nn.Conv2d, a: Tensor, G: Tensor) -> _Direction:
        """θ_old − θ_prox for one layer with input ``a`` and backprop signal ``G`` (the config's solver)."""
        mode = self.config.mode
        op = _LinearOperator(module, a)
        if mode == "gradient":
            gw, gb = self._reduce_params(*op.adjoint(G))
            return _Direction(gw, gb, 1.0, 0, 0.0)
        if mode == "cg":
            return self._cg_direction(op, G)
        if isinstance(module, nn.Linear):
            if self.comm.world_size > 1:
                return self._exact_linear_gram_reduced(op, G)
            return self._exact_linear(op, G)
        return self._exact_unfold(op, G)

    def _exact_linear(self, op: _LinearOperator, G: Tensor) -> _Direction:
        beta = self._beta
        a = op.a
        G2 = G.reshape(-1, G.shape[-1])
        N, n = a.shape
        p = n + (1 if op.has_bias else 0)
        form = self.config.form
        if form == "auto":
            form = "push_through" if p > N else "gram"
        residual = 0.0
        if form == "push_through":
            G64 = G2.detach().to(torch.float64)
            Z, K = push_through_coefficients(a, G64, beta, ones_column=op.has_bias)
            Zc = Z.to(a.dtype)
            gw = Zc.T @ a
            gb = Zc.sum(0) if op.has_bias else None
            # With KZ = G − βZ (the normal equations): ⟨∇J, g⟩ = ⟨G, KZ⟩, ‖g‖² = ⟨Z, KZ⟩, ‖∇J‖² = ⟨G, KG⟩;
            # only the last needs an N×N×q product, so the cosine costs far less than a weight gradient.
            g_flat, z_flat = G64.reshape(-1), Z.reshape(-1)
            gz = float(torch.dot(g_flat, z_flat))
            dot = float(torch.dot(g_flat, g_flat)) - beta * gz
            norm2_dir = gz - beta * float(torch.dot(z_flat, z_flat))
            norm2_grad = float(torch.dot(g_flat, (K @ G64).reshape(-1))) if self.config.diagnostics else 1.0
            if self.config.residuals:
                residual = float((K @ Z + beta * Z - G64).norm() / G64.norm().clamp_min(1e-300))
            return _Direction(gw, gb, _cosine(dot, norm2_dir, norm2_grad), 0, residual)
        A_bar = torch.cat([a, a.new_ones(N, 1)], dim=1) if op.has_bias else a
        grad = A_bar.T @ G2
        theta = linear_prox_direction(A_bar, G2, beta, form="gram")
        gw, gb = _LinearColumns.unpack(theta, n, op.has_bias)
        if self.config.residuals:
            lhs = A_bar.T @ (A_bar @ theta) + beta * theta
            residual = float((lhs - grad).norm() / grad.norm().clamp_min(1e-300))
        cos = _cosine(float((grad * theta).sum()), float((theta * theta).sum()), float((grad * grad).sum()))
        return _Direction(gw, gb, cos, 0, residual)

    def _exact_linear_gram_reduced(self, op: _LinearOperator, G: Tensor) -> _Direction:
        """The exact linear solve under data parallelism (METHODS.md §7): every rank forms its shard's ĀᵀĀ and
        ĀᵀG in float64, one all-reduce sums both, and every rank solves the same (n+1)×(n+1) system. The
        push-through form needs the whole batch's N×N Gram, so ``form`` is ignored here (always the Gram)."""
        a = op.a
        G64 = G.reshape(-1, G.shape[-1]).detach().to(torch.float64)
        A64 = a.detach().to(torch.float64)
        if op.has_bias:
            A64 = torch.cat([A64, A64.new_ones(A64.shape[0], 1)], dim=1)
        S, R = self._reduce_gram(A64.T @ A64, A64.T @ G64)
        return self._gram_direction(op, S, R, a.dtype)

    def _reduce_gram(self, S: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
        """Σ over ranks of a float64 Gram S and right-hand side R in one all-reduce."""
        if self.comm.world_size == 1:
            return S, R
        p = S.shape[0]
        flat = self.comm.all_reduce_sum_(torch.cat([S.reshape(-1), R.reshape(-1)]))
        return flat[: p * p].view(p, p), flat[p * p:].view(R.shape)

    def _gram_direction(self, op: _LinearOperator, S: Tensor, R: Tensor, dtype: torch.dtype) -> _Direction:
        """θ = (S + βI)⁻¹R for a Linear layer, with the cosine and residual diagnostics from S and R."""
        theta = spd_ridge_solve(S, R, self._beta)
        residual = 0.0
        if self.config.residuals:
            residual = float((S @ theta + self._beta * theta - R).norm() / R.norm().clamp_min(1e-300))
        cos = _cosine(float((R * theta).sum()), float((theta * theta).sum()), float((R * R).sum()))
        assert isinstance(op.module, nn.Linear)
        gw, gb = _LinearColumns.unpack(theta.to(dtype), op.module.in_features, op.has_bias)
        return _Direction(gw, gb, cos, 0, residual)

    def _unfold_gram(self, op: _LinearOperator, G: Tensor) -> tuple[Tensor, Tensor]:
        """PᵀP and PᵀG_flat of a conv layer (float64, accumulated over row chunks; §4.5)."""
        m = op.module
        assert isinstance(m, nn.Conv2d)
        a = op.a
        N = a.shape[0]
        out_hw = G.shape[2] * G.shape[3]
        p = m.in_channels * m.kernel_size[0] * m.kernel_size[1] + (1 if op.has_bias else 0)
        S = torch.zeros(p, p, dtype=torch.float64, device=a.device)
        R = torch.zeros(p, m.out_channels, dtype=torch.float64, device=a.device)
        per_chunk = max(1, self.config.unfold_chunk_rows // max(out_hw, 1))
        for start in range(0, N, per_chunk):
            a_c = a[start:start + per_chunk]
            padding = m.padding if not isinstance(m.padding, str) else 0  # strings are rejected in __init__
            P = F.unfold(a_c, m.kernel_size, m.dilation, padding, m.stride).transpose(1, 2)
            P = P.reshape(-1, P.shape[-1]).to(torch.float64)
            if op.has_bias:
                P = torch.cat([P, P.new_ones(P.shape[0], 1)], dim=1)
            G_c = G[start:start + per_chunk].permute(0, 2, 3, 1).reshape(-1, m.out_channels)
            S += P.T @ P
            R += P.T @ G_c.to(torch.float64)
        return S, R

    def _exact_unfold(self, op: _LinearOperator, G: Tensor) -> _Direction:
        m = op.module
        assert isinstance(m, nn.Conv2d)
        S, R = self._reduce_gram(*self._unfold_gram(op, G))
        theta = spd_ridge_solve(S, R, self._beta)
        residual = 0.0
        if self.config.residuals:
            residual = float((S @ theta + self._beta * theta - R).norm() / R.norm().clamp_min(1e-300))
        cos = _cosine(float((R * theta).sum()), float((theta * theta).sum()), float((R * R).sum()))
        nw = theta.shape[0] - (1 if op.has_bias else 0)
        gw = theta[:nw].T.reshape(m.weight.shape).to(m.weight.dtype)
        gb = theta[nw].to(m.weight.dtype) if op.has_bias else None
        return _Direction(gw.contiguous(), gb, cos, 0, residual)

    def _cg_direction(self, op: _LinearOperator, G: Tensor) -> _Direction:
        beta = self._beta
        gw, gb = self._reduce_params(*op.adjoint(G))
        # under data parallelism each rank holds its rows of A: AᵀA v is all-reduced in every iteration, the
        # CG scalars then act on replicated vectors (METHODS.md §7)
        reduce = self._reduce
        apply_M: Callable[[Tensor], Tensor]
        unpack: Callable[[Tensor], tuple[Tensor, Tensor | None]]
        if isinstance(op.module, nn.Linear):
            n = op.module.in_features
            a = op.a
            rhs = _LinearColumns.pack(gw, gb)

            def apply_M(v: Tensor) -> Tensor:
                # AᵀA v + βv on Θ = [Wᵀ; bᵀ] without transposing or concatenating the iterate
                y = torch.addmm(v[n], a, v[:n]) if op.has_bias else a @ v[:n]
                out = torch.empty_like(v)
                torch.mm(a.T, y, out=out[:n])
                if op.has_bias:
                    torch.sum(y, 0, out=out[n])
                if reduce is not None:
                    reduce(out)
                return out.add_(v, alpha=beta)

            def unpack(v: Tensor) -> tuple[Tensor, Tensor | None]:
                return _LinearColumns.unpack(v, n, op.has_bias)
        else:
            rhs = _flat(gw, gb)
            w_shape = op.w_shape

            def apply_M(v: Tensor) -> Tensor:
                AtAv = _flat(*op.adjoint(op.forward(*_unflat(v, w_shape, op.has_bias))))
                if reduce is not None:
                    reduce(AtAv)
                return AtAv + beta * v

            def unpack(v: Tensor) -> tuple[Tensor, Tensor | None]:
                w, b = _unflat(v, w_shape, op.has_bias)
                return w.contiguous(), (b.contiguous() if b is not None else None)

        c = self.config
        d, iters = block_cg(apply_M, rhs, None if reduce is not None else torch.zeros_like(rhs), c.iterations,
                            tol=c.cg_tol, eps=c.cg_eps, stop=c.cg_stop)
        residual = 0.0
        if c.residuals:
            residual = float((apply_M(d) - rhs).norm() / rhs.norm().clamp_min(1e-300))
        cos = _cosine(float((rhs * d).sum()), float((d * d).sum()), float((rhs * rhs).sum()))
        w, b = unpack(d)
        return _Direction(w, b, cos, iters, residual)

    # -- the step -----------------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        self.model.train()
        with self.block("forward_backward"):
            loss, signals, explicit = self.backward_signals(x, y)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            if not bool(torch.isfinite(x).all()):
                raise ValueError("proxprop: the input batch contains NaN or inf; clean the data")
            return StepStats(loss=loss_value, info={"diverged": 1.0})
        info: dict[str, float] = {}
        min_cos = 1.0
        for layer, (a, G) in zip(self.layers, signals):
            module = layer.module
            with self.block(f"prox[{layer.index}]"):
                d = self.direction(module, a, G)
            module.weight.grad = d.weight
            if module.bias is not None:
                module.bias.grad = d.bias
            if self.config.diagnostics:
                min_cos = min(min_cos, d.cos)
                info[f"cos_{layer.index}"] = d.cos
            if self.config.mode == "cg":
                info[f"cg_iters_{layer.index}"] = float(d.iterations)
            if self.config.residuals:
                info[f"residual_{layer.index}"] = d.residual
        for p, g in zip(self._explicit, explicit):
            p.grad = g
        if self.config.diagnostics:
            info["min_cos"] = min_cos
            info["descent_violation"] = float(min_cos <= 0.0)
        with self.block("optimizer_step"):
            self.optimizer.step()
        self.steps_taken += 1
        return StepStats(loss=loss_value, info=info)

    # -- state --------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        # a snapshot: the optimizer updates its moment buffers in place on the next step
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "optimizer" not in state:
            raise ValueError("proxprop state dict has no optimizer state; save it with ProxProp.state_dict()")
        self.optimizer.load_state_dict(state["optimizer"])

