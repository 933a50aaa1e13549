"""Serial LPOM against the unit-test oracles of docs/methods/lpom.md §11 (float64, tiny problems)."""

from __future__ import annotations

import io
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from liftkit.activations import ACTIVATIONS, Activation
from liftkit.methods import get
from liftkit.methods.lpom import LPOM, LiftedChain
from liftkit.models import autoencoder, mlp

DT = torch.float64


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def net(widths, act="relu", out_act="relu", seed=0, bias=True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=bias))
        name = out_act if i == len(widths) - 2 else act
        if name not in (None, "identity"):  # nn.Identity is glue in the chain view: a bare layer is φ = identity
            layers.append(Activation(name).module())
    return nn.Sequential(*layers).to(DT)


def problem(widths=(6, 9, 7, 4), act="relu", out_act="relu", m=12, seed=0, **hp):
    model = net(widths, act, out_act, seed)
    method = LPOM(model, **hp)
    g = seeded(seed + 1)
    x = torch.randn(m, widths[0], generator=g, dtype=DT)
    y = torch.randint(0, widths[-1], (m,), generator=g)
    return method, model, x, y


def forward_state(method: LPOM, x, y):
    lifted = method.lifted
    ws, bs = lifted.weights(), lifted.biases()
    xs, pre = lifted.forward(x, ws, bs)
    d = method._targets(y, x.shape[0])
    return xs, pre, d, ws, bs


def interior(act: Activation, t: torch.Tensor, margin: float) -> torch.Tensor:
    """``t`` moved at least ``margin`` inside dom F (penalties are finite and smooth there)."""
    lo, hi = act.domain
    if lo > -math.inf:
        t = t.clamp(min=lo + margin)
    if hi < math.inf:
        t = t.clamp(max=hi - margin)
    return t


def hidden_objective(lifted: LiftedChain, k, X, A, x_next, w, b) -> float:
    """Subproblem (24): μ_{k−1}ΣB(A, X) + μ_kΣB(XWᵀ + b, X^{k+1})."""
    return lifted.mu[k - 1] * lifted.acts[k - 1].penalty_sum(A, X) + lifted.mu[k] * lifted.acts[k].penalty_sum(
        lifted.preact(X, w, b), x_next
    )


# -- oracle 1: the penalty vanishes at the forward pass ------------------------------------------------------
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_penalty_zero_at_forward_pass_and_positive_after_perturbation(act):
    method, _, x, y = problem(act=act, out_act=act)
    xs, pre, _d, _, _ = forward_state(method, x, y)
    lifted = method.lifted
    penalties = [lifted.acts[j].penalty_sum(pre[j], xs[j + 1]) for j in range(lifted.L)]
    assert max(abs(p) for p in penalties) < 1e-10
    g = seeded(5)
    for k in range(1, lifted.L + 1):
        moved = interior(lifted.acts[k - 1], xs[k] + 0.05 * torch.randn(xs[k].shape, generator=g, dtype=DT), 1e-6)
        assert lifted.acts[k - 1].penalty_sum(pre[k - 1], moved) > 1e-8


# -- oracle 2: the X-solvers leave a feasible point unchanged -------------------------------------------------
@pytest.mark.parametrize("solver,act", [
    (s, a) for s in ("fista", "fixed_point", "fista_prox") for a in ("relu", "leaky_relu", "tanh", "sigmoid")
    if not (s == "fista" and a in ("tanh", "sigmoid"))  # fista needs a closed-form prox
])
def test_x_solvers_leave_forward_point_unchanged(solver, act):
    method, _, x, y = problem(act=act, out_act=act)
    xs, pre, _, ws, bs = forward_state(method, x, y)
    lifted = method.lifted
    for k in range(1, lifted.L):
        res = lifted.solve_hidden(
            k, xs[k], pre[k - 1], xs[k + 1], ws[k], bs[k], 2.0 * float(torch.linalg.matrix_norm(ws[k], 2)),
            solver=solver, iters=20, tol=1e-12,
        )
        torch.testing.assert_close(res.value, xs[k], atol=1e-9, rtol=0)


