"""Fenchel's cost switches: the monitor cadence (``monitor_every``), the factorisation dtype of ``solve_dtype=auto``,
the float32 Cholesky's float64 fallback and the conv W-blocks' fast paths; each against the path it shortcuts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

import liftkit
from liftkit.activations import get_activation
from liftkit.data import load_dataset
from liftkit.methods import fenchel_wblocks, get
from liftkit.methods.fenchel import Fenchel
from liftkit.methods.fenchel_mm import spd_cholesky, spd_inverse
from liftkit.methods.fenchel_ops import _patch_columns, _patch_matrix
from liftkit.models import build_model, lenet5, mlp

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


# -- the conv W-blocks' fast paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(1, 6, 5, padding=2), (3, 1, 12, 12)),
        (nn.Conv2d(6, 4, 5), (2, 6, 9, 9)),
        (nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 3, 9, 8)),
        (nn.Conv2d(4, 4, 3, dilation=2), (2, 4, 9, 9)),
    ],
)
def test_patch_columns_are_the_transposed_patch_matrix(conv: nn.Conv2d, shape: tuple[int, ...]) -> None:
    conv = conv.to(DT)
    P = torch.randn(*shape, dtype=DT)
    cols = _patch_columns(conv, P)
    assert cols.is_contiguous()
    assert torch.equal(cols, _patch_matrix(conv, P, with_ones=True).T)
    buffer = torch.full_like(cols, float("nan"))
    assert _patch_columns(conv, P, out=buffer) is buffer and torch.equal(buffer, cols)
    offset = torch.randn(shape[0] + 1, *shape[1:], dtype=DT)[1:]  # a view that does not start its storage
    assert torch.equal(_patch_columns(conv, offset), _patch_matrix(conv, offset, with_ones=True).T)


def test_patch_columns_need_ungrouped_convs() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        _patch_columns(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("chunk_elements", [7 * 26, 1 << 20])
def test_chunked_conv_data_gradient_matches_autograd(monkeypatch: pytest.MonkeyPatch, chunk_elements: int) -> None:
    """weight·GᵀP̄ over column blocks of P̄ᵀ (ragged last block) is the autograd gradient of the penalty."""
    monkeypatch.setattr(fenchel_wblocks, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 5, padding=2).to(DT)
    act = get_activation("relu")
    P = torch.randn(3, 1, 10, 10, dtype=DT)
    target = torch.relu(torch.randn(3, 3, 10, 10, dtype=DT))
    W = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    value = 1.7 * act.penalty(tF.conv2d(P, W, b, padding=2), target).sum()
    gW, gb = torch.autograd.grad(value, (W, b))
    data_grad = fenchel_wblocks._conv_data_grad(act, _patch_columns(conv, P), target, 1.7)
    g = data_grad(torch.cat([W.detach().reshape(3, -1), b.detach()[:, None]], dim=1))
    assert torch.allclose(g, torch.cat([gW.reshape(3, -1), gb[:, None]], dim=1), rtol=1e-12, atol=1e-12)


def test_conv_w_blocks_take_the_same_steps_in_both_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unfolded (matrix) form and the convolution-kernel form of a conv ``mm`` W-block give the same weights."""
    solved = []
    for widest in (0, 10**6):  # every conv block by kernels, then every conv block unfolded
        monkeypatch.setattr(fenchel_wblocks, "_MATRIX_FORM_MAX_COLUMNS", widest)
        torch.manual_seed(0)
        meth = Fenchel(lenet5().to(DT), w_iters=4, w_tol=1e-14, rho_d=0.5, rho=0.2)
        x = torch.rand(3, 1, 28, 28, dtype=DT)
        y = torch.randint(0, 10, (3,))
        meth.step(x, y)
        solved.append([meth.chain[l].linear.weight.detach().clone() for l in (0, 1)])
    for a, b in zip(*solved):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
