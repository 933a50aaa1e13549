"""Fenchel lifted networks (METHODS.md §3.8 oracles): penalty, lower bound, block solvers, adjoints, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as tF
from torch import nn

from liftkit.methods import get
from liftkit.methods.fenchel import Fenchel, LayerOperator
from liftkit.models import as_chain, lenet5, mlp

scipy_optimize = pytest.importorskip("scipy.optimize")

DT = torch.float64


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _tiny(spec: str = "6-7-5-3", m: int = 12, seed: int = 0, **hp) -> tuple[Fenchel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = mlp(spec).to(DT)
    widths = [int(w) for w in spec.split("-")]
    x = torch.randn(m, widths[0], dtype=DT)
    y = torch.randint(0, widths[-1], (m,))
    return Fenchel(model, **hp), x, y


def _tiny_lenet(m: int = 2, **hp) -> tuple[Fenchel, torch.Tensor, torch.Tensor]:
    model = lenet5().to(DT)
    x = torch.rand(m, 1, 28, 28, dtype=DT)
    y = torch.randint(0, 10, (m,))
    return Fenchel(model, **hp), x, y


def _onehot(meth: Fenchel, y: torch.Tensor) -> torch.Tensor:
    return tF.one_hot(y, meth.chain[-1].linear.weight.shape[0]).to(DT)


# -- penalty ---------------------------------------------------------------------------------------------------
def test_penalty_is_neo_and_zero_only_at_relu() -> None:
    meth, _x, _ = _tiny()
    act = meth.chain[0].activation
    assert act is not None
    U = torch.randn(50, 4, dtype=DT)
    V = torch.relu(torch.randn(50, 4, dtype=DT))
    neo = (V * V - 2 * U * V + torch.relu(U) ** 2).sum()
    assert torch.allclose(2 * act.penalty(U, V).sum(), neo)
    assert float(act.penalty(U, V).min()) >= -1e-12
    assert float(act.penalty(U, torch.relu(U)).abs().max()) == 0.0
    # any other non-negative X gives a positive gap
    assert bool((act.penalty(U, torch.relu(U) + 0.1 * torch.rand_like(U) + 1e-3) > 0).all())


def test_forward_pass_has_zero_penalty_and_relaxed_equals_loss() -> None:
    for meth, x, y in (_tiny(), _tiny_lenet()):
        xs = meth.lift(x)
        assert all(p == 0.0 for p in meth.layer_penalties(xs))
        ce_sum = float(tF.cross_entropy(meth.model(x), y, reduction="sum").detach())
        assert meth.relaxed_objective(xs, y) == pytest.approx(ce_sum, rel=1e-12)


def test_hidden_blocks_stationary_at_forward_init_and_last_block_gradient() -> None:
    meth, x, y = _tiny()
    xs = meth.lift(x)
    Y = _onehot(meth, y)
    for l in range(1, meth.L):
        grad, _ = meth._x_block_parts(l, xs, Y)
        g = grad(xs[l])
        # projected gradient: zero where X > 0, and only pushing into the bound where X = 0
        assert float(g[xs[l] > 0].abs().max()) < 1e-12
        assert float(g[xs[l] == 0].min()) >= -1e-12
    grad, _ = meth._x_block_parts(meth.L, xs, Y)
    g = grad(xs[meth.L])
    W = meth.chain[-1].linear.weight
    expected = (torch.softmax(meth.model(x), 1) - Y) @ W
    pos = xs[meth.L] > 0
    assert torch.allclose(g[pos], expected[pos], atol=1e-12)


# -- block solvers -----------------------------------------------------------------------------------------------
def test_x_block_gradients_match_autograd_and_lipschitz_bounds_them() -> None:
    meth, x, y = _tiny(lbd_coef=(2.0, 3.0), lambdas=(0.5, 2.0))
    xs = meth.lift(x)
    Y = _onehot(meth, y)
    for l in range(1, meth.L + 1):
        X = xs[l] + 0.3 * torch.rand_like(xs[l]) + 0.01  # interior of dom F
        Xr = X.clone().requires_grad_(True)
        (g_auto,) = torch.autograd.grad(meth.x_block_objective(l, xs, y, Xr), Xr)
        grad, lip = meth._x_block_parts(l, xs, Y)
        assert torch.allclose(grad(X), g_auto, atol=1e-10)
        for _ in range(5):
            a, b = torch.randn_like(X), torch.randn_like(X)
            assert float((grad(a) - grad(b)).norm()) <= lip * float((a - b).norm()) * (1 + 1e-9)


@pytest.mark.parametrize("solver", ["fista", "pgd"])
def test_x_block_solver_matches_scipy_lbfgsb(solver: str) -> None:
    meth, x, y = _tiny(x_solver=solver, x_iters=5000, x_tol=1e-13, lbd_coef=2.0)
    ref = Fenchel(meth.model, x_solver="scipy_lbfgsb", x_iters=15000, lbd_coef=2.0)
    xs = meth.lift(x)
    # move the output layer so that every block has a non-trivial optimum
    xs[meth.L] = xs[meth.L] + 0.5 * torch.rand_like(xs[meth.L])
    for l in range(meth.L, 0, -1):
        X, _ = meth.solve_x_block(l, xs, y)
        X_ref, _ = ref.solve_x_block(l, xs, y)
        f = float(meth.x_block_objective(l, xs, y, X))
        f_ref = float(ref.x_block_objective(l, xs, y, X_ref))
        f_start = float(meth.x_block_objective(l, xs, y, xs[l]))
        assert float(X.min()) >= 0.0
        assert f <= f_start
        assert abs(f - f_ref) <= 1e-6 * max(1.0, abs(f_ref))
        xs[l] = X


def _w_reference(meth: Fenchel, l: int, xs, y, W0, b0) -> float:
    """Minimum of the (W_l, b_l) block by SciPy L-BFGS on autograd gradients."""
    lin = meth.chain[l].linear
    nW = lin.weight.numel()

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.from_numpy(flat).requires_grad_(True)
        W, b = t[:nW].reshape(lin.weight.shape), t[nW:]
        value = meth.w_block_objective(l, xs, y, W, b, W0, b0)
        (g,) = torch.autograd.grad(value, t)
        return float(value.detach()), g.numpy()

    t0 = torch.cat([W0.reshape(-1), b0]).numpy()
    res = scipy_optimize.minimize(fun, t0, jac=True, method="L-BFGS-B", options={"maxiter": 20000, "gtol": 1e-12,
                                                                                 "ftol": 1e-15})
    return float(res.fun)


@pytest.mark.parametrize("solver", ["lbfgs", "fista", "mm"])
def test_w_block_solver_matches_reference(solver: str) -> None:
    iters = {"lbfgs": 500, "fista": 20000, "mm": 3000}[solver]
    meth, x, y = _tiny(w_solver=solver, w_iters=iters, w_tol=1e-12, rho_d=(0.5, 0.3, 0.2), rho=0.1)
    xs = meth.lift(x)
    for l in range(meth.L, 0, -1):
        xs[l] = xs[l] + 0.3 * torch.rand_like(xs[l])  # a relaxed point, away from the forward pass
    for l in range(meth.L + 1):
        lin = meth.chain[l].linear
        W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
        f_start = float(meth.w_block_objective(l, xs, y, W0, b0, W0, b0))
        meth.solve_w_block(l, xs, y, W0, b0)
        f = float(meth.w_block_objective(l, xs, y, lin.weight.detach(), lin.bias.detach(), W0, b0))
        f_ref = _w_reference(meth, l, xs, y, W0, b0)
        assert f < f_start
        assert abs(f - f_ref) <= 1e-6 * max(1.0, abs(f_ref)), (l, f, f_ref)


def test_w_block_gradient_matches_autograd_linear_and_conv() -> None:
    for meth, x, y in (_tiny(rho_d=0.7, rho=0.2), _tiny_lenet(rho_d=0.7, rho=0.2)):
        xs = meth.lift(x)
        for l in range(1, meth.L + 1):
            xs[l] = xs[l] + 0.1 * torch.rand_like(xs[l])
        for l in range(meth.L + 1):
            op = meth.operators(x)[l]
            lin = op.linear
            W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
            W = (W0 + 0.05 * torch.randn_like(W0)).requires_grad_(True)
            b = (b0 + 0.05 * torch.randn_like(b0)).requires_grad_(True)
            gW_auto, gb_auto = torch.autograd.grad(meth.w_block_objective(l, xs, y, W, b, W0, b0), (W, b))
            vg = meth._w_block_value_grad(l, op.glue(xs[l]), xs, _onehot(meth, y), y, W0, b0)
            value, gW, gb = vg(W.detach(), b.detach(), True)
            expected = float(meth.w_block_objective(l, xs, y, W.detach(), b.detach(), W0, b0))
            assert value == pytest.approx(expected, rel=1e-10)
            assert torch.allclose(gW, gW_auto, atol=1e-9) and torch.allclose(gb, gb_auto, atol=1e-9)


@pytest.mark.parametrize("solver", ["lbfgs", "fista", "mm"])
def test_huge_rho_d_keeps_weights_at_anchor(solver: str) -> None:
    meth, x, y = _tiny(rho_d=1e12, rho_d_output=None, w_solver=solver)
    before = [p.detach().clone() for p in meth.model.parameters()]
    meth.step(x, y)
    for p, q in zip(meth.model.parameters(), before):
        assert torch.allclose(p, q, atol=1e-9)


# -- the relaxation is a lower bound -------------------------------------------------------------------------------
def test_block_optima_never_exceed_the_ordinary_loss_and_sweeps_descend() -> None:
    for seed in range(3):
        meth, x, y = _tiny(seed=seed, x_iters=3000, x_tol=1e-13, monitor="full")
        xs = meth.lift(x)
        loss_sum = float(tF.cross_entropy(meth.model(x), y, reduction="sum").detach())
        previous = meth.relaxed_objective(xs, y)
        for _ in range(5):  # block coordinate descent on X with W fixed
            for l in range(meth.L, 0, -1):
                xs[l], _ = meth.solve_x_block(l, xs, y)
                current = meth.relaxed_objective(xs, y)
                assert current <= previous + 1e-9
                previous = current
        assert previous < loss_sum
        # a full step (W-blocks too) still reports a relaxed objective below the batch loss it started from
        stats = meth.step(x, y)
        assert stats.info["relaxed_objective"] <= stats.loss + 1e-12
        assert stats.info["relaxed_objective_after_x"] <= stats.loss + 1e-12


def test_one_backward_sweep_changes_every_lifted_variable() -> None:
    for meth, x, y in (_tiny("6-7-5-4-3"), _tiny_lenet()):
        xs = meth.lift(x)
        start = [t.clone() for t in xs]
        for l in range(meth.L, 0, -1):
            xs[l], _ = meth.solve_x_block(l, xs, y)
        for l in range(1, meth.L + 1):
            assert float((xs[l] - start[l]).abs().max()) > 1e-8, l


# -- operators -----------------------------------------------------------------------------------------------------
def test_conv_pool_and_linear_flatten_pool_adjoints() -> None:
    model = lenet5().to(DT)
    chain = as_chain(model, method="fenchel", allow_conv=True, allowed_activations=("relu",))
    shapes = [(1, 28, 28), (6, 28, 28), (16, 10, 10), (120,), (84,)]
    for layer, shape in zip(chain, shapes):
        op = LayerOperator(layer, shape)
        X = torch.randn(3, *shape, dtype=DT)
        V = torch.randn(3, *op.out_shape, dtype=DT)
        lhs = float((op.apply(X, with_bias=False) * V).sum())
        rhs = float((X * op.adjoint(V)).sum())
        assert lhs == pytest.approx(rhs, rel=1e-12)
    # pooling belongs to the operator of the layer after it: layer 1 sees avgpool(X_1)
    assert [type(m).__name__ for m in chain[1].pre] == ["AvgPool2d"]
    assert [type(m).__name__ for m in chain[2].pre] == ["AvgPool2d", "Flatten"]


def test_operator_norm_bounds_the_operator() -> None:
    model = lenet5().to(DT)
    chain = as_chain(model, method="fenchel", allow_conv=True, allowed_activations=("relu",))
    op = LayerOperator(chain[1], (6, 28, 28))
    norm = op.norm(30)
    for _ in range(3):
        X = torch.randn(1, 6, 28, 28, dtype=DT)
        assert float(op.apply(X, with_bias=False).norm()) <= norm * float(X.norm())


# -- the method ----------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_gives_identical_next_step() -> None:
    meth, x, y = _tiny()
    meth.step(x, y)
    state = meth.state_dict()
    a = meth.step(x, y)
    clone_model = mlp("6-7-5-3").to(DT)
    clone = Fenchel(clone_model)
    clone.load_state_dict(state)
    b = clone.step(x, y)
    assert a.loss == b.loss and a.info == b.info
    for p, q in zip(meth.model.parameters(), clone.model.parameters()):
        assert torch.equal(p, q)


def test_training_reduces_the_loss_fc_and_lenet() -> None:
    meth, x, y = _tiny(m=40)
    losses = [meth.step(x, y).loss for _ in range(10)]
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.85 * losses[0]
    meth, x, y = _tiny_lenet(m=4, rho_d=1.0)
    first = meth.step(x, y)
    assert first.info["loss_after"] < first.loss


def test_registry_defaults_and_init_option() -> None:
    cls = get("fenchel")
    assert cls is Fenchel and cls.default_batch_size == 500 and cls.default_loss == "ce"
    model = mlp("6-7-3").to(DT)
    before = [p.detach().clone() for p in model.parameters()]
    Fenchel(model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    Fenchel(model, init="official")
    assert torch.all(model[1].bias == 0.1) and not torch.equal(model[1].weight, before[0])


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)), "sigmoid"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2)), "MaxPool2d"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)), "BatchNorm"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.ReLU()), "logits"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2)), "bias"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)), "groups=2"),
    ],
)
def test_unsupported_models_raise(model: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fenchel(model)


@pytest.mark.parametrize(
    "hp, message",
    [
        ({"lambdas": -1.0}, "lambdas"),
        ({"rho_d": -0.5}, "rho_d"),
        ({"rho": math.nan}, "rho"),
        ({"lbd_coef": 0.0}, "lbd_coef"),
        ({"alternations": 0}, "alternations"),
        ({"x_solver": "newton"}, "x_solver"),
        ({"w_solver": "adam"}, "w_solver"),
        ({"x_iters": 0}, "x_iters"),
        ({"init": "xavier"}, "init"),
        ({"monitor": "all"}, "monitor"),
        ({"rho_d": (1.0, 2.0, 3.0, 4.0)}, "rho_d has 4 values"),
        ({"lambdas": (1.0, 2.0, 3.0)}, "lambdas has 3 values"),
        ({"mu": 1.0}, "unknown hyperparameter"),
    ],
)
def test_bad_hyperparameters_raise(hp: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fenchel(mlp("6-7-5-3").to(DT), **hp)


def test_bad_inputs_raise() -> None:
    meth, x, y = _tiny()
    with pytest.raises(ValueError, match="NaN"):
        meth.step(torch.full_like(x, math.nan), y)
    with pytest.raises(ValueError, match="samples"):
        meth.step(x, y[:-1])
    with pytest.raises(ValueError, match="labels"):
        meth.step(x, y + 10)
    with pytest.raises(ValueError, match="mse"):
        Fenchel(mlp("6-7-3").to(DT), loss="mse")


def test_leaky_relu_hidden_layers_train() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3)).to(DT)
    meth = Fenchel(model, x_iters=500, x_tol=1e-12, monitor="full")
    x = torch.randn(16, 6, dtype=DT)
    y = torch.randint(0, 3, (16,))
    stats = meth.step(x, y)
    assert stats.info["relaxed_objective_after_x"] <= stats.loss
    assert stats.info["loss_after"] < stats.loss


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["mm", "lbfgs"])
def test_conv_w_blocks_match_reference(solver: str) -> None:
    meth, x, y = _tiny_lenet(m=2, w_solver=solver, w_iters=3000, w_tol=1e-13, rho_d=0.5, rho=0.2)
    xs = meth.lift(x)
    for l in range(1, meth.L + 1):
        xs[l] = xs[l] + 0.2 * torch.rand_like(xs[l])
    for l in (0, 1):
        lin = meth.chain[l].linear
        W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
        meth.solve_w_block(l, xs, y, W0, b0)
        f = float(meth.w_block_objective(l, xs, y, lin.weight.detach(), lin.bias.detach(), W0, b0))
        f_ref = _w_reference(meth, l, xs, y, W0, b0)
        assert abs(f - f_ref) <= 1e-6 * max(1.0, abs(f_ref)), (l, f, f_ref)


def test_per_layer_values_and_output_anchor_override() -> None:
    meth = Fenchel(mlp("6-7-5-3").to(DT), rho_d=(1.0, 2.0, 3.0), rho_d_output=None, lbd_coef=(4.0, 5.0))
    assert meth.rho_d == [1.0, 2.0, 3.0] and meth.lbd_coef == [4.0, 5.0] and meth.lambdas == [1.0, 1.0]
    meth = Fenchel(mlp("6-7-5-3").to(DT), rho_d="10", rho_d_output="100")
    assert meth.rho_d == [10.0, 10.0, 100.0]


# -- fast paths of the conv blocks ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(1, 6, 5), (3, 1, 12, 12)),
        (nn.Conv2d(6, 4, 5), (2, 6, 9, 9)),
        (nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 3, 9, 8)),
        (nn.Conv2d(4, 4, 3, dilation=2), (2, 4, 9, 9)),
        (nn.Conv2d(4, 4, 3, groups=2), (2, 4, 7, 7)),
    ],
)
def test_patch_matrix_matches_unfold_and_reproduces_the_conv(conv: nn.Conv2d, shape: tuple[int, ...]) -> None:
    from liftkit.methods.fenchel import _patch_matrix

    conv = conv.to(DT)
    P = torch.randn(*shape, dtype=DT)
    ref = tF.unfold(P, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
    ref = ref.reshape(-1, ref.shape[2])
    assert torch.equal(_patch_matrix(conv, P), ref)
    with_ones = _patch_matrix(conv, P, with_ones=True)
    assert torch.equal(with_ones[:, :-1], ref) and bool((with_ones[:, -1] == 1).all())
    if conv.groups == 1:  # conv(P; W) + b = P̄ θᵀ, rows in (sample, position) order
        out = conv(P).detach()
        theta = torch.cat([conv.weight.detach().reshape(conv.out_channels, -1), conv.bias.detach()[:, None]], 1)
        U2 = with_ones @ theta.T
        assert torch.allclose(U2, out.permute(0, 2, 3, 1).reshape(-1, conv.out_channels), atol=1e-12)


def test_chunked_gram_matches_float64_gram() -> None:
    from liftkit.methods.fenchel import _gram64

    A = torch.rand(5000, 7, dtype=torch.float32)
    ref = A.double().T @ A.double()
    G = _gram64(A, chunk=999)
    assert G.dtype == torch.float64
    assert float((G - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    A64 = A.double()
    assert torch.allclose(_gram64(A64, chunk=64), ref, rtol=1e-13, atol=0)


def test_fast_pool_glue_matches_avg_pool_and_its_adjoint() -> None:
    chain = as_chain(lenet5().to(DT), method="fenchel", allow_conv=True, allowed_activations=("relu",))
    op = LayerOperator(chain[1], (6, 28, 28))
    X = torch.randn(3, 6, 28, 28, dtype=DT)
    assert torch.allclose(op.glue(X), tF.avg_pool2d(X, 2), atol=1e-15)
    G = torch.randn(3, 6, 14, 14, dtype=DT)
    ref = torch.ops.aten.avg_pool2d_backward(G, X, [2, 2], [2, 2], [0, 0], False, True, None)
    assert torch.equal(op.glue_adjoint(G), ref)
    # odd sizes and other pools take the generic path
    odd = LayerOperator(as_chain(nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.AvgPool2d(3), nn.Flatten(),
                                               nn.Linear(8, 3)).to(DT), method="fenchel", allow_conv=True,
                                 allowed_activations=("relu",))[1], (2, 7, 7))
    Y = torch.randn(2, 2, 7, 7, dtype=DT)
    assert torch.allclose(odd.glue(Y), tF.avg_pool2d(Y, 3).flatten(1), atol=1e-15)
