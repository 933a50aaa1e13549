r"""The linear-layer prox of ProxProp for one Linear or Conv2d layer: the engine behind
:class:`liftkit.optim.ProxProp` and the ``proxprop`` method.

For a layer with saved input ``a`` (all the rows the layer saw, stacked) and backward signal ``G = ∂J/∂z`` at
its output, with Ā = [a, 1] and Θ = [Wᵀ; bᵀ] (row-major),

.. math::

    \Theta_{\mathrm{old}} - \Theta_{\mathrm{prox}} = (\bar A^\top\bar A + \beta I)^{-1}\bar A^\top G
        = \bar A^\top(\bar A\bar A^\top + \beta I_N)^{-1} G ,\qquad \beta = 1/\tau_\theta

(Frerix et al., ICLR 2018, eq. 11 and Prop. 2: the prox of ½‖ĀΘ − (z − G)‖² + ‖Θ − Θ_old‖²/(2τ_θ)). The data
term is a **sum** over the rows while G carries the loss's own reduction, so τ_θ is tied to the batch size and
to the reduction (a mean loss scales G by 1/N).

Solvers (``solver``):

* ``exact``: Linear layers: Cholesky in float64 on the (n+1)×(n+1) Gram (``form="gram"``) or the N×N
  push-through system (``"push_through"``, whose float64 inverse is applied in the model's dtype); ``"auto"``
  picks the smaller. Conv2d layers: one shared Gram of
  the unfolded input, PᵀP + βI, accumulated in float64 over row chunks, one right-hand side per output channel
  (our addition; in neither the paper nor its code). The Gram products themselves (ĀᵀĀ, ĀĀᵀ, PᵀP and the
  right-hand sides, the O(n) work) are taken in ``solve_dtype``: ``auto`` is the model's dtype (float32 or
  float64), ``float64`` the previous behaviour; the factorisations are float64 either way.
* ``cg`` (``cg_iters``) or ``cgN``: block CG as in the official code: one CG per output neuron of a Linear
  layer, one CG over all parameters of a Conv2d layer. Solved in difference form from 0, which is the official
  warm start x₀ = θ_old shifted by θ_old. ``cg_variant="textbook"`` (default) is conjugate gradients proper
  and converges to the exact prox; ``"official"`` reproduces the published code, whose search direction
  aliases the residual, so its iterates equal the textbook ones for the first iteration only (see
  :func:`liftkit.solvers.block_cg`). Stopping: max_j‖r_j‖² < cg_tol²·mean_j‖r_{j,0}‖² (``cg_stop="tol"``, the
  code's) or exactly the given iterations (``"fixed"``). cg1 is the Cauchy-scaled gradient.
* ``gradient``: the plain gradient ĀᵀG through the same path (backprop; a timing control).

Under data parallelism (a communicator with several processes) each rank holds its rows of ``a`` and ``G``;
the Grams, right-hand sides and CG products are all-reduced, so every rank solves the same system.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from liftkit.distributed import Communicator, LocalComm
from liftkit.solvers import SOLVE_DTYPES, block_cg, push_through_inverse, solve_dtype_like, spd_ridge_solve

__all__ = ["Direction", "ProxSettings", "ProxSolver", "check_prox_module", "resolve_optimizer"]

_CG_NAME = re.compile(r"^cg(\d+)$")
FORMS = ("auto", "gram", "push_through")
CG_VARIANTS = ("textbook", "official")


def resolve_optimizer(name: str | type) -> type[torch.optim.Optimizer]:
    """A ``torch.optim`` optimizer class from itself or its case-insensitive name (``"adam"``, ``"SGD"``)."""
    if isinstance(name, type):
        if issubclass(name, torch.optim.Optimizer) and name is not torch.optim.Optimizer:
            return name
        raise ValueError(f"optimizer {name.__name__} is not a torch.optim.Optimizer subclass")
    wanted = str(name).lower()
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
            and attr.lower() == wanted
        ):
            return obj
    raise ValueError(f"optimizer {name!r} is not a torch.optim optimizer; use e.g. adam, sgd, adamw, rmsprop")


@dataclass(frozen=True)
class ProxSettings:
    """How the prox of every layer is solved; see the module docstring. ``diagnostics`` computes the cosine
    between each direction and the gradient, ``residuals`` the relative residual of the normal equations."""

    solver: str = "exact"
    tau_theta: float = 0.02
    cg_iters: int = 3
    cg_tol: float = 1e-2
    cg_eps: float = 1e-6
    cg_stop: str = "tol"
    cg_variant: str = "textbook"
    form: str = "auto"
    unfold_chunk_rows: int = 65536
    residuals: bool = False
    diagnostics: bool = False
    solve_dtype: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        match = _CG_NAME.match(self.solver) if isinstance(self.solver, str) else None
        if match is None and self.solver not in ("exact", "cg", "gradient"):
            raise ValueError(f"solver must be exact, cg, cgN (e.g. cg3) or gradient; got {self.solver!r}")
        if match is not None and int(match.group(1)) < 1:
            raise ValueError(f"solver {self.solver!r} needs at least one CG iteration, e.g. cg1")
        for name in ("tau_theta", "cg_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if isinstance(self.cg_eps, bool) or not (isinstance(self.cg_eps, int | float)
                                                  and math.isfinite(self.cg_eps) and self.cg_eps >= 0):
            raise ValueError(f"cg_eps must be a non-negative finite number, got {self.cg_eps!r}")
        for name in ("cg_iters", "unfold_chunk_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name, choices in (("cg_stop", ("tol", "fixed")), ("cg_variant", CG_VARIANTS), ("form", FORMS),
                              ("solve_dtype", SOLVE_DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")

    def gram_dtype(self, like: Tensor) -> torch.dtype:
        """The dtype the exact solver forms its Gram products in, for inputs like ``like``: ``auto`` takes a
        float32 / float64 input's own dtype, else :func:`liftkit.solvers.resolve_solve_dtype` decides."""
        return solve_dtype_like(self.solve_dtype, like)

    @property
    def iterations(self) -> int:
        """CG iterations: N of ``cgN``, else ``cg_iters``."""
        match = _CG_NAME.match(self.solver)
        return int(match.group(1)) if match else self.cg_iters

    @property
    def mode(self) -> str:
        """``exact``, ``cg`` or ``gradient``."""
        return "cg" if _CG_NAME.match(self.solver) else self.solver


