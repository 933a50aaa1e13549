"""TIAM's state across steps: a typed dataclass whose checkpoint form (``as_dict`` / ``load_dict``) is derived
from its fields, and the per-sample rows of the full-batch auxiliary variables."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from liftkit.distributed import Communicator

__all__ = ["BlockHistory", "SampleRows", "TIAMState"]


#: the metadata of a field holding one tensor per layer whose row i belongs to dataset sample i (full mode)
_PER_SAMPLE = {"per_sample": True}


@dataclass
class BlockHistory:
    """Anchor of one block's inertia: ``prev`` is u^{k−1} (or the raw r^{k−1}); ``raw`` is r^k when
    ``history='raw'``."""

    prev: Tensor
    raw: Tensor | None = None


@dataclass
class SampleRows:
    """The full-batch auxiliary variables of one batch's samples (rows in batch order) with their inertia
    anchors; what a sweep updates in place."""

    z: list[Tensor]
    a: list[Tensor]
    z_hist: list[BlockHistory]
    a_hist: list[BlockHistory]


@dataclass
class TIAMState:
    """Everything TIAM keeps across steps beyond the model's parameters.

    Weights: per-layer inertia anchors for W_l and b_l and the last accepted θ of each backtracking block.
    Full mode: the auxiliary variables per dataset index (row i belongs to sample i), their inertia anchors,
    a mask of initialised rows and the iteration counter k that drives ε_k.
    """

    W_prev: list[Tensor] = field(default_factory=list)
    b_prev: list[Tensor] = field(default_factory=list)
    W_raw: list[Tensor] = field(default_factory=list)
    b_raw: list[Tensor] = field(default_factory=list)
    theta_W: list[float] = field(default_factory=list)
    theta_a: list[float] = field(default_factory=list)
    theta_zL: float = 0.0
    iteration: int = 0
    # full-batch auxiliary variables, indexed by dataset index: z[l], a[l] (l < L) and z[L-1] = z_L
    z: list[Tensor] = field(default_factory=list, metadata=_PER_SAMPLE)
    a: list[Tensor] = field(default_factory=list, metadata=_PER_SAMPLE)
    z_prev: list[Tensor] = field(default_factory=list, metadata=_PER_SAMPLE)
    a_prev: list[Tensor] = field(default_factory=list, metadata=_PER_SAMPLE)
    z_raw: list[Tensor] = field(default_factory=list, metadata=_PER_SAMPLE)
    a_raw: list[Tensor] = field(default_factory=list, metadata=_PER_SAMPLE)
    initialised: Tensor | None = None

    # -- checkpoint form ----------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of the checkpoint form: the field names."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def per_sample_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("per_sample"))

    def as_dict(self) -> dict[str, Any]:
        """Every field, tensors detached and cloned (a snapshot that later steps do not change)."""
        return {key: _snapshot(getattr(self, key)) for key in self.keys()}

    def load_dict(self, state: Mapping[str, Any], who: str) -> None:
        """Set every field from a checkpoint form (its keys must be exactly the field names); each value is
        converted to the field's declared type."""
        expected = set(self.keys())
        if set(state) != expected:
            raise ValueError(
                f"{who} state has keys {sorted(state)}, expected {sorted(expected)}; "
                "was it saved by another method or version?"
            )
        hints = typing.get_type_hints(type(self))
        for key in self.keys():
            setattr(self, key, _convert(hints[key], state[key]))

    def gathered_dict(self, comm: Communicator) -> dict[str, Any]:
        """The checkpoint form with every rank's sample rows merged (a collective: all ranks call it). Each
        dataset index is initialised on exactly one rank, so a sum of the zero-masked shards is exact."""
        assert self.initialised is not None
        device = self.initialised.device
        size_t = comm.all_reduce_max_(torch.tensor([float(self.initialised.numel())], device=device))
        size = int(size_t[0])
        mask = torch.zeros(size, dtype=torch.bool, device=device)
        mask[: self.initialised.numel()] = self.initialised
        owners = comm.all_reduce_sum_(mask.to(torch.float64))

        def merged(ts: list[Tensor]) -> list[Tensor]:
            out = []
            for t in ts:
                full = t.new_zeros(size, t.shape[1])
                full[: t.shape[0]] = t.detach()
                full[~mask] = 0.0
                out.append(comm.all_reduce_sum_(full, op="checkpoint"))
            return out

        state = self.as_dict()
        for key in self.per_sample_keys():
            state[key] = merged(getattr(self, key))
        state["initialised"] = owners > 0
        return state

    # -- the per-sample rows (full mode) ---------------------------------------------------------------------
    def ensure_rows(self, size: int, widths_z: list[int], template: Tensor, raw: bool) -> None:
        """Grow the per-sample stores (zero rows, not yet initialised) to cover dataset indices 0..size−1; z has
        one column block per layer (``widths_z``), a one per hidden layer; the raw anchors only when ``raw``."""
        device = template.device
        if self.initialised is None:
            self.initialised = torch.zeros(0, dtype=torch.bool, device=device)
        if self.initialised.numel() >= size:
            return
        grow = size - self.initialised.numel()
        self.initialised = torch.cat([self.initialised, torch.zeros(grow, dtype=torch.bool, device=device)])
        widths_a = widths_z[:-1]

        def grown(ts: list[Tensor], widths: list[int]) -> list[Tensor]:
            if not ts:
                return [template.new_zeros(size, w) for w in widths]
            return [torch.cat([t, t.new_zeros(grow, t.shape[1])]) for t in ts]

        self.z, self.z_prev = grown(self.z, widths_z), grown(self.z_prev, widths_z)
        self.a, self.a_prev = grown(self.a, widths_a), grown(self.a_prev, widths_a)
        if raw:
            self.z_raw, self.a_raw = grown(self.z_raw, widths_z), grown(self.a_raw, widths_a)

    def initialise_rows(self, rows: Tensor, z0: list[Tensor], a0: list[Tensor]) -> None:
        """Set the rows ``rows`` of every store (values and anchors) to ``z0``, ``a0`` (a forward pass). The stores
        may share tensors (a block that kept its value is its own anchor); they all receive the same rows."""
        for store in (self.z, self.z_prev, self.z_raw):
            for l, t in enumerate(z0[: len(store)]):
                store[l][rows] = t
        for store in (self.a, self.a_prev, self.a_raw):
            for l, t in enumerate(a0[: len(store)]):
                store[l][rows] = t
        assert self.initialised is not None
        self.initialised[rows] = True

    def _covers_in_order(self, idx: Tensor) -> bool:
        """Whether ``idx`` is 0, 1, …, N−1 for the N stored rows (the full batch in dataset order)."""
        n = self.z[0].shape[0] if self.z else 0
        return idx.numel() == n and bool((idx == torch.arange(n, device=idx.device)).all())

    def rows(self, idx: Tensor) -> SampleRows:
        """The stored auxiliary variables of the samples ``idx`` in batch order: copies, or the stored tensors
        themselves when ``idx`` is every row in order (a sweep replaces them, it never writes into them)."""
        if self._covers_in_order(idx):
            z_hist = [BlockHistory(t, self.z_raw[l] if self.z_raw else None) for l, t in enumerate(self.z_prev)]
            a_hist = [BlockHistory(t, self.a_raw[l] if self.a_raw else None) for l, t in enumerate(self.a_prev)]
            return SampleRows(list(self.z), list(self.a), z_hist, a_hist)
        z = [t[idx] for t in self.z]
        a = [t[idx] for t in self.a]
        z_hist = [BlockHistory(self.z_prev[l][idx], self.z_raw[l][idx] if self.z_raw else None) for l in range(len(z))]
        a_hist = [BlockHistory(self.a_prev[l][idx], self.a_raw[l][idx] if self.a_raw else None) for l in range(len(a))]
        return SampleRows(z, a, z_hist, a_hist)

    def store_rows(self, idx: Tensor, rows: SampleRows) -> None:
        """Write a sweep's result back to the samples ``idx``."""
        if self._covers_in_order(idx):
            self.z, self.a = list(rows.z), list(rows.a)
            self.z_prev, self.a_prev = [h.prev for h in rows.z_hist], [h.prev for h in rows.a_hist]
            if self.z_raw:
                self.z_raw = [t if h.raw is None else h.raw for t, h in zip(self.z_raw, rows.z_hist)]
                self.a_raw = [t if h.raw is None else h.raw for t, h in zip(self.a_raw, rows.a_hist)]
            return
        for values, hists, store, prev, raw in (
            (rows.z, rows.z_hist, self.z, self.z_prev, self.z_raw),
            (rows.a, rows.a_hist, self.a, self.a_prev, self.a_raw),
        ):
            for l, (value, hist) in enumerate(zip(values, hists)):
                store[l][idx] = value
                prev[l][idx] = hist.prev
                if raw and hist.raw is not None:
                    raw[l][idx] = hist.raw


def _snapshot(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    return value


def _convert(tp: Any, value: Any) -> Any:
    """``value`` as the declared type ``tp`` (tensors cloned, numbers cast)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v) for v in value]
    if origin is not None:  # Tensor | None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    casts: dict[Any, Callable[[Any], Any]] = {Tensor: lambda t: t.detach().clone(), float: float, int: int}
    return casts[tp](value)
