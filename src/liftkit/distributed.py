"""A small communicator over ``torch.distributed`` for data-parallel training (docs/methods/distributed.md).

Methods never import ``torch.distributed``: they talk to ``self.comm``, a :class:`Communicator`. The
single-process :class:`LocalComm` makes every collective a no-op (an all-reduce of one process's sum is that
sum), so a method written against the communicator runs unchanged in one process, and bit-identically to its
plain code when the method skips the calls for ``world_size == 1``.

:class:`TorchDistComm` wraps a ``torch.distributed`` process group: gloo on CPU (and in CI), NCCL on GPU. It is
created from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``LOCAL_RANK``) by :func:`comm_from_env`, with a collective timeout (``liftkit train --dist-timeout``). A
collective that fails because a peer died (its sockets close) or hung (the timeout expires) raises
:class:`PeerLostError` with a one-line message naming this rank and, with two processes, the lost one.

Every communicator counts the payload bytes this process hands to each kind of call (``bytes_sent``) and the
number of calls (``calls``), which the measurements in ``docs/history/distributed.md`` read. The payload of an
all-reduce is the tensor's size (after any float64 promotion); a ring all-reduce puts 2(R−1)/R times that on
the wire per process, which equals the payload for R = 2.
"""

from __future__ import annotations

import contextlib
import io
import os
from abc import ABC, abstractmethod
from collections import Counter
from datetime import timedelta
from typing import Any

import torch

from liftkit.errors import LiftkitError, PeerLostError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Communicator",
    "LocalComm",
    "PeerLostError",
    "TorchDistComm",
    "comm_from_env",
    "env_world_size",
    "shard_bounds",
]

