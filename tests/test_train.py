"""Trainer, checkpoints, resume, divergence, and the CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import liftkit
from liftkit.cli import main
from liftkit.data import load_dataset
from liftkit.errors import DivergenceError
from liftkit.io import load_checkpoint
from liftkit.methods import get
from liftkit.models import build_model
from liftkit.train import RunSpec, run


class Killed(Exception):
    """Stands in for a kill signal arriving right after an epoch's checkpoint is written."""


def _without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _metrics(path: Path):
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.mark.parametrize("method", ["adam", "sgd"])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, method):
    spec = dict(method=method, dataset="digits", model="64-24-10", epochs=4, batch_size=64, seed=3, progress=False)
    full = run(RunSpec(**spec, out=str(tmp_path / "full")))
    full_state = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["method_state"]

    # Interrupted after epoch 2: build the same run by hand so a callback can "kill" it.
    data = load_dataset("digits")
    model = build_model("64-24-10", input_shape=data.input_shape, num_classes=10, seed=3)
    m = get(method)(model)
    torch.manual_seed(3)

    def kill_after_two(record):
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        liftkit.fit(
            m, data, epochs=4, batch_size=64, seed=3, out_dir=tmp_path / "cut", progress=False,
            run_info={"method": method, "dataset": "digits", "model": "64-24-10"}, on_epoch=kill_after_two,
        )
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 2
    resumed = run(RunSpec(**spec, out=str(tmp_path / "cut"), resume=True))
    resumed_state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["method_state"]

    for k, v in full_state["model"].items():
        assert torch.equal(v, resumed_state["model"][k]), k
    assert _without_seconds(full["history"]) == _without_seconds(resumed["history"])
    assert len(resumed["history"]) == 4
    assert _metrics(tmp_path / "full" / "metrics.jsonl") == _metrics(tmp_path / "cut" / "metrics.jsonl")
    saved = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3, 4]


def test_resume_with_other_settings_is_refused(tmp_path):
    base = dict(method="adam", dataset="digits", model="64-24-10", epochs=1, batch_size=64, progress=False)
    run(RunSpec(**base, out=str(tmp_path)))
    with pytest.raises(liftkit.LiftkitError, match="batch_size"):
        run(RunSpec(**{**base, "batch_size": 32, "epochs": 2}, out=str(tmp_path), resume=True))


def test_divergence_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    data = load_dataset("digits")
    model = build_model("64-24-10", input_shape=data.input_shape, num_classes=10, seed=0)
    method = get("sgd")(model, lr=0.05, momentum=0.0, nesterov=False)

    def blow_up(record):
        # After a good first epoch, make the next one diverge.
        for group in method.optimizer.param_groups:
            group["lr"] = 1e12

    with pytest.raises(DivergenceError, match=r"epoch 2, batch \d+.*last good checkpoint"):
        liftkit.fit(method, data, epochs=3, batch_size=64, out_dir=tmp_path, progress=False, on_epoch=blow_up)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["method_state"]["model"].values())
    assert not list(tmp_path.glob("*.tmp"))


def test_full_batch_and_non_dividing_batch_sizes(tmp_path):
    data = load_dataset("digits")
    for bs, expected in ((0, 1), (500, 3)):
        model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10, seed=0)
        method = get("adam")(model)
        calls = []
        orig = method.step

        def counting(x, y, *, idx=None, _orig=orig, calls=calls):
            calls.append(x.shape[0])
            return _orig(x, y, idx=idx)

        method.step = counting  # type: ignore[method-assign]
        liftkit.fit(method, data, epochs=1, batch_size=bs, progress=False)
        assert len(calls) == expected
        assert sum(calls) == data.x_train.shape[0]


def test_nan_inputs_are_rejected():
    data = load_dataset("digits")
    data.x_train[3, 0, 0, 0] = float("nan")
    model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10)
    with pytest.raises(ValueError, match="(?i)nan"):
        liftkit.fit(get("adam")(model), data, epochs=1, progress=False)