def check_prox_module(module: nn.Module, where: str) -> None:
    """``ValueError`` naming ``where`` if ``module`` is a Conv2d whose prox this engine cannot solve."""
    if not isinstance(module, nn.Conv2d):
        return
    if module.groups != 1:
        raise ValueError(f"proxprop cannot train {where}: grouped convolutions (groups={module.groups}) are not "
                         "supported; use groups=1 or keep the layer explicit")
    if module.padding_mode != "zeros":
        raise ValueError(f"proxprop cannot train {where}: padding_mode must be 'zeros', got "
                         f"{module.padding_mode!r}")
    if isinstance(module.padding, str) and module.padding != "valid":
        raise ValueError(f"proxprop cannot train {where}: give the padding as integers, not {module.padding!r}")


def _int_padding(m: nn.Conv2d) -> tuple[int, ...]:
    return (0, 0) if isinstance(m.padding, str) else tuple(m.padding)


@dataclass
class Direction:
    """θ_old − θ_prox of one layer, split like its parameters, with its diagnostics."""

    weight: Tensor
    bias: Tensor | None
    cos: float
    iterations: int
    residual: float


def _cosine(dot: float, norm2_a: float, norm2_b: float) -> float:
    denom = math.sqrt(max(norm2_a, 0.0) * max(norm2_b, 0.0))
    return dot / denom if denom > 0 else 1.0


