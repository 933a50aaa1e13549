r"""Monotone activations and the Fenchel–Young penalty shared by LPOM and Fenchel lifted networks.

This module implements the activation table and the penalty of docs/methods/conventions.md §5–§6 once, for every method.

For a non-decreasing activation :math:`\varphi` the lifted methods use the convex pair (TPAMI eq. 20)

.. math::

    F(x) = \int_0^x \varphi^{-1}(s)\,ds
    \quad (x \in \operatorname{dom} F = \overline{\operatorname{range}\varphi}),
    \qquad F^*(u) = \int_0^u \varphi(s)\,ds - F(\varphi(0)),

where :math:`F^*` is the convex conjugate of :math:`F`, normalised so that the Fenchel–Young gap

.. math::

    B_\varphi(u, x) = F(x) + F^*(u) - x\,u \;\ge\; 0, \qquad B_\varphi(u, x) = 0 \iff x = \varphi(u)

is exactly zero at the forward pass. Its partial derivatives are :math:`\partial_u B = \varphi(u) - x` and
:math:`\partial_x B \ni \varphi^{-1}(x) - u`. LPOM's own pair is :math:`f = F - x^2/2`,
:math:`g(u) = \int_0^u (\varphi(s) - s)\,ds`, and :math:`\varphi = \operatorname{prox}_f`
(Li et al., "Lifted Proximal Operator Machines", AAAI 2019; TPAMI 2021, eqs. 19–20). Fenchel lifted networks
(Gu, Askari, El Ghaoui, AISTATS 2020) use :math:`2B_{\mathrm{ReLU}}` for their ReLU layers.

All element-wise functions take and return tensors of any floating dtype and device and broadcast like
``torch`` arithmetic. :func:`li2` provides the real dilogarithm that the softplus row needs.

The Σ_elem reduction used by LPOM/Fenchel monitors is the method :meth:`Activation.penalty_sum`; the
module-level :func:`penalty_sum` is the same thing as a function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "activation_from_module",
    "get_activation",
    "li2",
    "penalty_sum",
]

ACTIVATIONS: tuple[str, ...] = (
    "identity",
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "elu",
    "softplus",
    "hardtanh",
)

_DEFAULT_ALPHA: dict[str, float] = {"leaky_relu": 0.01, "elu": 1.0}
_POS_HOMOGENEOUS = frozenset({"identity", "relu", "leaky_relu"})
_CHEAP_PROX = frozenset({"identity", "relu", "leaky_relu", "hardtanh"})

_INF = math.inf
_PI2_6 = math.pi**2 / 6.0
_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# Dilogarithm
# --------------------------------------------------------------------------------------------------


def _bernoulli_series_coeffs(n_terms: int) -> tuple[float, ...]:
    """Coefficients ``B_{2k}/(2k+1)!`` for k = 1..n_terms, from the exact Bernoulli recurrence."""
    b: list[Fraction] = [Fraction(1)]
    for n in range(1, 2 * n_terms + 1):
        b.append(-sum((math.comb(n + 1, k) * b[k] for k in range(n)), Fraction(0)) / (n + 1))
    return tuple(float(b[2 * k] / math.factorial(2 * k + 1)) for k in range(1, n_terms + 1))


# |w| <= ln 2 on every branch below; the k-th term is about (ln 2 / 2π)^{2k}, so 12 terms are below 1e-22.
_LI2_COEFFS = _bernoulli_series_coeffs(12)


def _li2_bernoulli(w: Tensor) -> Tensor:
    r"""Li₂(z) as a series in :math:`w = -\ln(1 - z)`: :math:`\sum_{n\ge0} B_n w^{n+1}/(n+1)!` (B₁ = −½).

    The series converges for |w| < 2π; callers keep |w| ≤ ln 2, where it converges geometrically with ratio
    ≈ 0.012 in w². Taking w (rather than z) as the argument lets callers supply it without cancellation.
    """
    w2 = w * w
    acc = torch.full_like(w, _LI2_COEFFS[-1])
    for c in reversed(_LI2_COEFFS[:-1]):
        acc = acc * w2 + c
    return w - 0.25 * w2 + w * w2 * acc


def li2(z: Tensor) -> Tensor:
    r"""Real dilogarithm :math:`\mathrm{Li}_2(z) = -\int_0^z \ln(1-s)/s\,ds` for z ≤ 1 (NaN for z > 1).

    Evaluation (element-wise, in the dtype of ``z``): the Bernoulli series in :math:`w = -\ln(1-z)` on
    [−1, ½]; the reflection :math:`\mathrm{Li}_2(z) = \pi^2/6 - \ln z \ln(1-z) - \mathrm{Li}_2(1-z)` on
    (½, 1]; and the inversion :math:`\mathrm{Li}_2(z) = -\pi^2/6 - \tfrac12\ln^2(-z) - \mathrm{Li}_2(1/z)`
    for z < −1. Each branch is accurate to a few ulps.
    """
    z = torch.as_tensor(z)
    if not z.is_floating_point():
        z = z.to(torch.get_default_dtype())
    inv = z < -1.0
    refl = z > 0.5
    mid = ~(inv | refl)
    # Each branch is evaluated on a safe substitute elsewhere so no NaN/inf leaks into the other branches
    # (forward values or autograd).
    z_mid = torch.where(mid, z, torch.zeros_like(z))
    v_mid = _li2_bernoulli(-torch.log1p(-z_mid))

    z_inv = torch.where(inv, z, torch.full_like(z, -2.0))
    v_inv = -_PI2_6 - 0.5 * torch.log(-z_inv) ** 2 - _li2_bernoulli(-torch.log1p(-1.0 / z_inv))

    z_refl = torch.where(refl & (z <= 1.0), z, torch.full_like(z, 0.75))
    one_minus = 1.0 - z_refl  # exact for z in [1/2, 1] (Sterbenz)
    log_z = torch.log(z_refl)
    prod = torch.where(one_minus > 0, log_z * torch.log(torch.where(one_minus > 0, one_minus, 1.0)), 0.0)
    v_refl = _PI2_6 - prod - _li2_bernoulli(-log_z)

    out = torch.where(inv, v_inv, torch.where(refl, v_refl, v_mid))
    return torch.where(z > 1.0, torch.full_like(out, math.nan), out)


def _softplus(u: Tensor) -> Tensor:
    """ln(1 + eᵘ) without torch's threshold shortcut (which is off by e^{-20} ≈ 2e-9 above u = 20)."""
    return torch.relu(u) + torch.log1p(torch.exp(-u.abs()))


