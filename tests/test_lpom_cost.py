"""LPOM's cost work: each shortcut gives what the full computation gives (float64, tiny problems), and the
layer-parallel schedule reaches the method through its public interface only."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from liftkit.activations import Activation
from liftkit.methods.base import evaluate_loss
from liftkit.methods.lpom import LPOM
from liftkit.methods.lpom_kernels import PinvApply, fused_fista, preact, step_update
from liftkit.methods.lpom_parallel import LPOMSync
from liftkit.solvers import resolve_solve_dtype

DT = torch.float64
METHODS_DIR = Path(__file__).resolve().parents[1] / "src" / "liftkit" / "methods"


def chain(widths, act="relu", seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), Activation(act).module()]
    return nn.Sequential(*layers).to(DT)


def batch(widths, m=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, widths[0], generator=g, dtype=DT), torch.randint(0, widths[-1], (m,), generator=g)


def forward_state(method: LPOM, x, y):
    lifted = method.lifted
    ws, bs = lifted.weights(), lifted.biases()
    xs, pre = lifted.forward(x, ws, bs)
    _x0, d = method.prepare_batch(x, y)
    return xs, pre, d, ws, bs


@pytest.mark.parametrize("order,cls", [("forward", LPOM), ("backward", LPOM), ("forward", LPOMSync)])
def test_skipping_blocks_at_their_forward_minimiser_changes_nothing(order, cls):
    """From the forward pass, X-phases with and without the skip end at the same X (up to rounding), and the
    skip saves exactly the solves of blocks whose neighbours had not moved yet."""
    widths = (6, 9, 8, 7, 5, 4)
    extra = {"workers": 1} if cls is LPOMSync else {"x_sweep_order": order, "x_sweeps": 0}  # L sweeps
    method = cls(chain(widths), x_iters=7, **extra)
    x, y = batch(widths)
    xs, pre, d, ws, bs = forward_state(method, x, y)
    full_xs, full_pre = list(xs), list(pre)
    info_full: dict[str, float] = {}
    method.x_phase(full_xs, full_pre, d, ws, bs, info_full)
    info_skip: dict[str, float] = {}
    method.x_phase(xs, pre, d, ws, bs, info_skip, at_forward=True)
    for k in range(1, len(xs)):
        torch.testing.assert_close(xs[k], full_xs[k], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(pre[k - 1], full_pre[k - 1], atol=1e-10, rtol=1e-10)
    L = len(widths) - 1
    if cls is LPOM and order == "forward":
        # sweep s skips blocks 1..L−s: (L−1) + (L−2) + … + 1 solves of one iteration each (the no-op's length)
        assert info_full["x_iters_total"] - info_skip["x_iters_total"] == L * (L - 1) // 2
        assert info_skip["x_iters_1"] > 0  # block 1 is solved in the last sweep
    elif cls is LPOM:
        assert info_full["x_iters_total"] == info_skip["x_iters_total"]  # backward: every block has moved
    else:
        assert info_skip["x_iters_total"] < info_full["x_iters_total"]


def test_a_skip_never_hides_a_block_that_must_move():
    """One forward sweep moves only the output; with the skip the hidden blocks still report a result."""
    widths = (6, 9, 8, 4)
    method = LPOM(chain(widths), x_sweeps=1, x_sweep_order="forward")
    x, y = batch(widths)
    xs, pre, d, ws, bs = forward_state(method, x, y)
    before = [t.clone() for t in xs]
    info: dict[str, float] = {}
    method.x_phase(xs, pre, d, ws, bs, info, at_forward=True)
    assert info["x_iters_1"] == info["x_iters_2"] == 0.0 and info["x_res_1"] == 0.0
    assert torch.equal(xs[1], before[1]) and torch.equal(xs[2], before[2]) and not torch.equal(xs[3], before[3])


@pytest.mark.parametrize("act_in,act_out", [("relu", "relu"), ("leaky_relu", "identity"), ("hardtanh", "sigmoid")])
def test_fista_from_the_cached_preactivation_gives_the_same_iterates(act_in, act_out):
    g = torch.Generator().manual_seed(3)
    a_in, a_out = Activation(act_in), Activation(act_out)
    w, b = torch.randn(5, 7, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    a = torch.randn(9, 7, generator=g, dtype=DT)
    x0 = a_in.phi(a + 0.1 * torch.randn(9, 7, generator=g, dtype=DT))
    x_next = a_out.phi(torch.randn(9, 5, generator=g, dtype=DT))
    u0 = preact(x0, w, b)
    keep = u0.clone()
    lip = 1.0 + 0.5 * a_out.kappa * float(torch.linalg.matrix_norm(w, 2)) ** 2
    plain = fused_fista(a_in, a_out, a, x_next, w, b, 0.5, 1.0, lip, x0, 6, 1e-300)
    cached = fused_fista(a_in, a_out, a, x_next, w, b, 0.5, 1.0, lip, x0, 6, 1e-300, u0=u0)
    assert torch.equal(plain.value, cached.value) and plain.iters == cached.iters == 6
    assert torch.equal(u0, keep)  # the caller's pre-activation is not written (identity φ returns its input)


@pytest.mark.parametrize("bias,beta,side", [(True, 1.0, "batch"), (False, 0.25, "batch"), (True, 0.25, "feature")])
def test_fused_w_update_equals_the_explicit_step(bias, beta, side):
    """W − ZᵀX and b − Zᵀ1 (the ones column never built) equal W̄ − (1/β)Rᵀ(X̄ᵀ)⁺ᵀ with X̄ = [X, 1] formed."""
    g = torch.Generator().manual_seed(5)
    m, n, out = (8, 11, 6) if side == "batch" else (15, 6, 4)
    x = torch.randn(m, n, generator=g, dtype=DT)
    r = torch.randn(m, out, generator=g, dtype=DT)
    w = torch.randn(out, n, generator=g, dtype=DT)
    b = torch.randn(out, generator=g, dtype=DT) if bias else None
    op = PinvApply.cholesky(x, bias, side, 1e-12)
    assert op.batch_side == (side == "batch")
    w_new, b_new = op.update(r, w, b, beta)
    x_bar = torch.cat([x, torch.ones(m, 1, dtype=DT)], dim=1) if bias else x
    gram = x_bar @ x_bar.t() if side == "batch" else x_bar.t() @ x_bar
    eps = 1e-12 * float(gram.trace()) / m
    eye = torch.eye(gram.shape[0], dtype=DT)
    step = (torch.linalg.solve(gram + eps * eye, r).t() @ x_bar if side == "batch"
            else torch.linalg.solve(gram + eps * eye, x_bar.t() @ r).t()) / beta
    ref_w, ref_b = step_update(step, w, b, 1.0)
    torch.testing.assert_close(w_new, ref_w, atol=1e-9, rtol=1e-9)
    if bias:
        assert b_new is not None and ref_b is not None
        torch.testing.assert_close(b_new, ref_b, atol=1e-9, rtol=1e-9)
    else:
        assert b_new is None


@pytest.mark.parametrize("side", ["batch", "feature"])
def test_float32_batch_applies_the_float64_inverse_and_matches_a_dense_solve(side):
    """A float32 batch with a float64 factor applies (K + εI)⁻¹ as a product: the W-step equals a float64 dense
    solve and the triangular solves it replaces, to float32 rounding; equal dtypes keep the triangular solves
    (no inverse is formed)."""
    g = torch.Generator().manual_seed(7)
    m, n, out = (20, 60, 9) if side == "batch" else (40, 12, 5)
    x = torch.rand(m, n, generator=g)
    r = torch.randn(m, out, generator=g)
    w, b = torch.randn(out, n, generator=g), torch.randn(out, generator=g)
    op = PinvApply.cholesky(x, True, side, 1e-10, torch.float64)
    assert op.inverse is not None and op.inverse.dtype == torch.float64
    w_new, b_new = op.update(r, w, b, 0.5)
    assert w_new.dtype == torch.float32 and b_new is not None
    x_bar = torch.cat([x, torch.ones(m, 1)], dim=1).double()
    gram = x_bar @ x_bar.t() if side == "batch" else x_bar.t() @ x_bar
    eps = 1e-10 * float(gram.trace()) / m
    rhs = r.double() if side == "batch" else x_bar.t() @ r.double()
    z = torch.linalg.solve(gram + eps * torch.eye(gram.shape[0], dtype=torch.float64), rhs)
    step = (z.t() @ x_bar if side == "batch" else z.t()) / 0.5
    torch.testing.assert_close(w_new.double(), w.double() - step[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_new.double(), b.double() - step[:, -1], atol=1e-5, rtol=1e-5)
    op.inverse = None  # the triangular solves of the same factor
    w_tri, b_tri = op.update(r, w, b, 0.5)
    assert b_tri is not None
    torch.testing.assert_close(w_new, w_tri, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b_new, b_tri, atol=1e-6, rtol=1e-6)
    assert PinvApply.cholesky(x.double(), True, side, 1e-10, torch.float64).inverse is None
    assert PinvApply.cholesky(x, True, side, 1e-10, torch.float32).inverse is None


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_step_loss_and_initial_energy_are_the_reported_loss_and_the_data_term(act):
    """The step's loss and ``energy_init`` (from one set of squared errors where the targets allow it, ReLU; a
    tanh output's floored targets take the separate computations) are exactly evaluate_loss and ℓ(X^L, D)."""
    widths = (6, 9, 4)
    method = LPOM(chain(widths, act))
    x, y = batch(widths)
    with torch.no_grad():
        out = method.model(x)
    d = method.prepare_batch(x, y)[1]
    assert method._floors_targets(y) == (act == "tanh")
    stats = method.step(x, y)
    assert stats.loss == float(evaluate_loss("mse", out, y))
    assert stats.info["energy_init"] == method.lifted.data_loss(out, d)


