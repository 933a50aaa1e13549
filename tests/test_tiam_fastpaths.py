"""TIAM's fast paths against the reference path: a shuffled full batch is swept in dataset order (the same steps,
bit for bit, as the batch given in order), and what that order lets the method keep across steps."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from liftkit.methods.tiam import TIAM
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
