"""CSV and TensorBoard logs of real runs, read back with the csv module and TensorBoard's own event reader;
resumed runs; bad logging options."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

import liftkit
from liftkit.bench import BenchSpec, _train_command
from liftkit.cli import main
from liftkit.data import load_dataset
from liftkit.io import load_checkpoint
from liftkit.loggers import CSVLogger, Logger
from liftkit.methods import get
from liftkit.models import build_model
from liftkit.train import RunSpec, run
from tests.test_distributed import _launch, _wait, needs_gloo

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SPEC = dict(method="sibp", dataset="digits", model="64-16-10", epochs=4, batch_size=200, seed=1, progress=False)
STEPS_PER_EPOCH = 7  # 1347 digits training samples in batches of 200


class Killed(Exception):
    """Stands in for a kill arriving after an epoch was logged but before its checkpoint."""


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_real_run_logs_every_epoch_to_csv_and_tensorboard(tmp_path):
    out = tmp_path / "run"
    run(RunSpec(**SPEC, out=str(out), log=["csv", "tensorboard"], log_every=3))
    records = _jsonl(out / "metrics.jsonl")
    diagnostics = sorted(records[0]["info"])
    assert diagnostics, "sibp reports StepStats diagnostics"

    rows = _csv_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for row, rec in zip(rows, records, strict=True):
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "seconds", "step_loss"):
            assert float(row[key]) == rec[key], key  # repr-exact in the CSV
        for key in diagnostics:
            assert float(row[f"info/{key}"]) == rec["info"][key], key
    epoch_seconds = [float(r["epoch_seconds"]) for r in rows]
    assert sum(epoch_seconds) == pytest.approx(records[-1]["seconds"])

    tb = _scalars(out / "tensorboard" / "epochs")
    for key in ("train_loss", "test_accuracy", "seconds", "epoch_seconds", *(f"info/{k}" for k in diagnostics)):
        assert [s for s, _ in tb[key]] == [1, 2, 3, 4], key
    for rec, (_, value) in zip(records, tb["test_loss"], strict=True):
        assert value == pytest.approx(rec["test_loss"], rel=1e-6)  # event files hold float32

    steps = _csv_rows(out / "steps.csv")
    total = 4 * STEPS_PER_EPOCH
    assert [int(r["step"]) for r in steps] == list(range(3, total + 1, 3))
    assert {(int(r["step"]) - 1) // STEPS_PER_EPOCH + 1 for r in steps} == {int(r["epoch"]) for r in steps}
    assert all(f"info/{k}" in steps[0] for k in diagnostics)
    tb_steps = _scalars(out / "tensorboard" / "steps")
    assert [s for s, _ in tb_steps["loss"]] == list(range(3, total + 1, 3))
    assert [v for _, v in tb_steps["loss"]] == pytest.approx([float(r["loss"]) for r in steps], rel=1e-6)


def test_a_resumed_run_appends_without_duplicating_epochs(tmp_path):
    out = tmp_path / "cut"
    data = load_dataset("digits")
    model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10, seed=1)
    torch.manual_seed(1)

    def kill_after_three(record):
        if record["epoch"] == 3:
            raise Killed

    # checkpoints at epochs 2 and 4: the kill after epoch 3 leaves logs one epoch past the checkpoint
    with pytest.raises(Killed):
        liftkit.fit(
            get("sibp")(model), data, epochs=4, batch_size=200, seed=1, out_dir=out, progress=False,
            checkpoint_every=2, on_epoch=kill_after_three, loggers=["csv", "tensorboard"], log_every=2,
            run_info={"method": "sibp", "dataset": "digits", "model": "64-16-10"},
        )
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert [int(r["epoch"]) for r in _csv_rows(out / "metrics.csv")] == [1, 2, 3]

    run(RunSpec(**SPEC, out=str(out), resume=True, checkpoint_every=2, log=["csv", "tensorboard"], log_every=2))
    records = _jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    rows = _csv_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["train_loss"]) for r in rows] == [r["train_loss"] for r in records]
    step_numbers = [int(r["step"]) for r in _csv_rows(out / "steps.csv")]
    assert step_numbers == list(range(2, 4 * STEPS_PER_EPOCH + 1, 2))

    tb = _scalars(out / "tensorboard" / "epochs")
    assert [s for s, _ in tb["train_loss"]] == [1, 2, 3, 4]
    assert [v for _, v in tb["train_loss"]] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)
    tb_steps = _scalars(out / "tensorboard" / "steps")
    assert [s for s, _ in tb_steps["loss"]] == step_numbers


def test_fit_takes_logger_objects(tmp_path):
    seen: list[tuple[str, int, dict]] = []

    class Recorder(Logger):
        def start(self, *, start_epoch, start_step, run_info):
            seen.append(("start", start_epoch, {}))

        def log_epoch(self, epoch, values):
            seen.append(("epoch", epoch, dict(values)))

        def close(self):
            seen.append(("close", 0, {}))

    data = load_dataset("digits")
    model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10, seed=0)
    csv_dir = tmp_path / "csv"
    liftkit.fit(get("adam")(model), data, epochs=2, batch_size=500, progress=False,
                loggers=[Recorder(), CSVLogger(csv_dir)])
    assert [(kind, n) for kind, n, _ in seen] == [("start", 0), ("epoch", 1), ("epoch", 2), ("close", 0)]
    assert {"train_loss", "test_accuracy", "seconds", "epoch_seconds"} <= set(seen[1][2])
    assert len(_csv_rows(csv_dir / "metrics.csv")) == 2


def test_logger_names_without_a_directory_are_an_error():
    data = load_dataset("digits")
    model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10, seed=0)
    with pytest.raises(liftkit.LiftkitError, match="log directory"):
        liftkit.fit(get("adam")(model), data, epochs=1, progress=False, loggers=["csv"])


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--method", "adam", "--dataset", "digits", "--model", "64-16-10", "--epochs", "1",
            "--out", str(out), "--quiet", *extra]


def _one_line_error(capsys, code: int, expected: str) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    return err


def test_unknown_logger_is_a_one_line_error_before_training(tmp_path, capsys):
    code = main(_train_args(tmp_path / "a", "--log", "csv,wandb"))
    _one_line_error(capsys, code, "unknown logger 'wandb'; valid loggers: csv, tensorboard")
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


@pytest.mark.parametrize("every", ["0", "-3"])
def test_log_every_below_one_is_a_one_line_error(tmp_path, capsys, every):
    code = main(_train_args(tmp_path / "b", "--log", "csv", "--log-every", every))
    _one_line_error(capsys, code, "--log-every must be a positive number of steps")
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_log_options_without_log_are_an_error(tmp_path, capsys):
    code = main(_train_args(tmp_path / "c", "--log-every", "5"))
    _one_line_error(capsys, code, "--log-every needs --log")


def test_unwritable_log_directory_is_a_one_line_error_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = main(_train_args(tmp_path / "d", "--log", "csv", "--log-dir", str(blocker / "logs")))
    _one_line_error(capsys, code, f"cannot write logs to {blocker / 'logs'}")
    assert not (tmp_path / "d" / "checkpoint.pt").exists()


def test_missing_tensorboard_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    code = main(_train_args(tmp_path / "e", "--log", "tensorboard"))
    _one_line_error(capsys, code, "pip install 'liftkit[tensorboard]'")
    assert not (tmp_path / "e").exists()


def test_bench_passes_the_log_options_to_every_run(tmp_path):
    spec = BenchSpec(methods=["adam", "adam@b"], dataset="digits", model="64-10", log=["csv", "tensorboard"],
                     log_dir=str(tmp_path / "logs"), log_every=5, deterministic=True)
    cmd = _train_command(spec, "adam@b", tmp_path / "runs" / "adam@b")
    tail = cmd[cmd.index("--log"):]
    assert tail == ["--log", "csv,tensorboard", "--log-dir", str(tmp_path / "logs" / "adam@b"), "--log-every", "5",
                    "--deterministic"]


def test_bench_refuses_an_unknown_logger_before_any_run(tmp_path, capsys):
    code = main(["bench", "--methods", "adam", "--dataset", "digits", "--model", "64-10", "--out",
                 str(tmp_path / "bench"), "--log", "csvv"])
    _one_line_error(capsys, code, "unknown logger 'csvv'")
    assert not (tmp_path / "bench").exists()


@needs_gloo
def test_under_two_processes_only_rank_0_logs(tmp_path):
    out = tmp_path / "dp"
    argv = ["-m", "liftkit", "train", "--method", "sgd", "--dataset", "digits", "--model", "64-16-10",
            "--batch-size", "128", "--epochs", "2", "--threads", "1", "--out", str(out), "--quiet",
            "--log", "csv,tensorboard", "--log-every", "4"]
    for rc, _, err in _wait(_launch(argv, 2, tmp_path), timeout=180):
        assert rc == 0, err[-2000:]
    records = _jsonl(out / "metrics.jsonl")
    rows = _csv_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["test_loss"]) for r in rows] == [r["test_loss"] for r in records]
    assert len(list((out / "tensorboard" / "epochs").iterdir())) == 1  # one writer: rank 0's
    steps_per_epoch = 11  # ceil(1347 / 128)
    assert [int(r["step"]) for r in _csv_rows(out / "steps.csv")] == list(range(4, 2 * steps_per_epoch + 1, 4))
