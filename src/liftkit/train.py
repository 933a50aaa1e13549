"""The trainer: one epoch loop for every method.

``fit(method, data, epochs=..., batch_size=...)`` draws deterministic seeded batches, calls
``method.step(x, y, idx=idx)`` on each, evaluates after every epoch (training loss on the full training set,
test loss and accuracy), appends a line to ``metrics.jsonl``, writes an atomic checkpoint, and at the end
``summary.json``. A run killed after epoch k and resumed with ``resume=True`` ends with exactly the weights,
metrics and history of an uninterrupted run (same seed, CPU). A non-finite loss stops the run with a
:class:`~liftkit.errors.DivergenceError` and leaves the last good checkpoint untouched.

``run(RunSpec(...))`` is the same from plain settings (what ``liftkit train`` calls): it loads the data, builds
the model from its spec string and the method from the registry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from liftkit import data as data_mod
from liftkit.determinism import check_deterministic_method, enable_determinism
from liftkit.distributed import DEFAULT_TIMEOUT_S, Communicator, LocalComm, comm_from_env, shard_bounds
from liftkit.errors import DivergenceError, LiftkitError
from liftkit.io import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from liftkit.loggers import Logger, LoggerSet
from liftkit.methods import Method, StepStats, evaluate_loss, get
from liftkit.models import build_model, parse_model_spec
from liftkit.profiling import BlockProfiler, measure_matmul_peaks

__all__ = ["RunSettings", "RunSpec", "evaluate", "fit", "run"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PROFILE = "profile.json"

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def _evaluate_sums(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, *, autoencoder: bool, batch_size: int
) -> tuple[float, int]:
    """Summed declared loss and number of correct predictions of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    n = x.shape[0]
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        out = model(xb)
        target = xb if autoencoder else y[start : start + batch_size]
        total_loss += float(evaluate_loss(loss, out, target, reduction="sum"))
        if not autoencoder:
            correct += int((out.reshape(out.shape[0], -1).argmax(dim=1) == target).sum())
    model.train(was_training)
    return total_loss, correct


def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    *,
    autoencoder: bool = False,
    batch_size: int = 4096,
    comm: Communicator | None = None,
) -> tuple[float, float | None]:
    """Mean declared loss and accuracy (``None`` for autoencoders) of ``model`` on ``(x, y)``.

    With a multi-process ``comm`` every rank evaluates its contiguous slice of ``(x, y)`` and the sums are
    all-reduced, so every rank returns the numbers of the whole set.
    """
    n = x.shape[0]
    if comm is None or comm.world_size == 1:
        total_loss, correct = _evaluate_sums(model, x, y, loss, autoencoder=autoencoder, batch_size=batch_size)
        return total_loss / n, (None if autoencoder else correct / n)
    start, stop = shard_bounds(n, comm.rank, comm.world_size)
    part_loss, part_correct = _evaluate_sums(
        model, x[start:stop], y[start:stop], loss, autoencoder=autoencoder, batch_size=batch_size
    )
    total_loss, total_correct = comm.sum_scalars(part_loss, float(part_correct), op="trainer")
    return total_loss / n, (None if autoencoder else round(total_correct) / n)


