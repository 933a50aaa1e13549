"""One switch for bit-for-bit repeatable runs: ``liftkit train --deterministic`` / ``fit(..., deterministic=True)``.

What it does, for the rest of the process:

* ``torch.use_deterministic_algorithms(True)``: every operation takes its deterministic implementation, and an
  operation that has none raises ``RuntimeError`` instead of silently varying (on CPU almost every operation
  liftkit uses is deterministic already; on CUDA, e.g., ``index_add_``/``scatter_add_`` switch to slower
  kernels);
* ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False``: no run-time autotuning of
  convolution algorithms (cuDNN picks a fixed, often slower, algorithm);
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when CUDA is present and the variable is unset: cuBLAS (CUDA >= 10.2)
  is deterministic only with a fixed workspace; it costs about 24 MiB of GPU memory per stream. cuBLAS reads the
  variable when it creates its handle, so set it in the environment before the process first uses CUDA when
  CUDA work runs before ``fit`` (``liftkit train`` sets it before touching the device);
* the global ``torch``, ``random`` and ``numpy`` generators are seeded with the run's seed (a resumed run then
  restores the checkpoint's generator states, as always). liftkit's batch order and every method's own random
  draws already use seeded generators.

Runs on the same machine, software versions, device and process count are then identical bit for bit. It
does not make CPU and GPU (or different thread counts' reductions across library versions) agree with each
other. ``lpom-async`` with real threads (``mode=threads``, ``workers > 1``) is asynchronous by design and is
refused; its ``mode=simulate`` replays a seeded schedule and is deterministic.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from liftkit.errors import LiftkitError

__all__ = ["CUBLAS_WORKSPACE", "check_deterministic_method", "enable_determinism"]

CUBLAS_WORKSPACE = ":4096:8"


def enable_determinism(seed: int | None = None) -> None:
    """Switch this process to deterministic algorithms and seed the global generators with ``seed``."""
    if torch.cuda.is_available() and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if seed is not None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)


def check_deterministic_method(method: Any) -> None:
    """Refuse settings that cannot repeat bit for bit, whatever torch does (one-line ``LiftkitError``)."""
    hparams = getattr(method, "hparams", {}) or {}
    if hparams.get("mode") == "threads" and int(hparams.get("workers", 1)) > 1:
        raise LiftkitError(
            f"{method.name} with mode=threads and workers={hparams['workers']} updates blocks asynchronously, so "
            "its runs cannot repeat bit for bit; use --set mode=simulate (a seeded schedule) or workers=1"
        )
