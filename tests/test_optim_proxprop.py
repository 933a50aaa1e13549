"""liftkit.optim.ProxProp against the proxprop method, dense least-squares proxes and the torch.optim protocol."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import liftkit
from liftkit.methods import get
from liftkit.models import build_model

DT = torch.float64


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4)).to(DT)


def _convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
    ).to(DT)


class _TinyResNet(nn.Module):
    """A residual block with BatchNorm between a strided, dilated, padded conv stem and a pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2, bias=True)
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(3, 4, 1, bias=True)
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.conv(h) + h)
        h = self.proj(h).mean(dim=(2, 3))
        return self.head(torch.tanh(self.hidden(h)))


def _tiny(seed: int = 0) -> _TinyResNet:
    torch.manual_seed(seed)
    return _TinyResNet().to(DT)


def _batch(n: int = 6, shape: tuple[int, ...] = (6,), classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _train_step(opt: liftkit.optim.ProxProp, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# -- one engine: bit-identical to the proxprop method on a chain ------------------------------------------


@pytest.mark.parametrize("build,shape,classes", [(_mlp, (6,), 4), (_convnet, (2, 6, 6), 5)])
@pytest.mark.parametrize("hparams", [
    {},
    {"solver": "cg3"},
    {"solver": "cg", "cg_iters": 4, "cg_stop": "fixed", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
     "nesterov": True},
    {"solver": "cg2", "cg_variant": "official", "tau_theta": 0.5},
    {"form": "push_through"},
])
def test_bit_identical_to_the_sequential_method(build, shape, classes, hparams: dict) -> None:
    method_model, loop_model = build(), build()
    method = get("proxprop")(method_model, **hparams)
    c = method.config
    opt = liftkit.optim.ProxProp(loop_model, c.optimizer, lr=c.lr, **{k: v for k, v in hparams.items()
                                 if k not in ("optimizer", "lr", "momentum", "nesterov")},
                                 **c.optimizer_kwargs())
    assert list(opt.prox_layers.values()) == [m for m in loop_model if isinstance(m, nn.Linear | nn.Conv2d)][:-1]
    for s in range(3):
        x, y = _batch(8, shape, classes, seed=s)
        method.step(x, y)
        _train_step(opt, loop_model, x, y)
        for p, q in zip(method_model.parameters(), loop_model.parameters()):
            assert torch.equal(p, q), s


def test_method_on_a_residual_model_is_the_optimizer() -> None:
    method_model, loop_model = _tiny(), _tiny()
    method = get("proxprop")(method_model, solver="cg3", optimizer="sgd", lr=0.2)
    opt = liftkit.optim.ProxProp(loop_model, "sgd", lr=0.2, solver="cg3", momentum=0.0, weight_decay=0.0)
    assert [str(layer.index) for layer in method.layers] == list(opt.prox_layers) == [
        "stem", "conv", "proj", "hidden"]
    for s in range(2):
        x, y = _batch(5, (2, 7, 7), 5, seed=s)
        stats = method.step(x, y)
        _train_step(opt, loop_model, x, y)
        for p, q in zip(method_model.parameters(), loop_model.parameters()):
            assert torch.equal(p, q)
    assert stats.info["cos_stem"] > 0 and stats.info["cg_iters_hidden"] >= 1


# -- each layer's update against a dense prox --------------------------------------------------------------


def _record(model: nn.Module, names: list[str]) -> tuple[dict, dict, list]:
    """Inputs and output gradients of the named modules, per call, independently of the optimizer."""
    inputs: dict[str, list] = {n: [] for n in names}
    outputs: dict[str, list] = {n: [] for n in names}
    modules = dict(model.named_modules())

    def hook(name: str):
        def fn(module, args, out):
            inputs[name].append(args[0].detach().clone())
            out.retain_grad()
            outputs[name].append(out)
        return fn

    return inputs, outputs, [modules[n].register_forward_hook(hook(n)) for n in names]


def _design(module: nn.Module, a: torch.Tensor) -> np.ndarray:
    """Ā: one row per output entry group (sample, or sample × output pixel), one column per input weight."""
    if isinstance(module, nn.Linear):
        rows = a.reshape(-1, module.in_features)
    else:
        P = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = P.transpose(1, 2).reshape(-1, P.shape[1])
    A = rows.numpy()
    return np.hstack([A, np.ones((A.shape[0], 1))]) if module.bias is not None else A


def _dense_prox_direction(module: nn.Module, a_list: list, z_list: list, tau_theta: float) -> np.ndarray:
    """Θ_old − argmin ½‖ĀΘ − (z − G)‖² + ‖Θ − Θ_old‖²/(2τ_θ), by numpy least squares on [Ā; I/√τ_θ]."""
    A = np.vstack([_design(module, a) for a in a_list])
    out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    T = np.vstack([(z.detach() - z.grad).permute(0, 2, 3, 1).reshape(-1, out).numpy()
                   if z.dim() == 4 else (z.detach() - z.grad).reshape(-1, out).numpy() for z in z_list])
    W = module.weight.detach().reshape(out, -1).numpy().T
    theta_old = np.vstack([W, module.bias.detach().numpy()[None]]) if module.bias is not None else W
    s = 1 / np.sqrt(tau_theta)
    stacked = np.vstack([A, s * np.eye(A.shape[1])])
    rhs = np.vstack([T, s * theta_old])
    theta, *_ = np.linalg.lstsq(stacked, rhs, rcond=None)
    return theta_old - theta


def _written_direction(module: nn.Module) -> np.ndarray:
    out = module.weight.shape[0]
    W = module.weight.grad.reshape(out, -1).numpy().T
    return np.vstack([W, module.bias.grad.numpy()[None]]) if module.bias is not None else W


@pytest.mark.parametrize("solver,tol", [("exact", 1e-10), ("cg", 1e-8)])
def test_each_layer_of_a_residual_batchnorm_model_takes_the_dense_prox(solver: str, tol: float) -> None:
    model, reference = _tiny(), _tiny()
    tau_theta = 0.3
    opt = liftkit.optim.ProxProp(model, "sgd", lr=0.1, tau_theta=tau_theta, solver=solver, cg_iters=300,
                                 cg_tol=1e-14, cg_eps=0.0)
    names = list(opt.prox_layers)
    assert names == ["stem", "conv", "proj", "hidden"]
    x, y = _batch(5, (2, 9, 9), 5)
    inputs, outputs, handles = _record(model, names)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    before = {n: copy.deepcopy(modules[n]) for n in names}
    opt.step()
    for n in names:
        expected = _dense_prox_direction(before[n], inputs[n], outputs[n], tau_theta)
        np.testing.assert_allclose(_written_direction(modules[n]), expected, rtol=tol, atol=tol)
    # BatchNorm and the explicit head keep their ordinary gradients
    F.cross_entropy(reference(x), y).backward()
    for n in ("bn", "head"):
        for p, q in zip(modules[n].parameters(), dict(reference.named_modules())[n].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_a_shared_module_stacks_its_calls() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 5)
            self.shared = nn.Linear(5, 5)
            self.out = nn.Linear(5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.inp(x))
            return self.out(torch.tanh(self.shared(torch.relu(self.shared(h)))))

    torch.manual_seed(0)
    model = Shared().to(DT)
    opt = liftkit.optim.ProxProp(model, "sgd", lr=0.1, tau_theta=0.4)
    x, y = _batch(7)
    inputs, outputs, handles = _record(model, ["shared"])
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    assert len(inputs["shared"]) == 2
    before = copy.deepcopy(model.shared)
    opt.step()
    expected = _dense_prox_direction(before, inputs["shared"], outputs["shared"], 0.4)
    np.testing.assert_allclose(_written_direction(model.shared), expected, rtol=1e-10, atol=1e-12)


def test_a_conv_called_on_two_sizes_is_a_clear_error() -> None:
    class TwoSizes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.head = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).mean(dim=(2, 3)) + self.conv(x[:, :, :4, :4]).mean(dim=(2, 3))
            return self.head(h)

    model = TwoSizes().to(DT)
    opt = liftkit.optim.ProxProp(model)
    x, y = _batch(3, (2, 6, 6), 3)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="'conv'"):
        opt.step()