DEFAULT_TIMEOUT_S = 300.0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): how many processes ``torchrun`` started."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise LiftkitError(f"WORLD_SIZE must be an integer, got {text!r}; launch with torchrun") from None


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of ``n`` items that ``rank`` holds: the first ``n mod R`` ranks hold
    one item more than the others."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class Communicator(ABC):
    """Rank, world size and the collectives a data-parallel method needs. Tensors are reduced in place."""

    def __init__(self) -> None:
        self.bytes_sent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics and summaries."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def reset_counters(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    def _count(self, op: str, nbytes: int) -> None:
        self.calls[op] += 1
        self.bytes_sent[op] += nbytes

    # -- collectives ------------------------------------------------------------------------------------------
    def all_reduce_sum_(self, tensor: torch.Tensor, *, float64: bool = False, op: str = "all_reduce") -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it. ``float64=True`` accumulates in float64 (Gram
        sums, docs/methods/distributed.md §1) and casts the sum back to the tensor's dtype. ``op`` is the label the byte
        counter files the call under."""
        if not self.distributed:
            return tensor
        if float64 and tensor.dtype != torch.float64:
            wide = tensor.to(torch.float64)
            self._all_reduce(wide, "sum", op)
            return tensor.copy_(wide)
        self._all_reduce(tensor, "sum", op)
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over all ranks, in place."""
        if self.distributed:
            self._all_reduce(tensor, "max", "all_reduce")
        return tensor

    def sum_scalars(self, *values: float, op: str = "all_reduce") -> tuple[float, ...]:
        """Sum Python floats over all ranks in one float64 all-reduce (objective terms, branch decisions)."""
        if not self.distributed:
            return tuple(float(v) for v in values)
        buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._all_reduce(buf, "sum", op)
        return tuple(float(v) for v in buf.cpu())

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order."""
        if not self.distributed:
            return [tensor]
        return self._all_gather(tensor)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s, in place."""
        if self.distributed:
            self._broadcast(tensor, src)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (anything ``torch.save`` can write) on every rank."""
        if not self.distributed:
            return obj
        if self.rank == src:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size, src, op="broadcast_object")
        if self.rank != src:
            payload = torch.empty(int(size), dtype=torch.uint8)
        self._broadcast(payload, src, op="broadcast_object")
        if self.rank == src:
            return obj
        return torch.load(io.BytesIO(payload.numpy().tobytes()), map_location="cpu", weights_only=False)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Point-to-point send to rank ``dst`` (blocks until received)."""
        self._check_peer(dst)
        self._send(tensor, dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` from rank ``src``; returns it."""
        self._check_peer(src)
        self._recv(tensor, src)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            self._barrier()

    def close(self) -> None:  # noqa: B027 (optional hook: only a real process group has something to release)
        """Release the process group (no-op for the local communicator)."""

    @property
    def device(self) -> torch.device:
        """Where this communicator's scalar buffers live (CPU for gloo, the rank's GPU for NCCL)."""
        return torch.device("cpu")

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"peer rank must be another rank in [0, {self.world_size}), got {peer}")

    # -- backend hooks (only called when world_size > 1) ------------------------------------------------------
    @abstractmethod
    def _all_reduce(self, tensor: torch.Tensor, how: str, op: str) -> None: ...

    @abstractmethod
    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...

    @abstractmethod
    def _broadcast(self, tensor: torch.Tensor, src: int, op: str = "broadcast") -> None: ...

    @abstractmethod
    def _send(self, tensor: torch.Tensor, dst: int) -> None: ...

    @abstractmethod
    def _recv(self, tensor: torch.Tensor, src: int) -> None: ...

    @abstractmethod
    def _barrier(self) -> None: ...


class LocalComm(Communicator):
    """One process: rank 0 of 1. Collectives return their input; there is no peer to send to."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def __repr__(self) -> str:
        return "LocalComm()"

    # A single process has nothing to exchange; the public methods never reach these (and send/recv refuse
    # every peer rank first).
    def _all_reduce(self, tensor: torch.Tensor, how: str, op: str) -> None:
        return None

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def _broadcast(self, tensor: torch.Tensor, src: int, op: str = "broadcast") -> None:
        return None

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        return None

    def _recv(self, tensor: torch.Tensor, src: int) -> None:
        return None

    def _barrier(self) -> None:
        return None


class TorchDistComm(Communicator):
    """A ``torch.distributed`` process group (gloo or NCCL) as a :class:`Communicator`.

    Build it with :func:`comm_from_env` under ``torchrun``. ``timeout_s`` bounds every collective: a peer that
    died makes the next collective fail at once (gloo sees its sockets close), one that hung makes it fail
    after ``timeout_s``; either way :class:`PeerLostError` names this rank.
    """

    def __init__(self, *, backend: str, rank: int, world_size: int, timeout_s: float, device: torch.device) -> None:
        super().__init__()
        import torch.distributed as dist

        self._dist = dist
        self._rank = rank
        self._world = world_size
        self.timeout_s = timeout_s
        self.backend = backend
        self._device = device
        if not dist.is_available():
            raise LiftkitError("this PyTorch build has no torch.distributed; install a build with it")
        if backend == "gloo" and not dist.is_gloo_available():
            raise LiftkitError("this PyTorch build has no gloo backend; use --device cuda (NCCL) or one process")
        if backend == "nccl" and not dist.is_nccl_available():
            raise LiftkitError("this PyTorch build has no NCCL backend; use --device cpu (gloo)")
        addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            if backend == "nccl":
                dist.init_process_group(
                    backend=backend, init_method="env://", rank=rank, world_size=world_size,
                    timeout=timedelta(seconds=timeout_s), device_id=device,
                )
            else:
                dist.init_process_group(
                    backend=backend, init_method="env://", rank=rank, world_size=world_size,
                    timeout=timedelta(seconds=timeout_s),
                )
        except Exception as exc:
            raise PeerLostError(
                f"rank {rank} of {world_size}: could not join the process group at {addr} within "
                f"{timeout_s:g} s ({_first_line(exc)}); check MASTER_ADDR/MASTER_PORT and that every rank started"
            ) from None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def device(self) -> torch.device:
        return self._device if self.backend == "nccl" else torch.device("cpu")

    def __repr__(self) -> str:
        return f"TorchDistComm(backend={self.backend!r}, rank={self.rank}, world_size={self.world_size})"

    def _lost(self, op: str, exc: BaseException) -> PeerLostError:
        # With two processes the lost peer is known; with more, gloo's error names an address, not a rank.
        who = f"rank {1 - self.rank}" if self.world_size == 2 else "another rank"
        return PeerLostError(
            f"rank {self.rank} of {self.world_size}: {op} failed: lost contact with {who}, which died or hung "
            f"(collective timeout --dist-timeout {self.timeout_s:g} s): {_first_line(exc)}"
        )

    def _run(self, op: str, fn: Any) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
            raise self._lost(op, exc) from None

    def _all_reduce(self, tensor: torch.Tensor, how: str, op: str) -> None:
        self._count(op, tensor.numel() * tensor.element_size())
        red = self._dist.ReduceOp.SUM if how == "sum" else self._dist.ReduceOp.MAX
        self._run(op, lambda: self._dist.all_reduce(tensor, op=red))

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._count("all_gather", tensor.numel() * tensor.element_size())
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run("all_gather", lambda: self._dist.all_gather(out, tensor.contiguous()))
        return out

    def _broadcast(self, tensor: torch.Tensor, src: int, op: str = "broadcast") -> None:
        self._count(op, tensor.numel() * tensor.element_size() if self.rank == src else 0)
        self._run(op, lambda: self._dist.broadcast(tensor, src=src))

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        self._count("send", tensor.numel() * tensor.element_size())
        self._run("send", lambda: self._dist.send(tensor.contiguous(), dst=dst))

    def _recv(self, tensor: torch.Tensor, src: int) -> None:
        self._count("recv", 0)
        self._run("recv", lambda: self._dist.recv(tensor, src=src))

    def _barrier(self) -> None:
        self._count("barrier", 0)
        self._run("barrier", lambda: self._dist.barrier())

    def close(self) -> None:
        if self._dist.is_initialized():
            # After a lost peer, tearing the group down can itself block on the dead sockets; the process is
            # about to exit, so a failure here changes nothing.
            with contextlib.suppress(Exception):
                self._dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def comm_from_env(*, timeout_s: float = DEFAULT_TIMEOUT_S, device: torch.device | None = None) -> Communicator:
    """The communicator for this process: :class:`LocalComm` when ``WORLD_SIZE`` is unset or 1, otherwise a
    :class:`TorchDistComm` over the ``torchrun`` environment (gloo for a CPU ``device``, NCCL for CUDA)."""
    if not (isinstance(timeout_s, int | float) and timeout_s > 0):
        raise LiftkitError(f"--dist-timeout must be a positive number of seconds, got {timeout_s!r}")
    world = env_world_size()
    if world <= 1:
        return LocalComm()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LiftkitError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun --nproc_per_node=N"
        )
    rank = int(os.environ["RANK"])
    device = device or torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    return TorchDistComm(backend=backend, rank=rank, world_size=world, timeout_s=float(timeout_s), device=device)
