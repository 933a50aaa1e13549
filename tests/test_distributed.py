"""Data-parallel training over torch.distributed (docs/methods/distributed.md): the communicator, the trainer's
sharding, the equality of a 2-process gloo run with the 1-process run on the same global batch, the refusal of methods
that are not data-parallel yet, and the fault path (a killed peer stops the survivor; resume finishes the run).

The multi-process tests start real processes on 127.0.0.1 (this file doubles as their worker script) and are
skipped only where this PyTorch build has no gloo backend.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# label -> (method, hyperparameters, batch size, epochs, hidden widths); tiny digits runs in float64
CASES: dict[str, tuple[str, dict[str, Any], int, int, str]] = {
    "sgd": ("sgd", {"lr": 0.05}, 64, 2, "64-16-10"),
    "adam": ("adam", {}, 64, 2, "64-16-10"),
    "lbfgs": ("lbfgs", {"max_iter": 4}, 0, 3, "64-16-10"),
    # TIAM / AM: the specification's configuration (preset paper) switched one code path at a time, and the tuned
    # defaults (the penalty constraint, both Gram metrics, the exact output, the third inertia on 'fista')
    "tiam-full": ("tiam", {"preset": "paper"}, 0, 4, "64-16-16-10"),
    "tiam-tuned": ("tiam", {}, 0, 3, "64-16-16-10"),
    "tiam-minibatch": ("tiam", {"preset": "paper", "minibatch_sweeps": 2}, 200, 1, "64-16-16-10"),
    "am-full": ("am", {"preset": "paper", "rho": 0.01}, 0, 4, "64-16-16-10"),
    # the Gram metrics all-reduce aᵀa; the first layer's full-batch Gram is cached under a global fingerprint
    "tiam-metrics": (
        "tiam",
        {"preset": "paper", "constraint": "penalty", "nu": 10.0, "rho": 1.0, "w_metric": "gram", "a_metric": "gram",
         "p_schedule": "fista"},
        0,
        3,
        "64-16-16-10",
    ),
    "am-diagonal": ("am", {"preset": "paper", "w_metric": "diagonal"}, 0, 3, "64-16-16-10"),
    # the backward order recomputes every v_l after the sweep for F; a separate output-layer penalty weight
    "tiam-backward": (
        "tiam",
        {"preset": "paper", "constraint": "penalty", "nu": 3.0, "rho": 0.5, "rho_output": 2.0,
         "block_order": "backward", "a_metric": "gram"},
        0,
        3,
        "64-16-16-10",
    ),
    # the exact output's W_L and b_L are replicated blocks: only their CE share is summed over ranks
    "tiam-exact-output": (
        "tiam",
        {"preset": "paper", "constraint": "penalty", "nu": 3.0, "rho": 0.5, "output": "exact", "w_metric": "gram",
         "p_schedule": "fista"},
        0,
        3,
        "64-16-16-10",
    ),
    "proxprop-exact": ("proxprop", {}, 100, 1, "64-16-16-10"),
    "proxprop-cg": ("proxprop", {"solver": "cg3", "optimizer": "sgd", "lr": 0.5}, 100, 1, "64-16-16-10"),
    "sibp": ("sibp", {}, 100, 1, "64-16-16-10"),
    "sibp-fr-primal": ("sibp", {"output_solver": "fr_cg", "hidden_solver": "gn_primal_cg"}, 100, 1, "64-16-16-10"),
    "sibp-fr": ("sibp", {"hidden_solver": "fr_cg"}, 100, 1, "64-16-16-10"),
    "fenchel": ("fenchel", {}, 200, 1, "64-16-16-10"),
    "fenchel-lbfgs-pgd": ("fenchel", {"w_solver": "lbfgs", "x_solver": "pgd", "monitor": "full"}, 300, 1, "64-16-10"),
    "fenchel-fista": ("fenchel", {"w_solver": "fista"}, 300, 1, "64-16-10"),
    # conv1 takes the unfolded (im2col) W-step path, whose data-term gradient is all-reduced on its own; conv2 the
    # convolution-kernel path
    "fenchel-lenet5": ("fenchel", {"x_iters": 3, "w_iters": 3}, 400, 1, "lenet5"),
    "lpom": ("lpom", {}, 100, 1, "64-16-16-10"),
    "lpom-batch-side-ce": ("lpom", {"loss": "ce", "mu": 20.0}, 40, 1, "64-128-10"),
    "lpom-svd": ("lpom", {"pinv": "svd", "w_iters": 2}, 40, 1, "64-128-10"),
    "lpom-sync": ("lpom-sync", {"momentum": 0.5}, 100, 1, "64-16-16-10"),
    "lpom-sync-layers": ("lpom-sync", {"parallel": "layers", "monitor": "full"}, 100, 2, "64-32-32-16-10"),
    "lpom-sync-layers-momentum": ("lpom-sync", {"parallel": "layers", "momentum": 0.5}, 200, 1, "64-32-16-10"),
    "lpom-async": ("lpom-async", {"gamma_growth": 4.0}, 100, 1, "64-16-16-10"),
    "lpom-async-sim": ("lpom-async", {"mode": "simulate", "workers": 2, "w_iters": 2}, 100, 1, "64-16-16-10"),
}
RESUMED = ("tiam-full", "lpom-sync-layers")  # also run as 2-process interrupted-and-resumed runs


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


needs_gloo = pytest.mark.skipif(not _gloo_available(), reason="this PyTorch build has no gloo backend")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]),
    )
    return env


def _launch(argv: list[str], world: int, cwd: Path) -> list[subprocess.Popen[str]]:
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, *argv], env=_env(r, world, port), cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for r in range(world)
    ]


def _wait(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-300)) for k in a)


def _single_process(label: str) -> dict[str, torch.Tensor]:
    import liftkit
    from liftkit.data import load_dataset
    from liftkit.methods import get
    from liftkit.models import build_model

    method_name, hp, bs, epochs, spec = CASES[label]
    data = load_dataset("digits", dtype=torch.float64)
    model = build_model(
        spec, input_shape=data.input_shape, num_classes=10, seed=0, dtype=torch.float64,
        output_activation=get(method_name).model_output_activation,
    )
    torch.manual_seed(0)
    method = get(method_name)(model, **hp)
    liftkit.fit(method, data, epochs=epochs, batch_size=bs, seed=0, progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(out_file: str, labels: list[str]) -> None:
    """One rank of the equality test: train every case data-parallel; rank 0 saves the final weights."""
    import liftkit
    from liftkit.data import load_dataset
    from liftkit.distributed import comm_from_env
    from liftkit.methods import get
    from liftkit.models import build_model

    torch.set_num_threads(1)
    comm = comm_from_env(timeout_s=60)
    data = load_dataset("digits", dtype=torch.float64)
    weights = {}
    traffic = {}
    for label in labels:
        method_name, hp, bs, epochs, spec = CASES[label]

        def fresh(method_name: str = method_name, hp: dict[str, Any] = hp, spec: str = spec) -> Any:
            model = build_model(
                spec, input_shape=data.input_shape, num_classes=10, seed=0, dtype=torch.float64,
                output_activation=get(method_name).model_output_activation,
            )
            torch.manual_seed(0)
            return get(method_name)(model, **hp)

        comm.reset_counters()
        method = fresh()
        liftkit.fit(method, data, epochs=epochs, batch_size=bs, seed=0, progress=False, comm=comm)
        weights[label] = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
        traffic[label] = dict(comm.bytes_sent)
        if label in RESUMED:
            # stop after half the epochs, then resume in new method objects: rank 0's checkpoint (with the
            # per-sample shards gathered into it) must continue every rank exactly
            ckpt = Path(out_file).parent / "resume-run"
            common: dict[str, Any] = dict(
                batch_size=bs, seed=0, progress=False, comm=comm, out_dir=ckpt, run_info={"method": label}
            )
            liftkit.fit(fresh(), data, epochs=epochs // 2, **common)
            method = fresh()
            liftkit.fit(method, data, epochs=epochs, resume=True, **common)
            weights[label + "/resumed"] = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
    if comm.is_main:
        torch.save({"weights": weights, "traffic": traffic}, out_file)
    comm.close()


# ------------------------------------------------------------------------------------------- in-process units


class _ThreeRanks:
    """A stand-in communicator that claims three processes (rank 0)."""

    def __new__(cls) -> Any:
        from liftkit.distributed import LocalComm

        class Fake(LocalComm):
            @property
            def world_size(self) -> int:
                return 3

        return Fake()


class _TwoRanks:
    """A stand-in communicator that claims two processes (for the refusal path; no collective is reached)."""

    def __new__(cls, rank: int = 0) -> Any:
        from liftkit.distributed import LocalComm

        class Fake(LocalComm):
            @property
            def rank(self) -> int:
                return rank

            @property
            def world_size(self) -> int:
                return 2

        return Fake()


def test_shard_bounds_cover_the_batch_contiguously() -> None:
    from liftkit.distributed import shard_bounds

    for n in (2, 7, 100, 101):
        for world in (1, 2, 3, 4):
            if n < world:
                continue
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_local_comm_is_a_no_op_and_counts_nothing() -> None:
    from liftkit.distributed import LocalComm, comm_from_env

    comm = LocalComm()
    t = torch.arange(4.0)
    assert comm.all_reduce_sum_(t, float64=True) is t and torch.equal(t, torch.arange(4.0))
    assert comm.all_gather(t)[0] is t
    assert comm.sum_scalars(1.5, 2.0) == (1.5, 2.0)
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    comm.barrier()
    assert comm.rank == 0 and comm.world_size == 1 and comm.is_main
    assert sum(comm.bytes_sent.values()) == 0
    with pytest.raises(ValueError, match="peer rank"):
        comm.send(t, 1)
    assert isinstance(comm_from_env(), LocalComm) or os.environ.get("WORLD_SIZE", "1") != "1"


def test_every_registered_method_is_data_parallel_and_has_an_equality_case() -> None:
    from liftkit.methods import available, get

    names = set(available())
    assert {name for name in names if get(name).supports_data_parallel} == names
    assert {case[0] for case in CASES.values()} >= names, sorted(names - {case[0] for case in CASES.values()})


@pytest.mark.parametrize(
    ("method", "hparams", "spec", "phrase"),
    [
        ("tiam", {"preset": "paper", "zL_solver": "fista"}, "64-16-10", "single process"),
        ("sibp", {"hidden_solver": "gn_exact"}, "64-16-10", "single process"),
        ("fenchel", {"x_solver": "scipy_lbfgsb"}, "64-16-10", "single process"),
        ("lpom", {"x_init": "persistent"}, "64-16-10", "single process"),
        ("lpom-async", {"workers": 2}, "64-16-10", "workers=1 or mode=simulate"),
        ("lpom-sync", {"parallel": "layers", "x_init": "persistent"}, "64-16-10", "needs x_init=forward"),
    ],
)
def test_single_process_only_settings_refuse_with_one_line(
    method: str, hparams: dict[str, Any], spec: str, phrase: str
) -> None:
    import liftkit
    from liftkit.data import load_dataset
    from liftkit.methods import get
    from liftkit.models import build_model

    data = load_dataset("digits", dtype=torch.float64)
    cls = get(method)
    model = build_model(
        spec, input_shape=data.input_shape, num_classes=10, seed=0, dtype=torch.float64,
        output_activation=cls.model_output_activation,
    )
    with pytest.raises(ValueError) as info:
        liftkit.fit(cls(model, **hparams), data, epochs=1, batch_size=64, progress=False, comm=_TwoRanks())
    message = str(info.value)
    assert "\n" not in message and phrase in message and method.split("-")[0] in message


def test_tiam_fista_refuses_several_processes() -> None:
    from liftkit.methods import get
    from liftkit.models import build_model

    model = build_model("64-16-10", input_shape=(1, 8, 8), num_classes=10, seed=0, dtype=torch.float64)
    method = get("tiam")(model, preset="paper", zL_solver="fista")
    with pytest.raises(ValueError, match="single process"):
        method.set_comm(_TwoRanks())


def test_batches_too_small_to_split_are_refused() -> None:
    import liftkit
    from liftkit.data import load_dataset
    from liftkit.methods import get
    from liftkit.models import build_model

    data = load_dataset("digits", dtype=torch.float64)
    model = build_model("64-10", input_shape=data.input_shape, num_classes=10, seed=0, dtype=torch.float64)
    n = data.x_train.shape[0]
    with pytest.raises(ValueError, match="cannot be split over 2 processes"):
        # the last batch of the epoch keeps a single sample
        liftkit.fit(get("sgd")(model), data, epochs=1, batch_size=n - 1, progress=False, comm=_TwoRanks())


def test_layer_parallel_refuses_more_processes_than_layers() -> None:
    from liftkit.methods.lpom_layers import LayerParallel

    with pytest.raises(ValueError, match="at most 2"):
        LayerParallel(_ThreeRanks(), 2)
    plan = LayerParallel(_TwoRanks(1), 3)  # rank 1 of 2 over 3 layers: blocks 3, layer 2, reads X^2
    assert plan.blocks == [3] and plan.layers == [2] and plan.left == 2 and plan.right is None


def test_cost_model_prints_a_row_per_machine_count() -> None:
    import importlib.util

    path = REPO / "benchmarks" / "lpom_cost_model.py"
    spec = importlib.util.spec_from_file_location("lpom_cost_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    constants = json.loads(module.DEFAULT_CONSTANTS.read_text())
    text = module.table(constants, 10.0, 50.0, [1, 2, 4, 8])
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "4", "8"]
    # one machine: no communication, speed-up 1 in both columns
    assert "+ 0.0) | 1.00 |" in rows[0] and rows[0].endswith("| 1.00 |")


# ------------------------------------------------------------------------------------------- real processes


@needs_gloo
@pytest.mark.slow
def test_two_process_gloo_run_equals_single_process(tmp_path: Path) -> None:
    labels = list(CASES)
    out_file = tmp_path / "weights.pt"
    procs = _launch([__file__, "worker", str(out_file), ",".join(labels)], 2, tmp_path)
    results = _wait(procs, timeout=150)
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    saved = torch.load(out_file, weights_only=False)
    for label in labels:
        reference = _single_process(label)
        error = _relative_error(saved["weights"][label], reference)
        assert error <= 1e-10, (label, error)
        assert saved["traffic"][label].get("all_reduce", 0) > 0, label  # the reductions really happened
        if label in RESUMED:
            error = _relative_error(saved["weights"][label + "/resumed"], reference)
            assert error <= 1e-10, (label + "/resumed", error)


def _train_argv(out: Path, *extra: str) -> list[str]:
    return [
        "-m", "liftkit", "train", "--method", "sgd", "--dataset", "digits", "--model", "64-32-10",
        "--batch-size", "4", "--epochs", "3", "--dtype", "float64", "--seed", "1", "--threads", "1",
        "--set", "lr=0.02", "--out", str(out), "--quiet", *extra,
    ]


@needs_gloo
@pytest.mark.slow
def test_killed_peer_stops_survivor_and_resume_finishes(tmp_path: Path) -> None:
    from liftkit.io import load_checkpoint

    out = tmp_path / "run"
    timeout_s = 20
    procs = _launch(_train_argv(out, "--dist-timeout", str(timeout_s)), 2, tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not (out / "checkpoint.pt").exists():  # renamed into place complete: epoch 1 is saved
            assert time.monotonic() < deadline, "the 2-process run wrote no epoch in 90 s"
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].stderr.read()  # type: ignore[union-attr]
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)  # mid-epoch 2: the first epoch's checkpoint is on disk
        killed_at = time.monotonic()
        (rc0, _, err0), (rc1, _, _) = _wait(procs, timeout=timeout_s + 30)
        stopped_after = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rc1 == -signal.SIGKILL
    assert rc0 == 1, err0
    lines = [line for line in err0.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err0
    assert "rank 1" in lines[0] and "rank 0" in lines[0] and "Traceback" not in err0, lines[0]
    assert stopped_after < timeout_s + 10
    state = load_checkpoint(out / "checkpoint.pt")  # intact: a complete, loadable checkpoint
    assert 1 <= state["epoch"] < 3
    assert not list(out.glob("*.tmp"))

    resumed = _wait(_launch(_train_argv(out, "--resume"), 2, tmp_path), timeout=120)
    for rc, _, err in resumed:
        assert rc == 0, err[-2000:]
    final = load_checkpoint(out / "checkpoint.pt")
    assert final["epoch"] == 3
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]

    # the resumed 2-process run ends where an uninterrupted single-process run ends
    from liftkit.train import RunSpec, run

    run(RunSpec(
        method="sgd", dataset="digits", model="64-32-10", batch_size=4, epochs=3, dtype="float64", seed=1,
        hparams={"lr": 0.02}, out=str(tmp_path / "single"), progress=False,
    ))
    single = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["method_state"]["model"]
    assert _relative_error(final["method_state"]["model"], single) <= 1e-10


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "worker":
    sys.path.insert(0, str(REPO / "src"))
    _worker(sys.argv[2], sys.argv[3].split(","))
