"""The method contract, run over the contract-test database (``tests/method_db.py``).

For every registered method and every configuration the database lists:

* the declared loss decreases on a tiny problem;
* a state-dict round trip continues bit-identically (into a model with different initial weights);
* the user's model goes in and the same module comes out trained;
* every invalid configuration raises ``ValueError`` matching its message;
* unknown keys, non-finite values and unsupported losses are rejected for every field, generically.

The first two run on every device of the ``device`` fixture (the CPU, and CUDA where present): every tensor a
method creates must follow the model's device.
"""

from __future__ import annotations

import dataclasses
import io
import math
import typing

import pytest
import torch

from liftkit.methods import MethodConfig, available, evaluate_loss, get
from liftkit.models import build_model
from tests.conftest import tiny_classification
from tests.method_db import DATABASE, missing_methods

METHODS = available()
VARIANTS = [
    pytest.param(info.name, variant, id=f"{info.name}-{variant.id or 'defaults'}")
    for info in DATABASE
    for variant in info.variants
]
INVALID = [
    pytest.param(info.name, bad, id=f"{info.name}-{'-'.join(map(str, bad.hparams))}-{k}")
    for info in DATABASE
    for k, bad in enumerate(info.invalid)
]


def make(name: str, hparams: dict | None = None, seed: int = 0, device: torch.device | str = "cpu"):
    cls = get(name)
    model = build_model(
        "8-16-3",
        input_shape=(8,),
        num_classes=3,
        output_activation=cls.model_output_activation,
        seed=seed,
        dtype=torch.float64,
        device=torch.device(device),
    )
    return cls(model, **(hparams or {})), model


def batches(name: str, n: int, device: torch.device | str = "cpu"):
    bs = get(name).default_batch_size
    bs = n if bs == 0 else min(32, bs)
    return [torch.arange(i, min(i + bs, n), device=device) for i in range(0, n, bs)]


def test_every_registered_method_has_a_database_entry():
    assert missing_methods() == []


def test_registry_lists_the_baselines():
    assert {"sgd", "adam", "lbfgs"} <= set(METHODS)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'nope'.*available"):
        get("nope")


@pytest.mark.parametrize("name, variant", VARIANTS)
def test_loss_decreases_on_tiny_problem(name, variant, device):
    x, y = (t.to(device) for t in tiny_classification())
    method, model = make(name, variant.hparams, device=device)
    with torch.no_grad():
        before = float(evaluate_loss(method.loss, model(x), y))
    for _ in range(8):
        for idx in batches(name, x.shape[0]):
            stats = method.step(x[idx], y[idx], idx=idx)
            assert math.isfinite(stats.loss)
    with torch.no_grad():
        after = float(evaluate_loss(method.loss, model(x), y))
    assert after < variant.shrink * before, f"{name} {variant.hparams}: loss {before:.4f} -> {after:.4f}"
    assert method.model is model


@pytest.mark.parametrize("name, variant", VARIANTS)
def test_state_dict_round_trip_gives_identical_next_step(name, variant, device):
    x, y = (t.to(device) for t in tiny_classification())
    idxs = batches(name, x.shape[0], device)
    first, _ = make(name, variant.hparams, seed=0, device=device)
    for idx in idxs[:2]:
        first.step(x[idx], y[idx], idx=idx)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)

    # different initial weights: all must come from the state
    second, _ = make(name, variant.hparams, seed=123, device=device)
    second.load_state_dict(state)
    for nxt in (idxs[-1], idxs[0]):
        s1 = first.step(x[nxt], y[nxt], idx=nxt)
        s2 = second.step(x[nxt], y[nxt], idx=nxt)
        assert s1.loss == s2.loss and s1.info == s2.info
    for (k, p1), p2 in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(p1, p2), f"{name}: parameter {k} differs after the round trip"


@pytest.mark.parametrize("name, bad", INVALID)
def test_invalid_configuration_raises_its_message(name, bad):
    with pytest.raises(ValueError, match=bad.message):
        make(name, bad.hparams)


def _invalid_values(tp) -> list:
    origin = typing.get_origin(tp)
    if tp is float or (origin is not None and float in typing.get_args(tp)):
        return [float("nan"), float("inf")]
    if tp is int:
        return [-10**6]
    if tp is str or origin is typing.Literal:
        return ["no-such-choice"]
    return []


@pytest.mark.parametrize("name", METHODS)
def test_non_finite_and_out_of_range_values_raise_naming_the_field(name):
    cls = get(name)
    config_cls: type[MethodConfig] = cls.Config
    hints = typing.get_type_hints(config_cls)
    checked = 0
    for f in dataclasses.fields(config_cls):
        for bad in _invalid_values(hints[f.name]):
            model = build_model("8-16-3", input_shape=(8,), num_classes=3)
            with pytest.raises(ValueError, match=f.name):
                cls(model, **{f.name: bad})
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", METHODS)
def test_unsupported_loss_is_rejected(name):
    cls = get(name)
    model = build_model("8-16-3", input_shape=(8,), num_classes=3, output_activation=cls.model_output_activation)
    with pytest.raises(ValueError, match="loss"):
        cls(model, loss="hinge")
