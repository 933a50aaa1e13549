"""Where a method's step spends its time: a per-block profiler on the :meth:`Method.block` hook.

Methods bracket the named units of their step (``with self.block("w_block[1]"): ...``). A
:class:`BlockProfiler` attached as the method's block hook times every block and counts the matrix-product
FLOPs inside it, so a step splits into

* **exclusive time** per block: the time between entering and leaving a block that no nested block claims;
  nested blocks are charged to the innermost one, and the time no block claims goes to ``other``. Every
  interval of the step is charged to exactly one entry, so the shares sum to the measured step time;
* **calls per step** of each block;
* **matrix-product FLOPs** per step, from the aten operators that reach the dispatcher (``mm``, ``addmm``,
  ``bmm``, ``baddbmm``, convolutions and their backward; ``matmul``/``linear``/``einsum`` decompose into
  these), with torch's own FLOP formulas (``torch.utils.flop_counter``): an (m×k)@(k×n) product counts
  2·m·k·n. Factorisations and triangular solves (Cholesky, ``cholesky_solve``) are not counted, nor are
  products a method runs on worker threads (the dispatch mode is per thread);
* **achieved GFLOP/s** per block: its FLOPs over its exclusive time. Compare it with the machine's measured
  matmul peak (:func:`measure_matmul_peaks`): a block far below the peak is bound by small products, memory
  or Python, one near it can only get cheaper by doing less work.

Counting FLOPs sends every tensor operation through a Python dispatch mode, which slows the step. The
profiler therefore counts FLOPs on a sample of steps (every ``flop_every``-th, the first included, which also
keeps one-off warm-up out of the timing) and takes the times from the other steps.

Usage::

    from liftkit.profiling import profile
    with profile(method) as prof:            # attaches the hook; detached (zero cost) afterwards
        for x, y in batches:
            method.step(x, y)
    print(render_profile(prof.report(peaks=measure_matmul_peaks())))

``liftkit train --profile`` and ``fit(..., profile=True)`` do the same around the trainer's steps and write
``profile.json`` into the run's output directory.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from liftkit.methods.base import Method

__all__ = [
    "OTHER",
    "PROFILE_NOTE",
    "BlockProfiler",
    "measure_matmul_peaks",
    "profile",
    "render_profile",
]

#: the entry that collects the step time (and FLOPs) outside every named block
OTHER = "other"


@dataclass
class _Totals:
    """Sums over a set of steps for one block."""

    seconds: float = 0.0
    calls: int = 0
    flops: int = 0


class _FlopMode(TorchDispatchMode):
    """Counts the FLOPs of every matrix product and charges them to the profiler's innermost open block."""

    def __init__(self, profiler: BlockProfiler) -> None:
        super().__init__()
        self.profiler = profiler

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.profiler._add_flops(int(formula(*args, **kwargs, out_val=out)))
        return out


_NO_BLOCK: AbstractContextManager[None] = contextlib.nullcontext()


class _BlockContext(AbstractContextManager[None]):
    """``with profiler(name):`` -- re-entrant: the profiler's stack, not this object, records what is open."""

    __slots__ = ("name", "profiler")

    def __init__(self, profiler: BlockProfiler, name: str) -> None:
        self.profiler = profiler
        self.name = name

    def __enter__(self) -> None:
        self.profiler._enter(self.name)

    def __exit__(self, *exc: object) -> None:
        self.profiler._exit()


def _warm_up_dispatch(profiler: BlockProfiler) -> None:
    """The first operator under a dispatch mode imports parts of torch (seconds, once per process); pay it
    here, not inside the first profiled step of a training run."""
    with _FlopMode(profiler):
        torch.nn.functional.linear(torch.ones(1, 1), torch.ones(1, 1))


