"""The ``tiam`` and ``am`` methods: the contract (validation, modes, state) around one sweep per step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from liftkit.methods.base import Method, StepStats, evaluate_loss, register
from liftkit.methods.tiam import presets
from liftkit.methods.tiam.config import AMConfig, Inertia, TIAMConfig, eps_at, inertia_at, penalties_at
from liftkit.methods.tiam.ops import Counters
from liftkit.methods.tiam.state import BlockHistory, SampleRows, TIAMState
from liftkit.methods.tiam.sweep import Blocks, GramCache, SweepData, run_sweep
from liftkit.models import ChainLayer, as_chain

__all__ = ["AM", "TIAM"]

_SUPPORTED_ACTIVATIONS = presets.SUPPORTED_ACTIVATIONS
_PENALTY_ACTIVATIONS = presets.PENALTY_ACTIVATIONS


@register
class TIAM(Method):
    """TIAM (reconstructed from the paper's template): triple-inertial block steps on mDLAM's objective.

    See :mod:`liftkit.methods.tiam` for the objective, block operators and modes; hyperparameters in
    :class:`TIAMConfig`. Fully connected ``nn.Sequential`` models only (``Flatten``, ``Linear`` with bias,
    ReLU / LeakyReLU / ELU hidden activations, bare ``Linear`` output).
    """

    name = "tiam"
    Config = TIAMConfig
    config: TIAMConfig
    default_loss = "ce"
    supported_losses = ("ce",)
    reporting_name = "TIAM (reconstructed from the paper's template)"
    paper = (
        "Yan, Xu, Wang, Peng, A Triple-Inertial Accelerated Alternating Optimization Method for Deep "
        "Learning Training, arXiv 2503.08489 (reconstructed on mDLAM: Wang, Li, Zhao, Neurocomputing 2022)"
    )
    default_batch_size = 0
    supports_data_parallel = True

    @classmethod
    def preset_values(cls, preset: str, model: nn.Module) -> dict[str, Any]:
        """``tuned``: the defaults (the validation-tuned full-batch setting; for an ELU model the box setting tuned
        for it); ``paper``: the specification's values (:mod:`liftkit.methods.tiam.presets`)."""
        return presets.preset_values(preset, model)

    def __init__(self, model: nn.Module, *, loss: str | None = None, **hparams: Any) -> None:
        super().__init__(model, loss=loss, **hparams)
        self.m_global = 0  # N_global of the batch being swept (the b-step's exact mean divides by it)
        self._gram_cache: GramCache | None = None  # the first layer's W metric, full batch
        # full batch: (the input's fingerprint, W_1, x W_1ᵀ) as left by the last sweep's W_1 block, when that block
        # formed the product exactly; the next step's forward pass reuses it while x and W_1 are unchanged
        self._first_product: tuple[tuple[Any, ...], Tensor, Tensor] | None = None
        # full batch: the buffer a shuffled full batch is copied into in dataset order (see _is_shuffled_full_batch)
        self._ordered_input: Tensor | None = None
        self.chain: list[ChainLayer] = as_chain(
            model, method=self.name, allowed_activations=_SUPPORTED_ACTIVATIONS, require_bias=True
        )
        self._check_chain()
        c = self.config
        if c.init == "mdlam":
            with torch.no_grad():
                for layer in self.chain:
                    layer.weight.normal_(0.0, 0.1)
                    _bias(layer).normal_(0.0, 0.1)
        self.state = TIAMState()
        with torch.no_grad():
            for layer in self.chain:
                self.state.W_prev.append(layer.weight.detach().clone())
                self.state.b_prev.append(_bias(layer).detach().clone())
                if c.history == "raw":
                    self.state.W_raw.append(layer.weight.detach().clone())
                    self.state.b_raw.append(_bias(layer).detach().clone())
        n_layers = len(self.chain)
        self.state.theta_W = [c.theta0] * n_layers
        self.state.theta_a = [c.theta0] * (n_layers - 1)
        self.state.theta_zL = c.theta0

    def _check_chain(self) -> None:
        if len(self.chain) < 2:
            raise ValueError(f"{self.name} needs at least one hidden layer (Linear -> activation -> Linear)")
        for layer in self.chain[:-1]:
            if layer.activation is None:
                raise ValueError(
                    f"{self.name}: hidden Linear at module {layer.index} has no activation; put a ReLU, "
                    "LeakyReLU or ELU after every hidden Linear"
                )
        if self.chain[-1].activation is not None:
            raise ValueError(
                f"{self.name} trains on the output pre-activation z_L (cross-entropy on logits); remove the "
                f"output activation at module {self.chain[-1].activation_index}"
            )
        for layer in self.chain[1:]:
            if layer.pre:
                raise ValueError(f"{self.name}: only a Flatten before the first Linear is supported")
        if self.config.constraint == "penalty":
            for layer in self.chain[:-1]:
                act = layer.activation
                assert act is not None
                if act.name not in _PENALTY_ACTIVATIONS:
                    raise ValueError(
                        f"{self.name}: constraint='penalty' has a closed-form z-step for "
                        f"{', '.join(_PENALTY_ACTIVATIONS)} only, not {act.name}; use constraint='box'"
                    )

    # -- data parallelism ---------------------------------------------------------------------------
    def single_process_only(self) -> str | None:
        if self.config.zL_solver == "fista":
            return (
                f"{self.name}: zL_solver='fista' runs in a single process only; use zL_solver=prox_step with "
                "several processes"
            )
        return None

    # -- the sweep ----------------------------------------------------------------------------------
    def _blocks(self, cnt: Counters | None = None, k: int = 0) -> Blocks:
        """The block steps bound to this method's state at iteration k's penalties (counting into ``cnt``)."""
        return Blocks(self, penalties_at(self.config, k), Counters() if cnt is None else cnt)

    def _inertia(self, k: int) -> Inertia:
        """(p1, p2, p3) of iteration k (``p_schedule``)."""
        return inertia_at(self.config, k)

    def _forward_aux(self, x: Tensor, onehot: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """z_l, a_l from a forward pass; z_L = 2y − 1 (``zL_init='target'``) or the logits."""
        z: list[Tensor] = []
        a: list[Tensor] = []
        h = x
        for layer in self.chain:
            u = layer.linear(h)
            z.append(u)
            if layer.activation is not None:
                h = layer.activation.phi(u)
                a.append(h)
        if self.config.zL_init == "target" and self.config.output == "penalty":
            z[-1] = 2 * onehot - 1
        return z, a

    # -- modes ------------------------------------------------------------------------------------------------
    def _is_full(self, idx: Tensor | None, n: int) -> bool:
        if self.comm.world_size > 1:
            return self._is_full_global(idx)
        mode = self.config.mode
        if mode == "full":
            return True
        if mode == "minibatch":
            return False
        if idx is None:
            return False
        if self.state.initialised is not None and self.state.initialised.numel() == n:
            return True
        return int(idx.max()) + 1 == n and int(idx.min()) == 0 and bool(torch.unique(idx).numel() == n)

    def _is_full_global(self, idx: Tensor | None) -> bool:
        """Full mode under data parallelism: the shards together cover the dataset indices 0..N−1 exactly
        (the trainer's shards of one global batch never share an index)."""
        mode = self.config.mode
        if mode == "minibatch":
            return False
        if idx is None:
            raise ValueError(f"{self.name} needs the batch's dataset indices (idx) when run on several processes")
        local_top = float(idx.max()) + 1 if idx.numel() else 0.0
        top = self.comm.all_reduce_max_(torch.tensor([local_top], device=self.device))
        count, unique = self.comm.sum_scalars(float(idx.numel()), float(torch.unique(idx).numel()))
        covers = count == unique == float(top[0])
        if mode == "full" and not covers:
            raise ValueError(
                f"{self.name}: mode='full' on several processes needs full batches (--batch-size 0), so that every "
                "sample's auxiliary variables stay on one process; use mode=minibatch for mini-batches"
            )
        return covers

    def _ensure_full_state(self, x: Tensor, onehot: Tensor, idx: Tensor) -> None:
        """Grow the per-sample stores to cover ``idx`` and initialise its new rows (every row at a resync) from a
        forward pass."""
        st = self.state
        widths_z = [int(layer.weight.shape[0]) for layer in self.chain]
        st.ensure_rows(int(idx.max()) + 1, widths_z, x, raw=self.config.history == "raw")
        assert st.initialised is not None
        fresh = ~st.initialised[idx]
        every = self.config.resync_every
        if every and st.iteration and st.iteration % every == 0:
            fresh = torch.ones_like(fresh)  # re-synchronise every row with the network (and drop its inertia)
        if bool(fresh.any()):
            with torch.no_grad():
                z0, a0 = self._forward_aux(x[fresh], onehot[fresh])
            st.initialise_rows(idx[fresh], z0, a0)

    # -- the contract -------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, *, idx: Tensor | None = None) -> StepStats:
        c = self.config
        self._check_batch(x, y, idx)
        with torch.no_grad():
            x_flat, onehot = self._prepare(x, y)
            if idx is not None and self._is_shuffled_full_batch(idx, int(x.shape[0])):
                with self.block("dataset_order"):
                    x_flat, onehot, y, idx = self._in_dataset_order(x_flat, onehot, y.to(self.device), idx)
            key = self._input_key(x_flat)
            with self.block("forward"):
                # the declared loss at the start of the step, by the forward pass; x W_1ᵀ is reused by the W_1 block
                P_first = self._reused_first_product(key)
                if P_first is None:
                    P_first = x_flat @ self.chain[0].weight.T
                h = P_first + _bias(self.chain[0])
                for prev, layer in zip(self.chain[:-1], self.chain[1:]):
                    assert prev.activation is not None
                    h = layer.linear(prev.activation.phi(h))
                loss = float(evaluate_loss(self.loss, h, y.to(self.device)))
            cnt = Counters()
            self.m_global = self.global_batch_size(int(x.shape[0]))
            if idx is None and c.mode == "full" and self.comm.world_size == 1:
                idx = torch.arange(x.shape[0], device=self.device)
            full = self._is_full(idx, x.shape[0])
            if full:
                assert idx is not None
                info, eps = self._full_step(x_flat, onehot, idx.to(self.device), cnt, P_first, key)
            else:
                info, eps = self._minibatch_step(x_flat, onehot, cnt, P_first)
            self.state.iteration += 1
        info.update(
            {
                "eps": eps,
                "full_batch": 1.0 if full else 0.0,
                "backtracks": float(cnt.backtracks),
                "backtrack_failures": float(cnt.backtrack_failures),
                "safeguard_restarts": float(cnt.safeguard_restarts),
                "theta_max": cnt.theta_max,
            }
        )
        if c.zL_solver == "fista":
            info["fista_iters"] = float(cnt.fista_iters)
        if not math.isfinite(info["objective"]):
            raise FloatingPointError(f"{self.name}: the objective became non-finite; lower rho or theta0")
        self.steps_taken += 1
        return StepStats(loss=loss, info=info)

    def _check_batch(self, x: Tensor, y: Tensor, idx: Tensor | None) -> None:
        if y.dtype.is_floating_point:
            raise ValueError(f"{self.name} trains classifiers with integer labels (cross-entropy on z_L)")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}; pass matching batches")
        if idx is not None and idx.shape[0] != x.shape[0]:
            raise ValueError(f"idx has {idx.shape[0]} entries but the batch has {x.shape[0]} samples")

    def _prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The flattened input in the model's dtype and device, and the one-hot labels (both checked)."""
        x_flat = self.chain[0].apply_pre(x.to(device=self.device, dtype=self.dtype))
        out_features = int(self.chain[-1].weight.shape[0])
        if int(y.min()) < 0 or int(y.max()) >= out_features:
            raise ValueError(f"labels must lie in [0, {out_features}); got range [{int(y.min())}, {int(y.max())}]")
        return x_flat, tF.one_hot(y.to(self.device).long(), out_features).to(self.dtype)

    def _input_key(self, x: Tensor) -> tuple[Any, ...]:
        """A fingerprint of the batch x (values and row order) from one matrix-vector product v = x r with a fixed
        vector r: (N, d, dtype, Σv, Σv², Σ w_i v_i) with fixed weights w. A NaN or inf in x makes it non-finite,
        so it also checks the input (every entry is looked at only when it is not finite, e.g. on overflow)."""
        n, d = x.shape
        r = torch.arange(d, device=x.device, dtype=x.dtype).mul_(0.7548776662466927).add_(0.1).cos_()
        v = (x @ r).double()
        w = torch.arange(n, device=x.device, dtype=torch.float64).mul_(0.5698402909980532).add_(0.3).cos_()
        sums = (float(v.sum()), float(v.square().sum()), float(v @ w))
        if not all(math.isfinite(t) for t in sums) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name}: the input batch contains NaN or inf; clean the data")
        return (n, d, x.dtype, *sums)

    # -- a shuffled full batch, swept in dataset order -----------------------------------------------------------
    def _is_shuffled_full_batch(self, idx: Tensor, n: int) -> bool:
        """Whether ``idx`` is a permutation of the dataset indices 0..n−1 other than the identity, in a single
        process and a mode that sweeps it as the full batch (the trainer's full batch under ``sampling=shuffle``).

        Such a batch is swept in dataset order: its sums only round differently in another order, and in dataset
        order the stored auxiliary rows are swept in place (not gathered and scattered back) while the input,
        hence x W_1ᵀ and the first layer's Gram with their bit-exact cache keys, stay the same from step to step."""
        if self.comm.world_size > 1 or self.config.mode == "minibatch" or n == 0 or idx.numel() != n:
            return False
        if int(idx.min()) != 0 or int(idx.max()) != n - 1:
            return False
        idx = idx.long()
        if torch.equal(idx, torch.arange(n, device=idx.device)):
            return False
        return bool(torch.zeros(n, dtype=torch.bool, device=idx.device).index_fill_(0, idx, True).all())

    def _in_dataset_order(
        self, x: Tensor, onehot: Tensor, y: Tensor, idx: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A full batch given in the order ``idx`` (a permutation: row i is sample idx[i]) in dataset order: (x,
        onehot, y, 0..N−1), each by one scatter out[idx[i]] = t[i]. The input's copy is written into the buffer of
        the last step: a fresh allocation of its size would be mapped anew, page by page, in every step."""
        idx = idx.to(device=x.device, dtype=torch.long)
        out = self._ordered_input
        if out is None or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            self._ordered_input = None  # free the old buffer before allocating the new one
            out = self._ordered_input = torch.empty_like(x)
        # index_put_ without accumulation: deterministic also under torch.use_deterministic_algorithms on CUDA
        out.index_put_((idx,), x)
        ordered_y = torch.empty_like(y).index_put_((idx,), y)
        ordered_onehot = torch.empty_like(onehot).index_put_((idx,), onehot)
        return out, ordered_onehot, ordered_y, torch.arange(x.shape[0], device=x.device)

    def _reused_first_product(self, key: tuple[Any, ...]) -> Tensor | None:
        """x W_1ᵀ as the last sweep left it, when the input (``key``) and W_1 are unchanged; else None."""
        cached = self._first_product
        if cached is None or cached[0] != key or not torch.equal(cached[1], self.chain[0].weight.detach()):
            return None
        return cached[2]

    def _full_step(
        self, x: Tensor, onehot: Tensor, idx: Tensor, cnt: Counters, P_first: Tensor, key: tuple[Any, ...]
    ) -> tuple[dict[str, float], float]:
        """Full mode: one sweep on the stored auxiliary variables of the samples ``idx``; returns (info, ε)."""
        st = self.state
        with self.block("aux_rows"):
            self._ensure_full_state(x, onehot, idx)
            rows = st.rows(idx)
        eps = eps_at(self.config, st.iteration)
        sw = SweepData(x, onehot, rows, eps, self._inertia(st.iteration))
        blocks = Blocks(self, penalties_at(self.config, st.iteration), cnt, x_sums=(key[3], key[4]))
        info = run_sweep(blocks, sw, P_first)
        P = blocks.first_product
        self._first_product = None if P is None else (key, self.chain[0].weight.detach().clone(), P)
        with self.block("aux_rows"):
            st.store_rows(idx, rows)
        return info, eps

    def _minibatch_step(
        self, x: Tensor, onehot: Tensor, cnt: Counters, P_first: Tensor
    ) -> tuple[dict[str, float], float]:
        """Mini-batch mode: fresh auxiliary variables (a forward pass), ``minibatch_sweeps`` sweeps with ε_k and
        ρ_k restarting at k = 0; returns (the last sweep's info, its ε)."""
        c = self.config
        z, a = self._forward_aux(x, onehot)
        raw = c.history == "raw"
        z_hist = [BlockHistory(t.clone(), t.clone() if raw else None) for t in z]
        a_hist = [BlockHistory(t.clone(), t.clone() if raw else None) for t in a]
        rows = SampleRows(z, a, z_hist, a_hist)
        info: dict[str, float] = {}
        eps = eps_at(c, 0)
        for sweep in range(c.minibatch_sweeps):
            eps = eps_at(c, sweep)
            sw = SweepData(x, onehot, rows, eps, self._inertia(self.state.iteration))
            info = run_sweep(self._blocks(cnt, sweep), sw, P_first if sweep == 0 else None)
        return info, eps

    # -- state --------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        if self.comm.world_size > 1 and self.state.initialised is not None:
            return self.state.gathered_dict(self.comm)
        return self.state.as_dict()

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.state.load_dict(state, who=self.name)


@register
class AM(TIAM):
    """AM (mDLAM base, p=0): the TIAM code with p1 = p2 = p3 = 0, the baseline that isolates the inertia."""

    name = "am"
    Config = AMConfig
    config: AMConfig
    reporting_name = "AM (mDLAM base, p=0)"
    paper = (
        "Wang, Li, Zhao, Accelerated Gradient-free Neural Network Training by Multi-convex Alternating "
        "Optimization, Neurocomputing 2022 (the base TIAM builds on)"
    )

    @classmethod
    def preset_values(cls, preset: str, model: nn.Module) -> dict[str, Any]:
        """TIAM's presets without the inertia (p1 = p2 = p3 = 0 by definition)."""
        return presets.preset_values(preset, model, inertia=False)


def _bias(layer: ChainLayer) -> Tensor:
    b = layer.bias
    assert b is not None
    return b