def test_labels_out_of_range_are_rejected():
    data = load_dataset("digits")
    data.y_train[0] = 10
    model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10)
    with pytest.raises(ValueError, match="(?i)label"):
        liftkit.fit(get("adam")(model), data, epochs=1, progress=False)


# ------------------------------------------------------------------------------------------------------ CLI


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--method", "nope", "--dataset", "digits", "--model", "64-10"], "unknown method"),
        (["train", "--method", "adam", "--dataset", "nope", "--model", "64-10"], "nope"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "63-10"], "input width"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "64-9"], "classes"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "64-10", "--set", "bogus=1"], "valid keys"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "64-10", "--set", "lr=abc"], "lr"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "64-10", "--set", "lr=0"], "lr"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "64-10", "--activation", "gelu"], "gelu"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "64-10", "--epochs", "0"], "epochs"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "x-y"], "model"),
        (["train", "--method", "adam", "--dataset", "digits", "--model", "64-10", "--device", "tpu"], "device"),
        (["train", "--method", "adam", "--dataset", "digits"], "--model"),
        (["bench", "--methods", "adam", "--dataset", "digits", "--model", "64-10", "--set", "lr=1"], "METHOD.KEY"),
        (["bench", "--methods", "adam", "--dataset", "digits", "--model", "64-10", "--set", "sgd.lr=1"], "sgd"),
        (["bench", "--config", "/nonexistent.json"], "not found"),
        (["bench", "--methods", "adam", "--dataset", "digits", "--model", "64-10", "--repeat", "0"], "repeat"),
    ],
)
def test_cli_usage_errors_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    code, _, err = _cli(capsys, *argv, *(["--out", str(tmp_path)] if argv[0] in ("train", "bench") else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0]


def test_cli_corrupt_data_file_is_named(tmp_path, capsys, data_dir):
    bad = tmp_path / "data" / "mnist"
    bad.mkdir(parents=True)
    for f in (data_dir / "mnist").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    target = bad / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    target.write_bytes(bytes(raw))
    code, _, err = _cli(
        capsys, "train", "--method", "adam", "--dataset", "mnist", "--model", "784-10",
        "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
    )
    assert code == 2
    assert "t10k-labels-idx1-ubyte.gz" in err and "md5" in err.lower()
    assert len(err.strip().splitlines()) == 1


def test_cli_divergence_exit_1(tmp_path, capsys):
    code, _, err = _cli(
        capsys, "train", "--method", "sgd", "--dataset", "digits", "--model", "64-32-10", "--epochs", "2",
        "--set", "lr=1e30", "--out", str(tmp_path), "--quiet",
    )
    assert code == 1
    assert "diverged" in err and len(err.strip().splitlines()) == 1


def test_cli_train_writes_summary_with_contract_keys(tmp_path, capsys):
    code, _out, _ = _cli(
        capsys, "train", "--method", "adam", "--dataset", "digits", "--model", "64-32-10", "--epochs", "2",
        "--out", str(tmp_path), "--quiet", "--set", "lr=0.01",
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "method", "dataset", "model", "epochs", "batch_size", "seed", "hparams", "test_accuracy",
        "best_test_accuracy", "train_loss", "test_loss", "train_seconds", "seconds_per_epoch", "peak_rss_mb",
        "history",
    ):
        assert key in summary, key
    assert summary["hparams"]["lr"] == 0.01
    assert set(summary["history"][0]) == {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
    assert 0.5 < summary["test_accuracy"] <= 1.0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_autoencoder_reports_reconstruction_error(tmp_path, capsys):
    code, _, _ = _cli(
        capsys, "train", "--method", "adam", "--dataset", "digits", "--model", "ae:64-16", "--epochs", "2",
        "--out", str(tmp_path), "--quiet",
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] is None
    assert summary["history"][1]["train_loss"] < summary["history"][0]["train_loss"]


def test_bench_writes_results_table_and_plots(tmp_path, capsys):
    code, _out, _ = _cli(
        capsys, "bench", "--methods", "adam,sgd,adam@1e.2", "--dataset", "digits", "--model", "64-32-10",
        "--epochs", "2", "--set", "adam@1e.2.lr=0.01", "--out", str(tmp_path), "--target-accuracy", "0.5",
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cores", "torch", "device"} <= set(results["machine"])
    assert [r["label"] for r in results["runs"]] == ["adam", "sgd", "adam@1e.2"]
    assert results["runs"][2]["hparams"]["lr"] == 0.01
    # same initial weights: the first epoch's loss only differs through the method
    table = (tmp_path / "results.md").read_text()
    assert "| adam@1e.2 |" in table and "s to 50%" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "loss.png").stat().st_size > 0


def test_bench_repeat_reports_the_median_seconds_of_every_run(tmp_path, capsys):
    code, _out, err = _cli(
        capsys, "bench", "--methods", "adam,sgd", "--dataset", "digits", "--model", "64-16-10", "--epochs", "1",
        "--repeat", "3", "--out", str(tmp_path),
    )
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["repeat"] == 3
    # each repetition is a fresh run in its own directory; the order rotates (sgd ran first in the second one)
    assert err.index("runs/sgd.rep2") < err.index("runs/adam.rep2") < err.index("runs/adam.rep3") < err.index(
        "runs/sgd.rep3")
    for entry in results["runs"]:
        label = entry["label"]
        reps = [json.loads((tmp_path / "runs" / name / "summary.json").read_text())
                for name in (label, f"{label}.rep2", f"{label}.rep3")]
        assert entry["seconds_per_epoch_repeats"] == [r["seconds_per_epoch"] for r in reps]
        assert entry["seconds_per_epoch"] == sorted(entry["seconds_per_epoch_repeats"])[1]
        # deterministic training: every repetition ends at the same accuracy, and the first one's is reported
        assert {r["test_accuracy"] for r in reps} == {entry["test_accuracy"]}
        assert "repeat_accuracy_mismatch" not in entry


def test_bench_methods_narrow_a_config_and_drop_its_other_runs_settings(tmp_path, capsys):
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({
        "methods": ["adam", "sgd"], "dataset": "digits", "model": "64-16-10", "epochs": 1,
        "set": {"adam.lr": 0.002, "sgd.lr": 0.05},
    }))
    code, _, err = _cli(capsys, "bench", "--config", str(config), "--methods", "adam", "--out", str(tmp_path / "o"))
    assert code == 0, err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == ["adam"]
    assert results["runs"][0]["hparams"]["lr"] == 0.002
    # a setting for a run that neither the config nor --methods has is still an error
    config.write_text(json.dumps({"methods": ["adam"], "dataset": "digits", "model": "64-16-10", "set": {"sgd.lr": 1}}))
    code, _, err = _cli(capsys, "bench", "--config", str(config), "--out", str(tmp_path / "p"))
    assert code == 2 and "sgd" in err.strip().splitlines()[-1]


def test_checkpoint_every_resumes_from_the_last_written_epoch(tmp_path):
    data = load_dataset("digits")
    common = dict(epochs=4, batch_size=64, seed=1, progress=False, checkpoint_every=2)
    info = {"method": "adam", "dataset": "digits", "model": "64-16-10"}

    def fresh():
        model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10, seed=1)
        torch.manual_seed(1)
        return get("adam")(model)

    full = liftkit.fit(fresh(), data, out_dir=tmp_path / "full", run_info=info, **common)

    def kill_after_three(record):
        if record["epoch"] == 3:
            raise Killed

    with pytest.raises(Killed):
        liftkit.fit(fresh(), data, out_dir=tmp_path / "cut", run_info=info, on_epoch=kill_after_three, **common)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 2
    resumed = liftkit.fit(fresh(), data, out_dir=tmp_path / "cut", run_info=info, resume=True, **common)
    assert _without_seconds(full["history"]) == _without_seconds(resumed["history"])
    assert _metrics(tmp_path / "full" / "metrics.jsonl") == _metrics(tmp_path / "cut" / "metrics.jsonl")