# -- oracle 3: the output closed forms equal (29) iterated ------------------------------------------------------
@pytest.mark.parametrize("act", ["relu", "identity", "sigmoid", "tanh"])
def test_mse_output_closed_form_matches_iteration_29(act):
    method, _, x, y = problem(act="relu", out_act=act, mu=2.0)
    xs, pre, d, _, _ = forward_state(method, x, y)
    lifted = method.lifted
    a = pre[-1] + 0.3
    closed = lifted.solve_output(xs[-1], a, d, iters=1, tol=0.0).value
    it = xs[-1].clone()
    phi = lifted.acts[-1].phi
    for _ in range(500):  # (29): X ← φ(A − (X − D)/μ), a contraction for κ/μ < 1
        it = phi(a - (it - d) / 2.0)
    torch.testing.assert_close(closed, it, atol=1e-10, rtol=0)
    if act == "relu":
        torch.testing.assert_close(closed, torch.clamp((2.0 * a + d) / 3.0, min=0))


def test_ce_output_iteration_is_stationary():
    method, _, x, y = problem(out_act=None, loss="ce", mu=2.0)
    xs, pre, d, _, _ = forward_state(method, x, y)
    res = method.lifted.solve_output(xs[-1], pre[-1], d, iters=200, tol=1e-14)
    # identity output: softmax(X) − D + μ(X − A) = 0
    grad = torch.softmax(res.value, 1) - d + 2.0 * (res.value - pre[-1])
    assert float(grad.abs().max()) < 1e-10


# -- oracle 4: FISTA reaches the minimiser of (24) (reference: SciPy L-BFGS-B) -----------------------------------
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("w_scale", [0.3, 3.0])
def test_fista_matches_lbfgsb_on_subproblem_24(act, w_scale):
    method, _, x, y = problem(act=act, out_act=act, mu=(2.0, 3.0, 1.5))
    xs, pre, _, ws, bs = forward_state(method, x, y)
    lifted = method.lifted
    k = 1
    w = ws[k] * w_scale
    g = seeded(9)
    x_next = lifted.acts[k].project(xs[k + 1] + 0.5 * torch.randn(xs[k + 1].shape, generator=g, dtype=DT))
    a = pre[k - 1]
    c = lifted.mu[k] / lifted.mu[k - 1]
    w2 = float(torch.linalg.matrix_norm(w, 2)) ** 2
    if w_scale > 1:
        assert c * w2 >= 2.0  # (26) is not a contraction here
    res = lifted.solve_hidden(k, xs[k], a, x_next, w, bs[k], math.sqrt(w2), solver="fista", iters=5000, tol=1e-13)

    shape = xs[k].shape

    def fun(v):
        t = torch.tensor(v, dtype=DT).reshape(shape).requires_grad_(True)
        u = lifted.preact(t, w, bs[k])
        val = lifted.mu[k - 1] * lifted.acts[k - 1].penalty(a, t).sum() + lifted.mu[k] * lifted.acts[k].penalty(
            u, x_next
        ).sum()
        val.backward()
        return float(val), t.grad.numpy().ravel().copy()

    bounds = [(0, None)] * xs[k].numel() if act == "relu" else None
    ref = minimize(fun, xs[k].numpy().ravel(), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12})
    f_ref = ref.fun
    f_fista = hidden_objective(lifted, k, res.value, a, x_next, w, bs[k])
    assert f_fista <= f_ref + 1e-6 * abs(f_ref)
    assert abs(f_fista - f_ref) <= 1e-6 * abs(f_ref)


def test_fixed_point_converges_to_fista_minimiser_and_is_monotone_when_contractive():
    method, _, x, y = problem(mu=(2.0, 2.0, 2.0))
    xs, pre, _, ws, bs = forward_state(method, x, y)
    lifted = method.lifted
    k = 1
    w2 = float(torch.linalg.matrix_norm(ws[k], 2)) ** 2
    w = ws[k] * (0.8 / math.sqrt(w2))  # cκ‖W‖² = 0.64 < 1
    g = seeded(3)
    x_next = torch.relu(xs[k + 1] + torch.randn(xs[k + 1].shape, generator=g, dtype=DT))
    a = pre[0]
    fista = lifted.solve_hidden(k, xs[k], a, x_next, w, bs[k], 0.8, solver="fista", iters=3000, tol=1e-14)
    fp = lifted.solve_hidden(k, xs[k], a, x_next, w, bs[k], 0.8, solver="fixed_point", iters=3000, tol=1e-14)
    torch.testing.assert_close(fp.value, fista.value, atol=1e-8, rtol=0)
    cur = xs[k]
    f_prev = hidden_objective(lifted, k, cur, a, x_next, w, bs[k])
    for _ in range(30):
        cur = lifted.solve_hidden(k, cur, a, x_next, w, bs[k], 0.8, solver="fixed_point", iters=1, tol=0.0).value
        f = hidden_objective(lifted, k, cur, a, x_next, w, bs[k])
        assert f <= f_prev + 1e-12
        f_prev = f


