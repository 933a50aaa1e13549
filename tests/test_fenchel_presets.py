"""Fenchel's tuned preset for MLPs: the stronger proximal anchors resolved from the model, reaching the W-blocks."""

from __future__ import annotations

import torch

from liftkit.methods import get
from liftkit.methods.fenchel import TUNED_MLP_ANCHORS, FenchelConfig
from liftkit.models import lenet5, mlp

DT = torch.float64


def test_tuned_mlp_gets_the_tuned_anchors_on_every_layer():
    method = get("fenchel")(mlp("6-7-5-3").to(DT))
    assert method.preset == "tuned"
    assert method.hparams["rho_d"] == TUNED_MLP_ANCHORS["rho_d"]
    assert method.hparams["rho_d_output"] == TUNED_MLP_ANCHORS["rho_d_output"]
    hidden, output = TUNED_MLP_ANCHORS["rho_d"], TUNED_MLP_ANCHORS["rho_d_output"]
    assert method.rho_d == [hidden, hidden, output]


def test_tuned_mlp_anchors_differ_from_the_config_defaults():
    # the preset is what makes a default MLP differ from FenchelConfig(); if they matched, the preset were dead
    config = FenchelConfig()
    assert (config.rho_d, config.rho_d_output) != (TUNED_MLP_ANCHORS["rho_d"], TUNED_MLP_ANCHORS["rho_d_output"])


def test_explicit_anchors_override_the_tuned_preset():
    method = get("fenchel")(mlp("6-7-3").to(DT), rho_d=2.0, rho_d_output=None)
    assert method.rho_d == [2.0, 2.0]


def test_convolutional_models_keep_their_own_tuned_anchors():
    method = get("fenchel")(lenet5().to(DT))
    assert method.hparams["rho_d_output"] == 10.0
    assert method.rho_d[0] != TUNED_MLP_ANCHORS["rho_d"]


def test_stronger_anchors_keep_a_step_closer_to_the_start():
    """One step from the same weights and batch moves the weights less under the tuned anchors than under the
    Config defaults (the anchor term ρ_d‖W − W⁰‖² dominates more)."""

    def move(**hp: object) -> float:
        torch.manual_seed(0)
        model = mlp("6-7-3").to(DT)
        start = [p.detach().clone() for p in model.parameters()]
        x, y = torch.randn(12, 6, dtype=DT), torch.randint(0, 3, (12,))
        get("fenchel")(model, **hp).step(x, y)
        return sum(float((p.detach() - s).norm() ** 2) for p, s in zip(model.parameters(), start, strict=True))

    defaults = FenchelConfig()
    assert move() < move(rho_d=defaults.rho_d, rho_d_output=defaults.rho_d_output)
