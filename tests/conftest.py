"""Shared fixtures: a tiny classification problem, the shared data directory and the devices to test on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_dir() -> Path | None:
    env = os.environ.get("LIFTKIT_DATA_DIR")
    if env:
        return Path(env)
    return SHARED_DATA if SHARED_DATA.exists() else None


#: where a test with a ``device`` argument runs: always the CPU, and CUDA when a device is present (skipped
#: otherwise). The CUDA cases carry the ``cuda`` mark, so ``pytest -m cuda`` (``make gpu-check``) selects them.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None or not (d / "mnist").exists():
        pytest.skip("MNIST files not available (set LIFTKIT_DATA_DIR)")
    return d


def tiny_classification(n: int = 96, dim: int = 8, classes: int = 3, seed: int = 0, dtype=torch.float64):
    """Well separated Gaussian blobs: every method should fit them quickly."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, dim, generator=g, dtype=dtype)
    y = torch.arange(n) % classes
    x = centers[y] + 0.5 * torch.randn(n, dim, generator=g, dtype=dtype)
    return x, y
