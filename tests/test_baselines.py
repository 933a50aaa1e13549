"""Baselines: behaviour beyond the registry matrix."""

from __future__ import annotations

import torch

from liftkit.methods import get
from liftkit.models import build_model
from tests.conftest import tiny_classification


def test_lbfgs_restarts_from_steepest_descent_after_a_null_step():
    x, y = tiny_classification()
    model = build_model("8-16-3", input_shape=(8,), num_classes=3, seed=0, dtype=torch.float64)
    method = get("lbfgs")(model)
    for _ in range(2):
        method.step(x, y)
    real_step = method.optimizer.step
    history_sizes = []

    def stalls_once(closure):
        # The first call behaves like a line search that returns t = 0: it evaluates but moves nothing.
        history_sizes.append(len(method.optimizer.state))
        if len(history_sizes) == 1:
            return closure()
        return real_step(closure)

    method.optimizer.step = stalls_once  # type: ignore[method-assign]
    before = [p.detach().clone() for p in model.parameters()]
    stats = method.step(x, y)
    assert stats.info["restarts"] == 1.0
    assert history_sizes == [1, 0]  # the curvature history existed, and was cleared before the retry
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_lbfgs_restart_can_be_switched_off():
    x, y = tiny_classification()
    model = build_model("8-16-3", input_shape=(8,), num_classes=3, seed=0, dtype=torch.float64)
    method = get("lbfgs")(model, restart_on_stall=False)
    method.optimizer.step = lambda closure: closure()  # type: ignore[method-assign]
    before = [p.detach().clone() for p in model.parameters()]
    stats = method.step(x, y)
    assert "restarts" not in stats.info or stats.info["restarts"] == 0.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
