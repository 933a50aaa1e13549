"""The linear operators of Fenchel's layers and the fast paths of their W-blocks (im2col patches, chunked Grams).

A chain layer's operator 𝒜 is its parameter-free glue (zero padding, 2×2 average pooling, flatten) followed by the
bias-free Linear or Conv2d; the lifted variable X_l is stored before the glue (LeNet-5 keeps it un-pooled). See
:mod:`liftkit.methods.fenchel` for the objective these operators enter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as tF
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight

from liftkit.models import ChainLayer
from liftkit.solvers import spectral_norm, spectral_norm_op

__all__ = ["LayerOperator"]

class LayerOperator:
    """The linear operator 𝒜 of one chain layer: its parameter-free glue, then the bias-free Linear/Conv2d.

    ``apply`` and ``adjoint`` satisfy ⟨𝒜X, V⟩ = ⟨X, 𝒜ᵀV⟩ (glue adjoints by autograd, Linear by ``G W``, Conv2d by
    ``conv2d_input``); ``weight_grad`` gives the (W, b) gradient of ⟨G, 𝒜(X; W) + b⟩ from the glued input.
    """

    def __init__(self, layer: ChainLayer, sample_shape: Sequence[int]) -> None:
        self.layer = layer
        self.linear = layer.linear
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if isinstance(self.linear, nn.Conv2d) and isinstance(self.linear.padding, str):
            raise ValueError(
                f"fenchel cannot train module {layer.index} (Conv2d with padding={self.linear.padding!r}); "
                "give the padding as integers"
            )
        if isinstance(self.linear, nn.Conv2d) and self.linear.padding_mode != "zeros":
            raise ValueError(
                f"fenchel cannot train module {layer.index} (Conv2d with padding_mode="
                f"{self.linear.padding_mode!r}); use padding_mode='zeros'"
            )
        # per-sample shapes entering and leaving every glue module (their adjoints need both)
        self.glue_shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        with torch.no_grad():
            glued = torch.zeros((1, *self.sample_shape), dtype=self.linear.weight.dtype,
                                device=self.linear.weight.device)
            for module in layer.pre:
                before = tuple(glued.shape[1:])
                glued = module(glued)
                self.glue_shapes.append((before, tuple(glued.shape[1:])))
            self.glued_shape = tuple(glued.shape[1:])
            self.out_shape = tuple(self.linear(glued).shape[1:])

    @property
    def is_conv(self) -> bool:
        return isinstance(self.linear, nn.Conv2d)

    def glue(self, X: Tensor) -> Tensor:
        for module in self.layer.pre:
            X = _pool2_sum(X) if _is_pool2(module, X) else module(X)
        return X

    def glue_adjoint(self, G: Tensor) -> Tensor:
        batch = G.shape[0]
        for module, (in_shape, out_shape) in zip(reversed(self.layer.pre), reversed(self.glue_shapes)):
            if isinstance(module, nn.Flatten):
                continue  # the reshape below restores every flattened shape at once
            G = G.reshape(batch, *out_shape)
            if _is_pool2(module, torch.empty((0, *in_shape))):
                # adjoint of the 2×2 mean: each pooled value spread as ¼ over its window
                G = (0.25 * G)[:, :, :, None, :, None].expand(*G.shape[:3], 2, G.shape[3], 2).reshape(batch, *in_shape)
            else:
                G = _module_adjoint(module, G, in_shape)
        return G.reshape(batch, *self.sample_shape)

    def linear_apply(self, P: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        lin = self.linear
        if isinstance(lin, nn.Conv2d):
            return tF.conv2d(P, weight, bias, lin.stride, lin.padding, lin.dilation, lin.groups)
        return tF.linear(P, weight, bias)

    def apply(self, X: Tensor, with_bias: bool = True) -> Tensor:
        """𝒜(X) (+ b): the layer's pre-activation for the stored layer input X."""
        bias = self.linear.bias.detach() if with_bias and self.linear.bias is not None else None
        # the weights are constants of every X-block: no autograd graph through them
        return self.linear_apply(self.glue(X), self.linear.weight.detach(), bias)

    def adjoint(self, G: Tensor) -> Tensor:
        """𝒜ᵀ(G) for G of the pre-activation's shape, returned in the stored layer input's shape."""
        lin = self.linear
        W = lin.weight.detach()
        batch = G.shape[0]
        if isinstance(lin, nn.Conv2d):
            P = conv2d_input(
                (batch, *self.glued_shape), W, G, lin.stride, lin.padding, lin.dilation, lin.groups
            )
        else:
            P = G @ W
        return self.glue_adjoint(P)

    def weight_grad(self, P: Tensor, G: Tensor) -> tuple[Tensor, Tensor | None]:
        """Gradient of ⟨G, linear(P; W) + b⟩ in (W, b), for the glued input P."""
        lin = self.linear
        if isinstance(lin, nn.Conv2d):
            gW = conv2d_weight(P, lin.weight.shape, G, lin.stride, lin.padding, lin.dilation,
                                             lin.groups)
            gb = G.sum(dim=(0, 2, 3)) if lin.bias is not None else None
        else:
            G2 = G.reshape(-1, G.shape[-1])
            gW = G2.T @ P.reshape(-1, P.shape[-1])
            gb = G2.sum(dim=0) if lin.bias is not None else None
        return gW, gb

    def data_norm(self, P: Tensor, iters: int, reduce: Callable[[Tensor], Tensor] | None = None) -> float:
        """‖θ ↦ linear(P; θ)‖₂ for θ = (W, b) and the glued input P: the curvature scale of the W-blocks.

        The map acts on every output channel alike, so its norm is that of one output channel: ‖[P, 1]‖₂ for a
        Linear layer, the norm of the single-output-channel convolution with bias for a Conv2d (an upper bound
        for grouped convolutions). ``reduce`` sums over data-parallel processes when P holds this process's
        samples (the power iteration's adjoint and final norm are then all-reduced).
        """
        lin = self.linear
        if isinstance(lin, nn.Conv2d):
            kh, kw = lin.weight.shape[2:]
            n_in = lin.in_channels
            size = n_in * kh * kw

            def apply(t: Tensor) -> Tensor:
                w = t[:size].reshape(1, n_in, kh, kw)
                return tF.conv2d(P, w, t[size:], lin.stride, lin.padding, lin.dilation)

            def adjoint(g: Tensor) -> Tensor:
                gw = conv2d_weight(P, (1, n_in, kh, kw), g, lin.stride, lin.padding, lin.dilation)
                out = torch.cat([gw.reshape(-1), g.sum().reshape(1)])
                return out if reduce is None else reduce(out)

            return spectral_norm_op(
                apply, adjoint, (size + 1,), iters, dtype=P.dtype, device=P.device, out_sum=reduce
            )
        P2 = P.reshape(-1, P.shape[-1])
        P_bar = torch.cat([P2, torch.ones_like(P2[:, :1])], dim=1)
        if reduce is None:
            return spectral_norm(P_bar, iters)
        return spectral_norm_op(
            lambda v: P_bar @ v, lambda y: reduce(P_bar.T @ y), (P_bar.shape[1],), iters, dtype=P_bar.dtype,
            device=P_bar.device, out_sum=reduce,
        )

    def bias_view(self, b: Tensor) -> Tensor:
        return b.view(1, -1, 1, 1) if self.is_conv else b

    def norm(self, iters: int) -> float:
        """‖𝒜‖₂ per sample (the operator acts on each sample alike), by power iteration ×1.05."""
        W = self.linear.weight
        return spectral_norm_op(
            lambda v: self.apply(v, with_bias=False),
            self.adjoint,
            (1, *self.sample_shape),
            iters,
            dtype=W.dtype,
            device=W.device,
        )


