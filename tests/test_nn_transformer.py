"""fastformer.nn's Transformer modules against torch.nn's, and fastformer.convert.

Each fastformer module loads the state_dict of its torch.nn namesake and must give the same
outputs and the same gradients (of the inputs and of every parameter), in float32 on small,
awkward shapes, with dropout 0, for every mask kind, pre- and post-norm, both layouts.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastformer
from fastformer import nn as fnn
from tests.conftest import HAS_INTERPRETER, requires_extension
from tests.tolerance import assert_all_close_to_reference

pytestmark = requires_extension


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These shapes are tiny: one thread, so that a busy machine's thread pool does not
    turn milliseconds into seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


D_MODEL, HEADS, FF = 32, 4, 48
BATCH, TGT, SRC = 3, 7, 11
TOL = {"atol": 2e-5, "rtol": 1e-5}


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def _randomize(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Random values in every parameter (norm weights and biases included)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def _pair(torch_cls, fast_cls, *args, **kwargs):
    """(torch module with random weights, fastformer module loaded from its state_dict)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn's enable_nested_tensor notices
        theirs = torch_cls(*args, **kwargs)
    _randomize(theirs)
    ours = fast_cls(*args, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(x.is_floating_point())


def _run(module, inputs, kwargs, grad, dtype=None):
    """Outputs and gradients (of every floating input and parameter) of one forward and
    backward; with `dtype`, of a copy of the module and inputs in that dtype."""
    if dtype is not None:
        module = copy.deepcopy(module).to(dtype)
        inputs = [
            x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs
        ]
        kwargs = {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()
        }
        grad = grad.to(dtype)
    module.zero_grad(set_to_none=True)
    leaves = [_leaf(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    out = module(*leaves, **kwargs)
    results = {}
    if isinstance(out, tuple):  # MultiheadAttention: (output, weights)
        results.update({f"output {i}": o for i, o in enumerate(out[1:], 1) if o is not None})
        out = out[0]
    results["output"] = out
    out.backward(grad)
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            results[f"grad of input {i}"] = x.grad
    for name, parameter in module.named_parameters():
        results[f"grad of {name}"] = parameter.grad
    return results


def _assert_same(theirs, ours, *inputs, **kwargs) -> None:
    """Same output and gradients (of every floating input and every parameter) as torch.nn's
    module, by the DESIGN.md rule against torch.nn's module run in float64."""
    grad_shape = theirs(*inputs, **kwargs)
    grad_shape = grad_shape[0] if isinstance(grad_shape, tuple) else grad_shape
    grad = torch.randn(grad_shape.shape)
    same_precision = _run(theirs, inputs, kwargs, grad)
    ref64 = _run(theirs, inputs, kwargs, grad, torch.float64)
    fast = _run(ours, inputs, kwargs, grad)
    assert fast.keys() == ref64.keys()
    assert_all_close_to_reference(fast, same_precision, ref64, atol=1e-5)


def _seq(length: int, batch_first: bool, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, length, D_MODEL) if batch_first else (length, BATCH, D_MODEL)
    return torch.randn(shape, generator=generator)


def _padding(source: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(BATCH, source) key padding: batch 0 unpadded, the others padded at the end."""
    padded = torch.zeros(BATCH, source, dtype=torch.bool)
    padded[1, source - 3 :] = True
    padded[2, source - 1 :] = True
    if dtype == torch.bool:
        return padded
    return torch.zeros(BATCH, source).masked_fill(padded, float("-inf"))


def _causal_bool(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).triu(1)


def _masks(kind: str, length: int, source: int) -> dict:
    """Self- or cross-attention masks of a kind, as forward kwargs (attn_mask,
    key_padding_mask, is_causal) of MultiheadAttention."""
    generator = torch.Generator().manual_seed(7)
    if kind == "none":
        return {}
    if kind == "causal_bool":
        return {"attn_mask": _causal_bool(length)}
    if kind == "causal_float":
        return {"attn_mask": torch.nn.Transformer.generate_square_subsequent_mask(length)}
    if kind == "causal_hint":
        return {"attn_mask": _causal_bool(length), "is_causal": True}
    if kind == "float":
        return {"attn_mask": torch.randn(length, source, generator=generator)}
    if kind == "bool_3d":
        masked = torch.rand(BATCH * HEADS, length, source, generator=generator) < 0.3
        masked[..., 0] = False  # no query row without a key
        return {"attn_mask": masked}
    if kind == "padding":
        return {"key_padding_mask": _padding(source)}
    if kind == "causal_and_padding":
        return {"attn_mask": _causal_bool(length), "key_padding_mask": _padding(source)}
    if kind == "causal_hint_and_padding":
        return {
            "attn_mask": _causal_bool(length),
            "key_padding_mask": _padding(source),
            "is_causal": True,
        }
    if kind == "float_and_float_padding":
        return {
            "attn_mask": torch.randn(length, source, generator=generator),
            "key_padding_mask": _padding(source, torch.float32),
        }
    raise AssertionError(kind)


SELF_MASKS = [
    "none",
    "causal_bool",
    "causal_float",
    "causal_hint",
    "float",
    "bool_3d",
    "padding",
    "causal_and_padding",
    "causal_hint_and_padding",
    "float_and_float_padding",
]
CROSS_MASKS = ["none", "float", "bool_3d", "padding", "float_and_float_padding"]


# ----------------------------------------------------------------------------------------
# MultiheadAttention
# ----------------------------------------------------------------------------------------


class _Call(torch.nn.Module):
    """Calls a MultiheadAttention with fixed keyword arguments; key defaults to the query
    and value to the key (the same tensor, as Transformer layers pass them)."""

    def __init__(self, inner: torch.nn.Module, **kwargs):
        super().__init__()
        self.inner = inner
        self.kwargs = kwargs

    def forward(self, query, key=None, value=None):
        key = query if key is None else key
        value = key if value is None else value
        return self.inner(query, key, value, need_weights=False, **self.kwargs)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", SELF_MASKS)
def test_mha_self_attention_matches_torch(kind, batch_first):
    theirs, ours = _pair(
        torch.nn.MultiheadAttention, fnn.MultiheadAttention, D_MODEL, HEADS, batch_first=batch_first
    )
    masks = _masks(kind, SRC, SRC)
    _assert_same(_Call(theirs, **masks), _Call(ours, **masks), _seq(SRC, batch_first, 1))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", CROSS_MASKS)
@pytest.mark.parametrize("same_kv", [True, False], ids=["key_is_value", "key_value"])
def test_mha_cross_attention_matches_torch(kind, batch_first, same_kv):
    theirs, ours = _pair(
        torch.nn.MultiheadAttention, fnn.MultiheadAttention, D_MODEL, HEADS, batch_first=batch_first
    )
    query, key = _seq(TGT, batch_first, 1), _seq(SRC, batch_first, 2)
    value = None if same_kv else _seq(SRC, batch_first, 3)
    masks = _masks(kind, TGT, SRC)
    _assert_same(_Call(theirs, **masks), _Call(ours, **masks), query, key, value)


@pytest.mark.parametrize("average", [True, False])
def test_mha_need_weights_returns_torch_weights(average):
    theirs, ours = _pair(torch.nn.MultiheadAttention, fnn.MultiheadAttention, D_MODEL, HEADS)
    query, key = _seq(TGT, False, 1), _seq(SRC, False, 2)
    masks = _masks("float_and_float_padding", TGT, SRC)
    _assert_same(theirs, ours, query, key, key, average_attn_weights=average, **masks)
    weights = ours(query, key, key, average_attn_weights=average, **masks)[1]
    assert weights.shape == ((BATCH, TGT, SRC) if average else (BATCH, HEADS, TGT, SRC))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kdim": 20, "vdim": 24},
        {"bias": False},
        {"add_bias_kv": True, "add_zero_attn": True},
    ],
    ids=["kdim_vdim", "no_bias", "bias_kv_zero_attn"],
)
def test_mha_variants_match_torch(kwargs):
    theirs, ours = _pair(
        torch.nn.MultiheadAttention,
        fnn.MultiheadAttention,
        D_MODEL,
        HEADS,
        batch_first=True,
        **kwargs,
    )
    query = _seq(TGT, True, 1)
    key = torch.randn(BATCH, SRC, kwargs.get("kdim", D_MODEL))
    value = torch.randn(BATCH, SRC, kwargs.get("vdim", D_MODEL))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference-path notice of add_bias_kv
        _assert_same(
            theirs, ours, query, key, value, need_weights=False, key_padding_mask=_padding(SRC)
        )


def test_mha_unbatched_input():
    theirs, ours = _pair(torch.nn.MultiheadAttention, fnn.MultiheadAttention, D_MODEL, HEADS)
    x = torch.randn(SRC, D_MODEL)
    padding = _padding(SRC)[1]
    _assert_same(theirs, ours, x, x, x, need_weights=False, key_padding_mask=padding)


def test_mha_is_causal_needs_attn_mask():
    mha = fnn.MultiheadAttention(D_MODEL, HEADS)
    x = torch.randn(TGT, BATCH, D_MODEL)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        mha(x, x, x, need_weights=False, is_causal=True)


def test_mha_add_bias_kv_warns_reference_path(monkeypatch):
    from fastformer.nn import attention

    monkeypatch.setattr(attention, "_warned_reference_path", False)
    mha = fnn.MultiheadAttention(D_MODEL, HEADS, add_bias_kv=True)
    x = torch.randn(TGT, BATCH, D_MODEL)
    with pytest.warns(UserWarning, match="reference path"):
        mha(x, x, x, need_weights=False)


@pytest.mark.skipif(not HAS_INTERPRETER, reason="needs Triton's interpreter")
@pytest.mark.parametrize("kind", ["causal_and_padding", "float_and_float_padding"])
def test_mha_through_triton_kernels(kind, use_implementation):
    """The merged masks as the Triton kernel reads them (head dim 16, the kernel's least)."""
    use_implementation("cpu", "triton")
    theirs, ours = _pair(torch.nn.MultiheadAttention, fnn.MultiheadAttention, D_MODEL, 2)
    x = _seq(SRC, False, 1)
    masks = _masks(kind, SRC, SRC)
    calls_before = fastformer.info()["fallback_calls"].get("scaled_dot_product_attention", 0)
    _assert_same(theirs, ours, x, x, x, need_weights=False, **masks)
    calls_after = fastformer.info()["fallback_calls"].get("scaled_dot_product_attention", 0)
    assert calls_after == calls_before


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------

LAYER_MASKS = ["none", "causal_bool", "causal_hint", "float", "padding", "causal_and_padding"]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", LAYER_MASKS)
def test_encoder_layer_matches_torch(kind, norm_first, batch_first):
    theirs, ours = _pair(
        torch.nn.TransformerEncoderLayer,
        fnn.TransformerEncoderLayer,
        D_MODEL,
        HEADS,
        FF,
        dropout=0.0,
        batch_first=batch_first,
        norm_first=norm_first,
    )
    masks = _masks(kind, SRC, SRC)
    kwargs = {
        "src_mask": masks.get("attn_mask"),
        "src_key_padding_mask": masks.get("key_padding_mask"),
        "is_causal": masks.get("is_causal", False),
    }
    _assert_same(theirs, ours, _seq(SRC, batch_first, 1), **kwargs)


@pytest.mark.skipif(not HAS_INTERPRETER, reason="needs Triton's interpreter")
def test_encoder_layer_through_triton_kernels(use_implementation):
    """Attention and residual + LayerNorm as the Triton kernels run them (head dim 16)."""
    use_implementation("cpu", "triton")
    theirs, ours = _pair(
        torch.nn.TransformerEncoderLayer,
        fnn.TransformerEncoderLayer,
        D_MODEL,
        2,
        FF,
        dropout=0.0,
        norm_first=True,
    )
    masks = _masks("causal_and_padding", SRC, SRC)
    calls_before = sum(fastformer.info()["fallback_calls"].values())
    _assert_same(
        theirs,
        ours,
        _seq(SRC, False, 1),
        src_mask=masks["attn_mask"],
        src_key_padding_mask=masks["key_padding_mask"],
    )
    assert sum(fastformer.info()["fallback_calls"].values()) == calls_before


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", ["none", "causal_hint_and_padding", "float_and_float_padding"])
def test_decoder_layer_matches_torch(kind, norm_first, batch_first):
    theirs, ours = _pair(
        torch.nn.TransformerDecoderLayer,
        fnn.TransformerDecoderLayer,
        D_MODEL,
        HEADS,
        FF,
        dropout=0.0,
        batch_first=batch_first,
        norm_first=norm_first,
    )
    memory_kind = {"causal_hint_and_padding": "padding"}.get(kind, kind)
    tgt_masks, memory_masks = _masks(kind, TGT, TGT), _masks(memory_kind, TGT, SRC)
    kwargs = {
        "tgt_mask": tgt_masks.get("attn_mask"),
        "tgt_key_padding_mask": tgt_masks.get("key_padding_mask"),
        "tgt_is_causal": tgt_masks.get("is_causal", False),
        "memory_mask": memory_masks.get("attn_mask"),
        "memory_key_padding_mask": memory_masks.get("key_padding_mask"),
    }
    _assert_same(theirs, ours, _seq(TGT, batch_first, 1), _seq(SRC, batch_first, 2), **kwargs)


@pytest.mark.parametrize(
    "activation",
    ["gelu", torch.nn.functional.gelu, torch.nn.GELU(approximate="tanh"), torch.nn.SiLU()],
    ids=["gelu_name", "F.gelu", "gelu_tanh_module", "silu_module"],
)
def test_layer_activations_fused(activation):
    theirs, ours = _pair(
        torch.nn.TransformerEncoderLayer,
        fnn.TransformerEncoderLayer,
        D_MODEL,
        HEADS,
        FF,
        dropout=0.0,
        activation=activation,
    )
    assert ours.fused_activation is not None
    _assert_same(theirs, ours, _seq(SRC, False, 1))


def test_layer_custom_activation_runs_plain_torch_and_says_so():
    def activation(x):
        return torch.tanh(x) * x

    with pytest.warns(UserWarning, match="no fused kernel"):
        ours = fnn.TransformerDecoderLayer(D_MODEL, HEADS, FF, 0.0, activation=activation)
    assert ours.fused_activation is None
    theirs = torch.nn.TransformerDecoderLayer(D_MODEL, HEADS, FF, 0.0, activation=activation)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    _assert_same(theirs, ours, _seq(TGT, False, 1), _seq(SRC, False, 2))


def test_layer_without_bias_and_other_eps():
    theirs, ours = _pair(
        torch.nn.TransformerEncoderLayer,
        fnn.TransformerEncoderLayer,
        D_MODEL,
        HEADS,
        FF,
        dropout=0.0,
        layer_norm_eps=1e-3,
        bias=False,
        norm_first=True,
    )
    _assert_same(theirs, ours, _seq(SRC, False, 1), src_key_padding_mask=_padding(SRC))


def test_layer_unbatched_input():
    theirs, ours = _pair(
        torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, D_MODEL, HEADS, FF, 0.0
    )
    _assert_same(theirs, ours, torch.randn(SRC, D_MODEL), src_mask=_causal_bool(SRC))


# ----------------------------------------------------------------------------------------
# Stacks and Transformer
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("final_norm", [True, False])
def test_encoder_stack_matches_torch(norm_first, final_norm):
    layer_args = (D_MODEL, HEADS, FF, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(*layer_args, batch_first=True, norm_first=norm_first),
            3,
            torch.nn.LayerNorm(D_MODEL) if final_norm else None,
        )
    ours = fnn.TransformerEncoder(
        fnn.TransformerEncoderLayer(*layer_args, batch_first=True, norm_first=norm_first),
        3,
        fnn.LayerNorm(D_MODEL) if final_norm else None,
        enable_nested_tensor=False,
        mask_check=False,
    )
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    mask = torch.nn.Transformer.generate_square_subsequent_mask(SRC)  # detected as causal
    _assert_same(
        theirs.eval(),
        ours.eval(),
        _seq(SRC, True, 1),
        mask=mask,
        src_key_padding_mask=_padding(SRC, torch.float32),
    )


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_encoder_stack_under_autocast_keeps_torchs_float32_stream(norm_first):
    """Under bfloat16 autocast the sub-layers' outputs are bfloat16 and the residual stream
    float32: torch.nn adds them in float32 and normalizes in float32; so must the fused
    add + norm (a bfloat16 output would round the post-norm stream at every layer)."""
    layer_args = (D_MODEL, HEADS, FF, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(*layer_args, batch_first=True, norm_first=norm_first),
            3,
            torch.nn.LayerNorm(D_MODEL),
        )
    ours = fnn.TransformerEncoder(
        fnn.TransformerEncoderLayer(*layer_args, batch_first=True, norm_first=norm_first),
        3,
        fnn.LayerNorm(D_MODEL),
        enable_nested_tensor=False,
    )
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    src = _seq(SRC, True, 2)
    exact = copy.deepcopy(theirs).double().eval()(src.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = theirs.eval()(src)
        got = ours.eval()(src)
    assert got.dtype == expected.dtype == torch.float32
    torch_error = (expected.double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * torch_error + 1e-3


def test_pre_norm_stack_with_a_hooked_layer_calls_it():
    """A hook on a layer turns off the cross-layer fusion (which would bypass the layer's
    __call__): the hook runs and the results stay torch.nn's."""
    layer_args = (D_MODEL, HEADS, FF, 0.0)
    theirs = torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(*layer_args, norm_first=True),
        2,
        torch.nn.LayerNorm(D_MODEL),
    )
    ours = fnn.TransformerDecoder(
        fnn.TransformerDecoderLayer(*layer_args, norm_first=True), 2, fnn.LayerNorm(D_MODEL)
    )
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    calls = []
    ours.layers[1].register_forward_hook(lambda *args: calls.append(1))
    _assert_same(
        theirs.eval(), ours.eval(), _seq(TGT, False, 1), _seq(SRC, False, 2), tgt_is_causal=None
    )
    assert calls == [1]


def test_dropout_is_active_in_training_and_seeded():
    layer = fnn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.3, norm_first=True)
    x = _seq(SRC, False, 1)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), first)
    assert not torch.allclose(layer(x), first)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_matches_torch(norm_first, batch_first):
    theirs, ours = _pair(
        torch.nn.Transformer,
        fnn.Transformer,
        D_MODEL,
        HEADS,
        2,
        2,
        FF,
        dropout=0.0,
        batch_first=batch_first,
        norm_first=norm_first,
    )
    memory_mask = torch.randn(TGT, SRC)
    _assert_same(
        theirs,
        ours,
        _seq(SRC, batch_first, 1),
        _seq(TGT, batch_first, 2),
        src_mask=torch.randn(SRC, SRC),
        tgt_mask=fnn.Transformer.generate_square_subsequent_mask(TGT),
        memory_mask=memory_mask,
        src_key_padding_mask=_padding(SRC, torch.float32),
        tgt_key_padding_mask=_padding(TGT, torch.float32),
        memory_key_padding_mask=_padding(SRC, torch.float32),
    )


def test_transformer_state_dict_loads_back_into_torch():
    ours = fnn.Transformer(D_MODEL, HEADS, 1, 1, FF, dropout=0.0)
    _randomize(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn's enable_nested_tensor notice
        theirs = torch.nn.Transformer(D_MODEL, HEADS, 1, 1, FF, dropout=0.0)
    theirs.load_state_dict(ours.state_dict())
    src, tgt = _seq(SRC, False, 1), _seq(TGT, False, 2)
    torch.testing.assert_close(ours(src, tgt), theirs(src, tgt), **TOL)
    torch.testing.assert_close(
        fnn.Transformer.generate_square_subsequent_mask(5),
        torch.nn.Transformer.generate_square_subsequent_mask(5),
    )


# ----------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------


class _MyAttention(torch.nn.MultiheadAttention):
    """A subclass: convert must leave it alone."""


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, D_MODEL)
        layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, 0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(
            layer, 2, torch.nn.LayerNorm(D_MODEL), enable_nested_tensor=False
        )
        self.blocks = torch.nn.ModuleList(
            [
                torch.nn.Sequential(torch.nn.LayerNorm(D_MODEL), torch.nn.Linear(D_MODEL, D_MODEL)),
                torch.nn.TransformerDecoderLayer(
                    D_MODEL, HEADS, FF, 0.0, batch_first=True, norm_first=True
                ),
            ]
        )
        self.pool = torch.nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.custom = _MyAttention(D_MODEL, HEADS, batch_first=True)
        self.with_bias_kv = torch.nn.MultiheadAttention(D_MODEL, HEADS, add_bias_kv=True)

    def forward(self, x, padding):
        h = self.encoder(self.embed(x), src_key_padding_mask=padding)
        h = self.blocks[0](h)
        h = self.blocks[1](h, h, memory_key_padding_mask=padding)
        h = h + self.pool(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        h = h + self.custom(h, h, h, need_weights=False)[0]
        t = h.transpose(0, 1)
        return t + self.with_bias_kv(t, t, t, need_weights=False)[0]


def test_convert_nested_model_keeps_parameters_and_results():
    torch.manual_seed(0)
    model = _Net()
    _randomize(model, scale=0.15)  # several unnormalized residual adds: keep gains small
    model.eval()
    reference = copy.deepcopy(model)
    parameters = {name: id(p) for name, p in model.named_parameters()}
    keys = list(model.state_dict())

    with pytest.warns(fnn.ConversionWarning, match="subclasses torch.nn.MultiheadAttention"):
        converted, report = fastformer.convert(model, return_report=True)

    assert converted is model
    assert {name: id(p) for name, p in model.named_parameters()} == parameters
    assert list(model.state_dict()) == keys
    assert type(model.encoder) is fnn.TransformerEncoder
    assert all(type(layer) is fnn.TransformerEncoderLayer for layer in model.encoder.layers)
    assert type(model.encoder.layers[0].self_attn) is fnn.MultiheadAttention
    assert type(model.encoder.norm) is fnn.LayerNorm
    assert type(model.blocks[0][0]) is fnn.LayerNorm
    assert type(model.blocks[1]) is fnn.TransformerDecoderLayer
    assert type(model.blocks[1].multihead_attn) is fnn.MultiheadAttention
    assert type(model.pool) is fnn.MultiheadAttention
    assert type(model.custom) is _MyAttention
    assert type(model.with_bias_kv) is torch.nn.MultiheadAttention
    assert dict(report.skipped).keys() == {"custom", "with_bias_kv"}
    assert ("encoder", "TransformerEncoder") in report.converted
    assert not model.training and not model.encoder.layers[1].training
    assert not any(t.is_meta for t in model.state_dict().values())

    x = torch.randn(BATCH, SRC, 16)
    _assert_same(reference, model, x, _padding(SRC))

    # A second conversion finds nothing left to convert.
    with pytest.warns(fnn.ConversionWarning):
        _, again = fastformer.convert(model, return_report=True)
    assert again.converted == []


def test_convert_of_a_transformer_returns_the_replacement():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.nn.Transformer(D_MODEL, HEADS, 1, 1, FF, dropout=0.0)
    _randomize(model)
    reference = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left alone: no warning
        converted = fastformer.convert(model.eval())
    assert type(converted) is fnn.Transformer
    assert type(converted.decoder.layers[0]) is fnn.TransformerDecoderLayer
    src, tgt = _seq(SRC, False, 1), _seq(TGT, False, 2)
    _assert_same(reference, converted, src, tgt, tgt_mask=_causal_bool(TGT))


def test_convert_rms_norm_shares_its_weight():
    model = torch.nn.Sequential(torch.nn.Linear(8, D_MODEL), torch.nn.RMSNorm(D_MODEL, eps=1e-6))
    _randomize(model)
    reference = copy.deepcopy(model)
    weight = model[1].weight
    fastformer.convert(model)
    assert type(model[1]) is fnn.RMSNorm and model[1].weight is weight
    _assert_same(reference, model, torch.randn(5, 8))


def test_convert_notes_custom_activation():
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, 0.0, activation=torch.tanh)
    with pytest.warns(UserWarning, match="no fused kernel"):
        converted, report = fastformer.convert(layer, return_report=True)
    assert type(converted) is fnn.TransformerEncoderLayer
    assert report.notes and "plain PyTorch" in report.notes[0][1]


# ----------------------------------------------------------------------------------------
# Layers whose submodules a user replaced
# ----------------------------------------------------------------------------------------


class _ScaledNorm(torch.nn.Module):
    """Neither a LayerNorm nor an RMSNorm: the layers must call it."""

    def __init__(self, d_model: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:]) * self.weight * 2.0


class _LoRALinear(torch.nn.Linear):
    """A Linear subclass with a low-rank term: the layers must call its forward."""

    def __init__(self, in_features: int, out_features: int, rank: int = 2):
        super().__init__(in_features, out_features)
        self.lora_a = torch.nn.Parameter(torch.zeros(rank, in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.T @ self.lora_b.T


class _ShiftedAttention(torch.nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return out + 0.5, weights


# The layer's norm modules, by kind, for torch's layer and for fastformer's, and how many
# of the layer's norms the fused op computes (a norm of another class is called).
_NORM_KINDS = {
    "torch_rms": (lambda: torch.nn.RMSNorm(D_MODEL, eps=1e-6), None, True),
    "torch_rms_eps_none": (lambda: torch.nn.RMSNorm(D_MODEL), None, True),
    "fastformer_rms": (
        lambda: torch.nn.RMSNorm(D_MODEL),
        lambda: fnn.RMSNorm(D_MODEL),
        True,
    ),
    "torch_layer_norm": (lambda: torch.nn.LayerNorm(D_MODEL, eps=1e-3), None, True),
    "other": (lambda: _ScaledNorm(D_MODEL), None, False),
}


def _count_fused_norms(monkeypatch) -> list[int]:
    from fastformer.nn import transformer_layer

    calls = []
    fused = transformer_layer.layer_norm_residual

    def counting(*args, **kwargs):
        calls.append(kwargs["rms_norm"])
        return fused(*args, **kwargs)

    monkeypatch.setattr(transformer_layer, "layer_norm_residual", counting)
    return calls


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", list(_NORM_KINDS))
def test_layer_norms_of_any_kind_match_torch(kind, norm_first, decoder, monkeypatch):
    """RMSNorms run the fused op with rms_norm=True (eps=None resolved as torch does),
    LayerNorms the fused LayerNorm, any other norm module is called after the residual
    add: torch.nn's results either way."""
    theirs_norm, ours_norm, fused = _NORM_KINDS[kind]
    ours_norm = ours_norm or theirs_norm
    names = ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2")
    torch_cls, fast_cls = (
        (torch.nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer)
        if decoder
        else (torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer)
    )
    theirs = torch_cls(D_MODEL, HEADS, FF, 0.0, norm_first=norm_first)
    ours = fast_cls(D_MODEL, HEADS, FF, 0.0, norm_first=norm_first)
    for name in names:
        setattr(theirs, name, theirs_norm())
        setattr(ours, name, ours_norm())
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    inputs = (_seq(TGT, False, 1), _seq(SRC, False, 2)) if decoder else (_seq(SRC, False, 1),)
    calls = _count_fused_norms(monkeypatch)
    _assert_same(theirs.eval(), ours.eval(), *inputs)
    rms = kind.endswith(("rms", "rms_eps_none"))
    assert calls == ([rms] * len(names) if fused else [])


@pytest.mark.parametrize("kind", ["torch_rms_eps_none", "other"])
def test_pre_norm_stack_with_other_norms_matches_torch(kind):
    """The stack's cross-layer fusion and its final norm go through the same choice."""
    make, _, _ = _NORM_KINDS[kind]
    layer_args = (D_MODEL, HEADS, FF, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_layer = torch.nn.TransformerEncoderLayer(*layer_args, norm_first=True)
        theirs_layer.norm1, theirs_layer.norm2 = make(), make()
        theirs = torch.nn.TransformerEncoder(theirs_layer, 2, make(), enable_nested_tensor=False)
    ours_layer = fnn.TransformerEncoderLayer(*layer_args, norm_first=True)
    ours_layer.norm1, ours_layer.norm2 = make(), make()
    ours = fnn.TransformerEncoder(ours_layer, 2, make())
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    _assert_same(theirs.eval(), ours.eval(), _seq(SRC, False, 1))


def _lora(layer):
    layer.linear1 = _LoRALinear(D_MODEL, FF)


def _shifted_attention(layer):
    layer.self_attn = _ShiftedAttention(D_MODEL, HEADS)


def _hooked_dropout(layer):
    layer.dropout1.register_forward_hook(lambda module, args, out: out * 0.5)


def _hooked_linear(layer):
    layer.linear2.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))


def _hooked_norm(layer):
    layer.norm2.register_forward_hook(lambda module, args, out: out + 1.0)


def _hooked_activation(layer):
    layer.activation = torch.nn.ReLU()
    layer.activation.register_forward_hook(lambda module, args, out: out * 3.0)


def _reassigned_activation(layer):
    layer.activation = torch.nn.functional.gelu  # after construction (relu)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize(
    "replace",
    [
        _lora,
        _shifted_attention,
        _hooked_dropout,
        _hooked_linear,
        _hooked_norm,
        _hooked_activation,
        _reassigned_activation,
    ],
)
def test_layer_with_replaced_or_hooked_children_matches_torch(replace, norm_first):
    """The fused paths read weights only of the exact, unhooked torch.nn classes; anything
    else is called, as torch.nn's layer calls it."""
    theirs = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, 0.0, norm_first=norm_first)
    ours = fnn.TransformerEncoderLayer(D_MODEL, HEADS, FF, 0.0, norm_first=norm_first)
    replace(theirs)
    replace(ours)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    _assert_same(theirs.eval(), ours.eval(), _seq(SRC, False, 1), src_mask=_causal_bool(SRC))


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (fnn.TransformerEncoderLayer, {"norm_first": 1}, "norm_first"),
        (fnn.TransformerEncoderLayer, {"batch_first": "yes"}, "batch_first"),
        (fnn.TransformerDecoderLayer, {"bias": None}, "bias"),
        (fnn.TransformerDecoderLayer, {"dropout": 1.5}, "dropout"),
        (fnn.TransformerEncoderLayer, {"layer_norm_eps": float("nan")}, "layer_norm_eps"),
        (fnn.MultiheadAttention, {"batch_first": 1}, "batch_first"),
        (fnn.MultiheadAttention, {"add_zero_attn": "no"}, "add_zero_attn"),
        (fnn.MultiheadAttention, {"dropout": -0.1}, "dropout"),
        (fnn.MultiheadAttention, {"dropout": 1.5}, "dropout"),
        (fnn.Transformer, {"batch_first": 0}, "batch_first"),
    ],
)
def test_modules_check_their_arguments_when_built(cls, kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        cls(D_MODEL, HEADS, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"num_layers": -1}, ValueError, "num_layers"),
        ({"num_layers": 2.0}, TypeError, "num_layers"),
        ({"num_layers": 1, "enable_nested_tensor": 1}, TypeError, "enable_nested_tensor"),
        ({"num_layers": 1, "mask_check": None}, TypeError, "mask_check"),
    ],
)
def test_stacks_check_their_arguments_when_built(kwargs, error, name):
    layer = fnn.TransformerEncoderLayer(D_MODEL, HEADS, FF)
    with pytest.raises(error, match=name):
        fnn.TransformerEncoder(layer, **kwargs)
