"""Presets: named settings of every method (``tuned`` by default, ``paper``), overridable and recorded."""

from __future__ import annotations

import json

import pytest

from liftkit.cli import main
from liftkit.methods import available, get
from liftkit.models import mlp


@pytest.mark.parametrize("name", available())
def test_every_method_has_tuned_default_and_paper_preset(name):
    cls = get(name)
    assert cls.presets[0] == "tuned" and "paper" in cls.presets
    method = cls(mlp("8-6-3"))
    assert method.preset == "tuned"
    assert method.state_dict()["preset"] == "tuned"


@pytest.mark.parametrize("name", available())
def test_paper_preset_resolves_to_its_values(name):
    cls = get(name)
    model = mlp("8-6-3")
    method = cls(model, preset="paper")
    for key, value in cls.preset_values("paper", model).items():
        got = method.hparams[key]
        assert (tuple(got) if isinstance(got, list) else got) == value, key


def test_explicit_hyperparameters_override_the_preset():
    method = get("adam")(mlp("8-6-3"), preset="paper", lr=0.0123)
    assert method.hparams["lr"] == 0.0123 and method.preset == "paper"


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown preset 'best' for method adam; choose one of tuned, paper"):
        get("adam")(mlp("8-6-3"), preset="best")


def test_cli_records_the_preset_and_lists_presets(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--method", "sgd", "--preset", "paper", "--dataset", "digits", "--model", "64-8-10",
            "--epochs", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "paper"
    assert summary["hparams"] == {**summary["hparams"], **get("sgd").preset_values("paper", mlp("64-8-10"))}
    capsys.readouterr()
    assert main(["train", "--method", "sgd", "--preset", "nope", "--dataset", "digits", "--model", "64-8-10",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown preset 'nope'" in err and "\n" not in err
    assert main(["methods"]) == 0
    assert "presets: tuned, paper (default tuned)" in capsys.readouterr().out
