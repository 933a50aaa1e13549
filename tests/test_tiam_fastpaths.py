"""TIAM's fast paths against the reference path: a shuffled full batch is swept in dataset order (the same steps,
bit for bit, as the batch given in order), and what that order lets the method keep across steps."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from liftkit.activations import get_activation
from liftkit.methods.tiam import TIAM
from liftkit.methods.tiam.config import penalties_at
from liftkit.methods.tiam.ops import Counters, SweepMemo, ce_sum
from liftkit.methods.tiam.output import OutputFit, exact_b_step, exact_w_step
from liftkit.methods.tiam.sweep import Blocks
from liftkit.models import mlp

torch.use_deterministic_algorithms(True)

#: the tuned full-batch setting's switches (Gram metrics, exact output, third inertia only) on a small net
TUNED_LIKE = {"p_schedule": "fista", "p1": 0.0, "p2": 0.0}


def _problem(n: int, d: int = 6, classes: int = 3, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.arange(n) % classes
    return x, y


def _model(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(1)
    return mlp("6-5-4-3", activation="relu").to(dtype)


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _assert_same_method(m1: TIAM, m2: TIAM) -> None:
    for p1, p2 in zip(m1.model.parameters(), m2.model.parameters()):
        assert torch.equal(p1, p2)
    for key in ("z", "a", "z_prev", "a_prev"):
        for t1, t2 in zip(getattr(m1.state, key), getattr(m2.state, key)):
            assert torch.equal(t1, t2), key


@pytest.mark.parametrize("hp", [{"preset": "paper"}, TUNED_LIKE], ids=["paper", "tuned"])
def test_shuffled_full_batch_steps_exactly_as_the_batch_in_dataset_order(hp: dict) -> None:
    """Every row order of the full batch gives the steps of the batch in dataset order, bit for bit: the same loss,
    objective, weights and per-sample auxiliary variables."""
    n = 90
    x, y = _problem(n)
    shuffled, ordered = TIAM(_model(), **hp), TIAM(_model(), **hp)
    for k in range(4):
        perm = _perm(n, k)
        s1 = shuffled.step(x[perm], y[perm], idx=perm)
        s2 = ordered.step(x, y, idx=torch.arange(n))
        assert s1.loss == s2.loss and s1.info == s2.info
        _assert_same_method(shuffled, ordered)


def test_first_layer_gram_and_product_survive_reshuffling() -> None:
    """float32, n > 10·d (the Gram cache applies): under a new permutation every step, the first layer's Gram
    metric is factorised once and x W_1ᵀ comes from the previous sweep (its sums no longer depend on the order)."""
    n = 400
    x, y = _problem(n, dtype=torch.float32)
    meth = TIAM(_model(torch.float32), **TUNED_LIKE)
    perm = _perm(n, 0)
    meth.step(x[perm], y[perm], idx=perm)
    assert meth._gram_cache is not None
    metric = meth._gram_cache[1]
    for k in range(1, 6):
        assert meth._first_product is not None
        twin = copy.deepcopy(meth)
        twin._first_product = None
        perm = _perm(n, k)
        s1, s2 = meth.step(x[perm], y[perm], idx=perm), twin.step(x[perm], y[perm], idx=perm)
        assert meth._gram_cache[1] is metric
        assert s1.info == s2.info
        _assert_same_method(meth, twin)


@pytest.mark.parametrize("case", ["shuffled", "minibatch-mode", "subset", "in-order"])
def test_only_a_shuffled_full_batch_is_reordered(case: str) -> None:
    """Mini-batches, a subset of the indices and a batch already in dataset order are swept as given."""
    n = 32
    x, y = _problem(n)
    meth = TIAM(_model(), preset="paper", mode="minibatch" if case == "minibatch-mode" else "auto")
    seen: list[str] = []

    def hook(name: str) -> contextlib.AbstractContextManager[None]:
        seen.append(name)
        return contextlib.nullcontext()

    meth.set_block_hook(hook)
    if case == "subset":
        idx = _perm(n, 0)[:20]
        meth.step(x[idx], y[idx], idx=idx)
    elif case == "in-order":
        meth.step(x, y, idx=torch.arange(n))
    else:
        perm = _perm(n, 0)
        meth.step(x[perm], y[perm], idx=perm)
    assert seen.count("dataset_order") == (1 if case == "shuffled" else 0)


# -- values shared between blocks ---------------------------------------------------------------------------------


def test_sweep_memo_returns_each_value_once_and_notices_writes() -> None:
    act = get_activation("relu")
    g = torch.Generator().manual_seed(2)
    z, a = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    memo = SweepMemo(size=2)
    hz = memo.phi(act, z)
    assert memo.phi(act, z) is hz and torch.equal(hz, torch.relu(z))
    assert memo.sq_diff(a, hz) == float(torch.linalg.vector_norm(a - torch.relu(z))) ** 2
    z.add_(1.0)  # a write bumps the version: recomputed
    assert memo.phi(act, z) is not hz and torch.equal(memo.phi(act, z), torch.relu(z))
    a.mul_(2.0)
    assert memo.sq_diff(a, hz) == float(torch.linalg.vector_norm(a - hz)) ** 2
    for _ in range(3):  # only the last `size` entries are kept
        memo.phi(act, torch.randn(2, 2, generator=g))
    assert memo.phi(act, z) is not memo.phi(act, torch.zeros(1)) and len(memo._phi) == 2


@pytest.mark.parametrize("hp", [TUNED_LIKE, {**TUNED_LIKE, "output": "penalty"}], ids=["exact", "penalty"])
def test_shared_values_give_the_steps_of_recomputing_them(hp: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo of h(z) and ‖u − w‖² (z, a blocks and objective) and the W_l safeguard's fit reused by the b_l
    safeguard: the steps are bit for bit those that recompute every value, and the shared values are used."""
    n = 90
    x, y = _problem(n)
    fast, reference = TIAM(_model(), **hp), TIAM(_model(), **hp)
    hits = {"phi": 0, "sq": 0, "fit": 0}
    phi, sq_diff, update_b = SweepMemo.phi, SweepMemo.sq_diff, Blocks.update_b

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(memo: SweepMemo, *args: Any) -> Any:
            u, w = args[-2:]  # (act, z) or (u, w)
            entries = memo._phi if name == "phi" else memo._sq
            operands = [(e[0], e[1]) if name == "phi" else (e[0], e[2]) for e in entries]
            hits[name] += any(e_u is u and e_w is w for e_u, e_w in operands)
            return fn(memo, *args)

        return wrapper

    for k in range(5):
        with monkeypatch.context() as mp:
            mp.setattr(SweepMemo, "phi", counted("phi", phi))
            mp.setattr(SweepMemo, "sq_diff", counted("sq", sq_diff))
            s1 = fast.step(x, y, idx=torch.arange(n))
        with monkeypatch.context() as mp:
            mp.setattr(SweepMemo, "phi", lambda memo, act, z: act.phi(z))
            mp.setattr(SweepMemo, "sq_diff", lambda memo, u, w: float(torch.linalg.vector_norm(u - w)) ** 2)

            def fresh_fit(blocks: Blocks, *args: Any) -> Tensor:
                hits["fit"] += blocks._fit is not None
                blocks._fit = None
                return update_b(blocks, *args)

            mp.setattr(Blocks, "update_b", fresh_fit)
            s2 = reference.step(x, y, idx=torch.arange(n))
        assert s1.loss == s2.loss and s1.info == s2.info, k
        _assert_same_method(fast, reference)
    assert hits["phi"] > 0 and hits["sq"] > 0 and hits["fit"] > 0, hits