class LinearOperator:
    """The joint map A:(W, b) ↦ z of one layer on its saved input, with adjoint Aᵀ: y ↦ (∂⟨y,z⟩/∂W, ∂/∂b)."""

    def __init__(self, module: nn.Linear | nn.Conv2d, a: Tensor) -> None:
        self.module = module
        self.has_bias = module.bias is not None
        self.w_shape = module.weight.shape
        self.a = a.reshape(-1, module.in_features) if isinstance(module, nn.Linear) else a

    def forward(self, w: Tensor, b: Tensor | None) -> Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(self.a, w, b)
        return F.conv2d(self.a, w, b, m.stride, _int_padding(m), m.dilation, m.groups)

    def adjoint(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        m = self.module
        if isinstance(m, nn.Linear):
            y2 = y.reshape(-1, m.out_features)
            return y2.T @ self.a, (y2.sum(0) if self.has_bias else None)
        gw = conv2d_weight(self.a, self.w_shape, y, m.stride, _int_padding(m), m.dilation, m.groups)
        return gw, (y.sum(dim=(0, 2, 3)) if self.has_bias else None)


def _pack_columns(w: Tensor, b: Tensor | None) -> Tensor:
    """Linear parameters as the (n+1)×q matrix Θ = [Wᵀ; bᵀ], one column per output neuron."""
    return w.T if b is None else torch.cat([w.T, b.unsqueeze(0)], dim=0)


def _unpack_columns(theta: Tensor, n: int, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    return theta[:n].T.contiguous(), (theta[n].contiguous() if has_bias else None)


def flat(w: Tensor, b: Tensor | None) -> Tensor:
    """(W, b) as one column vector."""
    parts = [w.reshape(-1)] + ([b.reshape(-1)] if b is not None else [])
    return torch.cat(parts).unsqueeze(1)


def unflat(v: Tensor, w_shape: torch.Size, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    nw = math.prod(w_shape)
    return v[:nw, 0].reshape(w_shape), (v[nw:, 0] if has_bias else None)


@dataclass
class _CGProblem:
    """One layer's CG system M d = rhs in its layout: M's product, its quadratic form and the unpacking."""

    rhs: Tensor
    apply_M: Callable[[Tensor], Tensor]
    quadratic: Callable[[Tensor], Tensor]
    unpack: Callable[[Tensor], tuple[Tensor, Tensor | None]]


class ProxSolver:
    """Solves the prox of one layer with the given settings; ``comm`` returns the communicator to reduce over
    (called at solve time, so a trainer may set it after construction)."""

    def __init__(self, settings: ProxSettings, comm: Callable[[], Communicator] | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.beta = 1.0 / settings.tau_theta
        local = LocalComm()
        self._comm = comm if comm is not None else (lambda: local)

    @property
    def comm(self) -> Communicator:
        return self._comm()

    def _reduce_fn(self) -> Callable[[Tensor], Any] | None:
        comm = self.comm
        return comm.all_reduce_sum_ if comm.world_size > 1 else None

    def direction(
        self, module: nn.Linear | nn.Conv2d, a: Tensor, G: Tensor, grad: tuple[Tensor, Tensor | None] | None = None,
        *, diagnostics: bool | None = None,
    ) -> Direction:
        """θ_old − θ_prox for one layer with input ``a`` and backprop signal ``G`` (the settings' solver).

        ``grad``: the layer's (weight, bias) gradient ĀᵀG when the caller already has it (backward formed it);
        the CG and gradient solvers then skip recomputing it from ``a`` and ``G``. ``diagnostics`` overrides the
        settings' for this call (the exact push-through solve computes its cosine only when asked; elsewhere it
        is a by-product)."""
        mode = self.settings.mode
        op = LinearOperator(module, a)
        if mode in ("gradient", "cg"):
            gw, gb = self._reduce_params(*(grad if grad is not None else op.adjoint(G)))
            if mode == "gradient":
                return Direction(gw, gb, 1.0, 0, 0.0)
            return self._cg_direction(op, gw, gb)
        if isinstance(module, nn.Linear):
            if self.comm.world_size > 1:
                return self._exact_linear_gram_reduced(op, G)
            return self._exact_linear(op, G, self.settings.diagnostics if diagnostics is None else diagnostics)
        return self._exact_unfold(op, G)

    def _reduce_params(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Σ over ranks of a (weight, bias)-shaped pair in one all-reduce (no-op in one process)."""
        if self.comm.world_size == 1:
            return w, b
        total = self.comm.all_reduce_sum_(flat(w, b)[:, 0].contiguous())
        rw, rb = unflat(total.unsqueeze(1), w.shape, b is not None)
        return rw.contiguous(), (rb.contiguous() if rb is not None else None)

    def _reduce_gram(self, S: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
        """Σ over ranks of a float64 Gram S and right-hand side R in one all-reduce."""
        if self.comm.world_size == 1:
            return S, R
        p = S.shape[0]
        total = self.comm.all_reduce_sum_(torch.cat([S.reshape(-1), R.reshape(-1)]))
        return total[: p * p].view(p, p), total[p * p:].view(R.shape)

    # -- exact --------------------------------------------------------------------------------------------
    def _exact_linear(self, op: LinearOperator, G: Tensor, diagnostics: bool) -> Direction:
        a = op.a
        G2 = G.reshape(-1, G.shape[-1])
        N, n = a.shape
        form = self.settings.form
        if form == "auto":
            form = "push_through" if n + (1 if op.has_bias else 0) > N else "gram"
        if form == "push_through":
            return self._push_through(op, G2, diagnostics)
        A_bar = torch.cat([a, a.new_ones(N, 1)], dim=1) if op.has_bias else a
        S, R = self._gram_products(A_bar, G2)
        return self._gram_direction(op, S, R, a.dtype)

    def _gram_products(self, A_bar: Tensor, G2: Tensor) -> tuple[Tensor, Tensor]:
        """ĀᵀĀ and ĀᵀG, taken in the settings' Gram dtype and returned in float64."""
        dt = self.settings.gram_dtype(A_bar)
        Ag, Gg = A_bar.detach().to(dt), G2.detach().to(dt)
        return (Ag.T @ Ag).to(torch.float64), (Ag.T @ Gg).to(torch.float64)

    def _push_through(self, op: LinearOperator, G2: Tensor, diagnostics: bool) -> Direction:
        beta, a = self.beta, op.a
        M_inv, K = push_through_inverse(a, beta, ones_column=op.has_bias, gram_dtype=self.settings.gram_dtype(a))
        # the inverse is formed in float64 and applied in the model's dtype (one N×N×q product)
        Zc = M_inv.to(a.dtype) @ G2.detach()
        gw = Zc.T @ a
        gb = Zc.sum(0) if op.has_bias else None
        if not (diagnostics or self.settings.residuals):
            return Direction(gw, gb, float("nan"), 0, 0.0)
        G64, Z = G2.detach().to(torch.float64), Zc.to(torch.float64)
        # With KZ = G − βZ (the normal equations): ⟨∇J, g⟩ = ⟨G, KZ⟩, ‖g‖² = ⟨Z, KZ⟩, ‖∇J‖² = ⟨G, KG⟩ = ⟨K, GGᵀ⟩;
        # only the last needs an N×q×N product, taken in the model's dtype (a diagnostic) and far cheaper than a
        # weight gradient. The scalars leave the device in one transfer.
        g_flat, z_flat = G64.reshape(-1), Z.reshape(-1)
        sums = [torch.dot(g_flat, z_flat), torch.dot(g_flat, g_flat), torch.dot(z_flat, z_flat)]
        if diagnostics:
            sums.append(torch.dot(K.reshape(-1), (G2 @ G2.T).to(torch.float64).reshape(-1)))
        gz, gg, zz, *grad_sq = torch.stack(sums).tolist()
        dot = gg - beta * gz
        norm2_dir = gz - beta * zz
        norm2_grad = grad_sq[0] if grad_sq else 1.0
        residual = 0.0
        if self.settings.residuals:
            residual = float((K @ Z + beta * Z - G64).norm() / G64.norm().clamp_min(1e-300))
        return Direction(gw, gb, _cosine(dot, norm2_dir, norm2_grad) if diagnostics else float("nan"), 0, residual)

    def _exact_linear_gram_reduced(self, op: LinearOperator, G: Tensor) -> Direction:
        """The exact linear solve under data parallelism: every rank forms its shard's ĀᵀĀ and ĀᵀG in float64,
        one all-reduce sums both, and every rank solves the same system (always the Gram form: push-through
        would need the whole batch's N×N Gram)."""
        a = op.a
        A_bar = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1) if op.has_bias else a
        S, R = self._reduce_gram(*self._gram_products(A_bar, G.reshape(-1, G.shape[-1])))
        return self._gram_direction(op, S, R, op.a.dtype)

    def _gram_direction(self, op: LinearOperator, S: Tensor, R: Tensor, dtype: torch.dtype) -> Direction:
        """θ = (S + βI)⁻¹R for a Linear layer, with the cosine and residual diagnostics from S and R."""
        theta = spd_ridge_solve(S, R, self.beta)
        residual = self._residual(S, R, theta)
        cos = _cosine(float((R * theta).sum()), float((theta * theta).sum()), float((R * R).sum()))
        assert isinstance(op.module, nn.Linear)
        gw, gb = _unpack_columns(theta.to(dtype), op.module.in_features, op.has_bias)
        return Direction(gw, gb, cos, 0, residual)

    def _residual(self, S: Tensor, R: Tensor, theta: Tensor) -> float:
        if not self.settings.residuals:
            return 0.0
        return float((S @ theta + self.beta * theta - R).norm() / R.norm().clamp_min(1e-300))

    def _unfold_gram(self, op: LinearOperator, G: Tensor) -> tuple[Tensor, Tensor]:
        """PᵀP and PᵀG_flat of a conv layer (float64, accumulated over row chunks)."""
        m = op.module
        assert isinstance(m, nn.Conv2d)
        a = op.a
        out_hw = G.shape[2] * G.shape[3]
        p = m.in_channels * m.kernel_size[0] * m.kernel_size[1] + (1 if op.has_bias else 0)
        S = torch.zeros(p, p, dtype=torch.float64, device=a.device)
        R = torch.zeros(p, m.out_channels, dtype=torch.float64, device=a.device)
        per_chunk = max(1, self.settings.unfold_chunk_rows // max(out_hw, 1))
        dt = self.settings.gram_dtype(a)
        for start in range(0, a.shape[0], per_chunk):
            P = F.unfold(a[start:start + per_chunk], m.kernel_size, m.dilation, _int_padding(m), m.stride)
            P = P.transpose(1, 2).reshape(-1, P.shape[1]).to(dt)
            if op.has_bias:
                P = torch.cat([P, P.new_ones(P.shape[0], 1)], dim=1)
            G_c = G[start:start + per_chunk].permute(0, 2, 3, 1).reshape(-1, m.out_channels)
            # each chunk's products in the Gram dtype, the sum over chunks in float64
            S += (P.T @ P).to(torch.float64)
            R += (P.T @ G_c.to(dt)).to(torch.float64)
        return S, R

    def _exact_unfold(self, op: LinearOperator, G: Tensor) -> Direction:
        m = op.module
        assert isinstance(m, nn.Conv2d)
        S, R = self._reduce_gram(*self._unfold_gram(op, G))
        theta = spd_ridge_solve(S, R, self.beta)
        residual = self._residual(S, R, theta)
        cos = _cosine(float((R * theta).sum()), float((theta * theta).sum()), float((R * R).sum()))
        nw = theta.shape[0] - (1 if op.has_bias else 0)
        gw = theta[:nw].T.reshape(m.weight.shape).to(m.weight.dtype)
        gb = theta[nw].to(m.weight.dtype) if op.has_bias else None
        return Direction(gw.contiguous(), gb, cos, 0, residual)

    # -- CG -----------------------------------------------------------------------------------------------
    def _cg_operator(self, op: LinearOperator, gw: Tensor, gb: Tensor | None) -> _CGProblem:
        """The right-hand side, v ↦ (AᵀA + βI)v, v ↦ vᵀ(AᵀA + βI)v per column and the unpacking of a solution,
        in the layer's CG layout (columns per output neuron for Linear, one flat vector for Conv2d)."""
        beta, reduce = self.beta, self._reduce_fn()

        def quadratic_from(Av: Tensor, v: Tensor) -> Tensor:
            # ‖Av‖² per column (summed over ranks: each holds its rows of A) + β‖v‖²
            sq = (Av * Av).sum(dim=0)
            if reduce is not None:
                reduce(sq)
            return sq + beta * (v * v).sum(dim=0)

        if isinstance(op.module, nn.Linear):
            n, a = op.module.in_features, op.a

            def forward_linear(v: Tensor) -> Tensor:
                return torch.addmm(v[n], a, v[:n]) if op.has_bias else a @ v[:n]

            def apply_linear(v: Tensor) -> Tensor:
                # AᵀA v + βv on Θ = [Wᵀ; bᵀ] without transposing or concatenating the iterate
                y = forward_linear(v)
                out = torch.empty_like(v)
                torch.mm(a.T, y, out=out[:n])
                if op.has_bias:
                    torch.sum(y, 0, out=out[n])
                if reduce is not None:
                    reduce(out)
                return out.add_(v, alpha=beta)

            return _CGProblem(_pack_columns(gw, gb), apply_linear, lambda v: quadratic_from(forward_linear(v), v),
                              lambda v: _unpack_columns(v, n, op.has_bias))
        w_shape = op.w_shape

        def forward_conv(v: Tensor) -> Tensor:
            return op.forward(*unflat(v, w_shape, op.has_bias)).reshape(-1, 1)

        def apply_conv(v: Tensor) -> Tensor:
            AtAv = flat(*op.adjoint(op.forward(*unflat(v, w_shape, op.has_bias))))
            if reduce is not None:
                reduce(AtAv)
            return AtAv + beta * v

        def unpack(v: Tensor) -> tuple[Tensor, Tensor | None]:
            w, b = unflat(v, w_shape, op.has_bias)
            return w.contiguous(), (b.contiguous() if b is not None else None)

        return _CGProblem(flat(gw, gb), apply_conv, lambda v: quadratic_from(forward_conv(v), v), unpack)

    def _cg_direction(self, op: LinearOperator, gw: Tensor, gb: Tensor | None) -> Direction:
        # under data parallelism each rank holds its rows of A: AᵀA v is all-reduced in every iteration, the CG
        # scalars then act on replicated vectors
        prob = self._cg_operator(op, gw, gb)
        rhs, s = prob.rhs, self.settings
        # from d₀ = 0 without the product M·0 (a whole conv and adjoint per layer, and a collective)
        d, iters = block_cg(prob.apply_M, rhs, None, s.iterations, tol=s.cg_tol, eps=s.cg_eps, stop=s.cg_stop,
                            variant=s.cg_variant, quadratic=prob.quadratic)
        residual = 0.0
        if s.residuals:
            residual = float((prob.apply_M(d) - rhs).norm() / rhs.norm().clamp_min(1e-300))
        cos = _cosine(float((rhs * d).sum()), float((d * d).sum()), float((rhs * rhs).sum()))
        w, b = prob.unpack(d)
        return Direction(w, b, cos, iters, residual)
