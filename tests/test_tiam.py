"""TIAM / AM: block updates against references (docs/methods/tiam.md §8 oracles), invariants and errors.

The tests construct the methods in the ``paper`` preset (the specification's configuration) plus the
hyperparameters they name: each checks a configuration, and that one stays fixed whatever the defaults are. The
tuned defaults and the presets themselves are tested at the end.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from liftkit.activations import Activation, get_activation
from liftkit.methods import get
from liftkit.methods.tiam import AM as _AM
from liftkit.methods.tiam import TIAM as _TIAM
from liftkit.methods.tiam import grad_a, grad_b, grad_ce_sum, grad_w
from liftkit.methods.tiam.blocks import ABlock
from liftkit.methods.tiam.config import penalties_at
from liftkit.methods.tiam.ops import Counters as _Counters
from liftkit.methods.tiam.ops import penalty_z, project_z
from liftkit.methods.tiam.sweep import hidden_activations
from liftkit.models import mlp

torch.use_deterministic_algorithms(True)

TIAM = functools.partial(_TIAM, preset="paper")
AM = functools.partial(_AM, preset="paper")


def _problem(n: int = 24, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _model(spec: str = "6-5-4-3", activation: str = "relu", seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp(spec, activation=activation).double()


def _weights(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


# -- gradients of every smooth part vs autograd (oracle 5) ---------------------------------------------------


def test_block_gradients_match_autograd() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, 4, generator=g, dtype=torch.float64)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    rho, mu = 0.7, 0.3
    S = 0.5 * rho * (z - a @ W.T - b).pow(2).sum() + 0.5 * mu * W.pow(2).sum()
    gW, gb = torch.autograd.grad(S, (W, b))
    torch.testing.assert_close(grad_w(a, z, W.detach(), b.detach(), rho, mu), gW)
    torch.testing.assert_close(grad_b(a, z, W.detach(), b.detach(), rho), gb)
    a_var = a.clone().requires_grad_(True)
    S_a = 0.5 * rho * (z - a_var @ W.detach().T - b.detach()).pow(2).sum()
    (ga,) = torch.autograd.grad(S_a, a_var)
    torch.testing.assert_close(grad_a(a, z, W.detach(), b.detach(), rho), ga)
    logits = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (7,), generator=g)
    onehot = tF.one_hot(y, 3).double()
    (gz,) = torch.autograd.grad(tF.cross_entropy(logits, y, reduction="sum"), logits)
    torch.testing.assert_close(grad_ce_sum(logits.detach(), onehot), gz)


# -- W block: reference backtracking with direct objective evaluation (oracle 4) -----------------------------


def _reference_w_step(
    a: torch.Tensor, z: torch.Tensor, W: torch.Tensor, W_prev: torch.Tensor, b: torch.Tensor, c: dict[str, float]
) -> tuple[torch.Tensor, float]:
    def S(Wv: torch.Tensor) -> float:
        return float(0.5 * c["rho"] * (z - a @ Wv.T - b).pow(2).sum() + 0.5 * c["mu"] * Wv.pow(2).sum())

    delta = W - W_prev
    W_t, W_h = W + c["p1"] * delta, W + c["p2"] * delta
    Wv = W_h.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(0.5 * c["rho"] * (z - a @ Wv.T - b).pow(2).sum() + 0.5 * c["mu"] * Wv.pow(2).sum(), Wv)
    theta = c["theta0"]
    for _ in range(11):
        W_plus = W_t - G / theta
        d = W_plus - W_h
        if S(W_plus) <= S(W_h) + float((G * d).sum()) + 0.5 * theta * float(d.pow(2).sum()) + 1e-12:
            return W_plus + c["p3"] * (W_plus - W), theta
        theta *= 2
    raise AssertionError("reference backtracking failed")


@pytest.mark.parametrize("p", [(0.0, 0.0, 0.0), (0.3, 0.3, 0.3), (0.5, 0.2, 0.4)])
def test_w_block_matches_reference_backtracking(p: tuple[float, float, float]) -> None:
    x, _ = _problem()
    m = _model()
    meth = TIAM(m, p1=p[0], p2=p[1], p3=p[2], theta0=0.1, rho=0.5, mu=0.05)
    layer = meth.chain[0]
    g = torch.Generator().manual_seed(5)
    z = torch.randn(x.shape[0], 5, generator=g, dtype=torch.float64)
    W = layer.weight.detach().clone()
    W_prev = W + 0.1 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    meth.state.W_prev[0] = W_prev.clone()
    b = layer.bias.detach().clone()
    cfg = {"rho": 0.5, "mu": 0.05, "p1": p[0], "p2": p[1], "p3": p[2], "theta0": 0.1}
    expected, theta_ref = _reference_w_step(x, z, W, W_prev, b, cfg)
    cnt = _Counters()
    out = meth._blocks(cnt).w_block(0, x, z, x @ W.T, p)
    assert out is not None
    W_new, P_new, _ = out
    torch.testing.assert_close(W_new, expected)
    torch.testing.assert_close(P_new, x @ W_new.T)  # the product kept by linear combination
    assert meth.state.theta_W[0] == theta_ref
    assert cnt.backtracks == round(math.log2(theta_ref / 0.1))


def test_w_first_trial_accepted_at_lipschitz_bound() -> None:
    x, _ = _problem()
    m = _model()
    rho, mu = 0.5, 0.05
    lipschitz = rho * float(torch.linalg.matrix_norm(x, ord=2)) ** 2 + mu
    meth = TIAM(m, p1=0.0, p2=0.0, p3=0.0, rho=rho, mu=mu, theta0=lipschitz * 1.0001)
    z = torch.randn(x.shape[0], 5, dtype=torch.float64)
    cnt = _Counters()
    assert meth._blocks(cnt).w_block(0, x, z, x @ meth.chain[0].weight.T, (0.0, 0.0, 0.0)) is not None
    assert cnt.backtracks == 0
    # below the bound (θ0 tiny) the step must backtrack, so the counter is not trivially zero
    meth2 = TIAM(_model(), p1=0.0, p2=0.0, p3=0.0, rho=rho, mu=mu, theta0=lipschitz / 64)
    cnt2 = _Counters()
    meth2._blocks(cnt2).w_block(0, x, z, x @ meth2.chain[0].weight.T, (0.0, 0.0, 0.0))
    assert cnt2.backtracks > 0


# -- b block: exact minimiser when p1 = p2 (oracle 2) ---------------------------------------------------------


def test_b_step_exact_minimiser_when_p1_equals_p2() -> None:
    x, _ = _problem()
    meth = TIAM(_model(), p1=0.4, p2=0.4, p3=0.0)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(x.shape[0], 5, generator=g, dtype=torch.float64)
    W = meth.chain[0].weight.detach()
    b = meth.chain[0].bias.detach().clone()
    meth.state.b_prev[0] = b + torch.randn(b.shape, generator=g, dtype=torch.float64)
    b_new, b_raw = meth._blocks().b_step(0, x @ W.T, z, (0.4, 0.4, 0.0), b)
    torch.testing.assert_close(b_new, (z - x @ W.T).mean(dim=0))
    torch.testing.assert_close(grad_b(x, z, W, b_new, 1.0), torch.zeros_like(b_new))
    torch.testing.assert_close(b_raw, b_new)


# -- z and a blocks: projections vs brute force (oracle 3) -----------------------------------------------------


@pytest.mark.parametrize("act_name", ["relu", "leaky_relu", "elu"])
def test_z_projection_matches_brute_force(act_name: str) -> None:
    act = get_activation(act_name)
    meth = TIAM(_model(activation=act_name), projection_margin=0.0)
    g = torch.Generator().manual_seed(11)
    eps = 0.3
    z0 = 2 * torch.randn(40, generator=g, dtype=torch.float64)
    a = act.phi(z0) + eps * (2 * torch.rand(40, generator=g, dtype=torch.float64) - 1)  # feasible a
    w = 3 * torch.randn(40, generator=g, dtype=torch.float64)
    got = project_z(act, w, a, eps, meth.config.projection_margin)
    grid = torch.linspace(-12, 12, 480001, dtype=torch.float64)
    h_grid = act.phi(grid)
    for i in range(40):
        feasible = (h_grid - a[i]).abs() <= eps
        cost = torch.where(feasible, (grid - w[i]).pow(2), torch.inf)
        best = grid[int(cost.argmin())]
        assert abs(float(got[i] - best)) <= 1e-4 + 1e-4 * abs(float(best)), (i, float(got[i]), float(best))
        assert abs(float(act.phi(got[i]) - a[i])) <= eps + 1e-12


@pytest.mark.parametrize("act_name", ["relu", "leaky_relu"])
def test_penalty_z_step_matches_brute_force(act_name: str) -> None:
    act = get_activation(act_name)
    meth = TIAM(_model(activation=act_name), constraint="penalty", rho=0.7, nu=1.3)
    g = torch.Generator().manual_seed(13)
    w = 2 * torch.randn(30, generator=g, dtype=torch.float64)
    a = torch.randn(30, generator=g, dtype=torch.float64)
    got = penalty_z(act, w, a, meth.config.rho, meth.config.nu)
    grid = torch.linspace(-10, 10, 400001, dtype=torch.float64)
    for i in range(30):
        cost = 0.7 * (grid - w[i]).pow(2) + 1.3 * (a[i] - act.phi(grid)).pow(2)
        best = grid[int(cost.argmin())]
        assert abs(float(got[i] - best)) <= 1e-4


@pytest.mark.parametrize("act_name", ["relu", "leaky_relu", "elu"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_iterates_stay_in_constraint_set(act_name: str, p: float) -> None:
    x, y = _problem(n=30)
    meth = TIAM(_model(activation=act_name), p1=p, p2=p, p3=p, eps0=0.5, rho=0.5)
    idx = torch.arange(30)
    acts = hidden_activations(meth.chain)
    for k in range(12):
        stats = meth.step(x, y, idx=idx[torch.randperm(30)])
        eps = stats.info["eps"]
        assert eps == max(0.5 * 0.5**k, 1e-3)
        for l, act in enumerate(acts):
            gap = (meth.state.a[l] - act.phi(meth.state.z[l])).abs().max()
            assert float(gap) <= eps + 1e-12


def test_a_step_acceptance_holds_and_matches_long_run_solve() -> None:
    """a-block: the accepted θ satisfies the sufficient-decrease inequality, and iterating the p = 0 step
    converges to the minimiser of the box-constrained least-squares subproblem (dense projected-gradient
    reference with step 1/L)."""
    x, _y = _problem()
    meth = TIAM(_model(), p1=0.0, p2=0.0, p3=0.0, rho=0.9, theta0=0.05)
    act = hidden_activations(meth.chain)[0]
    g = torch.Generator().manual_seed(17)
    z_l = torch.randn(x.shape[0], 5, generator=g, dtype=torch.float64)
    a = act.phi(z_l)
    nxt = meth.chain[1]
    W_n, b_n = nxt.weight.detach(), nxt.bias.detach()
    z_n = torch.randn(x.shape[0], 4, generator=g, dtype=torch.float64)
    eps = 0.2
    cnt = _Counters()
    zero = torch.zeros_like(a)
    out = meth._blocks(cnt).a_step(0, a, (0.0, 0.0, 0.0), zero, ABlock(act, z_l, W_n, b_n, z_n, eps))
    assert out is not None
    theta = meth.state.theta_a[0]

    def S(u: torch.Tensor) -> float:
        return float(0.5 * 0.9 * (z_n - u @ W_n.T - b_n).pow(2).sum())

    d = out.raw - a
    G = grad_a(a, z_n, W_n, b_n, 0.9)
    assert S(out.raw) <= S(a) + float((G * d).sum()) + 0.5 * theta * float(d.pow(2).sum()) + 1e-12
    assert cnt.backtracks > 0  # θ0 = 0.05 is below the Lipschitz bound here
    # long run of the block step vs an independent projected gradient with the exact Lipschitz step
    u = a
    for _ in range(3000):
        res = meth._blocks().a_step(0, u, (0.0, 0.0, 0.0), zero, ABlock(act, z_l, W_n, b_n, z_n, eps))
        assert res is not None
        u = res.new
    L = 0.9 * float(torch.linalg.matrix_norm(W_n, ord=2)) ** 2
    ref = a.clone()
    hz = act.phi(z_l)
    for _ in range(6000):
        ref = torch.clamp(ref - grad_a(ref, z_n, W_n, b_n, 0.9) / L, hz - eps, hz + eps)
    torch.testing.assert_close(u, ref, atol=1e-5, rtol=0)


def test_zL_step_is_prox_gradient_and_long_run_minimises_subproblem() -> None:
    x, y = _problem()
    meth = TIAM(_model(), p1=0.0, p2=0.0, p3=0.0, rho=0.3)
    onehot = tF.one_hot(y, 3).double()
    g = torch.Generator().manual_seed(19)
    v = torch.randn(x.shape[0], 3, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape[0], 3, generator=g, dtype=torch.float64)
    zero = torch.zeros_like(z)
    out = meth._blocks().zL_step(z, (0.0, 0.0, 0.0), zero, v, onehot)
    assert out is not None
    theta = meth.state.theta_zL
    expected = (theta * (z - grad_ce_sum(z, onehot) / theta) + 0.3 * v) / (theta + 0.3)
    torch.testing.assert_close(out.new, expected)
    u = z
    for _ in range(400):
        res = meth._blocks().zL_step(u, (0.0, 0.0, 0.0), zero, v, onehot)
        assert res is not None
        u = res.new
    # optimality of CE_sum(z) + (ρ/2)‖z − v‖²
    torch.testing.assert_close(grad_ce_sum(u, onehot) + 0.3 * (u - v), torch.zeros_like(u), atol=1e-8, rtol=0)


# -- one AM iteration against an independent implementation (oracle 1) ---------------------------------------


def _reference_am_iteration(
    x: torch.Tensor,
    onehot: torch.Tensor,
    Ws: list[torch.Tensor],
    bs: list[torch.Tensor],
    z: list[torch.Tensor],
    a: list[torch.Tensor],
    rho: float,
    mu: float,
    eps: float,
    margin: float,
    rho_out: float | None = None,
    order: str = "forward",
    output: str = "penalty",
) -> None:
    """p = 0, ReLU, box constraint, prox-step z_L; plain formulas, direct objective evaluation. ``rho_out``: the
    output layer's penalty weight (ρ when None). ``order``: forward (l = 1..L: W, b, z, a) or backward
    (l = L..1: z_l, W_l, b_l, a_{l−1}). ``output='exact'``: no z_L block; W_L, b_L (metric ½N) and a_{L−1} take
    backtracking steps on CE_sum of the logits a_{L−1}W_Lᵀ + b_L, and z_L is those logits."""
    L = len(Ws)
    rhos = [rho] * (L - 1) + [rho if rho_out is None else rho_out]

    def backtrack(S, grad, prox, u, scale=1.0):  # type: ignore[no-untyped-def]
        theta = 1.0
        for _ in range(11):
            up = prox(u - grad / (theta * scale), theta)
            d = up - u
            if S(up) <= S(u) + float((grad * d).sum()) + 0.5 * theta * scale * float(d.pow(2).sum()) + 1e-9:
                return up
            theta *= 2
        return u

    def ce(logits: torch.Tensor) -> float:
        return float(-(onehot * torch.log_softmax(logits, dim=1)).sum())

    def exact_output_step() -> None:
        l = L - 1

        def S_W(W: torch.Tensor) -> float:
            return ce(a_in(l) @ W.T + bs[l]) + 0.5 * mu * float(W.pow(2).sum())

        G = (torch.softmax(a_in(l) @ Ws[l].T + bs[l], dim=1) - onehot).T @ a_in(l) + mu * Ws[l]
        Ws[l] = backtrack(S_W, G, lambda w, t: w, Ws[l])
        P = a_in(l) @ Ws[l].T
        Gb = (torch.softmax(P + bs[l], dim=1) - onehot).sum(dim=0)
        bs[l] = backtrack(lambda u: ce(P + u), Gb, lambda w, t: w, bs[l], scale=0.5 * x.shape[0])

    def a_in(l: int) -> torch.Tensor:
        return x if l == 0 else a[l - 1]

    def w_and_b_step(l: int) -> None:
        rho_l = rhos[l]

        def S_W(W: torch.Tensor) -> float:
            return float(0.5 * rho_l * (z[l] - a_in(l) @ W.T - bs[l]).pow(2).sum() + 0.5 * mu * W.pow(2).sum())

        G = rho_l * (a_in(l) @ Ws[l].T + bs[l] - z[l]).T @ a_in(l) + mu * Ws[l]
        Ws[l] = backtrack(S_W, G, lambda w, t: w, Ws[l])
        bs[l] = (z[l] - a_in(l) @ Ws[l].T).mean(dim=0)

    def z_step(l: int) -> None:
        v = a_in(l) @ Ws[l].T + bs[l]
        if l < L - 1:
            zz = torch.minimum(v, a[l] + eps - margin)
            lo = a[l] - eps + margin
            z[l] = torch.where(lo > 0, torch.maximum(zz, lo), zz)
            return
        Gz = torch.softmax(z[l], dim=1) - onehot

        def S_z(u: torch.Tensor) -> float:
            return float(-(onehot * torch.log_softmax(u, dim=1)).sum())

        rho_l = rhos[l]
        z[l] = backtrack(S_z, Gz, lambda w, t: (t * w + rho_l * v) / (t + rho_l), z[l])

    def a_step(l: int) -> None:
        Wn, bn, zn, rho_n = Ws[l + 1], bs[l + 1], z[l + 1], rhos[l + 1]  # a_l enters F through layer l + 1
        hz = torch.relu(z[l])

        def S_a(u: torch.Tensor) -> float:
            if output == "exact" and l + 1 == L - 1:
                return ce(u @ Wn.T + bn)
            return float(0.5 * rho_n * (zn - u @ Wn.T - bn).pow(2).sum())

        if output == "exact" and l + 1 == L - 1:
            Ga = (torch.softmax(a[l] @ Wn.T + bn, dim=1) - onehot) @ Wn
        else:
            Ga = rho_n * (a[l] @ Wn.T + bn - zn) @ Wn
        a[l] = backtrack(S_a, Ga, lambda w, t: torch.clamp(w, hz - eps + margin, hz + eps - margin), a[l])

    def exact(l: int) -> bool:
        return output == "exact" and l == L - 1

    if order == "forward":
        for l in range(L):
            if exact(l):
                exact_output_step()
                continue
            w_and_b_step(l)
            z_step(l)
            if l < L - 1:
                a_step(l)
    else:
        for l in reversed(range(L)):
            if exact(l):
                exact_output_step()
            else:
                z_step(l)
                w_and_b_step(l)
            if l > 0:
                a_step(l - 1)
    if output == "exact":
        z[L - 1] = a_in(L - 1) @ Ws[L - 1].T + bs[L - 1]


@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize(("rho_out", "output"), [(None, "penalty"), (2.0, "penalty"), (None, "exact")])
def test_am_iteration_matches_independent_reference(rho_out: float | None, output: str, order: str) -> None:
    x, y = _problem(n=20)
    m = _model()
    onehot = tF.one_hot(y, 3).double()
    Ws = [layer.weight.detach().clone() for layer in m if isinstance(layer, nn.Linear)]
    bs = [layer.bias.detach().clone() for layer in m if isinstance(layer, nn.Linear)]
    h = x
    z_ref: list[torch.Tensor] = []
    a_ref: list[torch.Tensor] = []
    for l, (W, b) in enumerate(zip(Ws, bs)):
        u = h @ W.T + b
        z_ref.append(u)
        if l < len(Ws) - 1:
            h = torch.relu(u)
            a_ref.append(h)
    if output == "penalty":
        z_ref[-1] = 2 * onehot - 1
    meth = AM(m, rho=0.5, mu=0.05, eps0=0.4, eps_decay=0.5, rho_output=rho_out, block_order=order, output=output)
    idx = torch.arange(20)
    for k in range(4):
        meth.step(x, y, idx=idx)
        eps = max(0.4 * 0.5**k, 1e-3)
        _reference_am_iteration(x, onehot, Ws, bs, z_ref, a_ref, 0.5, 0.05, eps, 1e-9, rho_out, order, output)
    for W, W_ref in zip([layer.weight for layer in meth.chain], Ws):
        torch.testing.assert_close(W.detach(), W_ref, atol=1e-10, rtol=1e-10)
    for zl, zr in zip(meth.state.z, z_ref):
        torch.testing.assert_close(zl, zr, atol=1e-10, rtol=1e-10)
    for al, ar in zip(meth.state.a, a_ref):
        torch.testing.assert_close(al, ar, atol=1e-10, rtol=1e-10)


# -- objective: reported value, monotonicity with the safeguard (oracle 6) -----------------------------------


def _objective(meth: _TIAM, x: torch.Tensor, y: torch.Tensor) -> float:
    st, c = meth.state, meth.config
    onehot = tF.one_hot(y, st.z[-1].shape[1]).double()
    F = float(-(onehot * torch.log_softmax(st.z[-1], dim=1)).sum())
    for l, layer in enumerate(meth.chain):
        a_in = x if l == 0 else st.a[l - 1]
        rho_l = c.rho_output if (c.rho_output is not None and l == len(meth.chain) - 1) else c.rho
        F += 0.5 * rho_l * float((st.z[l] - a_in @ layer.weight.T - layer.bias).pow(2).sum())
        F += 0.5 * c.mu * float(layer.weight.pow(2).sum())
    return F


@pytest.mark.parametrize(
    ("history", "rho_out", "order"),
    [("extrapolated", None, "forward"), ("raw", None, "forward"), ("extrapolated", 3.0, "forward"),
     ("extrapolated", 3.0, "backward")],
)
def test_objective_non_increasing_with_safeguard_at_fixed_eps(history: str, rho_out: float | None, order: str) -> None:
    x, y = _problem(n=40)
    meth = TIAM(
        _model(), p1=0.7, p2=0.5, p3=0.8, eps0=0.3, eps_decay=1.0, rho=0.5, history=history, rho_output=rho_out,
        block_order=order,
    )
    idx = torch.arange(40)
    meth.step(x, y, idx=idx)
    previous = _objective(meth, x, y)
    restarts = 0.0
    for _ in range(25):
        stats = meth.step(x, y, idx=idx)
        restarts += stats.info["safeguard_restarts"]
        assert stats.info["objective"] == pytest.approx(_objective(meth, x, y), rel=1e-12)
        assert stats.info["objective"] <= previous * (1 + 1e-12)
        previous = stats.info["objective"]
    assert restarts > 0  # the aggressive inertia does trigger the safeguard, so the check is exercised


def test_safeguard_off_can_increase_objective() -> None:
    """Without the safeguard the same aggressive inertia raises F at some iteration: the safeguard matters."""
    x, y = _problem(n=40)
    meth = TIAM(_model(), p1=0.9, p2=0.0, p3=0.9, eps0=0.3, eps_decay=1.0, rho=0.5, safeguard=False)
    idx = torch.arange(40)
    values = [meth.step(x, y, idx=idx).info["objective"] for _ in range(25)]
    assert any(b > a * (1 + 1e-9) for a, b in itertools.pairwise(values))


# -- TIAM(p = 0) is AM, bit for bit ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "minibatch"])
def test_tiam_with_zero_inertia_is_am_bit_identical(mode: str) -> None:
    x, y = _problem(n=32)
    m1, m2 = _model(), _model()
    t = TIAM(m1, p1=0.0, p2=0.0, p3=0.0, mode=mode)
    am = get("am")(m2, preset="paper", mode=mode)
    for k in range(5):
        idx = torch.randperm(32, generator=torch.Generator().manual_seed(k))
        s1, s2 = t.step(x[idx], y[idx], idx=idx), am.step(x[idx], y[idx], idx=idx)
        assert s1.loss == s2.loss and s1.info == s2.info
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_inertia_changes_the_iterates() -> None:
    x, y = _problem(n=32)
    m1, m2 = _model(), _model()
    t, am = TIAM(m1), AM(m2)
    idx = torch.arange(32)
    for _ in range(3):
        t.step(x, y, idx=idx)
        am.step(x, y, idx=idx)
    assert not torch.equal(m1[1].weight, m2[1].weight)


# -- modes, state round trip -------------------------------------------------------------------------------------


def test_full_mode_keeps_aux_aligned_to_samples_under_shuffling() -> None:
    x, y = _problem(n=32)
    m1, m2 = _model(), _model()
    ordered, shuffled = TIAM(m1), TIAM(m2)
    for k in range(4):
        perm = torch.randperm(32, generator=torch.Generator().manual_seed(k))
        ordered.step(x, y, idx=torch.arange(32))
        shuffled.step(x[perm], y[perm], idx=perm)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-10, rtol=1e-10)
    for z1, z2 in zip(ordered.state.z, shuffled.state.z):
        torch.testing.assert_close(z1, z2, atol=1e-10, rtol=1e-10)


def test_auto_mode_picks_minibatch_for_partial_batches() -> None:
    x, y = _problem(n=32)
    meth = TIAM(_model())
    assert meth.step(x[:8], y[:8], idx=torch.arange(8, 16)).info["full_batch"] == 0.0
    assert meth.step(x, y, idx=torch.arange(32)).info["full_batch"] == 1.0
    assert meth.step(x[:8], y[:8]).info["full_batch"] == 0.0


@pytest.mark.parametrize(
    "hp",
    [{}, {"output": "exact", "constraint": "penalty", "nu": 1.0, "block_order": "backward"}],
    ids=["penalty-output", "exact-output-backward"],
)
def test_minibatch_training_lowers_loss(hp: dict[str, object]) -> None:
    """Mini-batch mode (fresh auxiliaries per batch) on a learnable problem. Its progress is modest (the
    label information reaches only the top layers within a batch's sweeps), so only a decrease is asserted."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = (x[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)).argmax(1)
    meth = TIAM(_model(), mode="minibatch", minibatch_sweeps=3, rho=0.1, mu=0.0, max_doublings=30, **hp)
    first = float(meth.batch_loss(x, y))
    for k in range(40):
        sl = slice((k % 4) * 16, (k % 4) * 16 + 16)
        assert meth.step(x[sl], y[sl], idx=torch.arange(64)[sl]).info["full_batch"] == 0.0
    assert float(meth.batch_loss(x, y)) < 0.97 * first


# -- clear errors -----------------------------------------------------------------------------------------------------


def test_am_rejects_inertia() -> None:
    with pytest.raises(ValueError, match="p1 = p2 = p3 = 0"):
        AM(_model(), p1=0.3)


def test_unsupported_models_raise() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        TIAM(_model(activation="sigmoid"))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="fully connected"):
        TIAM(conv)
    with pytest.raises(ValueError, match="output activation"):
        TIAM(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="penalty"):
        TIAM(_model(activation="elu"), constraint="penalty")
    with pytest.raises(ValueError, match="loss"):
        TIAM(_model(), loss="mse")