def _is_finite_model(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# -- phase 1: argument checks and the batch plan --------------------------------------------------------------------
@dataclass
class _Plan:
    """What the loop needs to know before it starts: the batch size, the process layout and the device data."""

    batch: int
    n_train: int
    comm: Communicator
    split: bool  # whether each global batch is sharded over the ranks
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _check_arguments(epochs: int, checkpoint_every: int, sampling: str, batch_size: Any) -> None:
    _positive_int("epochs", epochs)
    _positive_int("checkpoint_every", checkpoint_every)
    if sampling not in ("shuffle", "replacement"):
        raise ValueError(f"sampling must be shuffle or replacement, got {sampling!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch size must be a non-negative integer (0 = full batch), got {batch_size!r}")


def _plan(
    method: Method, data: data_mod.Dataset, batch_size: int, sampling: str, autoencoder: bool, comm: Communicator
) -> _Plan:
    n_train = int(data.x_train.shape[0])
    batch = n_train if batch_size == 0 else min(batch_size, n_train)
    world = comm.world_size
    if world > 1:
        method.set_comm(comm)
    split = world > 1 and method.shards_batch
    if split:
        smallest = batch if sampling == "replacement" or n_train % batch == 0 else n_train % batch
        if smallest < world:
            raise ValueError(
                f"a batch of {smallest} samples cannot be split over {world} processes; choose a batch size "
                f"of at least {world} whose remainder in the {n_train} training samples is 0 or at least {world}"
            )
    classes = None if autoencoder else data.num_classes
    data_mod.check_inputs(data.x_train, None if autoencoder else data.y_train, classes)
    data_mod.check_inputs(data.x_test, None if autoencoder else data.y_test, classes)
    device, dtype = method.device, method.dtype
    return _Plan(
        batch=batch, n_train=n_train, comm=comm, split=split,
        x_train=data.x_train.to(device=device, dtype=dtype), y_train=data.y_train.to(device),
        x_test=data.x_test.to(device=device, dtype=dtype), y_test=data.y_test.to(device),
    )


# -- phase 2: resume ---------------------------------------------------------------------------------------------------
@dataclass
class _Progress:
    """The run's history so far: restored from a checkpoint on resume, extended by every epoch."""

    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    start_epoch: int = 0


_RESUME_KEYS = ("method", "dataset", "model", "batch_size", "seed", "sampling", "loss", "hparams", "split")


def _resume(method: Method, out: Path, info: dict[str, Any], epochs: int, comm: Communicator) -> _Progress:
    """Load rank 0's checkpoint on every rank (on several machines only its disk has it)."""
    path = out / CHECKPOINT
    state = load_checkpoint(path) if comm.is_main and path.exists() else None
    state = comm.broadcast_object(state) if comm.world_size > 1 else state
    if state is None:
        if comm.is_main:
            print(f"liftkit: no checkpoint in {out}; starting from scratch", file=sys.stderr)
        return _Progress()
    saved = state["run_info"]
    for key in _RESUME_KEYS:
        if key in saved and key in info and saved[key] != info[key]:
            raise LiftkitError(
                f"cannot resume: the checkpoint in {out} was written with {key}={saved[key]!r}, this run has "
                f"{key}={info[key]!r}; use the same settings or a new --out directory"
            )
    if int(state["epoch"]) > epochs:
        raise LiftkitError(
            f"cannot resume: the checkpoint in {out} is at epoch {state['epoch']}, past --epochs {epochs}"
        )
    method.load_state_dict(state["method_state"])
    _set_rng_state(state["rng"])
    return _Progress(list(state["history"]), float(state["train_seconds"]), int(state["epoch"]))


# -- phase 3: one epoch ------------------------------------------------------------------------------------------------
def _divergence(method: Method, what: str, out: Path | None, hint: str = "") -> DivergenceError:
    """The one message every divergence check raises (the last good checkpoint is never overwritten)."""
    kept = f"; the last good checkpoint ({out / CHECKPOINT}) is kept" if out is not None else ""
    return DivergenceError(f"training diverged: {what} of {method.name}{kept}{hint}")


def _local_batch(run: _Loop, idx: torch.Tensor, full_batch: bool) -> torch.Tensor:
    """This rank's part of a global batch (the whole batch in one process)."""
    plan = run.plan
    if not plan.split:
        return idx
    if full_batch and run.sampling == "shuffle":
        # the full batch in index order: a sample's shard (and its per-sample state) never moves
        idx = idx.sort().values
    start, stop = shard_bounds(int(idx.shape[0]), plan.comm.rank, plan.comm.world_size)
    run.method.set_global_batch_size(int(idx.shape[0]))
    return idx[start:stop]


def _step(run: _Loop, idx: torch.Tensor, local: torch.Tensor) -> StepStats:
    plan, method = run.plan, run.method
    idx_dev = local.to(method.device)
    xb = plan.x_train[idx_dev]
    yb = xb if run.autoencoder else plan.y_train[idx_dev]
    with run.profiler.step() if run.profiler is not None else nullcontext():
        stats = method.step(xb, yb, idx=idx_dev)
    if plan.comm.world_size > 1:
        # Σ_r loss_r · m_r / m: the global mean whether a rank reports its shard's mean or the replicated
        # global loss, and the same number on every rank, so a divergence stops all of them together.
        share = local.shape[0] / idx.shape[0] if plan.split else 1.0 / plan.comm.world_size
        stats.loss = plan.comm.sum_scalars(stats.loss * share, op="trainer")[0]
    return stats


def _train_epoch(run: _Loop, bar: Any, epoch: int, batches: list[torch.Tensor]) -> tuple[float, dict[str, float]]:
    """Every step of one epoch (``bar``: a tqdm bar or ``None``); returns the mean step loss and the mean of each
    ``StepStats`` diagnostic over the steps that reported it (a method may report some only every k steps)."""
    loss_sum, sums, counts = 0.0, dict[str, float](), dict[str, int]()
    for b, idx in enumerate(batches):
        local = _local_batch(run, idx, len(batches) == 1)
        stats = _step(run, idx, local)
        if not math.isfinite(stats.loss):
            where = f"non-finite loss at epoch {epoch + 1}, batch {b + 1}/{len(batches)}"
            raise _divergence(run.method, where, run.out, "; lower the step size or change the penalty weights")
        run.logs.step(epoch * len(batches) + b + 1, epoch + 1, b + 1, stats.loss, stats.info)
        loss_sum += stats.loss
        for k, v in stats.info.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4g}", refresh=False)
    count = max(len(batches), 1)
    return loss_sum / count, {k: v / counts[k] for k, v in sums.items()}