def test_gradient_accumulation_is_one_stacked_batch() -> None:
    model, whole = _mlp(), _mlp()
    x, y = _batch(10)
    split = liftkit.optim.ProxProp(model, "sgd", lr=0.3, tau_theta=0.2, form="gram")
    joint = liftkit.optim.ProxProp(whole, "sgd", lr=0.3, tau_theta=0.2, form="gram")
    split.zero_grad()
    for part in (slice(0, 4), slice(4, 10)):  # sum losses: the same total as one sum-loss batch
        F.cross_entropy(model(x[part]), y[part], reduction="sum").backward()
    split.step()
    joint.zero_grad()
    F.cross_entropy(whole(x), y, reduction="sum").backward()
    joint.step()
    for p, q in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


# -- the torch.optim protocol -----------------------------------------------------------------------------


def test_a_scheduler_drives_the_base_learning_rate() -> None:
    model = _mlp()
    opt = liftkit.optim.ProxProp(model, "sgd", lr=0.8, tau_theta=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    x, y = _batch(8)
    _train_step(opt, model, x, y)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2) and opt.base.param_groups[0]["lr"] == pytest.approx(0.2)
    before = [p.detach().clone() for p in model.parameters()]
    _train_step(opt, model, x, y)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b - 0.2 * p.grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("base,kwargs", [("adam", {}), ("sgd", {"momentum": 0.9, "nesterov": True})])
