"""fastformer.convert: what it must leave alone, and that its report says what it did.

A torch.nn Transformer layer whose behaviour fastformer's layer would not keep (a child of
another class, a hook or a parametrization on it or anything under it) stays torch's, is
listed with the reason, and gives torch's outputs and gradients; what is converted is
exactly what the report lists.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch

import fastformer
from fastformer import nn as fnn
from tests.conftest import requires_extension

pytestmark = requires_extension

# The module (fastformer.nn.convert is also the name of the function it defines).
convert_module = importlib.import_module("fastformer.nn.convert")

D_MODEL, HEADS, FF = 16, 4, 24
BATCH, SRC, TGT = 2, 5, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def _outputs_and_grads(model: torch.nn.Module, *inputs: torch.Tensor) -> dict:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    model.zero_grad(set_to_none=True)
    out = model(*leaves)
    # Not out.square().sum(): through a final LayerNorm that is constant, and its gradients
    # are rounding noise.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    results = {"output": out.detach()}
    results.update({f"grad of input {i}": x.grad for i, x in enumerate(leaves)})
    results.update({f"grad of {n}": p.grad for n, p in model.named_parameters()})
    return results


def _assert_report_is_accurate(model: torch.nn.Module, report) -> None:
    """Every fastformer module in the model is listed as converted, every torch.nn module
    convert knows (or subclass of one) as left alone, and nothing else is listed."""
    converted = {name for name, _ in report.converted}
    skipped = {name for name, _ in report.skipped}
    found_converted, found_skipped = set(), set()
    for name, module in model.named_modules():
        if type(module).__module__.startswith("fastformer.nn"):
            found_converted.add(name)
        elif isinstance(module, tuple(convert_module._CONVERTERS)):
            found_skipped.add(name)
    assert found_converted == converted
    assert found_skipped == skipped


class _ScaledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2.0


class _OtherNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(D_MODEL))

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True) * self.weight


class _LoRALinear(torch.nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.lora_a = torch.nn.Parameter(torch.zeros(2, in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_features, 2))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.T @ self.lora_b.T


class _Doubled(torch.nn.Module):
    def forward(self, x):
        return 2.0 * x


def _hook(calls: list, label: str):
    def hook(module, args, out):
        calls.append(label)
        if isinstance(out, tuple):  # MultiheadAttention: (output, weights)
            return out[0] * 1.5, out[1]
        return out * 1.5

    return hook


# Each case changes a torch layer (after its parameters are randomized), returns the hook
# calls it records, and names what the skip reason must mention.
def _subclassed_norm(layer):
    layer.norm2 = _ScaledLayerNorm(D_MODEL)
    return [], "norm2 is a _ScaledLayerNorm"


def _other_norm(layer):
    layer.norm1 = _OtherNorm()
    return [], "norm1 is a _OtherNorm"


def _lora_linear(layer):
    layer.linear1 = _LoRALinear(D_MODEL, FF)
    _randomize(layer.linear1)
    return [], "linear1 is a _LoRALinear"


def _other_dropout(layer):
    layer.dropout1 = _Doubled()
    return [], "dropout1 is a _Doubled"


def _hooked_children(layer):
    calls = []
    layer.self_attn.register_forward_hook(_hook(calls, "self_attn"))
    layer.norm1.register_forward_hook(_hook(calls, "norm1"))
    layer.linear2.register_forward_hook(_hook(calls, "linear2"))
    return calls, "forward hooks"


def _hooked_linear_only(layer):
    calls = []
    layer.linear2.register_forward_hook(_hook(calls, "linear2"))
    return calls, "linear2 has forward hooks"


def _backward_hook(layer):
    calls = []
    layer.linear1.register_full_backward_hook(lambda *args: calls.append("linear1"))
    return calls, "linear1 has backward hooks"


def _weight_norm(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of the hook-based weight_norm
        torch.nn.utils.weight_norm(layer.linear1)
    return [], "linear1 has forward pre-hooks (WeightNorm)"


def _parametrized(layer):
    torch.nn.utils.parametrize.register_parametrization(layer.linear2, "weight", _Doubled())
    return [], "linear2 has parametrizations"


@pytest.mark.parametrize(
    "change",
    [
        _subclassed_norm,
        _other_norm,
        _lora_linear,
        _other_dropout,
        _hooked_children,
        _hooked_linear_only,
        _backward_hook,
        _weight_norm,
        _parametrized,
    ],
)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_convert_leaves_layers_it_cannot_keep(change, norm_first):
    """The layer stays torch's and gives the same outputs, gradients and hook calls as an
    unconverted twin; the report lists it with the reason, and lists exactly what changed."""

    def build():
        layer = torch.nn.TransformerEncoderLayer(
            D_MODEL, HEADS, FF, 0.0, batch_first=True, norm_first=norm_first
        )
        _randomize(layer)
        calls, reason = change(layer)
        return torch.nn.Sequential(layer), calls, reason

    reference, reference_calls, _ = build()
    model, calls, reason = build()
    with pytest.warns(fnn.ConversionWarning, match="left alone"):
        model, report = fastformer.convert(model, return_report=True)

    assert type(model[0]) is torch.nn.TransformerEncoderLayer
    assert reason in dict(report.skipped)["0"]
    _assert_report_is_accurate(model, report)
    x = torch.randn(BATCH, SRC, D_MODEL)
    expected = _outputs_and_grads(reference, x)
    got = _outputs_and_grads(model, x)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=2e-5, rtol=1e-5, msg=key)
    assert calls == reference_calls


@pytest.mark.parametrize("decoder_only", [False, True])
def test_convert_runs_the_activation_torch_runs(decoder_only):
    """torch's deep-copied decoder layers keep an activation module as a child (its
    state_dict keys) but run F.relu (TransformerDecoderLayer.__setstate__); the converted
    layers do the same, and the encoder's run the module."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's enable_nested_tensor notice
        if decoder_only:
            layer = torch.nn.TransformerDecoderLayer(
                D_MODEL, HEADS, FF, 0.0, activation=torch.nn.PReLU()
            )
            model = torch.nn.TransformerDecoder(layer, 2)
        else:
            model = torch.nn.Transformer(D_MODEL, HEADS, 1, 2, FF, 0.0, activation=torch.nn.PReLU())
    _randomize(model)
    model.eval()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert any(key.endswith("activation.weight") for key in keys)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the encoder's PReLU runs unfused: noted
        converted, report = fastformer.convert(model, return_report=True)

    assert report.skipped == []
    decoder = converted if decoder_only else converted.decoder
    assert all(type(layer) is fnn.TransformerDecoderLayer for layer in decoder.layers)
    assert all(layer.activation is torch.nn.functional.relu for layer in decoder.layers)
    assert list(converted.state_dict()) == keys
    tgt = torch.randn(TGT, BATCH, D_MODEL)
    src = torch.randn(SRC, BATCH, D_MODEL)
    inputs = (tgt, src) if decoder_only else (src, tgt)
    torch.testing.assert_close(converted(*inputs), reference(*inputs), atol=2e-5, rtol=1e-5)


