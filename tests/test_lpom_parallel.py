"""sync-LPOM and async-LPOM: schedules against their sequential references (docs/methods/lpom.md §11, oracle 9)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from liftkit.methods.lpom import LPOM
from liftkit.methods.lpom_parallel import LPOMAsync, LPOMSync

DT = torch.float64
WIDTHS = (6, 9, 8, 7, 4)


def make(cls, seed=0, widths=WIDTHS, **hp):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers).to(DT)
    return cls(model, **hp), model


def data(m=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, WIDTHS[0], generator=g, dtype=DT), torch.randint(0, WIDTHS[-1], (m,), generator=g)


def run(method, steps=3):
    x, y = data()
    return [method.step(x[i::2], y[i::2]) for i in range(2) for _ in range(steps)]


def assert_same_models(a: nn.Module, b: nn.Module, tol=0.0):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=tol, rtol=tol)


def test_sync_threads_equal_sequential_execution_of_the_same_schedule():
    par, m_par = make(LPOMSync, workers=3, momentum=0.5)
    seq, m_seq = make(LPOMSync, workers=1, momentum=0.5)
    run(par)
    run(seq)
    assert_same_models(m_par, m_seq, tol=1e-12)


def test_sync_phases_are_odd_then_even_paper_layers():
    method, _ = make(LPOMSync)
    assert method.phases() == [[2, 4], [1, 3]]  # paper layers i = k + 1: {3, 5} then {2, 4}


def test_sync_trains_and_differs_from_gauss_seidel():
    sync, m_sync = make(LPOMSync)
    serial, m_serial = make(LPOM)
    s = run(sync, steps=6)
    run(serial, steps=6)
    assert s[5].loss < s[0].loss
    assert not torch.allclose(m_sync[0].weight, m_serial[0].weight)


def test_async_simulator_zero_staleness_gamma_zero_equals_serial_lpom():
    schedule = {"x_sweep_order": "forward", "x_sweeps": 0, "x_iters": 5}  # the same X-schedule for both
    sim, m_sim = make(LPOMAsync, mode="simulate", staleness=0, gamma=0.0, x_tol=1e-300, **schedule)
    serial, m_serial = make(LPOM, x_tol=1e-300, **schedule)
    run(sim)
    run(serial)
    assert_same_models(m_sim, m_serial, tol=1e-13)


def test_async_simulator_zero_staleness_equals_sequential_threads_with_gamma():
    sim, m_sim = make(LPOMAsync, mode="simulate", staleness=0, gamma=0.7)
    thr, m_thr = make(LPOMAsync, mode="threads", workers=1, gamma=0.7)
    run(sim)
    run(thr)
    assert_same_models(m_sim, m_thr)


def test_async_proximal_bcd_does_not_increase_energy_without_staleness():
    method, _ = make(LPOMAsync, mode="simulate", staleness=0, gamma=1.0, x_iters=200, x_tol=1e-12)
    for stats in run(method):
        assert stats.info["energy"] <= stats.info["energy_init"] + 1e-9


def test_async_stale_simulator_and_threads_train():
    for hp in ({"mode": "simulate", "staleness": 2, "order": "random", "seed": 3}, {"workers": 2}):
        method, _ = make(LPOMAsync, **hp)
        stats = run(method, steps=8)
        assert stats[7].loss < stats[0].loss, hp  # the same batch, 8 steps apart
        if "workers" in hp:
            assert stats[-1].info["async_max_staleness"] <= 2


def test_gamma_grows_when_the_energy_rises_and_respects_the_cap():
    method, _ = make(LPOMAsync, mode="simulate", staleness=3, order="random", gamma=1e-3, gamma_growth=10.0)
    run(method, steps=5)
    assert method.gamma >= 1e-3


def test_conv_layers_are_rejected():
    with pytest.raises(ValueError, match="fully connected"):
        LPOMSync(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)))


@pytest.mark.parametrize("hp", [{"workers": 2}, {"workers": 3, "x_sweeps": 3},
                                {"mode": "simulate", "staleness": 2, "order": "random", "seed": 1}])
def test_async_w_barrier_commits_every_x_block_before_any_w_block(hp):
    """A W-block fitted to an X-block still in flight sees the forward value X = φ(U), so its step vanishes
    (the 2-point async loss measured before the barrier); with the barrier all X commits come first."""
    method, _ = make(LPOMAsync, **hp)
    log: list[str] = []
    original = method._commit

    def logged(block, store, result):
        log.append(block[0])
        original(block, store, result)

    method._commit = logged  # type: ignore[method-assign]
    x, y = data()
    for _ in range(4):
        log.clear()
        method.step(x, y)
        n_w = method.lifted.L
        assert log[-n_w:] == ["w"] * n_w and "w" not in log[:-n_w]


def test_async_simulated_w_blocks_behind_the_barrier_read_the_final_x():
    """Simulator, staleness 2, γ = 0: W-blocks read the committed X (the barrier), so the new weights are the
    W-phase of serial LPOM applied to the X that the stale X-phase produced."""
    method, _model = make(LPOMAsync, mode="simulate", staleness=2, gamma=0.0)
    x, y = data()
    captured = {}
    original = method._simulate

    def spy(seq, store, d, w_norms, info):
        n_x = sum(1 for b in seq if b[0] == "x")
        original(seq[:n_x], store, d, w_norms, info)  # the X-phase only
        captured["xs"] = list(store.xs)
        original(seq[n_x:], store, d, w_norms, info)

    method._simulate = spy  # type: ignore[method-assign]
    ws, bs = method.lifted.weights(), method.lifted.biases()
    ws, bs = [w.clone() for w in ws], [b.clone() for b in bs]
    method.step(x, y)
    xs = captured["xs"]
    c = method.config
    for j, lin in enumerate(method.lifted.linears):
        w_ref, b_ref = method.lifted.solve_w(j, xs[j], xs[j + 1], ws[j], bs[j], None, iters=c.w_iters,
                                             side=c.w_side, pinv=c.pinv, ridge_rel=c.ridge_rel,
                                             ridge_rel_feature=c.ridge_rel_feature)
        torch.testing.assert_close(lin.weight.detach(), w_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lin.bias.detach(), b_ref, atol=1e-12, rtol=1e-12)


def test_async_w_barrier_must_be_boolean():
    with pytest.raises(ValueError, match="w_barrier"):
        make(LPOMAsync, w_barrier="maybe")