def test_leaky_relu_prox_is_phi_at_unit_step():
    act = Activation("leaky_relu", 0.1)
    v = torch.linspace(-3, 3, 41, dtype=DT)
    torch.testing.assert_close(act.prox_f(v, 1.0), act.phi(v))


# -- oracle 5: ∇Φ against autograd; the W-step is the exact minimiser of the majoriser ---------------------------
@pytest.mark.parametrize("act", ["softplus", "tanh", "sigmoid", "relu", "elu"])
def test_w_step_solves_majoriser_with_autograd_gradient(act):
    method, _, x, y = problem(widths=(20, 8, 5), act=act, out_act=act, m=10)
    xs, pre, _, ws, bs = forward_state(method, x, y)
    lifted = method.lifted
    j = 0
    g = seeded(4)
    target = lifted.acts[j].phi(pre[j] + torch.randn(pre[j].shape, generator=g, dtype=DT))
    w_new, b_new = lifted.solve_w(j, xs[j], target, ws[j], bs[j], None, iters=1, side="auto", pinv="cholesky",
                                  ridge_rel=1e-14)
    wb = torch.cat([ws[j], bs[j][:, None]], 1).clone().requires_grad_(True)
    xb = torch.cat([xs[j], torch.ones(xs[j].shape[0], 1, dtype=DT)], 1)
    u = xb @ wb.t()
    phi_val = lifted.acts[j].F_star(u).sum() - (target * u).sum()
    (grad,) = torch.autograd.grad(phi_val, wb)
    beta = lifted.acts[j].kappa
    delta = torch.cat([w_new, b_new[:, None]], 1) - wb.detach()
    # stationarity of ⟨∇Φ, Δ⟩ + (β/2)‖X̄Δᵀ‖²:  ∇Φ + βΔX̄ᵀX̄ = 0
    residual = grad + beta * delta @ xb.t() @ xb
    assert float(residual.abs().max()) < 1e-8 * max(1.0, float(grad.abs().max()))


# -- oracle 6: one W-step does not increase Φ; identity + full rank fits exactly with minimal change -------------
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh", "leaky_relu", "softplus"])
def test_one_w_step_does_not_increase_phi(act):
    method, _, x, y = problem(widths=(20, 8, 5), act=act, out_act=act, m=10)
    xs, pre, _, ws, bs = forward_state(method, x, y)
    lifted = method.lifted
    g = seeded(6)
    target = interior(lifted.acts[0], xs[1] + 0.3 * torch.randn(xs[1].shape, generator=g, dtype=DT), 1e-3)

    def phi_obj(w, b):
        u = lifted.preact(xs[0], w, b)
        return float((lifted.acts[0].F_star(u) - target * u).sum())

    w_new, b_new = lifted.solve_w(0, xs[0], target, ws[0], bs[0], pre[0], iters=1, side="auto", pinv="cholesky",
                                  ridge_rel=1e-12)
    assert phi_obj(w_new, b_new) <= phi_obj(ws[0], bs[0]) + 1e-12


@pytest.mark.parametrize("side,pinv", [("batch", "cholesky"), ("auto", "svd")])
def test_identity_w_step_fits_exactly_with_minimal_change(side, pinv):
    model = net((20, 6), act=None, out_act=None)
    method = LPOM(model)
    lifted = method.lifted
    g = seeded(2)
    x = torch.randn(8, 20, generator=g, dtype=DT)  # 8 samples, 21 features with the ones column: full row rank
    target = torch.randn(8, 6, generator=g, dtype=DT)
    w, b = lifted.weights()[0], lifted.biases()[0]
    w_new, b_new = lifted.solve_w(0, x, target, w, b, None, iters=1, side=side, pinv=pinv, ridge_rel=1e-14)
    torch.testing.assert_close(lifted.preact(x, w_new, b_new), target, atol=1e-9, rtol=0)
    xb = torch.cat([x, torch.ones(8, 1, dtype=DT)], 1)
    resid = target - lifted.preact(x, w, b)
    ref_delta = torch.linalg.lstsq(xb, resid, driver="gelsd").solution.t()  # minimum-norm least squares
    delta = torch.cat([w_new - w, (b_new - b)[:, None]], 1)
    torch.testing.assert_close(delta, ref_delta, atol=1e-9, rtol=0)


