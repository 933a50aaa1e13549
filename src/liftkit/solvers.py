r"""Shared numerical primitives (docs/methods/conventions.md §7, §8; docs/methods/lpom.md §3, §4;
docs/methods/proxprop.md §4).

Every function is pure (no global RNG, no in-place change of its inputs) and has a dense reference test.
Grams and Cholesky factors are built in float64 and results are cast back to the input dtype
(docs/methods/conventions.md §4).

* :func:`spectral_norm`, :func:`spectral_norm_op`: power-iteration estimates of ‖·‖₂ for FISTA step sizes.
* :func:`ridge_solve`, :func:`linear_prox_direction`: the linear-layer prox of docs/methods/conventions.md §7 and
  docs/methods/proxprop.md §4.1 (Gram or push-through); :func:`push_through_coefficients` and :func:`spd_ridge_solve`
  expose its two halves for callers that form Āᵀ(·) or the Gram themselves (ProxProp's chunked conv Gram).
* :func:`block_cg`: ProxProp's per-column conjugate gradients as implemented officially (docs/methods/proxprop.md §4.3).
* :func:`projected_fista`: the X-block solver of LPOM (docs/methods/lpom.md §3.2) and Fenchel
  (docs/methods/fenchel.md §4.1).
* :func:`batch_pinv`: the Moore–Penrose pseudo-inverse for LPOM's W-step (docs/methods/lpom.md §4.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "batch_pinv",
    "block_cg",
    "guarded_cholesky",
    "linear_prox_direction",
    "projected_fista",
    "push_through_coefficients",
    "push_through_inverse",
    "resolve_solve_dtype",
    "ridge_solve",
    "solve_dtype_like",
    "spd_ridge_solve",
    "spectral_norm",
    "spectral_norm_op",
    "step_change_norms",
]

#: the values of a method's ``solve_dtype`` setting (see :func:`resolve_solve_dtype`)
SOLVE_DTYPES = ("float64", "float32", "auto")

_FORMS = ("auto", "gram", "push_through")
_PINV_SIDES = ("auto", "batch", "feature", "svd")


def _spd_solve(K: Tensor, B: Tensor) -> Tensor:
    """Solve K Z = B for symmetric positive definite float64 K by Cholesky."""
    return torch.cholesky_solve(B, _spd_factor(K))


def _spd_factor(K: Tensor) -> Tensor:
    """Lower Cholesky factor of the symmetric positive definite float64 K.

    K is positive definite in exact arithmetic for every caller (a ridge or a guard ε > 0 is added), but
    rounding in a nearly singular Gram can still make the factorisation fail; a small diagonal jitter, grown
    until the factorisation succeeds, then changes the answer by far less than the guard already did.
    """
    L, info = torch.linalg.cholesky_ex(K)
    if int(info.item()) != 0:
        scale = float(K.diagonal().abs().max().item()) if K.numel() else 1.0
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        jitter = max(scale, 1.0) * 1e-14
        for _ in range(8):
            L, info = torch.linalg.cholesky_ex(K + jitter * eye)
            if int(info.item()) == 0:
                break
            jitter *= 100.0
        else:
            raise torch.linalg.LinAlgError("Cholesky factorisation failed: matrix is not positive definite")
    return L


# --------------------------------------------------------------------------------------------------
# Spectral norm
# --------------------------------------------------------------------------------------------------


def _start_vector(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    # A private, fixed-seed generator keeps the estimate reproducible without touching the global RNG state.
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0x5EED)
    return torch.randn(tuple(shape), generator=gen, dtype=dtype).to(device)


def spectral_norm_op(
    apply: Callable[[Tensor], Tensor],
    apply_t: Callable[[Tensor], Tensor],
    shape_in: Sequence[int],
    iters: int = 20,
    safety: float = 1.05,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    out_sum: Callable[[Tensor], Tensor] | None = None,
) -> float:
    r"""Estimate ‖A‖₂ of a linear operator by power iteration on AᵀA, times ``safety``.

    ``apply`` maps a tensor of shape ``shape_in`` to the output space and ``apply_t`` is its adjoint (e.g. a
    conv and its ``conv_transpose``). Starting from a fixed pseudo-random v₀ (of the given dtype and device;
    the global RNG is untouched), ``iters`` steps of v ← AᵀAv/‖AᵀAv‖ are run and σ ≈ ‖Av‖ is returned times
    ``safety``. Power iteration approaches σ_max from below, so the factor (1.05, docs/methods/conventions.md §4) turns
    it into a step-size-safe upper estimate. A zero operator gives 0.0.

    ``out_sum`` (data parallelism): when A's output rows are sharded over processes (A = the stacked per-process
    maps), ``apply_t`` must already sum over the processes and ``out_sum`` sums the final squared norm, so
    every process gets the same estimate.
    """
    if iters < 1:
        raise ValueError(f"spectral_norm: iters must be >= 1, got {iters}")
    v = _start_vector(shape_in, dtype, device)
    v = v / v.norm()
    tiny = torch.finfo(v.dtype).tiny
    # No host sync inside the loop; a zero operator drives v to 0 and the estimate to 0.
    for _ in range(iters):
        w = apply_t(apply(v))
        v = w / w.norm().clamp_min(tiny)
    if out_sum is not None:
        return math.sqrt(max(float(out_sum(apply(v).pow(2).sum().reshape(1))[0]), 0.0)) * float(safety)
    return float(apply(v).norm().item()) * float(safety)


def spectral_norm(W: Tensor, iters: int = 20, safety: float = 1.05) -> float:
    """Power-iteration estimate of the spectral norm ‖W‖₂ of a 2-D ``W``, times ``safety`` (see
    :func:`spectral_norm_op`). LPOM uses it on W^i without its bias column (docs/methods/lpom.md §3.2)."""
    if W.ndim != 2:
        raise ValueError(f"spectral_norm: W must be 2-D, got shape {tuple(W.shape)}")
    if W.numel() == 0:
        return 0.0
    Wd = W.detach()
    return spectral_norm_op(
        lambda v: Wd @ v, lambda y: Wd.T @ y, (W.shape[1],), iters, safety, dtype=W.dtype, device=W.device
    )


# --------------------------------------------------------------------------------------------------
# Linear-layer prox
# --------------------------------------------------------------------------------------------------


def _pick_form(form: str, n: int, p: int) -> str:
    if form not in _FORMS:
        raise ValueError(f"unknown ridge form {form!r}; choose one of {', '.join(_FORMS)}")
    if form == "auto":
        return "push_through" if n < p else "gram"
    return form


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not beta > 0.0:
        raise ValueError(f"ridge weight beta must be > 0, got {beta}")
    return beta


def _shifted_solve(S64: Tensor, R64: Tensor, beta: float) -> Tensor:
    """(S + βI)⁻¹R for a float64 PSD Gram S, leaving S untouched (callers may pass their own Gram)."""
    M = S64.clone()
    M.diagonal().add_(beta)
    return _spd_solve(M, R64)


def linear_prox_direction(
    A_bar: Tensor, G: Tensor, beta: float, *, form: str = "auto", gram_dtype: torch.dtype = torch.float64
) -> Tensor:
    r"""ProxProp's direction g = (ĀᵀĀ + βI)⁻¹ĀᵀG = Āᵀ(ĀĀᵀ + βI_N)⁻¹G (docs/methods/conventions.md §7;
    docs/methods/proxprop.md §4.1).

    Row-major: ``A_bar`` is N×p (Ā = [a, 1] for a linear layer), ``G`` is N×q (or a length-N vector), and
    the result is p×q (or length p); for ProxProp, W.grad = g[:n]ᵀ and b.grad = g[n]. ``form="gram"``
    factors the p×p matrix ĀᵀĀ + βI, ``"push_through"`` the N×N matrix ĀĀᵀ + βI_N (cheaper when N < p;
    single process only, docs/methods/distributed.md §1), and ``"auto"`` picks push-through when N < p. Both are float64
    Cholesky solves; the Gram products (ĀᵀĀ or ĀĀᵀ, and ĀᵀG) are taken in ``gram_dtype``; β > 0. This is the
    residual form of :func:`ridge_solve`, which calls it.
    """
    beta = _check_beta(beta)
    if A_bar.ndim != 2:
        raise ValueError(f"A must be 2-D (N x p), got shape {tuple(A_bar.shape)}")
    vec = G.ndim == 1
    G2 = G.unsqueeze(1) if vec else G
    n, p = A_bar.shape
    if G2.ndim != 2 or G2.shape[0] != n:
        raise ValueError(f"right-hand side must have {n} rows to match A {tuple(A_bar.shape)}, got {tuple(G.shape)}")
    out_dtype = torch.promote_types(A_bar.dtype, G.dtype)
    Ag = A_bar.detach().to(gram_dtype)
    if _pick_form(form, n, p) == "gram":
        g = _shifted_solve((Ag.T @ Ag).to(torch.float64), (Ag.T @ G2.detach().to(gram_dtype)).to(torch.float64), beta)
    else:
        # (ĀĀᵀ + βI)⁻¹G in float64, applied to Āᵀ in the Gram dtype
        Z = _shifted_solve((Ag @ Ag.T).to(torch.float64), G2.detach().to(torch.float64), beta)
        g = Ag.T @ Z.to(gram_dtype)
    g = g.to(out_dtype)
    return g.squeeze(1) if vec else g


def ridge_solve(A: Tensor, T: Tensor, beta: float, theta0: Tensor, *, form: str = "auto") -> Tensor:
    r"""Θ⁺ = argmin_Θ ½‖AΘ − T‖² + (β/2)‖Θ − Θ₀‖² (docs/methods/conventions.md §7), row-major.

    ``A`` is N×p, ``T`` is N×q and ``theta0`` is p×q (or T, Θ₀ vectors of length N, p). Computed in the
    residual form Θ⁺ = Θ₀ − (AᵀA + βI)⁻¹Aᵀ(AΘ₀ − T) (``form="gram"``) or its push-through equivalent
    Θ⁺ = Θ₀ − Aᵀ(AAᵀ + βI_N)⁻¹(AΘ₀ − T) (``"push_through"``); ``"auto"`` picks push-through when N < p. Both
    satisfy the normal equations (AᵀA + βI)Θ⁺ = AᵀT + βΘ₀. SIBP's separate W-only / b-only solves are this
    function with A = a or A = 1.
    """
    if theta0.shape[0] != A.shape[1] or theta0.ndim != T.ndim:
        raise ValueError(f"theta0 {tuple(theta0.shape)} does not match A {tuple(A.shape)} and T {tuple(T.shape)}")
    out_dtype = torch.promote_types(torch.promote_types(A.dtype, T.dtype), theta0.dtype)
    A64 = A.detach().to(torch.float64)
    th64 = theta0.detach().to(torch.float64)
    residual = A64 @ th64 - T.detach().to(torch.float64)
    return (th64 - linear_prox_direction(A64, residual, beta, form=form)).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Block conjugate gradients
# --------------------------------------------------------------------------------------------------


def block_cg(
    apply_M: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x0: Tensor | None,
    maxit: int,
    *,
    tol: float = 1e-2,
    eps: float = 1e-6,
    stop: str = "tol",
    col_sum: Callable[[Tensor], Tensor] | None = None,
    variant: str = "textbook",
    quadratic: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int]:
    r"""Independent conjugate gradients on every column of M X = rhs, as in ProxProp's official code
    (docs/methods/proxprop.md §4.3).

    ``apply_M`` maps a (p, k) tensor to (p, k) and must act column by column (e.g. X ↦ AᵀAX + βX), ``rhs`` and
    ``x0`` are (p, k) (``x0=None``: zero, without the product M·0, which under data parallelism would cost a
    collective). Per column j, with r = rhs − MX and p the search direction:

    .. math::

        \alpha_j = \frac{\|r_j\|^2}{p_j^\top M p_j + \varepsilon},\quad x_j \mathrel{+}= \alpha_j p_j,\quad
        r_j \mathrel{-}= \alpha_j M p_j,\quad
        \beta_j = \frac{\|r_{j,\mathrm{new}}\|^2}{\|r_{j,\mathrm{old}}\|^2 + \varepsilon},\quad
        p_j = r_j + \beta_j p_j .

    The ε terms keep converged columns (r_j = 0) at rest. Runs ``maxit`` iterations, or with ``stop="tol"``
    stops after the first iteration at which max_j ‖r_j‖² < tol²·mean_j ‖r_{j,0}‖². With ``stop="fixed"``
    exactly ``maxit`` iterations are run. If the initial residual is exactly zero nothing is left to do and 0
    iterations are run (unless ``stop="fixed"``). Arithmetic is in the dtype of ``rhs`` (CG is matrix-free).

    ``col_sum`` (data parallelism, docs/methods/distributed.md §1): when the rows of x are sharded over processes, a
    hook that sums a length-k vector of per-column partial sums over the processes (an all-reduce); every column inner
    product goes through it, so all processes take the same α, β and stopping decision.

    ``variant="official"`` reproduces ProxProp's published code, whose search direction aliases the residual
    (``P = R``, then ``R`` is updated in place): after the first iteration the direction is (1+β_j)r_j instead
    of r_j + β_j p_j, and from then on the textbook recurrence continues from that direction. It agrees with
    ``"textbook"`` for one iteration only; it is the code's behaviour, not the paper's text.

    ``quadratic`` (optional): v ↦ the per-column vᵀMv computed more cheaply than through ``apply_M`` (for
    M = AᵀA + βI: ‖Av‖² + β‖v‖², one product with A instead of two). It is used in the last allowed iteration,
    where only α is needed and the new residual is not, so cg1 costs one product with A.

    Returns ``(x, iterations_run)``.
    """

    def reduce(v: Tensor) -> Tensor:
        return v if col_sum is None else col_sum(v)

    if stop not in ("tol", "fixed"):
        raise ValueError(f"unknown stop rule {stop!r}; choose 'tol' or 'fixed'")
    if variant not in ("textbook", "official"):
        raise ValueError(f"unknown CG variant {variant!r}; choose 'textbook' or 'official'")
    if x0 is None:
        x0 = torch.zeros_like(rhs)
        r = rhs.clone()
    else:
        r = None
    if rhs.ndim != 2 or x0.shape != rhs.shape:
        raise ValueError(
            f"block_cg: rhs must be 2-D (p, k) and x0 of the same shape, got {tuple(rhs.shape)} and {tuple(x0.shape)}"
        )
    if maxit < 0:
        raise ValueError(f"block_cg: maxit must be >= 0, got {maxit}")
    x = x0.clone()
    if r is None:
        r = rhs - apply_M(x)
    d = r.clone()
    rs = reduce((r * r).sum(dim=0))
    threshold = float(tol) ** 2 * float(rs.mean().item()) if rs.numel() else 0.0
    if stop == "tol" and (rs.numel() == 0 or float(rs.max().item()) == 0.0):
        return x, 0
    it = 0
    while it < maxit:
        if quadratic is not None and it == maxit - 1:
            # the last iteration: α only; the residual it would update is never read again
            x = x + (rs / (quadratic(d) + eps)) * d
            return x, it + 1
        Md = apply_M(d)
        alpha = rs / (reduce((d * Md).sum(dim=0)) + eps)
        x = x + alpha * d
        r = r - alpha * Md
        rs_new = reduce((r * r).sum(dim=0))
        it += 1
        if stop == "tol" and float(rs_new.max().item()) < threshold:
            break
        # official: the first direction was the residual tensor itself, so it already holds the new r
        d = r + (rs_new / (rs + eps)) * (r if variant == "official" and it == 1 else d)
        rs = rs_new
    return x, it


# --------------------------------------------------------------------------------------------------
# Projected / proximal FISTA
# --------------------------------------------------------------------------------------------------


def step_change_norms(
    dx: Tensor, x: Tensor, sq_sum: Callable[[Tensor], Tensor] | None = None
) -> tuple[float, float]:
    """(‖dx‖, ‖x‖) with one host synchronisation: the stopping test of the FISTA solvers.

    With ``sq_sum`` (data parallelism, docs/methods/distributed.md §1) the squared norms are summed over the processes
    first, so every process sees the norms of the whole batch and stops at the same iteration."""
    if sq_sum is None:
        dnorm, xnorm = torch.stack([dx.norm(), x.norm()]).tolist()
        return float(dnorm), float(xnorm)
    sq = sq_sum(torch.stack([dx.pow(2).sum(), x.pow(2).sum()]).to(torch.float64))
    dsq, xsq = sq.tolist()
    return math.sqrt(float(dsq)), math.sqrt(float(xsq))


def projected_fista(
    grad: Callable[[Tensor], Tensor],
    L: float,
    prox: Callable[[Tensor, float], Tensor],
    x0: Tensor,
    maxit: int,
    tol: float = 1e-4,
    sq_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int, float]:
    r"""FISTA on f + S with step 1/L (docs/methods/lpom.md §3.2; docs/methods/conventions.md §8): the X-block solver of
    LPOM and Fenchel.

    ``grad`` is ∇S, L ≥ Lip(∇S), and ``prox(y, t)`` is prox_{t f} (the projection onto dom F, or the
    leaky-ReLU prox of docs/methods/conventions.md §5.2), called with t = 1/L. From X = V = x0, s = 1::

        X_new = prox(V − ∇S(V)/L, 1/L)
        s_new = (1 + sqrt(1 + 4 s²)) / 2
        V     = X_new + ((s − 1)/s_new)(X_new − X);   X = X_new;   s = s_new

    stopping once ‖X_new − X‖ ≤ tol·‖X‖ (X the previous iterate) or after ``maxit`` iterations. FISTA is not
    monotone; only its final objective is meaningful. Returns ``(x, iterations_run, final relative change)``
    where the relative change is ‖ΔX‖/‖X‖ of the last iteration (0 if both vanish, inf if only ‖X‖ does, NaN
    if ``maxit == 0``).

    ``sq_sum`` (data parallelism, docs/methods/distributed.md §1): when the columns of x (samples) are sharded over
    processes and ∇S, prox act column by column, a hook that sums the 2-vector (‖ΔX‖², ‖X‖²) over the processes, so
    every process stops at the same iteration.
    """
    L = float(L)
    if not (L > 0.0 and math.isfinite(L)):
        raise ValueError(f"projected_fista: L must be a positive finite number, got {L}")
    if maxit < 0:
        raise ValueError(f"projected_fista: maxit must be >= 0, got {maxit}")
    step = 1.0 / L
    x = x0
    v = x0
    s = 1.0
    rel = math.nan
    it = 0
    while it < maxit:
        x_new = prox(v - step * grad(v), step)
        s_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * s * s))
        dx = x_new - x
        v = x_new + ((s - 1.0) / s_new) * dx
        dnorm, xnorm = step_change_norms(dx, x, sq_sum)
        x, s = x_new, s_new
        it += 1
        rel = dnorm / xnorm if xnorm > 0.0 else (0.0 if dnorm == 0.0 else math.inf)
        if dnorm <= tol * xnorm:
            break
    return x, it, rel


# --------------------------------------------------------------------------------------------------
# Pseudo-inverse
# --------------------------------------------------------------------------------------------------


def batch_pinv(X: Tensor, *, side: str = "auto", ridge_rel: float = 1e-10, rcond: float = 1e-10) -> Tensor:
    r"""Moore–Penrose pseudo-inverse X⁺ (cols × rows) of a 2-D X (rows × cols), for LPOM's W-step
    (docs/methods/lpom.md §4.3).

    Orientation follows LPOM's col-major layout: X = X̄ⁱ is (n_i+1) × m, **rows = features (with the ones row),
    columns = batch samples**, and X⁺ is m × (n_i+1), used as W̄ ← Y − (1/β)(φ(YX̄) − X^{i+1})X̄⁺.
    (A row-major caller passes ``X.T`` and transposes the result.)

    * ``side="batch"``: K = XᵀX (m×m, float64), X⁺ = (K + εI)⁻¹Xᵀ;
    * ``side="feature"``: X⁺ = Xᵀ(XXᵀ + εI)⁻¹ (rows×rows Gram);
    * ``side="auto"``: batch when m ≤ rows (m = cols, e.g. m = 100 ≤ 785), else feature;
    * ``side="svd"``: ``torch.linalg.pinv`` in float64 with relative singular-value cutoff ``rcond``.

    The guard is ε = ridge_rel·tr(XᵀX)/m on either side (assumption, docs/methods/lpom.md §4.3); it keeps rank-deficient
    batches (duplicate samples, dead ReLU columns) factorisable while perturbing directions with σ² ≫ ε by a relative
    ε/σ². Where the chosen Gram is singular (rank-deficient X, or the non-auto side) rounding limits the result
    to about eps·λ_max(K)/ε ≈ 1e-6 relative accuracy; ``"svd"`` is the accurate reference. Never
    ``torch.linalg.lstsq``: on CUDA it silently mishandles rank deficiency. A zero X gives zeros.
    """
    if side not in _PINV_SIDES:
        raise ValueError(f"unknown pinv side {side!r}; choose one of {', '.join(_PINV_SIDES)}")
    if X.ndim != 2:
        raise ValueError(f"batch_pinv: X must be 2-D (features x batch), got shape {tuple(X.shape)}")
    rows, cols = X.shape
    X64 = X.detach().to(torch.float64)
    if side == "svd":
        return torch.linalg.pinv(X64, rtol=rcond).to(X.dtype)
    trace = float((X64 * X64).sum().item())
    if X.numel() == 0 or trace == 0.0:
        return torch.zeros(cols, rows, dtype=X.dtype, device=X.device)
    eps = float(ridge_rel) * trace / cols
    if side == "auto":
        side = "batch" if cols <= rows else "feature"
    if side == "batch":
        K = X64.T @ X64
        K.diagonal().add_(eps)
        P = _spd_solve(K, X64.T)
    else:
        K = X64 @ X64.T
        K.diagonal().add_(eps)
        P = _spd_solve(K, X64).T  # (XXᵀ + εI) is symmetric, so Xᵀ(XXᵀ+εI)⁻¹ = ((XXᵀ+εI)⁻¹X)ᵀ
    return P.to(X.dtype)


def push_through_coefficients(
    A: Tensor, G: Tensor, beta: float, *, ones_column: bool = False
) -> tuple[Tensor, Tensor]:
    r"""The N×N half of the push-through prox (docs/methods/conventions.md §7; docs/methods/proxprop.md §4.1): Z = (ĀĀᵀ
    + βI_N)⁻¹G and K = ĀĀᵀ.

    Ā is ``A`` (N×n), or [A, 1] with ``ones_column=True`` (then ĀĀᵀ = AAᵀ + 11ᵀ, without materialising Ā).
    ``linear_prox_direction(A_bar, G, beta, form="push_through")`` equals ``A_bar.T @ Z``. Callers that apply
    the final Āᵀ themselves or need K for cheap diagnostics (⟨∇J, g⟩ = ⟨G, KZ⟩, ‖∇J‖² = ⟨G, KG⟩) use this or
    :func:`push_through_inverse`. K and Z are float64 (docs/methods/conventions.md §4); β > 0. Single process
    only (docs/methods/distributed.md §1).
    """
    if A.ndim != 2 or G.ndim != 2 or G.shape[0] != A.shape[0]:
        raise ValueError(
            f"push_through_coefficients: A (N x n) and G (N x q) must share N, got {tuple(A.shape)}, "
            f"{tuple(G.shape)}"
        )
    M_inv, K = push_through_inverse(A, beta, ones_column=ones_column)
    return M_inv @ G.detach().to(torch.float64), K


def push_through_inverse(
    A: Tensor, beta: float, *, ones_column: bool = False, gram_dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    r"""(ĀĀᵀ + βI_N)⁻¹ and K = ĀĀᵀ, both float64, for Ā = ``A`` (N×n) or [A, 1] (``ones_column=True``).

    The product ĀĀᵀ (N×n×N, the only O(n) work) is taken in ``gram_dtype``; the N×N factorisation and
    inverse are always float64. The inverse comes from the Cholesky factor (a small diagonal jitter is added
    only if rounding makes the factorisation fail). With N the batch and a layer's width of right-hand sides,
    applying it is one matrix product, cheaper on the CPU than the two triangular solves of
    ``cholesky_solve``; ProxProp applies it in the model's dtype. β > 0.
    """
    beta = _check_beta(beta)
    if A.ndim != 2:
        raise ValueError(f"push_through_inverse: A must be 2-D (N x n), got shape {tuple(A.shape)}")
    Ag = A.detach().to(gram_dtype)
    K = (Ag @ Ag.T).to(torch.float64)
    if ones_column:
        K += 1.0
    M = K.clone()
    M.diagonal().add_(beta)
    return torch.cholesky_inverse(_spd_factor(M)), K


def spd_ridge_solve(S: Tensor, R: Tensor, beta: float) -> Tensor:
    r"""X = (S + βI)⁻¹R for a symmetric positive semi-definite Gram S that the caller accumulated itself
    (e.g. ProxProp's chunked unfold Gram PᵀP of a convolution, docs/methods/proxprop.md §4.2). Cholesky in float64; the
    result has R's dtype; β > 0."""
    beta = _check_beta(beta)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or R.shape[0] != S.shape[0]:
        raise ValueError(
            f"spd_ridge_solve: S must be square and R must have its rows, got {tuple(S.shape)}, {tuple(R.shape)}"
        )
    return _shifted_solve(S.detach().to(torch.float64), R.detach().to(torch.float64), beta).to(R.dtype)


def guarded_cholesky(
    gram: Tensor, eps: float, trace: float, *, who: str = "lpom", fix: str = "lower mu or raise ridge_rel"
) -> Tensor:
    """Cholesky factor of ``gram + eps·I`` for LPOM's W-step (docs/methods/lpom.md §4.3) and TIAM's Gram metric; when
    rounding leaves a nearly singular Gram indefinite, grow the guard (×100, at least 1e-14·trace) up to 8 times, then
    raise a ValueError naming ``who`` and the ``fix``."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + eps * eye)
    tries = 0
    while int(info.item()) != 0:
        tries += 1
        if tries > 8 or not math.isfinite(trace):
            raise ValueError(
                f"{who}: the batch Gram of a W-step cannot be factorised (non-finite activations?); {fix}"
            )
        eps = max(eps * 100.0, 1e-14 * trace)
        factor, info = torch.linalg.cholesky_ex(gram + eps * eye)
    return factor


def resolve_solve_dtype(choice: str, device: torch.device | str) -> torch.dtype:
    """The dtype of an inner factorisation (Gram, Cholesky, triangular solves) from a ``solve_dtype`` setting.

    ``"float64"`` and ``"float32"`` are taken as named. ``"auto"`` is float64 on the CPU, where the reference
    tests need its accuracy and it costs about twice float32, and float32 on CUDA, where most cards run float64
    at a small fraction of their float32 rate. A method validates its setting against :data:`SOLVE_DTYPES`;
    anything else raises ``ValueError`` here too.
    """
    if choice == "float64":
        return torch.float64
    if choice == "float32":
        return torch.float32
    if choice == "auto":
        return torch.float32 if torch.device(device).type == "cuda" else torch.float64
    raise ValueError(f"solve_dtype must be one of {', '.join(SOLVE_DTYPES)}; got {choice!r}")


def solve_dtype_like(choice: str, like: Tensor) -> torch.dtype:
    """The dtype of an inner factorisation or Gram product for inputs like ``like``, for the methods whose
    ``auto`` follows the model: ``auto`` takes a float32 or float64 input's own dtype; anything else (and
    ``auto`` for other dtypes) resolves as :func:`resolve_solve_dtype`."""
    if choice == "auto" and like.dtype in (torch.float32, torch.float64):
        return like.dtype
    return resolve_solve_dtype(choice, like.device)
