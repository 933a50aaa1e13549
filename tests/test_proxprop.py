"""ProxProp against its references (docs/methods/proxprop.md §8): autograd, dense solves, closed forms and limits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from liftkit.methods import get
from liftkit.methods.proxprop import ProxProp

DT = torch.float64


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _mlp(widths: tuple[int, ...] = (6, 9, 7, 4), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).to(DT)


def _convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1, stride=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).to(DT)


def _data(
    n: int = 5, shape: tuple[int, ...] = (6,), classes: int = 4, seed: int = 1
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _autograd(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _flat_dir(d) -> torch.Tensor:
    return torch.cat([d.weight.reshape(-1)] + ([d.bias.reshape(-1)] if d.bias is not None else []))


def _layer_grad(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, module: nn.Module) -> torch.Tensor:
    grads = dict(zip(model.parameters(), _autograd(model, x, y)))
    return torch.cat([grads[p].reshape(-1) for p in module.parameters()])


def _directions(method: ProxProp, x: torch.Tensor, y: torch.Tensor) -> list:
    _, signals, _ = method.backward_signals(x, y)
    return [method.direction(layer.module, a, G) for layer, (a, G) in zip(method.layers, signals)]


def _dense_direction(a: torch.Tensor, G: torch.Tensor, beta: float) -> torch.Tensor:
    """(ĀᵀĀ + βI)⁻¹ĀᵀG by a dense solve, returned as [W.grad (flattened), b.grad]."""
    A = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    theta = torch.linalg.solve(A.T @ A + beta * torch.eye(A.shape[1], dtype=a.dtype), A.T @ G)
    return torch.cat([theta[:-1].T.reshape(-1), theta[-1]])


# -- backward signal and the gradient mode ------------------------------------------------------------------


@pytest.mark.parametrize("build,shape,classes", [(_mlp, (6,), 4), (_convnet, (2, 6, 6), 5)])
def test_gradient_mode_equals_autograd(build, shape, classes) -> None:
    model = build()
    x, y = _data(7, shape, classes)
    reference = _autograd(model, x, y)
    method = ProxProp(model, solver="gradient")
    dirs = _directions(method, x, y)
    for layer, d in zip(method.layers, dirs):
        grad = _layer_grad(model, x, y, layer.module)
        torch.testing.assert_close(_flat_dir(d), grad, rtol=1e-12, atol=1e-12)
    # the whole step with plain SGD is θ − lr ∇J for every parameter, the explicit last layer included
    before = [p.detach().clone() for p in model.parameters()]
    get("proxprop")(model, solver="gradient", optimizer="sgd", lr=0.3).step(x, y)
    for p, p0, g in zip(model.parameters(), before, reference):
        torch.testing.assert_close(p.detach(), p0 - 0.3 * g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["exact", "cg3", "gradient"])
def test_backward_signal_is_backprops(solver: str) -> None:
    """G = ∂J/∂z of every ProxProp layer (hence grad_input, computed with the old weights) equals
    autograd's."""
    model = _mlp((6, 9, 8, 7, 4))
    x, y = _data(5)
    zs: list[torch.Tensor] = []
    h = x
    for m in model:
        h = m(h)
        if isinstance(m, nn.Linear):
            h.retain_grad()
            zs.append(h)
    F.cross_entropy(h, y).backward()
    method = ProxProp(model, solver=solver)
    loss, signals, explicit = method.backward_signals(x, y)
    assert len(signals) == 3
    for (_, G), z in zip(signals, zs[:-1]):
        torch.testing.assert_close(G, z.grad, rtol=1e-12, atol=1e-14)
    last = model[-1]
    torch.testing.assert_close(explicit[0], last.weight.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))


# -- exact solves ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["auto", "gram", "push_through"])
@pytest.mark.parametrize("batch", [4, 20])
def test_exact_linear_equals_dense_solve(form: str, batch: int) -> None:
    model = _mlp()
    x, y = _data(batch)
    method = ProxProp(model, solver="exact", form=form, tau_theta=0.3, residuals=True)
    _, signals, _ = method.backward_signals(x, y)
    for layer, (a, G) in zip(method.layers, signals):
        d = method.direction(layer.module, a, G)
        torch.testing.assert_close(_flat_dir(d), _dense_direction(a, G, 1 / 0.3), rtol=1e-9, atol=1e-12)
        assert d.residual < 1e-10
        assert d.cos > 0


