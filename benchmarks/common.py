"""What the measurement scripts in ``benchmarks/`` share: one option parser, data and method set-up through the
library, the interleaved timing loop and JSON output.

The scripts here measure what ``liftkit bench`` cannot express (several methods stepping in turn inside one
process, byte counts of several processes, figures). Everything a single run can show (accuracy, time per
epoch, the per-block profile with ``--profile``) belongs to ``liftkit bench`` and the files in ``configs/``.

Run a script from the repository root, e.g. ``PYTHONPATH=src python benchmarks/proxprop_timing.py --help``;
the data come from ``--data-dir`` or ``$LIFTKIT_DATA_DIR`` (else the library's cache directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from liftkit.data import Dataset, batch_indices, load_dataset
from liftkit.methods import Method, get
from liftkit.models import build_model

#: (x, y) or (x, y, idx): with idx the step gets the sample indices, as the trainer passes them (methods that keep
#: per-sample state, such as TIAM's auxiliaries on a full batch, need them)
Batch = tuple[Tensor, ...]
#: the library's sources in this checkout, put first on the path of the processes a script launches
SRC = Path(__file__).resolve().parents[1] / "src"


def base_parser(
    description: str | None,
    *,
    dataset: str = "mnist",
    model: str = "784-500-10",
    batch_size: int = 100,
    threads: int = 1,
    split: str = "test",
) -> argparse.ArgumentParser:
    """The options every script takes: dataset, model, batch size, threads, data directory, seed, split."""
    first_line = (description or "").strip().splitlines()[0] if description else None
    parser = argparse.ArgumentParser(description=first_line)
    parser.add_argument("--dataset", default=dataset,
                        help=f"digits, mnist, fashion-mnist or cifar10 (default {dataset})")
    parser.add_argument("--model", default=model, help=f"model spec (default {model})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"mini-batch size (default {batch_size})")
    parser.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads})")
    parser.add_argument("--data-dir", default=None, help="dataset directory (default: $LIFTKIT_DATA_DIR, else a cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initial weights and batch order (default 0)")
    parser.add_argument("--split", choices=("test", "validation"), default=split,
                        help=f"evaluate on the test set or on the training set's validation part (default {split})")
    return parser


def load_data(args: argparse.Namespace, **kwargs: Any) -> Dataset:
    """Set the thread count and load ``args.dataset`` (split and directory from the common options)."""
    torch.set_num_threads(args.threads)
    return load_dataset(args.dataset, args.data_dir, split=args.split, **kwargs)


def build_method(name: str, hparams: Mapping[str, Any], data: Dataset, args: argparse.Namespace,
                 **model_kwargs: Any) -> Method:
    """Method ``name`` on a fresh ``args.model`` with the output activation the method asks for, seeded as
    ``liftkit train`` seeds it, so every method of one script starts from the same weights."""
    cls = get(name)
    model_kwargs.setdefault("output_activation", cls.model_output_activation)
    model = build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=args.seed,
                        **model_kwargs)
    return cls(model, **dict(hparams))


def training_batches(data: Dataset, batch_size: int, count: int, *, seed: int = 0,
                     with_idx: bool = False) -> list[Batch]:
    """The first ``count`` batches of the trainer's batch order (epochs concatenated), as tensors; with
    ``with_idx`` each batch carries its sample indices too (see :data:`Batch`)."""
    out: list[Batch] = []
    epoch = 0
    while len(out) < count:
        for idx in batch_indices(len(data.y_train), batch_size, seed=seed, epoch=epoch):
            batch = (data.x_train[idx], data.y_train[idx])
            out.append((*batch, idx) if with_idx else batch)
            if len(out) == count:
                break
        epoch += 1
    return out


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``LABEL.KEY=VALUE`` options into {label: {key: value}} (values stay strings; the methods parse them)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        label, sep, kv = item.partition(".")
        key, eq, value = kv.partition("=")
        if not (sep and eq and label and key):
            raise SystemExit(f"--set expects LABEL.KEY=VALUE, got {item!r}")
        out.setdefault(label, {})[key] = value
    return out


def interleaved_timing(methods: Mapping[str, Method], batches: Sequence[Batch], *, blocks: int,
                       steps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per step of every method, measured in turns on a loaded machine.

    Each of ``warmup + blocks`` rounds gives every method the same ``steps`` batches in turn (cycling through
    ``batches``), so a change in the machine's load hits all of them alike; the first ``warmup`` rounds warm up
    allocators and caches and are dropped. Returns, per method, the mean seconds per step of every kept round
    (take the median of these).
    """
    times: dict[str, list[float]] = {label: [] for label in methods}
    cursor = 0
    for block in range(warmup + blocks):
        chunk = [batches[(cursor + i) % len(batches)] for i in range(steps)]
        cursor += steps
        for label, method in methods.items():
            start = time.perf_counter()
            for x, y, *idx in chunk:
                method.step(x, y, idx=idx[0] if idx else None)
            if block >= warmup:
                times[label].append((time.perf_counter() - start) / steps)
    return times


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {label: statistics.median(values) for label, values in times.items()}


class InclusiveBlockTimer:
    """A block hook (``method.set_block_hook(timer)``) that records the inclusive time and calls of every
    named block, keyed both by its name and by its parent and name (``"w_block[1]/gram"``).

    Unlike :class:`liftkit.profiling.BlockProfiler` (exclusive time, FLOPs), this keeps a nested block's time
    inside its parent, which is what a cost model that adds up whole block solves needs.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._path: list[str] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        key = f"{self._path[-1]}/{name}" if self._path else name
        self._path.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._path.pop()
            for k in {name, key}:
                self.seconds[k] += elapsed
                self.calls[k] += 1

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def emit_json(result: Any, out: str | Path | None = None) -> None:
    """Print ``result`` as JSON and, with ``out``, write it there too."""
    text = json.dumps(result, indent=1)
    print(text)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a launched process: this one's, with this checkout's ``src`` first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def free_port() -> int:
    """A free TCP port on the loopback interface, for ``torchrun --master_port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
