"""Cost model of LPOM on several machines: time per epoch against the number of machines R, data-parallel
(docs/methods/distributed.md) and layer-parallel sync-LPOM (docs/methods/lpom.md §6.2), for MNIST 784-2048-2048-2048-10
at batch 100.

Two parts:

* ``--measure OUT.json``: measures the constants on this machine with 1 torch thread: per step of ``lpom-sync``
  (``workers=1``, the sequential execution of its odd–even schedule) the time of every X-block solve, of every
  W-step (its Gram + Cholesky set-up, the ``gram`` block, and the APG iterations apart) and of the forward
  initialisation, plus the rounds and inner iterations actually run, all read through the method's block hook
  (``Method.set_block_hook``). Run it under the benchmark lock.
* default: reads the constants (``--constants``, default ``docs/results/distributed_cost_constants.json``) and
  prints the table for the stated network (``--bandwidth-gbit``, ``--latency-us``).

Model (every assumption is printed with the table):

* 600 steps per epoch (60 000 images, batch 100).
* Data-parallel, R machines, each with 100/R samples: the per-sample work (forward, X-blocks, the W-steps'
  per-iteration products) shrinks as 1/R (an upper bound on the gain: small shards run matmuls less
  efficiently); the batch-side W-step set-up does not: every machine forms the same m×m Gram and factor and,
  in addition, its rows of P = (X̄X̄ᵀ + εI)⁻¹X̄, which costs about as much as the Gram again (so 2 × measured).
  Messages per step: one all-gather of X̄ per layer (m × (n_j+1) float32), one all-reduce of
  n_{j+1} × (n_j+1) float32 per APG iteration and layer, and one latency-bound scalar all-reduce per X-solver
  iteration, per round and 3 more (energies, loss). Ring all-reduce of B bytes: 2(R−1)(α + B/(R·bw));
  all-gather: (R−1)(α + B/(R·bw)).
* Layer-parallel, R ≤ L machines, contiguous layer groups as in ``liftkit.methods.lpom_layers``: per round
  each phase lasts as long as the slowest machine's blocks of that phase, plus one boundary message
  (m × n_b float32, α + B/bw) where a boundary block was updated, plus one scalar all-reduce per round; the
  W-phase lasts as long as the slowest machine's W-steps (a boundary layer is computed on both sides); the
  forward initialisation is a pipeline (the sum of the layers plus R−1 messages). The weights are broadcast
  once per epoch (40 MB, added per epoch).
* The step time outside the timed solves (pre-activation refreshes, energies, power iterations; measured as
  the end-to-end step minus the timed parts) shrinks as 1/R data-parallel and not at all layer-parallel (a
  conservative choice for the latter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from liftkit.distributed import shard_bounds

DEFAULT_CONSTANTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "distributed_cost_constants.json"
STEPS_PER_EPOCH = 600
BATCH = 100
WIDTHS = [784, 2048, 2048, 2048, 10]


def measure(out: Path, steps: int, data_dir: str | None) -> None:
    """Time the blocks of ``steps`` lpom-sync steps (after one warm-up step) through the method's block hook:
    ``x_block[k]`` (X solves), ``w_block[j]`` (W-steps) with their ``gram`` set-up, and ``forward``."""
    from common import InclusiveBlockTimer  # here, so that the table part imports without benchmarks/ on the path
    from liftkit.data import load_dataset
    from liftkit.methods.lpom_parallel import LPOMSync
    from liftkit.models import build_model

    torch.set_num_threads(1)
    data = load_dataset("mnist", data_dir, dtype=torch.float32)
    model = build_model("784-2048-2048-2048-10", input_shape=data.input_shape, num_classes=10, seed=0,
                        output_activation=LPOMSync.model_output_activation)
    method = LPOMSync(model, workers=1)  # one worker runs the blocks inline, in the order of the schedule
    timer = InclusiveBlockTimer()
    method.set_block_hook(timer)
    infos = []
    step_times = []
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(data.x_train.shape[0], generator=gen)
    for s in range(steps + 1):
        idx = perm[s * BATCH:(s + 1) * BATCH]
        if s == 1:
            timer.clear()  # the first step warms up allocations and the cold power iterations
        t0 = time.perf_counter()
        stats = method.step(data.x_train[idx], data.y_train[idx])
        if s >= 1:
            step_times.append(time.perf_counter() - t0)
            infos.append(stats.info)
    method.set_block_hook(None)
    times = _rename(timer.seconds)
    counts = {k: float(v) for k, v in _rename(timer.calls).items()}
    L = method.lifted.L
    per_step = {k: v / steps for k, v in times.items()}
    calls = {k: v / steps for k, v in counts.items()}
    w_setup = [per_step.get(f"w_setup{j}", 0.0) for j in range(L)]
    constants = {
        "machine": f"{os.cpu_count()}-core {platform.machine()}, torch {torch.__version__}, 1 thread",
        "date": time.strftime("%Y-%m-%d"),
        "model": "784-2048-2048-2048-10",
        "batch": BATCH,
        "steps_measured": steps,
        "step_seconds_median": sorted(step_times)[len(step_times) // 2],
        "step_seconds_mean": sum(step_times) / steps,
        "forward_seconds": per_step.get("forward", 0.0),
        "x_seconds_per_round": {k: per_step.get(f"x{k}", 0.0) / max(calls.get(f"x{k}", 1.0), 1e-9)
                                for k in range(1, L + 1)},
        "x_solves_per_step": {k: calls.get(f"x{k}", 0.0) for k in range(1, L + 1)},
        "w_seconds": [per_step.get(f"w{j}", 0.0) for j in range(L)],
        "w_setup_seconds": w_setup,
        "rounds_per_step": sum(i.get("sweeps", 0.0) for i in infos) / steps,
        "x_iters_per_step": sum(i.get("x_iters_total", 0.0) for i in infos) / steps,
        "w_iters": method.config.w_iters,
    }
    out.write_text(json.dumps(constants, indent=2) + "\n")
    print(json.dumps(constants, indent=2))


def _rename(values: dict[str, Any]) -> dict[str, Any]:
    """The block names as the constants call them: ``x_block[k]`` → ``xk``, ``w_block[j]`` → ``wj`` and the
    ``gram`` set-up inside ``w_block[j]`` → ``w_setupj``."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        match = re.fullmatch(r"([xw])_block\[(\d+)\](/gram)?", name)
        if match:
            kind, index, setup = match.groups()
            out[f"w_setup{index}" if setup else f"{kind}{index}"] = value
        elif name == "forward":
            out[name] = value
    return out