def test_push_through_in_float32_matches_the_float64_dense_solve() -> None:
    # the N×N inverse is formed in float64 and applied in the model's dtype: a float32 model's direction must
    # still be the exact prox to float32 accuracy
    model = _mlp((30, 40, 5)).float()
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(16, 30, generator=g), torch.randint(0, 5, (16,), generator=g)
    method = ProxProp(model, solver="exact", form="push_through", tau_theta=0.3, residuals=True)
    _, signals, _ = method.backward_signals(x, y)
    (a, G), layer = signals[0], method.layers[0]
    d = method.direction(layer.module, a, G)
    assert d.weight.dtype == torch.float32
    dense = _dense_direction(a.double(), G.double(), 1 / 0.3)
    torch.testing.assert_close(_flat_dir(d).double(), dense, rtol=2e-5, atol=1e-7)
    assert d.residual < 1e-5


def test_exact_direction_is_gradient_preconditioned_by_M() -> None:
    """Prop. 2: θ_old − θ_prox = M⁻¹∇J with M = ĀᵀĀ + I/τ_θ; checked as M·direction = ∇J."""
    model = _mlp()
    x, y = _data(8)
    method = ProxProp(model, tau_theta=2.0)
    (d, _) = _directions(method, x, y)
    _, signals, _ = method.backward_signals(x, y)
    a = signals[0][0]
    A = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], dim=1)
    theta = torch.cat([d.weight.T, d.bias.unsqueeze(0)])
    grad = _layer_grad(model, x, y, model[1])
    lhs = A.T @ A @ theta + theta / 2.0
    torch.testing.assert_close(torch.cat([lhs[:-1].T.reshape(-1), lhs[-1]]), grad, rtol=1e-10, atol=1e-12)


def test_tau_theta_to_zero_gives_backprop() -> None:
    model = _mlp()
    x, y = _data(6)
    tau_theta = 1e-7
    for solver in ("exact", "cg3"):
        method = ProxProp(model, solver=solver, tau_theta=tau_theta)
        for layer, d in zip(method.layers, _directions(method, x, y)):
            grad = _layer_grad(model, x, y, layer.module)
            # the error is O(τ_θ λ_max(ĀᵀĀ)) relative to ‖∇J‖, also in entries where ∇J vanishes
            err = float((_flat_dir(d) / tau_theta - grad).abs().max())
            assert err < 1e-4 * float(grad.abs().max()), (solver, err)


def test_tau_theta_to_infinity_gives_minimal_change_fit() -> None:
    """Θ_prox → Θ₀ + Ā⁺(T − ĀΘ₀) with T = ĀΘ₀ − G, i.e. the direction → Ā⁺G (N < n+1: Ā has full row
    rank)."""
    model = _mlp()
    x, y = _data(4)
    method = ProxProp(model, tau_theta=1e9, form="push_through")
    _, signals, _ = method.backward_signals(x, y)
    a, G = signals[0]
    d = method.direction(model[1], a, G)
    A = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], dim=1)
    theta = torch.linalg.pinv(A) @ G
    torch.testing.assert_close(_flat_dir(d), torch.cat([theta[:-1].T.reshape(-1), theta[-1]]), rtol=1e-6,
                               atol=1e-9)


# -- CG -----------------------------------------------------------------------------------------------------


def test_cg_to_convergence_equals_exact_linear() -> None:
    model = _mlp()
    x, y = _data(12)
    exact = _directions(ProxProp(model, solver="exact", tau_theta=0.5), x, y)
    cg_method = ProxProp(model, solver="cg", cg_iters=200, cg_tol=1e-12, cg_eps=1e-30, tau_theta=0.5)
    cg = _directions(cg_method, x, y)
    for e, c in zip(exact, cg):
        torch.testing.assert_close(_flat_dir(c), _flat_dir(e), rtol=1e-8, atol=1e-11)
        assert 0 < c.iterations < 200


