r"""Layer-parallel sync-LPOM over ``torch.distributed`` (docs/methods/lpom.md §6.2).

``lpom-sync`` with ``parallel=layers`` under ``torchrun``: every process holds the whole mini-batch and a
contiguous group of the lifted blocks X^k (k = 1..L, as even a split as possible, rank order = layer order),
together with the weights next to them. With K_r = {k_lo..k_hi} the blocks of rank r, it owns
W_{k−1} for every k ∈ K_r (the layer into X^k) and also W_{k_hi} (the layer out of its last block), which it
shares with rank r+1. The shared boundary weight is updated redundantly by both ranks from the same inputs, so
weights never cross the wire; only boundary activations do, through :meth:`Communicator.send` /
:meth:`Communicator.recv` (methods never touch ``torch.distributed``).

Per mini-batch (the schedule of single-process ``lpom-sync``):

1. **Forward initialisation**, pipelined: rank r receives X^{k_lo−1} from r−1 (rank 0 has the input), runs its
   layers and one more (its shared boundary layer), and sends X^{k_hi} to r+1.
2. **X-phase**: ``x_sweeps`` rounds of two phases (blocks k even, then k odd). Each rank solves its blocks of
   the phase with serial LPOM's block solvers; neighbouring blocks have the other parity, so they are fixed
   during the phase. After the phase each rank sends every updated boundary block to the neighbour that reads
   it (X^{k_lo} to r−1, X^{k_hi} to r+1) and receives the neighbour's. Within a round every boundary carries one
   m × n_k message in each direction. The early stop needs the largest block change over all ranks: one
   all-reduce (max) of a scalar per round.
3. **W-phase**: every rank runs the APG W-steps of its layers (the boundary layer on both of its ranks).

The step loss, the energies and the X-iteration counts are sums of per-rank parts (one all-reduce of a few
scalars). The weights of the other ranks' layers on a rank go stale during an epoch; the trainer calls
:meth:`LayerParallel.synchronize` after every epoch (before evaluation and checkpoints), which broadcasts every
layer's weights (and its warm power-iteration vector) from an owner.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from liftkit.distributed import Communicator, shard_bounds
from liftkit.methods.base import StepStats, evaluate_loss
from liftkit.methods.lpom_chain import LiftedChain
from liftkit.methods.lpom_kernels import BlockResult

__all__ = ["LayerParallel", "LayerParallelMethod"]


class _XSweepOutcome(Protocol):
    @property
    def last(self) -> Mapping[int, BlockResult]: ...
    @property
    def iters(self) -> int: ...
    @property
    def rounds(self) -> int: ...


class _Settings(Protocol):
    @property
    def monitor(self) -> str: ...
    @property
    def outer_passes(self) -> int: ...
    @property
    def w_iters(self) -> int: ...


class LayerParallelMethod(Protocol):
    """What :class:`LayerParallel` needs from the method it schedules (``lpom-sync`` implements it): the lifted
    chain, the batch checks, and the X-sweep, W-block and bookkeeping steps of serial LPOM."""

    steps_taken: int

    @property
    def loss(self) -> str: ...
    @property
    def config(self) -> _Settings: ...
    @property
    def lifted(self) -> LiftedChain: ...
    @property
    def sweeps(self) -> int: ...

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]: ...
    def check_finite_input(self, x0: Tensor, loss: float) -> None: ...
    def x_groups(self) -> list[list[int]]: ...
    def hidden_w_norms(self, ws: Sequence[Tensor], blocks: Sequence[int]) -> dict[int, float]: ...
    def monitored_w_norms(self, ws: Sequence[Tensor], layers: Sequence[int]) -> dict[int, float]: ...

    def energies_due(self) -> bool: ...
    def power_vectors(self) -> list[Tensor | None]: ...
    def sweep_x(
        self, xs: list[Tensor], pre: list[Tensor], d: Tensor, ws: Sequence[Tensor], bs: Sequence[Tensor | None],
        w_norms: Mapping[int, float], groups: Sequence[Sequence[int]], *, sweeps: int, at_forward: bool = False,
        owned: Container[int] | None = None, after_group: Callable[[int], None] | None = None,
        round_moved: Callable[[float], float] | None = None,
    ) -> _XSweepOutcome: ...
    def report_x_phase(self, info: dict[str, float], last: Mapping[int, BlockResult], total: int, sweeps: int) -> None:
        ...
    def solve_w_block(
        self, j: int, xs: Sequence[Tensor], pre: Sequence[Tensor], ws: Sequence[Tensor], bs: Sequence[Tensor | None]
    ) -> tuple[Tensor, Tensor | None]: ...
    def commit_layers(self, new: Mapping[int, tuple[Tensor, Tensor | None]]) -> None: ...


class LayerParallel:
    """The layer split of one ``lpom-sync`` model over the ranks of ``comm`` and its per-batch schedule."""

    def __init__(self, comm: Communicator, n_layers: int) -> None:
        if comm.world_size > n_layers:
            raise ValueError(
                f"lpom-sync parallel=layers needs at least one layer per process: the model has {n_layers} "
                f"linear layers but {comm.world_size} processes were started; use at most {n_layers}"
            )
        self.comm = comm
        self.L = n_layers
        self.rank, self.world = comm.rank, comm.world_size
        lo, hi = shard_bounds(n_layers, self.rank, self.world)
        self.k_lo, self.k_hi = lo + 1, hi  # this rank's blocks X^k_lo..X^k_hi
        self.blocks = list(range(self.k_lo, self.k_hi + 1))
        # layers j (W_j: X^j → X^{j+1}) whose W-step runs here: those into the blocks, and the boundary one out
        self.layers = list(range(self.k_lo - 1, min(self.k_hi, n_layers - 1) + 1))
        # X^{k_hi+1}, the right neighbour's first block (read by block k_hi and by the boundary W-step)
        self.right = self.k_hi + 1 if self.rank < self.world - 1 else None
        self.left = self.k_lo - 1 if self.rank > 0 else None  # X^{k_lo−1}, the left neighbour's last block

    def block_rank(self, k: int) -> int:
        """The rank holding block X^k (1 ≤ k ≤ L)."""
        for r in range(self.world):
            lo, hi = shard_bounds(self.L, r, self.world)
            if lo < k <= hi:
                return r
        raise ValueError(f"block {k} is outside 1..{self.L}")

    # -- messages ----------------------------------------------------------------------------------------------
    def _exchange(self, xs: list[Tensor], updated: set[int]) -> list[int]:
        """Send this rank's updated boundary blocks to the neighbours that read them and receive theirs
        (lower-rank side sends first on every boundary, so blocking sends never wait on each other in a
        cycle). Returns the indices of the blocks received."""
        received = []
        if self.left is not None and self.left in updated:  # the left neighbour updated X^{k_lo−1}
            xs[self.left] = self.comm.recv(torch.empty_like(xs[self.left]), self.rank - 1)
            received.append(self.left)
        if self.left is not None and self.k_lo in updated:
            self.comm.send(xs[self.k_lo].contiguous(), self.rank - 1)
        if self.right is not None and self.k_hi in updated:
            self.comm.send(xs[self.k_hi].contiguous(), self.rank + 1)
        if self.right is not None and self.right in updated:
            xs[self.right] = self.comm.recv(torch.empty_like(xs[self.right]), self.rank + 1)
            received.append(self.right)
        return received

    # -- the step ----------------------------------------------------------------------------------------------
    def step(self, method: LayerParallelMethod, x: Tensor, y: Tensor) -> StepStats:
        c = method.config
        lifted = method.lifted
        L = self.L
        last = self.rank == self.world - 1
        with torch.no_grad():
            x0, d = method.prepare_batch(x, y)
            ws, bs = lifted.weights(), lifted.biases()
            xs, pre = self._forward(lifted, x0, ws, bs)
            loss = float(evaluate_loss(method.loss, xs[L], y.to(x0.device))) if last else 0.0
            method.check_finite_input(x0, loss if last else 0.0)
            info: dict[str, float] = {}
            data_init = lifted.local_data_loss(xs[L], d) if last else 0.0
            loss, data_init = self.comm.sum_scalars(loss, data_init)
            energies = method.energies_due()  # the same step on every rank: the energy is a collective
            if energies:
                info["energy_init"] = data_init
            for p in range(c.outer_passes):
                if p > 0:
                    ws, bs = lifted.weights(), lifted.biases()
                    for j in self.layers:
                        pre[j] = lifted.preact(xs[j], ws[j], bs[j])
                self._x_phase(method, xs, pre, d, ws, bs, info, at_forward=p == 0)
                if energies:
                    info["energy"] = self._energy(lifted, xs, pre, d)
                method.commit_layers({j: method.solve_w_block(j, xs, pre, ws, bs) for j in self.layers})
            self._finish(method, xs, d, info)
        method.steps_taken += 1
        return StepStats(loss=loss, info=info)

    def _forward(
        self, lifted: LiftedChain, x0: Tensor, ws: Sequence[Tensor], bs: Sequence[Tensor | None]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The pipelined forward initialisation: X^{k_lo−1} from the left neighbour, this rank's layers (and its
        boundary layer), X^{k_hi} to the right neighbour. Blocks held elsewhere stay zero."""
        m = x0.shape[0]
        xs: list[Tensor] = [x0] + [x0.new_zeros(m, lifted.widths[k]) for k in range(1, self.L + 1)]
        pre: list[Tensor] = [x0.new_zeros(m, lifted.widths[j + 1]) for j in range(self.L)]
        if self.left is not None:
            xs[self.left] = self.comm.recv(xs[self.left], self.rank - 1)
        for j in self.layers:
            pre[j] = lifted.preact(xs[j], ws[j], bs[j])
            xs[j + 1] = lifted.acts[j].phi(pre[j])
        if self.right is not None:
            self.comm.send(xs[self.k_hi].contiguous(), self.rank + 1)
        return xs, pre

    def _x_phase(
        self, method: LayerParallelMethod, xs: list[Tensor], pre: list[Tensor], d: Tensor, ws: list[Tensor],
        bs: list[Tensor | None], info: dict[str, float], *, at_forward: bool,
    ) -> None:
        """Serial LPOM's odd–even sweep restricted to this rank's blocks, with the boundary exchange after every
        phase and the largest block change of a round taken over all ranks."""
        lifted = method.lifted
        hidden = [k for k in self.blocks if k < self.L]
        # the same warm power iterations serial LPOM runs for these blocks' W_k (all owned here)
        w_norms = method.hidden_w_norms(ws, hidden)
        phases = method.x_groups()

        def exchange(i: int) -> None:
            for k in self._exchange(xs, set(phases[i])):
                if k == self.left:  # the input of this rank's first layer changed
                    pre[k] = lifted.preact(xs[k], ws[k], bs[k])

        def largest_over_ranks(moved: float) -> float:
            if self.comm.world_size == 1:
                return moved
            flag = torch.tensor([moved], dtype=torch.float64, device=self.comm.device)
            return float(self.comm.all_reduce_max_(flag)[0])

        out = method.sweep_x(
            xs, pre, d, ws, bs, w_norms, phases, sweeps=method.sweeps, at_forward=at_forward, owned=set(self.blocks),
            after_group=exchange, round_moved=largest_over_ranks,
        )
        method.report_x_phase(info, out.last, out.iters, out.rounds)
        info["x_iters_total"] = self.comm.sum_scalars(float(out.iters))[0]

    def _energy(self, lifted: LiftedChain, xs: list[Tensor], pre: list[Tensor], d: Tensor) -> float:
        """E summed over ranks: each rank adds the penalties of the layers into its blocks (the boundary layer
        counts on its right rank only), the last rank the data term."""
        part = lifted.local_data_loss(xs[self.L], d) if self.rank == self.world - 1 else 0.0
        for k in self.blocks:
            part += lifted.mu[k - 1] * lifted.acts[k - 1].penalty_sum(pre[k - 1], xs[k])
        return self.comm.sum_scalars(part)[0]

    def _finish(self, method: LayerParallelMethod, xs: list[Tensor], d: Tensor, info: dict[str, float]) -> None:
        c = method.config
        lifted = method.lifted
        ws, bs = lifted.weights(), lifted.biases()
        if c.monitor == "full" and method.energies_due():
            pre = [xs[0].new_zeros(0)] * self.L
            for j in self.layers:
                pre[j] = lifted.preact(xs[j], ws[j], bs[j])
            info["energy_w"] = self._energy(lifted, xs, pre, d)
        if c.monitor != "off":
            for j, sigma in method.monitored_w_norms(ws, self.layers).items():
                info[f"w_norm_{j}"] = sigma
            info["w_iters"] = float(c.w_iters)

    # -- after an epoch ----------------------------------------------------------------------------------------
    def synchronize(self, method: LayerParallelMethod) -> None:
        """Every layer's weights from the rank of the block it feeds, its warm power vector from the rank that
        used it in the X-phase (the rank of block max(j, 1)), so that every rank holds the single-process
        model and state."""
        lifted = method.lifted
        vectors = method.power_vectors()
        for j, lin in enumerate(lifted.linears):
            src = self.block_rank(j + 1)
            self.comm.broadcast_(lin.weight.data, src)
            if lin.bias is not None:
                self.comm.broadcast_(lin.bias.data, src)
            vsrc = self.block_rank(max(j, 1))
            have = torch.tensor([0.0 if vectors[j] is None else 1.0], device=self.comm.device)
            self.comm.broadcast_(have, vsrc)
            if float(have[0]) == 1.0:
                v = vectors[j] if vectors[j] is not None else lin.weight.new_empty(lin.weight.shape[1])
                assert v is not None
                vectors[j] = self.comm.broadcast_(v.contiguous(), vsrc)

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "blocks": self.blocks, "layers": self.layers}