# -- oracle 7: the pseudo-inverse sides agree ------------------------------------------------------------------
@pytest.mark.parametrize("m", [6, 40])
def test_w_step_pinv_sides_agree(m):
    """The well-posed side (batch for m ≤ n+1, feature otherwise) equals the SVD pinv tightly; the other side's
    Gram is singular, so its guard ε dominates rounding and it agrees to the guard's order only."""
    method, _, x, y = problem(widths=(12, 8, 5), m=m)
    xs, pre, _, ws, bs = forward_state(method, x, y)
    lifted = method.lifted
    g = seeded(8)
    target = torch.relu(xs[1] + torch.randn(xs[1].shape, generator=g, dtype=DT))
    good, other = ("batch", "feature") if m <= 13 else ("feature", "batch")

    def run(side, pinv, ridge):
        return lifted.solve_w(0, xs[0], target, ws[0], bs[0], pre[0], iters=3, side=side, pinv=pinv, ridge_rel=ridge)

    ref = run("auto", "svd", 1e-12)
    for (w_o, b_o), tol in [(run(good, "cholesky", 1e-14), 1e-8), (run(other, "cholesky", 1e-10), 1e-3)]:
        torch.testing.assert_close(w_o, ref[0], atol=tol, rtol=tol)
        torch.testing.assert_close(b_o, ref[1], atol=tol, rtol=tol)


# -- oracle 8: forward sweep s moves exactly X^{n−s+1..n} --------------------------------------------------------
@pytest.mark.parametrize("sweeps", [1, 2, 3, 4])
def test_forward_sweep_s_changes_exactly_the_top_s_blocks(sweeps):
    method, _, x, y = problem(widths=(6, 9, 8, 7, 4), x_sweeps=sweeps, x_sweep_order="forward", x_tol=1e-14,
                              x_iters=50)
    xs, pre, d, ws, bs = forward_state(method, x, y)
    before = [t.clone() for t in xs]
    method.x_phase(xs, pre, d, ws, bs, {})
    L = method.lifted.L
    for k in range(1, L + 1):
        changed = not torch.allclose(xs[k], before[k], atol=1e-12, rtol=0)
        assert changed == (k >= L - sweeps + 1), (k, sweeps)


def test_backward_sweep_reaches_every_block():
    method, _, x, y = problem(widths=(6, 9, 8, 7, 4), x_sweeps=1, x_sweep_order="backward")
    xs, pre, d, ws, bs = forward_state(method, x, y)
    before = [t.clone() for t in xs]
    method.x_phase(xs, pre, d, ws, bs, {})
    assert all(not torch.allclose(xs[k], before[k]) for k in range(1, method.lifted.L + 1))


# -- every block update does not increase the energy ---------------------------------------------------------------
@pytest.mark.parametrize("act,out_act,loss", [
    ("relu", "relu", "mse"), ("leaky_relu", None, "mse"), ("tanh", "tanh", "mse"), ("relu", None, "ce"),
    ("relu", "sigmoid", "mse"),
])
def test_every_block_update_does_not_increase_the_energy(act, out_act, loss):
    solver = "fista" if act in ("relu", "leaky_relu") else "fista_prox"
    method, _, x, y = problem(widths=(6, 9, 8, 4), act=act, out_act=out_act, loss=loss, x_solver=solver,
                              x_iters=200, x_tol=1e-12, output_iters=500)
    lifted = method.lifted
    d = method._targets(y, x.shape[0])
    for _ in range(3):  # three mini-batch steps on the same batch
        ws, bs = lifted.weights(), lifted.biases()
        xs, pre = lifted.forward(x, ws, bs)
        energy = lifted.energy(xs, pre, d)
        norms = {k: 1.05 * float(torch.linalg.matrix_norm(ws[k], 2)) for k in range(1, lifted.L)}
        for _sweep in range(2):
            for k in range(1, lifted.L + 1):
                method.update_x_block(k, xs, pre, d, ws, bs, norms)
                e = lifted.energy(xs, pre, d)
                assert e <= energy + 1e-9 * max(1.0, abs(energy)), (k, e, energy)
                energy = e
        for j in range(lifted.L):
            w_new, b_new = lifted.solve_w(j, xs[j], xs[j + 1], ws[j], bs[j], pre[j], iters=1, side="auto",
                                          pinv="cholesky", ridge_rel=1e-12)
            new_pre = list(pre)
            new_pre[j] = lifted.preact(xs[j], w_new, b_new)
            e = lifted.energy(xs, new_pre, d)
            assert e <= energy + 1e-9 * max(1.0, abs(energy)), (j, e, energy)
        method.commit(method.w_phase(xs, pre, ws, bs))


