"""TIAM's and AM's presets: the ``tuned`` defaults and the ``paper`` setting (docs/methods/tiam.md, "Presets").

``tuned`` (the default preset) is the :class:`~liftkit.methods.tiam.config.TIAMConfig` defaults: the full-batch
setting chosen on the MNIST validation split (784-100-100-10 ReLU, 200 iterations): the activation penalty
(ν/2)‖a_l − h(z_l)‖² instead of the box C_l(ε), ρ = 0.3, ν = 3, μ = 1, the W and a steps in their Gram metrics,
the exact output (cross-entropy on the auxiliary chain's logits) with curvature c = 0.1, up to 40 θ-doublings,
and for TIAM only the third inertia on the FISTA-like schedule (p1 = p2 = 0). The penalty's z-step has a closed
form for ReLU and leaky ReLU only, so a model with another hidden activation (ELU) gets the setting chosen for
ELU on validation data instead: the ``paper`` preset with ρ = 0.1, up to 40 θ-doublings and the FISTA-like
schedule for every inertia.

``paper``: the specification's reconstruction of Yan, Xu, Wang, Peng (arXiv 2503.08489) on mDLAM's base (Wang,
Li, Zhao, Neurocomputing 2022). The TIAM paper states the template (the three inertias, Euclidean backtracking
steps without matrix inversion, full batch) but no constant; ρ = 1e-3, μ = 0.05, the ε schedule, the box
constraint, the z_L penalty and the backtracking (θ0 = 1, ×2, ≤ 10 doublings) are mDLAM's official code; the
constant p1 = p2 = p3 = 0.3 is an assumption. ν (1e-3) is listed so that the preset is the specification's
configuration in full, although the box constraint does not use it.

``am`` takes the same presets without the inertia fields (p1, p2, p3 and their schedule): its p1 = p2 = p3 = 0
by definition, so that TIAM against AM on one preset measures what the acceleration adds on the same base.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from liftkit.models import as_chain

__all__ = ["BOX_TUNED", "INERTIA_FIELDS", "PAPER", "PENALTY_ACTIVATIONS", "SUPPORTED_ACTIVATIONS", "preset_values"]

#: hidden activations TIAM trains, and those the penalty constraint's closed-form z-step covers
SUPPORTED_ACTIVATIONS = ("relu", "leaky_relu", "elu")
PENALTY_ACTIVATIONS = ("relu", "leaky_relu")

#: the specification's values of every field whose tuned default differs (see the module docstring)
PAPER: dict[str, Any] = {
    "rho": 1e-3,
    "nu": 1e-3,
    "mu": 0.05,
    "constraint": "box",
    "max_doublings": 10,
    "w_metric": "identity",
    "a_metric": "identity",
    "output": "penalty",
    "output_curvature": 0.5,
    "p_schedule": "constant",
    "p1": 0.3,
    "p2": 0.3,
    "p3": 0.3,
}

#: the fields AM fixes (p1 = p2 = p3 = 0, nothing to schedule) and therefore leaves out of its presets
INERTIA_FIELDS = ("p1", "p2", "p3", "p_schedule")

#: the tuned preset of a model with a hidden activation outside PENALTY_ACTIVATIONS (ELU): the box constraint,
#: chosen for ELU on validation data (docs/methods/tiam.md, "Presets")
BOX_TUNED: dict[str, Any] = {**PAPER, "rho": 0.1, "max_doublings": 40, "p_schedule": "fista"}


def preset_values(preset: str, model: nn.Module, *, inertia: bool = True) -> dict[str, Any]:
    """The hyperparameters of ``preset`` for ``model`` that differ from the Config defaults; ``inertia=False``
    (AM) leaves out the inertia fields."""
    if preset == "paper":
        values = dict(PAPER)
    else:
        activations = _hidden_activations(model)
        penalty_ok = activations is None or all(name in PENALTY_ACTIVATIONS for name in activations)
        values = {} if penalty_ok else dict(BOX_TUNED)
    if not inertia:
        values = {k: v for k, v in values.items() if k not in INERTIA_FIELDS}
    return values


def _hidden_activations(model: nn.Module) -> list[str] | None:
    """The hidden layers' activation names, or ``None`` when TIAM cannot read the model as a chain (its
    constructor then raises its own error)."""
    try:
        chain = as_chain(model, method="tiam", allowed_activations=SUPPORTED_ACTIVATIONS, require_bias=True)
    except ValueError:
        return None
    return [layer.activation.name for layer in chain[:-1] if layer.activation is not None]
