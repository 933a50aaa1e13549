r"""One TIAM sweep over all blocks, in either order, on the method's state.

:class:`Blocks` binds the block operators of :mod:`~liftkit.methods.tiam.blocks` and
:mod:`~liftkit.methods.tiam.output` to the method's weights, inertia anchors and accepted θ, with the penalty
weights (ρ_l, ν) of the sweep passed in explicitly, and runs each block's triple-inertial step with the retry
(p1 = p2 = 0 when backtracking fails) and the safeguard (p = 0 when the block's local objective rises).
:func:`run_sweep` runs the blocks in ``block_order``:

* ``'forward'`` (the paper's): for l = 1..L: W_l, b_l, z_l, a_l;
* ``'backward'`` (assumption): for l = L..1: z_l, W_l, b_l, a_{l−1}, so the label signal entering at z_L reaches
  W_1 within one sweep (as dlADMM's backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from liftkit.activations import Activation
from liftkit.distributed import Communicator
from liftkit.methods.tiam.a_gram import a_gram_step
from liftkit.methods.tiam.blocks import (
    ABlock,
    LinearFit,
    WMetric,
    WStep,
    a_step,
    b_step,
    diagonal_metric,
    gram_metric,
    w_step,
    z_step,
)
from liftkit.methods.tiam.config import Inertia, Penalties, TIAMConfig
from liftkit.methods.tiam.ops import AuxStep, Counters, Env, ce_sum, risen, sq
from liftkit.methods.tiam.output import OutputFit, exact_b_step, exact_w_step, zL_step
from liftkit.methods.tiam.state import BlockHistory, SampleRows, TIAMState
from liftkit.models import ChainLayer

__all__ = ["Blocks", "Host", "SweepData", "hidden_activations", "run_sweep"]

_ZERO: Inertia = (0.0, 0.0, 0.0)
#: a block's step: (u^k, (p1, p2, p3), Δ) -> the step, or None when its backtracking failed
Step = Callable[[Tensor, Inertia, Tensor], AuxStep | None]
#: the first layer's cached Gram metric in full-batch mode: (the inputs' fingerprint, the metric)
GramCache = tuple[tuple[Any, ...], WMetric]


class Host(Protocol):
    """What a sweep needs of the method: its settings, layers, state, collectives, the global batch size, the
    first layer's cached Gram metric and the named-block hook."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> TIAMConfig: ...
    @property
    def chain(self) -> list[ChainLayer]: ...
    @property
    def state(self) -> TIAMState: ...
    @property
    def comm(self) -> Communicator: ...

    m_global: int
    _gram_cache: GramCache | None

    def block(self, name: str) -> AbstractContextManager[None]: ...


def hidden_activations(chain: list[ChainLayer]) -> list[Activation]:
    """h_l of every hidden layer l < L."""
    acts = []
    for layer in chain[:-1]:
        assert layer.activation is not None
        acts.append(layer.activation)
    return acts


def _bias(layer: ChainLayer) -> Tensor:
    b = layer.bias
    assert b is not None
    return b


@dataclass
class SweepData:
    """What the blocks of one sweep share: the batch (x, one-hot labels), the auxiliary variables (updated in
    place) with their inertia anchors, ε and the inertia (p1, p2, p3)."""

    x: Tensor
    onehot: Tensor
    rows: SampleRows
    eps: float
    p: Inertia


