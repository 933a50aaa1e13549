"""Backprop baselines through the common interface: SGD (momentum, Nesterov), Adam and L-BFGS.

They use the same trainer, data pipeline, initial weights and loss as the lifted methods, so every
comparison is like for like (docs/methods/conventions.md §9).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from liftkit.methods.base import Method, MethodConfig, StepStats, evaluate_loss, register


class _TorchOptimizerMethod(Method):
    """A method that is one ``torch.optim`` step on the declared loss per mini-batch.

    Data-parallel (docs/methods/baselines.md §3): each rank back-propagates the sum of its shard's losses divided by the
    global batch size, and one all-reduce sums the gradients, so every rank holds the gradient of the global
    batch mean and takes the single-process step.
    """

    supports_data_parallel = True

    def __init__(self, model: torch.nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.optimizer = self._make_optimizer()

    @abstractmethod
    def _make_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over ``self.model.parameters()`` built from ``self.config``."""

    def step(self, x: torch.Tensor, y: torch.Tensor, *, idx: torch.Tensor | None = None) -> StepStats:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.block("forward_backward"):
            if self.comm.world_size == 1:
                loss = evaluate_loss(self.loss, self.model(x), y)
                loss.backward()
                value = float(loss.detach())
            else:
                value = self._global_loss_and_grad(x, y)
        with self.block("optimizer_step"):
            self.optimizer.step()
        self.steps_taken += 1
        return StepStats(loss=value)

    def _global_loss_and_grad(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Under data parallelism: leave the gradient of the global batch's mean loss in every ``.grad`` and
        return that loss; one all-reduce carries the gradients and the loss together."""
        m_global = self.global_batch_size(int(x.shape[0]))
        loss = evaluate_loss(self.loss, self.model(x), y, reduction="sum") / m_global
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None] + [loss.detach().reshape(1)])
        self.comm.all_reduce_sum_(flat)
        offset = 0
        for p in params:
            assert p.grad is not None
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n
        return float(flat[-1])

    def extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


@dataclass
class SGDConfig(MethodConfig):
    """SGD hyperparameters. Defaults: tuned on the MNIST validation split (docs/history/sessions.md)."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0

    def validate(self) -> None:
        self._positive("lr")
        self._nonnegative("momentum", "weight_decay")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=true needs momentum > 0; set momentum=0.9 or nesterov=false")


@register
class SGD(_TorchOptimizerMethod):
    """Stochastic gradient descent with (Nesterov) momentum on ``torch.optim.SGD``."""

    name = "sgd"
    Config = SGDConfig
    config: SGDConfig
    reporting_name = "SGD (backprop)"
    paper = "Robbins & Monro 1951; Nesterov momentum as in Sutskever et al., ICML 2013"

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(
            self.model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay
        )


@dataclass
class AdamConfig(MethodConfig):
    """Adam hyperparameters (PyTorch defaults apart from the tuned learning rate)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self) -> None:
        self._positive("lr", "eps")
        self._nonnegative("weight_decay")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")


@register
class Adam(_TorchOptimizerMethod):
    """Adam (Kingma & Ba, ICLR 2015) on ``torch.optim.Adam``."""

    name = "adam"
    Config = AdamConfig
    config: AdamConfig
    reporting_name = "Adam (backprop)"
    paper = "Kingma & Ba, Adam: A Method for Stochastic Optimization, ICLR 2015"

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.Adam(
            self.model.parameters(), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=c.weight_decay
        )


@dataclass
class LBFGSConfig(MethodConfig):
    """L-BFGS hyperparameters: ``max_iter`` inner iterations per ``step`` (one step per full batch in the
    full-batch protocol of docs/methods/conventions.md §9.3), strong-Wolfe line search."""

    lr: float = 1.0
    max_iter: int = 1
    history_size: int = 10
    line_search: str = "strong_wolfe"
    #: torch's LBFGS keeps its curvature history when a step moves nothing (line search t = 0, or a history
    #: direction that is not a descent direction), so every later step repeats the same null step. With this on,
    #: such a step clears the history and is retried once from steepest descent (the usual L-BFGS restart).
    restart_on_stall: bool = True

    def validate(self) -> None:
        self._positive("lr")
        self._int_at_least("max_iter", 1)
        self._int_at_least("history_size", 1)
        self._choice("line_search", ("strong_wolfe", "none"))


@register
class LBFGS(_TorchOptimizerMethod):
    """Full-batch L-BFGS baseline on ``torch.optim.LBFGS`` (Liu & Nocedal 1989)."""

    name = "lbfgs"
    Config = LBFGSConfig
    config: LBFGSConfig
    reporting_name = "L-BFGS (backprop)"
    paper = "Liu & Nocedal, On the limited memory BFGS method for large scale optimization, 1989"
    default_batch_size = 0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.LBFGS(
            self.model.parameters(),
            lr=c.lr,
            max_iter=c.max_iter,
            history_size=c.history_size,
            line_search_fn=None if c.line_search == "none" else c.line_search,
        )

    def step(self, x: torch.Tensor, y: torch.Tensor, *, idx: torch.Tensor | None = None) -> StepStats:
        self.model.train()

        def closure() -> float:
            self.optimizer.zero_grad(set_to_none=True)
            # nested in optimizer_step: the line search's evaluations are charged here, the rest of L-BFGS there
            with self.block("forward_backward"):
                if self.comm.world_size > 1:
                    # the global loss and gradient, identical on every rank, so the line search decides alike
                    return self._global_loss_and_grad(x, y)
                loss = evaluate_loss(self.loss, self.model(x), y)
                loss.backward()
                return float(loss.detach())

        # LBFGS returns the closure's value at the start of the step, the loss this method reports.
        before = [p.detach().clone() for p in self.model.parameters()] if self.config.restart_on_stall else []
        with self.block("optimizer_step"):
            loss = self.optimizer.step(closure)
        restarted = 0
        if before and all(torch.equal(p, b) for p, b in zip(self.model.parameters(), before)):
            self.optimizer.state.clear()
            with self.block("optimizer_step"):
                self.optimizer.step(closure)
            restarted = 1
        self.steps_taken += 1
        return StepStats(loss=float(loss), info={"restarts": float(restarted)})
