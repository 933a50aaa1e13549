"""TIAM's and AM's presets: the tuned defaults, the paper preset, the ELU fallback and the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from liftkit.methods import get
from liftkit.methods.tiam.presets import BOX_TUNED, INERTIA_FIELDS, PAPER
from liftkit.models import mlp

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: the full-batch setting chosen on the MNIST validation split (784-100-100-10 ReLU, 200 iterations), which
#: configs/tiam-*-full.json spelled out before it became the default
TUNED = {
    "constraint": "penalty", "rho": 0.3, "nu": 3.0, "mu": 1.0, "max_doublings": 40, "w_metric": "gram",
    "a_metric": "gram", "output": "exact", "output_curvature": 0.1,
}
TIAM_INERTIA = {"p_schedule": "fista", "p1": 0.0, "p2": 0.0}


def _problem(n: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A learnable full batch: labels of a random linear rule (the tuned μ is sized for many samples, so a
    handful of random labels would be dominated by the weight regulariser)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    rule = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return x, (x @ rule).argmax(1), torch.arange(n)


def _model(activation: str = "relu") -> torch.nn.Sequential:
    torch.manual_seed(1)
    return mlp("6-5-4-3", activation=activation).double()


def test_the_tuned_setting_is_the_default() -> None:
    tiam, am = get("tiam")(_model()), get("am")(_model())
    assert tiam.preset == am.preset == "tuned"
    assert {k: tiam.hparams[k] for k in {**TUNED, **TIAM_INERTIA}} == {**TUNED, **TIAM_INERTIA}
    assert tiam.hparams["p3"] > 0  # the third inertia is switched on; 'fista' sets its value per iteration
    assert {k: am.hparams[k] for k in TUNED} == TUNED
    assert (am.hparams["p1"], am.hparams["p2"], am.hparams["p3"]) == (0.0, 0.0, 0.0)


def test_am_shares_tiams_presets_without_the_inertia() -> None:
    model = _model()
    for preset in ("tuned", "paper"):
        tiam, am = get("tiam")(model, preset=preset), get("am")(model, preset=preset)
        differ = {k for k in tiam.hparams if tiam.hparams[k] != am.hparams[k]}
        assert differ <= {*INERTIA_FIELDS, "p_schedule"}, differ
    assert get("am").preset_values("paper", model) == {k: v for k, v in PAPER.items() if k not in INERTIA_FIELDS}


def test_paper_preset_is_the_specifications_configuration() -> None:
    method = get("tiam")(_model(), preset="paper")
    assert {k: method.hparams[k] for k in PAPER} == PAPER
    # the fields the presets leave alone keep the specification's values as well (mDLAM's ε schedule, θ0, ×2)
    assert (method.hparams["eps0"], method.hparams["eps_decay"], method.hparams["eps_min"]) == (100.0, 0.5, 1e-3)
    assert (method.hparams["theta0"], method.hparams["backtrack_factor"]) == (1.0, 2.0)
    x, y, idx = _problem()
    assert torch.isfinite(torch.tensor(method.step(x, y, idx=idx).loss))


def test_tiam_without_inertia_is_am_under_the_tuned_defaults() -> None:
    """TIAM with p3 = 0 runs AM's iteration bit for bit: the 'fista' schedule only scales inertias switched on."""
    x, y, idx = _problem()
    tiam, am = get("tiam")(_model(), p3=0.0), get("am")(_model())
    for k in range(4):
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(k))
        s1, s2 = tiam.step(x[perm], y[perm], idx=perm), am.step(x[perm], y[perm], idx=perm)
        assert s1.loss == s2.loss and s1.info == s2.info
    for p1, p2 in zip(tiam.model.parameters(), am.model.parameters(), strict=True):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("name", ["tiam", "am"])
def test_tuned_defaults_train_full_batch(name: str) -> None:
    x, y, idx = _problem()
    method = get(name)(_model())
    losses = [method.step(x, y, idx=idx).loss for _ in range(10)]
    assert losses[-1] < 0.8 * losses[0]


def test_elu_model_gets_the_box_setting_tuned_for_it() -> None:
    """The penalty's z-step has a closed form for ReLU and leaky ReLU only: an ELU model's tuned preset is the box
    setting chosen for ELU (the paper preset with ρ = 0.1, 40 doublings, 'fista'), and an explicit penalty is
    still refused."""
    method = get("tiam")(_model("elu"))
    assert {k: method.hparams[k] for k in BOX_TUNED} == BOX_TUNED
    assert (BOX_TUNED["constraint"], BOX_TUNED["rho"], BOX_TUNED["p_schedule"]) == ("box", 0.1, "fista")
    am = get("am")(_model("elu"))
    assert (am.hparams["constraint"], am.hparams["rho"], am.hparams["p_schedule"], am.hparams["p1"]) == (
        "box", 0.1, "constant", 0.0)
    x, y, idx = _problem()
    losses = [method.step(x, y, idx=idx).loss for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0]
    with pytest.raises(ValueError, match="constraint='penalty' has a closed-form z-step"):
        get("tiam")(_model("elu"), constraint="penalty")
    assert get("tiam").preset_values("tuned", _model()) == {}


def test_explicit_box_constraint_names_the_a_metric_to_change() -> None:
    with pytest.raises(ValueError, match="a_metric='gram' needs constraint='penalty'.*a_metric=identity") as info:
        get("tiam")(_model(), constraint="box")
    assert "\n" not in str(info.value)
    assert get("tiam")(_model(), constraint="box", a_metric="identity").hparams["constraint"] == "box"


@pytest.mark.parametrize("path", [*sorted(CONFIGS.glob("tiam-*.json")), CONFIGS / "demo.json"], ids=lambda p: p.name)
def test_shipped_configs_refer_to_presets_instead_of_repeating_them(path: Path) -> None:
    """No tiam/am row of a shipped config sets a value its preset already gives."""
    config = json.loads(path.read_text())
    settings = config.get("set", {})
    for name in ("tiam", "am"):
        if name not in config["methods"]:
            continue
        preset = settings.get(f"{name}.preset", "tuned")
        resolved = get(name)(_model(), preset=preset).hparams
        repeated = {key for key, value in settings.items() if key.startswith(f"{name}.")
                    and key.split(".", 1)[1] in resolved and resolved[key.split(".", 1)[1]] == value}
        assert not repeated, f"{path.name} repeats preset {preset}: {sorted(repeated)}"
