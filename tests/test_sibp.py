"""SIBP: the unit-test oracles of docs/methods/sibp.md §8 against autograd, closed forms and dense solves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liftkit.methods import get
from liftkit.methods.sibp import (
    SIBP,
    fr_cg_armijo,
    gn_step_safeguard,
    masked_gn_step,
    prox_gradient,
    prox_objective,
)
from liftkit.models import lenet5, mlp
from liftkit.solvers import ridge_solve

DT = torch.float64
HIDDEN = ("gn_cg", "gn_exact", "gn_primal_cg", "fr_cg")


def _net(widths: tuple[int, ...] = (6, 7, 5, 3), seed: int = 0, activation: str = "relu") -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp(list(widths), activation=activation).to(DT)


def _batch(m: int = 12, n: int = 6, classes: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=DT), torch.randint(0, classes, (m,), generator=g)


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- oracle 1: η = 0 returns the warm starts exactly ---------------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("output", ["exact", "fr_cg"])
def test_eta_zero_keeps_parameters_exactly(hidden: str, output: str) -> None:
    model = _net()
    before = _params(model)
    x, y = _batch()
    SIBP(model, eta=0.0, lambda_w=0.7, lambda_b=2.0, hidden_solver=hidden, output_solver=output).step(x, y)
    for p0, p1 in zip(before, model.parameters()):
        assert torch.equal(p0, p1)


# -- oracle 2: with W_new := W_k the backward signal is autograd's ∂L_sum/∂f_l ------------------------------


class _RecordingSIBP(SIBP):
    """Records the targets of every layer and leaves the weights alone (W_new := W_k)."""

    def __init__(self, model: nn.Module, **hp: object) -> None:
        super().__init__(model, **hp)  # type: ignore[arg-type]
        self.targets: dict[int, Tensor] = {}

    def _output_prox(self, layer, a, z0, targets, l, info):
        self.targets[l] = targets.clone()

    def _hidden_prox(self, layer, a, z0, targets, mask, l, info):
        self.targets[l] = targets.clone()


def test_backward_signal_is_autograd_gradient_of_summed_ce() -> None:
    model = _net((6, 7, 5, 4, 3))
    x, y = _batch()
    eta = 0.37
    rec = _RecordingSIBP(model, eta=eta)
    rec.step(x, y)
    # autograd: ∂L_sum/∂f_l for every layer output f_l (post-activation; logits at the top)
    outputs: list[Tensor] = []
    h = x
    for module in model:
        h = module(h)
        if not isinstance(module, nn.Linear | nn.Flatten):
            h.retain_grad()
            outputs.append(h)
    h.retain_grad()
    outputs.append(h)
    F.cross_entropy(h, y, reduction="sum").backward()
    assert len(rec.targets) == 4
    for l, out in enumerate(outputs):
        delta = (out.detach() - rec.targets[l]) / eta
        torch.testing.assert_close(delta, out.grad, rtol=1e-12, atol=1e-12)


# -- oracle 3: λ(W⁺ − W)/η → −∇_W L_sum as λ → ∞ ------------------------------------------------------------


@pytest.mark.parametrize("hidden", ["gn_cg", "gn_exact", "gn_primal_cg"])
def test_large_lambda_limit_is_a_gradient_step(hidden: str) -> None:
    model = _net()
    x, y = _batch()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y, reduction="sum").backward()
    grads = [p.grad for p in ref.parameters()]
    lam, eta = 1e7, 0.5
    before = _params(model)
    SIBP(model, eta=eta, lambda_w=lam, lambda_b=lam, hidden_solver=hidden, cg_iters=50, cg_tol=1e-12).step(x, y)
    for p0, p1, g in zip(before, model.parameters(), grads):
        assert g is not None
        torch.testing.assert_close(lam * (p1.detach() - p0) / eta, -g, rtol=1e-4, atol=1e-6)


# -- oracle 4: exact output solve = normal equations; fixed FR-CG converges to it -------------------------------


def _output_problem(seed: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(15, 5, generator=g, dtype=DT)
    W0 = torch.randn(3, 5, generator=g, dtype=DT)
    b0 = torch.randn(3, generator=g, dtype=DT)
    T = torch.randn(15, 3, generator=g, dtype=DT)
    return a, W0, b0, T, a @ W0.T + b0


def test_exact_output_solve_satisfies_normal_equations() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).to(DT)
    model = nn.Sequential(lin)
    x, y = _batch(m=15, n=5)
    lam_w, lam_b, eta = 0.8, 1.7, 0.4
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    z0 = x @ W0.T + b0
    T = z0 - eta * (torch.softmax(z0, 1) - F.one_hot(y, 3).to(DT))
    SIBP(model, eta=eta, lambda_w=lam_w, lambda_b=lam_b).step(x, y)
    W, b = lin.weight.detach(), lin.bias.detach()
    # W-only (old b): (aᵀa + λI)Wᵀ = aᵀ(T − 1b₀ᵀ) + λW₀ᵀ ; b-only (new W): (m + λ)b = (T − aWᵀ)ᵀ1 + λb₀
    lhs = (x.T @ x + lam_w * torch.eye(5, dtype=DT)) @ W.T
    torch.testing.assert_close(lhs, x.T @ (T - b0) + lam_w * W0.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((15 + lam_b) * b, (T - x @ W.T).sum(0) + lam_b * b0, rtol=1e-12, atol=1e-12)


def test_fixed_fr_cg_converges_to_exact_output_solve() -> None:
    a, W0, b0, T, _ = _output_problem()
    lam = 0.9
    exact = ridge_solve(a, T - b0, lam, W0.T).T
    fr = fr_cg_armijo(a, b0.expand(15, 3), T, W0, lam, relu=False, maxk=400, quirks="fixed")
    torch.testing.assert_close(fr.x, exact, rtol=1e-6, atol=1e-6)
    ones = torch.ones(15, 1, dtype=DT)
    zw = a @ exact.T
    exact_b = ridge_solve(ones, T - zw, lam, b0.unsqueeze(0)).squeeze(0)
    fr_b = fr_cg_armijo(ones, zw, T, b0.unsqueeze(1), lam, relu=False, maxk=400, quirks="fixed")
    torch.testing.assert_close(fr_b.x.squeeze(1), exact_b, rtol=1e-6, atol=1e-6)


def test_official_quirk_skips_a_step_accepted_at_exponent_zero() -> None:
    # Quadratic with a dominant prox term: the unit step along −g passes Armijo at m = 0, which the official
    # code accepts without moving (quirk 1); the fixed variant moves.
    a, W0, _, T, _ = _output_problem()
    offset = torch.zeros(15, 3, dtype=DT)
    start = W0 + 0.01
    official = fr_cg_armijo(a * 1e-3, offset, T * 1e-3, start, 0.3, relu=False, maxk=1, quirks="official")
    fixed = fr_cg_armijo(a * 1e-3, offset, T * 1e-3, start, 0.3, relu=False, maxk=1, quirks="fixed")
    assert official.steps_taken == 0 and torch.equal(official.x, start)
    assert fixed.steps_taken == 1 and fixed.objective_after < fixed.objective_before


def _cosine(u: Tensor, v: Tensor) -> float:
    return float((u * v).sum() / (u.norm() * v.norm()))


def test_official_fr4_first_gradient_drops_the_offset() -> None:
    # The first step goes along −g. The official FR4 g omits the offset B (quirk 2): 2(a xᵀ − T)ᵀa.
    a, W0, b0, T, z0 = _output_problem()
    offset = b0.expand(15, 3)
    g_true = prox_gradient(a, z0, T, W0, W0, 1.0, relu=False)
    g_official = 2.0 * (a @ W0.T - T).T @ a
    kw = {"relu": False, "maxk": 1}
    fixed = fr_cg_armijo(a, offset, T, W0, 1.0, quirks="fixed", **kw)  # type: ignore[arg-type]
    official = fr_cg_armijo(a, offset, T, W0, 1.0, quirks="official", **kw)  # type: ignore[arg-type]
    assert fixed.steps_taken == 1 and official.steps_taken == 1
    assert _cosine(fixed.x - W0, -g_true) == pytest.approx(1.0, abs=1e-12)
    assert _cosine(official.x - W0, -g_official) == pytest.approx(1.0, abs=1e-12)
    assert _cosine(g_true, g_official) < 0.99


# -- oracle 5: the hidden prox gradient is autograd's with mask 1[z > 0] -------------------------------------


def test_hidden_prox_gradient_matches_autograd() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(9, 4, generator=g, dtype=DT)
    a[0] = 0.0  # a row with z = b exactly; with b_j = 0 below some z are exactly 0 (kink convention)
    W_old = torch.randn(6, 4, generator=g, dtype=DT)
    W = (W_old + 0.3 * torch.randn(6, 4, generator=g, dtype=DT)).requires_grad_(True)
    b = torch.randn(6, generator=g, dtype=DT)
    b[:2] = 0.0
    T = torch.rand(9, 6, generator=g, dtype=DT)
    lam = 0.6
    z = a @ W.T + b
    assert bool((z == 0).any())
    obj = (torch.relu(z) - T).pow(2).sum() + lam * (W - W_old).pow(2).sum()
    obj.backward()
    zd = z.detach()
    torch.testing.assert_close(prox_gradient(a, zd, T, W.detach(), W_old, lam, relu=True), W.grad)
    assert prox_objective(zd, T, W.detach(), W_old, lam, relu=True) == pytest.approx(obj.item(), rel=1e-14)


# -- oracle 6: identity hidden activation = the linear prox of docs/methods/conventions.md §7 --------------------------


@pytest.mark.parametrize("hidden", ["gn_exact", "gn_cg", "fr_cg"])
def test_identity_hidden_layer_is_the_linear_prox(hidden: str) -> None:
    torch.manual_seed(2)
    l1, l2 = nn.Linear(6, 5).to(DT), nn.Linear(5, 3).to(DT)
    model = nn.Sequential(nn.Flatten(), l1, nn.Identity(), l2)
    x, y = _batch()
    eta, lam_w, lam_b = 0.3, (0.9, 1.1), (1.3, 0.7)
    W1, b1, W2, b2 = (t.detach().clone() for t in (l1.weight, l1.bias, l2.weight, l2.bias))
    f1 = x @ W1.T + b1
    z2 = f1 @ W2.T + b2
    delta = torch.softmax(z2, 1) - F.one_hot(y, 3).to(DT)
    T2 = z2 - eta * delta
    W2n = ridge_solve(f1, T2 - b2, lam_w[1], W2.T).T
    T1 = f1 - eta * (delta @ W2n)
    W1n = ridge_solve(x, T1 - b1, lam_w[0], W1.T).T
    b1n = ridge_solve(torch.ones(12, 1, dtype=DT), T1 - x @ W1n.T, lam_b[0], b1.unsqueeze(0)).squeeze(0)
    iters = {"cg_iters": 200, "cg_tol": 1e-14, "fr_iters": 400}
    SIBP(model, eta=eta, lambda_w=lam_w, lambda_b=lam_b, hidden_solver=hidden, **iters).step(x, y)  # type: ignore[arg-type]
    tol = 1e-10 if hidden != "fr_cg" else 1e-6
    torch.testing.assert_close(l2.weight.detach(), W2n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l1.weight.detach(), W1n, rtol=tol, atol=tol)
    torch.testing.assert_close(l1.bias.detach(), b1n, rtol=tol, atol=tol)


# -- oracle 7: frozen mask, CG to convergence: all GN solvers = dense per-row masked ridge ---------------------


def _masked_problem(seed: int = 7) -> tuple[Tensor, Tensor, Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(10, 8, generator=g, dtype=DT)
    E = torch.randn(10, 6, generator=g, dtype=DT)
    M = (torch.rand(10, 6, generator=g, dtype=DT) > 0.4).to(DT)
    M[:, 0] = 0.0  # a dead neuron: no active sample, so no step
    return a, E, M, 0.5


def test_gn_solvers_agree_with_dense_masked_ridge() -> None:
    a, E, M, lam = _masked_problem()
    dense = torch.zeros(6, 8, dtype=DT)
    for j in range(6):
        S = M[:, j].bool()
        A_S = a[S]
        dense[j] = torch.linalg.solve(A_S.T @ A_S + lam * torch.eye(8, dtype=DT), A_S.T @ E[S, j])
    for solver in ("gn_cg", "gn_exact", "gn_primal_cg"):
        step = masked_gn_step(a, E, M, lam, solver=solver, maxit=200, tol=1e-14)
        torch.testing.assert_close(step.delta_w, dense, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(step.delta_z, a @ dense.T, rtol=1e-9, atol=1e-9)
        if step.dual is not None:
            assert torch.equal(step.dual * (1 - M), torch.zeros_like(E))
    assert torch.equal(masked_gn_step(a, E, M, lam, maxit=3).delta_w[0], torch.zeros(8, dtype=DT))


def test_gn_cg_in_float32_agrees_with_the_dense_masked_ridge() -> None:
    # solve_dtype float32: the Gram K and the CG both in float32, the step to float32 accuracy
    a, E, M, lam = _masked_problem()
    dense = torch.zeros(6, 8, dtype=DT)
    for j in range(6):
        A_S = a[M[:, j].bool()]
        dense[j] = torch.linalg.solve(A_S.T @ A_S + lam * torch.eye(8, dtype=DT), A_S.T @ E[M[:, j].bool(), j])
    step = masked_gn_step(a.float(), E.float(), M.float(), lam, maxit=200, tol=1e-6, solve_dtype=torch.float32)
    assert step.delta_z.dtype == torch.float32
    torch.testing.assert_close(step.delta_w.double(), dense, rtol=1e-4, atol=1e-5)


def test_gn_cg_dual_stays_zero_off_the_mask_at_every_budget() -> None:
    a, E, M, lam = _masked_problem(11)
    for maxit in (1, 2, 5):
        step = masked_gn_step(a, E, M, lam, solver="gn_cg", maxit=maxit, stop="fixed")
        assert step.dual is not None and step.iterations == maxit
        assert torch.equal(step.dual[M == 0], torch.zeros(int((M == 0).sum()), dtype=DT))


@pytest.mark.parametrize("solver", ("gn_cg", "gn_exact", "gn_primal_cg"))
def test_gn_step_row_scaling_and_in_place_update_match_the_formed_step(solver: str) -> None:
    # the method scales rows (the safeguard's 0 and powers of two) before forming Δw = ΛᵀF and accumulates it
    # into the weight in place; both must be the formed step, scaled and added afterwards
    a, E, M, lam = _masked_problem(5)
    step = masked_gn_step(a, E, M, lam, solver=solver, maxit=4)
    scale = torch.tensor([1.0, 0.5, 0.0, 0.125, 1.0, 0.25], dtype=DT)
    assert torch.equal(step.row_scaled_delta_w(scale), step.delta_w * scale.unsqueeze(1))
    assert torch.equal(step.row_scaled_delta_w(None), step.delta_w)
    W0 = torch.randn(6, 8, generator=torch.Generator().manual_seed(3), dtype=DT)
    for s in (None, scale):
        W = W0.clone()
        step.add_to(W, s)
        torch.testing.assert_close(W, W0 + step.row_scaled_delta_w(s), rtol=1e-15, atol=1e-15)


# -- oracle 8: masked model gradient at W0 = true gradient; the safeguarded step never raises a row ----------


def test_masked_model_gradient_equals_true_prox_gradient_at_warm_start() -> None:
    g = torch.Generator().manual_seed(13)
    a = torch.randn(10, 5, generator=g, dtype=DT)
    W0 = torch.randn(4, 5, generator=g, dtype=DT)
    b0 = torch.randn(4, generator=g, dtype=DT)
    T = torch.rand(10, 4, generator=g, dtype=DT)
    z0 = a @ W0.T + b0
    M = (z0 > 0).to(DT)
    masked_grad = 2.0 * (M * (M * z0 - T)).T @ a  # ∇ of ‖M ⊙ (aWᵀ + b) − T‖² at W0
    torch.testing.assert_close(masked_grad, prox_gradient(a, z0, T, W0, W0, 1.0, relu=True))


@pytest.mark.parametrize("seed", range(6))
def test_safeguarded_gn_step_never_raises_a_row_objective(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    m, n, q = 14, 6, 9
    a = torch.randn(m, n, generator=g, dtype=DT)
    W0 = torch.randn(q, n, generator=g, dtype=DT)
    b0 = torch.randn(q, generator=g, dtype=DT)
    z0 = a @ W0.T + b0
    T = torch.relu(z0) + 3.0 * torch.randn(m, q, generator=g, dtype=DT)  # far targets: big, nonlinear steps
    lam = 0.05
    M = (z0 > 0).to(DT)
    step = masked_gn_step(a, T - z0, M, lam, maxit=4)
    guard = gn_step_safeguard(z0, step.delta_z, step.delta_w.pow(2).sum(1), T, lam, relu=True)
    W = W0 + guard.scale.unsqueeze(1) * step.delta_w
    z = a @ W.T + b0
    after = (torch.relu(z) - T).pow(2).sum(0) + lam * (W - W0).pow(2).sum(1)
    before = (torch.relu(z0) - T).pow(2).sum(0)
    assert bool((after <= before + 1e-12).all())
    torch.testing.assert_close(after, guard.objective_after)


def test_safeguard_halves_and_reverts_rows() -> None:
    z0 = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=DT)
    T = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=DT)  # column 0 fits already: any step makes it worse
    dz = torch.tensor([[0.5, 0.0], [0.0, 0.9]], dtype=DT)
    guard = gn_step_safeguard(z0, dz, torch.zeros(2, dtype=DT), T, 1.0, relu=True, max_halvings=3)
    assert guard.scale.tolist() == [0.0, 1.0] and guard.rows_reverted == 1 and guard.halvings == 3


# -- the method as a whole -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDEN)
def test_every_solver_decreases_the_training_loss(hidden: str) -> None:
    model = _net((6, 16, 3))
    x, y = _batch(m=32)
    method = get("sibp")(model, hidden_solver=hidden)
    first = method.step(x, y).loss
    for _ in range(10):
        last = method.step(x, y)
    assert last.loss < 0.7 * first
    for key in ("prox_w_rel_decrease_0", "prox_b_rel_decrease_1", "step_norm_w_0"):
        assert key in last.info
    if hidden != "fr_cg":
        assert last.info["safeguard_rows_reverted_0"] >= 0 and "cg_iters_0" in last.info


def test_official_solvers_train_and_report() -> None:
    model = _net((6, 16, 3))
    x, y = _batch(m=32)
    method = SIBP(model, eta=0.1, hidden_solver="fr_cg", output_solver="fr_cg", quirks="official")
    first = method.step(x, y)
    for _ in range(10):
        last = method.step(x, y)
    assert last.loss < first.loss
    assert {"fr_steps_0", "fr_steps_1", "prox_w_rel_decrease_0"} <= set(last.info)


def test_float32_model_stays_float32() -> None:
    torch.manual_seed(0)
    model = mlp("6-7-3")
    x, y = _batch()
    SIBP(model).step(x.float(), y)
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize(
    "model",
    [
        lenet5(),
        nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3)),
        nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3)),
        nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Dropout(), nn.Linear(4, 3)),
    ],
)
def test_unsupported_models_raise(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="sibp"):
        SIBP(model)


def test_bad_inputs_raise() -> None:
    method = SIBP(_net())
    x, y = _batch()
    with pytest.raises(ValueError, match="NaN"):
        method.step(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="integer labels"):
        method.step(x, y.to(DT))
    with pytest.raises(ValueError, match="labels"):
        method.step(x, y + 5)
    with pytest.raises(ValueError, match="samples"):
        method.step(x, y[:-1])
    with pytest.raises(ValueError, match="mse"):
        SIBP(_net(), loss="mse")