@pytest.mark.parametrize("p", [(0.0, 0.0, 0.6), (0.3, 0.0, 0.6), (0.3, 0.3, 0.3)])
def test_exact_output_safeguard_values_are_the_objective_at_both_points(p: tuple[float, float, float]) -> None:
    """The exact output's W_L and b_L steps report the local objective at u^{k+1} and u^k (with p2 = 0 the latter is
    the value at the gradient point, taken from there): each equals a direct evaluation bit for bit."""
    g = torch.Generator().manual_seed(5)
    a, W, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((40, 4), (3, 4), (3,)))
    onehot = tF.one_hot(torch.arange(40) % 3, 3).to(torch.float64)
    meth = TIAM(_model(), output="exact", mu=0.7)
    meth.m_global = 40  # the batch size the b-step's metric divides by
    env = Blocks(meth, penalties_at(meth.config, 0), Counters()).env
    dW, db = 0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64), torch.full((3,), 0.05, dtype=torch.float64)

    def objective_w(u: Tensor) -> float:
        return float(ce_sum(a @ u.T + b, onehot)) + 0.5 * 0.7 * float(torch.linalg.vector_norm(u)) ** 2

    out, _ = exact_w_step(env, OutputFit(a, onehot, b), W, p, dW, None, 1e3)
    assert out is not None
    assert (out.f_new, out.f_old) == (objective_w(out.new), objective_w(W))
    P = a @ W.T
    out_b = exact_b_step(env, P, onehot, b, p, db, 0.5)
    assert out_b is not None
    assert (out_b.f_new, out_b.f_old) == (float(ce_sum(P + out_b.new, onehot)), float(ce_sum(P + b, onehot)))