class Blocks:
    """The block steps of one sweep, bound to the method's state, at the sweep's penalty weights."""

    def __init__(
        self, host: Host, penalties: Penalties, cnt: Counters, x_sums: tuple[float, float] | None = None
    ) -> None:
        """``x_sums``: this rank's (Σ v, Σ v²) of v = x r for a fixed vector r, a row-order-free fingerprint of the
        input batch x (the first layer's Gram cache is keyed by it); None: computed from x when needed."""
        self.host = host
        self.x_sums = x_sums
        #: x W_1ᵀ at the final W_1 of the sweep when the W_1 block computed it as one product (else None)
        self.first_product: Tensor | None = None
        self._exact_product = False
        #: (l, P, z, ‖z − P − b_l‖² summed over ranks) as the W_l safeguard left it, for the b_l safeguard
        self._fit: tuple[int, Tensor, Tensor, float] | None = None
        self.config = host.config
        self.chain = host.chain
        self.state = host.state
        self.acts = hidden_activations(host.chain)
        self.penalties = penalties
        self.env = Env(host.config, host.name, host.comm, host.m_global, cnt, host.block)

    def rho_of(self, l: int) -> float:
        """ρ_l of this sweep (``rho_output`` for the output layer when set)."""
        return self.penalties.rho_of(l, len(self.chain))

    def is_exact_output(self, l: int) -> bool:
        return self.config.output == "exact" and l == len(self.chain) - 1

    # -- the W and b blocks ---------------------------------------------------------------------------------
    def w_metric(self, l: int, a_in: Tensor, rho: float) -> WMetric | None:
        """The metric M of W_l's backtracking (``w_metric``) at curvature ρ: None for the identity (the paper's
        gradient step). The first layer's Gram in full-batch mode is computed once and reused while the inputs'
        fingerprint is unchanged (the same training set every iteration)."""
        c, env = self.config, self.env
        if c.w_metric == "identity":
            return None
        if c.w_metric == "diagonal":
            return diagonal_metric(env, a_in, rho, c.mu)
        with self.host.block("gram"):
            return self._gram_metric(l, a_in, rho)

    def _gram_metric(self, l: int, a_in: Tensor, rho: float) -> WMetric:
        c, env = self.config, self.env
        key: tuple[Any, ...] | None = None
        # every input of the cache decision is global (N over all ranks, summed fingerprints), so all ranks hit or
        # miss together and take part in the same collectives
        if l == 0 and env.m_global > 10 * a_in.shape[1]:
            local = self.x_sums if self.x_sums is not None else (float(a_in.sum()), sq(a_in))
            fingerprint = env.sum_scalars(*local)
            key = (env.m_global, a_in.shape[1], a_in.dtype, rho, c.mu, *fingerprint)
            cached = self.host._gram_cache
            if cached is not None and cached[0] == key:
                return cached[1]
        metric = gram_metric(env, a_in, rho, c.mu, self.host.name)
        if key is not None:
            self.host._gram_cache = (key, metric)
        return metric

    def w_block(
        self, l: int, a_in: Tensor, z: Tensor, P0: Tensor, p: Inertia, metric: WMetric | None = None
    ) -> WStep | None:
        """One inertial W_l-step from W^k (with P0 = a W^kᵀ); None when backtracking fails."""
        st = self.state
        layer = self.chain[l]
        W = layer.weight.detach()
        delta = (st.W_raw[l] if self.config.history == "raw" else W) - st.W_prev[l]
        fit = LinearFit(a_in, z, W, _bias(layer).detach(), P0)
        out, theta = w_step(self.env, fit, delta, p, self.rho_of(l), self.env.theta_start(st.theta_W[l]), metric)
        if out is not None:
            st.theta_W[l] = theta
        # in the Gram metric with p1 = p2, w_step forms a W^{k+1}ᵀ as one product (not a linear combination)
        self._exact_product = metric is not None and metric.factor is not None and p[0] == p[1]
        return out

    def update_w(self, l: int, a_in: Tensor, z: Tensor, p: Inertia, P0: Tensor | None = None) -> Tensor:
        """W_l ← its triple-inertial step (with retry and safeguard); returns a W_l^{k+1}ᵀ. ``P0`` is a
        precomputed a W_l^kᵀ."""
        c, env = self.config, self.env
        layer = self.chain[l]
        W_old = layer.weight.detach().clone()
        b = _bias(layer).detach()
        if P0 is None:
            P0 = a_in @ W_old.T
        rho = self.rho_of(l)
        metric = self.w_metric(l, a_in, rho)
        result = self.w_block(l, a_in, z, P0, p, metric)
        if result is None and (p[0] or p[1]):
            result = self.w_block(l, a_in, z, P0, (0.0, 0.0, p[2]), metric)
        self._fit = None
        if result is not None and c.safeguard and any(p):
            fit_old, fit_new = env.sum_scalars(sq(z - P0 - b), sq(z - result.product - b))
            old = 0.5 * rho * fit_old + 0.5 * c.mu * sq(W_old)
            new = 0.5 * rho * fit_new + 0.5 * c.mu * sq(result.new)
            if risen(new, old, z.dtype):
                env.cnt.safeguard_restarts += 1
                result = self.w_block(l, a_in, z, P0, _ZERO, metric)
            else:
                self._fit = (l, result.product, z, fit_new)
        W_new, P_new, W_raw = (W_old, P0, W_old) if result is None else result
        if l == 0:  # P0 is always a product (x W_1ᵀ), so a kept W_1 keeps an exact product
            self.first_product = P_new if (result is None or self._exact_product) else None
        self._advance_history(self.state.W_prev, self.state.W_raw, l, W_old, W_raw)
        with torch.no_grad():
            layer.weight.copy_(W_new)
        return P_new

    def b_step(self, l: int, P: Tensor, z: Tensor, p: Inertia, b: Tensor) -> tuple[Tensor, Tensor]:
        """b_l's exact step from ``b`` given P = a_{l−1}W_lᵀ; returns (b^{k+1}, b⁺)."""
        st = self.state
        delta = (st.b_raw[l] if self.config.history == "raw" else b) - st.b_prev[l]
        return b_step(self.env, P, z, b, delta, p)

    def update_b(self, l: int, P: Tensor, z: Tensor, p: Inertia) -> Tensor:
        """b_l ← its exact step θ = ρN (with the safeguard), given P = a_{l−1}W_lᵀ; returns b_l^{k+1}."""
        layer = self.chain[l]
        b_old = _bias(layer).detach().clone()
        b_new, b_raw = self.b_step(l, P, z, p, b_old)
        if self.config.safeguard and any(p):
            fit = self._fit
            if fit is not None and fit[0] == l and fit[1] is P and fit[2] is z:
                # the W_l safeguard's new fit ‖z − P − b‖² is the b-step's old one (the same tensors, b unchanged)
                old, (new,) = fit[3], self.env.sum_scalars(sq(z - P - b_new))
            else:
                old, new = self.env.sum_scalars(sq(z - P - b_old), sq(z - P - b_new))
            if risen(new, old, z.dtype):
                self.env.cnt.safeguard_restarts += 1
                b_new, b_raw = self.b_step(l, P, z, _ZERO, b_old)
        self._advance_history(self.state.b_prev, self.state.b_raw, l, b_old, b_raw)
        with torch.no_grad():
            _bias(layer).copy_(b_new)
        return b_new

    def _advance_history(self, prev: list[Tensor], raw: list[Tensor], l: int, old: Tensor, raw_new: Tensor) -> None:
        if self.config.history == "raw":
            prev[l] = raw[l]
            raw[l] = raw_new.clone()
        else:
            prev[l] = old

    # -- the auxiliary blocks -------------------------------------------------------------------------------
    def a_step(self, l: int, a: Tensor, p: Inertia, delta: Tensor, blk: ABlock) -> AuxStep | None:
        """a_l's step on the subproblem ``blk`` (a_l enters F through layer l + 1's penalty)."""
        st = self.state
        rho = self.rho_of(l + 1)
        curvature = self.config.output_curvature if blk.onehot is not None else rho
        theta0 = self.env.theta_start(st.theta_a[l])
        if self.config.a_metric == "gram":
            out, theta = a_gram_step(self.env, blk, a, p, delta, rho, self.penalties.nu, curvature, theta0)
        else:
            out, theta = a_step(self.env, blk, a, p, delta, rho, self.penalties.nu, theta0)
        if out is not None:
            st.theta_a[l] = theta
        return out

    def zL_step(self, z: Tensor, p: Inertia, delta: Tensor, v: Tensor, onehot: Tensor) -> AuxStep | None:
        """z_L's step given v_L = a_{L−1}W_Lᵀ + 1b_Lᵀ (``output='penalty'``)."""
        st = self.state
        rho = self.rho_of(len(self.chain) - 1)
        out, theta = zL_step(self.env, z, p, delta, v, onehot, rho, self.env.theta_start(st.theta_zL))
        if theta is not None:
            st.theta_zL = theta
        return out

    def inertial_aux(self, u: Tensor, hist: BlockHistory, p: Inertia, step: Step) -> Tensor:
        """Run one block's ``step`` with the retry (p1 = p2 = 0 when backtracking fails) and the safeguard (p = 0
        when the block's local objective rises), then advance its inertia anchors."""
        c = self.config
        anchor = hist.raw if (c.history == "raw" and hist.raw is not None) else u
        # Δ enters a step only as p1·Δ and p2·Δ: with p1 = p2 = 0 (also in its retry and safeguard) a zero scalar
        # stands in for it, sparing a pass over the rows (u + 0·0 is u, as u + 0·Δ was)
        delta = anchor - hist.prev if (p[0] or p[1]) else anchor.new_zeros(())
        out = step(u, p, delta)
        if out is None and (p[0] or p[1]):
            out = step(u, (0.0, 0.0, p[2]), delta)
        if out is not None and c.safeguard and any(p) and risen(out.f_new, out.f_old, u.dtype):
            self.env.cnt.safeguard_restarts += 1
            out = step(u, _ZERO, delta)
        if c.history == "raw":
            hist.prev = anchor
            hist.raw = u if out is None else out.raw
        else:
            hist.prev = u
        return u if out is None else out.new

    def inertial_z(self, l: int, sw: SweepData, v: Tensor) -> Tensor:
        """z_l's triple-inertial step given v_l = a_{l−1}W_lᵀ + 1b_lᵀ (and a_l for a hidden layer)."""
        rows = sw.rows
        step: Step
        if l == len(self.chain) - 1:

            def step(u: Tensor, pp: Inertia, delta: Tensor) -> AuxStep | None:
                return self.zL_step(u, pp, delta, v, sw.onehot)

        else:
            act, a_l, rho, nu = self.acts[l], rows.a[l], self.rho_of(l), self.penalties.nu

            def step(u: Tensor, pp: Inertia, delta: Tensor) -> AuxStep | None:
                return z_step(self.env, act, u, pp, delta, v, a_l, sw.eps, rho, nu)

        return self.inertial_aux(rows.z[l], rows.z_hist[l], sw.p, step)

    def inertial_a(self, l: int, sw: SweepData) -> Tensor:
        """a_l's triple-inertial step given z_l, layer l + 1's weights and z_{l+1} (or the labels, when layer
        l + 1 is an exact output)."""
        rows, nxt = sw.rows, self.chain[l + 1]
        target = sw.onehot if self.is_exact_output(l + 1) else None
        blk = ABlock(self.acts[l], rows.z[l], nxt.weight.detach(), _bias(nxt).detach(), rows.z[l + 1], sw.eps, target)

        def step(u: Tensor, pp: Inertia, delta: Tensor) -> AuxStep | None:
            return self.a_step(l, u, pp, delta, blk)

        return self.inertial_aux(rows.a[l], rows.a_hist[l], sw.p, step)

    # -- the exact output -----------------------------------------------------------------------------------
    def inertial_weight(
        self, param: Tensor, prev: list[Tensor], raw: list[Tensor], l: int, p: Inertia, step: Step
    ) -> Tensor:
        """A weight block's triple-inertial ``step`` (retry and safeguard as for the auxiliary blocks) with its
        inertia anchors ``prev[l]`` (and ``raw[l]``); writes the new value into ``param`` and returns it."""
        history_raw = self.config.history == "raw"
        hist = BlockHistory(prev[l], raw[l] if history_raw else None)
        new = self.inertial_aux(param.detach().clone(), hist, p, step)
        prev[l] = hist.prev
        if history_raw and hist.raw is not None:
            raw[l] = hist.raw
        with torch.no_grad():
            param.copy_(new)
        return new

    def exact_output(self, a_in: Tensor, onehot: Tensor, p: Inertia) -> Tensor:
        """``output='exact'``: W_L, then b_L, take triple-inertial majorised steps on
        S = CE_sum(a W_Lᵀ + 1b_Lᵀ) (+ (μ/2)‖W_L‖²) at the curvature c = ``output_curvature``, which takes the place
        of ρ in the metrics; returns v_L = z_L at the new weights."""
        c, st = self.config, self.state
        l = len(self.chain) - 1
        layer = self.chain[l]
        fit = OutputFit(a_in, onehot, _bias(layer).detach())
        w_metric = self.w_metric(l, a_in, c.output_curvature)

        def w_step_(W: Tensor, pp: Inertia, delta: Tensor) -> AuxStep | None:
            out, theta = exact_w_step(self.env, fit, W, pp, delta, w_metric, self.env.theta_start(st.theta_W[l]))
            if out is not None:
                st.theta_W[l] = theta
            return out

        with self.host.block(f"w_block[{l + 1}]"):
            W_new = self.inertial_weight(layer.weight, st.W_prev, st.W_raw, l, p, w_step_)
            P = a_in @ W_new.T

        def b_step_(bb: Tensor, pp: Inertia, delta: Tensor) -> AuxStep | None:
            return exact_b_step(self.env, P, onehot, bb, pp, delta, c.output_curvature)

        with self.host.block(f"b_block[{l + 1}]"):
            return P + self.inertial_weight(_bias(layer), st.b_prev, st.b_raw, l, p, b_step_)