def test_bad_inputs_raise() -> None:
    x, y = _problem()
    meth = TIAM(_model())
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        meth.step(bad, y)
    with pytest.raises(ValueError, match="labels"):
        meth.step(x, y + 5)
    with pytest.raises(ValueError, match="samples"):
        meth.step(x, y[:-1])
    with pytest.raises(ValueError, match="integer labels"):
        meth.step(x, y.double())


def test_mdlam_init_draws_normal_weights() -> None:
    torch.manual_seed(0)
    m = mlp("50-200-3").double()
    TIAM(m, init="mdlam")
    w = m[1].weight.detach()
    assert abs(float(w.std()) - 0.1) < 0.01 and abs(float(w.mean())) < 0.01


# -- FISTA-like inertia schedule (docs/methods/tiam.md §4.4) -----------------------------------------------


def test_fista_schedule_follows_the_t_recursion() -> None:
    meth = TIAM(_model(), p_schedule="fista", p2=0.0)
    t = [1.0]
    for _ in range(30):
        t.append(0.5 * (1 + math.sqrt(1 + 4 * t[-1] ** 2)))
    for k in range(1, 30):
        pk = (t[k - 1] - 1) / t[k]
        assert meth._inertia(k) == pytest.approx((pk, 0.0, pk), rel=1e-15)  # a switched-off p_i stays 0
    assert meth._inertia(0) == (0.0, 0.0, 0.0)
    assert 0.8 < meth._inertia(29)[0] < 1.0