def _allreduce(nbytes: float, R: int, alpha: float, bw: float) -> float:
    return 0.0 if R == 1 else 2 * (R - 1) * (alpha + nbytes / (R * bw))


def _allgather(nbytes_total: float, R: int, alpha: float, bw: float) -> float:
    return 0.0 if R == 1 else (R - 1) * (alpha + nbytes_total / (R * bw))


def _other(c: dict[str, Any]) -> float:
    """Step time outside the timed solves: pre-activation refreshes, energies, power iterations, Python."""
    L = len(WIDTHS) - 1
    x_total = sum(c["x_seconds_per_round"][str(k)] * c["x_solves_per_step"][str(k)] for k in range(1, L + 1))
    return max(c["step_seconds_mean"] - c["forward_seconds"] - x_total - sum(c["w_seconds"]), 0.0)


def data_parallel(c: dict[str, Any], R: int, alpha: float, bw: float) -> tuple[float, float, float]:
    """(compute, communication, total) seconds per step on R machines."""
    L = len(WIDTHS) - 1
    x_total = sum(c["x_seconds_per_round"][str(k)] * c["x_solves_per_step"][str(k)] for k in range(1, L + 1))
    w_setup = sum(c["w_setup_seconds"])
    w_rest = sum(c["w_seconds"]) - w_setup
    compute = (c["forward_seconds"] + x_total + w_rest + _other(c)) / R + (2 * w_setup if R > 1 else w_setup)
    comm = 0.0
    for j in range(L):
        comm += _allgather(BATCH * (WIDTHS[j] + 1) * 4, R, alpha, bw)
        comm += c["w_iters"] * _allreduce(WIDTHS[j + 1] * (WIDTHS[j] + 1) * 4, R, alpha, bw)
    scalars = c["x_iters_per_step"] + c["rounds_per_step"] + 3
    comm += scalars * _allreduce(16, R, alpha, bw)
    return compute, comm, compute + comm


