"""The linear operators of Fenchel's layers and the fast paths of their W-blocks (im2col patches, chunked Grams).

A chain layer's operator 𝒜 is its parameter-free glue (zero padding, 2×2 average pooling, flatten) followed by the
bias-free Linear or Conv2d; the lifted variable X_l is stored before the glue (LeNet-5 keeps it un-pooled). See
:mod:`liftkit.methods.fenchel` for the objective these operators enter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as tF
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight

from liftkit.methods.fenchel_mm import gram
from liftkit.models import ChainLayer
from liftkit.solvers import _start_vector, spectral_norm, spectral_norm_op, step_change_norms

__all__ = ["LayerOperator", "box_fista"]

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
            if _is_pool2(module, torch.empty((0, *in_shape), device="meta")):
                # adjoint of the 2×2 mean: each pooled value spread as ¼ over its window (strided writes)
                quarter, G = 0.25 * G, G.new_empty((batch, *in_shape))
                for i in (0, 1):
                    for j in (0, 1):
                        G[:, :, i::2, j::2] = quarter
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
        return self.glue_adjoint(self._linear_adjoint(G))

    def _linear_adjoint(self, G: Tensor) -> Tensor:
        lin = self.linear
        W = lin.weight.detach()
        if isinstance(lin, nn.Conv2d):
            return conv2d_input(
                (G.shape[0], *self.glued_shape), W, G, lin.stride, lin.padding, lin.dilation, lin.groups
            )
        return G @ W

    def adjoint_add_(self, out: Tensor, G: Tensor, alpha: float) -> Tensor:
        """out += alpha·𝒜ᵀ(G), in place. Behind a plain 2×2 average pooling (LeNet-5) the pooled gradient is
        added to every window by a broadcast view, without materialising the un-pooled adjoint."""
        P = self._linear_adjoint(G)
        if self._pool_then_flatten:
            m, C, H, W = out.shape
            pooled = P.reshape(m, C, H // 2, W // 2)
            for i in (0, 1):  # four strided adds: several times faster on the CPU than one broadcast add
                for j in (0, 1):
                    out[:, :, i::2, j::2].add_(pooled, alpha=0.25 * alpha)
            return out
        return out.add_(self.glue_adjoint(P), alpha=alpha)

    @functools.cached_property
    def _pool_then_flatten(self) -> bool:
        """Whether the glue is one plain 2×2 average pooling of an even-sized image, optionally then flattened."""
        pre = list(self.layer.pre)
        if not pre or len(self.sample_shape) != 3:
            return False
        if len(pre) == 2 and not isinstance(pre[1], nn.Flatten):
            return False
        return len(pre) <= 2 and _is_pool2(pre[0], torch.empty((0, *self.sample_shape), device="meta"))

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
        return self.norm_and_vector(iters)[0]

    def norm_and_vector(self, iters: int, start: Tensor | None = None, safety: float = 1.05) -> tuple[float, Tensor]:
        """‖𝒜‖₂ per sample by ``iters`` power iterations on 𝒜ᵀ𝒜 (×``safety``), and the last unit vector.

        Without ``start`` the iteration begins at the fixed pseudo-random vector of
        :func:`liftkit.solvers.spectral_norm_op` (and gives its estimate); with ``start`` (e.g. the previous
        batch's vector, for weights that moved little) far fewer iterations reach the same accuracy. Power
        iteration approaches ‖𝒜‖₂ from below, hence the safety factor.
        """
        W = self.linear.weight
        shape = (1, *self.sample_shape)
        if start is None or tuple(start.shape) != shape:
            start = _start_vector(shape, W.dtype, W.device)
        v = start.to(device=W.device, dtype=W.dtype)
        v = v / v.norm()
        tiny = torch.finfo(v.dtype).tiny
        for _ in range(iters):  # no host sync inside the loop; a zero operator drives v (and the norm) to 0
            w = self.adjoint(self.apply(v, with_bias=False))
            v = w / w.norm().clamp_min(tiny)
        return float(self.apply(v, with_bias=False).norm()) * float(safety), v


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


def _patch_matrix(conv: nn.Conv2d, P: Tensor, with_ones: bool = False, out: Tensor | None = None) -> Tensor:
    """The im2col matrix of ``conv`` on P: one row per (sample, output position), columns in the (C, kh, kw)
    order of ``weight.reshape(out, -1)``, so that ``conv(P; W)`` is ``patches @ W.reshape(out, -1).T``;
    ``with_ones`` appends a ones column (for the bias) in the same single copy.

    Built from strided views (zero padding first) rather than ``F.unfold``, which needs a second, transposing
    copy and was 2-4x slower on the CPU for LeNet-5's shapes; ``F.unfold`` remains for dilated or grouped convs.
    ``out`` may pass a buffer of the right shape to fill (with ``with_ones``): reusing one across steps avoids
    the page faults of a fresh tens-of-MB allocation, which cost as much as the copy itself on the CPU.
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
    shape = (m * Ho * Wo, fan_in + 1)
    if out is None or tuple(out.shape) != shape or out.dtype != P.dtype or out.device != P.device:
        out = torch.empty(shape, dtype=P.dtype, device=P.device)
    out[:, fan_in] = 1.0
    row = fan_in + 1
    out.as_strided(windows.shape, (Ho * Wo * row, Wo * row, row, kh * kw, kw, 1)).copy_(windows)
    return out


def _patch_columns(conv: nn.Conv2d, P: Tensor, out: Tensor | None = None) -> Tensor:
    """P̄ᵀ for ``conv`` on P: the transpose of ``_patch_matrix(conv, P, with_ones=True)``, stored contiguously as
    (C·kh·kw + 1) × (samples · output positions), the ones row last (groups=1).

    Row (c, i, j) of P̄ᵀ is the input channel c shifted by kernel offset (i, j) and sampled at every output position,
    so the copy reads and writes whole image rows at once; the row layout of :func:`_patch_matrix` copies runs of
    only kw elements and cost several times more on the CPU for LeNet-5's shapes. Products with P̄ run as well from
    this layout (BLAS takes either orientation), and a column slice of it is the P̄ of a block of rows.
    ``out`` may pass a buffer of the right shape to fill (see :func:`_patch_matrix`).
    """
    if conv.groups != 1:
        raise ValueError(f"the column patch layout needs groups=1, got groups={conv.groups}")
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    ph, pw = _pair(conv.padding)
    dh, dw = _pair(conv.dilation)
    if ph or pw:
        P = tF.pad(P, (pw, pw, ph, ph))
    P = P.contiguous()
    m, C, H, W = P.shape
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    fan_in = C * kh * kw
    shape = (fan_in + 1, m * Ho * Wo)
    if out is None or tuple(out.shape) != shape or out.dtype != P.dtype or out.device != P.device:
        out = torch.empty(shape, dtype=P.dtype, device=P.device)
    out[fan_in] = 1.0
    # element (c, i, j, n, a, b) of the source is P[n, c, a·sh + i·dh, b·sw + j·dw]
    src = P.as_strided((C, kh, kw, m, Ho, Wo), (H * W, dh * W, dw, C * H * W, sh * W, sw), P.storage_offset())
    out[:fan_in].view(C, kh, kw, m, Ho, Wo).copy_(src)
    return out


def _gram64(A: Tensor, chunk: int = 16384) -> Tensor:
    """AᵀA in float64 for a tall A: row chunks multiplied in A's dtype, accumulated in float64 (no float64 copy)."""
    return gram(A, torch.float64, chunk=chunk)


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def box_fista(
    descend_: Callable[[Tensor, Tensor], None],
    anchor: Tensor,
    keep: float,
    project_: Callable[[Tensor], Tensor],
    x0: Tensor,
    maxit: int,
    tol: float,
    sq_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int]:
    r"""Projected FISTA for ``f(X) = (α/2t)‖X − U‖² + S(X)`` over a box, with the constant parts fused.

    The X-blocks of ReLU / hardtanh layers have gradient ``2λ(X − U_prev) + ∇S(X)`` (F' is the identity on the
    C¹ extension), so with step t = 1/L and α = 2λt the gradient step is
    ``V − t∇f(V) = (1 − α)V + αU_prev − t∇S(V)``: ``anchor`` is αU_prev, ``keep`` is 1 − α and
    ``descend_(out, V)`` adds −t∇S(V) into ``out`` in place. The iterates, momentum and stopping test
    (‖ΔX‖ <= tol·‖X‖, norms summed by ``sq_sum`` over data-parallel processes) are those of
    :func:`liftkit.solvers.projected_fista`, with fewer passes over X per iteration. Returns (X, iterations).
    """
    x, v, s, it = x0, x0, 1.0, 0
    while it < maxit:
        x_new = torch.add(anchor, v, alpha=keep)
        descend_(x_new, v)
        project_(x_new)
        s_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * s * s))
        dx = x_new - x
        dnorm, xnorm = step_change_norms(dx, x, sq_sum)
        x, it = x_new, it + 1
        if dnorm <= tol * xnorm:
            break  # before the extrapolation, which a last iteration would only throw away
        v = torch.add(x_new, dx, alpha=(s - 1.0) / s_new)
        s = s_new
    return x, it
