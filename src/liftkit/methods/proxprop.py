r"""ProxProp: proximal backpropagation (Frerix, Möllenhoff, Moeller, Cremers; ICLR 2018).

Backprop is a sequence of explicit gradient steps on a penalty formulation of the network (paper, Prop. 1);
ProxProp makes the parameter step of every hidden linear map implicit. For a hidden Linear or Conv2d layer
with saved input ``a``, output ``z`` and backprop signal ``G = ∂J/∂z`` (J the **mean** loss over the batch),
the layer solves the linear-layer prox (docs/methods/conventions.md §7; docs/methods/proxprop.md §3–§4; row-major, Ā =
[a, 1], Θ = [Wᵀ; bᵀ])

.. math::

    \Theta_{\mathrm{prox}} = \arg\min_\Theta \tfrac12\|\bar A\Theta - (z - G)\|^2
        + \tfrac{1}{2\tau_\theta}\|\Theta - \Theta_{\mathrm{old}}\|^2 ,
    \qquad
    \Theta_{\mathrm{old}} - \Theta_{\mathrm{prox}} = (\bar A^\top\bar A + \beta I)^{-1}\nabla_\Theta J
        = \bar A^\top(\bar A\bar A^\top + \beta I_N)^{-1} G ,\quad \beta = 1/\tau_\theta ,

where the data term is an unnormalised **sum** over the batch while G comes from the mean loss
(docs/methods/conventions.md §3). The difference is written into the parameters' ``.grad`` and the wrapped
``torch.optim`` optimizer steps with ``lr = τ``; with plain SGD this is θ ← θ − τ M⁻¹∇J, M = I/τ_θ + (∇φ)(∇φ)* (paper,
Prop. 2). The last Linear/Conv2d layer keeps the explicit gradient (the CE prox has no closed form), and the backward
signal stays exactly backprop's: autograd computes ``grad_input`` with the old weights, and the solve replaces the
ProxProp layers' weight gradients (the exact solver never forms them; CG and gradient modes start from them).

Solvers (``solver``):

* ``exact``: Linear layers: Cholesky in float64 on the (n+1)×(n+1) Gram (``form="gram"``) or the N×N
  push-through system (``"push_through"``: its float64 inverse is applied to G in the model's dtype, then
  W.grad = Zᵀa in the model's dtype); ``"auto"`` picks the smaller.
  Conv2d layers: one shared Gram of the unfolded input, PᵀP + βI, accumulated in float64 over row chunks, one
  right-hand side per output channel. This conv solve is our addition (derived; in neither paper nor code) and
  is reported as ``ProxProp (exact-unfold)``.
* ``cg`` (with ``cg_iters``), or ``cgN`` as a shorthand: the official block CG (docs/methods/proxprop.md §4.3): one CG
  per output neuron of a Linear layer, and one CG per Conv2d layer over all its parameters flattened into one vector.
  Solved in difference form d = θ_old − θ from d₀ = 0 (the official warm start x₀ = θ_old, shifted).
  ``cg_variant="textbook"`` (default) is conjugate gradients proper and converges to the exact prox; its
  iterates equal the official code's for the first iteration only, because the published code's search
  direction aliases the residual (from the second iteration its direction is (1+β)r instead of r + βp).
  ``cg_variant="official"`` reproduces that iteration (the code's behaviour, not the paper's text; the
  paper's cgN curves come from it). Stopping rule max_j‖r_j‖² < cg_tol²·mean_j‖r_{j,0}‖² (``cg_stop="tol"``,
  official) or exactly ``cg_iters`` iterations (``cg_stop="fixed"``, assumption, for timing). cg1 is the
  Cauchy-scaled gradient.
* ``gradient``: ``.grad = ∇J`` through the same code path: plain backprop, the paper's timing control.

Every direction is a descent direction (paper, Props. 4–5); ``StepStats.info`` reports per layer (key suffix:
the module index in a Sequential, else the qualified module name) the cosine between the direction and ∇J
(``cos_i``, positive; for the exact push-through solve every ``diagnostics_every``-th step), CG iterations
(``cg_iters_i``) and, with ``residuals=True``, the relative residual of the normal equations (``residual_i``).
A non-finite batch loss returns ``loss=nan`` with the parameters left unchanged.

Data parallelism (docs/methods/proxprop.md §7): J is the global batch's mean (the shard's loss sum over m_global), so a
rank's a, z and G are its rows of the single-process ones and never move. What is all-reduced per layer: the
exact linear solve's ĀᵀĀ and ĀᵀG (float64, one call; the Gram form is used whatever ``form`` says, because
push-through needs the whole batch's N×N Gram), the conv solve's PᵀP and PᵀG_flat, CG's right-hand side
once and Aᵀ(Av) in every iteration, ``gradient``'s AᵀG; the last layer's gradient goes with the loss in one
all-reduce. Every rank then solves the same system, so the weights stay replicated.

Defaults: ``exact`` + Adam (lr 1e-3), τ_θ = 0.02, batch 100: the setting that trained best at batch 100 on the
MNIST validation split (docs/history/proxprop.md). The paper's settings ship as configs: the MLP uses SGD with
Nesterov momentum 0.95, lr = τ = 1, batch 500, τ_θ = 0.05; the ConvNet Adam 1e-3, τ_θ = 1, cg3/cg10.

One engine: the prox of every layer is :class:`liftkit.optim.ProxProp`'s (the ``torch.optim``-style optimizer
for any model in a user's own loop); this method wraps it, so both give bit-identical updates on a chain.

Models. An ``nn.Sequential`` chain (the paper's setting): any parameter-free module (ReLU, pooling, Flatten,
Dropout...) is fine because autograd carries the backward signal, modules with parameters other than
top-level Linear/Conv2d are rejected, the last Linear/Conv2d stays explicit, and with the exact solver the
weight gradients of the ProxProp layers are never formed (only the gradients at their outputs are requested;
CG and gradient modes take them from the same autograd pass). Any other module
(e.g. ``resnet8``: residual connections, BatchNorm) goes through the optimizer's hooks: every Linear and Conv2d
but the last Linear takes proximal steps, every other parameter (BatchNorm) its ordinary gradient; a plain
backward forms all weight gradients, and these models train in one process only. Either way a ProxProp
layer's input and output come from the same (possibly stochastic) forward pass, so dropout masks stay
consistent. Conv2d needs groups = 1, zero padding given as integers, and ``padding_mode="zeros"``.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from liftkit.methods.base import Method, MethodConfig, StepStats, evaluate_loss, register
from liftkit.optim.prox_solve import Direction, ProxSettings, check_prox_module, resolve_optimizer
from liftkit.optim.proxprop import ProxProp as ProxPropOptimizer

__all__ = ["ProxProp", "ProxPropConfig"]



@dataclass
class ProxPropConfig(MethodConfig):
    """ProxProp hyperparameters (docs/methods/proxprop.md §6).

    ``lr`` is the step size τ of the wrapped optimizer; ``tau_theta`` the proximal step τ_θ (β = 1/τ_θ, the
    Gram is a sum over the batch, so retune it when the batch size changes). ``solver``: ``exact`` |
    ``cg`` | ``cgN`` (N iterations, overrides ``cg_iters``) | ``gradient``; ``cg_variant``: ``textbook`` CG or
    the ``official`` code's aliased iteration. ``form`` picks the exact linear
    solve (``auto``: push-through when the batch is smaller than n+1). ``diagnostics=False`` skips the cosine
    (one N×N×q product per exact push-through layer); with it on, the cosines are computed and reported on
    every ``diagnostics_every``-th step (the first included). ``solve_dtype``: the dtype of the exact solver's
    Gram products (``auto``: the model's; ``float64``: always float64); the factorisations are float64 either
    way. ``unfold_chunk_rows`` bounds
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
    cg_variant: str = "textbook"
    form: str = "auto"
    unfold_chunk_rows: int = 65536
    residuals: bool = False
    diagnostics: bool = True
    solve_dtype: str = "auto"
    diagnostics_every: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self) -> None:
        # the prox fields are checked once, by the engine's own settings (same messages as the config checks)
        self.settings().validate()
        self._positive("lr", "eps")
        self._int_at_least("diagnostics_every", 1)
        self._nonnegative("momentum", "weight_decay")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        cls = resolve_optimizer(self.optimizer)
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

    def settings(self) -> ProxSettings:
        """The prox settings of :mod:`liftkit.optim.prox_solve`."""
        return ProxSettings(**{f.name: getattr(self, f.name) for f in fields(ProxSettings)})

    @property
    def iterations(self) -> int:
        """CG iterations: N of ``cgN``, else ``cg_iters``."""
        return self.settings().iterations

    @property
    def mode(self) -> str:
        """``exact``, ``cg`` or ``gradient``."""
        return self.settings().mode

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The settings the base optimizer accepts, besides ``lr``."""
        accepted = inspect.signature(resolve_optimizer(self.optimizer).__init__).parameters
        kwargs: dict[str, Any] = {}
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
    """One ProxProp layer: its module and its name (the index in a Sequential, else the qualified name)."""

    index: int | str
    module: nn.Linear | nn.Conv2d


def _check_chain(model: nn.Sequential) -> tuple[list[_Layer], list[nn.Parameter]]:
    """The ProxProp layers of a Sequential (every top-level Linear/Conv2d but the last) and the explicitly
    trained parameters."""
    linear_layers: list[_Layer] = []
    for i, module in enumerate(model):
        where = f"module {i} ({type(module).__name__})"
        if isinstance(module, nn.Linear | nn.Conv2d):
            linear_layers.append(_Layer(i, module))
            continue
        if any(True for _ in module.parameters()):
            raise ValueError(
                f"proxprop cannot train {where} of an nn.Sequential chain: in a chain only top-level "
                "Linear/Conv2d layers may hold parameters (activations, pooling, flatten and dropout are fine)"
            )
    if len(linear_layers) < 2:
        raise ValueError("proxprop needs at least two Linear/Conv2d layers: the last stays explicit and the "
                         "others take proximal steps")
    for layer in linear_layers[:-1]:
        check_prox_module(layer.module, f"module {layer.index} ({type(layer.module).__name__})")
    return linear_layers[:-1], list(linear_layers[-1].module.parameters())


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

    @classmethod
    def preset_values(cls, preset: str, model: nn.Module) -> dict[str, Any]:
        """``paper``: the published experiments (docs/methods/proxprop.md, Presets): for MLPs SGD with Nesterov
        momentum 0.95, lr 1 and τ_θ 0.05; for convolutional models Adam, lr 1e-3 and τ_θ 1; both with three
        iterations of the official code's (aliased) CG. Their batch size, 500, is the trainer's."""
        if preset != "paper":
            return {}
        cg = {"solver": "cg3", "cg_variant": "official"}
        if any(isinstance(m, nn.Conv2d) for m in model.modules()):
            return {**cg, "optimizer": "adam", "lr": 1e-3, "tau_theta": 1.0}
        return {**cg, "optimizer": "sgd", "lr": 1.0, "momentum": 0.95, "nesterov": True, "tau_theta": 0.05}

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        c = self.config
        self.is_chain = isinstance(model, nn.Sequential)
        explicit: list[nn.Module] | None = None
        if self.is_chain:
            assert isinstance(model, nn.Sequential)
            self.layers, self._explicit = _check_chain(model)
            linears: list[nn.Module] = [m for m in model if isinstance(m, nn.Linear | nn.Conv2d)]
            explicit = linears[-1:]
        s = c.settings()
        self.optimizer = ProxPropOptimizer(
            model, c.optimizer, lr=c.lr, tau_theta=s.tau_theta, solver=s.solver, explicit=explicit,
            cg_iters=s.cg_iters, cg_tol=s.cg_tol, cg_eps=s.cg_eps, cg_stop=s.cg_stop, cg_variant=s.cg_variant,
            form=s.form, unfold_chunk_rows=s.unfold_chunk_rows, diagnostics=s.diagnostics, residuals=s.residuals,
            solve_dtype=s.solve_dtype, block_hook=self.block, comm=lambda: self.comm, **c.optimizer_kwargs(),
        )
        if self.is_chain:
            self.optimizer.remove_hooks()  # the chain path hands the signals over itself
        else:
            self.layers = [_Layer(name, m) for name, m in self.optimizer.prox_layers.items()]
            if not self.layers:
                raise ValueError(
                    f"proxprop needs at least one Linear/Conv2d layer besides the explicit last Linear (an "
                    f"nn.Sequential chain of two or more, or a model such as resnet8); got {type(model).__name__}"
                )
        self._names = [str(layer.index) for layer in self.layers]
        self._mode = c.mode  # the config is fixed after construction; read on every step
        if c.mode == "exact" and any(isinstance(lay.module, nn.Conv2d) for lay in self.layers):
            # The per-instance name marks the derived conv solve (docs/methods/conventions.md §1.3).
            self.reporting_name = "ProxProp (exact-unfold)"  # type: ignore[misc]

    def single_process_only(self) -> str | None:
        if self.is_chain:
            return None
        return ("proxprop trains non-Sequential models (e.g. resnet8) in one process only; drop the "
                "data-parallel launch or use an nn.Sequential model")

    # -- backward signal ----------------------------------------------------------------------------------
    def backward_signals(
        self, x: Tensor, y: Tensor
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], list[Tensor | None]]:
        """One forward and one autograd pass at the current (old) weights of a Sequential chain.

        Returns the batch loss, ``(a, G)`` for every ProxProp layer (its input and G = ∂J/∂z) and the autograd
        gradients of the explicit parameters. With the exact solver only the gradients with respect to the
        ProxProp layers' outputs are requested, so autograd never forms their weight gradients; CG and gradient
        modes also request them (left in the layers' ``.grad``), as a backward() would in the optimizer's
        hooked path, so both paths start from the same ĀᵀG.
        """
        if not self.is_chain:
            raise ValueError("backward_signals needs an nn.Sequential model; other models record their "
                             "signals through liftkit.optim.ProxProp's hooks")
        h = x
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []
        prox_index = {layer.index for layer in self.layers}
        assert isinstance(self.model, nn.Sequential)
        for i, module in enumerate(self.model):
            out = module(h)
            if i in prox_index:
                if not out.requires_grad:  # parameters frozen by the caller: still give G a graph node
                    out.requires_grad_(True)
                inputs.append(h.detach())
                outputs.append(out)
            h = out
        distributed = self.comm.world_size > 1
        if distributed:
            # J is the global batch's mean loss (docs/methods/proxprop.md §7): the shard's sum over m_global, so the G
            # of every rank is its rows of the single-process G
            loss = evaluate_loss(self.loss, h, y, reduction="sum") / self.global_batch_size(int(h.shape[0]))
        else:
            loss = evaluate_loss(self.loss, h, y)
        wanted: list[Tensor] = [p for p in self._explicit if p.requires_grad]
        # CG and gradient solvers start from ĀᵀG: take it from the same autograd pass (as a backward() in the
        # optimizer's hooked path would); the exact solver never needs it
        prox_params = self._prox_params_needing_grad()
        grads = torch.autograd.grad(loss, outputs + prox_params + wanted, allow_unused=True)
        for p, g in zip(prox_params, grads[len(outputs):len(outputs) + len(prox_params)]):
            p.grad = g
        grads = grads[: len(outputs)] + grads[len(outputs) + len(prox_params):]
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

    def _prox_params_needing_grad(self) -> list[Tensor]:
        """The ProxProp layers' parameters whose autograd gradient the solver reads (CG and gradient modes)."""
        if self._mode == "exact" or not self.optimizer.grad_rhs:
            return []
        return [p for layer in self.layers if all(q.requires_grad for q in layer.module.parameters())
                for p in layer.module.parameters()]

    def direction(self, module: nn.Linear | nn.Conv2d, a: Tensor, G: Tensor) -> Direction:
        """θ_old − θ_prox for one layer with input ``a`` and backprop signal ``G`` (the config's solver)."""
        return self.optimizer.solver.direction(module, a, G)

    # -- the step -----------------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        self.model.train()
        if self.is_chain:
            with self.block("forward_backward"):
                loss, signals, explicit = self.backward_signals(x, y)
        else:
            with self.block("forward_backward"):
                loss = self._hooked_backward(x, y)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            if not bool(torch.isfinite(x).all()):
                raise ValueError("proxprop: the input batch contains NaN or inf; clean the data")
            return StepStats(loss=loss_value, info={"diverged": 1.0})
        # the cosines feed only the logs: every diagnostics_every-th step (the first included)
        diagnose = self.config.diagnostics and self.steps_taken % self.config.diagnostics_every == 0
        if self.is_chain:
            for p, g in zip(self._explicit, explicit):
                p.grad = g
            self.optimizer.step_with_signals([(name, layer.module, a, G)
                                              for name, layer, (a, G) in zip(self._names, self.layers, signals)],
                                             diagnostics=diagnose)
        else:
            self.optimizer.step(diagnostics=diagnose)
        self.steps_taken += 1
        return StepStats(loss=loss_value, info=self._step_info())

    def _hooked_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward and backward of any model; the optimizer's hooks record every ProxProp layer's input and
        output gradient (the backward is skipped for a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = evaluate_loss(self.loss, self.model(x), y)
        if bool(torch.isfinite(loss)):
            loss.backward()
        return loss.detach()

    def _step_info(self) -> dict[str, float]:
        info: dict[str, float] = {}
        c = self.config
        # a cosine is nan on the steps where the push-through solve skipped it (see diagnostics_every)
        cosines = {name: st.cos for name, st in self.optimizer.last_stats.items()
                   if c.diagnostics and not math.isnan(st.cos)}
        for name, stats in self.optimizer.last_stats.items():
            if name in cosines:
                info[f"cos_{name}"] = stats.cos
            if self._mode == "cg":
                info[f"cg_iters_{name}"] = float(stats.iterations)
            if c.residuals:
                info[f"residual_{name}"] = stats.residual
        if cosines:
            info["min_cos"] = min(cosines.values())
            info["descent_violation"] = float(info["min_cos"] <= 0.0)
        return info

    # -- state --------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        # a snapshot: the optimizer updates its moment buffers in place on the next step
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "optimizer" not in state:
            raise ValueError("proxprop state dict has no optimizer state; save it with ProxProp.state_dict()")
        self.optimizer.load_state_dict(state["optimizer"])