class BlockProfiler:
    """A block hook (``method.set_block_hook(profiler)``) that times and FLOP-counts named blocks.

    Bracket each ``method.step`` with :meth:`step` (or use :func:`profile`, which does it for you); blocks
    entered outside a bracketed step are ignored. ``flop_every=k`` counts FLOPs on steps 0, k, 2k, ...
    (``0``: never); ``synchronize`` waits for the GPU at every block boundary so asynchronous kernels are
    charged to the block that launched them (default: when CUDA is initialised).
    """

    def __init__(self, *, flop_every: int = 10, synchronize: bool | None = None) -> None:
        if isinstance(flop_every, bool) or not isinstance(flop_every, int) or flop_every < 0:
            raise ValueError(f"flop_every must be a non-negative integer, got {flop_every!r}")
        self.flop_every = flop_every
        self.synchronize = torch.cuda.is_initialized() if synchronize is None else synchronize
        self._stack: list[str] = []
        self._last = 0.0
        self._in_step = False
        self._thread = threading.get_ident()
        self._current: dict[str, _Totals] = {}
        # one stateless context per block name (the open blocks live on the stack), so entering costs no allocation
        self._contexts: dict[str, _BlockContext] = {}
        # totals over the steps timed without FLOP counting, and over the FLOP-counted ones
        self.timed: dict[str, _Totals] = {}
        self.counted: dict[str, _Totals] = {}
        self.timed_steps = 0
        self.counted_steps = 0
        self.timed_seconds = 0.0
        self.counted_seconds = 0.0
        if flop_every:
            _warm_up_dispatch(self)

    # -- the hook ---------------------------------------------------------------------------------------------
    def __call__(self, name: str) -> AbstractContextManager[None]:
        # Blocks that a method runs on worker threads (a thread pool over layers) are not split out: their time
        # stays with the block on the stepping thread that waits for them.
        if not self._in_step or threading.get_ident() != self._thread:
            return _NO_BLOCK
        ctx = self._contexts.get(name)
        if ctx is None:
            ctx = self._contexts[name] = _BlockContext(self, name)
        return ctx

    def _enter(self, name: str) -> None:
        self._charge()
        self._entry(name).calls += 1
        self._stack.append(name)

    def _exit(self) -> None:
        self._charge()
        self._stack.pop()

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _charge(self) -> None:
        """Charge the time since the last boundary to the innermost open block (``other`` outside all)."""
        now = self._now()
        self._entry(self._stack[-1] if self._stack else OTHER).seconds += now - self._last
        self._last = now

    def _entry(self, name: str) -> _Totals:
        entry = self._current.get(name)
        if entry is None:
            entry = self._current[name] = _Totals()
        return entry

    def _add_flops(self, flops: int) -> None:
        if not self._in_step:
            return
        self._entry(self._stack[-1] if self._stack else OTHER).flops += flops

    # -- steps ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Bracket one ``method.step``: its time is split over the blocks entered inside."""
        if self._in_step:
            raise RuntimeError("BlockProfiler.step() brackets do not nest")
        count = self.flop_every > 0 and (self.timed_steps + self.counted_steps) % self.flop_every == 0
        self._current, self._stack = {}, []
        mode = _FlopMode(self) if count else contextlib.nullcontext()
        self._in_step = True
        self._thread = threading.get_ident()
        start = self._last = self._now()
        try:
            with mode:
                yield
        finally:
            self._charge()
            self._in_step = False
            self._finish_step(count, self._last - start)

    def _finish_step(self, counted: bool, seconds: float) -> None:
        into = self.counted if counted else self.timed
        if counted:
            self.counted_steps += 1
            self.counted_seconds += seconds
        else:
            self.timed_steps += 1
            self.timed_seconds += seconds
        for name, t in self._current.items():
            total = into.setdefault(name, _Totals())
            total.seconds += t.seconds
            total.calls += t.calls
            total.flops += t.flops

    # -- the report -------------------------------------------------------------------------------------------
    def report(self, peaks: dict[str, Any] | None = None) -> dict[str, Any]:
        """Per-step figures of every block (the content of ``profile.json``), largest share first.

        Times come from the steps without FLOP counting when there are any (else from all steps, flagged by
        ``timing_includes_flop_counting``); FLOPs per step are the mean over the FLOP-counted steps.
        """
        use_timed = self.timed_steps > 0
        time_src = self.timed if use_timed else _merge(self.timed, self.counted)
        time_steps = self.timed_steps if use_timed else self.timed_steps + self.counted_steps
        step_seconds = (self.timed_seconds if use_timed else self.timed_seconds + self.counted_seconds)
        step_seconds = step_seconds / time_steps if time_steps else 0.0
        all_steps = self.timed_steps + self.counted_steps
        calls_src = _merge(self.timed, self.counted)
        blocks = []
        for name in sorted(set(time_src) | set(self.counted) | set(calls_src)):
            seconds = time_src[name].seconds / time_steps if name in time_src and time_steps else 0.0
            flops = self.counted[name].flops / self.counted_steps if name in self.counted else None
            blocks.append(_row(name, seconds, step_seconds, calls_src[name].calls / all_steps if all_steps else 0.0,
                               flops))
        blocks.sort(key=lambda b: (b["name"] == OTHER, -b["seconds_per_step"]))
        total_flops = sum(b["flops_per_step"] or 0.0 for b in blocks) if self.counted_steps else None
        return {
            "format": 1,
            "steps": all_steps,
            "timed_steps": time_steps,
            "flop_counted_steps": self.counted_steps,
            "timing_includes_flop_counting": not use_timed and self.counted_steps > 0,
            "seconds_per_step": step_seconds,
            "flops_per_step": total_flops,
            "gflops": _gflops(total_flops, step_seconds),
            "threads": torch.get_num_threads(),
            "blocks": blocks,
            "peaks": peaks,
        }


def _merge(a: dict[str, _Totals], b: dict[str, _Totals]) -> dict[str, _Totals]:
    out: dict[str, _Totals] = {}
    for src in (a, b):
        for name, t in src.items():
            m = out.setdefault(name, _Totals())
            m.seconds += t.seconds
            m.calls += t.calls
            m.flops += t.flops
    return out