def test_state_round_trip_gives_an_identical_next_step(base: str, kwargs: dict) -> None:
    model = _tiny()
    opt = liftkit.optim.ProxProp(model, base, lr=0.01, solver="cg2", **kwargs)
    for s in range(3):
        _train_step(opt, model, *_batch(4, (2, 7, 7), 5, seed=s))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    x, y = _batch(4, (2, 7, 7), 5, seed=9)
    _train_step(opt, model, x, y)
    clone = _tiny(seed=3)
    clone.load_state_dict(saved_model)
    clone_opt = liftkit.optim.ProxProp(clone, base, lr=0.5, solver="cg2", **kwargs)
    clone_opt.load_state_dict(saved_opt)
    assert clone_opt.param_groups[0]["lr"] == 0.01 and clone_opt.param_groups is clone_opt.base.param_groups
    _train_step(clone_opt, clone, x, y)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_zero_grad_and_closure() -> None:
    model = _mlp()
    opt = liftkit.optim.ProxProp(model, "sgd", lr=0.1)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) > 0


def test_hooks_record_only_in_training_with_autograd_and_are_removed() -> None:
    model = _mlp()
    opt = liftkit.optim.ProxProp(model)
    x, y = _batch()
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert not opt._records
    F.cross_entropy(model(x), y).backward()  # eval-mode backward: a gradient without a record
    with pytest.raises(RuntimeError, match="recorded forward pass"):
        opt.step()
    model.train()
    opt.remove_hooks()
    assert not any(m._forward_hooks for m in model.modules())
    opt2 = liftkit.optim.ProxProp(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2
    del opt2
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())


def test_explicit_layers_by_module_or_name() -> None:
    model = _tiny()
    opt = liftkit.optim.ProxProp(model, explicit=[model.proj, "hidden"])
    assert list(opt.prox_layers) == ["stem", "conv", "head"]
    assert list(liftkit.optim.ProxProp(model, explicit=[]).prox_layers) == ["stem", "conv", "proj", "hidden", "head"]


def test_frozen_layers_are_left_alone() -> None:
    model = _mlp()
    model[1].requires_grad_(False)
    before = model[1].weight.detach().clone()
    opt = liftkit.optim.ProxProp(model, "sgd", lr=0.5)
    _train_step(opt, model, *_batch())
    assert torch.equal(model[1].weight, before) and "3" in opt.last_stats and "1" not in opt.last_stats


@pytest.mark.parametrize("kwargs,match", [
    ({"base": "nope"}, "nope"),
    ({"base": "lbfgs"}, "lbfgs"),
    ({"tau_theta": 0.0}, "tau_theta"),
    ({"tau_theta": -1.0}, "tau_theta"),
    ({"explicit": [nn.Linear(2, 2)]}, "explicit layer Linear"),
    ({"explicit": ["fc9"]}, "'fc9'"),
    ({"explicit": [3]}, "explicit"),
    ({"solver": "lu"}, "solver"),
    ({"cg_variant": "aliased"}, "cg_variant"),
    ({"cg_iters": 0}, "cg_iters"),
    ({"form": "qr"}, "form"),
    ({"momentum": 0.9}, "Adam"),
])
def test_bad_arguments_raise_naming_them(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        liftkit.optim.ProxProp(_mlp(), **kwargs)


def test_grouped_conv_is_a_clear_error_unless_explicit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).to(DT)
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\): grouped"):
        liftkit.optim.ProxProp(model)
    opt = liftkit.optim.ProxProp(model, explicit=[model[0], model[2]])
    assert not opt.prox_layers
    _train_step(opt, model, *_batch(3, (2, 4, 4), 3))


