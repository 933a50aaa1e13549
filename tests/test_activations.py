"""Tests for liftkit.activations: the activation table (docs/methods/conventions.md §5) and the Fenchel–Young penalty
(docs/methods/conventions.md §6)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, special
from torch import nn

from liftkit.activations import (
    ACTIVATIONS,
    Activation,
    activation_from_module,
    get_activation,
    li2,
    penalty_sum,
)

torch.set_num_threads(1)

D = torch.float64
PI2 = math.pi**2

# Every table row, plus non-default parameters (ELU with α > 1 has κ > 1).
ACTS = [get_activation(n) for n in ACTIVATIONS] + [
    get_activation("leaky_relu", 0.3),
    get_activation("elu", 0.5),
    get_activation("elu", 2.0),
]
ACT_IDS = [f"{a.name}-{a.alpha}" if a.alpha is not None else a.name for a in ACTS]
SMOOTH = [a for a in ACTS if not a.cheap_prox]

HYP = settings(max_examples=40, deadline=None)


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def interior_points(act: Activation, n: int = 41) -> torch.Tensor:
    """Points strictly inside dom F, away from kinks at 0."""
    lo, hi = act.domain
    lo = max(lo, -4.0)
    hi = min(hi, 4.0)
    pad = 1e-3 * (hi - lo)
    x = torch.linspace(lo + pad, hi - pad, n, dtype=D)
    return x[x.abs() > 1e-6]


# --------------------------------------------------------------------------------------------------
# Dilogarithm
# --------------------------------------------------------------------------------------------------


def test_li2_known_values() -> None:
    got = li2(t64(1.0, -1.0, 0.5, 0.0))
    want = t64(PI2 / 6, -PI2 / 12, PI2 / 12 - math.log(2) ** 2 / 2, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_li2_matches_spence_on_all_branches() -> None:
    z = torch.cat(
        [
            -torch.logspace(6, 0, 40, dtype=D),  # inversion branch, z ≤ −1
            torch.linspace(-1.0, 0.5, 40, dtype=D),  # series branch
            torch.linspace(0.5, 1.0, 40, dtype=D),  # reflection branch
            t64(-1.0 - 1e-12, 0.5 + 1e-12, 1.0 - 1e-12, 1e-300, -1e-300),
        ]
    )
    ref = torch.from_numpy(special.spence(1.0 - z.numpy()))  # scipy: spence(1 − z) = Li₂(z)
    torch.testing.assert_close(li2(z), ref, rtol=4e-15, atol=4e-15)


@pytest.mark.parametrize("z", [-7.5, -1.3, -0.4, 0.2, 0.7, 0.97])
def test_li2_matches_numerical_integral(z: float) -> None:
    ref, _ = integrate.quad(lambda s: -math.log1p(-s) / s if s != 0 else 1.0, 0.0, z, epsabs=1e-13, limit=200)
    assert abs(li2(t64(z)).item() - ref) < 1e-13


def test_li2_nan_above_one_and_float32() -> None:
    assert torch.isnan(li2(t64(1.5))).all()
    z = torch.linspace(-5, 1, 50, dtype=torch.float32)
    out = li2(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), li2(z.double()), rtol=1e-5, atol=1e-5)


@HYP
@given(st.floats(min_value=1e-6, max_value=1 - 1e-6))
def test_li2_reflection_identity(z: float) -> None:
    lhs = li2(t64(z)) + li2(t64(1 - z))
    rhs = PI2 / 6 - math.log(z) * math.log1p(-z)
    assert abs(lhs.item() - rhs) < 1e-13


@HYP
@given(st.floats(min_value=-1e6, max_value=-1e-6))
def test_li2_inversion_identity(z: float) -> None:
    lhs = li2(t64(z)) + li2(t64(1 / z))
    rhs = -PI2 / 6 - 0.5 * math.log(-z) ** 2
    assert abs(lhs.item() - rhs) < 1e-12 * max(1.0, abs(rhs))


# --------------------------------------------------------------------------------------------------
# The penalty
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_penalty_zero_at_forward_pass(act: Activation) -> None:
    u = torch.linspace(-8.0, 8.0, 401, dtype=D)
    b = act.penalty(u, act.phi(u))
    assert b.abs().max().item() < 1e-10
    assert abs(act.penalty_sum(u, act.phi(u))) < 1e-10 * u.numel()


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_penalty_positive_after_perturbation(act: Activation) -> None:
    g = torch.Generator().manual_seed(1)
    u = torch.linspace(-3.0, 3.0, 301, dtype=D)
    sign = torch.where(torch.rand(u.shape, generator=g, dtype=D) < 0.5, -1.0, 1.0)
    x = act.project(act.phi(u) + 0.05 * sign)
    moved = x != act.phi(u)
    assert moved.sum() > 100
    b = act.penalty(u, x)
    assert (b[moved] > 0).all()
    assert (b >= -1e-14).all()


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_penalty_infinite_outside_domain(act: Activation) -> None:
    lo, hi = act.domain
    outside = [v for v in (lo - 0.5, hi + 0.5) if math.isfinite(v)]
    if not outside:
        pytest.skip("dom F = R")
    x = t64(*outside)
    assert torch.isinf(act.F(x)).all()
    assert torch.isinf(act.penalty(torch.zeros_like(x), x)).all()
    assert torch.isnan(act.inverse(x)).all()


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_grads_match_autograd(act: Activation) -> None:
    x = interior_points(act)
    u = torch.linspace(-2.7, 3.1, x.numel(), dtype=D)
    u.requires_grad_(True)
    x.requires_grad_(True)
    gu, gx = torch.autograd.grad(act.penalty(u, x).sum(), (u, x))
    with torch.no_grad():
        torch.testing.assert_close(gu, act.grad_u(u, x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gx, act.grad_x(u, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_F_derivative_is_inverse(act: Activation) -> None:
    x = interior_points(act).requires_grad_(True)
    (dF,) = torch.autograd.grad(act.F(x).sum(), x)
    torch.testing.assert_close(dF, act.inverse(x.detach()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_F_is_integral_of_inverse(act: Activation) -> None:
    for xv in interior_points(act, 9).tolist():
        ref, _ = integrate.quad(lambda s: act.inverse(t64(s)).item(), 0.0, xv, epsabs=1e-13, epsrel=1e-13)
        assert abs(act.F(t64(xv)).item() - ref) < 1e-9


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_F_star_is_normalised_integral_of_phi(act: Activation) -> None:
    const = act.F(act.phi(t64(0.0))).item()
    for uv in (-6.0, -2.5, -0.7, 0.0, 0.4, 1.3, 5.0):
        integral, _ = integrate.quad(lambda s: act.phi(t64(s)).item(), 0.0, uv, epsabs=1e-13, epsrel=1e-13)
        assert abs(act.F_star(t64(uv)).item() - (integral - const)) < 1e-10


def test_normalising_constants() -> None:
    sig, sp = get_activation("sigmoid"), get_activation("softplus")
    assert abs(sig.F_star(t64(0.0)).item() - math.log(2)) < 1e-15
    assert abs(sp.F_star(t64(0.0)).item() - PI2 / 12) < 1e-15
    assert abs(sig.F(sig.phi(t64(0.0))).item() + math.log(2)) < 1e-15
    assert abs(sp.F(sp.phi(t64(0.0))).item() + PI2 / 12) < 1e-15


def test_softplus_closed_forms_against_li2() -> None:
    sp = get_activation("softplus")
    x = torch.linspace(0.0, 12.0, 97, dtype=D)
    torch.testing.assert_close(sp.F(x), 0.5 * x * x + li2(torch.exp(-x)) - PI2 / 6, rtol=1e-13, atol=1e-13)
    u = torch.linspace(-12.0, 12.0, 97, dtype=D)
    torch.testing.assert_close(sp.F_star(u), -li2(-torch.exp(u)), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_extreme_arguments_stay_finite(act: Activation) -> None:
    u = t64(-800.0, -40.0, 40.0, 800.0)
    assert torch.isfinite(act.F_star(u)).all()
    lo, hi = act.domain
    x = t64(*[v for v in (lo, hi, -1e4, 1e4) if lo <= v <= hi and math.isfinite(v)])
    assert torch.isfinite(act.F(x)).all()
    b = act.penalty(t64(-3.0, 3.0), act.phi(t64(-3.0, 3.0)))
    assert b.abs().max().item() < 1e-12


def test_fenchel_neo_equals_twice_relu_penalty() -> None:
    g = torch.Generator().manual_seed(0)
    U = torch.randn(7, 5, generator=g, dtype=D)
    V = torch.rand(7, 5, generator=g, dtype=D)
    neo = (V * V - 2 * U * V + torch.relu(U) ** 2).sum().item()
    relu = get_activation("relu")
    assert abs(neo - 2 * penalty_sum(relu, U, V)) < 1e-12
    assert penalty_sum(relu, U, V) == relu.penalty_sum(U, V)


@HYP
@given(
    name=st.sampled_from(ACTIVATIONS),
    u=st.floats(min_value=-20, max_value=20),
    frac=st.floats(min_value=0.0, max_value=1.0),
)
def test_penalty_nonnegative_property(name: str, u: float, frac: float) -> None:
    act = get_activation(name)
    lo, hi = act.domain
    lo, hi = max(lo, -25.0), min(hi, 25.0)
    x = lo + frac * (hi - lo)
    b = act.penalty(t64(u), t64(x)).item()
    assert b >= -1e-12 * max(1.0, u * u, x * x)


# --------------------------------------------------------------------------------------------------
# Table properties and the prox
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_kappa_domain_homogeneity(act: Activation) -> None:
    u = torch.linspace(-15.0, 15.0, 6001, dtype=D).requires_grad_(True)
    (d,) = torch.autograd.grad(act.phi(u).sum(), u)
    assert act.kappa - 1e-3 < d.abs().max().item() <= act.kappa + 1e-12
    y = act.phi(torch.linspace(-50.0, 50.0, 1001, dtype=D))
    lo, hi = act.domain
    assert (y >= lo).all() and (y <= hi).all()
    v = torch.linspace(-3.0, 3.0, 61, dtype=D)
    homog = torch.allclose(act.phi(2.5 * v), 2.5 * act.phi(v), rtol=1e-12, atol=1e-12)
    assert homog == act.positively_homogeneous


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_project(act: Activation) -> None:
    x = torch.linspace(-5.0, 5.0, 101, dtype=D)
    p = act.project(x)
    lo, hi = act.domain
    assert (p >= lo).all() and (p <= hi).all()
    torch.testing.assert_close(act.project(p), p)
    inside = (x >= lo) & (x <= hi)
    torch.testing.assert_close(p[inside], x[inside])


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_prox_at_unit_step_is_phi(act: Activation) -> None:
    y = torch.linspace(-6.0, 6.0, 121, dtype=D)
    torch.testing.assert_close(act.prox_f(y, 1.0), act.phi(y), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("t", [0.2, 0.6, 0.95])
def test_prox_matches_bruteforce_minimisation(act: Activation, t: float) -> None:
    def obj(x: float, y: float) -> float:
        xt = t64(x)
        return (t * (act.F(xt) - 0.5 * xt * xt) + 0.5 * (xt - y) ** 2).item()

    ys = [-4.0, -1.5, -0.3, 0.0, 0.2, 0.8, 1.7, 4.0]
    got = act.prox_f(t64(*ys), t)
    for y, xg in zip(ys, got.tolist()):
        lo, hi = act.domain
        lo, hi = max(lo, y - 20.0), min(hi, y + 20.0)
        res = optimize.minimize_scalar(obj, bounds=(lo, hi), args=(y,), method="bounded", options={"xatol": 1e-12})
        assert abs(xg - res.x) < 1e-6, (y, xg, res.x)
        assert obj(xg, y) <= res.fun + 1e-12


@pytest.mark.parametrize("act", SMOOTH, ids=[i for a, i in zip(ACTS, ACT_IDS) if not a.cheap_prox])
def test_prox_solves_root_equation(act: Activation) -> None:
    # t φ⁻¹(x) + (1 − t) x = y away from saturation, where the residual is well conditioned
    t = 0.4
    y = torch.linspace(-1.5, 1.5, 31, dtype=D)
    x = act.prox_f(y, t)
    torch.testing.assert_close(t * act.inverse(x) + (1 - t) * x, y, rtol=1e-12, atol=1e-12)
    assert x.dtype == D


def _bisect_root(act: Activation, y: torch.Tensor, t: float) -> torch.Tensor:
    """Reference: plain bisection on dom F for t φ⁻¹(x) + (1 − t) x = y, down to adjacent floats."""
    lo_d, hi_d = act.domain
    lo = torch.full_like(y, max(lo_d, -1e3))
    hi = torch.full_like(y, min(hi_d, 1e3))
    for _ in range(3000):
        mid = lo + 0.5 * (hi - lo)
        if not ((mid > lo) & (mid < hi)).any():
            break
        below = t * act.inverse(mid) + (1 - t) * mid < y
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return lo + 0.5 * (hi - lo)


@pytest.mark.parametrize("act", SMOOTH, ids=[i for a, i in zip(ACTS, ACT_IDS) if not a.cheap_prox])
@pytest.mark.parametrize("t", [0.05, 0.5, 1.5])
def test_prox_matches_reference_bisection(act: Activation, t: float) -> None:
    y = torch.cat([torch.linspace(-20.0, 20.0, 81, dtype=D), t64(-300.0, 300.0)])
    got = act.prox_f(y, t)
    ref = _bisect_root(act, y, t)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
    lo, hi = act.domain
    assert ((got >= lo) & (got <= hi)).all()


def test_prox_leaky_closed_form_and_errors() -> None:
    act = get_activation("leaky_relu", 0.25)
    y = t64(-2.0, 3.0)
    torch.testing.assert_close(act.prox_f(y, 0.5), t64(-2.0 / (1 + 0.5 * 3.0), 3.0))
    with pytest.raises(ValueError, match="positive"):
        act.prox_f(y, 0.0)
    with pytest.raises(ValueError, match="nonconvex"):
        get_activation("elu", 2.0).prox_f(y, 2.5)  # t ≥ α/(α − 1) = 2


def test_prox_float32_and_saturation() -> None:
    sig = get_activation("sigmoid")
    y = torch.tensor([-60.0, -5.0, 0.0, 5.0, 60.0])
    x = sig.prox_f(y, 0.3)
    assert x.dtype == torch.float32
    assert ((x >= 0) & (x <= 1)).all()
    xd = sig.prox_f(y.double(), 0.3)
    torch.testing.assert_close(x.double(), xd, rtol=1e-5, atol=1e-6)
    assert xd[0].item() > 0.0  # the root is interior even deep in saturation


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_float32_preserved(act: Activation) -> None:
    u = torch.linspace(-2, 2, 11)
    x = act.phi(u)
    for out in (x, act.F(x), act.F_star(u), act.penalty(u, x), act.grad_u(u, x), act.project(u)):
        assert out.dtype == torch.float32
    assert act.penalty(u, x).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------------------
# Construction and torch.nn interop
# --------------------------------------------------------------------------------------------------


def test_get_activation_errors_and_defaults() -> None:
    with pytest.raises(ValueError, match=r"gelu.*identity, relu"):
        get_activation("gelu")
    assert get_activation("leaky_relu").alpha == 0.01
    assert get_activation("elu").alpha == 1.0
    assert get_activation("ReLU") == Activation("relu")
    for name, alpha in [
        ("leaky_relu", 0.0),
        ("leaky_relu", 1.0),
        ("leaky_relu", -0.1),
        ("elu", 0.0),
        ("elu", -1),
    ]:
        with pytest.raises(ValueError, match=name):
            get_activation(name, alpha)
    with pytest.raises(ValueError, match="no alpha"):
        get_activation("relu", 0.5)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_module_round_trip(act: Activation) -> None:
    m = act.module()
    assert activation_from_module(m) == act
    u = torch.linspace(-8.0, 8.0, 81, dtype=D)
    torch.testing.assert_close(m(u), act.phi(u), rtol=1e-12, atol=1e-12)


def test_activation_from_module_non_activations_and_errors() -> None:
    for m in (nn.Linear(2, 3), nn.Conv2d(1, 1, 3), nn.Flatten(), nn.AvgPool2d(2), nn.Dropout()):
        assert activation_from_module(m) is None
    assert activation_from_module(nn.Softplus(beta=1.0, threshold=5.0)) == Activation("softplus")
    assert activation_from_module(nn.ReLU(inplace=True)) == Activation("relu")
    bad: dict[str, nn.Module] = {
        "GELU": nn.GELU(),
        "SiLU": nn.SiLU(),
        "Softplus": nn.Softplus(beta=2.0),
        "Hardtanh": nn.Hardtanh(0.0, 1.0),
        "ReLU6": nn.ReLU6(),
        "LeakyReLU": nn.LeakyReLU(1.5),
        "ELU": nn.ELU(-1.0),
        "PReLU": nn.PReLU(),
        "Softmax": nn.Softmax(dim=1),
    }
    for label, bad_module in bad.items():
        with pytest.raises(ValueError, match=label):
            activation_from_module(bad_module)
    with pytest.raises(ValueError, match="not monotone"):
        activation_from_module(nn.GELU())

    class MyReLU(nn.ReLU):
        pass

    with pytest.raises(ValueError, match="MyReLU"):
        activation_from_module(MyReLU())