def test_conv_exact_unfold_equals_cg_to_convergence() -> None:
    model = _convnet()
    x, y = _data(6, (2, 6, 6), 5)
    exact_method = ProxProp(model, solver="exact", tau_theta=0.2, residuals=True, unfold_chunk_rows=40)
    assert exact_method.reporting_name == "ProxProp (exact-unfold)"
    exact = _directions(exact_method, x, y)
    cg_method = ProxProp(model, solver="cg", cg_iters=400, cg_tol=1e-13, cg_eps=1e-30, tau_theta=0.2)
    cg = _directions(cg_method, x, y)
    for e, c in zip(exact, cg):
        assert e.residual < 1e-10
        torch.testing.assert_close(_flat_dir(c), _flat_dir(e), rtol=1e-7, atol=1e-10)
    # chunking the unfold Gram does not change it
    whole = _directions(ProxProp(model, solver="exact", tau_theta=0.2), x, y)
    for e, w in zip(exact, whole):
        torch.testing.assert_close(_flat_dir(w), _flat_dir(e), rtol=1e-10, atol=1e-13)


def test_cg1_is_cauchy_scaled_gradient_per_neuron() -> None:
    model = _mlp()
    x, y = _data(8)
    beta = 1 / 0.7
    method = ProxProp(model, solver="cg1", tau_theta=0.7)
    _, signals, _ = method.backward_signals(x, y)
    a, G = signals[0]
    d = method.direction(model[1], a, G)
    A = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], dim=1)
    grad = A.T @ G  # one column per output neuron
    M = A.T @ A + beta * torch.eye(A.shape[1], dtype=DT)
    alpha = (grad * grad).sum(0) / ((grad * (M @ grad)).sum(0) + 1e-6)
    expected = alpha * grad
    torch.testing.assert_close(torch.cat([d.weight.T, d.bias.unsqueeze(0)]), expected, rtol=1e-10, atol=1e-13)
    assert d.iterations == 1


