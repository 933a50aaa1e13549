"""Model builders, spec strings and the layer-chain view."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from liftkit.models import as_chain, autoencoder, build_model, lenet5, mlp, parse_model_spec


def test_mlp_structure_and_output_activation():
    m = mlp("784-500-10")
    assert [type(x) for x in m] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    m = mlp([8, 16, 3], activation="tanh", output_activation="relu")
    assert [type(x) for x in m] == [nn.Flatten, nn.Linear, nn.Tanh, nn.Linear, nn.ReLU]
    assert m(torch.zeros(5, 2, 4)).shape == (5, 3)


def test_autoencoder_is_mirrored_and_reconstructs_the_input_shape():
    m = autoencoder("784-1000-500-250-30")
    widths = [x.out_features for x in m if isinstance(x, nn.Linear)]
    assert widths == [1000, 500, 250, 30, 250, 500, 1000, 784]
    assert isinstance(m[-1], nn.Sigmoid)
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 784)


def test_lenet5_shapes_and_average_pooling():
    m = lenet5()
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(isinstance(x, nn.AvgPool2d) for x in m) == 2
    assert not any(isinstance(x, nn.MaxPool2d) for x in m)


@pytest.mark.parametrize(
    ("text", "kind"), [("784-500-10", "mlp"), ("lenet5", "lenet5"), ("ae:784-30", "ae"), ("LeNet5", "lenet5")]
)
def test_parse_model_spec_round_trips(text, kind):
    spec = parse_model_spec(text)
    assert spec.kind == kind
    assert parse_model_spec(str(spec)) == spec


@pytest.mark.parametrize("bad", ["", "784", "784-x-10", "784-0-10", "ae:", "ae:abc"])
def test_bad_model_specs_are_clear_errors(bad):
    with pytest.raises(ValueError, match="spec"):
        parse_model_spec(bad)


def test_build_model_checks_sizes_and_is_seeded():
    a = build_model("64-32-10", input_shape=(1, 8, 8), num_classes=10, seed=7)
    b = build_model("64-32-10", input_shape=(1, 8, 8), num_classes=10, seed=7, output_activation="relu")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # the output activation has no parameters: same initial weights
    with pytest.raises(ValueError, match="input width"):
        build_model("63-10", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="classes"):
        build_model("64-9", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="activation"):
        build_model("64-10", input_shape=(1, 8, 8), num_classes=10, activation="gelu")
    m = build_model("64-10", input_shape=(1, 8, 8), num_classes=10, dtype=torch.float64)
    assert next(m.parameters()).dtype == torch.float64


def chain_forward(chain, x):
    for layer in chain:
        x = layer.forward(x)
    return x


def test_chain_view_of_an_mlp_reproduces_the_model():
    model = mlp("8-16-4-3", activation="leaky_relu")
    chain = as_chain(model, method="test")
    assert [c.activation.name if c.activation else None for c in chain] == ["leaky_relu", "leaky_relu", None]
    assert isinstance(chain[0].pre[0], nn.Flatten)
    x = torch.randn(5, 8)
    torch.testing.assert_close(chain_forward(chain, x), model(x))


def test_chain_view_folds_pooling_into_the_next_layer():
    model = lenet5()
    chain = as_chain(model, method="test", allow_conv=True)
    assert len(chain) == 5
    assert any(isinstance(m, nn.AvgPool2d) for m in chain[1].pre)
    assert any(isinstance(m, nn.Flatten) for m in chain[2].pre)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(chain_forward(chain, x), model(x))


@pytest.mark.parametrize(
    ("model", "kwargs", "needle"),
    [
        (nn.Sequential(nn.Linear(4, 3), nn.Dropout(), nn.Linear(3, 2)), {}, "module 1 (Dropout)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), {}, "module 0 (Conv2d)"),
        (nn.Sequential(nn.Linear(4, 3), nn.GELU()), {}, "GELU"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Tanh()), {}, "directly follow"),
        (nn.Sequential(nn.Linear(4, 3), nn.Tanh()), {"allowed_activations": ("relu",)}, "tanh"),
        (nn.Sequential(nn.Linear(4, 3, bias=False)), {"require_bias": True}, "bias"),
        (nn.Sequential(nn.ReLU()), {}, "activation must directly follow"),
        (nn.Linear(4, 3), {}, "nn.Sequential"),
        (nn.Sequential(nn.Linear(4, 3), nn.Flatten()), {}, "ends in Flatten"),
    ],
)
def test_chain_view_names_what_it_cannot_handle(model, kwargs, needle):
    with pytest.raises(ValueError, match="mymethod") as info:
        as_chain(model, method="mymethod", **kwargs)
    assert needle in str(info.value)