def _softplus_F(x: Tensor) -> Tensor:
    r"""F(x) = x²/2 + Li₂(e^{−x}) − π²/6 for x ≥ 0 (finite values only; the caller masks the domain).

    For x < ln 2 the reflection formula gives F = x²/2 + x ln(1 − e^{−x}) − S(x), with S the Bernoulli series
    evaluated at w = −ln(e^{−x}) = x exactly; for x ≥ ln 2, w = −ln(1 − e^{−x}) is small and accurate.
    """
    small = x < _LN2
    xs = torch.where(small, x, torch.full_like(x, 0.5 * _LN2))
    one_minus = -torch.expm1(-xs)
    v_small = 0.5 * xs * xs + torch.xlogy(xs, one_minus) - _li2_bernoulli(xs)
    xl = torch.where(small, torch.full_like(x, 1.0), x)
    v_large = 0.5 * xl * xl + _li2_bernoulli(-torch.log1p(-torch.exp(-xl))) - _PI2_6
    return torch.where(small, v_small, v_large)


def _softplus_F_star(u: Tensor) -> Tensor:
    r"""F*(u) = −Li₂(−eᵘ), via the inversion formula for u > 0 so that eᵘ is never formed.

    u ≤ 0: −S(−ln(1 + eᵘ)); u > 0: π²/6 + u²/2 + S(−ln(1 + e^{−u})), S the Bernoulli series.
    """
    neg = u <= 0
    un = torch.where(neg, u, torch.zeros_like(u))
    up = torch.where(neg, torch.ones_like(u), u)
    v_neg = -_li2_bernoulli(-_softplus(un))
    v_pos = _PI2_6 + 0.5 * up * up + _li2_bernoulli(-_softplus(-up))
    return torch.where(neg, v_neg, v_pos)