def test_fista_schedule_keeps_am_unaccelerated_and_objective_monotone() -> None:
    x, y = _problem(n=40)
    idx = torch.arange(40)
    m1, m2 = _model(), _model()
    a1, a2 = AM(m1, p_schedule="fista"), AM(m2)
    for _ in range(4):
        assert a1.step(x, y, idx=idx).info == a2.step(x, y, idx=idx).info
    meth = TIAM(_model(), p_schedule="fista", eps0=0.3, eps_decay=1.0, rho=0.5)
    meth.step(x, y, idx=idx)
    previous = _objective(meth, x, y)
    for _ in range(25):
        value = meth.step(x, y, idx=idx).info["objective"]
        assert value <= previous * (1 + 1e-12)
        previous = value


def _penalty_a_problem(
    **hp: object,
) -> tuple[_TIAM, Activation, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A penalty-constraint a-subproblem (ρ = 0.9, ν = 0.4) on the first hidden layer and its closed-form minimiser
    a* from a*(ρWᵀW + νI) = ρ(z_{l+1} − 1bᵀ)W + νh(z_l): (method, φ, z_l, W_{l+1}, b_{l+1}, z_{l+1}, a*)."""
    x, _y = _problem()
    rho, nu = 0.9, 0.4
    meth = TIAM(_model(), p1=0.0, p2=0.0, p3=0.0, rho=rho, nu=nu, constraint="penalty", **hp)
    act = hidden_activations(meth.chain)[0]
    g = torch.Generator().manual_seed(23)
    z_l = torch.randn(x.shape[0], 5, generator=g, dtype=torch.float64)
    nxt = meth.chain[1]
    W_n, b_n = nxt.weight.detach(), nxt.bias.detach()
    z_n = torch.randn(x.shape[0], 4, generator=g, dtype=torch.float64)
    lhs = rho * W_n.T @ W_n + nu * torch.eye(5, dtype=torch.float64)
    ref = torch.linalg.solve(lhs, (rho * (z_n - b_n) @ W_n + nu * act.phi(z_l)).T).T
    return meth, act, z_l, W_n, b_n, z_n, ref


def test_penalty_a_step_long_run_solves_the_regularised_least_squares() -> None:
    """constraint='penalty': iterating the p = 0 a-block step converges to the closed-form minimiser of
    (ρ/2)‖z_{l+1} − aWᵀ − 1bᵀ‖² + (ν/2)‖a − h(z_l)‖²."""
    meth, act, z_l, W_n, b_n, z_n, ref = _penalty_a_problem()
    zero = torch.zeros_like(z_l)
    u = act.phi(z_l)
    for _ in range(4000):
        res = meth._blocks().a_step(0, u, (0.0, 0.0, 0.0), zero, ABlock(act, z_l, W_n, b_n, z_n, 1e-3))
        assert res is not None
        u = res.new
    torch.testing.assert_close(u, ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elu_projection_stays_finite_below_the_floor(dtype: torch.dtype) -> None:
    """An upper bound a + ε below ELU's floor −α must not map to h⁻¹(−α) = −inf (float32 rounding)."""
    meth = TIAM(_model(activation="elu"))
    act = hidden_activations(meth.chain)[0]
    a = torch.tensor([-1.0 - 1e-3, -0.5, 0.3], dtype=dtype)
    w = torch.tensor([0.0, -3.0, 1.0], dtype=dtype)
    z = project_z(act, w, a, 1e-4, meth.config.projection_margin)
    assert bool(torch.isfinite(z).all())


# -- W and a metrics (w_metric, a_metric; assumption) ---------------------------------------------------------


def _ridge_w(a: torch.Tensor, z: torch.Tensor, b: torch.Tensor, rho: float, mu: float) -> torch.Tensor:
    """argmin_W (ρ/2)‖z − aWᵀ − 1bᵀ‖² + (μ/2)‖W‖² by a dense solve."""
    lhs = rho * a.T @ a + mu * torch.eye(a.shape[1], dtype=a.dtype)
    return torch.linalg.solve(lhs, rho * a.T @ (z - b)).T


@pytest.mark.parametrize("p", [(0.0, 0.0, 0.0), (0.4, 0.4, 0.0)])
def test_gram_w_metric_step_is_the_exact_minimiser(p: tuple[float, float, float]) -> None:
    """In the Gram metric M = ρaᵀa + μI (∇²S_W) the first trial θ = 1 is accepted and, with p1 = p2, it is the
    Newton step on a quadratic: the exact minimiser over W, whatever the gradient point."""
    x, _ = _problem(n=40)
    rho, mu = 0.7, 0.05
    meth = TIAM(_model(), p1=p[0], p2=p[1], p3=p[2], rho=rho, mu=mu, w_metric="gram")
    layer = meth.chain[0]
    g = torch.Generator().manual_seed(8)
    z = torch.randn(x.shape[0], 5, generator=g, dtype=torch.float64)
    W = layer.weight.detach().clone()
    meth.state.W_prev[0] = W + 0.2 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    cnt = _Counters()
    out = meth._blocks(cnt).w_block(0, x, z, x @ W.T, p, meth._blocks().w_metric(0, x, rho))
    assert out is not None
    torch.testing.assert_close(out[0], _ridge_w(x, z, layer.bias.detach(), rho, mu), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out[1], x @ out[0].T)
    assert cnt.backtracks == 0
    # the identity metric (the paper's gradient step) does not reach it in one step
    plain = TIAM(_model(), p1=p[0], p2=p[1], p3=p[2], rho=rho, mu=mu)
    plain.state.W_prev[0] = meth.state.W_prev[0].clone()
    other = plain._blocks().w_block(0, x, z, x @ W.T, p)
    assert other is not None
    assert not torch.allclose(other[0], out[0], atol=1e-3)


def test_diagonal_w_metric_matches_reference_backtracking() -> None:
    """w_metric='diagonal': W⁺ = W̃ − G D⁻¹/θ with D = diag(ρΣa² + μ), accepted at the first θ (doubling from
    θ0) with S(W⁺) ≤ S(Ŵ) + ⟨G, d⟩ + (θ/2)‖d‖²_D; reference by autograd and direct evaluation of S."""
    x, _ = _problem(n=40)
    x = x * torch.linspace(0.1, 5.0, x.shape[1], dtype=torch.float64)  # badly scaled columns
    rho, mu, p = 0.5, 0.05, (0.5, 0.2, 0.3)
    meth = TIAM(_model(), p1=p[0], p2=p[1], p3=p[2], rho=rho, mu=mu, theta0=0.01, w_metric="diagonal")
    layer = meth.chain[0]
    g = torch.Generator().manual_seed(9)
    z = torch.randn(x.shape[0], 5, generator=g, dtype=torch.float64)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    W_prev = W + 0.1 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    meth.state.W_prev[0] = W_prev.clone()

    def S(Wv: torch.Tensor) -> torch.Tensor:
        return 0.5 * rho * (z - x @ Wv.T - b).pow(2).sum() + 0.5 * mu * Wv.pow(2).sum()

    delta = W - W_prev
    W_t, W_h = W + p[0] * delta, W + p[1] * delta
    Wv = W_h.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(S(Wv), Wv)
    D = rho * x.pow(2).sum(0) + mu
    D = D + 1e-10 * float(D.mean() - mu)
    theta = 0.01
    while True:
        W_plus = W_t - G / D / theta
        d = W_plus - W_h
        if float(S(W_plus)) <= float(S(W_h) + (G * d).sum() + 0.5 * theta * (d.pow(2) * D).sum()) + 1e-12:
            break
        theta *= 2
    out = meth._blocks().w_block(0, x, z, x @ W.T, p, meth._blocks().w_metric(0, x, rho))
    assert out is not None
    torch.testing.assert_close(out[2], W_plus)
    torch.testing.assert_close(out[0], W_plus + p[2] * (W_plus - W))
    assert meth.state.theta_W[0] == theta
    assert theta > 0.01  # the check exercised the backtracking


def test_gram_a_metric_step_is_the_exact_penalty_minimiser() -> None:
    """a_metric='gram' (constraint='penalty'): one p = 0 a-step is the closed-form minimiser (the identity metric
    needs thousands of steps, test above)."""
    meth, act, z_l, W_n, b_n, z_n, ref = _penalty_a_problem(a_metric="gram")
    cnt = _Counters()
    blk = ABlock(act, z_l, W_n, b_n, z_n, 1e-3)
    res = meth._blocks(cnt).a_step(0, act.phi(z_l), (0.0, 0.0, 0.0), torch.zeros_like(z_l), blk)
    assert res is not None
    torch.testing.assert_close(res.new, ref, atol=1e-9, rtol=1e-9)
    assert cnt.backtracks == 0


@pytest.mark.parametrize("metrics", [{}, {"w_metric": "gram", "a_metric": "gram"}, {"w_metric": "diagonal"}])
def test_metrics_keep_the_objective_monotone_and_train(metrics: dict[str, str]) -> None:
    """The benchmark setting (penalty + FISTA-like inertia), with each metric: on a tiny learnable problem the
    forward-pass loss falls and the safeguard keeps F monotone."""
    x, _ = _problem(n=90)
    y = (x @ torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).argmax(1)
    meth = TIAM(_model(), constraint="penalty", nu=10.0, rho=1.0, p_schedule="fista", max_doublings=40, **metrics)
    idx = torch.arange(90)
    first = meth.step(x, y, idx=idx)
    values = [meth.step(x, y, idx=idx) for _ in range(40)]
    assert values[-1].loss < 0.5 * first.loss
    objective = [s.info["objective"] for s in values]
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(objective))


