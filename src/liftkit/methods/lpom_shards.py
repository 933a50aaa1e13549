r"""Data-parallel LPOM (docs/methods/lpom.md §10): what crosses the wire when the batch's columns are sharded.

Each process holds its slice of every global mini-batch and of every lifted variable X^k (rows here, the
row-major layout; the papers' columns). The weights are replicated. Given W, every X-block solver (projected
FISTA with the replicated step 1/L_S, the paper's (26), the output closed form and (29)) acts sample by sample,
so it runs on the shard unchanged; only its stopping test, ‖ΔX‖ ≤ tol·‖X‖, needs the global norms, and so do
the sweep stop and the energies reported. What is reduced per W-step of layer j (X̄ = [X^j, 1], R = φ(X̄Yᵀ) −
X^{j+1}, the step being W̄ ← Y − (1/β) Rᵀ(X̄X̄ᵀ + εI)⁻¹X̄ on the batch side and Rᵀ X̄(X̄ᵀX̄ + εI)⁻¹ on the feature
side):

* **feature side** (m_global > n_j + 1): S = X̄ᵀX̄ (float64, (n_j+1)², once), then X̄ᵀR ((n_j+1) × n_{j+1},
  working dtype) in every APG iteration;
* **batch side** (m_global ≤ n_j + 1, and the SVD form): X̄ is all-gathered once (m_global × (n_j+1)); every
  process builds the same m_global × m_global Gram and factor, forms its own rows P_r of
  P = (X̄X̄ᵀ + εI)⁻¹X̄ (or of the SVD pseudo-inverse), and every APG iteration all-reduces Σ_r R_rᵀP_r
  (n_{j+1} × (n_j+1), working dtype).

The guard ε = ridge_rel·tr/m uses the global trace and m_global, and the side is chosen by m_global, so every
process computes the single-process step up to the order of floating-point sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from liftkit.distributed import Communicator
from liftkit.solvers import batch_pinv, guarded_cholesky

__all__ = ["Shards"]


class Shards:
    """The reductions LPOM needs when its batch is split over the processes of ``comm``."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    # -- sums ---------------------------------------------------------------------------------------------------
    def sum_(self, t: Tensor) -> Tensor:
        """In-place sum over the processes (the ``sq_sum`` hook of :func:`liftkit.solvers.projected_fista`)."""
        return self.comm.all_reduce_sum_(t)

    def sum_float(self, value: float) -> float:
        return self.comm.sum_scalars(value)[0]

    def rows(self, x: Tensor) -> int:
        """m_global: the number of samples over all shards."""
        return int(self.comm.sum_scalars(float(x.shape[0]))[0])

    def rel_change(self, new: Tensor, old: Tensor) -> float:
        """‖new − old‖/‖old‖ over the whole batch (one 2-value all-reduce)."""
        sq = self.comm.all_reduce_sum_(
            torch.stack([(new - old).pow(2).sum(), old.pow(2).sum()]).to(torch.float64)
        ).tolist()
        d, o = math.sqrt(sq[0]), math.sqrt(sq[1])
        return d / o if o > 0 else (0.0 if d == 0 else math.inf)

    def row_spectral_norm(self, x: Tensor, iters: int) -> float:
        """‖X‖₂ of the row-sharded X by ``iters`` power iterations from serial LPOM's fixed start vector
        (async-LPOM's γ cap): XᵀXv and the final ‖Xv‖² are all-reduced."""
        gen = torch.Generator(device="cpu").manual_seed(0x5EED)
        v = torch.randn(x.shape[1], generator=gen, dtype=x.dtype).to(x.device)
        v = v / v.norm()
        for _ in range(iters):
            z = self.comm.all_reduce_sum_(x.t() @ (x @ v))
            nz = float(z.norm().item())
            if nz == 0.0 or not math.isfinite(nz):
                break
            v = z / nz
        return math.sqrt(max(self.sum_float(float((x @ v).pow(2).sum())), 0.0))

    # -- the W-step's pseudo-inverse ------------------------------------------------------------------------------
    def pinv(
        self, x_bar: Tensor, m_global: int, *, side: str, pinv: str, guard: float, rcond: float, extra: float,
        dtype: torch.dtype = torch.float64,
    ) -> Callable[[Tensor], Tensor]:
        """R ↦ Rᵀ(X̄ᵀ)⁺ᵀ of the global batch (out × (n_j+1), replicated), for this process's rows R; the Gram
        and its factor in ``dtype``."""
        n1 = x_bar.shape[1]
        if pinv == "svd" and extra == 0.0:
            full = self._gather(x_bar)
            rows = self._own_rows(batch_pinv(full.t(), side="svd", rcond=rcond).to(torch.float64), x_bar.shape[0])
            return self._batch_apply(rows, x_bar.dtype)
        batch_side = side == "batch" or (side == "auto" and m_global <= n1)
        if batch_side:
            full = self._gather(x_bar).to(dtype)
            gram = full @ full.t()
        else:
            xd = x_bar.to(dtype)
            gram = self.comm.all_reduce_sum_(xd.t() @ xd)
        trace = float(gram.diagonal().sum().item())
        if trace == 0.0:
            return lambda r: r.new_zeros(r.shape[1], n1)
        factor = guarded_cholesky(gram, guard * trace / m_global, trace)
        if batch_side:
            rows = self._own_rows(torch.cholesky_solve(full, factor), x_bar.shape[0])
            return self._batch_apply(rows, x_bar.dtype)

        def feature_apply(r: Tensor) -> Tensor:
            rhs = self.comm.all_reduce_sum_(x_bar.t() @ r).to(dtype)
            return torch.cholesky_solve(rhs, factor).to(r.dtype).t()

        return feature_apply

    def _batch_apply(self, rows: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        # P_r in the working dtype, as serial LPOM applies (K + εI)⁻¹R in the solve dtype and multiplies by X̄ in it
        rows = rows.to(dtype)

        def apply(r: Tensor) -> Tensor:
            return self.comm.all_reduce_sum_(r.t() @ rows)

        return apply

    def _gather(self, x: Tensor) -> Tensor:
        """The row-concatenation of every process's ``x`` in rank order (shards may differ in length)."""
        size = torch.tensor([x.shape[0]], dtype=torch.int64, device=self.comm.device)
        sizes = [int(s) for s in self.comm.all_gather(size)]
        top = max(sizes)
        padded = x if x.shape[0] == top else torch.cat([x, x.new_zeros(top - x.shape[0], x.shape[1])])
        parts = self.comm.all_gather(padded.contiguous())
        self._offset = sum(sizes[: self.comm.rank])
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def _own_rows(self, full: Tensor, count: int) -> Tensor:
        return full[self._offset:self._offset + count]
