"""--deterministic repeats a run bit for bit; a damaged checkpoint on --resume is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import liftkit
from liftkit.cli import main
from liftkit.data import load_dataset
from liftkit.io import load_checkpoint
from liftkit.methods import get
from liftkit.models import build_model


@pytest.fixture
def restore_determinism():
    """fit(deterministic=True) switches the whole process; give the other tests torch's default back."""
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def _fit_once(method: str, **hparams):
    data = load_dataset("digits")
    model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10, seed=5)
    seen = []

    def check(record):
        seen.append(torch.are_deterministic_algorithms_enabled())

    torch.manual_seed(123)  # disturb the global generator: the deterministic switch must re-seed it
    summary = liftkit.fit(get(method)(model, **hparams), data, epochs=2, batch_size=300, seed=5, progress=False,
                          deterministic=True, on_epoch=check)
    assert seen == [True, True]
    # the global generators were seeded with the run's seed: the next draws are those after seed 5
    return model.state_dict(), summary, torch.rand(3), np.random.rand(2)


@pytest.mark.parametrize("method", ["sgd", "proxprop", "lpom"])
def test_deterministic_runs_repeat_bit_for_bit(restore_determinism, method):
    state_a, summary_a, rand_a, np_a = _fit_once(method)
    state_b, summary_b, rand_b, np_b = _fit_once(method)
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in summary_a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in summary_b["history"]]
    assert torch.equal(rand_a, rand_b) and np.array_equal(np_a, np_b)


def test_asynchronous_threads_are_refused(restore_determinism):
    data = load_dataset("digits")
    model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10, seed=5)
    method = get("lpom-async")(model, mode="threads", workers=2)
    with pytest.raises(liftkit.LiftkitError, match="cannot repeat bit for bit; use --set mode=simulate"):
        liftkit.fit(method, data, epochs=1, progress=False, deterministic=True)


def test_cli_deterministic_runs_are_identical(tmp_path, restore_determinism):
    args = ["train", "--method", "adam", "--dataset", "digits", "--model", "64-16-10", "--epochs", "2",
            "--batch-size", "256", "--deterministic", "--quiet"]
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    weights = [load_checkpoint(tmp_path / n / "checkpoint.pt")["method_state"]["model"] for n in ("a", "b")]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    lines = [
        [{k: v for k, v in json.loads(line).items() if k != "seconds"}
         for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("a", "b")
    ]
    assert lines[0] == lines[1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_on_resume_is_a_one_line_error(tmp_path, capsys, damage):
    out = tmp_path / "run"
    args = ["train", "--method", "adam", "--dataset", "digits", "--model", "64-16-10", "--epochs", "1",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    bad = {"truncate": good[: len(good) // 2], "garbage": b"not a checkpoint\n" * 10, "empty": b""}[damage]
    ckpt.write_bytes(bad)
    metrics_before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    code = main([*args[:-5], "--epochs", "2", "--out", str(out), "--quiet", "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(ckpt) in err and "truncated or corrupt" in err
    assert "remove it" in err and "new --out directory" in err
    assert ckpt.read_bytes() == bad  # left exactly as it was
    assert (out / "metrics.jsonl").read_text() == metrics_before
