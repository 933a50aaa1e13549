r"""ProxProp as a ``torch.optim`` optimizer for any model (Frerix, Möllenhoff, Moeller, Cremers; ICLR 2018).

::

    opt = liftkit.optim.ProxProp(model, base="adam", lr=1e-3, tau_theta=0.02, solver="exact")
    for x, y in loader:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

Forward hooks record the input ``a`` of every proximal layer and a hook on its output records the backward
signal G = ∂loss/∂z; ``step()`` replaces each proximal layer's ``.grad`` by θ_old − θ_prox (the linear-layer
prox of :mod:`liftkit.optim.prox_solve`, exact or CG) and then steps the base optimizer. With plain SGD the
update is θ ← θ − lr·M⁻¹∇, M = ĀᵀĀ + I/τ_θ (paper, Prop. 2). Every other parameter (BatchNorm, embeddings,
explicit layers) keeps its ordinary gradient. Backpropagation itself is unchanged.

**Which layers are proximal.** Every ``nn.Linear`` and ``nn.Conv2d`` of the model except those in
``explicit``; by default ``explicit`` holds the last ``nn.Linear`` in registration order (the paper keeps the
output layer explicit: a cross-entropy prox has no closed form). ``opt.prox_layers`` maps the qualified module
names of the proximal layers to the modules.

**τ_θ and the loss reduction.** The Gram ĀᵀĀ is a sum over every row the layer saw in the step (batch rows,
and for a Conv2d every output pixel), while G carries the loss's own reduction: with a mean loss G is 1/N of
the per-sample gradient, with a sum loss it is not. The direction is (ĀᵀĀ + I/τ_θ)⁻¹ĀᵀG, so τ_θ → 0 gives
τ_θ·∇ and large τ_θ a Gauss-Newton-like step; retune τ_θ when the batch size, the resolution or the reduction
changes.

**Modules called several times** in one forward pass (shared layers), and forward/backward passes repeated
before one ``step()`` (gradient accumulation), stack their inputs and output gradients: the prox is the one of
the concatenated rows. A Conv2d called on inputs of different spatial sizes raises a ``ValueError`` naming it.

**Hooks** record only in training mode with autograd enabled (never under ``torch.no_grad()`` or after
``model.eval()``); ``step()`` drops what was recorded, ``zero_grad()`` the calls whose backward has run
(calls waiting for their backward survive it, so zero_grad may come between forward and backward). A call
whose output never reaches the loss contributes nothing. ``remove_hooks()`` detaches them, as
does garbage collection of the optimizer. A proximal layer that has a gradient but no recorded forward pass
(backward run in eval mode) is an error rather than a silent plain-gradient step.

**Checkpoints and schedulers.** ``param_groups`` and ``state`` are the base optimizer's, so
``torch.optim.lr_scheduler`` schedulers act on it, and ``state_dict()`` / ``load_state_dict()`` are the base
optimizer's (ProxProp itself keeps no state across steps).

Conv2d layers may have stride, padding (integers or ``"valid"``), dilation and bias; grouped convolutions and
non-zero padding modes are rejected with a ``ValueError`` naming the layer (list them in ``explicit``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from liftkit.distributed import Communicator
from liftkit.optim.prox_solve import Direction, ProxSettings, ProxSolver, check_prox_module, resolve_optimizer

__all__ = ["LayerStats", "ProxProp"]

_NO_BLOCK: AbstractContextManager[None] = nullcontext()
BlockHook = Callable[[str], AbstractContextManager[None]]
Signal = tuple[str, nn.Module, Tensor, Tensor]


class LayerStats:
    """Diagnostics of one proximal layer's last direction: cosine with the gradient (``nan`` unless
    ``diagnostics=True``), CG iterations and the normal equations' relative residual (``residuals=True``)."""

    __slots__ = ("cos", "iterations", "residual")

    def __init__(self, d: Direction, diagnostics: bool) -> None:
        self.cos = d.cos if diagnostics else float("nan")
        self.iterations = d.iterations
        self.residual = d.residual

    def __repr__(self) -> str:
        return f"LayerStats(cos={self.cos:.4g}, iterations={self.iterations}, residual={self.residual:.3g})"