# --------------------------------------------------------------------------------------------------
# Activation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    r"""One row of the activation table together with its Fenchel–Young penalty (docs/methods/conventions.md §5, §6).

    ``alpha`` is the leaky-ReLU slope (default 0.01, must lie in (0, 1)) or the ELU scale (default 1.0, must
    be > 0); it must be ``None`` for the other activations. Construct via :func:`get_activation` or directly.
    Piecewise entries list the u ≥ 0 (x ≥ 0) branch first.

    ========== ===================== ======== ========= ============================== ===============
    name       φ(u)                  κ        dom F     F(x)                           F*(u)
    ========== ===================== ======== ========= ============================== ===============
    identity   u                     1        R         x²/2                           u²/2
    relu       max(u, 0)             1        [0, ∞)    x²/2                           ½(u)₊²
    leaky_relu u; αu                 1        R         x²/2; x²/(2α)                  u²/2; αu²/2
    sigmoid    1/(1+e^{−u})          1/4      [0, 1]    x ln x + (1−x) ln(1−x)         ln(1+eᵘ)
    tanh       tanh u                1        [−1, 1]   ½[(1+x)ln(1+x)+(1−x)ln(1−x)]   ln cosh u
    elu        u; α(eᵘ−1)            max(1,α) [−α, ∞)   x²/2; (x+α)ln(1+x/α) − x       u²/2; α(eᵘ−1−u)
    softplus   ln(1+eᵘ)              1        [0, ∞)    x²/2 + Li₂(e^{−x}) − π²/6      −Li₂(−eᵘ)
    hardtanh   clip(u, −1, 1)        1        [−1, 1]   x²/2                           u²/2; |u| − ½
    ========== ===================== ======== ========= ============================== ===============

    (hardtanh's F* switches branch at |u| = 1.)

    F*(u) carries the normalising constant −F(φ(0)) (ln 2 for sigmoid, π²/12 for softplus) so that
    :meth:`penalty` vanishes exactly at ``x = phi(u)``.
    """

    name: str
    alpha: float | None = None

    def __post_init__(self) -> None:
        name = str(self.name).lower()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}; valid activations: {', '.join(ACTIVATIONS)}")
        object.__setattr__(self, "name", name)
        alpha = self.alpha
        if name in _DEFAULT_ALPHA:
            alpha = _DEFAULT_ALPHA[name] if alpha is None else float(alpha)
            if not math.isfinite(alpha):
                raise ValueError(f"{name}: alpha must be finite, got {alpha}")
            if name == "leaky_relu" and not 0.0 < alpha < 1.0:
                raise ValueError(f"leaky_relu: negative slope alpha must lie in (0, 1), got {alpha}")
            if name == "elu" and alpha <= 0.0:
                raise ValueError(f"elu: alpha must be > 0, got {alpha}")
            object.__setattr__(self, "alpha", alpha)
        elif alpha is not None:
            raise ValueError(f"{name} takes no alpha (only leaky_relu and elu do), got alpha={alpha}")

    @property
    def _a(self) -> float:
        # alpha is filled in by __post_init__ for the two parametrised activations
        assert self.alpha is not None
        return self.alpha

    # -- table constants ---------------------------------------------------------------------------

    @property
    def kappa(self) -> float:
        """κ = sup |φ'| (Lipschitz constant of φ): 1/4 for sigmoid, max(1, α) for ELU, else 1."""
        if self.name == "sigmoid":
            return 0.25
        if self.name == "elu":
            return max(1.0, self._a)
        return 1.0

    @property
    def domain(self) -> tuple[float, float]:
        """dom F = closure of range(φ), as (lower, upper) with ±inf for unbounded ends."""
        return {
            "identity": (-_INF, _INF),
            "relu": (0.0, _INF),
            "leaky_relu": (-_INF, _INF),
            "sigmoid": (0.0, 1.0),
            "tanh": (-1.0, 1.0),
            "elu": (-self._a if self.name == "elu" else 0.0, _INF),
            "softplus": (0.0, _INF),
            "hardtanh": (-1.0, 1.0),
        }[self.name]

    @property
    def positively_homogeneous(self) -> bool:
        """φ(cu) = cφ(u) for c > 0 (identity, ReLU, leaky ReLU); then one μ/λ suffices (TPAMI App. G)."""
        return self.name in _POS_HOMOGENEOUS

    @property
    def cheap_prox(self) -> bool:
        """prox_{tf} is closed form (identity, ReLU, leaky ReLU, hardtanh); projected FISTA is the default."""
        return self.name in _CHEAP_PROX

    # -- φ and φ⁻¹ ---------------------------------------------------------------------------------

    def phi(self, u: Tensor) -> Tensor:
        """The activation φ(u), element-wise (softplus without torch's threshold approximation)."""
        n = self.name
        if n == "identity":
            return u
        if n == "relu":
            return torch.relu(u)
        if n == "leaky_relu":
            return tF.leaky_relu(u, self._a)
        if n == "sigmoid":
            return torch.sigmoid(u)
        if n == "tanh":
            return torch.tanh(u)
        if n == "elu":
            return tF.elu(u, self._a)
        if n == "softplus":
            return _softplus(u)
        return torch.clamp(u, -1.0, 1.0)  # hardtanh

    def inverse(self, x: Tensor) -> Tensor:
        r"""φ⁻¹(x) on dom F; NaN outside dom F.

        Where the boundary of dom F is attained by φ the inverse is set-valued (ReLU: φ⁻¹(0) = (−∞, 0];
        hardtanh: φ⁻¹(±1) = ±[1, ∞)); there the minimal-norm element, x itself, is returned, so ReLU and
        hardtanh give the identity on dom F. Where the boundary is not attained (sigmoid, tanh, ELU,
        softplus) the set is empty and the limit ±inf is returned.
        """
        n = self.name
        nan = torch.full_like(x, math.nan)
        if n == "identity":
            return x
        if n == "relu":
            return torch.where(x >= 0, x, nan)
        if n == "leaky_relu":
            return torch.where(x >= 0, x, x / self._a)
        if n == "sigmoid":
            inside = (x >= 0) & (x <= 1)
            return torch.where(inside, torch.logit(torch.where(inside, x, 0.5)), nan)
        if n == "tanh":
            inside = x.abs() <= 1
            return torch.where(inside, torch.atanh(torch.where(inside, x, 0.0)), nan)
        if n == "elu":
            a = self._a
            neg = (x < 0) & (x >= -a)
            v_neg = torch.log1p(torch.where(neg, x, 0.0) / a)
            return torch.where(x >= 0, x, torch.where(neg, v_neg, nan))
        if n == "softplus":
            pos = x > 0
            xp = torch.where(pos, x, 1.0)
            v = xp + torch.log(-torch.expm1(-xp))  # ln(eˣ − 1) without overflow
            return torch.where(pos, v, torch.where(x == 0, -math.inf, nan))
        return torch.where(x.abs() <= 1, x, nan)  # hardtanh

    # -- F, F*, penalty ----------------------------------------------------------------------------

    def F(self, x: Tensor) -> Tensor:
        r"""F(x) = ∫₀ˣ φ⁻¹ (LPOM's f̃), +inf outside dom F."""
        n = self.name
        inf = torch.full_like(x, math.inf)
        if n == "identity":
            return 0.5 * x * x
        if n == "relu":
            return torch.where(x >= 0, 0.5 * x * x, inf)
        if n == "leaky_relu":
            return torch.where(x >= 0, 0.5 * x * x, 0.5 * x * x / self._a)
        if n == "sigmoid":
            inside = (x >= 0) & (x <= 1)
            xs = torch.where(inside, x, 0.5)
            return torch.where(inside, torch.xlogy(xs, xs) + torch.xlogy(1 - xs, 1 - xs), inf)
        if n == "tanh":
            inside = x.abs() <= 1
            xs = torch.where(inside, x, 0.0)
            return torch.where(inside, 0.5 * (torch.xlogy(1 + xs, 1 + xs) + torch.xlogy(1 - xs, 1 - xs)), inf)
        if n == "elu":
            a = self._a
            neg = (x < 0) & (x >= -a)
            xn = torch.where(neg, x, -0.5 * a)
            # (x+α) ln(1+x/α) → 0 as x → −α, so the closed end of dom F has the finite value F(−α) = α.
            v_neg = torch.where(xn > -a, (xn + a) * torch.log1p(xn / a), 0.0) - xn
            return torch.where(x >= 0, 0.5 * x * x, torch.where(neg, v_neg, inf))
        if n == "softplus":
            inside = x >= 0
            return torch.where(inside, _softplus_F(torch.where(inside, x, 1.0)), inf)
        return torch.where(x.abs() <= 1, 0.5 * x * x, inf)  # hardtanh

    def F_star(self, u: Tensor) -> Tensor:
        r"""Normalised conjugate F*(u) = ∫₀ᵘ φ − F(φ(0)) (LPOM's g̃); finite for all u.

        The constant is nonzero only for sigmoid (+ln 2, giving ln(1+eᵘ)) and softplus (+π²/12, giving
        −Li₂(−eᵘ)); it makes :meth:`penalty` exactly 0 at feasibility and never affects any update.
        """
        n = self.name
        if n == "identity":
            return 0.5 * u * u
        if n == "relu":
            r = torch.relu(u)
            return 0.5 * r * r
        if n == "leaky_relu":
            return torch.where(u >= 0, 0.5 * u * u, 0.5 * self._a * u * u)
        if n == "sigmoid":
            return _softplus(u)
        if n == "tanh":
            a = u.abs()
            return a + torch.log1p(torch.exp(-2.0 * a)) - _LN2  # ln cosh u without overflow
        if n == "elu":
            un = torch.clamp(u, max=0.0)
            return torch.where(u >= 0, 0.5 * u * u, self._a * (torch.expm1(un) - un))
        if n == "softplus":
            return _softplus_F_star(u)
        a = u.abs()  # hardtanh
        return torch.where(a <= 1, 0.5 * u * u, a - 0.5)

    def penalty(self, u: Tensor, x: Tensor) -> Tensor:
        r"""Element-wise Fenchel–Young gap B_φ(u, x) = F(x) + F*(u) − x·u ≥ 0, zero iff x = φ(u).

        ``u`` is the pre-activation (LPOM: W̄^{i−1}X̄^{i−1}), ``x`` the lifted output; +inf where x ∉ dom F.
        Fenchel's ReLU term neo(V, U) equals 2·B_ReLU(U, V) (docs/methods/conventions.md §6).
        """
        return self.F(x) + self.F_star(u) - x * u

    def penalty_sum(self, u: Tensor, x: Tensor) -> float:
        """Σ_elem B_φ(u, x) as a Python float (accumulated in float64), for monitors and oracles."""
        return float(self.penalty(u, x).sum(dtype=torch.float64).item())

    def grad_u(self, u: Tensor, x: Tensor) -> Tensor:
        """∂B/∂u = φ(u) − x."""
        return self.phi(u) - x

    def grad_x(self, u: Tensor, x: Tensor) -> Tensor:
        """∂B/∂x = φ⁻¹(x) − u on the interior of dom F (on the boundary: the element of :meth:`inverse`)."""
        return self.inverse(x) - u

    # -- projections and proxes --------------------------------------------------------------------

    def project(self, x: Tensor) -> Tensor:
        """Euclidean projection onto dom F (a clamp; identity for unbounded domains)."""
        lo, hi = self.domain
        if lo == -_INF and hi == _INF:
            return x
        if hi == _INF:
            return torch.clamp(x, min=lo)
        return torch.clamp(x, lo, hi)

    def prox_f(self, y: Tensor, t: float) -> Tensor:
        r"""prox_{t f}(y) = argminₓ t f(x) + ½(x − y)² for LPOM's f = F − x²/2 (docs/methods/conventions.md §5.2).

        * identity: y; ReLU, hardtanh: the projection onto dom F (f is its indicator);
        * leaky ReLU: y (y ≥ 0), y / (1 + t(1/α − 1)) (y < 0);
        * sigmoid, tanh, ELU, softplus: the root of h(x) = t φ⁻¹(x) + (1 − t) x = y on dom F (h is increasing).
          It is found element-wise, vectorised, as x = φ(v) with v the root of t v + (1 − t) φ(v) = y, by
          Newton steps safeguarded by bisection on a bracket (a bisection step whenever Newton leaves it), to
          a few ulps in v. At t = 1 the prox is φ(y) (LPOM's φ = prox_f), returned directly. In saturation the
          exact root may round to the boundary of dom F (e.g. x = 1.0 for tanh when 1 − x < eps).

        t > 0 is required. Since h' ≥ m = t/κ + 1 − t, the prox is unique whenever m > 0, which holds for
        every t > 0 when κ ≤ 1 and for t ∈ (0, 1] always; ELU with α > 1 and t ≥ α/(α − 1) raises ValueError.
        """
        t = float(t)
        if not (t > 0.0 and math.isfinite(t)):
            raise ValueError(f"prox_f: step t must be a positive finite number, got {t}")
        n = self.name
        if n == "identity":
            return y
        if n in ("relu", "hardtanh"):
            return self.project(y)
        if n == "leaky_relu":
            return torch.where(y >= 0, y, y / (1.0 + t * (1.0 / self._a - 1.0)))
        if t == 1.0:
            return self.phi(y)
        return self._prox_root(y, t)

    def _dphi(self, v: Tensor) -> Tensor:
        """φ'(v) for the smooth activations (sigmoid, tanh, ELU, softplus)."""
        n = self.name
        if n == "sigmoid":
            s = torch.sigmoid(v)
            return s * (1.0 - s)
        if n == "tanh":
            th = torch.tanh(v)
            return 1.0 - th * th
        if n == "elu":
            return torch.where(v >= 0, torch.ones_like(v), self._a * torch.exp(torch.clamp(v, max=0.0)))
        if n == "softplus":
            return torch.sigmoid(v)
        raise ValueError(f"the {n} activation has no smooth derivative; _dphi serves sigmoid, tanh, elu and softplus")

    def _prox_root(self, y: Tensor, t: float) -> Tensor:
        # Solve h(x) = t φ⁻¹(x) + (1 − t) x = y through x = φ(v): g(v) = t v + (1 − t) φ(v) − y is finite and
        # smooth on all of R (φ⁻¹ is ±inf at the ends of dom F), so a bracketed Newton iteration converges in a
        # handful of steps where plain bisection needs ~60, and x = φ(v) lands in dom F by construction.
        m_v = min(t, t + (1.0 - t) * self.kappa)  # inf of g' = t + (1 − t)φ', φ' ∈ [0, κ]
        if m_v <= 0.0:
            raise ValueError(
                f"prox_f: f = F − x²/2 is nonconvex for {self.name}(alpha={self.alpha}) and step t={t} "
                f"(needs t/κ + 1 − t > 0)"
            )
        # g' ≥ m_v and g(y) = (1 − t)(φ(y) − y), so the root lies within r of y.
        r = abs(1.0 - t) * (y - self.phi(y)).abs() / m_v
        r = r * (1.0 + 1e-6) + 1e-6
        lo, hi = y - r, y + r
        v = y.clone()
        eps = torch.finfo(y.dtype).eps
        # Each step either is Newton or halves the bracket, so this cap is never reached in practice.
        for _ in range(200):
            g = t * v + (1.0 - t) * self.phi(v) - y
            lo = torch.where(g < 0, v, lo)
            hi = torch.where(g > 0, v, hi)
            newton = v - g / (t + (1.0 - t) * self._dphi(v))
            inside = (newton >= lo) & (newton <= hi)
            v_new = torch.where(inside, newton, lo + 0.5 * (hi - lo))
            v_new = torch.where(g == 0, v, v_new)
            tol = 4.0 * eps * (1.0 + v_new.abs())
            done = ((v_new - v).abs() <= tol) | (hi - lo <= tol)
            v = v_new
            if bool(done.all()):
                break
        return self.phi(v)

    # -- interop -----------------------------------------------------------------------------------

    def module(self) -> nn.Module:
        """The matching ``torch.nn`` module (``nn.Softplus()`` uses torch's threshold=20 linearisation)."""
        n = self.name
        if n == "identity":
            return nn.Identity()
        if n == "relu":
            return nn.ReLU()
        if n == "leaky_relu":
            return nn.LeakyReLU(self._a)
        if n == "sigmoid":
            return nn.Sigmoid()
        if n == "tanh":
            return nn.Tanh()
        if n == "elu":
            return nn.ELU(self._a)
        if n == "softplus":
            return nn.Softplus()
        return nn.Hardtanh()


def penalty_sum(act: Activation, U: Tensor, X: Tensor) -> float:
    """Σ_elem B_φ(U, X) as a float; the same as ``act.penalty_sum(U, X)``."""
    return act.penalty_sum(U, X)


def get_activation(name: str, alpha: float | None = None) -> Activation:
    """The :class:`Activation` called ``name`` (one of :data:`ACTIVATIONS`, case-insensitive).

    Raises ValueError for an unknown name (listing the valid ones), for an alpha outside the allowed range
    (leaky ReLU: (0, 1); ELU: > 0) and for an alpha given to an activation without one.
    """
    return Activation(name, alpha)


_NON_MONOTONE: tuple[type[nn.Module], ...] = (nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanhshrink)
_OTHER_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU6,
    nn.RReLU,
    nn.PReLU,
    nn.SELU,
    nn.CELU,
    nn.Hardsigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Threshold,
    nn.GLU,
    nn.Softmax,
    nn.Softmin,
    nn.LogSoftmax,
    nn.Softmax2d,
)
_SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.Softplus,
    nn.Hardtanh,
)
_SUPPORTED_TEXT = (
    "nn.Identity, nn.ReLU, nn.LeakyReLU(0<slope<1), nn.Sigmoid, nn.Tanh, nn.ELU(alpha>0), "
    "nn.Softplus(beta=1), nn.Hardtanh(-1, 1)"
)