def test_cached_first_layer_gram_gives_the_same_steps() -> None:
    """Full batch: the first layer's Gram metric is computed once (n > 10·d here) and reused; dropping the cache
    recomputes the identical factor, so the next step is bit-identical."""
    x, _ = _problem(n=90)
    y = torch.arange(90) % 3
    meth = TIAM(_model(), constraint="penalty", nu=10.0, rho=1.0, w_metric="gram", a_metric="gram")
    idx = torch.arange(90)
    for _ in range(3):
        meth.step(x, y, idx=idx)
    assert meth._gram_cache is not None
    twin = copy.deepcopy(meth)
    twin._gram_cache = None
    meth.step(x, y, idx=idx)
    twin.step(x, y, idx=idx)
    for p1, p2 in zip(meth.model.parameters(), twin.model.parameters()):
        assert torch.equal(p1, p2)


def test_penalty_continuation_scales_rho_and_nu_per_iteration_and_restores_the_config() -> None:
    """penalty_growth g: the sweep of iteration k runs with ρ·min(g^k, cap) and ν·min(g^k, cap); the stored
    config is untouched, and the reported objective is F at iteration k's penalties."""
    meth = TIAM(
        _model(), constraint="penalty", rho=0.5, nu=2.0, rho_output=1.5, penalty_growth=2.0, penalty_growth_max=5.0
    )
    seen = []
    for k in range(4):
        pen = penalties_at(meth.config, k)
        seen.append((pen.rho, pen.nu, pen.rho_output))
    assert seen == [(0.5, 2.0, 1.5), (1.0, 4.0, 3.0), (2.0, 8.0, 6.0), (2.5, 10.0, 7.5)]
    pen = penalties_at(meth.config, 10**6)  # far beyond the cap: no overflow
    assert (pen.rho, pen.nu) == (2.5, 10.0)
    assert (meth.config.rho, meth.config.nu, meth.config.rho_output) == (0.5, 2.0, 1.5)
    x, _ = _problem(n=30)
    y = torch.arange(30) % 3
    idx = torch.arange(30)
    for _ in range(3):
        stats = meth.step(x, y, idx=idx)
    st = meth.state
    onehot = tF.one_hot(y, 3).double()
    F = float(-(onehot * torch.log_softmax(st.z[-1], dim=1)).sum())
    rho_k, nu_k, rho_out_k = 0.5 * 4.0, 2.0 * 4.0, 1.5 * 4.0  # the third sweep ran at iteration k = 2
    for l, layer in enumerate(meth.chain):
        a_in = x if l == 0 else st.a[l - 1]
        rho_l = rho_out_k if l == len(meth.chain) - 1 else rho_k
        F += 0.5 * rho_l * float((st.z[l] - a_in @ layer.weight.detach().T - layer.bias.detach()).pow(2).sum())
        F += 0.5 * meth.config.mu * float(layer.weight.detach().pow(2).sum())
        if l < len(st.a):
            F += 0.5 * nu_k * float((st.a[l] - torch.relu(st.z[l])).pow(2).sum())
    assert stats.info["objective"] == pytest.approx(F, rel=1e-10)


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_exact_output_majorised_steps_accept_the_first_trial_and_keep_z_L_on_the_logits(order: str) -> None:
    """output='exact' in the Gram metrics: ½aᵀa + μI and ½N bound the CE Hessians of W_L and b_L, and ½W_LᵀW_L that
    of a_{L−1}, so AM never backtracks (every block's first trial θ = 1 is accepted); z_L stays equal to the
    logits of the auxiliary chain, so the reported CE is theirs; TIAM's inertia keeps F monotone."""
    x, y = _problem(n=40)
    idx = torch.arange(40)
    hp = {"constraint": "penalty", "nu": 2.0, "rho": 0.5, "output": "exact", "w_metric": "gram", "a_metric": "gram",
          "block_order": order}
    am = AM(_model(), **hp)
    for _ in range(8):
        info = am.step(x, y, idx=idx).info
        assert info["backtracks"] == 0 and info["backtrack_failures"] == 0
        st, out = am.state, am.chain[-1]
        torch.testing.assert_close(st.z[-1], st.a[-1] @ out.weight.detach().T + out.bias.detach(), rtol=0, atol=1e-12)
        onehot = tF.one_hot(y, 3).double()
        assert info["ce_sum"] == pytest.approx(float(-(onehot * torch.log_softmax(st.z[-1], dim=1)).sum()))
    tiam = TIAM(_model(), **hp, p1=0.6, p2=0.3, p3=0.6)
    first = float(tiam.batch_loss(x, y))
    previous = math.inf
    for _ in range(15):
        info = tiam.step(x, y, idx=idx).info
        assert info["objective"] <= previous * (1 + 1e-12)
        previous = info["objective"]
    assert float(tiam.batch_loss(x, y)) < 0.9 * first