class _Call:
    """One recorded call of a proximal layer: its input and, once backward reached it, its output gradient."""

    __slots__ = ("a", "g")

    def __init__(self, a: Tensor) -> None:
        self.a = a
        self.g: Tensor | None = None

    def store_grad(self, g: Tensor) -> None:
        self.g = g.detach() if self.g is None else self.g + g.detach()


def _forward_hook(owner: weakref.ref[ProxProp]) -> Callable[..., None]:
    # a weak reference: the model's hooks must not keep a discarded optimizer alive
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        opt = owner()
        if opt is not None:
            opt._record(module, args, output)

    return hook


def _remove_all(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class ProxProp(torch.optim.Optimizer):
    """ProxProp over every Linear/Conv2d of ``model``; see the module docstring.

    ``base`` is a ``torch.optim`` class or its name; ``lr`` and ``base_kwargs`` (momentum, betas, ...) go to it.
    ``tau_theta`` is the proximal step τ_θ; ``solver`` is ``exact``, ``cg``, ``cgN`` or ``gradient``, with the
    CG settings ``cg_iters``, ``cg_tol``, ``cg_eps``, ``cg_stop``, ``cg_variant`` and the exact settings ``form``
    and ``unfold_chunk_rows`` (:mod:`liftkit.optim.prox_solve`). ``grad_rhs``: the CG and gradient solvers
    take a proximal layer's gradient ĀᵀG from the ``.grad`` that backward left instead of recomputing it from
    the recorded signals (one weight-gradient product per layer less); this assumes the layer's parameters
    reach the loss only through its own forward calls, so set ``grad_rhs=False`` for weights tied elsewhere or
    gradients edited before ``step()``. ``explicit`` lists modules (or their qualified names) that keep the
    ordinary gradient; ``None`` means the last ``nn.Linear``. ``diagnostics`` / ``residuals`` fill
    ``last_stats`` with each layer's cosine to the gradient / normal-equation residual. ``solve_dtype``
    (``auto`` | ``float32`` | ``float64``): the dtype of the exact solver's Gram products (``auto``: the
    model's); its factorisations are float64 either way. ``block_hook``
    (optional) brackets each layer's solve (``prox[name]``) and the base step (``optimizer_step``) for a
    profiler. ``comm`` (optional) returns the communicator of a data-parallel run (the ``proxprop`` method
    passes its own).
    """

    def __init__(
        self,
        model: nn.Module,
        base: str | type[torch.optim.Optimizer] = "adam",
        *,
        lr: float = 1e-3,
        tau_theta: float = 0.02,
        solver: str = "exact",
        explicit: Iterable[nn.Module | str] | None = None,
        cg_iters: int = 3,
        cg_tol: float = 1e-2,
        cg_eps: float = 1e-6,
        cg_stop: str = "tol",
        cg_variant: str = "textbook",
        form: str = "auto",
        unfold_chunk_rows: int = 65536,
        diagnostics: bool = False,
        residuals: bool = False,
        grad_rhs: bool = True,
        solve_dtype: str = "auto",
        block_hook: BlockHook | None = None,
        comm: Callable[[], Communicator] | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"ProxProp needs an nn.Module, got {type(model).__name__}")
        settings = ProxSettings(solver=solver, tau_theta=tau_theta, cg_iters=cg_iters, cg_tol=cg_tol,
                                cg_eps=cg_eps, cg_stop=cg_stop, cg_variant=cg_variant, form=form,
                                unfold_chunk_rows=unfold_chunk_rows, residuals=residuals, diagnostics=diagnostics,
                                solve_dtype=solve_dtype)
        self.solver = ProxSolver(settings, comm)
        self.prox_layers: dict[str, nn.Linear | nn.Conv2d] = _select_prox_layers(model, explicit)
        self.base = _make_base(base, model, lr, base_kwargs)
        super().__init__(list(model.parameters()), dict(self.base.defaults))
        self._link_base()
        self.block_hook = block_hook
        self.grad_rhs = bool(grad_rhs)
        self.last_stats: dict[str, LayerStats] = {}
        self._records: dict[nn.Module, list[_Call]] = {}
        self._handles: list[RemovableHandle] = []
        hook = _forward_hook(weakref.ref(self))
        for module in self.prox_layers.values():
            self._handles.append(module.register_forward_hook(hook))
        weakref.finalize(self, _remove_all, self._handles)

    # -- the torch.optim protocol ----------------------------------------------------------------------------
    def _link_base(self) -> None:
        """Share the base optimizer's groups and state, so schedulers and checkpoints act on the base."""
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self._link_base()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base") or self.param_groups is not self.base.param_groups:
            super().add_param_group(param_group)  # Optimizer.__init__'s own groups, replaced by the base's
        else:
            self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and the recorded calls whose output gradient has arrived; calls still waiting
        for their backward survive, so ``out = model(x); opt.zero_grad(); loss.backward()`` works too."""
        super().zero_grad(set_to_none=set_to_none)
        for module, calls in list(self._records.items()):
            pending = [c for c in calls if c.g is None]
            if pending:
                self._records[module] = pending
            else:
                del self._records[module]

    def step(self, closure: Callable[[], Any] | None = None, *, signals: Iterable[Signal] | None = None,
             diagnostics: bool | None = None) -> Any:
        """Write θ_old − θ_prox into every proximal layer's ``.grad``, then step the base optimizer.

        ``closure`` (as in ``torch.optim``) recomputes the loss with autograd on and is called first.
        ``signals`` replaces what the hooks recorded by ``(name, module, a, G)`` tuples (the ``proxprop``
        method's chain path passes them to avoid forming the proximal layers' weight gradients where the
        solver does not need them). ``diagnostics`` overrides the setting for this step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_with_signals(self._recorded_signals() if signals is None else signals, diagnostics=diagnostics)
        return loss

    def step_with_signals(self, signals: Iterable[Signal], *, diagnostics: bool | None = None) -> None:
        """The work of :meth:`step` for given ``(name, module, a, G)`` signals, without ``torch.optim``'s step
        wrapper (its profiler record and step hooks): the ``proxprop`` method's chain path calls it once per
        step, and the base optimizer's own wrapped ``step()`` still runs. ``diagnostics`` overrides the
        setting for this step (the method computes the cosines only on some steps)."""
        with torch.no_grad():
            self.write_prox_grads(signals, diagnostics=diagnostics)
            with self._block("optimizer_step"):
                self.base.step()
        self._records.clear()

    # -- hooks -------------------------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Detach the forward hooks from the model (``step()`` then needs ``signals``)."""
        _remove_all(self._handles)
        self._records.clear()

    def _record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not args:
            return
        call = _Call(args[0].detach())
        self._records.setdefault(module, []).append(call)
        output.register_hook(call.store_grad)

    def _recorded_signals(self) -> Iterator[Signal]:
        for name, module in self.prox_layers.items():
            calls = [c for c in self._records.get(module, []) if c.g is not None]
            if not calls:
                if any(p.grad is not None for p in module.parameters()) and module not in self._records:
                    raise RuntimeError(
                        f"ProxProp: layer {name!r} has a gradient but no recorded forward pass; run the forward "
                        "pass in training mode with autograd enabled (model.train()) before backward()"
                    )
                continue
            a, G = _stack(name, module, calls)
            yield name, module, a, G

    # -- the prox ----------------------------------------------------------------------------------------
    def _block(self, name: str) -> AbstractContextManager[None]:
        return _NO_BLOCK if self.block_hook is None else self.block_hook(name)

    def write_prox_grads(self, signals: Iterable[Signal], *, diagnostics: bool | None = None) -> None:
        """Set ``.grad = θ_old − θ_prox`` on the layers of ``signals`` and record their :class:`LayerStats`.
        ``diagnostics=False`` lets the exact push-through solve skip its cosine this time (``nan``); the other
        solvers' cosines are by-products, kept whenever the setting is on."""
        self.last_stats = {}
        report = self.solver.settings.diagnostics  # a by-product cosine is kept whenever the setting is on
        for name, module, a, G in signals:
            if not all(p.requires_grad for p in module.parameters()):
                continue  # frozen by the user: leave it to the base optimizer, which skips it
            assert isinstance(module, nn.Linear | nn.Conv2d)
            grad = None
            if self.grad_rhs and module.weight.grad is not None and (module.bias is None or module.bias.grad
                                                                      is not None):
                grad = (module.weight.grad, module.bias.grad if module.bias is not None else None)
            with self._block(f"prox[{name}]"):
                d = self.solver.direction(module, a, G, grad, diagnostics=diagnostics)
            module.weight.grad = d.weight
            if module.bias is not None:
                module.bias.grad = d.bias
            self.last_stats[name] = LayerStats(d, report)


def _make_base(base: str | type, model: nn.Module, lr: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    cls = resolve_optimizer(base)
    if cls is torch.optim.LBFGS:
        raise ValueError("base optimizer lbfgs needs a loss closure per inner step and cannot consume ProxProp "
                         "directions; use adam or sgd")
    try:
        return cls(model.parameters(), lr=lr, **kwargs)  # type: ignore[call-arg]
    except TypeError as exc:
        raise ValueError(f"base optimizer {cls.__name__} rejected its settings: {exc}") from None


def _select_prox_layers(
    model: nn.Module, explicit: Iterable[nn.Module | str] | None
) -> dict[str, nn.Linear | nn.Conv2d]:
    """Every Linear/Conv2d of ``model`` (qualified names, registration order) not in ``explicit``."""
    named = dict(model.named_modules())
    candidates = {name: m for name, m in named.items() if isinstance(m, nn.Linear | nn.Conv2d)}
    if explicit is None:
        linears = [m for m in candidates.values() if isinstance(m, nn.Linear)]
        excluded = {id(linears[-1])} if linears else set()
    else:
        excluded = set()
        by_id = {id(m) for m in named.values()}
        for item in explicit:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"explicit layer {item!r} is not a module of the model")
                excluded.add(id(named[item]))
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"explicit layer {type(item).__name__} ({item!r}) is not a module of the model")
                excluded.add(id(item))
            else:
                raise ValueError(f"explicit must list modules or their names, got {item!r}")
    chosen = {name: m for name, m in candidates.items() if id(m) not in excluded}
    for name, m in chosen.items():
        check_prox_module(m, f"layer {name!r} ({type(m).__name__})")
    return chosen


def _stack(name: str, module: nn.Module, calls: list[_Call]) -> tuple[Tensor, Tensor]:
    """The rows of the recorded calls of one layer whose output reached the loss, inputs and output gradients
    in the same order."""
    inputs, grads = [], []
    for call in calls:
        a, g = call.a, call.g
        assert g is not None
        if isinstance(module, nn.Linear):
            a, g = a.reshape(-1, module.in_features), g.reshape(-1, module.out_features)
        elif a.dim() == 3:  # an unbatched (C, H, W) call
            a, g = a.unsqueeze(0), g.unsqueeze(0)
        inputs.append(a)
        grads.append(g)
    if len(inputs) == 1:
        return inputs[0], grads[0]
    if len({tuple(a.shape[1:]) for a in inputs}) > 1:
        raise ValueError(f"ProxProp: layer {name!r} was called on inputs of different sizes "
                         f"{sorted({tuple(a.shape[1:]) for a in inputs})} in one step; keep it explicit")
    return torch.cat(inputs), torch.cat(grads)
