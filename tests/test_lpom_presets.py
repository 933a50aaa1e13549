"""LPOM's presets: μ per activation resolved from the model (tuned), the paper preset and its documented table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from liftkit.cli import main
from liftkit.methods import get
from liftkit.methods.lpom_defaults import (
    PAPER_AUTOENCODER_GUARDS,
    PAPER_AUTOENCODER_MU,
    PAPER_CLASSIFICATION_MU,
    PAPER_SCHEDULE,
    TUNED_MU,
)
from liftkit.models import build_model, mlp

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods" / "lpom.md"
VARIANTS = ("lpom", "lpom-sync", "lpom-async")


def _batch(n: int = 20, dim: int = 8, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("activation", sorted(TUNED_MU))
def test_tuned_mu_follows_the_activation(name, activation):
    method = get(name)(mlp("8-6-3", activation, output_activation="hidden"))
    assert method.preset == "tuned"
    assert method.hparams["mu"] == TUNED_MU[activation]
    assert method.lifted.mu == (TUNED_MU[activation],) * 2


def test_mixed_activations_get_one_mu_per_layer():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5), torch.nn.Hardtanh(), torch.nn.Linear(5, 3)
    )
    method = get("lpom")(model)
    expected = (TUNED_MU["tanh"], TUNED_MU["hardtanh"], TUNED_MU["identity"])
    assert len(set(expected)) > 1
    assert tuple(method.hparams["mu"]) == expected
    assert method.lifted.mu == expected
    method.step(*_batch())


def test_explicit_mu_overrides_the_activation_default():
    method = get("lpom")(mlp("8-6-3", "tanh", output_activation="hidden"), mu=1.25)
    assert method.hparams["mu"] == 1.25 and method.lifted.mu == (1.25, 1.25)


def test_paper_preset_classification_and_autoencoder():
    cls = get("lpom")
    clf = cls(mlp("8-6-3", output_activation="hidden"), preset="paper")
    assert clf.hparams["mu"] == PAPER_CLASSIFICATION_MU
    assert {k: clf.hparams[k] for k in PAPER_SCHEDULE} == PAPER_SCHEDULE
    ae = build_model("ae:16-8-4", input_shape=(16,), num_classes=10, seed=0)
    sync = get("lpom-sync")(ae, preset="paper")
    assert sync.hparams["mu"] == PAPER_AUTOENCODER_MU
    assert {k: sync.hparams[k] for k in PAPER_AUTOENCODER_GUARDS} == PAPER_AUTOENCODER_GUARDS


@pytest.mark.parametrize("name", VARIANTS)
def test_paper_preset_trains_a_step(name):
    model = mlp("8-6-3", output_activation="hidden")
    method = get(name)(model, preset="paper")
    x, y = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    stats = method.step(x, y)
    assert torch.isfinite(torch.tensor(stats.loss))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def _doc_table(header: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header line starts with ``header``, keyed by their first cell."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    match = re.match(r"\s*\**([0-9.e+-]+)", cell)
    assert match, cell
    return float(match.group(1))


def test_doc_activation_table_matches_the_code():
    rows = _doc_table("| activation | tuned μ |")
    assert {name: _number(cells[0]) for name, cells in rows.items()} == TUNED_MU


def test_cli_records_the_resolved_mu(tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "lpom",
        "--activation",
        "tanh",
        "--dataset",
        "digits",
        "--model",
        "64-8-10",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "tuned" and summary["hparams"]["mu"] == TUNED_MU["tanh"]


@pytest.mark.parametrize(
    ("activation", "off"), [("tanh", -1.0), ("hardtanh", -1.0), ("elu", -1.0), ("sigmoid", 0.0), ("relu", 0.0)]
)
def test_onehot_off_entries_sit_at_the_floor_of_the_output_range(activation, off):
    method = get("lpom")(mlp("8-6-3", activation, output_activation="hidden"))
    d = method._targets(torch.tensor([0, 2]), 2)
    expected = torch.full((2, 3), off, dtype=d.dtype)
    expected[0, 0] = expected[1, 2] = 1.0
    torch.testing.assert_close(d, expected)


def test_onehot_off_leaves_float_targets_ce_and_the_paper_preset_alone():
    tanh = mlp("8-6-3", "tanh", output_activation="hidden")
    labels = torch.tensor([1, 0])
    zero = torch.nn.functional.one_hot(labels, 3).to(torch.get_default_dtype())
    torch.testing.assert_close(get("lpom")(tanh, preset="paper")._targets(labels, 2), zero)
    torch.testing.assert_close(get("lpom")(tanh, onehot_off="zero")._targets(labels, 2), zero)
    torch.testing.assert_close(get("lpom")(tanh, loss="ce")._targets(labels, 2), zero)
    floats = torch.rand(2, 3, dtype=torch.float64)
    torch.testing.assert_close(get("lpom")(tanh)._targets(floats, 2), floats.to(zero.dtype))
    with pytest.raises(ValueError, match="onehot_off"):
        get("lpom")(tanh, onehot_off="minus_one")


def test_every_activation_has_a_tuned_mu():
    from liftkit.activations import ACTIVATIONS

    assert set(TUNED_MU) == set(ACTIVATIONS)
