"""fastformer.nn.LayerNorm / RMSNorm as drop-ins for torch.nn.LayerNorm / RMSNorm."""

from __future__ import annotations

import pytest
import torch

import fastformer
from tests.conftest import requires_extension

pytestmark = requires_extension


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter))


@pytest.mark.parametrize("normalized_shape", [12, (12,), (3, 4)])
@pytest.mark.parametrize("elementwise_affine, bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_state_dict_round_trip(normalized_shape, elementwise_affine, bias):
    theirs = torch.nn.LayerNorm(
        normalized_shape, eps=1e-6, elementwise_affine=elementwise_affine, bias=bias
    )
    _randomize(theirs)
    ours = fastformer.nn.LayerNorm(
        normalized_shape, eps=1e-6, elementwise_affine=elementwise_affine, bias=bias
    )
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    back = torch.nn.LayerNorm(
        normalized_shape, eps=1e-6, elementwise_affine=elementwise_affine, bias=bias
    )
    back.load_state_dict(ours.state_dict())

    shape = (
        2,
        5,
        *((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape),
    )
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(back(x), theirs(x))


def test_layer_norm_gradients_match_torch():
    theirs = torch.nn.LayerNorm(24)
    _randomize(theirs)
    ours = fastformer.nn.LayerNorm(24)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 24, requires_grad=True)
    x_theirs = x.detach().clone().requires_grad_()
    ours(x).square().sum().backward()
    theirs(x_theirs).square().sum().backward()
    torch.testing.assert_close(x.grad, x_theirs.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_matches_torch(eps):
    theirs = torch.nn.RMSNorm((3, 8), eps=eps)
    _randomize(theirs)
    ours = fastformer.nn.RMSNorm((3, 8), eps=eps)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(4, 3, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_forward_with_residual_returns_out_and_stream():
    norm = fastformer.nn.LayerNorm(16)
    _randomize(norm)
    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    out, h = norm(x, residual)
    torch.testing.assert_close(h, x + residual)
    torch.testing.assert_close(
        out, torch.nn.functional.layer_norm(x + residual, (16,), norm.weight, norm.bias)
    )
    only_out = norm(x, residual, return_residual=False)
    torch.testing.assert_close(only_out, out)


def test_module_dropout_follows_training_mode():
    norm = fastformer.nn.LayerNorm(16, dropout=0.5)
    x = torch.randn(64, 16)
    _, h_train = norm(x, return_residual=True)
    assert (h_train == 0).any()
    norm.eval()
    _, h_eval = norm(x, return_residual=True)
    assert h_eval is x


def test_wrong_trailing_shape_is_named():
    with pytest.raises(ValueError, match=r"trailing dimensions must be \[3, 4\]"):
        fastformer.nn.LayerNorm((3, 4))(torch.randn(2, 4, 3))


def test_repr_mentions_shape_and_eps():
    assert "(8,), eps=1e-05" in repr(fastformer.nn.LayerNorm(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_default_eps_matches_torch_in_half_precision(dtype):
    """eps=None is the accumulation dtype's (float32's) epsilon, as torch computes it, not
    the input dtype's (65536 times larger for bfloat16, which torch's docs name): on rows
    of magnitude 1e-2 the two differ several-fold."""
    theirs = torch.nn.RMSNorm(24).to(dtype)
    _randomize(theirs)
    ours = fastformer.nn.RMSNorm.from_torch(theirs)
    generator = torch.Generator().manual_seed(3)
    x = (1e-2 * torch.randn(5, 24, generator=generator)).to(dtype)
    residual = (1e-2 * torch.randn(5, 24, generator=generator)).to(dtype)
    expected = theirs(x)
    assert expected.abs().max() > 0.5  # normalized: eps small against the mean square
    torch.testing.assert_close(ours(x), expected)
    out, h = ours(x, residual)
    torch.testing.assert_close(h, x + residual)
    torch.testing.assert_close(out, theirs(x + residual))


@pytest.mark.parametrize("shape", [(3, 2, 4), (24,), (1, 3, 4), (2, 3, 4, 1)])
@pytest.mark.parametrize("norm_class", [fastformer.nn.LayerNorm, fastformer.nn.RMSNorm])
def test_norm_rejects_a_residual_of_another_shape(norm_class, shape):
    """As the functional op does, instead of reshaping a residual with as many elements."""
    norm = norm_class(4)
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 3, 4\]"):
        norm(torch.randn(2, 3, 4), torch.randn(shape))


@pytest.mark.parametrize(
    "build, error, name",
    [
        (lambda: fastformer.nn.LayerNorm(8, residual_in_fp32=1), TypeError, "residual_in_fp32"),
        (lambda: fastformer.nn.RMSNorm(8, residual_in_fp32="yes"), TypeError, "residual_in_fp32"),
        (lambda: fastformer.nn.LayerNorm(8, elementwise_affine=None), TypeError, "affine"),
        (lambda: fastformer.nn.LayerNorm(8, bias=1), TypeError, "bias"),
        (lambda: fastformer.nn.LayerNorm(0), ValueError, "normalized_shape"),
        (lambda: fastformer.nn.RMSNorm((4, 2.5)), TypeError, "normalized_shape"),
        (lambda: fastformer.nn.LayerNorm(8, eps=float("nan")), ValueError, "eps"),
        (lambda: fastformer.nn.RMSNorm(8, dropout=1.0), ValueError, "dropout"),
        (lambda: fastformer.nn.FeedForward(8, 16, recompute=1), TypeError, "recompute"),
        (lambda: fastformer.nn.FeedForward(8, 16, bias="no"), TypeError, "bias"),
        (lambda: fastformer.nn.FeedForward(8, -1), ValueError, "dim_feedforward"),
        (lambda: fastformer.nn.FeedForward(8.0, 16), TypeError, "d_model"),
    ],
)
def test_modules_check_their_arguments_when_built(build, error, name):
    with pytest.raises(error, match=name):
        build()


def test_feed_forward_from_layer_keeps_the_layer_training_mode():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.5).eval()
    ff = fastformer.nn.FeedForward.from_transformer_layer(layer)
    assert not ff.training
    x = torch.randn(6, 16)
    torch.testing.assert_close(ff(x), layer._ff_block(x))  # no dropout in eval
    assert fastformer.nn.FeedForward.from_transformer_layer(layer.train()).training