# -- the two sweep orders -------------------------------------------------------------------------------------------
def run_sweep(blocks: Blocks, sw: SweepData, P_first: Tensor | None = None) -> dict[str, float]:
    """One pass over all blocks in place on ``sw.rows``, in ``block_order``; returns F and residuals. ``P_first``
    is a precomputed x W_1ᵀ (W_1 as at the start of the sweep)."""
    if blocks.config.block_order == "backward":
        v = sweep_backward(blocks, sw, P_first)
    else:
        v = sweep_forward(blocks, sw, P_first)
    with blocks.host.block("objective"):
        return sweep_info(blocks, sw, v)


def sweep_forward(blocks: Blocks, sw: SweepData, P_first: Tensor | None) -> list[Tensor]:
    """The paper's order (docs/methods/tiam.md §4.5): for l = 1..L, W_l, b_l, z_l, a_l. Returns the final
    v_l = a_{l−1}W_lᵀ + 1b_lᵀ (nothing upstream of v_l changes after layer l's z-step)."""
    z, a, p, block = sw.rows.z, sw.rows.a, sw.p, blocks.host.block
    last = len(blocks.chain) - 1
    vs: list[Tensor] = []
    for l in range(len(blocks.chain)):
        a_in = sw.x if l == 0 else a[l - 1]
        if blocks.is_exact_output(l):
            z[l] = blocks.exact_output(a_in, sw.onehot, p)
            vs.append(z[l])
            continue
        with block(f"w_block[{l + 1}]"):
            P = blocks.update_w(l, a_in, z[l], p, P_first if l == 0 else None)
        with block(f"b_block[{l + 1}]"):
            v = P + blocks.update_b(l, P, z[l], p)
        vs.append(v)
        with block(f"z_block[{l + 1}]"):
            z[l] = blocks.inertial_z(l, sw, v)
        if l < last:
            with block(f"a_block[{l + 1}]"):
                a[l] = blocks.inertial_a(l, sw)
    return vs