def test_resync_resets_the_auxiliary_chain_to_a_forward_pass_and_keeps_the_weight_history() -> None:
    """resync_every = 2: the third iteration starts from z_l, a_l of a forward pass (no auxiliary inertia), like a
    run whose auxiliary state was never initialised, while W, b and their inertia carry on."""
    x, y = _problem(n=30)
    idx = torch.arange(30)
    hp = {"constraint": "penalty", "nu": 2.0, "rho": 0.5, "output": "exact", "p_schedule": "fista", "p1": 0.0}
    meth = TIAM(_model(), **hp, resync_every=2)
    for _ in range(2):
        meth.step(x, y, idx=idx)
    twin = TIAM(_model(), **hp)
    twin.load_state_dict(meth.state_dict())
    assert twin.state.initialised is not None
    twin.state.initialised.zero_()  # its next step initialises every row by a forward pass
    meth.step(x, y, idx=idx)
    twin.step(x, y, idx=idx)
    for p1, p2 in zip(meth.model.parameters(), twin.model.parameters()):
        assert torch.equal(p1, p2)
    plain = TIAM(_model(), **hp)  # without the resync the third iteration differs
    for _ in range(3):
        plain.step(x, y, idx=idx)
    assert not torch.equal(plain.chain[0].weight, meth.chain[0].weight)


