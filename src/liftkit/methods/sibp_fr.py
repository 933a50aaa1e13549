"""Fletcher–Reeves nonlinear CG with Armijo backtracking for the SIBP proxes, as the official code runs it
(FR3 for hidden layers, FR4 for the output layer; docs/methods/sibp.md §4.5), with its quirks switchable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QUIRKS", "FRResult", "Reduce", "fr_cg_armijo", "prox_gradient", "prox_objective", "reduce_sum"]

#: ``fixed``: a correct gradient from the start, the first accepted step applied, restarts; ``official``:
#: bit-faithful to the published code's quirks
QUIRKS = ("fixed", "official")

#: an in-place sum over the data-parallel processes (``Communicator.all_reduce_sum_``); ``None``: one process
Reduce = Callable[[Tensor], Tensor] | None


def reduce_sum(reduce: Reduce, t: Tensor) -> Tensor:
    return t if reduce is None else reduce(t)


# --------------------------------------------------------------------------------------------------
# Fletcher–Reeves nonlinear CG with Armijo backtracking (official FR3 / FR4; docs/methods/sibp.md §4.5)
# --------------------------------------------------------------------------------------------------


def prox_objective(z: Tensor, targets: Tensor, x: Tensor, x_old: Tensor, lam: float, *, relu: bool) -> float:
    """The SIBP prox objective ‖h(z) − T‖² + λ‖x − x_old‖² at pre-activations z = F xᵀ + B
    (docs/methods/sibp.md §4.5)."""
    out = torch.relu(z) if relu else z
    return float((out - targets).pow(2).sum() + lam * (x - x_old).pow(2).sum())


def prox_gradient(
    inputs: Tensor, z: Tensor, targets: Tensor, x: Tensor, x_old: Tensor, lam: float, *, relu: bool
) -> Tensor:
    """Gradient of :func:`prox_objective` in x: 2((h(z) − T) ⊙ 1[z > 0])ᵀF + 2λ(x − x_old) (mask only for
    ReLU; the convention at z = 0 is autograd's, derivative 0)."""
    res = (torch.relu(z) if relu else z) - targets
    if relu:
        res = res * (z > 0).to(res.dtype)
    return 2.0 * res.T @ inputs + 2.0 * lam * (x - x_old)


@dataclass
class FRResult:
    """Result of :func:`fr_cg_armijo`: the solution, objective before/after, steps taken, Armijo trials."""

    x: Tensor
    objective_before: float
    objective_after: float
    steps_taken: int
    trials: int


def fr_cg_armijo(
    inputs: Tensor,
    offset: Tensor,
    targets: Tensor,
    x_old: Tensor,
    lam: float,
    *,
    relu: bool,
    maxk: int = 5,
    rho: float = 0.6,
    sigma: float = 0.1,
    max_trials: int = 50,
    quirks: str = "fixed",
    reduce: Reduce = None,
) -> FRResult:
    r"""The official SIBP prox solver: Fletcher–Reeves CG with Armijo backtracking, warm-started at ``x_old``.

    Row-major. Minimises obj(x) = ‖h(F xᵀ + B) − T‖² + λ‖x − x_old‖² over x (q×p), with ``inputs`` F (m×p),
    ``offset`` B (m×q), ``targets`` T (m×q), h = ReLU (``relu=True``, the official FR3, with the mask
    1[h(z) > 0] of the current iterate and the m₀ start heuristic) or the identity (FR4). The W-prox uses
    F = f_{l−1}, B = 1bᵀ; the b-prox uses F = 1 (m×1), B = f_{l−1}Wᵀ and x = b as a q×1 matrix.

    Each of ``maxk`` iterations: Armijo on the smallest exponent m ≥ m_start with
    obj(x + ρ^m d) < obj(x) + σρ^m gᵀd (exponents below ``max_trials``), then x += ρ^m d and
    d = −g' + (‖g'‖²/‖g‖²) d. z is affine along d, so a trial costs no matrix product.

    ``quirks="official"`` reproduces the MATLAB code: no step when the accepted exponent is 0 (FR3 tests the
    unit step first but applies ρ^{m₀} on a pass), the next direction is then −g + d; FR4's initial gradient
    omits B; no restarts. ``quirks="fixed"``: correct gradient, the accepted step is applied, and d restarts
    to −g whenever gᵀd ≥ 0 or no trial succeeded. A zero gradient norm ends the iteration (x is stationary).

    ``reduce`` (data parallelism, docs/methods/sibp.md §7): the rows of F, B, T are this process's samples; the data
    terms of every objective value and gradient are summed over the processes, so every Armijo decision is
    the single-process one.
    """
    if quirks not in QUIRKS:
        raise ValueError(f"unknown quirks {quirks!r}; choose fixed or official")
    official = quirks == "official"

    def forward(x: Tensor) -> Tensor:
        return inputs @ x.T + offset

    def objective(z: Tensor, x: Tensor) -> float:
        if reduce is None:
            return prox_objective(z, targets, x, x_old, lam, relu=relu)
        out = torch.relu(z) if relu else z
        return float(reduce((out - targets).pow(2).sum().reshape(1))[0] + lam * (x - x_old).pow(2).sum())

    def gradient(z: Tensor, x: Tensor) -> Tensor:
        if reduce is None:
            return prox_gradient(inputs, z, targets, x, x_old, lam, relu=relu)
        res = (torch.relu(z) if relu else z) - targets
        if relu:
            res = res * (z > 0).to(res.dtype)
        return 2.0 * reduce(res.T @ inputs) + 2.0 * lam * (x - x_old)

    x = x_old.clone()
    z = forward(x)
    # FR4's first gradient (official quirk 2) drops the offset B: the residual is F xᵀ − T, not F xᵀ + B − T.
    g = gradient(z - offset if official and not relu else z, x)
    d = -g
    start = objective(z, x)
    steps = trials = 0
    log_rho = math.log(rho)
    for _ in range(maxk):
        g_sq = float(g.pow(2).sum())
        if g_sq == 0.0:
            break
        restarted = bool(torch.equal(d, -g))
        if not official and float((g * d).sum()) >= 0.0:
            d = -g
            restarted = True
        f0 = objective(z, x)
        slope = sigma * float((g * d).sum())
        zd = inputs @ d.T
        step_diff = x - x_old

        def trial_value(
            t: float, z: Tensor = z, zd: Tensor = zd, step_diff: Tensor = step_diff, d: Tensor = d
        ) -> float:
            zt = z + t * zd
            out = torch.relu(zt) if relu else zt
            data = reduce_sum(reduce, (out - targets).pow(2).sum().reshape(1))[0]
            return float(data + lam * (step_diff + t * d).pow(2).sum())

        m_start = 0
        if relu:
            ratio = 0.01 * f0 / abs(slope) if slope != 0.0 else math.inf
            m_start = max(math.floor(math.log(ratio) / log_rho), 0) if 0.0 < ratio < math.inf else 0
            if ratio == 0.0:
                m_start = max_trials
        accepted: int | None = None
        if official:
            exponent = 0
            heuristic_done = not relu
            while exponent < max_trials:
                trials += 1
                passed = trial_value(rho**exponent) < f0 + slope * rho**exponent
                if exponent == 0 and not heuristic_done:
                    exponent = m_start
                    heuristic_done = True
                if passed:
                    accepted = exponent
                    break
                exponent += 1
            moved = accepted is not None and accepted > 0
        else:
            for exponent in range(m_start, max(max_trials, m_start + 1)):
                trials += 1
                if trial_value(rho**exponent) < f0 + slope * rho**exponent:
                    accepted = exponent
                    break
            moved = accepted is not None
        if moved:
            assert accepted is not None
            x = x + rho**accepted * d
            z = forward(x)
            steps += 1
            g_new = gradient(z, x)
        elif official:
            # x did not move, but the code recomputes the gradient there: for FR4 this is the first correct one.
            g_new = gradient(z, x)
        elif restarted:
            break  # even steepest descent finds no Armijo decrease: x is numerically optimal
        else:
            d = -g
            continue
        beta = float(g_new.pow(2).sum()) / g_sq
        d = -g_new + beta * d
        g = g_new
    return FRResult(x, start, objective(z, x), steps, trials)