def sweep_backward(blocks: Blocks, sw: SweepData, P_first: Tensor | None) -> list[Tensor]:
    """``block_order='backward'`` (assumption): for l = L..1, z_l, W_l, b_l, a_{l−1}. Every block sees the
    same neighbours' newest values as in the forward order, but the label signal entering at z_L reaches
    W_1 within one sweep instead of travelling back one block per sweep (as dlADMM's backward pass).
    Returns the final v_l = a_{l−1}W_lᵀ + 1b_lᵀ: layer l's inputs change last, in its own a_{l−1}-step."""
    z, a, p, block = sw.rows.z, sw.rows.a, sw.p, blocks.host.block
    vs: list[Tensor] = []
    for l in reversed(range(len(blocks.chain))):
        layer = blocks.chain[l]
        a_in = sw.x if l == 0 else a[l - 1]
        if blocks.is_exact_output(l):
            v = blocks.exact_output(a_in, sw.onehot, p)
        else:
            with block(f"z_block[{l + 1}]"):
                P0 = P_first if (l == 0 and P_first is not None) else a_in @ layer.weight.detach().T
                z[l] = blocks.inertial_z(l, sw, P0 + _bias(layer).detach())
            with block(f"w_block[{l + 1}]"):
                P = blocks.update_w(l, a_in, z[l], p, P0)
            with block(f"b_block[{l + 1}]"):
                v = P + blocks.update_b(l, P, z[l], p)
        if l > 0:
            with block(f"a_block[{l}]"):
                a[l - 1] = blocks.inertial_a(l - 1, sw)
                v = a[l - 1] @ layer.weight.detach().T + _bias(layer).detach()
        if blocks.is_exact_output(l):
            z[l] = v
        vs.append(v)
    return vs[::-1]


