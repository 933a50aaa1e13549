"""The block profiler: exclusive times that add up to the step, exact product FLOPs per block, nesting, zero
cost when off, ``train --profile`` and the bench's profile tables."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
from torch import nn

import liftkit.methods
import liftkit.train
from liftkit import profiling
from liftkit.bench import render_table
from liftkit.cli import main
from liftkit.data import load_dataset
from liftkit.methods import Method, StepStats
from liftkit.methods.base import _NO_BLOCK
from liftkit.profiling import OTHER, BlockProfiler, profile, render_profile

M, K, N = 7, 5, 3  # the product of the toy blocks: (M×K)@(K×N), 2·M·K·N FLOPs


class Toy(Method):
    """A method whose blocks do known work: ``outer`` holds one (M×K)@(K×N) product and a nested ``inner``
    with a (N×K)@(K×M) one; one more product runs outside every block. Optional sleeps make the times
    predictable."""

    name = "toy"

    def __init__(self, model: nn.Module, sleeps: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__(model)
        self.sleeps = sleeps
        self.hooks_seen: list[Any] = []
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(M, K, generator=g)
        self.b = torch.randn(K, N, generator=g)

    def step(self, x: torch.Tensor, y: torch.Tensor, *, idx: torch.Tensor | None = None) -> StepStats:
        self.hooks_seen.append(self._block_hook)
        outside, outer, inner = self.sleeps
        with self.block("outer"):
            _ = self.a @ self.b
            time.sleep(outer)
            with self.block("inner"):
                _ = self.b.T @ self.a.T
                time.sleep(inner)
        _ = torch.nn.functional.linear(self.a, self.b.T, torch.zeros(N))  # addmm, outside every block
        time.sleep(outside)
        self.steps_taken += 1
        return StepStats(loss=1.0)


def toy(**kw: Any) -> Toy:
    return Toy(nn.Sequential(nn.Linear(2, 2)), **kw)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in report["blocks"]}


def test_flops_of_known_products_are_exact_and_go_to_the_innermost_block():
    method = toy()
    with profile(method, BlockProfiler(flop_every=1)) as prof:
        for _ in range(3):
            method.step(torch.zeros(1), torch.zeros(1))
    rows = by_name(prof.report())
    assert rows["outer"]["flops_per_step"] == 2 * M * K * N  # the nested product is not the outer block's
    assert rows["inner"]["flops_per_step"] == 2 * N * K * M
    assert rows[OTHER]["flops_per_step"] == 2 * M * K * N  # linear with a bias is one addmm
    assert rows["outer"]["calls_per_step"] == rows["inner"]["calls_per_step"] == 1.0
    assert prof.report()["flops_per_step"] == 3 * 2 * M * K * N


def test_autograd_products_inside_a_block_are_counted_there():
    w = torch.randn(K, N, requires_grad=True)
    x = torch.randn(M, K)
    method = toy()
    prof = BlockProfiler(flop_every=1)
    method.set_block_hook(prof)
    with prof.step(), method.block("forward_backward"):
        (x @ w).sum().backward()
    # forward x@w and the weight gradient xᵀ·g; x needs no gradient
    assert by_name(prof.report())["forward_backward"]["flops_per_step"] == 2 * (2 * M * K * N)


def test_shares_sum_to_the_measured_step_time_and_nesting_is_exclusive():
    method = toy(sleeps=(0.004, 0.008, 0.016))
    steps = 5
    with profile(method, BlockProfiler(flop_every=0)) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            method.step(torch.zeros(1), torch.zeros(1))
        measured = (time.perf_counter() - t0) / steps
    report = prof.report()
    rows = by_name(report)
    total = sum(b["seconds_per_step"] for b in report["blocks"])
    assert total == pytest.approx(report["seconds_per_step"], rel=1e-9)
    assert sum(b["share"] for b in report["blocks"]) == pytest.approx(1.0, rel=1e-9)
    assert total == pytest.approx(measured, rel=0.03)
    # exclusive times: the outer block's own sleep is half the nested one's, not 1.5 times it
    ratio = rows["outer"]["seconds_per_step"] / rows["inner"]["seconds_per_step"]
    assert 0.35 < ratio < 0.75, rows
    assert rows["outer"]["flops_per_step"] is None  # no FLOP-counted steps


def test_timing_comes_from_steps_without_flop_counting():
    method = toy()
    with profile(method, BlockProfiler(flop_every=4)) as prof:
        for _ in range(8):
            method.step(torch.zeros(1), torch.zeros(1))
    report = prof.report()
    assert (report["steps"], report["flop_counted_steps"], report["timed_steps"]) == (8, 2, 6)
    assert not report["timing_includes_flop_counting"]
    assert by_name(report)["outer"]["flops_per_step"] == 2 * M * K * N


def test_profile_context_restores_the_method_and_blocks_outside_steps_are_ignored():
    method = toy()
    with profile(method) as prof:
        assert method._block_hook is prof
        with method.block("stray"):  # not inside a step: not recorded
            pass
        method.step(torch.zeros(1), torch.zeros(1))
    assert method._block_hook is None and "step" not in vars(method)
    assert method.block("outer") is _NO_BLOCK
    assert "stray" not in by_name(prof.report())
    with pytest.raises(ValueError, match="flop_every"):
        BlockProfiler(flop_every=-1)


def test_no_hook_is_registered_when_profiling_is_off():
    data = load_dataset("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    method = toy()
    method.model = model
    liftkit.fit(method, data, epochs=1, batch_size=600)
    assert method.hooks_seen and all(h is None for h in method.hooks_seen)
    summary = liftkit.fit(method, data, epochs=1, batch_size=600, profile=True)
    assert all(isinstance(h, BlockProfiler) for h in method.hooks_seen[-3:])
    assert method._block_hook is None  # detached after the run
    assert {"outer", "inner", OTHER} <= set(by_name(summary["profile"]))


def test_matmul_peaks_are_positive_rates():
    peaks = profiling.measure_matmul_peaks(n=64, min_seconds=0.0)
    assert peaks["float32"] > 0 and peaks["float64"] > 0 and peaks["size"] == 64


def _fast_peaks(device: torch.device | str = "cpu") -> dict[str, Any]:
    return profiling.measure_matmul_peaks(device, n=64, min_seconds=0.0)


def test_train_profile_writes_a_valid_profile_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(liftkit.train, "measure_matmul_peaks", _fast_peaks)
    code = main([
        "train", "--method", "adam", "--dataset", "digits", "--model", "64-32-10", "--epochs", "1",
        "--out", str(tmp_path), "--quiet", "--profile",
    ])
    out, _ = capsys.readouterr()
    assert code == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    rows = by_name(report)
    assert {"forward_backward", "optimizer_step", OTHER} <= set(rows)
    assert sum(b["share"] for b in report["blocks"]) == pytest.approx(1.0, rel=1e-6)
    assert rows["forward_backward"]["calls_per_step"] == 1.0
    # one hidden layer of 32 and a 10-way output on 64 inputs, batch 100: forward, weight and input gradients
    # (the first layer's input gradient is not needed)
    batch = 100
    expected = 2 * batch * (64 * 32 * 2 + 32 * 10 * 3)
    assert rows["forward_backward"]["flops_per_step"] == expected
    assert report["peaks"]["float32"] > 0
    assert report["method"] == "adam" and report["label"] == "adam"
    assert "| forward_backward |" in out and "GFLOP/s" in out


def test_without_profile_no_profile_json(tmp_path, capsys):
    code = main([
        "train", "--method", "adam", "--dataset", "digits", "--model", "64-10", "--epochs", "1",
        "--out", str(tmp_path), "--quiet",
    ])
    capsys.readouterr()
    assert code == 0 and not (tmp_path / "profile.json").exists()
    assert "profile" not in json.loads((tmp_path / "summary.json").read_text())


def test_bench_table_renders_a_profile_per_run():
    method = toy()
    with profile(method, BlockProfiler(flop_every=2)) as prof:
        for _ in range(4):
            method.step(torch.zeros(1), torch.zeros(1))
    peaks = {"float32": 100.0, "float64": 50.0, "size": 1024, "threads": 1, "device": "cpu"}
    run = {"label": "toy", "method": "toy", "test_accuracy": 0.9, "best_test_accuracy": 0.9, "train_loss": 0.1,
           "seconds_per_epoch": 1.0, "peak_rss_mb": 100.0, "profile": prof.report(peaks)}
    results = {"machine": {"cpu": "x", "cores": 2, "torch": "2", "device": "cpu"},
               "runs": [run, {**run, "label": "plain", "profile": None}]}
    table = render_table(results)
    assert "#### Profile: toy" in table and "Profile: plain" not in table
    assert "float32 100.0 GFLOP/s, float64 50.0 GFLOP/s" in table
    assert "| block | share of step % | ms/step | calls/step | MFLOP/step | GFLOP/s |" in table
    assert "| outer | " in table and "| **step** | 100.0 |" in table
    assert render_profile(prof.report()).count("\n") >= 6


def test_bench_profile_runs_each_train_with_profile_and_tables_it(tmp_path, capsys):
    code = main([
        "bench", "--methods", "sgd", "--dataset", "digits", "--model", "64-10", "--epochs", "1",
        "--out", str(tmp_path), "--profile", "--threads", "1",
    ])
    capsys.readouterr()
    assert code == 0
    assert (tmp_path / "runs" / "sgd" / "profile.json").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert by_name(results["runs"][0]["profile"])["optimizer_step"]["calls_per_step"] == 1.0
    table = (tmp_path / "results.md").read_text()
    assert "#### Profile: sgd" in table and "| forward_backward |" in table and "float64" in table


def test_a_profiled_adam_step_on_each_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).to(device)
    method = liftkit.methods.get("adam")(model)
    x, y = torch.randn(32, 16, device=device), torch.randint(0, 4, (32,), device=device)
    with profile(method, BlockProfiler(flop_every=2, synchronize=device.type == "cuda")) as prof:
        for _ in range(4):
            method.step(x, y)
    report = prof.report()
    rows = by_name(report)
    # forward and weight gradient of both layers, the input gradient of the second only
    assert rows["forward_backward"]["flops_per_step"] == 2 * 32 * (16 * 8 * 2 + 8 * 4 * 3)
    assert sum(b["share"] for b in report["blocks"]) == pytest.approx(1.0, rel=1e-9)
    assert rows["optimizer_step"]["calls_per_step"] == 1.0


def test_blocks_on_worker_threads_stay_with_the_waiting_block():
    from concurrent.futures import ThreadPoolExecutor

    method = toy()
    prof = BlockProfiler(flop_every=0)
    method.set_block_hook(prof)

    def work(_: int) -> None:
        with method.block("worker"):
            time.sleep(0.002)

    with prof.step(), method.block("pool"), ThreadPoolExecutor(2) as pool:
        list(pool.map(work, range(4)))
    rows = by_name(prof.report())
    assert "worker" not in rows and rows["pool"]["share"] > 0.9
