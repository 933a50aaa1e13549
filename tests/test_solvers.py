"""Dense-reference tests for liftkit.solvers (docs/methods/conventions.md §7, §8; docs/methods/lpom.md §3, §4;
docs/methods/proxprop.md §4)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as tF
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize

from liftkit.solvers import (
    batch_pinv,
    block_cg,
    linear_prox_direction,
    projected_fista,
    push_through_coefficients,
    push_through_inverse,
    ridge_solve,
    spd_ridge_solve,
    spectral_norm,
    spectral_norm_op,
)

torch.set_num_threads(1)

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=D)


def with_singular_values(rows: int, cols: int, s: list[float], seed: int = 0) -> torch.Tensor:
    U, _ = torch.linalg.qr(randn(rows, len(s), seed=seed))
    V, _ = torch.linalg.qr(randn(cols, len(s), seed=seed + 1))
    return U @ torch.diag(torch.tensor(s, dtype=D)) @ V.T


# ---------------------------------------------------------------------------------------------------
# Spectral norm
# ---------------------------------------------------------------------------------------------------


def test_spectral_norm_matches_dense() -> None:
    W = with_singular_values(30, 20, [10.0, 5.0, 2.0, 1.0])
    assert abs(spectral_norm(W) - 1.05 * 10.0) < 1e-8
    assert abs(spectral_norm(W, iters=50, safety=1.0) - 10.0) < 1e-10
    R = randn(40, 25, seed=3)
    ref = torch.linalg.matrix_norm(R, ord=2).item()
    assert abs(spectral_norm(R, iters=500, safety=1.0) - ref) < 1e-6 * ref
    est = spectral_norm(R)  # 20 iterations from below, times 1.05: within a few percent of σ
    assert 0.97 * ref <= est <= 1.05 * ref + 1e-12


def test_spectral_norm_deterministic_and_rng_free() -> None:
    W = randn(12, 9, seed=4).float()
    state = torch.get_rng_state()
    a, b = spectral_norm(W), spectral_norm(W)
    assert a == b
    assert torch.equal(state, torch.get_rng_state())
    assert spectral_norm(torch.zeros(3, 4)) == 0.0
    with pytest.raises(ValueError, match="2-D"):
        spectral_norm(torch.ones(3))


def test_spectral_norm_op_conv_operator() -> None:
    w = randn(3, 2, 3, 3, seed=5)
    shape = (1, 2, 6, 6)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return tF.conv2d(x, w, padding=1, stride=2)

    def apply_t(y: torch.Tensor) -> torch.Tensor:
        return tF.conv_transpose2d(y, w, padding=1, stride=2, output_padding=1)

    n = math.prod(shape)
    dense = torch.stack([apply(e.reshape(shape)).reshape(-1) for e in torch.eye(n, dtype=D)], dim=1)
    x, y = randn(*shape, seed=6), randn(*apply(torch.zeros(shape, dtype=D)).shape, seed=7)
    assert abs((apply(x) * y).sum() - (x * apply_t(y)).sum()) < 1e-10  # adjoint pair
    ref = torch.linalg.matrix_norm(dense, ord=2).item()
    est = spectral_norm_op(apply, apply_t, shape, iters=300, safety=1.0, dtype=D)
    assert abs(est - ref) < 1e-6 * ref


# ---------------------------------------------------------------------------------------------------
# Ridge / linear prox
# ---------------------------------------------------------------------------------------------------


def normal_equation_solution(A: torch.Tensor, T: torch.Tensor, beta: float, th0: torch.Tensor) -> torch.Tensor:
    K = A.T @ A + beta * torch.eye(A.shape[1], dtype=D)
    return torch.linalg.solve(K, A.T @ T + beta * th0)


@pytest.mark.parametrize(("N", "p"), [(30, 8), (8, 30), (12, 12)])
@pytest.mark.parametrize("form", ["gram", "push_through", "auto"])
def test_ridge_solve_normal_equations(N: int, p: int, form: str) -> None:
    A, T, th0 = randn(N, p, seed=1), randn(N, 3, seed=2), randn(p, 3, seed=3)
    beta = 0.7
    got = ridge_solve(A, T, beta, th0, form=form)
    ref = normal_equation_solution(A, T, beta, th0)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-11)
    lhs = (A.T @ A + beta * torch.eye(p, dtype=D)) @ got
    torch.testing.assert_close(lhs, A.T @ T + beta * th0, rtol=1e-10, atol=1e-10)


def test_ridge_push_through_equals_gram_ill_conditioned() -> None:
    A = with_singular_values(20, 50, [1e3, 10.0, 1.0, 1e-3], seed=8)  # rank 4
    T, th0 = randn(20, 2, seed=9), randn(50, 2, seed=10)
    g = ridge_solve(A, T, 1e-2, th0, form="gram")
    pt = ridge_solve(A, T, 1e-2, th0, form="push_through")
    # cond(AᵀA + βI) = 1e8, so agreement is limited to about 1e8·eps relative
    torch.testing.assert_close(g, pt, rtol=1e-6, atol=1e-7)


def test_ridge_small_beta_is_minimal_change_least_squares() -> None:
    # docs/methods/proxprop.md §8 oracle 6: β → 0 gives Θ₀ + A⁺(T − AΘ₀) (A of full row rank, so the push-through Gram
    # is regular)
    A = with_singular_values(10, 25, [3.0, 2.5, 2.0, 1.5, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3], seed=11)
    T, th0 = randn(10, 2, seed=12), randn(25, 2, seed=13)
    got = ridge_solve(A, T, 1e-10, th0)
    ref = th0 + torch.linalg.pinv(A) @ (T - A @ th0)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-7)


def test_linear_prox_direction_forms_and_relation() -> None:
    A, G, th0 = randn(15, 6, seed=14), randn(15, 4, seed=15), randn(6, 4, seed=16)
    beta = 2.0
    ref = torch.linalg.solve(A.T @ A + beta * torch.eye(6, dtype=D), A.T @ G)
    for form in ("gram", "push_through", "auto"):
        torch.testing.assert_close(linear_prox_direction(A, G, beta, form=form), ref, rtol=1e-11, atol=1e-12)
    # ProxProp: T = ĀΘ₀ − G, so Θ₀ − Θ⁺ = g
    torch.testing.assert_close(th0 - ridge_solve(A, A @ th0 - G, beta, th0), ref, rtol=1e-10, atol=1e-11)
    # vector right-hand side
    torch.testing.assert_close(linear_prox_direction(A, G[:, 0], beta), ref[:, 0], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("form", ["gram", "push_through"])
def test_linear_prox_direction_with_float32_gram_products(form: str) -> None:
    # float32 Gram products, float64 factorisation: the float64 answer to float32 accuracy, in float32
    A, G = randn(15, 40, seed=17), randn(15, 4, seed=18)
    beta = 2.0
    ref = torch.linalg.solve(A.T @ A + beta * torch.eye(40, dtype=D), A.T @ G)
    got = linear_prox_direction(A.float(), G.float(), beta, form=form, gram_dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-6)


def test_push_through_inverse_with_float32_gram_product() -> None:
    A = randn(12, 30, seed=19)
    beta = 0.5
    M_inv, K = push_through_inverse(A.float(), beta, ones_column=True, gram_dtype=torch.float32)
    assert M_inv.dtype == K.dtype == torch.float64
    K_ref = A @ A.T + 1.0
    torch.testing.assert_close(K, K_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(M_inv, torch.linalg.inv(K_ref + beta * torch.eye(12, dtype=D)), rtol=1e-5, atol=1e-7)


def test_push_through_inverse_solve_matches_triangular_solves_on_a_stiff_gram() -> None:
    # push_through_coefficients applies the Cholesky inverse (one product) instead of two triangular solves;
    # with a ridge far below the Gram's scale (M = K + βI has condition number ~1e6) both must agree to rounding
    A, G = randn(30, 25, seed=42) * 3.0, randn(30, 50, seed=43)  # rank 25 < 30: K is singular
    beta = 1e-3
    Z, K = push_through_coefficients(A, G, beta)
    M = K + beta * torch.eye(30, dtype=D)
    torch.testing.assert_close(Z, torch.cholesky_solve(G, torch.linalg.cholesky(M)), rtol=1e-9, atol=1e-12)
    assert float((M @ Z - G).norm() / G.norm()) < 1e-10


def test_push_through_coefficients_and_spd_ridge_solve() -> None:
    A, G = randn(7, 20, seed=40), randn(7, 3, seed=41)
    beta = 0.3
    Z, K = push_through_coefficients(A, G, beta)
    torch.testing.assert_close(K, A @ A.T, rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(Z, torch.linalg.solve(A @ A.T + beta * torch.eye(7, dtype=D), G))
    torch.testing.assert_close(A.T @ Z, linear_prox_direction(A, G, beta, form="gram"), rtol=1e-10, atol=1e-11)
    S = A.T @ A
    S_before = S.clone()
    out = spd_ridge_solve(S, (A.T @ G).float(), beta)
    assert out.dtype == torch.float32 and torch.equal(S, S_before)  # the caller's Gram is not modified
    torch.testing.assert_close(out.double(), A.T @ Z, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        spd_ridge_solve(S, G, -1.0)
    # ones_column=True stands for Ā = [A, 1] without materialising it
    A1 = torch.cat([A, torch.ones(7, 1, dtype=D)], dim=1)
    Z1, K1 = push_through_coefficients(A, G, beta, ones_column=True)
    torch.testing.assert_close(K1, A1 @ A1.T, rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(A1.T @ Z1, linear_prox_direction(A1, G, beta), rtol=1e-10, atol=1e-11)


def test_ridge_dtype_and_errors() -> None:
    A, T, th0 = randn(9, 5, seed=17).float(), randn(9, 2, seed=18).float(), randn(5, 2, seed=19).float()
    out = ridge_solve(A, T, 0.5, th0)
    assert out.dtype == torch.float32
    ref = normal_equation_solution(A.double(), T.double(), 0.5, th0.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        ridge_solve(A, T, 0.0, th0)
    with pytest.raises(ValueError, match="form"):
        ridge_solve(A, T, 1.0, th0, form="lu")
    with pytest.raises(ValueError, match="theta0"):
        ridge_solve(A, T, 1.0, th0[:4])


# ---------------------------------------------------------------------------------------------------
# Block CG
# ---------------------------------------------------------------------------------------------------


def spd_operator(
    p: int, beta: float = 0.5, seed: int = 20
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    B = randn(2 * p, p, seed=seed)
    M = B.T @ B + beta * torch.eye(p, dtype=D)
    return M, lambda X: M @ X


def test_block_cg_converges_to_direct_solve() -> None:
    M, apply = spd_operator(12)
    rhs, x0 = randn(12, 4, seed=21), randn(12, 4, seed=22)
    x, its = block_cg(apply, rhs, x0, maxit=60, tol=1e-12, eps=0.0)
    torch.testing.assert_close(x, torch.linalg.solve(M, rhs), rtol=1e-9, atol=1e-9)
    assert its <= 60


def test_block_cg_columns_are_independent() -> None:
    _, apply = spd_operator(10)
    rhs, x0 = randn(10, 3, seed=23), randn(10, 3, seed=24)
    together, n = block_cg(apply, rhs, x0, maxit=5, stop="fixed")
    assert n == 5
    for j in range(3):
        alone, _ = block_cg(apply, rhs[:, j : j + 1], x0[:, j : j + 1], maxit=5, stop="fixed")
        torch.testing.assert_close(together[:, j : j + 1], alone, rtol=1e-12, atol=1e-12)


def test_block_cg_iteration_count_and_stop_rule() -> None:
    _, apply = spd_operator(15)
    rhs, x0 = randn(15, 3, seed=25), torch.zeros(15, 3, dtype=D)
    tol = 1e-3
    x, its = block_cg(apply, rhs, x0, maxit=100, tol=tol)
    assert 1 <= its < 100
    r0 = ((rhs - apply(x0)) ** 2).sum(0)
    crit = tol**2 * r0.mean()
    assert ((rhs - apply(x)) ** 2).sum(0).max() < crit * (1 + 1e-6)
    x_prev, n_prev = block_cg(apply, rhs, x0, maxit=its - 1, tol=tol)
    assert n_prev == its - 1
    assert ((rhs - apply(x_prev)) ** 2).sum(0).max() >= crit * (1 - 1e-6)
    # fixed runs exactly maxit, even past convergence
    assert block_cg(apply, rhs, x0, maxit=its + 3, tol=tol, stop="fixed")[1] == its + 3
    assert block_cg(apply, rhs, x0, maxit=0)[1] == 0


def test_block_cg_one_step_is_cauchy_step_and_warm_start() -> None:
    M, apply = spd_operator(8)
    rhs, x0 = randn(8, 5, seed=26), randn(8, 5, seed=27)
    r = rhs - M @ x0
    alpha = (r * r).sum(0) / ((r * (M @ r)).sum(0) + 1e-6)
    x1, n = block_cg(apply, rhs, x0, maxit=1)
    assert n == 1
    torch.testing.assert_close(x1, x0 + alpha * r, rtol=1e-12, atol=1e-12)
    # warm start at the solution: the rule is relative to ‖r₀‖, so CG may keep iterating on rounding noise,
    # but it must stay at the solution
    exact = torch.linalg.solve(M, rhs)
    x, n = block_cg(apply, rhs, exact, maxit=10)
    torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-10)
    x, n = block_cg(lambda X: 2.0 * X, torch.ones(3, 2, dtype=D), torch.full((3, 2), 0.5, dtype=D), maxit=10)
    assert n == 0  # exactly zero initial residual: nothing to do


def test_block_cg_zero_column_stays_finite() -> None:
    _, apply = spd_operator(6)
    rhs = randn(6, 2, seed=28)
    rhs[:, 1] = 0.0
    x, _ = block_cg(apply, rhs, torch.zeros_like(rhs), maxit=6, stop="fixed")
    assert torch.isfinite(x).all()
    assert torch.equal(x[:, 1], torch.zeros(6, dtype=D))
    with pytest.raises(ValueError, match="stop"):
        block_cg(apply, rhs, rhs, maxit=1, stop="never")


# ---------------------------------------------------------------------------------------------------
# Projected FISTA
# ---------------------------------------------------------------------------------------------------


def test_projected_fista_nonnegative_least_squares() -> None:
    A, b = randn(30, 12, seed=29), randn(30, seed=30)
    steps: list[float] = []

    def prox(y: torch.Tensor, t: float) -> torch.Tensor:
        steps.append(t)
        return torch.clamp(y, min=0.0)

    L = torch.linalg.matrix_norm(A, ord=2).item() ** 2
    x, its, rel = projected_fista(lambda v: A.T @ (A @ v - b), L, prox, torch.zeros(12, dtype=D), 5000, 1e-13)
    ref, _ = optimize.nnls(A.numpy(), b.numpy())
    ref_t = torch.from_numpy(ref)
    obj = 0.5 * ((A @ x - b) ** 2).sum().item()
    ref_obj = 0.5 * ((A @ ref_t - b) ** 2).sum().item()
    assert obj <= ref_obj * (1 + 1e-10) + 1e-14
    torch.testing.assert_close(x, ref_t, rtol=1e-6, atol=1e-7)
    assert its < 5000 and rel <= 1e-13
    assert set(steps) == {1.0 / L}


def test_projected_fista_matrix_variable_with_leaky_prox() -> None:
    # min ½‖X − Y‖² + f(X), f the leaky-ReLU f of LPOM: the answer is prox_f(Y) with t = 1 (= φ(Y)).
    alpha = 0.2
    Y = randn(5, 4, seed=31)

    def prox(y: torch.Tensor, t: float) -> torch.Tensor:
        return torch.where(y >= 0, y, y / (1 + t * (1 / alpha - 1)))

    X, _, _ = projected_fista(lambda v: v - Y, 1.0, prox, torch.zeros_like(Y), 200, 1e-14)
    torch.testing.assert_close(X, tF.leaky_relu(Y, alpha), rtol=1e-12, atol=1e-12)


def test_projected_fista_stopping_and_edge_cases() -> None:
    A, b = randn(20, 6, seed=32), randn(20, seed=33)
    L = 1.01 * torch.linalg.matrix_norm(A, ord=2).item() ** 2
    x0 = torch.ones(6, dtype=D)

    def grad(v: torch.Tensor) -> torch.Tensor:
        return A.T @ (A @ v - b)

    def proj(y: torch.Tensor, t: float) -> torch.Tensor:
        return y.clamp(min=0)

    x, its, rel = projected_fista(grad, L, proj, x0, 1000, tol=1e-3)
    assert its < 1000 and rel <= 1e-3
    _, its_fixed, rel_fixed = projected_fista(grad, L, proj, x0, 3, tol=0.0)
    assert its_fixed == 3 and rel_fixed > 0
    x, its, rel = projected_fista(grad, L, proj, x0, 0)
    assert its == 0 and math.isnan(rel) and torch.equal(x, x0)
    with pytest.raises(ValueError, match="L"):
        projected_fista(grad, 0.0, proj, x0, 5)


# ---------------------------------------------------------------------------------------------------
# Pseudo-inverse
# ---------------------------------------------------------------------------------------------------


def assert_penrose(X: torch.Tensor, P: torch.Tensor, tol: float) -> None:
    scale = X.abs().max().item()
    pscale = P.abs().max().item()
    torch.testing.assert_close(X @ P @ X, X, rtol=0, atol=tol * scale)
    torch.testing.assert_close(P @ X @ P, P, rtol=0, atol=tol * pscale)
    torch.testing.assert_close(X @ P, (X @ P).T, rtol=0, atol=tol)
    torch.testing.assert_close(P @ X, (P @ X).T, rtol=0, atol=tol)


CASES = {
    "tall_full_rank": lambda: randn(40, 10, seed=34),  # LPOM: features > batch
    "wide_full_rank": lambda: randn(8, 30, seed=35),
    "rank_deficient": lambda: with_singular_values(25, 18, [5.0, 3.0, 1.0, 0.5], seed=36),
    "duplicate_samples": lambda: torch.cat([randn(20, 6, seed=37)] * 2, dim=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batch_pinv_sides_agree_and_penrose(case: str) -> None:
    X = CASES[case]()
    ref = torch.linalg.pinv(X)
    scale = ref.abs().max().item()
    for side in ("auto", "batch", "feature", "svd"):
        P = batch_pinv(X, side=side)
        assert P.shape == (X.shape[1], X.shape[0]), side
        # A rank-deficient Gram side is accurate to about eps·λ_max/ε ≈ 1e-6 relative (see docstring).
        torch.testing.assert_close(P, ref, rtol=0, atol=1e-5 * scale, msg=side)
        assert_penrose(X, P, 1e-5)
    if case.endswith("full_rank"):
        torch.testing.assert_close(batch_pinv(X), ref, rtol=0, atol=1e-8 * scale)  # auto: the regular side


def test_batch_pinv_full_column_rank_gives_left_inverse() -> None:
    X = torch.cat([randn(30, 10, seed=38), torch.ones(1, 10, dtype=D)])  # X̄ = [X; 1ᵀ]
    P = batch_pinv(X)
    torch.testing.assert_close(P @ X, torch.eye(10, dtype=D), rtol=0, atol=1e-9)


def test_batch_pinv_dtype_zero_and_errors() -> None:
    X = randn(12, 5, seed=39).float()
    P = batch_pinv(X)
    assert P.dtype == torch.float32
    torch.testing.assert_close(P.double(), torch.linalg.pinv(X.double()), rtol=1e-5, atol=1e-5)
    assert torch.equal(batch_pinv(torch.zeros(4, 3)), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="side"):
        batch_pinv(X, side="qr")


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    rank=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_batch_pinv_penrose_property(rows: int, cols: int, rank: int, seed: int) -> None:
    r = min(rank, rows, cols)
    s = [1.5 ** (-k) for k in range(r)]  # σ_min² ≥ 1.5⁻²², far above the guard ε
    X = with_singular_values(rows, cols, s, seed=seed)
    for side in ("batch", "feature", "auto"):
        gram_dim = {"batch": cols, "feature": rows, "auto": min(rows, cols)}[side]
        # A regular Gram is only biased by ε/σ² ≤ 1e-10·1.5²²; a singular one is limited by rounding,
        # eps·λ_max/ε ≤ eps·m/ridge_rel (see the batch_pinv docstring).
        tol = 1e-5 if gram_dim == r else 20 * torch.finfo(D).eps * max(rows, cols) / 1e-10
        assert_penrose(X, batch_pinv(X, side=side), tol)