def sweep_info(blocks: Blocks, sw: SweepData, v: list[Tensor]) -> dict[str, float]:
    """F and its parts after a sweep, given v_l = a_{l−1}W_lᵀ + 1b_lᵀ at the final iterates."""
    c, comm = blocks.config, blocks.env.comm
    z, a = sw.rows.z, sw.rows.a
    n_samples = sw.x.shape[0]
    ce = float(ce_sum(z[-1], sw.onehot))
    memo = blocks.env.memo  # the z_l and a_l blocks' safeguards have most of these terms already
    residuals = [memo.sq_diff(z_l, v_l) for z_l, v_l in zip(z, v)]
    residual_linear = sum(residuals)
    penalty_linear = sum(blocks.rho_of(l) * r for l, r in enumerate(residuals))  # Σ_l ρ_l‖z_l − v_l‖²
    weights = sum(sq(layer.weight.detach()) for layer in blocks.chain)
    residual_act = sum(memo.sq_diff(a[l], memo.phi(blocks.acts[l], z[l])) for l in range(len(a)))
    if comm.world_size > 1:
        ce, residual_linear, penalty_linear, residual_act, total = comm.sum_scalars(
            ce, residual_linear, penalty_linear, residual_act, float(n_samples)
        )
        n_samples = round(total)
    objective = ce + 0.5 * penalty_linear + 0.5 * c.mu * weights
    if c.constraint == "penalty":
        objective += 0.5 * blocks.penalties.nu * residual_act
    return {
        "objective": objective,
        "ce_sum": ce,
        "residual_linear": residual_linear,
        "residual_activation": residual_act,
        "weight_norm": math.sqrt(weights),
        "n_samples": float(n_samples),
    }