def test_convert_is_all_or_nothing_per_module(monkeypatch):
    """A module whose replacement cannot be built is left whole and reported; the others
    are converted, and no exception leaves the model half-converted."""

    def failing(module):
        raise ValueError("no replacement")

    monkeypatch.setitem(convert_module._CONVERTERS, torch.nn.RMSNorm, failing)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.LayerNorm(D_MODEL),
        torch.nn.RMSNorm(D_MODEL),
        # torch accepts an infinite eps (the norms give their bias), fastformer does not:
        # the norms cannot be built, and neither can the layer, which converts them.
        torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, 0.0, layer_norm_eps=float("inf")),
        torch.nn.LayerNorm(D_MODEL, eps=0.0),  # torch accepts eps=0, and so does fastformer
    )
    _randomize(model)  # random norm biases: the rows reaching eps=0 are not constant
    reference = copy.deepcopy(model).eval()

    with pytest.warns(fnn.ConversionWarning, match="no replacement"):
        model, report = fastformer.convert(model.eval(), return_report=True)

    assert [type(m) for m in model] == [
        fnn.LayerNorm,
        torch.nn.RMSNorm,
        torch.nn.TransformerEncoderLayer,
        fnn.LayerNorm,
    ]
    skipped = dict(report.skipped)
    assert skipped["1"] == "cannot be converted: ValueError: no replacement"
    assert "eps" in skipped["2"] and "eps" in skipped["2.norm1"] and "eps" in skipped["2.norm2"]
    assert type(model[2].self_attn) is fnn.MultiheadAttention  # its other children still go
    _assert_report_is_accurate(model, report)
    x = torch.randn(SRC, BATCH, D_MODEL)
    torch.testing.assert_close(model(x), reference(x), atol=2e-5, rtol=1e-5)