# -- cost-driven implementations against dense references ------------------------------------------------------------


@pytest.mark.parametrize("p", [(0.0, 0.0, 0.5), (0.5, 0.2, 0.4)])
@pytest.mark.parametrize("exact", [False, True], ids=["penalty-fit", "exact-output-ce"])
def test_gram_a_step_in_the_eigenbasis_matches_a_dense_reference(p: tuple[float, float, float], exact: bool) -> None:
    """a_metric='gram' runs in the eigenbasis of M = c WᵀW + δI; a dense reference (M⁻¹ and (θM + νI)⁻¹ by solves,
    S evaluated directly) gives the same θ (θ0 = 0.05 forces doublings), a⁺, a^{k+1} and safeguard values, for a
    quadratic S and for the exact output's CE, with and without p1 ≠ p2."""
    meth, act, z_l, W_n, b_n, z_n, _ = _penalty_a_problem(a_metric="gram", theta0=0.05)
    rho, nu = 0.9, 0.4
    g = torch.Generator().manual_seed(29)
    a = act.phi(z_l) + 0.1 * torch.randn(z_l.shape, generator=g, dtype=torch.float64)
    delta = 0.2 * torch.randn(z_l.shape, generator=g, dtype=torch.float64)
    onehot = tF.one_hot(torch.randint(0, 4, (z_l.shape[0],), generator=g), 4).double() if exact else None
    hz = act.phi(z_l)

    def S(u: torch.Tensor) -> float:
        if onehot is not None:
            return float(-(onehot * torch.log_softmax(u @ W_n.T + b_n, dim=1)).sum())
        return float(0.5 * rho * (z_n - u @ W_n.T - b_n).pow(2).sum())

    a_t, a_h = a + p[0] * delta, a + p[1] * delta
    if onehot is not None:
        G = (torch.softmax(a_h @ W_n.T + b_n, dim=1) - onehot) @ W_n
        c = meth.config.output_curvature
    else:
        G = rho * (a_h @ W_n.T + b_n - z_n) @ W_n
        c = rho
    M = c * W_n.T @ W_n
    M = M + 1e-10 * float(M.diagonal().sum()) / 5 * torch.eye(5, dtype=torch.float64)
    theta = 0.05
    while True:
        w = a_t - torch.linalg.solve(M, G.T).T / theta
        u = torch.linalg.solve(theta * M + nu * torch.eye(5, dtype=torch.float64), (theta * w @ M + nu * hz).T).T
        d = u - a_h
        if S(u) <= S(a_h) + float((G * d).sum()) + 0.5 * theta * float((d @ M * d).sum()) + 1e-9:
            break
        theta *= 2
    a_new = u + p[2] * (u - a)
    cnt = _Counters()
    res = meth._blocks(cnt).a_step(0, a, p, delta, ABlock(act, z_l, W_n, b_n, z_n, 1e-3, onehot))
    assert res is not None
    assert meth.state.theta_a[0] == theta and theta > 0.05
    assert cnt.backtracks == round(math.log2(theta / 0.05))
    torch.testing.assert_close(res.raw, u, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(res.new, a_new, atol=1e-9, rtol=1e-9)
    assert res.f_new == pytest.approx(S(a_new) + 0.5 * nu * float((a_new - hz).pow(2).sum()), rel=1e-9)
    assert res.f_old == pytest.approx(S(a) + 0.5 * nu * float((a - hz).pow(2).sum()), rel=1e-9)


def test_inf_in_the_input_raises() -> None:
    x, y = _problem()
    meth = TIAM(_model())
    for value in (math.inf, -math.inf):
        bad = x.clone()
        bad[3, 2] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            meth.step(bad, y)


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_named_blocks_cover_every_layer(order: str) -> None:
    """The profiler hook sees the forward pass, every layer's W, b, z and a blocks (the exact output's W_L and
    b_L), the Gram metrics, the backtracking and the objective."""
    x, y = _problem(n=90)
    seen: list[str] = []

    def hook(name: str) -> contextlib.AbstractContextManager[None]:
        seen.append(name)
        return contextlib.nullcontext()

    hp = {"constraint": "penalty", "w_metric": "gram", "a_metric": "gram", "block_order": order}
    for extra in ({}, {"output": "exact"}):
        seen.clear()
        meth = TIAM(_model(), **hp, **extra)
        meth.set_block_hook(hook)
        meth.step(x, y, idx=torch.arange(90))
        expected = {"forward", "gram", "objective", "aux_rows", "backtracking"}
        expected |= {f"{kind}_block[{l}]" for kind in "wb" for l in (1, 2, 3)}
        expected |= {f"a_block[{l}]" for l in (1, 2)} | {"z_block[1]", "z_block[2]"}
        if not extra:
            expected.add("z_block[3]")
        assert expected <= set(seen), expected - set(seen)


def test_first_layer_product_is_reused_only_for_the_same_input_and_weights() -> None:
    """Full batch, Gram metric, p1 = p2: the W_1 block leaves x W_1ᵀ as one product, which the next step's forward
    pass reuses; it equals a fresh product bit for bit, and a changed or reordered input recomputes it (the step
    is then bit-identical to one without the reuse)."""
    x, _ = _problem(n=90)
    y = torch.arange(90) % 3
    idx = torch.arange(90)
    hp = {"constraint": "penalty", "nu": 10.0, "rho": 1.0, "w_metric": "gram", "a_metric": "gram"}
    meth = TIAM(_model(), **hp, p_schedule="fista", p1=0.0, p2=0.0)
    for _ in range(2):
        meth.step(x, y, idx=idx)
    assert meth._first_product is not None
    assert torch.equal(meth._first_product[2], x @ meth.chain[0].weight.detach().T)
    changed = x.clone()
    changed[5, 3] += 1e-3
    perm = torch.randperm(90, generator=torch.Generator().manual_seed(4))
    for xs, ids in ((x, idx), (changed, idx), (x[perm], perm)):
        reused, fresh = copy.deepcopy(meth), copy.deepcopy(meth)
        fresh._first_product = None
        s1, s2 = reused.step(xs, y[ids], idx=ids), fresh.step(xs, y[ids], idx=ids)
        assert s1.loss == s2.loss and s1.info == s2.info
        for p1, p2 in zip(reused.model.parameters(), fresh.model.parameters()):
            assert torch.equal(p1, p2)