def test_conv_options_valid_padding_and_unbatched_input() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2, stride=(2, 1), padding="valid", dilation=(1, 2), bias=True).to(DT)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(0), nn.Linear(3 * 2 * 2, 4)).to(DT)
    opt = liftkit.optim.ProxProp(model, "sgd", lr=0.1, tau_theta=0.7)
    x = torch.randn(2, 4, 4, dtype=DT)  # one unbatched sample
    inputs, outputs, handles = _record(model, ["0"])
    opt.zero_grad()
    F.cross_entropy(model(x).unsqueeze(0), torch.tensor([1])).backward()
    for h in handles:
        h.remove()
    before = copy.deepcopy(conv)
    before.padding = (0, 0)
    opt.step()
    a = [inputs["0"][0].unsqueeze(0)]
    z = outputs["0"][0]
    z4 = z.unsqueeze(0)
    z4.grad = z.grad.unsqueeze(0)
    expected = _dense_prox_direction(before, a, [z4], 0.7)
    np.testing.assert_allclose(_written_direction(conv), expected, rtol=1e-10, atol=1e-12)


# -- CG variants -------------------------------------------------------------------------------------------


def _official_cg(M: np.ndarray, b: np.ndarray, x0: np.ndarray, maxit: int, tol: float, eps: float) -> np.ndarray:
    """The published block CG written out: the search direction starts as the residual itself (aliased), so
    the in-place residual update also moves it."""
    X = x0.copy()
    R = b - M @ X
    P = R  # the alias
    rs_old = (R * R).sum(0)
    scale = rs_old.mean()
    k = 0
    while True:
        k += 1
        AP = M @ P
        alpha = rs_old / ((P * AP).sum(0) + eps)
        X += P * alpha
        if k == maxit:
            break
        R -= AP * alpha  # in place: P (still R on the first pass) moves too
        rs_new = (R * R).sum(0)
        if rs_new.max() < tol**2 * scale:
            break
        P = R + P * (rs_new / (rs_old + eps))
        rs_old = rs_new
    return X


@pytest.mark.parametrize("iters", [1, 2, 3, 6])
def test_cg_variants_against_dense_references(iters: int) -> None:
    model = _mlp()
    x, y = _batch(12)
    tau_theta = 0.5
    signals = {}
    textbook = get("proxprop")(model, solver=f"cg{iters}", tau_theta=tau_theta, cg_stop="fixed")
    official = get("proxprop")(model, solver=f"cg{iters}", tau_theta=tau_theta, cg_stop="fixed",
                               cg_variant="official")
    _, sig, _ = textbook.backward_signals(x, y)
    signals = dict(zip([layer.module for layer in textbook.layers], sig))
    for layer in textbook.layers:
        a, G = signals[layer.module]
        A = np.hstack([a.numpy(), np.ones((a.shape[0], 1))])
        M = A.T @ A + np.eye(A.shape[1]) / tau_theta
        W, b = layer.module.weight.detach().numpy(), layer.module.bias.detach().numpy()
        Z = np.vstack([W.T, b[None]])
        Y = A @ Z - G.numpy()
        # the official warm start x₀ = Θ_old on M X = AᵀY + βΘ_old; its direction is Θ_old − X
        X = _official_cg(M, A.T @ Y + Z / tau_theta, Z, iters, 1e-2, 1e-6)
        d_off = official.direction(layer.module, a, G)
        got = np.vstack([d_off.weight.numpy().T, d_off.bias.numpy()[None]])
        np.testing.assert_allclose(got, Z - X, rtol=1e-8, atol=1e-10)
        d_txt = textbook.direction(layer.module, a, G)
        txt = np.vstack([d_txt.weight.numpy().T, d_txt.bias.numpy()[None]])
        if iters == 1:
            np.testing.assert_allclose(txt, got, rtol=1e-12, atol=1e-14)
        else:
            assert not np.allclose(txt, got, rtol=1e-6, atol=1e-9)
    # textbook CG run long enough is the exact prox; the aliased iteration need not be
    long = get("proxprop")(model, solver="cg", cg_iters=200, cg_tol=1e-13, cg_eps=0.0, tau_theta=tau_theta)
    for layer in long.layers:
        a, G = signals[layer.module]
        A = np.hstack([a.numpy(), np.ones((a.shape[0], 1))])
        exact = np.linalg.solve(A.T @ A + np.eye(A.shape[1]) / tau_theta, A.T @ G.numpy())
        d = long.direction(layer.module, a, G)
        np.testing.assert_allclose(np.vstack([d.weight.numpy().T, d.bias.numpy()[None]]), exact, rtol=1e-8,
                                   atol=1e-11)


# -- the model zoo's resnet8 -------------------------------------------------------------------------------


