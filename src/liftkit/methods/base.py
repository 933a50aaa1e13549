"""The common interface of every training method.

A method wraps an ordinary ``nn.Sequential`` (trained in place: the user's model goes in, the same module
comes out trained) and exposes

* a validated constructor: hyperparameters are the fields of the method's :attr:`Method.Config` dataclass;
  an unknown name or an invalid value raises ``ValueError`` naming it;
* ``step(x, y, idx=None)`` on one mini-batch, returning a :class:`StepStats` (at least the loss);
* ``state_dict()`` / ``load_state_dict()`` holding everything needed to continue bit-identically;
* a declared loss: ``"ce"`` (softmax cross-entropy on logits) or ``"mse"`` (squared error against one-hot
  targets, or against float targets such as an autoencoder's input).

The trainer treats every method alike: per-batch BCD methods (LPOM, Fenchel), optimizer-driven ones
(ProxProp), direct-overwrite ones (SIBP) and full-batch ones (TIAM: the trainer simply passes the whole
training set as one batch) all go through ``step``. Methods that keep per-sample state across batches receive
the dataset indices of the batch as ``idx``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from liftkit.distributed import Communicator, LocalComm

__all__ = [
    "LOSSES",
    "BlockHook",
    "Method",
    "MethodConfig",
    "StepStats",
    "available",
    "evaluate_loss",
    "get",
    "parse_hparam",
    "register",
    "targets_for",
]

LOSSES = ("ce", "mse")

#: A block hook: called with a block's name, it returns the context manager that brackets the block's work
#: (a profiler times it and counts its products). See :meth:`Method.block`.
BlockHook = Callable[[str], AbstractContextManager[None]]

# One shared no-op context: ``nullcontext`` keeps no state, so a disabled ``Method.block`` allocates nothing.
_NO_BLOCK: AbstractContextManager[None] = contextlib.nullcontext()


@dataclass
class StepStats:
    """What one ``step`` reports: the mini-batch loss (the method's declared loss, at the start of the step)
    and method-specific diagnostics (residuals, weight norms, inner-iteration counts, objective values)."""

    loss: float
    info: dict[str, float] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """Base of every method's hyperparameter dataclass. Subclasses add fields with defaults and override
    :meth:`validate` (raising ``ValueError`` that names the bad value)."""

    def validate(self) -> None:
        return None

    # helpers for subclasses' validate()
    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            values = value if isinstance(value, tuple | list) else (value,)
            for v in values:
                if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                    raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    def _nonnegative(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        v = getattr(self, name)
        if v not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {v!r}")

    def _int_at_least(self, name: str, low: int) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


ConfigT = TypeVar("ConfigT", bound=MethodConfig)


def _field_types(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def _convert(tp: Any, text: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(typing.get_args(tp)):
            return None
        # A comma means the tuple alternative (e.g. one mu per layer); otherwise the first scalar that parses.
        ordered = sorted(args, key=lambda a: 0 if (typing.get_origin(a) is tuple) == ("," in text) else 1)
        errors: list[str] = []
        for a in ordered:
            try:
                return _convert(a, text, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {text!r}")
        return text
    if origin is tuple:
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else float
        return tuple(_convert(inner, part.strip(), name) for part in text.split(",") if part.strip())
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {text!r}") from None
    if tp is str:
        return text
    raise ValueError(f"cannot parse a value for {name} of type {tp}")


def parse_hparam(config_cls: type[MethodConfig], key: str, text: str) -> Any:
    """Convert the text of ``--set key=text`` to the type of field ``key`` of ``config_cls``."""
    types_ = _field_types(config_cls)
    if key not in types_:
        valid = ", ".join(f.name for f in dataclasses.fields(config_cls))
        raise ValueError(f"unknown hyperparameter {key!r}; valid keys: {valid}")
    return _convert(types_[key], text, key)


def build_config(config_cls: type[ConfigT], method_name: str, hparams: Mapping[str, Any]) -> ConfigT:
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(hparams) - names)
    if unknown:
        valid = ", ".join(f.name for f in dataclasses.fields(config_cls)) or "(none)"
        raise ValueError(f"unknown hyperparameter {unknown[0]!r} for method {method_name}; valid keys: {valid}")
    types_ = _field_types(config_cls)
    values: dict[str, Any] = {}
    for key, value in hparams.items():
        converted = _convert(types_[key], value, key) if isinstance(value, str) else value
        values[key] = tuple(converted) if isinstance(converted, list) else converted
    config = config_cls(**values)
    config.validate()
    return config


def targets_for(y: torch.Tensor, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """MSE targets: one-hot for integer labels, ``y`` itself (flattened per sample) for float targets."""
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.one_hot(y.long(), out_features).to(dtype)
    return y.reshape(y.shape[0], -1).to(dtype)


def evaluate_loss(kind: str, output: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The declared loss of a method on a batch of network outputs.

    ``"ce"``: softmax cross-entropy (mean over samples). ``"mse"``: squared error to the one-hot (or float)
    targets, summed over output units and averaged over samples. Methods that optimise a summed or halved
    variant (docs/methods/conventions.md §3) keep that scaling internally; this is the one number every report shows.
    """
    out = output.reshape(output.shape[0], -1)
    if kind == "ce":
        if y.dtype.is_floating_point:
            raise ValueError("cross-entropy needs integer class labels; use --loss mse for float targets")
        return F.cross_entropy(out, y, reduction=reduction)
    if kind == "mse":
        per_sample = (out - targets_for(y, out.shape[1], out.dtype)).pow(2).sum(dim=1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


class Method(ABC):
    """Base class of every training method. See the module docstring for the contract."""

    #: registry name (``liftkit.methods.get(name)``)
    name: ClassVar[str] = ""
    #: the hyperparameter dataclass
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: the loss used when the caller does not choose one, and the losses the method can optimise
    default_loss: ClassVar[str] = "ce"
    supported_losses: ClassVar[tuple[str, ...]] = LOSSES
    #: activation the papers' models put on the output layer; the trainer uses it when it builds an MLP from a
    #: spec string for this method. ``None``: bare logits; ``"hidden"``: the model's hidden activation (LPOM
    #: applies the same φ at the output too).
    model_output_activation: ClassVar[str | None] = None
    #: name shown in reports (with the suffix of docs/methods/conventions.md §1.3 where a default is an assumption)
    reporting_name: ClassVar[str] = ""
    #: paper reference for docs and ``liftkit methods``
    paper: ClassVar[str] = ""
    #: default batch size when the caller does not give one (``0``: the whole training set, full batch)
    default_batch_size: ClassVar[int] = 100
    #: whether ``step`` reproduces the single-process update when the global batch is split over the ranks of
    #: ``self.comm`` (docs/methods/distributed.md); methods without it refuse a communicator with more than one process
    supports_data_parallel: ClassVar[bool] = False

    #: the size of the global mini-batch this rank's shard belongs to; the trainer sets it before every
    #: ``step`` under data parallelism (see :meth:`global_batch_size`)
    _global_batch: int | None = None
    _comm: Communicator | None = None
    #: the block hook set by :meth:`set_block_hook` (``None``: blocks cost one attribute read)
    _block_hook: BlockHook | None = None

    #: the named settings of the method; the first is the default. ``tuned``: the best setting found on
    #: validation data (the Config defaults, possibly resolved from the model); ``paper``: the published one.
    presets: ClassVar[tuple[str, ...]] = ("tuned", "paper")

    def __init__(
        self, model: nn.Module, *, loss: str | None = None, preset: str | None = None, **hparams: Any
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"{self.name} needs a torch.nn.Module, got {type(model).__name__}")
        loss = loss or self.default_loss
        if loss not in self.supported_losses:
            raise ValueError(
                f"{self.name} cannot optimise loss {loss!r}; supported: {', '.join(self.supported_losses)}"
            )
        self.model = model
        self.loss = loss
        self.preset = self.presets[0] if preset is None else preset
        if self.preset not in self.presets:
            valid = ", ".join(self.presets)
            raise ValueError(f"unknown preset {preset!r} for method {self.name}; choose one of {valid}")
        # explicit hyperparameters override the preset, which overrides the Config defaults
        resolved = {**self.preset_values(self.preset, model), **hparams}
        self.config = build_config(self.Config, self.name, resolved)
        self.steps_taken = 0

    @classmethod
    def preset_values(cls, preset: str, model: nn.Module) -> dict[str, Any]:
        """The hyperparameters of ``preset`` for ``model`` that differ from the Config defaults.

        Methods override this to give their ``paper`` setting and the defaults that follow the architecture
        (for example per activation or for convolutional layers); the base method's presets are its defaults.
        """
        return {}

    # -- the contract ---------------------------------------------------------------------------------------
    @abstractmethod
    def step(self, x: torch.Tensor, y: torch.Tensor, *, idx: torch.Tensor | None = None) -> StepStats:
        """One update on the mini-batch ``(x, y)``; ``idx`` are the batch's dataset indices (optional)."""

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond the model's parameters (optimizer moments, persistent lifted variables, ...)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} has no extra state to load, got keys {sorted(state)}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "loss": self.loss,
            "preset": self.preset,
            "hparams": dataclasses.asdict(self.config),
            "steps_taken": self.steps_taken,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"state dict is for method {state.get('method')!r}, not {self.name!r}")
        self.model.load_state_dict(state["model"])
        self.steps_taken = int(state.get("steps_taken", 0))
        self.load_extra_state(state.get("extra", {}))

    # -- named blocks (profiling) ------------------------------------------------------------------------------
    def block(self, name: str) -> AbstractContextManager[None]:
        """Bracket one named unit of a step's work, e.g. ``with self.block("w_block[1]"): ...``.

        Methods name their blocks (``x_block[l]``, ``w_block[l]``, ``gram``, ``power_iteration``,
        ``backtracking``, ``optimizer_step``, ...) so that a profiler can attribute a step's time and matrix
        products to them. Without a hook this returns one shared no-op context: nothing is timed or counted.
        Blocks may nest; a profiler attributes time to the innermost open block.
        """
        hook = self._block_hook
        return _NO_BLOCK if hook is None else hook(name)

    def set_block_hook(self, hook: BlockHook | None) -> None:
        """Attach (or with ``None`` detach) the hook that :meth:`block` calls. One hook at a time."""
        self._block_hook = hook

    # -- data parallelism (docs/methods/distributed.md) ----------------------------------------------------------------
    @property
    def comm(self) -> Communicator:
        """The communicator the method reduces over: :class:`~liftkit.distributed.LocalComm` (a no-op) unless
        the trainer set one with :meth:`set_comm`."""
        if self._comm is None:
            self._comm = LocalComm()
        return self._comm

    def set_comm(self, comm: Communicator) -> None:
        """Run data-parallel over ``comm``: this process's ``step`` batches are its shard of each global
        batch. Raises ``ValueError`` for a method that does not support it (``supports_data_parallel``)."""
        if comm.world_size > 1 and not self.supports_data_parallel:
            raise ValueError(
                f"method {self.name} does not support data-parallel training yet ({comm.world_size} processes "
                "requested); run it in a single process (without torchrun)"
            )
        if comm.world_size > 1:
            reason = self.single_process_only()
            if reason is not None:
                raise ValueError(reason)
        self._comm = comm

    def single_process_only(self) -> str | None:
        """A one-line error (naming the setting and the fix) when this configuration cannot run on several
        processes, else ``None``; :meth:`set_comm` raises it for a world size above 1."""
        return None

    @property
    def _reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The in-place tensor sum over data-parallel processes, ``None`` in one process."""
        return self.comm.all_reduce_sum_ if self.comm.world_size > 1 else None

    def _sum_scalars(self, *values: float) -> tuple[float, ...]:
        """Sums of per-process scalars over all processes (the values themselves in one process)."""
        return self.comm.sum_scalars(*values) if self.comm.world_size > 1 else values

    @property
    def shards_batch(self) -> bool:
        """Whether the trainer splits each global batch over the ranks (data parallelism, the default). A
        model-parallel method (layer-parallel ``lpom-sync``) returns ``False``: every rank then gets the whole
        batch and the trainer counts the step loss once (the method reports the replicated global loss)."""
        return True

    def synchronize_model(self) -> None:  # noqa: B027 (optional hook: only model-parallel methods need it)
        """Make ``self.model`` hold the current weights on every rank. The trainer calls it after each epoch's
        steps, before evaluation and checkpointing; data-parallel methods keep the weights replicated at all
        times and need nothing here."""

    def set_global_batch_size(self, size: int | None) -> None:
        """Tell the method how many samples the global mini-batch of the next ``step`` holds (the trainer
        does this before every step; ``None``: the local batch is the global one)."""
        self._global_batch = size

    def global_batch_size(self, local_size: int) -> int:
        """m_global, the size of the global batch that a mean must divide by (docs/methods/distributed.md §1): the size
        the trainer announced, else, in one process, ``local_size``, else the all-reduced sum of local sizes."""
        if self._global_batch is not None:
            return self._global_batch
        if self.comm.world_size == 1:
            return local_size
        return int(self.comm.sum_scalars(float(local_size))[0])

    # -- conveniences -----------------------------------------------------------------------------------------
    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The declared loss of the current model on ``(x, y)`` (no gradient)."""
        with torch.no_grad():
            return evaluate_loss(self.loss, self.model(x), y)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}(loss={self.loss!r}, {params})"


_REGISTRY: dict[str, type[Method]] = {}
_LOADERS: dict[str, Callable[[], None]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered method names, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def _load_all() -> None:
    # Importing the package imports every method module, which registers it.
    import liftkit.methods  # noqa: F401
