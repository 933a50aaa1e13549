r"""Parallel LPOM on one machine: synchronous odd–even (``lpom-sync``) and asynchronous proximal BCD
(``lpom-async``), on a pool of worker threads (torch releases the GIL inside its kernels).

Li, Xiao, Fang, Dai, Xu, Lin, "Training Neural Networks by Lifted Proximal Operator Machines", IEEE TPAMI 2021,
§§ on sync-LPOM (Algorithm 3) and async-LPOM (eqs. 37–38, Theorem 5); docs/methods/lpom.md §6–§7. The block solvers
are serial LPOM's (:class:`liftkit.methods.lpom_chain.LiftedChain`); only the schedule differs.

**lpom-sync** (per mini-batch, after the forward initialisation; docs/methods/lpom.md §6.1). X^k is coupled only to
X^{k−1} and X^{k+1}, so each of ``x_sweeps`` rounds (default L) updates all blocks of one parity at once, then the
other: first the paper's odd layers i = k + 1 ∈ {3, 5, …} (k even), then the even ones (k odd), each phase's blocks
running in parallel on ``workers`` threads. After a block update the exposed value is the moving average
X̂^k ← β_m X̂^k + (1 − β_m) X^k_new (``momentum`` = β_m, default 0: no momentum (assumption)). Then all W-blocks
run in parallel. The result does not depend on ``workers`` (blocks of one phase are independent): tested
against ``workers=1``, the sequential execution of the same schedule.

**lpom-async** (docs/methods/lpom.md §7). Every block z (X^1..X^L, then W_0..W_{L−1}) is updated by the proximal step
z⁺ = argmin E(…, z, …) + (γ/2)‖z − zᵏ‖², reading the latest — possibly stale — values of its neighbours. Per
mini-batch the block sequence is serial LPOM's (``x_sweeps`` sweeps over the X blocks, then the W blocks);
``workers`` threads take the next block of the sequence that is not in flight, and an update whose neighbours
changed more than Δ = ``staleness`` times (default: the number of workers) since it read them is recomputed.
γ starts at ``gamma`` and is multiplied by ``gamma_growth`` after every mini-batch whose energy rose (which
exact proximal BCD on a consistent snapshot never does), capped at Theorem 5's L·sqrt(Δ(Δ+1)),
L = β·max(‖W_k‖₂², ‖X^j‖₂²) (assumption: the papers' schedule "raise γ gradually" is not available to us).
``mode='simulate'`` replaces the threads by a seeded single-process simulator: blocks in the given ``order``
('cyclic' or seeded 'random'), each reading neighbour values exactly ``staleness`` commits old. With zero
staleness and cyclic order it is serial proximal BCD; with γ = 0 that is serial LPOM (tested).

Reporting names carry the (assumption) suffix: ``LPOM-sync (reconstructed schedule)``,
``LPOM-async (reconstructed schedule)``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from liftkit.distributed import Communicator
from liftkit.methods.base import Method, StepStats, evaluate_loss, register
from liftkit.methods.lpom import LPOM, LPOMConfig
from liftkit.methods.lpom_kernels import POWER_COLD_ITERS, warm_power
from liftkit.methods.lpom_layers import LayerParallel

_T = TypeVar("_T")

__all__ = ["LPOMAsync", "LPOMAsyncConfig", "LPOMSync", "LPOMSyncConfig"]


class _Pool:
    """A lazily created thread pool; ``workers == 1`` runs tasks inline (the sequential reference)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[int], _T], items: Sequence[int]) -> list[_T]:
        if self.workers == 1 or len(items) <= 1:
            return [fn(i) for i in items]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lpom")
        return list(self._executor.map(fn, items))

    def run(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on every worker at once and wait for all."""
        if self.workers == 1:
            fn()
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lpom")
        futures = [self._executor.submit(fn) for _ in range(self.workers)]
        for f in futures:
            f.result()

    def __del__(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)


# ------------------------------------------------------------------------------------------------------------
# sync-LPOM
# ------------------------------------------------------------------------------------------------------------
@dataclass
class LPOMSyncConfig(LPOMConfig):
    """Serial LPOM's hyperparameters plus ``workers`` (threads) and ``momentum`` β_m of the X moving average;
    ``x_sweeps`` counts odd–even rounds (0 = L).

    Keeps the X-schedule serial LPOM had before its default became one backward sweep of 3 iterations: L
    odd–even rounds of 5 FISTA iterations (the sweep order does not apply to the odd–even rounds)."""

    x_iters: int = 5
    x_sweeps: int = 0
    x_sweep_order: str = "forward"
    workers: int = 2
    momentum: float = 0.0
    #: under torchrun: 'data' splits every batch over the processes (docs/methods/lpom.md §10); 'layers' gives each
    #: process a group of layers and the whole batch (odd–even boundary exchange, liftkit.methods.lpom_layers)
    parallel: str = "data"

    def validate(self) -> None:
        super().validate()
        self._choice("parallel", ("data", "layers"))
        self._int_at_least("workers", 1)
        self._nonnegative("momentum")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")


@register
class LPOMSync(LPOM):
    """sync-LPOM: odd–even parallel X rounds and parallel W blocks (TPAMI Algorithm 3, docs/methods/lpom.md §6.1)."""

    name = "lpom-sync"
    Config = LPOMSyncConfig
    config: LPOMSyncConfig
    reporting_name = "LPOM-sync (reconstructed schedule)"

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.pool = _Pool(self.config.workers)

    _layer_plan: LayerParallel | None = None

    def set_comm(self, comm: Communicator) -> None:
        """Data-parallel sync-LPOM (``parallel=data``): every block's stopping test is a collective, and
        collectives must come in the same order on every process, so the blocks of a phase run one after
        another in each process (the result does not depend on ``workers``); the parallelism is then across
        the processes' shards. ``parallel=layers``: see :mod:`liftkit.methods.lpom_layers`."""
        if self.config.parallel == "layers":
            Method.set_comm(self, comm)
            self._layer_plan = LayerParallel(comm, self.lifted.L) if comm.world_size > 1 else None
            return
        super().set_comm(comm)
        if comm.world_size > 1:
            self.pool = _Pool(1)

    def single_process_only(self) -> str | None:
        if self.config.parallel == "layers" and self.config.x_init == "persistent":
            return "lpom-sync parallel=layers needs x_init=forward (the X cache is per process)"
        return super().single_process_only()

    @property
    def shards_batch(self) -> bool:
        return self.config.parallel != "layers"

    def synchronize_model(self) -> None:
        if self._layer_plan is not None:
            self._layer_plan.synchronize(self)

    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        if self._layer_plan is not None:
            return self._layer_plan.step(self, x, y)
        return super().step(x, y, idx=idx)

    def phases(self) -> list[list[int]]:
        """Blocks k of the two phases: paper-odd layers i = k + 1 (k even) first, then k odd."""
        blocks = range(1, self.lifted.L + 1)
        return [[k for k in blocks if k % 2 == 0], [k for k in blocks if k % 2 == 1]]

    def x_groups(self) -> list[list[int]]:
        """An odd–even round: the two :meth:`phases`, each solved at once."""
        return self.phases()

    @property
    def x_momentum(self) -> float:
        return self.config.momentum

    def map_blocks(self, fn: Callable[[int], _T], items: Sequence[int]) -> list[_T]:
        return self.pool.map(fn, items)

    def w_phase(
        self, xs: Sequence[Tensor], pre: Sequence[Tensor], ws: Sequence[Tensor], bs: Sequence[Tensor | None]
    ) -> list[tuple[Tensor, Tensor | None]]:
        # largest blocks first, so that the big first-layer solve overlaps the others
        order = sorted(range(self.lifted.L), key=lambda j: -ws[j].numel())
        results = dict(zip(order, self.pool.map(lambda j: self.solve_w_block(j, xs, pre, ws, bs), order)))
        return [results[j] for j in range(self.lifted.L)]


# ------------------------------------------------------------------------------------------------------------
# async-LPOM
# ------------------------------------------------------------------------------------------------------------
MODES = ("threads", "simulate")
ORDERS = ("cyclic", "random")


@dataclass
class LPOMAsyncConfig(LPOMConfig):
    """Serial LPOM's hyperparameters plus the asynchronous ones (docs/methods/lpom.md §7). Keeps the X-schedule
    serial LPOM had before its default became one backward sweep: L forward sweeps of 5 FISTA iterations."""

    x_iters: int = 5
    x_sweeps: int = 0
    x_sweep_order: str = "forward"
    #: worker threads (mode='threads'); 1 runs the sequence in order (deterministic)
    workers: int = 1
    #: initial proximal weight γ₀
    gamma: float = 1.0
    #: factor applied to γ after a mini-batch whose energy rose (1 = fixed γ)
    gamma_growth: float = 2.0
    #: staleness bound Δ (threads: recompute beyond it; simulate: the exact delay); -1 = the number of workers
    staleness: int = -1
    #: 'threads' (real workers) or 'simulate' (seeded single-process simulator)
    mode: str = "threads"
    #: block order of the simulator: 'cyclic' (serial LPOM's sequence) or 'random' (seeded shuffle)
    order: str = "cyclic"
    #: seed of the simulator's random order
    seed: int = 0
    #: W-blocks of a mini-batch start only once all its X-blocks are committed (threads), resp. read the final X
    #: (simulator); False lets them read X-blocks still in flight (assumption, see the module docstring)
    w_barrier: bool = True

    def validate(self) -> None:
        super().validate()
        self._int_at_least("workers", 1)
        self._nonnegative("gamma")
        if not (isinstance(self.gamma_growth, int | float) and math.isfinite(self.gamma_growth)
                and self.gamma_growth >= 1):
            raise ValueError(f"gamma_growth must be a finite number >= 1, got {self.gamma_growth!r}")
        self._int_at_least("staleness", -1)
        self._choice("mode", MODES)
        self._choice("order", ORDERS)
        self._int_at_least("seed", 0)
        if not isinstance(self.w_barrier, bool):
            raise ValueError(f"w_barrier must be true or false, got {self.w_barrier!r}")


class _Store:
    """The shared blocks of one mini-batch: X⁰..X^L, W, b, a version counter per block, cached pre-activations."""

    def __init__(self, xs: list[Tensor], ws: list[Tensor], bs: list[Tensor | None], pre: list[Tensor]) -> None:
        self.xs, self.ws, self.bs = xs, ws, bs
        self.ver_x = [0] * len(xs)
        self.ver_w = [0] * len(ws)
        # pre[j] = X^j W_jᵀ + b_j, valid for the recorded (X^j, W_j) versions
        self.pre: list[tuple[int, int, Tensor]] = [(0, 0, u) for u in pre]
        self.history: list[tuple[list[Tensor], list[Tensor], list[Tensor | None]]] = []
        self.commits = 0


@register
class LPOMAsync(LPOM):
    """async-LPOM: proximal block coordinate descent with bounded staleness (TPAMI eqs. 37–38, Theorem 5)."""

    name = "lpom-async"
    Config = LPOMAsyncConfig
    config: LPOMAsyncConfig
    reporting_name = "LPOM-async (reconstructed schedule)"

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.pool = _Pool(self.config.workers if self.config.mode == "threads" else 1)
        self.gamma = float(self.config.gamma)
        self._lock = threading.Condition()

    def set_comm(self, comm: Communicator) -> None:
        """Data-parallel async-LPOM: each process runs the same deterministic block sequence on its shard (the
        serial order with ``workers=1``, or the seeded stale-view simulator with ``mode=simulate``); the
        X-blocks' stopping norms, the W-blocks' Gram sums, the energies that drive γ and the γ cap's norms are
        all-reduced. Real asynchronous threads interleave differently in every process, while each block's
        stopping test is a collective that must come in the same order everywhere, so they are refused."""
        super().set_comm(comm)

    def single_process_only(self) -> str | None:
        if self.config.mode == "threads" and self.config.workers > 1:
            return (
                f"lpom-async with mode=threads and workers={self.config.workers} cannot run data-parallel (thread "
                "interleavings differ between processes); use workers=1 or mode=simulate under torchrun"
            )
        return super().single_process_only()

    @property
    def delta(self) -> int:
        c = self.config
        return c.workers if c.staleness < 0 else c.staleness

    def sequence(self) -> list[tuple[str, int]]:
        """Serial LPOM's block sequence for one mini-batch (no early stopping)."""
        xs_blocks = [("x", k) for k in self._block_order()]
        return xs_blocks * self.sweeps + [("w", j) for j in range(self.lifted.L)]

    # -- one block update from a snapshot ---------------------------------------------------------------------
    def _pre(self, store: _Store, j: int, xs: Sequence[Tensor], ws: Sequence[Tensor],
             bs: Sequence[Tensor | None], vx: int, vw: int) -> Tensor:
        cached = store.pre[j]
        if cached[0] == vx and cached[1] == vw:
            return cached[2]
        return self.lifted.preact(xs[j], ws[j], bs[j])

    def _solve(self, block: tuple[str, int], store: _Store, view: tuple[list[Tensor], list[Tensor],
               list[Tensor | None], list[int], list[int]], d: Tensor, w_norms: Mapping[int, float]) -> Any:
        c = self.config
        lifted = self.lifted
        xs, ws, bs, vx, vw = view
        kind, k = block
        gamma = self.gamma
        if kind == "x":
            a = self._pre(store, k - 1, xs, ws, bs, vx[k - 1], vw[k - 1])
            own = store.xs[k]  # the block's own current value is its proximal anchor and warm start
            if k == lifted.L:
                return lifted.solve_output(own, a, d, iters=c.output_iters, tol=c.x_tol, gamma=gamma, anchor=own)
            return lifted.solve_hidden(
                k, own, a, xs[k + 1], ws[k], bs[k], w_norms[k], solver=lifted.resolve_solver(c.x_solver, k),
                iters=c.x_iters, tol=c.x_tol, gamma=gamma, anchor=own,
            )
        u0 = self._pre(store, k, xs, store.ws, store.bs, vx[k], store.ver_w[k])
        return lifted.solve_w(
            k, xs[k], xs[k + 1], store.ws[k], store.bs[k], u0, iters=c.w_iters, side=c.w_side, pinv=c.pinv,
            ridge_rel=c.ridge_rel, gamma=gamma, ridge_rel_feature=c.ridge_rel_feature,
        )

    def _commit(self, block: tuple[str, int], store: _Store, result: Any) -> None:
        kind, k = block
        if kind == "x":
            store.xs[k] = result.value
            store.ver_x[k] += 1
            if k < self.lifted.L:
                store.pre[k] = (
                    store.ver_x[k], store.ver_w[k], self.lifted.preact(store.xs[k], store.ws[k], store.bs[k])
                )
        else:
            store.ws[k], store.bs[k] = result
            store.ver_w[k] += 1
        store.commits += 1

    def _neighbours(self, block: tuple[str, int]) -> list[tuple[str, int]]:
        kind, k = block
        L = self.lifted.L
        if kind == "x":
            out = [("x", k - 1), ("w", k - 1)]
            if k < L:
                out += [("x", k + 1), ("w", k)]
            return [b for b in out if not (b[0] == "x" and b[1] == 0)]
        return [b for b in (("x", k), ("x", k + 1)) if b[1] > 0]

    def _version(self, store: _Store, block: tuple[str, int]) -> int:
        return store.ver_x[block[1]] if block[0] == "x" else store.ver_w[block[1]]

    # -- schedules --------------------------------------------------------------------------------------------
    def _simulate(self, seq: list[tuple[str, int]], store: _Store, d: Tensor, w_norms: Mapping[int, float],
                  info: dict[str, float]) -> None:
        delay = self.delta
        barrier = self.config.w_barrier
        if self.config.order == "random":
            gen = torch.Generator(device="cpu").manual_seed(self.config.seed + self.steps_taken)
            if barrier:  # shuffle within the X-phase and within the W-phase
                xb = [b for b in seq if b[0] == "x"]
                wb = [b for b in seq if b[0] == "w"]
                seq = [xb[i] for i in torch.randperm(len(xb), generator=gen).tolist()]
                seq += [wb[i] for i in torch.randperm(len(wb), generator=gen).tolist()]
            else:
                seq = [seq[i] for i in torch.randperm(len(seq), generator=gen).tolist()]
        snapshots: list[tuple[list[Tensor], list[Tensor], list[Tensor | None], list[int], list[int]]] = []
        for block in seq:
            snapshots.append((list(store.xs), list(store.ws), list(store.bs), list(store.ver_x), list(store.ver_w)))
            # W-blocks read no W-block, so behind the barrier (all X committed) their view is the latest one
            lag = 0 if (barrier and block[0] == "w") else delay
            view = snapshots[max(0, len(snapshots) - 1 - lag)]
            self._commit(block, store, self._solve(block, store, view, d, w_norms))
        info["async_retries"] = 0.0

    def _threads(self, seq: list[tuple[str, int]], store: _Store, d: Tensor, w_norms: Mapping[int, float],
                 info: dict[str, float]) -> None:
        lock = self._lock
        position = [0]
        in_flight: set[tuple[str, int]] = set()
        retries = [0]
        max_seen = [0]
        errors: list[BaseException] = []
        delta = self.delta
        x_total = sum(1 for b in seq if b[0] == "x")
        x_done = [0]
        barrier = self.config.w_barrier

        def worker() -> None:
            while True:
                with lock:
                    while True:
                        if position[0] >= len(seq) or errors:
                            return
                        block = seq[position[0]]
                        if block not in in_flight and not (barrier and block[0] == "w" and x_done[0] < x_total):
                            break
                        lock.wait()
                    position[0] += 1
                    in_flight.add(block)
                try:
                    while True:
                        with lock:
                            view = (list(store.xs), list(store.ws), list(store.bs), list(store.ver_x),
                                    list(store.ver_w))
                            seen = {b: self._version(store, b) for b in self._neighbours(block)}
                        result = self._solve(block, store, view, d, w_norms)
                        with lock:
                            stale = max((self._version(store, b) - v for b, v in seen.items()), default=0)
                            if stale <= delta:
                                max_seen[0] = max(max_seen[0], stale)
                                self._commit(block, store, result)
                                if block[0] == "x":
                                    x_done[0] += 1
                                break
                            retries[0] += 1
                except BaseException as exc:  # surfaced in the calling thread below
                    with lock:
                        errors.append(exc)
                finally:
                    with lock:
                        in_flight.discard(block)
                        lock.notify_all()

        self.pool.run(worker)
        if errors:
            raise errors[0]
        info["async_retries"] = float(retries[0])
        info["async_max_staleness"] = float(max_seen[0])

    # -- the step -------------------------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        c = self.config
        lifted = self.lifted
        with torch.no_grad():
            x0, d = self.prepare_batch(x, y)
            ws0, bs0 = lifted.weights(), lifted.biases()
            with self.block("forward"):
                xs, pre, out = self._init_x(x0, idx, ws0, bs0)
            loss = float(evaluate_loss(self.loss, out, y.to(out.device)))
            self.check_finite_input(x0, loss)
            info: dict[str, float] = {"gamma": self.gamma}
            start = lifted.energy(xs, pre, d)
            info["energy_init"] = start
            for _ in range(c.outer_passes):
                ws, bs = lifted.weights(), lifted.biases()
                if _ > 0:
                    pre = [lifted.preact(xs[j], ws[j], bs[j]) for j in range(lifted.L)]
                w_norms = self.hidden_w_norms(ws, list(range(1, lifted.L)))
                store = _Store(xs, list(ws), list(bs), pre)
                seq = self.sequence()
                if c.mode == "simulate":
                    self._simulate(seq, store, d, w_norms, info)
                else:
                    self._threads(seq, store, d, w_norms, info)
                xs = store.xs
                self.commit(list(zip(store.ws, store.bs)))
            ws, bs = lifted.weights(), lifted.biases()
            pre = [lifted.preact(xs[j], ws[j], bs[j]) for j in range(lifted.L)]
            end = lifted.energy(xs, pre, d)
            info["energy"] = end
            if end > start * (1.0 + 1e-9) and c.gamma_growth > 1.0 and self.gamma > 0.0:
                self._raise_gamma(xs, ws)
            self._finish(xs, d, idx, info)
        self.steps_taken += 1
        return StepStats(loss=loss, info=info)

    def _raise_gamma(self, xs: Sequence[Tensor], ws: Sequence[Tensor]) -> None:
        """γ ← γ·growth, capped at Theorem 5's L·sqrt(Δ(Δ+1)) (never lowered by the cap)."""
        lifted = self.lifted
        beta = max(lifted.kappa)
        sq = [warm_power(w, None, 1)[0] ** 2 for w in ws[1:]]
        if lifted.shards is None:
            sq += [warm_power(x, None, 1)[0] ** 2 for x in xs[: lifted.L]]
        else:
            sq += [lifted.shards.row_spectral_norm(x, POWER_COLD_ITERS) ** 2 for x in xs[: lifted.L]]
        delta = self.delta
        cap = beta * max(sq, default=0.0) * math.sqrt(delta * (delta + 1))
        self.gamma = max(self.gamma, min(self.gamma * self.config.gamma_growth, cap))

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state["gamma"] = self.gamma
        return state

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        rest = dict(state)
        self.gamma = float(rest.pop("gamma", self.config.gamma))
        super().load_extra_state(rest)