def test_solve_dtype_float32_keeps_the_w_step_close_and_bad_values_fail():
    widths = (6, 30, 4)
    x, y = batch(widths, m=12)
    steps = {}
    for choice in ("float64", "float32"):
        method = LPOM(chain(widths), solve_dtype=choice)
        assert method.lifted.solve_dtype == getattr(torch, choice)
        method.step(x, y)
        steps[choice] = [p.detach().clone() for p in method.model.parameters()]
    for p64, p32 in zip(steps["float64"], steps["float32"]):
        torch.testing.assert_close(p32, p64, atol=1e-4, rtol=1e-4)
    assert LPOM(chain(widths)).lifted.solve_dtype == torch.float64  # auto on the CPU
    with pytest.raises(ValueError, match="solve_dtype"):
        LPOM(chain(widths), solve_dtype="float16")


def test_auto_solve_dtype_is_float64_on_the_cpu_and_float32_on_cuda():
    assert resolve_solve_dtype("auto", torch.device("cuda", 0)) == torch.float32  # no CUDA needed to resolve
    assert resolve_solve_dtype("auto", "cpu") == torch.float64
    assert resolve_solve_dtype("float32", "cpu") == torch.float32
    assert resolve_solve_dtype("float64", "cuda") == torch.float64


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_layer_parallel_uses_only_the_public_interface_and_no_import_cycle():
    """lpom_layers imports neither lpom nor lpom_parallel (not even for type checking) and touches no private
    member of another object: LayerParallel drives the method through the LayerParallelMethod protocol."""
    path = METHODS_DIR / "lpom_layers.py"
    assert not {"liftkit.methods.lpom", "liftkit.methods.lpom_parallel"} & _imports(path)
    private = [
        node.attr for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert private == []
    for module in ("lpom_kernels.py", "lpom_chain.py", "lpom_shards.py"):
        assert not any(name.startswith("liftkit.methods.lpom_") and name.endswith(("parallel", "layers"))
                       for name in _imports(METHODS_DIR / module)), module


@pytest.mark.parametrize("name", ["lpom", "lpom-sync"])
def test_energies_every_monitor_every_steps_leave_the_iterates_unchanged(name):
    """The energies are pure diagnostics: computed every k-th step, the weights and the other diagnostics are
    those of computing them every step."""
    from liftkit.methods import get

    widths = (6, 9, 4)
    x, y = batch(widths)
    sparse = get(name)(chain(widths, "relu"), monitor="full", monitor_every=3)
    dense = get(name)(chain(widths, "relu"), monitor="full", monitor_every=1)
    for step in range(7):
        a, b = sparse.step(x, y), dense.step(x, y)
        for p, q in zip(sparse.model.parameters(), dense.model.parameters()):
            assert torch.equal(p, q)
        assert a.loss == b.loss
        energy_keys = {"energy_init", "energy", "energy_w"}
        assert {k: v for k, v in a.info.items() if k not in energy_keys} == {
            k: v for k, v in b.info.items() if k not in energy_keys
        }
        assert energy_keys <= set(b.info)
        assert (energy_keys <= set(a.info)) == (step % 3 == 0) and (not energy_keys & set(a.info)) == (step % 3 != 0)