# -- phase 4: evaluation -----------------------------------------------------------------------------------------------
def _evaluate_epoch(
    method: Method, plan: _Plan, epoch: int, out: Path | None, autoencoder: bool, eval_batch_size: int
) -> dict[str, Any]:
    if not _is_finite_model(method.model):
        raise _divergence(method, f"non-finite weights after epoch {epoch + 1}", out)
    def on(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
        return evaluate(method.model, x, y, method.loss, autoencoder=autoencoder, batch_size=eval_batch_size,
                        comm=plan.comm)

    train_loss, train_acc = on(plan.x_train, plan.y_train)
    test_loss, test_acc = on(plan.x_test, plan.y_test)
    if not math.isfinite(train_loss):
        raise _divergence(method, f"non-finite training loss after epoch {epoch + 1}", out)
    return {"train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_acc, "train_accuracy": train_acc}


# -- phase 5: checkpoint -----------------------------------------------------------------------------------------------
def _checkpoint(method: Method, out: Path, progress: _Progress, info: dict[str, Any], main: bool) -> None:
    # every rank builds the state (a method may gather per-sample shards in it); rank 0 writes it
    method_state = method.state_dict()
    if main:
        save_checkpoint(out / CHECKPOINT, {
            "format": 1,
            "epoch": len(progress.history),
            "method_state": method_state,
            "rng": _rng_state(),
            "history": progress.history,
            "train_seconds": progress.train_seconds,
            "run_info": info,
        })


# -- phase 6: summary --------------------------------------------------------------------------------------------------
def _summary(method: Method, data: data_mod.Dataset, info: dict[str, Any], progress: _Progress) -> dict[str, Any]:
    history = progress.history
    accs = [h["test_accuracy"] for h in history if h["test_accuracy"] is not None]
    last = history[-1] if history else {}
    return {
        **{k: info[k] for k in ("method", "dataset", "model") if k in info},
        "label": info.get("label", method.name),
        "reporting_name": method.reporting_name or method.name,
        **{k: info[k] for k in ("epochs", "batch_size", "seed", "preset", "hparams", "loss", "split", "sampling")},
        "test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": max(accs) if accs else None,
        "train_loss": last.get("train_loss"),
        "test_loss": last.get("test_loss"),
        "train_seconds": progress.train_seconds,
        "seconds_per_epoch": progress.train_seconds / len(history) if history else None,
        "peak_rss_mb": _peak_rss_mb(),
        "history": [
            {k: h[k] for k in ("epoch", "train_loss", "test_loss", "test_accuracy", "seconds")} for h in history
        ],
        **{k: info[k] for k in ("activation", "hparams_set", "dtype", "device") if k in info},
    }


def _communication(comm: Communicator, before: tuple[dict[str, int], dict[str, int]], steps: int) -> dict[str, Any]:
    bytes_before, calls_before = before
    sent = {op: n - bytes_before.get(op, 0) for op, n in comm.bytes_sent.items()}
    return {
        "steps": steps,
        "bytes_sent": sent,
        "calls": {op: n - calls_before.get(op, 0) for op, n in comm.calls.items()},
        "bytes_per_step": {op: n / steps for op, n in sent.items()} if steps else {},
        "note": "payload bytes this rank passed to each kind of call ('trainer': step-loss and evaluation "
        "reductions, 'checkpoint': state gathered for the checkpoint); a ring all-reduce puts "
        "2(R-1)/R times the payload on the wire per process",
    }


# -- the loop ----------------------------------------------------------------------------------------------------------
def _run_info(
    method: Method, data: data_mod.Dataset, run_info: dict[str, Any] | None, **settings: Any
) -> dict[str, Any]:
    info = dict(run_info or {})
    info.setdefault("method", method.name)
    info.setdefault("dataset", data.name)
    info.update(settings, loss=method.loss, preset=method.preset, hparams=method.hparams, split=data.split)
    return info


def _open_bar(method: Method, epoch: int, epochs: int, steps: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"{method.name} epoch {epoch + 1}/{epochs}", leave=False)


def _print_epoch(method: Method, record: dict[str, Any], epochs: int) -> None:
    acc = "" if record["test_accuracy"] is None else f" test_acc {record['test_accuracy']:.4f}"
    print(
        f"{method.name} epoch {record['epoch']}/{epochs}: train_loss {record['train_loss']:.4f} "
        f"test_loss {record['test_loss']:.4f}{acc} ({record['seconds']:.1f}s)",
        file=sys.stderr,
    )


@dataclass
class _Loop:
    """Everything an epoch of :func:`fit` reads or extends."""

    method: Method
    plan: _Plan
    out: Path | None
    logs: LoggerSet
    profiler: BlockProfiler | None
    state: _Progress
    info: dict[str, Any]
    show: bool
    seed: int
    sampling: str
    autoencoder: bool
    eval_batch_size: int


def _one_epoch(loop: _Loop, epoch: int, epochs: int) -> dict[str, Any]:
    """The steps of one epoch, then its evaluation; returns the epoch's record (logged and appended)."""
    method, plan = loop.method, loop.plan
    batches = data_mod.batch_indices(plan.n_train, plan.batch, seed=loop.seed, epoch=epoch, sampling=loop.sampling)
    bar = _open_bar(method, epoch, epochs, len(batches), loop.show)
    t0 = time.perf_counter()
    try:
        step_loss, diagnostics = _train_epoch(loop, bar, epoch, batches)
    finally:
        if bar is not None:
            bar.close()
    if method.device.type == "cuda":
        torch.cuda.synchronize()
    method.synchronize_model()
    loop.state.train_seconds += time.perf_counter() - t0
    metrics = _evaluate_epoch(method, plan, epoch, loop.out, loop.autoencoder, loop.eval_batch_size)
    record = {"epoch": epoch + 1, **metrics, "seconds": loop.state.train_seconds, "step_loss": step_loss,
              "info": diagnostics}
    loop.state.history.append(record)
    loop.logs.epoch(record)
    if loop.out is not None and plan.comm.is_main:
        with open(loop.out / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    return record


def fit(
    method: Method,
    data: data_mod.Dataset,
    *,
    epochs: int,
    batch_size: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    sampling: str = "shuffle",
    autoencoder: bool = False,
    progress: bool | None = None,
    run_info: dict[str, Any] | None = None,
    eval_batch_size: int = 4096,
    checkpoint_every: int = 1,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    comm: Communicator | None = None,
    profile: bool = False,
    loggers: Sequence[Logger | str] | None = None,
    log_dir: str | Path | None = None,
    log_every: int | None = None,
    deterministic: bool = False,
) -> dict[str, Any]:
    """Train ``method`` (and so its model, in place) on ``data`` for ``epochs`` epochs; return the summary.

    ``batch_size`` ``None`` takes the method's default; ``0`` (or anything >= the training-set size) is full
    batch, one step per epoch. ``sampling`` is ``"shuffle"`` (a seeded permutation per epoch) or
    ``"replacement"`` (batches drawn uniformly with replacement). With ``out_dir`` the run writes
    ``metrics.jsonl``, ``checkpoint.pt`` (after every epoch) and ``summary.json``; ``resume=True`` continues
    from the checkpoint there. ``checkpoint_every=k`` writes the checkpoint every k epochs (and after the last);
    methods with large per-sample state (full-batch TIAM) use it to keep the disk traffic down.

    Data parallelism (docs/methods/distributed.md): with a ``comm`` of R > 1 processes (``comm_from_env`` under
    ``torchrun``) every rank draws the same global batches from the shared seed and passes its contiguous slice
    of each to ``method.step`` (a full batch is sorted first, so each rank keeps the same samples every epoch);
    the method reduces what its update needs over ``comm``. The step losses and the evaluation are reduced over
    the ranks; only rank 0 writes files; ``resume`` loads rank 0's checkpoint on every rank.

    ``profile=True`` attaches a :class:`~liftkit.profiling.BlockProfiler` to the method for the steps of this
    call (a resumed run profiles the steps after the checkpoint), measures the matmul peaks after training and
    adds the report to the summary under ``"profile"`` (and to ``profile.json`` in ``out_dir``).

    ``loggers``: :class:`~liftkit.loggers.Logger` objects or the names ``"csv"`` / ``"tensorboard"`` (written
    into ``log_dir``, default ``out_dir``); they get every epoch's losses, accuracies, seconds and averaged
    ``StepStats`` diagnostics, and with ``log_every=N`` every N-th step's (see :mod:`liftkit.loggers`).
    ``deterministic=True`` switches the process to deterministic algorithms and seeds the global generators
    with ``seed`` (see :mod:`liftkit.determinism`).

    The phases: argument checks and the batch plan, resume, then per epoch the steps, the evaluation and the
    checkpoint, and at the end the summary (written once, as ``summary.json``).
    """
    if deterministic:
        check_deterministic_method(method)
        enable_determinism(seed)
    batch_size = method.default_batch_size if batch_size is None else batch_size
    _check_arguments(epochs, checkpoint_every, sampling, batch_size)
    plan = _plan(method, data, batch_size, sampling, autoencoder, comm if comm is not None else LocalComm())
    main = plan.comm.is_main
    logs = LoggerSet(loggers if main else None, log_dir=log_dir if log_dir is not None else out_dir,
                     log_every=log_every)
    info = _run_info(method, data, run_info, epochs=epochs, batch_size=plan.batch, seed=seed, sampling=sampling)
    out = Path(out_dir) if out_dir is not None else None
    state = _Progress()
    if out is not None:
        if main:
            out.mkdir(parents=True, exist_ok=True)
        if resume:
            state = _resume(method, out, info, epochs, plan.comm)
        if main:
            # rewritten from the checkpoint's history: epochs a killed run logged after it do not appear twice
            atomic_write_text(out / METRICS, "".join(json.dumps(h) + "\n" for h in state.history))
    # every epoch has ceil(n / m) steps under both samplings: the global step of a resumed run continues
    logs.start(start_epoch=state.start_epoch, steps_per_epoch=math.ceil(plan.n_train / plan.batch),
               seconds=state.train_seconds, run_info=info)
    show = (sys.stderr.isatty() if progress is None else progress) and main
    profiler = BlockProfiler(synchronize=method.device.type == "cuda") if profile else None
    if profiler is not None:
        method.set_block_hook(profiler)
    before = (dict(plan.comm.bytes_sent), dict(plan.comm.calls))
    loop = _Loop(method, plan, out, logs, profiler, state, info, show, seed, sampling, autoencoder, eval_batch_size)
    try:
        for epoch in range(state.start_epoch, epochs):
            record = _one_epoch(loop, epoch, epochs)
            if out is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
                _checkpoint(method, out, state, info, main)
            if on_epoch is not None:
                on_epoch(record)
            if show:
                _print_epoch(method, record, epochs)
    finally:
        if profiler is not None:
            method.set_block_hook(None)
        logs.close()
    summary = _summary(method, data, info, state)
    if plan.comm.world_size > 1:
        summary["processes"] = plan.comm.world_size
        steps = (epochs - state.start_epoch) * math.ceil(plan.n_train / plan.batch)
        summary["communication"] = _communication(plan.comm, before, steps)
    if profiler is not None:
        report = profiler.report(peaks=measure_matmul_peaks(method.device))
        summary["profile"] = {"method": method.name, "label": info.get("label", method.name), **report}
        if out is not None and main:
            atomic_write_json(out / PROFILE, summary["profile"])
    if out is not None and main:
        atomic_write_json(out / SUMMARY, summary)
    return summary


@dataclass(kw_only=True)
class RunSettings:
    """The settings a training run and a benchmark share: the common options of ``liftkit train`` and
    ``liftkit bench`` (a bench passes them to each of its runs)."""

    dataset: str
    model: str
    activation: str = "relu"
    epochs: int = 5
    batch_size: int | None = None
    loss: str | None = None
    preset: str | None = None
    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    split: str = "test"
    sampling: str = "shuffle"
    mean_subtract: bool = False
    threads: int | None = None
    checkpoint_every: int = 1
    profile: bool = False
    log: list[str] = field(default_factory=list)  # logger names: csv, tensorboard
    log_dir: str | None = None  # default: the run's out directory
    log_every: int | None = None
    deterministic: bool = False


@dataclass(kw_only=True)
class RunSpec(RunSettings):
    """Plain settings of one training run (the options of ``liftkit train``)."""

    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    resume: bool = False
    progress: bool | None = None
    label: str | None = None
    dist_timeout: float = DEFAULT_TIMEOUT_S


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LiftkitError("--device cuda was requested but no CUDA device is available; use --device cpu")
        return torch.device(name)
    raise LiftkitError(f"unknown device {name!r}; use cpu or cuda")


def run(spec: RunSpec) -> dict[str, Any]:
    """Build data, model and method from ``spec``, then :func:`fit`. Returns the summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) this process joins the process group, trains
    data-parallel (see :func:`fit`) and leaves the group at the end.
    """
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    if spec.dtype not in DTYPES:
        raise LiftkitError(f"unknown dtype {spec.dtype!r}; use float32 or float64")
    if spec.split not in ("test", "validation"):
        raise LiftkitError(f"unknown split {spec.split!r}; use test or validation")
    if spec.deterministic:
        enable_determinism(spec.seed)  # before any CUDA work: cuBLAS reads its workspace setting once
    device = resolve_device(spec.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    comm = comm_from_env(timeout_s=spec.dist_timeout, device=device)
    try:
        return _run(spec, device, comm)
    finally:
        comm.close()


def _run(spec: RunSpec, device: torch.device, comm: Communicator) -> dict[str, Any]:
    method_cls = get(spec.method)
    model_spec = parse_model_spec(spec.model)
    data = data_mod.load_dataset(
        spec.dataset, spec.data_dir, split=spec.split, mean_subtract=spec.mean_subtract, dtype=DTYPES[spec.dtype]
    )
    model = build_model(
        model_spec,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        activation=spec.activation,
        output_activation=method_cls.model_output_activation,
        seed=spec.seed,
        dtype=DTYPES[spec.dtype],
        device=device,
    )
    loss = spec.loss
    if model_spec.is_autoencoder:
        if loss not in (None, "mse"):
            raise LiftkitError("autoencoders train on reconstruction error: use --loss mse (or omit --loss)")
        loss = "mse"
    method = method_cls(model, loss=loss, preset=spec.preset, **spec.hparams)
    # The same seed also fixes the global RNG that methods or modules may draw from during training.
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    np.random.seed(spec.seed)
    run_info = {
        "method": spec.method,
        "label": spec.label or spec.method,
        "dataset": spec.dataset,
        "model": str(model_spec),
        "activation": spec.activation,
        "hparams_set": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.hparams.items()},
        "device": str(device),
        "dtype": spec.dtype,
        "model_spec": dataclasses.asdict(model_spec),
    }
    return fit(
        method,
        data,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        seed=spec.seed,
        out_dir=spec.out,
        resume=spec.resume,
        sampling=spec.sampling,
        autoencoder=model_spec.is_autoencoder,
        progress=spec.progress,
        run_info=run_info,
        checkpoint_every=spec.checkpoint_every,
        comm=comm,
        profile=spec.profile,
        loggers=spec.log,
        log_dir=spec.log_dir,
        log_every=spec.log_every,
        deterministic=spec.deterministic,
    )