# -- training behaviour, monitoring and failure detection -------------------------------------------------------
def test_step_reports_diagnostics_and_reduces_energy():
    method, model, x, y = problem()
    stats = method.step(x, y)
    info = stats.info
    for key in ("energy_init", "energy", "x_res_1", "x_iters_1", "w_norm_0", "w_norm_2", "sweeps", "x_not_converged"):
        assert key in info
    assert info["x_not_converged"] == 0.0
    assert info["energy"] < info["energy_init"]
    assert info["w_norm_0"] == pytest.approx(float(torch.linalg.matrix_norm(model[1].weight, 2)), rel=0.05)


def test_fixed_point_collapse_is_detected_and_warned():
    method, _model, x, y = problem(x_solver="fixed_point", x_iters=5, mu=(1.0, 1.0, 1.0))
    with torch.no_grad():
        for lin in method.lifted.linears:
            lin.weight.mul_(6.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = method.step(x, y).info
        method.step(x, y)
    assert info["x_not_converged"] == 1.0
    assert info["rho_1"] > 1.0
    assert sum("fista" in str(w.message) for w in caught) == 1  # warned once, naming the fix


def test_float_targets_sigmoid_output_autoencoder():
    torch.manual_seed(0)
    model = autoencoder([16, 8, 4]).to(DT)
    method = LPOM(model, mu=(5.0, 5.0, 5.0, 5.0))
    g = seeded(1)
    x = torch.rand(24, 16, generator=g, dtype=DT)
    before = float(((model(x) - x) ** 2).sum(1).mean())
    for _ in range(30):
        method.step(x, x)
    after = float(((model(x) - x) ** 2).sum(1).mean())
    assert after < 0.85 * before


def test_bare_output_layer_and_bias_free_layers_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10, bias=False), nn.Tanh(), nn.Linear(10, 3)).to(DT)
    method = LPOM(model, mu=3.0)
    g = seeded(0)
    x = torch.randn(30, 6, generator=g, dtype=DT)
    y = torch.randint(0, 3, (30,), generator=g)
    first = method.step(x, y).loss
    for _ in range(20):
        last = method.step(x, y).loss
    assert last < first


def test_persistent_init_round_trip_and_mixed_activations():
    model = nn.Sequential(nn.Linear(5, 7), nn.ELU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU()).to(DT)
    method = LPOM(model, x_init="persistent", mu=(2.0, 3.0, 4.0))
    g = seeded(0)
    x = torch.randn(20, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (20,), generator=g)
    idx = torch.arange(20)
    method.step(x[:10], y[:10], idx=idx[:10])
    method.step(x[10:], y[10:], idx=idx[10:])
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    model2 = nn.Sequential(nn.Linear(5, 7), nn.ELU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU()).to(DT)
    other = LPOM(model2, x_init="persistent", mu=(2.0, 3.0, 4.0))
    other.load_state_dict(torch.load(buf, weights_only=False))
    s1 = method.step(x[:10], y[:10], idx=idx[:10])
    s2 = other.step(x[:10], y[:10], idx=idx[:10])
    assert s1.loss == s2.loss and s1.info == s2.info
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    with pytest.raises(ValueError, match="idx"):
        method.step(x[:10], y[:10])


# -- bad input -----------------------------------------------------------------------------------------------------
def test_unsupported_models_raise():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="fully connected"):
        LPOM(conv)
    with pytest.raises(ValueError, match="GELU"):
        LPOM(nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match="fista_prox"):
        LPOM(mlp("6-9-4", activation="sigmoid"), x_solver="fista")


def test_bad_batches_raise():
    method, _, x, y = problem()
    with pytest.raises(ValueError, match="features"):
        method.step(torch.randn(4, 5, dtype=DT), y[:4])
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        method.step(bad, y)
    with pytest.raises(ValueError, match="targets"):
        method.step(x, y[:-1])


def test_registry_and_reporting():
    cls = get("lpom")
    assert cls is LPOM and cls.default_loss == "mse" and cls.model_output_activation == "hidden"
    assert "reconstructed" in cls.reporting_name
    assert np.isclose(LPOM(mlp("6-9-4", output_activation="relu"), x_sweeps=0).sweeps, 2)  # 0 means L
    assert LPOM(mlp("6-9-4", output_activation="relu")).sweeps == 1  # the default: one backward sweep