def activation_from_module(m: nn.Module) -> Activation | None:
    """Map a ``torch.nn`` activation module to its :class:`Activation`.

    Returns ``None`` for modules that are not activations (Linear, Conv2d, Flatten, pooling, …). Raises
    ValueError, naming the module, for activations the lifted methods cannot handle: non-monotone ones
    (GELU, SiLU, Mish, Hardswish, Tanhshrink), unsupported variants (Softplus with beta ≠ 1, Hardtanh with
    bounds other than (−1, 1), LeakyReLU slope outside (0, 1), ELU alpha ≤ 0), other activations (ReLU6,
    PReLU, SELU, softmax, …) and subclasses of the supported classes, whose forward cannot be verified.
    """
    label = type(m).__name__
    if type(m) not in _SUPPORTED_MODULES:
        # Exact types only: a subclass (e.g. ReLU6 < Hardtanh, or a user's ReLU subclass) may change forward.
        if isinstance(m, _NON_MONOTONE):
            raise ValueError(
                f"unsupported activation module {label}: it is not monotone, so it has no Fenchel–Young "
                f"penalty; supported: {_SUPPORTED_TEXT}"
            )
        if isinstance(m, _OTHER_ACTIVATION_MODULES + _SUPPORTED_MODULES):
            raise ValueError(f"unsupported activation module {label}; supported: {_SUPPORTED_TEXT}")
        return None
    try:
        if isinstance(m, nn.LeakyReLU):
            return Activation("leaky_relu", float(m.negative_slope))
        if isinstance(m, nn.ELU):
            return Activation("elu", float(m.alpha))
    except ValueError as exc:
        raise ValueError(f"unsupported activation module {m!r}: {exc}") from None
    if isinstance(m, nn.Softplus):
        if float(m.beta) != 1.0:
            raise ValueError(f"unsupported activation module {m!r}: only Softplus with beta=1 is supported")
        return Activation("softplus")
    if isinstance(m, nn.Hardtanh):
        if float(m.min_val) != -1.0 or float(m.max_val) != 1.0:
            raise ValueError(f"unsupported activation module {m!r}: only Hardtanh(-1, 1) is supported")
        return Activation("hardtanh")
    simple: dict[type[nn.Module], str] = {
        nn.Identity: "identity",
        nn.ReLU: "relu",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
    }
    return Activation(simple[type(m)])