def layer_parallel(c: dict[str, Any], R: int, alpha: float, bw: float) -> tuple[float, float, float]:
    L = len(WIDTHS) - 1
    groups = []
    for r in range(R):
        lo, hi = shard_bounds(L, r, R)
        groups.append(list(range(lo + 1, hi + 1)))
    rounds = c["rounds_per_step"]
    # a block at its forward-pass minimiser is skipped in a round, so charge each round the block's measured
    # share of solves (at R = 1 this gives the same X-time as the data-parallel model)
    x_round = {k: c["x_seconds_per_round"][str(k)] * c["x_solves_per_step"][str(k)] / max(rounds, 1e-9)
               for k in range(1, L + 1)}
    # pipelined forward (the layers run one after another) and the untimed rest, counted as not parallel
    compute = c["forward_seconds"] + _other(c)
    comm = (R - 1) * (alpha + BATCH * 2048 * 4 / bw) if R > 1 else 0.0
    per_round_compute = 0.0
    per_round_comm = 0.0
    for parity in (0, 1):
        phase = [k for k in range(1, L + 1) if k % 2 == parity]
        per_round_compute += max(sum(x_round[k] for k in g if k in phase) for g in groups)
        if R > 1:
            boundary = [g[-1] for g in groups[:-1]] + [g[0] for g in groups[1:]]
            if any(k in phase for k in boundary):
                per_round_comm += alpha + BATCH * 2048 * 4 / bw
    if R > 1:
        per_round_comm += _allreduce(8, R, alpha, bw)
    compute += rounds * per_round_compute
    comm += rounds * per_round_comm
    w = c["w_seconds"]
    compute += max(sum(w[j] for j in range(g[0] - 1, min(g[-1], L - 1) + 1)) for g in groups)
    weights = sum(WIDTHS[j + 1] * (WIDTHS[j] + 1) for j in range(L)) * 4
    comm += (weights / bw + alpha * 2 * L) / STEPS_PER_EPOCH if R > 1 else 0.0
    return compute, comm, compute + comm


def table(c: dict[str, Any], bandwidth_gbit: float, latency_us: float, machines: list[int]) -> str:
    bw = bandwidth_gbit * 1e9 / 8
    alpha = latency_us * 1e-6
    L = len(WIDTHS) - 1
    lines = [
        f"Constants: {c['machine']}, {c['date']}, {c['model']} batch {c['batch']}, mean of {c['steps_measured']} "
        f"steps of lpom-sync (workers=1): {c['step_seconds_mean']:.3f} s/step measured end to end.",
        f"Network: {bandwidth_gbit:g} Gbit/s, {latency_us:g} us per message; {STEPS_PER_EPOCH} steps per epoch.",
        "",
        "| machines R | data-parallel s/epoch (compute + comm) | speed-up | layer-parallel s/epoch (compute + comm) "
        "| speed-up |",
        "|---|---|---|---|---|",
    ]
    base_dp = data_parallel(c, 1, alpha, bw)[2]
    base_lp = layer_parallel(c, 1, alpha, bw)[2]
    for R in machines:
        dc, dm, dt = data_parallel(c, R, alpha, bw)
        if R <= L:
            lc, lm, lt = layer_parallel(c, R, alpha, bw)
            lp = (f"{lt * STEPS_PER_EPOCH:.0f} ({lc * STEPS_PER_EPOCH:.0f} + {lm * STEPS_PER_EPOCH:.1f}) | "
                  f"{base_lp / lt:.2f}")
        else:
            lp = "— (at most one machine per layer, L = 4) | —"
        lines.append(
            f"| {R} | {dt * STEPS_PER_EPOCH:.0f} ({dc * STEPS_PER_EPOCH:.0f} + {dm * STEPS_PER_EPOCH:.1f}) | "
            f"{base_dp / dt:.2f} | {lp} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", type=Path, help="measure the constants and write them here")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--constants", type=Path, default=DEFAULT_CONSTANTS)
    p.add_argument("--bandwidth-gbit", type=float, default=10.0)
    p.add_argument("--latency-us", type=float, default=50.0)
    p.add_argument("--machines", default="1,2,4,8,16,32,100")
    p.add_argument("--data-dir", default=os.environ.get("LIFTKIT_DATA_DIR"),
                   help="dataset directory for --measure (default: $LIFTKIT_DATA_DIR, else a cache)")
    args = p.parse_args()
    if args.measure is not None:
        measure(args.measure, args.steps, args.data_dir)
        return
    c = json.loads(args.constants.read_text())
    machines = [int(v) for v in args.machines.split(",")]
    if any(not (1 <= R <= BATCH) for R in machines) or not math.isfinite(args.bandwidth_gbit):
        raise SystemExit(f"--machines must lie in 1..{BATCH} (each machine needs a sample of the batch of {BATCH})")
    print(table(c, args.bandwidth_gbit, args.latency_us, machines))


if __name__ == "__main__":
    main()