@pytest.mark.parametrize("act,gamma", [("relu", 0.0), ("leaky_relu", 0.0), ("hardtanh", 0.5), ("sigmoid", 0.0),
                                       ("tanh", 0.7), ("identity", 0.0)])
def test_fused_fista_equals_generic_projected_fista(act, gamma):
    """The X-solver's folded affine update gives the iterates of solvers.projected_fista with the plain ∇S."""
    from liftkit.solvers import projected_fista

    method, _, x, y = problem(act=act, out_act="relu", seed=3)
    xs, pre, _d, ws, bs = forward_state(method, x, y)
    lifted = method.lifted
    g = seeded(7)
    k = 1
    x_next = xs[k + 1] + 0.3 * torch.rand(xs[k + 1].shape, generator=g, dtype=DT)
    anchor = xs[k] + 0.1 * torch.randn(xs[k].shape, generator=g, dtype=DT)
    w_norm = 1.05 * float(torch.linalg.matrix_norm(ws[k], ord=2))
    solver = lifted.resolve_solver("auto", k)
    got = lifted.solve_hidden(k, xs[k], pre[k - 1], x_next, ws[k], bs[k], w_norm, solver=solver, iters=7,
                              tol=1e-300, gamma=gamma, anchor=anchor if gamma else None)
    mu_prev, mu_k = lifted.mu[k - 1], lifted.mu[k]
    scale = mu_prev + gamma
    a = (mu_prev * pre[k - 1] + gamma * anchor) / scale if gamma else pre[k - 1]
    s, c = mu_prev / scale, mu_k / scale
    a_in, a_out = lifted.acts[k - 1], lifted.acts[k]

    def grad(v):
        return v - a + c * (a_out.phi(lifted.preact(v, ws[k], bs[k])) - x_next) @ ws[k]

    lip = 1.0 + c * a_out.kappa * w_norm**2
    ref, it, _ = projected_fista(grad, lip, lambda z, t: a_in.prox_f(z, t * s), xs[k], 7, 1e-300)
    assert got.iters == it == 7
    torch.testing.assert_close(got.value, ref, atol=1e-12, rtol=1e-12)


def test_model_from_spec_ends_in_the_hidden_activation():
    """docs/methods/lpom.md §2.1: the output layer applies φ too, so --activation reaches the output of an LPOM
    model."""
    from liftkit.models import build_model

    for act in ("sigmoid", "tanh", "relu", "identity"):
        model = build_model("8-5-3", input_shape=(8,), num_classes=3, activation=act,
                            output_activation=LPOM.model_output_activation)
        method = LPOM(model.to(DT))
        assert [a.name for a in method.lifted.acts] == [act, act]
    assert isinstance(mlp("4-3-2", "tanh", "hidden")[-1], nn.Tanh)


def test_guard_ratio_gives_near_square_batch_grams_the_strong_guard():
    """A layer with m > guard_ratio·(n_j+1) samples gets ridge_rel_feature on its batch-side Gram too (the
    100 → 50 layer of 784-400-200-100-50-10 at batch 100 blew up to ‖W‖₂ ≈ 4e4 with the 1e-10 guard)."""
    method, _, x, y = problem(widths=(6, 15, 4), m=12)
    xs, _pre, _d, ws, bs = forward_state(method, x, y)
    lifted = method.lifted
    kw = {"iters": 1, "side": "auto", "pinv": "cholesky"}
    assert lifted.guard_ratio == 0.5 and 12 > 0.5 * 16 and 12 <= 16  # batch side, guarded
    guarded = lifted.solve_w(1, xs[1], xs[2] + 0.1, ws[1], bs[1], None, ridge_rel=1e-10, ridge_rel_feature=1e-3, **kw)
    direct = lifted.solve_w(1, xs[1], xs[2] + 0.1, ws[1], bs[1], None, ridge_rel=1e-3, ridge_rel_feature=1e-3, **kw)
    lifted.guard_ratio = 1.0
    plain = lifted.solve_w(1, xs[1], xs[2] + 0.1, ws[1], bs[1], None, ridge_rel=1e-10, ridge_rel_feature=1e-3, **kw)
    torch.testing.assert_close(guarded[0], direct[0], atol=0, rtol=0)
    assert not torch.allclose(guarded[0], plain[0], atol=1e-9)
    with pytest.raises(ValueError, match="guard_ratio"):
        LPOM(net((6, 5, 4)), guard_ratio=0.0)