def _is_pool2(module: nn.Module, X: Tensor) -> bool:
    """Whether ``module`` is LeNet-5's plain 2×2 / stride-2 average pooling on even-sized 4-D input X."""
    return (
        isinstance(module, nn.AvgPool2d)
        and _pair(module.kernel_size) == [2, 2]
        and _pair(module.stride if module.stride is not None else module.kernel_size) == [2, 2]
        and _pair(module.padding) == [0, 0]
        and module.divisor_override is None
        and X.ndim == 4
        and X.shape[2] % 2 == 0
        and X.shape[3] % 2 == 0
    )


def _pool2_sum(X: Tensor) -> Tensor:
    """2×2 / stride-2 average pooling by strided slices: 2-3x faster than ``avg_pool2d`` on the CPU here."""
    rows = X[:, :, 0::2] + X[:, :, 1::2]
    return 0.25 * (rows[..., 0::2] + rows[..., 1::2])


def _module_adjoint(module: nn.Module, G: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """Adjoint of one linear, parameter-free glue module (exact: the module is linear).

    Average pooling uses its backward kernel directly (the input values are never read, only its shape); other
    glue goes through autograd at zero.
    """
    batch = G.shape[0]
    if isinstance(module, nn.AvgPool2d):
        shape_only = torch.zeros((), dtype=G.dtype, device=G.device).expand(batch, *in_shape)
        return torch.ops.aten.avg_pool2d_backward(
            G, shape_only, _pair(module.kernel_size),
            _pair(module.stride if module.stride is not None else module.kernel_size), _pair(module.padding),
            module.ceil_mode, module.count_include_pad, module.divisor_override,
        )
    with torch.enable_grad():
        z = torch.zeros((batch, *in_shape), dtype=G.dtype, device=G.device, requires_grad=True)
        (g,) = torch.autograd.grad(module(z), z, G)
    return g


def _patch_matrix(conv: nn.Conv2d, P: Tensor, with_ones: bool = False) -> Tensor:
    """The im2col matrix of ``conv`` on P: one row per (sample, output position), columns in the (C, kh, kw)
    order of ``weight.reshape(out, -1)``, so that ``conv(P; W)`` is ``patches @ W.reshape(out, -1).T``;
    ``with_ones`` appends a ones column (for the bias) in the same single copy.

    Built from strided views (zero padding first) rather than ``F.unfold``, which needs a second, transposing
    copy and was 2-4x slower on the CPU for LeNet-5's shapes; ``F.unfold`` remains for dilated or grouped convs.
    """
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    ph, pw = _pair(conv.padding)
    if tuple(_pair(conv.dilation)) != (1, 1) or conv.groups != 1:
        patches = tF.unfold(P, (kh, kw), conv.dilation, (ph, pw), (sh, sw)).transpose(1, 2)
        flat = patches.reshape(-1, patches.shape[2])
        return torch.cat([flat, torch.ones_like(flat[:, :1])], dim=1) if with_ones else flat
    if ph or pw:
        P = tF.pad(P, (pw, pw, ph, ph))
    windows = P.unfold(2, kh, sh).unfold(3, kw, sw).permute(0, 2, 3, 1, 4, 5)  # m, Ho, Wo, C, kh, kw
    m, Ho, Wo, C = windows.shape[:4]
    fan_in = C * kh * kw
    if not with_ones:
        return windows.reshape(-1, fan_in)
    out = torch.empty((m * Ho * Wo, fan_in + 1), dtype=P.dtype, device=P.device)
    out[:, fan_in] = 1.0
    row = fan_in + 1
    out.as_strided(windows.shape, (Ho * Wo * row, Wo * row, row, kh * kw, kw, 1)).copy_(windows)
    return out


def _gram64(A: Tensor, chunk: int = 16384) -> Tensor:
    """AᵀA in float64 for a tall A: row chunks multiplied in A's dtype, accumulated in float64.

    A float64 copy of LeNet-5's conv1 patch matrix (392 000 × 26) costs 10x more than this; each chunk's float32
    Gram carries a relative error ~1e-7, far below the ρ_d shift that the Cholesky factor relies on.
    """
    G = torch.zeros((A.shape[1], A.shape[1]), dtype=torch.float64, device=A.device)
    for start in range(0, A.shape[0], chunk):
        block = A[start:start + chunk]
        G += (block.T @ block).to(torch.float64)
    return G


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]
