"""The contract-test database: for every registered method, the configurations that take distinct code paths
and the invalid ones with the message they must raise.

Generic tests (``tests/test_contract.py``) run every entry: the loss decreases on a tiny problem, a state
round trip continues bit-identically, and every invalid configuration raises ``ValueError`` matching its
message. Adding a switch to a method is one line here. Per-method test files keep only what is specific to the
method (reference solutions, oracles). Modelled on torch's ``common_optimizers`` (``OptimizerInfo`` with its
``ErrorOptimizerInput``s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from liftkit.methods import available


@dataclass(frozen=True)
class Variant:
    """A valid configuration. ``shrink``: the tiny problem's loss must fall below this fraction of its start
    (methods whose progress per step is modest by design, such as mini-batch TIAM, get a weaker bound)."""

    hparams: dict[str, Any] = field(default_factory=dict)
    shrink: float = 0.9
    id: str = ""


@dataclass(frozen=True)
class Invalid:
    """An invalid configuration and a regex its ``ValueError`` message must match."""

    hparams: dict[str, Any]
    message: str


@dataclass(frozen=True)
class MethodInfo:
    name: str
    variants: tuple[Variant, ...]
    invalid: tuple[Invalid, ...]


def _v(shrink: float = 0.9, id: str = "", **hparams: Any) -> Variant:
    return Variant(hparams=hparams, shrink=shrink, id=id)


def _bad(message: str, **hparams: Any) -> Invalid:
    return Invalid(hparams=hparams, message=message)


_POSITIVE = "must be a positive finite number"
_NONNEG = "must be a non-negative finite number"
_INT1 = "must be an integer >= 1"


def _choice(name: str, value: str) -> Invalid:
    return _bad(rf"{name} must be one of .*; got '{value}'", **{name: value})


def _unknown(method: str) -> Invalid:
    return _bad(rf"unknown hyperparameter 'no_such_key' for method {method}; valid keys: ", no_such_key=1)


DATABASE: tuple[MethodInfo, ...] = (
    MethodInfo(
        "sgd",
        (_v(), _v(momentum=0.9, nesterov=True, weight_decay=1e-4, id="nesterov-wd")),
        (_bad(f"lr {_POSITIVE}", lr=0.0), _bad(f"momentum {_NONNEG}", momentum=-0.1), _unknown("sgd")),
    ),
    MethodInfo(
        "adam",
        (_v(), _v(lr=3e-3, weight_decay=1e-4, id="lr-wd")),
        (_bad(f"lr {_POSITIVE}", lr=-1.0), _bad(r"beta1 must be in \[0, 1\)", beta1=1.0), _unknown("adam")),
    ),
    MethodInfo(
        "lbfgs",
        (_v(),),
        (_bad(f"history_size {_INT1}", history_size=0), _unknown("lbfgs")),
    ),
    MethodInfo(
        "fenchel",
        (
            _v(),
            _v(x_solver="pgd", w_solver="fista", id="pgd-fista"),
            _v(w_solver="lbfgs", alternations=1, monitor="full", monitor_every=1, id="lbfgs-full-monitor"),
            _v(rho_d=(1.0, 5.0), rho_d_output=None, lbd_coef=0.5, init="official", id="per-layer-official-init"),
            _v(solve_dtype="float32", power_iters_warm=2, id="float32-solve"),
        ),
        (
            _bad(f"lambdas {_POSITIVE}", lambdas=-1.0),
            _bad("rho_d must be non-negative finite numbers", rho_d=-0.5),
            _bad(f"rho {_NONNEG}", rho=math.nan),
            _bad(f"lbd_coef {_POSITIVE}", lbd_coef=0.0),
            _bad(f"alternations {_INT1}", alternations=0),
            _bad(f"x_iters {_INT1}", x_iters=0),
            _choice("x_solver", "newton"),
            _choice("w_solver", "adam"),
            _choice("init", "xavier"),
            _choice("monitor", "all"),
            _choice("solve_dtype", "float16"),
            _bad(f"power_iters_warm {_INT1}", power_iters_warm=0),
            _bad(f"monitor_every {_INT1}", monitor_every=0),
            _bad(r"rho_d has 4 values but this model needs 1 or 2 \(one per weight layer", rho_d=(1.0, 2.0, 3.0, 4.0)),
            _bad(r"lambdas has 3 values but this model needs 1 or 1", lambdas=(1.0, 2.0, 3.0)),
            _unknown("fenchel"),
        ),
    ),
    MethodInfo(
        "lpom",
        (
            _v(),
            _v(x_sweep_order="backward", id="backward"),
            _v(x_solver="fista_prox", pinv="svd", id="fista-prox-svd"),
            _v(x_init="persistent", id="persistent"),
            _v(mu=(5.0, 20.0), id="per-layer-mu"),
            _v(monitor="full", monitor_every=1, id="full-monitor-every-step"),
        ),
        (
            _bad(f"mu {_POSITIVE}", mu=0.0),
            _bad(f"mu {_POSITIVE}", mu=-1.0),
            _bad("mu has 3 values but the model has 2 linear layers; give one value or 2", mu=(1.0, 2.0, 3.0)),
            _bad(f"x_iters {_INT1}", x_iters=0),
            _bad(f"ridge_rel {_POSITIVE}", ridge_rel=0.0),
            _choice("x_solver", "newton"),
            _choice("x_sweep_order", "random"),
            _choice("pinv", "qr"),
            _choice("x_init", "zeros"),
            _bad(f"monitor_every {_INT1}", monitor_every=0),
            _unknown("lpom"),
        ),
    ),
    MethodInfo(
        "lpom-sync",
        (_v(), _v(workers=2, id="two-workers"), _v(momentum=0.5, id="momentum")),
        (
            _bad(f"workers {_INT1}", workers=0),
            _bad(r"momentum must be in \[0, 1\)", momentum=1.0),
            _choice("x_solver", "cg"),
            _unknown("lpom-sync"),
        ),
    ),
    MethodInfo(
        "lpom-async",
        (
            _v(),
            _v(mode="simulate", staleness=2, gamma=0.5, gamma_growth=3.0, id="simulate-stale"),
        ),
        (
            _bad(f"workers {_INT1}", workers=0),
            _bad(f"gamma {_NONNEG}", gamma=-1.0),
            _bad("staleness must be an integer >= -1", staleness=-2),
            _bad(f"mu {_POSITIVE}", mu=0.0),
            _choice("mode", "mpi"),
            _unknown("lpom-async"),
        ),
    ),
    MethodInfo(
        "proxprop",
        (
            _v(),
            _v(optimizer="sgd", lr=0.5, momentum=0.95, nesterov=True, solver="cg3", id="sgd-nesterov-cg3"),
            _v(optimizer="rmsprop", lr=1e-3, momentum=0.5, id="rmsprop"),
            _v(solver="cg", cg_stop="fixed", cg_iters=4, id="cg-fixed"),
            _v(form="push_through", id="push-through"),
            _v(form="gram", solve_dtype="float64", diagnostics_every=1, id="gram-float64-diagnose-every-step"),
        ),
        (
            _bad("solver must be exact, cg, cgN", solver="lu"),
            _bad("solver 'cg0' needs at least one CG iteration", solver="cg0"),
            _bad(f"tau_theta {_POSITIVE}", tau_theta=0.0),
            _bad(f"tau_theta {_POSITIVE}", tau_theta=math.inf),
            _bad(f"lr {_POSITIVE}", lr=-1.0),
            _bad(f"cg_iters {_INT1}", cg_iters=0),
            _choice("cg_stop", "never"),
            _choice("form", "qr"),
            _choice("solve_dtype", "float16"),
            _bad(f"diagnostics_every {_INT1}", diagnostics_every=0),
            _bad("optimizer 'nope' is not a torch.optim optimizer", optimizer="nope"),
            _bad("optimizer lbfgs needs a loss closure", optimizer="lbfgs"),
            _bad("optimizer adam does not take momentum", momentum=0.9),
            _bad("nesterov=true needs momentum > 0", optimizer="sgd", nesterov=True),
            _bad("optimizer sgd does not take beta1", optimizer="sgd", beta1=0.5),
            _bad(r"momentum must be in \[0, 1\)", optimizer="sgd", momentum=1.0),
            _unknown("proxprop"),
        ),
    ),
    MethodInfo(
        "sibp",
        (
            _v(),
            _v(hidden_solver="gn_exact", output_solver="fr_cg", id="gn-exact-fr-cg"),
            _v(hidden_solver="fr_cg", quirks="official", b_mask="old", id="official-quirks"),
            _v(eta=0.2, lambda_w=(1.0, 0.5), id="per-layer-lambda"),
        ),
        (
            _bad(f"eta {_NONNEG}", eta=-0.1),
            _bad(f"eta {_NONNEG}", eta=math.nan),
            _bad(f"lambda_w {_POSITIVE}", lambda_w=0.0),
            _bad(f"lambda_b {_POSITIVE}", lambda_b=-1.0),
            _bad("lambda_w", lambda_w=(1.0, 2.0, 3.0)),
            _bad(f"cg_iters {_INT1}", cg_iters=0),
            _bad(f"cg_tol {_POSITIVE}", cg_tol=0.0),
            _choice("hidden_solver", "newton"),
            _choice("output_solver", "gn_cg"),
            _choice("quirks", "matlab"),
            _choice("b_mask", "new"),
            _unknown("sibp"),
        ),
    ),
    # TIAM / AM: the defaults are the tuned full-batch setting; the other variants pin the specification's
    # configuration (preset paper) and switch one code path each, as they did when it was the default
    MethodInfo(
        "tiam",
        (
            _v(),
            _v(preset="paper", id="paper"),
            _v(preset="paper", history="raw", id="raw-history"),
            _v(preset="paper", mode="minibatch", minibatch_sweeps=2, shrink=0.99, id="minibatch"),
            _v(preset="paper", p_schedule="fista", constraint="penalty", id="fista-penalty"),
            _v(preset="paper", p_schedule="fista", constraint="penalty", w_metric="gram", a_metric="gram",
               id="gram-metrics"),
            _v(preset="paper", w_metric="diagonal", id="diagonal-metric"),
            _v(preset="paper", constraint="penalty", penalty_growth=1.3, penalty_growth_max=2.0, id="continuation"),
            _v(preset="paper", constraint="penalty", rho_output=3.0, w_metric="gram", a_metric="gram",
               id="rho-output"),
            _v(preset="paper", output="exact", history="raw", block_order="backward", w_metric="diagonal",
               id="exact-backward"),
            _v(preset="paper", output="exact", constraint="penalty", mu=1.0, output_curvature=0.1, resync_every=3,
               id="exact-resync"),
        ),
        (
            _bad(r"p1 must lie in \[0, 1\)", p1=1.0),
            _bad(r"p2 must lie in \[0, 1\)", p2=-0.1),
            _bad(r"p3 must lie in \[0, 1\)", p3=1.5),
            _bad(f"rho {_POSITIVE}", rho=0.0),
            _bad(f"rho {_POSITIVE}", rho=-1.0),
            _bad(f"rho_output {_POSITIVE}", rho_output=0.0),
            _bad(f"rho_output {_POSITIVE}", rho_output=math.nan),
            _bad("output='exact' has no z_L block", output="exact", rho_output=2.0),
            _bad("output='exact' has no z_L block", output="exact", zL_solver="fista"),
            _bad("output='exact' has no z_L block", rho_output=2.0),
            _bad(f"output_curvature {_POSITIVE}", output_curvature=0.0),
            _bad("resync_every must be an integer >= 0", resync_every=-1),
            _bad("resync_every applies to full-batch mode", resync_every=5, mode="minibatch"),
            _bad(f"nu {_POSITIVE}", nu=0.0),
            _bad(f"mu {_NONNEG}", mu=-0.1),
            _bad(f"eps0 {_POSITIVE}", eps0=0.0),
            _bad("backtrack_factor must be a finite number > 1", backtrack_factor=1.0),
            _bad("backtrack_factor must be a finite number > 1", backtrack_factor=math.inf),
            _bad("penalty_growth must be a finite number >= 1", penalty_growth=0.9),
            _bad("penalty_growth must be a finite number >= 1", penalty_growth=math.inf),
            _bad("penalty_growth_max must be a finite number >= 1", penalty_growth_max=0.5),
            _bad("a_metric='gram' needs constraint='penalty'", constraint="box"),
            _bad("a_metric='gram' needs constraint='penalty'", preset="paper", a_metric="gram"),
            _choice("output", "identity"),
            _choice("block_order", "random"),
            _choice("history", "bogus"),
            _choice("p_schedule", "nesterov"),
            _choice("constraint", "hard"),
            _choice("w_metric", "newton"),
            _choice("a_metric", "diagonal"),
            _unknown("tiam"),
        ),
    ),
    MethodInfo(
        "am",
        (
            _v(),
            _v(preset="paper", id="paper"),
            _v(preset="paper", output="exact", constraint="penalty", mu=1.0, id="exact-output"),
        ),
        (_bad("am has p1 = p2 = p3 = 0 by definition; use method tiam for inertia", p1=0.3), _unknown("am")),
    ),
)

INFOS = {info.name: info for info in DATABASE}


def missing_methods() -> list[str]:
    """Registered methods without an entry (a new method must add one)."""
    return sorted(set(available()) - set(INFOS))