def _gflops(flops: float | None, seconds: float) -> float | None:
    return flops / seconds / 1e9 if flops is not None and seconds > 0 else None


def _row(name: str, seconds: float, step_seconds: float, calls: float, flops: float | None) -> dict[str, Any]:
    return {
        "name": name,
        "seconds_per_step": seconds,
        "share": seconds / step_seconds if step_seconds > 0 else 0.0,
        "calls_per_step": calls,
        "flops_per_step": flops,
        "gflops": _gflops(flops, seconds),
    }


@contextlib.contextmanager
def profile(method: Method, profiler: BlockProfiler | None = None) -> Iterator[BlockProfiler]:
    """Profile every ``method.step`` called inside the ``with``: attaches the profiler as the block hook and
    brackets the steps; on exit the hook is detached and ``step`` is the class's again."""
    prof = profiler if profiler is not None else BlockProfiler()
    original: Callable[..., Any] = method.step
    shadowed = "step" in vars(method)

    def profiled_step(*args: Any, **kwargs: Any) -> Any:
        with prof.step():
            return original(*args, **kwargs)

    previous_hook = method._block_hook
    method.set_block_hook(prof)
    method.step = profiled_step  # type: ignore[method-assign]
    try:
        yield prof
    finally:
        method.set_block_hook(previous_hook)
        if shadowed:
            method.step = original  # type: ignore[method-assign]
        else:
            del method.step


# -- the machine's matmul peak --------------------------------------------------------------------------------
#: side of the square matrices timed by :func:`measure_matmul_peaks`
PEAK_SIZE = 1024


def _matmul_gflops(dtype: torch.dtype, device: torch.device, n: int, min_seconds: float) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)  # warm-up: thread pool, kernel selection
    sync()
    best = float("inf")
    spent, reps = 0.0, 0
    while spent < min_seconds or reps < 3:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2.0 * n**3 / best / 1e9


def measure_matmul_peaks(
    device: torch.device | str = "cpu", *, n: int | None = None, min_seconds: float = 0.2
) -> dict[str, Any]:
    """The machine's float32 and float64 matmul rate in GFLOP/s: the best of repeated n×n products at the
    current torch thread count (the run's), a practical peak for the achieved rates of a profile."""
    dev = torch.device(device)
    size = n if n is not None else (4 * PEAK_SIZE if dev.type == "cuda" else PEAK_SIZE)
    return {
        "float32": _matmul_gflops(torch.float32, dev, size, min_seconds),
        "float64": _matmul_gflops(torch.float64, dev, size, min_seconds),
        "size": size,
        "threads": torch.get_num_threads(),
        "device": str(dev),
    }


# -- rendering ------------------------------------------------------------------------------------------------
#: what the columns of a profile table mean (printed once above the tables of a bench)
PROFILE_NOTE = (
    "Per named block of the method's step: its exclusive share of the step time (nested blocks are charged to "
    "the innermost; `other` is the time outside every block), calls per step, matrix-product FLOPs per step "
    "(mm/addmm/bmm/conv, 2mkn per (m×k)@(k×n) product; factorisations not counted) and the achieved GFLOP/s, "
    "to compare with the measured matmul peaks."
)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_profile(report: dict[str, Any], title: str | None = None) -> str:
    """A markdown table of a :meth:`BlockProfiler.report` (with the measured peaks beside it)."""
    lines = [f"#### Profile: {title}", ""] if title else []
    head = (
        f"{1e3 * report['seconds_per_step']:.2f} ms per step over {report['timed_steps']} timed steps; "
        f"FLOPs counted on {report['flop_counted_steps']} steps; {report['threads']} thread(s)"
    )
    peaks = report.get("peaks")
    if peaks:
        head += (
            f". Matmul peak ({peaks['size']}×{peaks['size']}, {peaks['threads']} thread(s)): "
            f"float32 {peaks['float32']:.1f} GFLOP/s, float64 {peaks['float64']:.1f} GFLOP/s"
        )
    lines += [head + ".", ""]
    lines.append("| block | share of step % | ms/step | calls/step | MFLOP/step | GFLOP/s |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    rows = [*report["blocks"], _total_row(report)]
    for b in rows:
        flops = b["flops_per_step"]
        calls = None if b["name"] == OTHER else b["calls_per_step"]
        lines.append(
            f"| {b['name']} | {100 * b['share']:.1f} | {1e3 * b['seconds_per_step']:.3f} | {_fmt(calls, '.2f')} | "
            f"{_fmt(None if flops is None else flops / 1e6, '.2f')} | {_fmt(b['gflops'] if flops else None, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def _total_row(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "**step**",
        "share": sum(b["share"] for b in report["blocks"]),
        "seconds_per_step": report["seconds_per_step"],
        "calls_per_step": 1.0 if report["steps"] else 0.0,
        "flops_per_step": report["flops_per_step"],
        "gflops": report["gflops"],
    }