def test_cg1_is_cauchy_scaled_gradient_per_conv_layer() -> None:
    model = _convnet()
    x, y = _data(4, (2, 6, 6), 5)
    method = ProxProp(model, solver="cg1", tau_theta=0.7)
    _, signals, _ = method.backward_signals(x, y)
    a, G = signals[0]
    conv = model[0]
    d = method.direction(conv, a, G)
    grad = _layer_grad(model, x, y, conv)
    # M∇ through autograd: Aᵀ(A∇) with A the conv as a function of its parameters, plus β∇
    gw, gb = grad[: conv.weight.numel()].reshape(conv.weight.shape), grad[conv.weight.numel():]
    out = F.conv2d(a, gw, gb, padding=1)
    wv = conv.weight.detach().clone().requires_grad_(True)
    bv = conv.bias.detach().clone().requires_grad_(True)
    z = F.conv2d(a, wv, bv, padding=1)
    aw, ab = torch.autograd.grad(z, (wv, bv), grad_outputs=out)
    Mg = torch.cat([aw.reshape(-1), ab]) + grad / 0.7
    alpha = (grad @ grad) / (grad @ Mg + 1e-6)
    torch.testing.assert_close(_flat_dir(d), alpha * grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("build,shape,classes", [(_mlp, (6,), 4), (_convnet, (2, 6, 6), 5)])
def test_every_direction_is_a_descent_direction(build, shape, classes) -> None:
    model = build()
    x, y = _data(9, shape, classes)
    for solver in ("exact", "cg1", "cg2", "cg3", "cg5", "cg10"):
        for tau_theta in (0.05, 1.0, 50.0):
            method = ProxProp(model, solver=solver, tau_theta=tau_theta, cg_stop="fixed")
            for layer, d in zip(method.layers, _directions(method, x, y)):
                grad = _layer_grad(model, x, y, layer.module)
                inner = float(grad @ _flat_dir(d))
                assert inner > 0, (solver, tau_theta, layer.index)
                assert d.cos == pytest.approx(inner / float(grad.norm() * _flat_dir(d).norm()), rel=1e-9)


def test_cg_stop_rules() -> None:
    model = _mlp()
    x, y = _data(12)
    fixed = _directions(ProxProp(model, solver="cg", cg_iters=7, cg_stop="fixed"), x, y)
    assert all(d.iterations == 7 for d in fixed)
    loose = _directions(ProxProp(model, solver="cg", cg_iters=50, cg_tol=0.5), x, y)
    assert all(1 <= d.iterations < 50 for d in loose)


# -- Prop. 1: backprop is a sweep of explicit penalty steps ------------------------------------------------


def _penalty_sweep(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, tau: float) -> list[torch.Tensor]:
    """Algorithm 1 of the paper with ρ = γ = 1/τ on Linear/ReLU layers, written out explicitly."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    a = [model[0](x)]  # a_0
    z = []
    for i, lin in enumerate(linears):
        z.append(lin(a[-1]).detach())
        if i < len(linears) - 1:
            a.append(torch.relu(z[-1]))
    rho = gamma = 1.0 / tau
    new_params: list[list[torch.Tensor]] = [[] for _ in linears]
    # explicit step on the output layer and its input, from the loss
    last = linears[-1]
    W = last.weight.detach().clone().requires_grad_(True)
    b = last.bias.detach().clone().requires_grad_(True)
    a_in = a[-1].clone().requires_grad_(True)
    gW, gb, ga = torch.autograd.grad(F.cross_entropy(F.linear(a_in, W, b), y), (W, b, a_in))
    new_params[-1] = [W - tau * gW, b - tau * gb]
    a_half = a_in.detach() - tau * ga
    for lvl in range(len(linears) - 2, -1, -1):
        zl = z[lvl]
        # gradient step with step 1/γ on (γ/2)‖σ(z) − a^{k+½}‖²
        sig_prime = (zl > 0).to(zl.dtype)
        z_half = zl - (1.0 / gamma) * gamma * sig_prime * (torch.relu(zl) - a_half)
        lin = linears[lvl]
        W = lin.weight.detach().clone().requires_grad_(True)
        b = lin.bias.detach().clone().requires_grad_(True)
        a_prev = a[lvl].clone().requires_grad_(True)
        penalty = 0.5 * rho * (F.linear(a_prev, W, b) - z_half).pow(2).sum()
        gW, gb, ga = torch.autograd.grad(penalty, (W, b, a_prev))
        new_params[lvl] = [W - tau * gW, b - tau * gb]
        a_half = a_prev.detach() - tau * ga
    return [p.detach() for pair in new_params for p in pair]


def test_penalty_sweep_equals_one_gradient_step() -> None:
    model = _mlp((6, 9, 8, 4))
    x, y = _data(5)
    tau = 0.37
    swept = _penalty_sweep(model, x, y, tau)
    grads = _autograd(model, x, y)
    expected = [p.detach() - tau * g for p, g in zip(model.parameters(), grads)]
    for s, e in zip(swept, expected):
        torch.testing.assert_close(s, e, rtol=1e-12, atol=1e-14)
    # ... and ProxProp's gradient mode under plain SGD(lr = τ) takes the same step
    get("proxprop")(model, solver="gradient", optimizer="sgd", lr=tau).step(x, y)
    for p, s in zip(model.parameters(), swept):
        torch.testing.assert_close(p.detach(), s, rtol=1e-12, atol=1e-14)


def test_sgd_step_is_prop2_update() -> None:
    """With plain SGD, one step is θ − τ M⁻¹∇J on the hidden layer and θ − τ∇J on the last."""
    model = _mlp((6, 9, 4))
    x, y = _data(5)
    method = ProxProp(model, optimizer="sgd", lr=0.5, tau_theta=0.1)
    (d,) = _directions(method, x, y)
    grads = _autograd(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    method.step(x, y)
    params = list(model.parameters())
    torch.testing.assert_close(params[0].detach(), before[0] - 0.5 * d.weight)
    torch.testing.assert_close(params[1].detach(), before[1] - 0.5 * d.bias)
    torch.testing.assert_close(params[2].detach(), before[2] - 0.5 * grads[2])


# -- training, state and errors -----------------------------------------------------------------------------


def test_defaults_reduce_the_loss_and_report_diagnostics() -> None:
    model = _mlp((6, 16, 4))
    x, y = _data(32)
    method = get("proxprop")(model)
    first = method.step(x, y)
    for _ in range(30):
        last = method.step(x, y)
    assert last.loss < first.loss
    assert first.info["cos_1"] > 0 and first.info["descent_violation"] == 0.0
    cg = get("proxprop")(_mlp((6, 16, 4)), solver="cg3").step(x, y)
    assert cg.info["cg_iters_1"] >= 1


@pytest.mark.parametrize(
    "model,match",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).to(DT), "at least two"),
        (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 4)).to(DT), "BatchNorm1d"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 4)).to(DT), "grouped"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.Flatten(), nn.Linear(16, 4)).to(DT), "padding"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.Flatten(),
                       nn.Linear(16, 4)).to(DT), "padding_mode"),
        (nn.Sequential(nn.Sequential(nn.Linear(6, 5)), nn.Linear(5, 4)).to(DT), "Sequential"),
        (nn.Linear(6, 4).to(DT), "nn.Sequential"),
    ],
)
def test_unsupported_models_raise(model: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProxProp(model)


def test_parameter_free_modules_and_bias_free_layers_work() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Dropout(0.0),
                          nn.Linear(8, 7), nn.LeakyReLU(0.1), nn.Linear(7, 4)).to(DT)
    x, y = _data(5)
    for solver in ("exact", "cg2", "gradient"):
        method = ProxProp(model, solver=solver, form="gram")
        for layer, d in zip(method.layers, _directions(method, x, y)):
            assert (d.bias is None) == (layer.module.bias is None)
            grad = _layer_grad(model, x, y, layer.module)
            assert float(grad @ _flat_dir(d)) > 0
    method = ProxProp(model, tau_theta=0.05)
    _, signals, _ = method.backward_signals(x, y)
    a, G = signals[0]
    theta = torch.linalg.solve(a.T @ a + 20 * torch.eye(6, dtype=DT), a.T @ G)
    torch.testing.assert_close(method.direction(model[1], a, G).weight, theta.T)


def test_non_finite_input_and_divergence() -> None:
    model = _mlp()
    x, y = _data(5)
    method = ProxProp(model)
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        method.step(bad, y)
    with torch.no_grad():
        model[-1].weight.fill_(math.inf)
    before = [p.detach().clone() for p in model.parameters()]
    stats = method.step(x, y)
    assert not math.isfinite(stats.loss) and stats.info["diverged"] == 1.0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


# -- cost switches: the Gram dtype and the cadence of the cosine ---------------------------------------------


@pytest.mark.parametrize("form", ["gram", "push_through"])
def test_float32_gram_products_match_the_float64_ones_to_float32_accuracy(form: str) -> None:
    # solve_dtype=auto takes a float32 model's Gram products in float32 (the factorisation stays float64):
    # the direction must agree with the float64-product solve and the dense float64 solve to float32 accuracy
    g = torch.Generator().manual_seed(11)
    model = _mlp((30, 40, 5)).float()
    x, y = torch.rand(16, 30, generator=g), torch.randint(0, 5, (16,), generator=g)
    fast = ProxProp(model, form=form, tau_theta=0.3, solve_dtype="auto")
    exact = ProxProp(model, form=form, tau_theta=0.3, solve_dtype="float64")
    _, signals, _ = fast.backward_signals(x, y)
    (a, G), layer = signals[0], fast.layers[0]
    d32, d64 = fast.direction(layer.module, a, G), exact.direction(layer.module, a, G)
    assert d32.weight.dtype == torch.float32
    dense = _dense_direction(a.double(), G.double(), 1 / 0.3)
    torch.testing.assert_close(_flat_dir(d32).double(), dense, rtol=5e-5, atol=1e-7)
    torch.testing.assert_close(_flat_dir(d32), _flat_dir(d64), rtol=5e-5, atol=1e-7)
    assert 0.0 < d32.cos <= 1.0 and d32.cos == pytest.approx(d64.cos, rel=1e-4)


def test_the_cosine_is_computed_every_diagnostics_every_steps_without_changing_the_weights() -> None:
    x, y = _data(8)
    every = get("proxprop")(_mlp(), form="push_through", diagnostics_every=3)
    each = get("proxprop")(_mlp(), form="push_through", diagnostics_every=1)
    for step in range(7):
        sparse, dense = every.step(x, y), each.step(x, y)
        for p, q in zip(every.model.parameters(), each.model.parameters()):
            assert torch.equal(p, q)
        if step % 3 == 0:
            assert sparse.info["cos_1"] == dense.info["cos_1"] and sparse.info["min_cos"] == dense.info["min_cos"]
        else:
            assert "cos_1" not in sparse.info and "min_cos" not in sparse.info and "cos_1" in dense.info
