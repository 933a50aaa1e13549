"""Fenchel's cost switches: the monitor cadence (``monitor_every``), the factorisation dtype of ``solve_dtype=auto``
and the float32 Cholesky's float64 fallback; each against the path it shortcuts."""

from __future__ import annotations

import json

import pytest
import torch

import liftkit
from liftkit.data import load_dataset
from liftkit.methods import get
from liftkit.methods.fenchel import Fenchel
from liftkit.methods.fenchel_mm import spd_cholesky, spd_inverse
from liftkit.models import build_model, mlp

DT = torch.float64
MONITORED = ("relaxed_objective", "loss_after", "penalty_l0", "penalty_l1")


def _case(dtype: torch.dtype = DT, **hp) -> tuple[Fenchel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = mlp("20-7-5-3").to(dtype)
    x = torch.randn(8, 20, dtype=dtype)  # fewer samples than inputs: the first W-block runs in the sample space
    y = torch.randint(0, 3, (8,))
    return Fenchel(model, **hp), x, y


def test_monitor_every_changes_only_the_reports() -> None:
    runs = []
    for every in (1, 3):
        meth, x, y = _case(monitor_every=every, alternations=2)
        infos = [meth.step(x, y).info for _ in range(5)]
        runs.append(([p.detach().clone() for p in meth.model.parameters()], infos))
    (params_1, infos_1), (params_3, infos_3) = runs
    for p, q in zip(params_1, params_3):
        assert torch.equal(p, q)  # the monitor never feeds the training
    for step, (full, sparse) in enumerate(zip(infos_1, infos_3)):
        assert set(MONITORED) <= set(full)
        if step % 3 == 0:  # steps 0 and 3: the same objective terms as monitoring every step
            for key in MONITORED:
                assert sparse[key] == pytest.approx(full[key], rel=1e-12)
        else:
            assert not set(MONITORED) & set(sparse)
        for key in ("x_iters_l1", "w_iters_l0", "w_norm_l2"):
            assert sparse[key] == full[key]


def test_monitor_full_follows_the_cadence() -> None:
    meth, x, y = _case(monitor_every=2, monitor="full")
    stats = meth.step(x, y)
    second = meth.step(x, y).info
    assert stats.info["relaxed_objective_after_x"] <= stats.loss  # the lower bound after the X-sweep
    assert "relaxed_objective_after_x" not in second


def test_an_unmonitored_step_still_catches_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    meth, x, y = _case(monitor_every=5)
    meth.step(x, y)  # step 0 is monitored; step 1 is not
    before = [p.detach().clone() for p in meth.model.parameters()]
    sweeps = Fenchel._sweeps

    def poisoned(self, xs, y, anchors, monitored=True):  # type: ignore[no-untyped-def]
        out = sweeps(self, xs, y, anchors, monitored)
        assert not monitored
        self.chain[1].linear.weight.data[0, 0] = float("nan")
        return out

    monkeypatch.setattr(Fenchel, "_sweeps", poisoned)
    with pytest.raises(FloatingPointError, match="restored"):
        meth.step(x, y)
    for p, q in zip(before, meth.model.parameters()):
        assert torch.equal(p, q)


def test_monitor_every_must_be_a_positive_integer() -> None:
    with pytest.raises(ValueError, match="monitor_every"):
        Fenchel(mlp("6-7-3").to(DT), monitor_every=0)


def test_epoch_diagnostics_average_over_the_steps_that_report_them(tmp_path) -> None:
    data = load_dataset("digits")
    model = build_model("64-16-10", input_shape=data.input_shape, num_classes=10, seed=0)
    torch.manual_seed(0)
    meth = get("fenchel")(model, monitor_every=4, alternations=1, x_iters=3, w_iters=2)
    reported: list[dict[str, float]] = []
    step = meth.step

    def recording_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        stats = step(*args, **kwargs)
        reported.append(dict(stats.info))
        return stats

    meth.step = recording_step  # type: ignore[method-assign]
    liftkit.fit(meth, data, epochs=1, batch_size=200, seed=0, progress=False, out_dir=tmp_path)
    info = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["info"]
    monitored = [r["relaxed_objective"] for r in reported if "relaxed_objective" in r]
    assert 1 <= len(monitored) < len(reported)
    assert info["relaxed_objective"] == pytest.approx(sum(monitored) / len(monitored), rel=1e-12)
    assert info["w_iters_l0"] == pytest.approx(sum(r["w_iters_l0"] for r in reported) / len(reported), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_factorises_in_the_model_dtype(dtype: torch.dtype) -> None:
    meth, x, _ = _case(dtype)
    assert meth._factor_dtype(x) == dtype
    named = Fenchel(mlp("6-7-3").to(dtype), solve_dtype="float64")
    assert named._factor_dtype(x) == torch.float64


def test_auto_steps_like_the_named_model_dtype() -> None:
    """A float32 model with ``auto`` takes exactly the steps of ``solve_dtype=float32``."""
    params = []
    for choice in ("auto", "float32"):
        meth, x, y = _case(torch.float32, solve_dtype=choice, alternations=2)
        for _ in range(2):
            meth.step(x, y)
        params.append([p.detach().clone() for p in meth.model.parameters()])
    for p, q in zip(*params):
        assert torch.equal(p, q)


def test_float32_cholesky_falls_back_to_float64_where_it_breaks_down() -> None:
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=DT))
    H = Q @ torch.diag(torch.logspace(0, -12, 40, dtype=DT)) @ Q.T  # SPD, far beyond float32's precision
    H = 0.5 * (H + H.T)
    assert int(torch.linalg.cholesky_ex(H.float())[1]) != 0  # float32 alone breaks down on it
    factor = spd_cholesky(H, torch.float32)
    assert factor.dtype == torch.float64
    assert torch.allclose(factor @ factor.T, H, atol=1e-14)
    well_posed = Q @ torch.diag(torch.linspace(1.0, 2.0, 40, dtype=DT)) @ Q.T
    inverse = spd_inverse(well_posed, torch.float32)
    assert inverse.dtype == torch.float32
    assert torch.allclose(inverse.double(), torch.linalg.inv(well_posed), atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):
        spd_cholesky(-well_posed, torch.float64)
