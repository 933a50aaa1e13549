"""The weight blocks of Fenchel lifted networks: a mixin of :class:`liftkit.methods.fenchel.Fenchel`.

Each block minimises ``2λ_l ΣB(𝒜_l(X_l; W) + b, X_{l+1}) + ρ_d,l(‖W − W⁰‖² + ‖b − b⁰‖²) + ρ‖W‖²`` (the output block
has the summed cross-entropy in place of the penalty) over (W_l, b_l), with ``mm`` (accelerated majorize–minimize in
the data metric, primal or sample-space form: :mod:`liftkit.methods.fenchel_mm`), ``lbfgs`` or ``fista``. See
:mod:`liftkit.methods.fenchel` for the objective and the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from liftkit.activations import Activation
from liftkit.methods.fenchel_mm import KernelMM, gram, spd_cholesky
from liftkit.methods.fenchel_ops import LayerOperator, _patch_columns
from liftkit.models import ChainLayer
from liftkit.solvers import projected_fista, solve_dtype_like

if TYPE_CHECKING:
    from liftkit.distributed import Communicator
    from liftkit.methods.fenchel import FenchelConfig

__all__ = ["FenchelWBlocks"]


@dataclass
class _StepCache:
    """What stays valid within one step (cleared at its start and end), keyed by the identity of X_l.

    * ``preact``: l -> (X_l, weight version of layer l, 𝒜_l(X_l) + b_l): the forward pass fills it, the X-blocks
      read their U_{l-1} from it, and the sample-space W-blocks refresh it at their new weights.
    * ``metrics``: l -> (X_l, P̄, g ↦ gH⁻¹) of the primal ``mm`` W-blocks.
    * ``kernels``: l -> (X_l, sample-space MM state) of the W-blocks that use it.
    * ``w_solved``: the layers whose W-block has run in this step (their weights left the anchor).
    * ``pending``: l -> sample-space state whose weights are not yet written (``defer_write``).
    """

    preact: dict[int, tuple[Tensor, int, Tensor]] = field(default_factory=dict)
    metrics: dict[int, tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]] = field(default_factory=dict)
    kernels: dict[int, tuple[Tensor, KernelMM]] = field(default_factory=dict)
    w_solved: set[int] = field(default_factory=set)
    pending: dict[int, KernelMM] = field(default_factory=dict)


def _h_inverse_map(H: Tensor, dtype: torch.dtype, work_dtype: torch.dtype, rhs: int) -> Callable[[Tensor], Tensor]:
    """g ↦ gH⁻¹ for the SPD metric H, factorised by Cholesky in ``dtype`` (float64 where float32 breaks down).

    ``rhs`` is the number of rows g will have over the block's iterations (outputs × iterations): when it is far
    below H's size (e.g. 10 classes against 301 inputs), two triangular solves per application cost less than
    forming H⁻¹ (about p³ more work); otherwise H⁻¹ is formed once and applied by a product in ``work_dtype``.
    """
    factor = spd_cholesky(H, dtype)
    if 3 * rhs < H.shape[0]:
        return lambda g: torch.cholesky_solve(g.T.to(factor.dtype), factor).T.to(work_dtype)
    H_inv = torch.cholesky_inverse(factor).to(work_dtype)
    return lambda g: g @ H_inv


def _conv_data_grad(act: Activation, P_cols: Tensor, target: Tensor, weight: float) -> Callable[[Tensor], Tensor]:
    """θ ↦ ``weight·GᵀP̄``, the data-term gradient of a conv penalty block in the unfolded form, with
    ``G = ∂B/∂U(P̄θᵀ, X_{l+1})`` (one row per sample and output position) and ``P_cols = P̄ᵀ``.

    P̄ is walked in blocks of rows (column blocks of P̄ᵀ of a few MB): each block's pre-activation, residual and
    gradient contribution are formed while the block is still in cache, so P̄ is read from memory once per
    evaluation instead of twice and no full-size U or G is allocated. The sum is the same up to rounding.
    """
    out = target.shape[1]
    T_cols = target.transpose(0, 1).reshape(out, -1)  # X_{l+1} in the column order of P̄ᵀ
    rows = P_cols.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // P_cols.shape[0])

    def data_grad(theta: Tensor) -> Tensor:
        g = theta.new_zeros(theta.shape)
        for start in range(0, rows, chunk):
            block = P_cols[:, start:start + chunk]
            G = act.grad_u(theta @ block, T_cols[:, start:start + chunk])
            g.addmm_(G, block.T, alpha=weight)
        return g

    return data_grad


#: elements of P̄ᵀ per block of :func:`_conv_data_grad` (1M float32 = 4 MB, about one core's share of L3)
_CHUNK_ELEMENTS = 1 << 20
#: the widest P̄ (fan-in + 1 columns) whose conv W-block iterates in the unfolded form (see :meth:`_w_block_mm`)
_MATRIX_FORM_MAX_COLUMNS = 64


class FenchelWBlocks:
    """The (W_l, b_l) blocks of :class:`~liftkit.methods.fenchel.Fenchel` (a mixin: it works on the method's
    layers, hyperparameters and per-step cache)."""

    if TYPE_CHECKING:  # provided by Fenchel / Method
        config: FenchelConfig
        chain: list[ChainLayer]
        L: int
        lambdas: list[float]
        rho_d: list[float]
        _cache: _StepCache | None
        _weight_version: list[int]
        _patch_buffers: dict[int, Tensor]

        @property
        def comm(self) -> Communicator: ...

        @property
        def _reduce(self) -> Callable[[Tensor], Tensor] | None: ...

        def block(self, name: str) -> AbstractContextManager[None]: ...

        def operators(self, x: Tensor) -> list[LayerOperator]: ...

        def _act(self, l: int) -> Activation: ...

        def _preact(self, l: int, xs: Sequence[Tensor]) -> Tensor: ...

        def _weights_changed(self, l: int) -> None: ...

    def _factor_dtype(self, P: Tensor) -> torch.dtype:
        """The dtype of the ``mm`` factorisations for a block input P.

        ``auto`` follows a float32 or float64 model (float32 factorisations on the CPU too: on MNIST they train to
        the same validation accuracy as float64, and a float32 Cholesky that breaks down is redone in float64), and
        otherwise resolves as :func:`liftkit.solvers.resolve_solve_dtype`; ``float64`` / ``float32`` are taken as
        named.
        """
        return solve_dtype_like(self.config.solve_dtype, P)

    def w_block_objective(
        self, l: int, xs: Sequence[Tensor], y: Tensor, W: Tensor, b: Tensor, W0: Tensor, b0: Tensor
    ) -> Tensor:
        """Objective of the (W_l, b_l) block at (W, b) with anchor (W0, b0) (float64 scalar tensor)."""
        op = self.operators(xs[0])[l]
        U = op.linear_apply(op.glue(xs[l]), W, b)
        if l == self.L:
            data = tF.cross_entropy(U, y, reduction="sum").double()
        else:
            data = 2.0 * self.lambdas[l] * self._act(l).penalty(U, xs[l + 1]).sum(dtype=torch.float64)
        prox = self.rho_d[l] * ((W - W0).pow(2).sum() + (b - b0).pow(2).sum()) + self.config.rho * W.pow(2).sum()
        return data + prox.double()

    def _w_block_value_grad(
        self, l: int, P: Tensor, xs: Sequence[Tensor], y_onehot: Tensor, y: Tensor, W0: Tensor, b0: Tensor
    ) -> Callable[[Tensor, Tensor, bool], tuple[float, Tensor, Tensor]]:
        op = self.operators(xs[0])[l]
        rho_d, rho = self.rho_d[l], self.config.rho
        last = l == self.L
        act = None if last else self._act(l)
        lam = 0.0 if last else self.lambdas[l]
        target = None if last else xs[l + 1]
        reduce = self._reduce

        def value_grad(W: Tensor, b: Tensor, need_value: bool = True) -> tuple[float, Tensor, Tensor]:
            U = op.linear_apply(P, W, b)
            value = math.nan
            if act is None:
                if need_value:
                    value = float(tF.cross_entropy(U, y, reduction="sum").double())
                G = torch.softmax(U, dim=1) - y_onehot
            else:
                assert target is not None
                if need_value:
                    value = 2.0 * lam * float(act.penalty(U, target).sum(dtype=torch.float64))
                G = (2.0 * lam) * act.grad_u(U, target)
            gW, gb = op.weight_grad(P, G)
            assert gb is not None
            if reduce is not None:
                # the data term's (W, b) gradient is a sum over samples: one all-reduce per evaluation, and the
                # value (L-BFGS only) a float64 scalar one
                flat = reduce(torch.cat([gW.reshape(-1), gb.reshape(-1)]))
                gW, gb = flat[: gW.numel()].view_as(gW), flat[gW.numel():].view_as(gb)
                if need_value:
                    value = self.comm.sum_scalars(value)[0]
            dW, db = W - W0, b - b0
            if need_value:
                value += rho_d * (float(dW.pow(2).sum()) + float(db.pow(2).sum())) + rho * float(W.pow(2).sum())
            return value, gW + (2.0 * rho_d) * dW + (2.0 * rho) * W, gb + (2.0 * rho_d) * db

        return value_grad

    def solve_w_block(
        self, l: int, xs: Sequence[Tensor], y: Tensor, W0: Tensor, b0: Tensor, *, defer_write: bool = False
    ) -> int:
        """Minimise the (W_l, b_l) block in place (the layer's parameters); returns the iteration count.

        ``defer_write`` (the step's first layer, whose weights no X-block reads): a sample-space block keeps its
        result as θ⁰ + CP̄ and writes it at :meth:`_flush_weights`, saving one product with P̄ per alternation.
        """
        c = self.config
        op = self.operators(xs[0])[l]
        P = op.glue(xs[l])
        y_onehot = tF.one_hot(y, self.chain[-1].linear.weight.shape[0]).to(P.dtype)
        kernel = self._kernel_mm_state(l, op, P, xs, W0, b0) if c.w_solver == "mm" else None
        if kernel is not None:
            iters = self._w_block_kernel(l, kernel, xs, y_onehot, defer_write)
        else:
            value_grad = self._w_block_value_grad(l, P, xs, y_onehot, y, W0, b0)
            if c.w_solver == "fista":
                iters = self._w_block_fista(l, op, P, value_grad)
            elif c.w_solver == "mm":
                target = None if l == self.L else xs[l + 1]
                iters = self._w_block_mm(l, op, P, value_grad, W0, b0, target, xs[l])
            else:
                iters = self._w_block_lbfgs(op, value_grad)
            self._weights_changed(l)
        if self._cache is not None:
            self._cache.w_solved.add(l)
        return iters

    def _w_block_lbfgs(
        self, op: LayerOperator, value_grad: Callable[[Tensor, Tensor, bool], tuple[float, Tensor, Tensor]]
    ) -> int:
        """torch.optim.LBFGS on (W, b) (strong Wolfe, history 10), the specification's default W-solver
        (docs/methods/fenchel.md §4.2)."""
        c = self.config
        lin = op.linear
        assert lin.bias is not None
        W = lin.weight.detach().clone().requires_grad_(True)
        b = lin.bias.detach().clone().requires_grad_(True)
        _, gW0, gb0 = value_grad(W.detach(), b.detach(), False)
        g0 = max(float(gW0.abs().max()), float(gb0.abs().max()))
        if g0 <= c.w_tol * max(1.0, g0):
            return 0
        opt = torch.optim.LBFGS(
            [W, b], lr=1.0, max_iter=c.w_iters, history_size=10, line_search_fn="strong_wolfe",
            tolerance_grad=c.w_tol * max(1.0, g0), tolerance_change=1e-12,
        )

        def closure() -> Tensor:
            value, gW, gb = value_grad(W.detach(), b.detach(), True)
            W.grad, b.grad = gW, gb
            return torch.tensor(value, dtype=torch.float64, device=W.device)

        opt.step(closure)
        iters = int(opt.state[opt._params[0]].get("n_iter", 0))
        with torch.no_grad():
            lin.weight.copy_(W.detach())
            lin.bias.copy_(b.detach())
        return iters

    def _kernel_mm_state(
        self, l: int, op: LayerOperator, P: Tensor, xs: Sequence[Tensor], W0: Tensor, b0: Tensor
    ) -> KernelMM | None:
        """The sample-space MM state of the W-block of layer l, or ``None`` where the primal form applies.

        The sample-space form (:mod:`liftkit.methods.fenchel_mm`) is used for a fully connected block with fewer
        rows than inputs (m < fan-in + 1), a positive anchor and no ridge, in one process (its m × m kernel spans
        the global batch), and while θ − θ⁰ lies in the row space of the current P̄: at the block's first solve
        in a step (θ = θ⁰), and afterwards while X_l is unchanged (the first layer's input batch).
        """
        cache = self._cache
        shift = 2.0 * self.rho_d[l]
        if cache is None or op.is_conv or self._reduce is not None or self.config.rho != 0.0 or not shift > 0:
            return None
        rows, fan_in = P.reshape(-1, P.shape[-1]).shape
        if rows >= fan_in + 1:
            return None
        hit = cache.kernels.get(l)
        if hit is not None and hit[0] is xs[l]:
            return hit[1]
        if l in cache.w_solved:
            return None  # θ moved on another P̄: θ − θ⁰ is not in this P̄'s row space
        P2 = P.reshape(rows, fan_in)
        P_bar = torch.cat([P2, torch.ones_like(P2[:, :1])], dim=1)
        theta0 = torch.cat([W0.reshape(W0.shape[0], -1), b0[:, None]], dim=1)
        curvature = 0.5 if l == self.L else 2.0 * self.lambdas[l] * self._act(l).kappa
        U0 = self._preact(l, xs).reshape(rows, -1)  # P̄θ⁰ᵀ: the weights are still the anchor here
        dtype = self._factor_dtype(P)
        with self.block("cholesky"):
            state = KernelMM.build(P_bar, theta0, curvature, shift, dtype, U0=U0)
        cache.kernels[l] = (xs[l], state)
        return state

    def _w_block_kernel(
        self, l: int, state: KernelMM, xs: Sequence[Tensor], y_onehot: Tensor, defer_write: bool = False
    ) -> int:
        """Run the sample-space MM of layer l's W-block and write the weights (see :meth:`_kernel_mm_state`)."""
        c = self.config
        lin = self.chain[l].linear
        assert lin.bias is not None
        if l == self.L:

            def grad_u(U: Tensor) -> Tensor:
                return torch.softmax(U, dim=1) - y_onehot

        else:
            act, weight = self._act(l), 2.0 * self.lambdas[l]
            target = xs[l + 1].reshape(state.U0.shape)

            def grad_u(U: Tensor) -> Tensor:
                return weight * act.grad_u(U, target)

        iters = state.solve(grad_u, c.w_iters, c.w_tol)
        self._weights_changed(l)
        cache = self._cache
        if cache is not None:  # the block's pre-activation at the new weights comes for free
            cache.preact[l] = (xs[l], self._weight_version[l], state.U.reshape(xs[l].shape[0], -1))
        if defer_write and cache is not None:
            cache.pending[l] = state
        else:
            self._write_theta(l, state)
        return iters

    def _write_theta(self, l: int, state: KernelMM) -> None:
        lin = self.chain[l].linear
        assert lin.bias is not None
        theta = state.theta()
        with torch.no_grad():
            lin.weight.copy_(theta[:, :-1].reshape(lin.weight.shape))
            lin.bias.copy_(theta[:, -1])

    def _flush_weights(self) -> None:
        """Write the weights that sample-space W-blocks left pending (``defer_write``)."""
        if self._cache is not None:
            for l, state in self._cache.pending.items():
                self._write_theta(l, state)
            self._cache.pending.clear()

    def _w_block_fista(
        self, l: int, op: LayerOperator, P: Tensor,
        value_grad: Callable[[Tensor, Tensor, bool], tuple[float, Tensor, Tensor]],
    ) -> int:
        """Accelerated gradient on (W, b) with step 1/L, L = curvature·‖[P, 1]‖₂² + 2ρ_d + 2ρ."""
        c = self.config
        lin = op.linear
        assert lin.bias is not None
        nW = lin.weight.numel()
        shape_W = lin.weight.shape
        data_norm = op.data_norm(P, c.power_iters, self._reduce)
        curvature = 0.5 if l == self.L else 2.0 * self.lambdas[l] * self._act(l).kappa
        lipschitz = curvature * data_norm**2 + 2.0 * self.rho_d[l] + 2.0 * c.rho

        def grad(t: Tensor) -> Tensor:
            _, gW, gb = value_grad(t[:nW].reshape(shape_W), t[nW:], False)
            return torch.cat([gW.reshape(-1), gb])

        theta0 = torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach()])
        theta, iters, _ = projected_fista(grad, lipschitz, lambda v, t: v, theta0, c.w_iters, c.w_tol)
        with torch.no_grad():
            lin.weight.copy_(theta[:nW].reshape(shape_W))
            lin.bias.copy_(theta[nW:])
        return iters

    def _mm_metric(
        self, l: int, op: LayerOperator, P: Tensor, key: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """(P̄, g ↦ gH⁻¹) of the ``mm`` W-block of layer l, H = a·P̄ᵀP̄ + 2(ρ_d + ρ)I factorised in ``solve_dtype``.

        Within a step both are kept while the block's input X_l (``key``, compared by identity) is unchanged:
        the first layer's input batch never changes, so its Gram and factorisation are built once per step
        whatever the number of alternations. The Gram of a tall (im2col) P̄ is accumulated in row chunks.
        """
        cache = self._cache
        hit = None if cache is None else cache.metrics.get(l)
        if hit is not None and hit[0] is key:
            return hit[1], hit[2]
        lin = op.linear
        if isinstance(lin, nn.Conv2d):
            # stored as P̄ᵀ (:func:`_patch_columns`: a cheaper copy), used through its transposed view
            P_cols = _patch_columns(lin, P, out=self._patch_buffers.get(l))
            self._patch_buffers[l] = P_cols  # scratch reused by the next step (not state)
            P_bar = P_cols.T
        else:
            P2 = P.reshape(-1, P.shape[-1])
            P_bar = torch.cat([P2, torch.ones_like(P2[:, :1])], dim=1)
        curvature = 0.5 if l == self.L else 2.0 * self.lambdas[l] * self._act(l).kappa
        dtype = self._factor_dtype(P)
        with self.block("gram"):
            H = gram(P_bar, dtype).mul_(curvature)
            if self._reduce is not None:
                self._reduce(H)  # the Gram of the global batch (docs/methods/fenchel.md §7)
        shift = 2.0 * (self.rho_d[l] + self.config.rho)
        # without an anchor or ridge H can be singular; a relative jitter keeps the majorizer (it only grows H)
        rel = 1e-10 if dtype == torch.float64 else 1e-6
        H.diagonal().add_(shift if shift > 0 else rel * float(H.diagonal().mean()) + torch.finfo(dtype).tiny)
        with self.block("cholesky"):
            precondition = _h_inverse_map(H, dtype, P.dtype, op.linear.weight.shape[0] * self.config.w_iters)
        if cache is not None:
            cache.metrics[l] = (key, P_bar, precondition)
        return P_bar, precondition

    def _w_block_mm(
        self, l: int, op: LayerOperator, P: Tensor,
        value_grad: Callable[[Tensor, Tensor, bool], tuple[float, Tensor, Tensor]],
        W0: Tensor, b0: Tensor, target: Tensor | None, key: Tensor,
    ) -> int:
        """Accelerated majorize–minimize on θ = [W, b] in the data metric H = a·P̄ᵀP̄ + 2(ρ_d + ρ)I.

        Every row θ_j of the block has a data-term Hessian P̄ᵀ D_j P̄ with 0 ⪯ D_j ⪯ a·I (a = 2λ_lκ for a penalty
        block, ½ for the CE block, whose logit Hessian is ⪯ ½I), so ``f(θ) <= f(v) + ⟨∇f(v), θ − v⟩ + ½‖θ − v‖²_H``
        and θ = v − ∇f(v)H⁻¹ minimises that bound: FISTA in the H-metric with unit step (gradient-based
        restart). P̄ = [P, 1] for Linear layers and the unfolded patches with a ones column for Conv2d. H⁻¹ is
        formed in ``solve_dtype`` (O(p³), p = fan-in + 1) and applied in the working dtype; within a step it is
        reused while X_l is unchanged (:meth:`_mm_metric`).
        """
        c = self.config
        lin = op.linear
        assert lin.bias is not None
        out = lin.weight.shape[0]
        last = l == self.L
        P_bar, precondition = self._mm_metric(l, op, P, key)
        # Conv blocks with few patch columns run in the unfolded (im2col) form: U = P̄θᵀ row by row,
        # ∇ = GᵀP̄ + 2ρ_d(θ − θ⁰) + 2ρ[W, 0]; two plain matmuls replace a conv2d / conv2d_weight pair per iteration
        # (about 2x cheaper for LeNet-5's conv1, one input channel, on the CPU). For wider patches (conv2: 151
        # columns) the convolution kernels are the cheaper pair, and the patches only serve the metric.
        matrix_form = isinstance(lin, nn.Conv2d) and not last and P_bar.shape[1] <= _MATRIX_FORM_MAX_COLUMNS
        shape_W = lin.weight.shape

        if matrix_form:
            assert target is not None
            P_cols = P_bar.T  # contiguous (:meth:`_mm_metric`)
            data_grad = _conv_data_grad(self._act(l), P_cols, target, 2.0 * self.lambdas[l])
            theta0 = torch.cat([W0.reshape(out, -1), b0.reshape(out, 1)], dim=1)
            ridge_mask = torch.ones_like(theta0)
            ridge_mask[:, -1] = 0.0

            def grad(theta: Tensor) -> Tensor:
                g = data_grad(theta)
                if self._reduce is not None:
                    # the data term is a sum over samples (docs/methods/fenchel.md §7), as in value_grad
                    self._reduce(g)
                g = g + (2.0 * self.rho_d[l]) * (theta - theta0)
                if c.rho:
                    g = g + (2.0 * c.rho) * theta * ridge_mask
                return g

        else:

            def grad(theta: Tensor) -> Tensor:
                _, gW, gb = value_grad(theta[:, :-1].reshape(shape_W), theta[:, -1], False)
                assert gb is not None
                return torch.cat([gW.reshape(out, -1), gb.reshape(out, 1)], dim=1)

        theta = torch.cat([lin.weight.detach().reshape(out, -1), lin.bias.detach().reshape(out, 1)], dim=1)
        v, s = theta, 1.0
        iters = 0
        while iters < c.w_iters:
            g = grad(v)
            theta_new = v - precondition(g)
            iters += 1
            step = theta_new - theta
            if float((g * (theta_new - theta)).sum()) > 0:  # momentum points uphill: restart
                s = 1.0
            s_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * s * s))
            v = theta_new + ((s - 1.0) / s_new) * step
            done = float(step.norm()) <= c.w_tol * max(float(theta.norm()), 1e-30)
            theta, s = theta_new, s_new
            if done:
                break
        with torch.no_grad():
            lin.weight.copy_(theta[:, :-1].reshape(shape_W))
            lin.bias.copy_(theta[:, -1])
        return iters
