"""LPOM's presets: the ``tuned`` defaults that follow the model's activations, and the ``paper`` setting.

``tuned`` (the default preset): μ_j of linear layer j follows the activation φ_j that layer applies, from
:data:`TUNED_MU` (validation-tuned per activation; docs/methods/lpom.md, "Presets"). A model whose layers all
use one activation gets a single μ, a mixed model one μ per layer. The config default X-schedule (one backward
sweep, T_x = 3) was validated on ReLU nets only: a model with another hidden activation keeps the schedule its
tuning used, :data:`TUNED_SCHEDULE_OTHER` (L forward sweeps of T_x = 5; the bisection prox of sigmoid, tanh, ELU
and softplus converges more slowly). Every other
hyperparameter is the :class:`~liftkit.methods.lpom.LPOMConfig` default.

``paper``: TPAMI's published setting (Li et al., IEEE TPAMI 2021): μ = 2 for classification, μ = 20 for
autoencoders (the journal's sync-LPOM autoencoder experiments), ReLU and MSE being the model's and the loss's
defaults already. Where the paper is silent the preset takes the specification's assumptions: T_x = 20 inner
X-iterations and T_w = 5 accelerated W-steps, forward sweeps, a forward-pass X initialisation; it keeps the
library's pseudo-inverse guard (1e-4 on every layer of an autoencoder) and X-solver choice (numerical
safeguards the paper does not state).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from liftkit.models import as_chain

__all__ = [
    "PAPER_AUTOENCODER_GUARDS",
    "PAPER_AUTOENCODER_MU",
    "PAPER_CLASSIFICATION_MU",
    "PAPER_SCHEDULE",
    "TUNED_MU",
    "TUNED_SCHEDULE_OTHER",
    "TUNED_X_ITERS_OTHER",
    "floor_onehot",
    "preset_values",
]

#: the tuned μ of a layer by the activation it applies (a bare last layer counts as ``identity``)
TUNED_MU: dict[str, float] = {
    "relu": 5.0,
    "leaky_relu": 5.0,
    "sigmoid": 5.0,
    "softplus": 5.0,
    "tanh": 5.0,
    "elu": 5.0,
    "hardtanh": 20.0,
    "identity": 5.0,
}

#: T_x of a model whose hidden activations are not all ReLU (the config default, 3, was validated on ReLU nets)
TUNED_X_ITERS_OTHER = 5
#: the serial X-schedule of such a model: the one its activation's tuning used (L forward sweeps of 5); the
#: config default, one backward sweep, was validated on ReLU nets only
TUNED_SCHEDULE_OTHER: dict[str, Any] = {"x_iters": TUNED_X_ITERS_OTHER, "x_sweep_order": "forward", "x_sweeps": 0}
#: hidden activations validated with the config default X-schedule
X_ITERS_VALIDATED = frozenset({"relu"})

#: TPAMI's μ for classification (MNIST 784-2048³-10, CIFAR-10, ImageNet32; all with ReLU and MSE)
PAPER_CLASSIFICATION_MU = 2.0
#: TPAMI's μ for its (sync-LPOM) autoencoders: ReLU, squared error, batch 100
PAPER_AUTOENCODER_MU = 20.0
#: the guards of an autoencoder's W-steps under the paper preset (assumption): the library's 1e-10 on small
#: batch-side Grams lets the 250 → 500 and 1000 → 784 layers of ae:784-1000-500-250-30 blow up
PAPER_AUTOENCODER_GUARDS: dict[str, Any] = {"ridge_rel": 1e-4, "ridge_rel_feature": 1e-4}
#: the specification's (assumption)s where the paper does not give the schedule
PAPER_SCHEDULE: dict[str, Any] = {
    "x_iters": 20,
    "w_iters": 5,
    "x_sweep_order": "forward",
    "x_sweeps": 0,
    "onehot_off": "zero",
}


def layer_activations(model: nn.Module) -> list[str] | None:
    """The activation name of every linear layer (``identity`` for a bare one), or ``None`` when the model is
    not a chain LPOM can read (the method's constructor then raises its own error)."""
    try:
        chain = as_chain(model, method="lpom", allow_conv=False)
    except ValueError:
        return None
    return [layer.activation.name if layer.activation is not None else "identity" for layer in chain]


def is_autoencoder(model: nn.Module) -> bool:
    """A chain whose output has as many features as its input (a reconstruction model)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return len(linears) > 1 and linears[0].in_features == linears[-1].out_features


def tuned_mu(activations: list[str]) -> float | tuple[float, ...]:
    """μ per layer from :data:`TUNED_MU`; one number when every layer gets the same value."""
    mus = tuple(TUNED_MU[name] for name in activations)
    return mus[0] if len(set(mus)) == 1 else mus


def preset_values(preset: str, model: nn.Module) -> dict[str, Any]:
    """The hyperparameters of ``preset`` for ``model`` (see the module docstring)."""
    if preset == "paper":
        if is_autoencoder(model):
            return {"mu": PAPER_AUTOENCODER_MU, **PAPER_SCHEDULE, **PAPER_AUTOENCODER_GUARDS}
        return {"mu": PAPER_CLASSIFICATION_MU, **PAPER_SCHEDULE}
    activations = layer_activations(model)
    if activations is None:
        return {}
    values: dict[str, Any] = {"mu": tuned_mu(activations)}
    # the hidden X-blocks' solvers work on the activations of every layer but the last
    if not set(activations[:-1]) <= X_ITERS_VALIDATED:
        values.update(TUNED_SCHEDULE_OTHER)
    return values


def floor_onehot(onehot: Tensor, low: float) -> Tensor:
    """One-hot targets with the "off" entries moved to ``low``, the lower end of the output activation's range,
    when that end is finite and not 0 (tanh and hardtanh: −1, ELU: −α); the "on" entries stay 1.

    With MSE to 0/1 targets a tanh, hardtanh or ELU output must hit 0 exactly for every wrong class, a point
    on the linear stretch of φ, so the network can do no better than a linear least-squares classifier there;
    ReLU, sigmoid and softplus saturate at 0 and are left unchanged. The arg-max of the output is unaffected.
    """
    if low == 0.0 or not math.isfinite(low):
        return onehot
    return onehot * (1.0 - low) + low
