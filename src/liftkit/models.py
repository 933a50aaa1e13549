"""Model builders and the layer-chain view used by the lifted methods.

Every builder but :func:`resnet8` returns an ordinary :class:`torch.nn.Sequential`; the methods train it in
place and hand the same module back, so inference is always the plain forward pass. ``resnet8`` is a residual
network (not a chain): ``sgd``, ``adam``, ``lbfgs`` and ``proxprop`` train it, the chain methods refuse it.

Spec strings (what ``--model`` takes):

* ``"784-500-10"``: an MLP (``Flatten``, then ``Linear``/activation pairs, the last ``Linear`` bare unless
  ``output_activation`` is given);
* ``"lenet5"``: LeNet-5 with average pooling (docs/methods/fenchel.md §3);
* ``"ae:784-1000-500-250-30"``: the mirrored autoencoder 784-1000-500-250-30-250-500-1000-784;
* ``"resnet8"``: a small residual network with BatchNorm (:func:`resnet8`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from liftkit.activations import ACTIVATIONS, Activation, activation_from_module, get_activation

__all__ = [
    "ChainLayer",
    "ModelSpec",
    "as_chain",
    "autoencoder",
    "build_model",
    "lenet5",
    "mlp",
    "parse_model_spec",
    "proxprop_convnet",
    "resnet8",
]

# Modules that are linear and parameter-free, so a lifted method can fold them into the next layer's linear map
# (e.g. LeNet-5's average pooling, docs/methods/fenchel.md §3).
_LINEAR_GLUE = (nn.Flatten, nn.AvgPool2d, nn.ZeroPad2d, nn.Identity)


def _parse_widths(text: str, what: str) -> list[int]:
    parts = text.split("-")
    try:
        widths = [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"invalid {what} spec {text!r}: expected widths separated by '-', e.g. 784-500-10"
        ) from None
    if len(widths) < 2 or any(w <= 0 for w in widths):
        raise ValueError(f"invalid {what} spec {text!r}: need at least two positive widths, e.g. 784-500-10")
    return widths


def _act_module(name: str | None) -> nn.Module | None:
    if name is None or name == "none":
        return None
    return get_activation(name).module()


def mlp(spec: str | Sequence[int], activation: str = "relu", output_activation: str | None = None) -> nn.Sequential:
    """A fully connected network ``Flatten -> (Linear -> act) * (L-1) -> Linear [-> output_activation]``.

    ``spec`` is ``"784-500-10"`` or a list of widths. ``activation`` names the hidden activation (one of
    :data:`liftkit.activations.ACTIVATIONS`). The output is bare logits unless ``output_activation`` is given;
    ``output_activation="hidden"`` repeats ``activation`` there (LPOM's papers apply the activation at the output
    too, docs/methods/lpom.md §2.1).
    """
    widths = _parse_widths(spec, "mlp") if isinstance(spec, str) else list(spec)
    if len(widths) < 2:
        raise ValueError("an mlp needs at least an input and an output width")
    if output_activation == "hidden":  # an identity output is a bare last layer
        output_activation = None if activation == "identity" else activation
    return _dense_stack(widths, activation, output_activation)


def _dense_stack(widths: Sequence[int], activation: str, output_activation: str | None) -> nn.Sequential:
    """``Flatten`` then a ``Linear`` per consecutive pair of widths, each followed by ``activation`` except the
    last, which gets ``output_activation`` (none when ``None``)."""
    modules: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        modules.append(nn.Linear(n_in, n_out))
        last = i == len(widths) - 2
        act = _act_module(output_activation if last else activation)
        if act is not None:
            modules.append(act)
    return nn.Sequential(*modules)


def lenet5(
    in_channels: int = 1, input_size: int = 28, num_classes: int = 10, activation: str = "relu"
) -> nn.Sequential:
    """LeNet-5 with average pooling, as in the Fenchel lifted networks code (docs/methods/fenchel.md §3).

    ``28x28`` inputs are zero-padded to ``32x32``; conv 6@5x5 -> act -> avgpool2 -> conv 16@5x5 -> act ->
    avgpool2 -> flatten (400) -> 120 -> act -> 84 -> act -> ``num_classes`` logits.
    """
    pad = (32 - input_size) // 2
    if input_size + 2 * pad != 32:
        raise ValueError(f"lenet5 expects 28x28 or 32x32 inputs, got {input_size}x{input_size}")
    layers: list[nn.Module] = []
    if pad:
        layers.append(nn.ZeroPad2d(pad))
    act = get_activation(activation)
    layers += [
        nn.Conv2d(in_channels, 6, 5),
        act.module(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5),
        act.module(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        act.module(),
        nn.Linear(120, 84),
        act.module(),
        nn.Linear(84, num_classes),
    ]
    return nn.Sequential(*layers)


def autoencoder(
    spec: str | Sequence[int], activation: str = "relu", output_activation: str | None = "sigmoid"
) -> nn.Sequential:
    """The mirrored autoencoder of ``spec`` (``"784-1000-500-250-30"`` gives 784-...-30-...-784).

    Every layer, the code layer included, applies ``activation`` so that each layer is a (linear map,
    activation) pair a lifted method can handle; the reconstruction passes through ``output_activation``
    (sigmoid by default, since pixels lie in [0, 1]; docs/methods/conventions.md §9.4).
    """
    enc = _parse_widths(spec, "autoencoder") if isinstance(spec, str) else list(spec)
    return _dense_stack(enc + enc[-2::-1], activation, output_activation)


_NAMED_MODELS = ("lenet5", "proxprop-convnet", "proxprop-convnet-paper", "resnet8")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` string."""

    kind: str  # "mlp", "ae" or a named model ("lenet5", "resnet8", ...)
    widths: tuple[int, ...] = ()

    @property
    def is_autoencoder(self) -> bool:
        return self.kind == "ae"

    def __str__(self) -> str:
        if self.kind in _NAMED_MODELS:
            return self.kind
        body = "-".join(str(w) for w in self.widths)
        return f"ae:{body}" if self.kind == "ae" else body


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``"784-500-10"``, ``"ae:784-1000-500-250-30"`` or a named model (``lenet5``, ``resnet8``...);
    ``ValueError`` otherwise."""
    text = text.strip()
    if text.lower() in _NAMED_MODELS:
        return ModelSpec(text.lower())
    if text.lower().startswith("ae:"):
        return ModelSpec("ae", tuple(_parse_widths(text[3:], "autoencoder")))
    return ModelSpec("mlp", tuple(_parse_widths(text, "model")))


def build_model(
    spec: str | ModelSpec,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    activation: str = "relu",
    output_activation: str | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build the model of a spec string for a dataset, checking that its input and output sizes fit.

    With ``seed`` the weights are drawn from a freshly seeded generator state, so every method of a benchmark
    starts from the same initial weights. ``output_activation`` applies to MLPs only (autoencoders end in a
    sigmoid; LeNet-5 in logits).
    """
    parsed = parse_model_spec(spec) if isinstance(spec, str) else spec
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    input_dim = 1
    for s in input_shape:
        input_dim *= int(s)
    fork = torch.random.fork_rng() if seed is not None else _nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        model: nn.Module
        if parsed.kind == "resnet8":
            if len(input_shape) != 3 or min(int(input_shape[1]), int(input_shape[2])) < 4:
                raise ValueError(f"resnet8 needs image inputs (C,H,W) of at least 4x4, got shape {tuple(input_shape)}")
            model = resnet8(int(input_shape[0]), num_classes)
        elif parsed.kind == "lenet5":
            if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
                raise ValueError(f"lenet5 needs square image inputs (C,H,W), got shape {tuple(input_shape)}")
            model = lenet5(int(input_shape[0]), int(input_shape[1]), num_classes, activation)
        elif parsed.kind in ("proxprop-convnet", "proxprop-convnet-paper"):
            if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
                raise ValueError(f"{parsed.kind} needs square image inputs (C,H,W), got shape {tuple(input_shape)}")
            model = proxprop_convnet(
                int(input_shape[0]), int(input_shape[1]), num_classes, third_pool=parsed.kind.endswith("-paper")
            )
        elif parsed.kind == "ae":
            if parsed.widths[0] != input_dim:
                raise ValueError(
                    f"autoencoder input width {parsed.widths[0]} does not match the data's {input_dim} features; "
                    f"use --model ae:{input_dim}-..."
                )
            model = autoencoder(parsed.widths, activation)
        else:
            if parsed.widths[0] != input_dim:
                raise ValueError(
                    f"model input width {parsed.widths[0]} does not match the data's {input_dim} features; "
                    f"use --model {input_dim}-...-{num_classes}"
                )
            if parsed.widths[-1] != num_classes:
                raise ValueError(
                    f"model output width {parsed.widths[-1]} does not match the data's {num_classes} classes; "
                    f"use --model {'-'.join(str(w) for w in parsed.widths[:-1])}-{num_classes}"
                )
            model = mlp(parsed.widths, activation, output_activation)
    return model.to(device=device, dtype=dtype)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class ChainLayer:
    """One (linear map, activation) pair of a :func:`as_chain` view.

    The layer computes ``act(linear(pre(x)))``. ``pre`` holds parameter-free linear glue (flatten, average
    pooling, zero padding) that a lifted method folds into the layer's linear operator (docs/methods/fenchel.md §3).
    ``activation`` is ``None`` for a bare output layer (logits).
    """

    index: int
    linear: nn.Linear | nn.Conv2d
    activation: Activation | None
    pre: list[nn.Module] = field(default_factory=list)
    activation_index: int | None = None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.linear, nn.Conv2d)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def apply_pre(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.pre:
            x = m(x)
        return x

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(pre(x))``: the layer's pre-activation for layer input ``x``."""
        return self.linear(self.apply_pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.preactivation(x)
        return u if self.activation is None else self.activation.phi(u)


def as_chain(
    model: nn.Module,
    *,
    method: str,
    allow_conv: bool = False,
    allowed_activations: Iterable[str] | None = None,
    require_bias: bool = False,
) -> list[ChainLayer]:
    """View an ``nn.Sequential`` as a chain of (linear map, activation) layers.

    Raises ``ValueError`` naming the first module ``method`` cannot handle: anything that is not a Linear
    (or Conv2d with ``allow_conv``), a known monotone activation, or parameter-free linear glue; two activations
    in a row; or an activation outside ``allowed_activations``.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{method} needs a chain of layers (an nn.Sequential model), got {type(model).__name__}; "
                         "residual models such as resnet8 train with proxprop, sgd, adam or lbfgs")
    allowed = None if allowed_activations is None else set(allowed_activations)
    chain: list[ChainLayer] = []
    pending_pre: list[nn.Module] = []
    for i, module in enumerate(model):
        where = f"module {i} ({type(module).__name__})"
        if isinstance(module, nn.Linear | nn.Conv2d):
            if isinstance(module, nn.Conv2d) and not allow_conv:
                raise ValueError(f"{method} cannot train {where}: it handles fully connected layers only")
            if require_bias and module.bias is None:
                raise ValueError(f"{method} needs a bias in {where}; build the layer with bias=True")
            chain.append(ChainLayer(index=i, linear=module, activation=None, pre=pending_pre))
            pending_pre = []
            continue
        if isinstance(module, _LINEAR_GLUE):
            if isinstance(module, nn.AvgPool2d | nn.ZeroPad2d) and not allow_conv:
                raise ValueError(f"{method} cannot train {where}: it handles fully connected layers only")
            pending_pre.append(module)
            continue
        try:
            act = activation_from_module(module)
        except ValueError as exc:
            raise ValueError(f"{method} cannot train {where}: {exc}") from None
        if act is None:
            raise ValueError(
                f"{method} cannot train {where}: only Linear{'/Conv2d' if allow_conv else ''} layers, "
                "monotone activations and flatten/pooling glue are supported"
            )
        if not chain or chain[-1].activation is not None or pending_pre:
            raise ValueError(f"{method} cannot train {where}: an activation must directly follow a linear layer")
        if allowed is not None and act.name not in allowed:
            raise ValueError(
                f"{method} does not support the {act.name} activation ({where}); "
                f"supported: {', '.join(sorted(allowed))}"
            )
        chain[-1].activation = act
        chain[-1].activation_index = i
    if pending_pre:
        raise ValueError(f"{method} cannot train a model that ends in {type(pending_pre[-1]).__name__}")
    if not chain:
        raise ValueError(f"{method} found no Linear layer in the model")
    return chain


def proxprop_convnet(
    in_channels: int = 3, input_size: int = 32, num_classes: int = 10, *, third_pool: bool = False
) -> nn.Sequential:
    """The ProxProp ConvNet (docs/methods/proxprop.md §6.3): three 5x5 convolutions with padding 2 (channels
    in -> 16 -> 20 -> 20), each followed by ReLU, max-pooling (2) after the first two, then one Linear to the
    logits (20*8*8 = 1280 inputs on 32x32 images): the official code's model (spec ``proxprop-convnet``).
    ``third_pool=True`` adds the paper's third max-pool (FC 320 -> 10 on CIFAR-10; spec
    ``proxprop-convnet-paper``). Default PyTorch init, U[-1/sqrt(fan_in), 1/sqrt(fan_in)], as in the paper.
    """
    side = input_size // 2 // 2
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 20, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 20, 5, padding=2),
        nn.ReLU(),
    ]
    if third_pool:
        layers.append(nn.MaxPool2d(2))
        side //= 2
    if side < 1:
        raise ValueError(f"proxprop_convnet needs inputs of at least {8 if third_pool else 4} pixels, got {input_size}")
    layers += [nn.Flatten(), nn.Linear(20 * side * side, num_classes)]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """conv3x3 → BN → ReLU → conv3x3 → BN, plus the shortcut (identity, or a strided 1x1 conv and BN when the
    shape changes), then ReLU (He, Zhang, Ren, Sun, CVPR 2016, option B shortcuts)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet8(nn.Module):
    """The CIFAR-style ResNet with n = 1 (6n + 2 = 8 weight layers): a conv3x3 stem with BN and ReLU, three
    stages of one basic block each (``width``, 2·``width``, 4·``width`` channels; the second and third halve the
    resolution with a projection shortcut), global average pooling and a Linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage1 = _BasicBlock(width, width, 1)
        self.stage2 = _BasicBlock(width, 2 * width, 2)
        self.stage3 = _BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(h), 1))


def resnet8(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> ResNet8:
    """A ResNet-8 (:class:`ResNet8`, spec ``resnet8``) for (C, H, W) image inputs of any size ≥ 4x4: residual
    connections and BatchNorm, so it is not a chain; ``proxprop`` trains it through
    :class:`liftkit.optim.ProxProp`'s hooks (every Conv2d proximal, the Linear head explicit)."""
    return ResNet8(in_channels, num_classes, width)