def test_resnet8_shapes_and_methods() -> None:
    model = build_model("resnet8", input_shape=(1, 12, 12), num_classes=10, seed=0, dtype=DT)
    x = torch.randn(4, 1, 12, 12, dtype=DT)
    assert model(x).shape == (4, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9
    y = torch.randint(0, 10, (4,))
    method = get("proxprop")(model, solver="cg2")
    assert len(method.layers) == 9
    assert all(isinstance(v, float) for v in method.step(x, y).info.values())
    for name in ("sgd", "adam"):
        get(name)(model).step(x, y)
    for name in ("lpom", "fenchel", "sibp", "tiam"):
        with pytest.raises(ValueError, match="chain of layers"):
            get(name)(model)
    with pytest.raises(ValueError, match="resnet8"):
        build_model("resnet8", input_shape=(784,), num_classes=10)


def test_readme_snippet_runs() -> None:
    """The README's "ProxProp in your own training loop" block, executed as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart: ProxProp in your own training loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "opt.step()" in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    opt = scope["opt"]
    assert set(opt.last_stats) == set(opt.prox_layers) and len(opt.prox_layers) == 9


@pytest.mark.parametrize("variant", ["textbook", "official"])
def test_cg_last_iteration_quadratic_form_is_the_same_step(variant: str) -> None:
    from liftkit.solvers import block_cg

    g = torch.Generator().manual_seed(0)
    A = torch.randn(9, 5, generator=g, dtype=DT)
    rhs = torch.randn(5, 3, generator=g, dtype=DT)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return A.T @ (A @ v) + 0.7 * v

    def quadratic(v: torch.Tensor) -> torch.Tensor:
        return ((A @ v) ** 2).sum(0) + 0.7 * (v * v).sum(0)

    for maxit in (1, 2, 4):
        plain, n1 = block_cg(apply, rhs, torch.zeros_like(rhs), maxit, stop="fixed", variant=variant)
        short, n2 = block_cg(apply, rhs, torch.zeros_like(rhs), maxit, stop="fixed", variant=variant,
                             quadratic=quadratic)
        assert n1 == n2 == maxit
        torch.testing.assert_close(short, plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", ["cg2", "gradient"])
def test_grad_rhs_equals_recomputing_the_gradient(solver: str) -> None:
    x, y = _batch(5, (2, 7, 7), 5)
    results = []
    for grad_rhs in (True, False):
        model = _tiny()
        opt = liftkit.optim.ProxProp(model, "sgd", lr=0.1, solver=solver, grad_rhs=grad_rhs)
        _train_step(opt, model, x, y)
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_method_on_a_residual_model_is_single_process_and_handles_divergence() -> None:
    model = _tiny()
    method = get("proxprop")(model)
    assert method.single_process_only() is not None and "resnet8" in method.single_process_only()
    x, y = _batch(4, (2, 7, 7), 5)
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    stats = method.step(x, y)
    assert stats.info["diverged"] == 1.0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        method.step(bad, y)


def test_zero_grad_between_forward_and_backward_and_a_skipped_step() -> None:
    x, y = _batch(8)
    reference = _mlp()
    ref_opt = liftkit.optim.ProxProp(reference, "sgd", lr=0.3)
    _train_step(ref_opt, reference, x, y)
    # forward, then zero_grad, then backward: the pending calls survive zero_grad
    model = _mlp()
    opt = liftkit.optim.ProxProp(model, "sgd", lr=0.3)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    # a backward whose step is skipped (zero_grad instead) leaves nothing behind for the next step
    skipped = _mlp()
    skip_opt = liftkit.optim.ProxProp(skipped, "sgd", lr=0.3)
    F.cross_entropy(skipped(x[:3] * 5), y[:3]).backward()
    skip_opt.zero_grad()
    skipped(x[:2])  # a training-mode forward that never reaches a loss contributes nothing either
    _train_step(skip_opt, skipped, x, y)
    for p, q, r in zip(model.parameters(), skipped.parameters(), reference.parameters()):
        assert torch.equal(p, r) and torch.equal(q, r)


def test_named_blocks_inside_the_method() -> None:
    import contextlib

    seen: list[str] = []

    def hook(name: str):
        seen.append(name)
        return contextlib.nullcontext()

    for model, x_shape, classes, prox in ((_mlp(), (6,), 4, ["prox[1]", "prox[3]"]),
                                          (_tiny(), (2, 7, 7), 5, ["prox[stem]", "prox[hidden]"])):
        seen.clear()
        method = get("proxprop")(model, solver="cg2")
        method.set_block_hook(hook)
        method.step(*_batch(4, x_shape, classes))
        assert seen[0] == "forward_backward" and seen[-1] == "optimizer_step" and set(prox) <= set(seen)
