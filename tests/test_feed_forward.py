"""fastformer.feed_forward and fastformer.nn.FeedForward against fastformer/reference.py, on
every implementation this machine runs (C++ on CPU; the CUDA kernels on a GPU, through both
of their GEMM paths)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastformer
from fastformer import backend, reference
from tests.conftest import HAS_CUDA, requires_extension
from tests.tolerance import assert_all_close_to_reference

pytestmark = requires_extension

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]
GATED = ("swiglu", "geglu")
# (device, CUDA GEMM path or None, dtype, atol). CPU runs fp32, fp16 and bf16 through the
# C++ kernels; a GPU runs fp32, fp16 and bf16 with the separate and the cuBLASLt epilogues.
_CUDA_READY = (
    HAS_CUDA
    and backend.implementation("feed_forward", torch.device("cuda"), torch.float32)
    == backend.CUDA_CPP
)
_DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]
CASES = [
    pytest.param("cpu", None, dtype, atol, id=f"cpu-{str(dtype)[6:]}") for dtype, atol in _DTYPES
] + [
    pytest.param("cuda", path, dtype, atol, id=f"cuda-{path}-{str(dtype)[6:]}")
    for path in ("separate", "cublaslt")
    for dtype, atol in _DTYPES
    if _CUDA_READY
]
# (tokens..., d_model, hidden, d_out): one token, odd sizes (primes, not multiples of any
# vector width), 3-D input, d_out != d_model.
SHAPES = [((1,), 8, 16, 8), ((37,), 24, 40, 19), ((2, 17), 33, 65, 33)]


@pytest.fixture
def gemm_path(monkeypatch):
    """Selects the CUDA GEMM path (FASTFORMER_FF_EPILOGUE) for the rest of the test."""

    def select(path: str | None) -> None:
        if path is not None:
            monkeypatch.setenv("FASTFORMER_FF_EPILOGUE", path)

    return select


def _inputs(tokens, d_model, hidden, d_out, activation, dtype, device, *, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=generator)).to(device=device, dtype=dtype)

    rows = 2 * hidden if activation in GATED else hidden
    # Weights scaled as a trained layer's (so activations are O(1), not saturated).
    return {
        "x": rand(*tokens, d_model),
        "w1": rand(rows, d_model, scale=d_model**-0.5),
        "b1": rand(rows) if bias else None,
        "w2": rand(d_out, hidden, scale=hidden**-0.5),
        "b2": rand(d_out) if bias else None,
    }


def _run(fn, tensors, grad_out, **kwargs):
    """Forward and backward of fn; returns out and the gradient of every input."""
    leaves = {
        k: None if v is None else v.detach().clone().requires_grad_() for k, v in tensors.items()
    }
    out = fn(leaves["x"], leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"], **kwargs)
    out.backward(grad_out.to(out.dtype))
    results = {"out": out.detach()}
    for name, leaf in leaves.items():
        results[f"grad_{name}"] = None if leaf is None else leaf.grad
    return results


def _check_against_reference(tensors, atol, *, dropout_mask=None, **kwargs):
    """The DESIGN.md rule for out and every gradient: fastformer vs the reference in the same
    dtype, both against the reference in float64 (on the CPU)."""
    grad_out = torch.randn(
        *tensors["x"].shape[:-1], tensors["w2"].shape[0], generator=torch.Generator().manual_seed(1)
    )
    fast = _run(fastformer.feed_forward, tensors, grad_out.to(tensors["x"].device), **kwargs)
    kwargs.pop("recompute", None)
    mask = {"dropout_mask": dropout_mask} if dropout_mask is not None else {}
    same = _run(reference.feed_forward, tensors, grad_out.to(tensors["x"].device), **kwargs, **mask)
    as64 = {k: None if v is None else v.detach().cpu().double() for k, v in tensors.items()}
    if dropout_mask is not None:
        mask = {"dropout_mask": dropout_mask.cpu()}
    ref64 = _run(reference.feed_forward, as64, grad_out.double(), **kwargs, **mask)
    fast = {k: None if v is None else v.cpu() for k, v in fast.items()}
    same = {k: None if v is None else v.cpu() for k, v in same.items()}
    assert_all_close_to_reference(fast, same, ref64, atol)


@pytest.mark.parametrize("device, path, dtype, atol", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
def test_matches_reference(gemm_path, device, path, dtype, atol, activation, bias, shape):
    gemm_path(path)
    tensors = _inputs(*shape, activation, dtype, device, bias=bias)
    _check_against_reference(tensors, atol, activation=activation)


@pytest.mark.parametrize("device, path, dtype, atol", CASES)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_recompute_gives_the_same_gradients(gemm_path, device, path, dtype, atol, activation):
    gemm_path(path)
    tensors = _inputs((29,), 16, 48, 16, activation, dtype, device)
    grad_out = torch.randn(29, 16, device=device, dtype=dtype)
    saved = _run(fastformer.feed_forward, tensors, grad_out, activation=activation)
    recomputed = _run(
        fastformer.feed_forward, tensors, grad_out, activation=activation, recompute=True
    )
    for name, value in saved.items():
        torch.testing.assert_close(recomputed[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device, path, dtype, atol", CASES)
def test_non_contiguous_input(gemm_path, device, path, dtype, atol):
    gemm_path(path)
    tensors = _inputs((24,), 20, 36, 20, "gelu", dtype, device)
    tensors["x"] = tensors["x"].t().contiguous().t()  # (24, 20) with strides (1, 24)
    tensors["w1"] = tensors["w1"].t().contiguous().t()
    assert not tensors["x"].is_contiguous()
    _check_against_reference(tensors, atol, activation="gelu")


def test_zero_tokens():
    tensors = _inputs((0,), 8, 16, 8, "gelu", torch.float32, "cpu")
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    out = fastformer.feed_forward(*leaves.values())
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(leaves["w1"].grad, torch.zeros_like(leaves["w1"]))
    assert torch.equal(leaves["b2"].grad, torch.zeros_like(leaves["b2"]))


# ----------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------


def _dropout_mask(tensors, activation, p, seed):
    """The mask fastformer draws after torch.manual_seed(seed): read off a run whose second
    layer is the identity, so out = dropout(act(pre)) (act(pre) is never exactly 0 here)."""
    hidden = tensors["w2"].shape[1]
    probe = dict(
        tensors, w2=torch.eye(hidden, dtype=tensors["x"].dtype, device=tensors["x"].device)
    )
    probe["b2"] = None
    torch.manual_seed(seed)
    with torch.no_grad():
        out = fastformer.feed_forward(*probe.values(), activation=activation, dropout_p=p)
    return out != 0


@pytest.mark.parametrize("device, path, dtype, atol", CASES)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dropout_matches_reference_with_its_mask(gemm_path, device, path, dtype, atol, activation):
    gemm_path(path)
    p = 0.3
    tensors = _inputs((33,), 16, 40, 16, activation, dtype, device)
    mask = _dropout_mask(tensors, activation, p, seed=7)
    torch.manual_seed(7)  # the same seed: the op draws the same mask
    _check_against_reference(tensors, atol, activation=activation, dropout_p=p, dropout_mask=mask)


@pytest.mark.parametrize("device, path, dtype, atol", CASES[:1] + CASES[3:4])
def test_dropout_statistics_and_seeding(gemm_path, device, path, dtype, atol):
    gemm_path(path)
    p = 0.25
    tensors = _inputs((256,), 32, 512, 32, "gelu", dtype, device)
    mask = _dropout_mask(tensors, "gelu", p, seed=3)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    assert torch.equal(mask, _dropout_mask(tensors, "gelu", p, seed=3))
    assert not torch.equal(mask, _dropout_mask(tensors, "gelu", p, seed=4))


def test_dropout_off_in_eval_and_at_zero():
    tensors = _inputs((9,), 8, 16, 8, "gelu", torch.float32, "cpu")
    plain = fastformer.feed_forward(*tensors.values())
    for kwargs in ({"dropout_p": 0.5, "training": False}, {"dropout_p": 0.0}):
        torch.testing.assert_close(fastformer.feed_forward(*tensors.values(), **kwargs), plain)


def test_activation_checkpointing_recomputes_the_same_mask():
    tensors = _inputs((17,), 12, 24, 12, "silu", torch.float32, "cpu")

    def block(*args):
        return fastformer.feed_forward(*args, activation="silu", dropout_p=0.4)

    leaves = [v.clone().requires_grad_() for v in tensors.values()]
    torch.manual_seed(0)
    plain = block(*leaves)
    plain.sum().backward()
    plain_grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    torch.manual_seed(0)
    checkpointed = torch.utils.checkpoint.checkpoint(block, *leaves, use_reentrant=False)
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    for leaf, grad in zip(leaves, plain_grads, strict=True):
        torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# Memory: what backward keeps
# ----------------------------------------------------------------------------------------


def _saved_activation_bytes(fn, tensors, **kwargs) -> int:
    """Bytes of the tensors autograd saves for backward, parameters and input excluded."""
    leaves = [v.clone().requires_grad_() for v in tensors.values()]
    owned = {leaf.data_ptr() for leaf in leaves}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in owned:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves, **kwargs)
    return sum(saved.values())


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_backward_keeps_less_than_eager(activation):
    tensors = _inputs((64,), 32, 128, 32, activation, torch.float32, "cpu")
    eager = _saved_activation_bytes(
        reference.feed_forward, tensors, activation=activation, dropout_p=0.1
    )
    fast = _saved_activation_bytes(
        fastformer.feed_forward, tensors, activation=activation, dropout_p=0.1
    )
    pre_bytes = 64 * tensors["w1"].shape[0] * 4
    assert fast <= pre_bytes + 64, (fast, eager)  # pre (and the seed), nothing else
    assert fast < eager
    recomputed = _saved_activation_bytes(
        fastformer.feed_forward, tensors, activation=activation, dropout_p=0.1, recompute=True
    )
    assert recomputed <= 64  # the seed only


# ----------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, autocast
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(activation, dropout_p):
    tensors = _inputs((5,), 4, 6, 3, activation, torch.float64, "cpu")
    leaves = [v.clone().requires_grad_() for v in tensors.values()]

    def fn(*args):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return fastformer.feed_forward(*args, activation=activation, dropout_p=dropout_p)

    assert torch.autograd.gradcheck(fn, leaves)


def _opcheck_args(activation: str, dropout_p: float) -> list[tuple]:
    tensors = _inputs((7,), 8, 12, 5, activation, torch.float32, "cpu")
    seed = torch.tensor([1234], dtype=torch.int64) if dropout_p else None
    x, w1, b1, w2, b2 = (t.requires_grad_() for t in tensors.values())
    return [
        (x, w1, b1, w2, b2, activation, dropout_p, seed, True),
        (x, w1, None, w2, None, activation, dropout_p, seed, False),
    ]


@pytest.mark.parametrize("activation, dropout_p", [("gelu", 0.0), ("swiglu", 0.2), ("relu", 0.0)])
def test_opcheck(activation, dropout_p):
    for args in _opcheck_args(activation, dropout_p):
        torch.library.opcheck(torch.ops.fastformer.feed_forward_fwd.default, args)
    x, w1, b1, w2, _b2, *_ = _opcheck_args(activation, dropout_p)[0]
    seed = torch.tensor([1234], dtype=torch.int64) if dropout_p else None
    _, preact = torch.ops.fastformer.feed_forward_fwd(
        x, w1, b1, w2, None, activation, dropout_p, seed, True
    )
    grad_out = torch.randn(7, 5)
    # The backward op is not differentiable (it says so): its inputs carry no grad here.
    x, w1, b1, w2 = (t.detach() for t in (x, w1, b1, w2))
    for saved in (preact.detach(), None):
        bwd_args = (grad_out, x, w1, b1, w2, saved, activation, dropout_p, seed, True)
        torch.library.opcheck(torch.ops.fastformer.feed_forward_bwd.default, bwd_args)


@pytest.mark.parametrize("backend_name", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend_name):
    module = fastformer.nn.FeedForward(16, 40, activation="swiglu")
    x = torch.randn(3, 11, 16, requires_grad=True)

    def loss_and_grads(fn):
        loss = fn(x).square().mean()
        return (loss, *torch.autograd.grad(loss, [x, *module.parameters()]))

    eager = loss_and_grads(module)
    compiled = loss_and_grads(torch.compile(module, fullgraph=True, backend=backend_name))
    for expected, actual in zip(eager, compiled, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_autocast_bfloat16_cpu():
    tensors = _inputs((13,), 16, 32, 16, "gelu", torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastformer.feed_forward(*tensors.values())
    assert out.dtype == torch.bfloat16
    as16 = {k: v.bfloat16() for k, v in tensors.items()}
    same = reference.feed_forward(*as16.values())
    ref64 = reference.feed_forward(*(v.double() for v in as16.values()))
    assert_all_close_to_reference({"out": out}, {"out": same}, {"out": ref64}, 1e-2)


def test_autocast_leaves_float64_alone():
    """Autocast casts float32 (and half) tensors, never float64 ones: nn.Linear's rule."""
    tensors = _inputs((5,), 8, 16, 8, "gelu", torch.float64, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastformer.feed_forward(*tensors.values())
        eager = F.linear(
            F.gelu(F.linear(tensors["x"], tensors["w1"], tensors["b1"])),
            tensors["w2"],
            tensors["b2"],
        )
    assert out.dtype == eager.dtype == torch.float64
    torch.testing.assert_close(out, reference.feed_forward(*tensors.values()))


# ----------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", torch.nn.functional.gelu])
def test_module_matches_torch_transformer_layer(activation):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        24, 4, dim_feedforward=56, activation=activation, batch_first=True
    ).eval()
    x = torch.randn(3, 10, 24)
    expected = layer._ff_block(x)  # linear2(dropout(activation(linear1(x)))) then dropout2
    shared = fastformer.nn.FeedForward.from_transformer_layer(layer).eval()
    torch.testing.assert_close(shared(x), expected, rtol=1e-5, atol=1e-5)
    assert shared.linear1 is layer.linear1

    loaded = fastformer.nn.FeedForward(24, 56, activation=activation).eval()
    ff_keys = {k: v for k, v in layer.state_dict().items() if k.startswith(("linear1", "linear2"))}
    loaded.load_state_dict(ff_keys)
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_module_gated_shapes_and_repr():
    module = fastformer.nn.FeedForward(16, 24, activation="geglu", dropout=0.1, bias=False)
    assert module.linear1.weight.shape == (48, 16) and module.linear1.bias is None
    assert module.linear2.weight.shape == (16, 24)
    assert module(torch.randn(5, 16)).shape == (5, 16)
    assert "geglu" in repr(module) and "dropout=0.1" in repr(module)
    with pytest.raises(ValueError, match="activation must be one of"):
        fastformer.nn.FeedForward(16, 24, activation=torch.tanh)


# ----------------------------------------------------------------------------------------
# Bad input and reporting
# ----------------------------------------------------------------------------------------


def _bad(change):
    tensors = _inputs((4,), 8, 16, 6, "gelu", torch.float32, "cpu")
    kwargs = {"activation": "gelu"}
    change(tensors, kwargs)
    return tensors, kwargs


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda t, k: t.update(x=t["x"].double()), TypeError, "w1 must have x's dtype"),
        (lambda t, k: t.update(x=t["x"].int()), TypeError, "x must have dtype in"),
        (lambda t, k: t.update(x=t["x"][:, :7]), ValueError, r"w1 must have shape \[hidden, 7\]"),
        (lambda t, k: t.update(w2=t["w2"][:, :15]), ValueError, r"w2 must have shape \[d_out, 16"),
        (lambda t, k: t.update(b1=t["b1"][:3]), ValueError, r"b1 must have shape \[16\]"),
        (lambda t, k: t.update(b2=t["b2"][None]), ValueError, r"b2 must have shape \[6\]"),
        (lambda t, k: t.update(w1=t["w1"][0]), ValueError, "w1 must have shape"),
        (lambda t, k: t.update(x=torch.tensor(1.0)), ValueError, "x must have a last"),
        (lambda t, k: t.update(w1="w"), TypeError, "w1 must be a torch.Tensor"),
        (lambda t, k: t.update(w2=t["w2"].to("meta")), ValueError, "w2 must be on the same"),
        (lambda t, k: k.update(activation="tanh"), ValueError, "activation must be one of"),
        (lambda t, k: k.update(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (lambda t, k: k.update(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        (lambda t, k: k.update(recompute=1), TypeError, "recompute must be a bool"),
        (
            lambda t, k: (k.update(activation="swiglu"), t.update(w1=t["w1"][:15])),
            ValueError,
            "even number of rows",
        ),
    ],
)
def test_bad_input_names_the_argument(change, error, message):
    tensors, kwargs = _bad(change)
    with pytest.raises(error, match=message):
        fastformer.feed_forward(*tensors.values(), **kwargs)


def test_dispatcher_op_checks_its_arguments():
    x, w1, b1, w2, b2 = _inputs((4,), 8, 16, 6, "gelu", torch.float32, "cpu").values()
    with pytest.raises(RuntimeError, match="w2 must have shape"):
        torch.ops.fastformer.feed_forward_fwd(x, w1, b1, w2[:, :3], b2, "gelu", 0.0, None, False)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.fastformer.feed_forward_fwd(x, w1, b1, w2, b2, "tanh", 0.0, None, False)
    with pytest.raises(RuntimeError, match="seed is required"):
        torch.ops.fastformer.feed_forward_fwd(x, w1, b1, w2, b2, "gelu", 0.5, None, False)


def test_info_reports_the_implementation():
    ops = fastformer.info()["ops"]["feed_forward"]
    assert ops["cpu"]["float32"] == backend.CPP
    if HAS_CUDA:
        expected = backend.CUDA_CPP if _CUDA_READY else backend.TORCH_FALLBACK
        assert ops["cuda"]["bfloat16"] == expected
        assert ops["cuda"]["float64"] == backend.TORCH_FALLBACK


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_unsupported_case_falls_back_visibly():
    tensors = _inputs((4,), 8, 16, 6, "gelu", torch.float64, "cuda")
    before = fastformer.info()["fallback_calls"].get("feed_forward", 0)
    out = fastformer.feed_forward(*tensors.values())
    assert fastformer.info()["fallback_calls"]["feed_forward"] == before + 1
    expected = reference.feed_forward(*tensors.values())
    torch.testing.assert_close(out, expected)


@pytest.mark.skipif(not _CUDA_READY, reason="needs the CUDA kernels (a GPU and an nvcc build)")
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "gelu"])
def test_cublaslt_epilogues_run_on_aligned_shapes(gemm_path, dtype, atol, activation):
    """On sizes cuBLASLt takes (multiples of 8), its epilogues must run, not decline and
    hand over to the separate path (which warns): a warning fails this test."""
    gemm_path("cublaslt")
    tensors = _inputs((256,), 512, 1024, 512, activation, dtype, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_against_reference(tensors, atol, activation=activation)


def test_double_backward_raises_clearly():
    tensors = _inputs((5,), 8, 16, 8, "gelu", torch.float32, "cpu")
    leaves = [v.clone().requires_grad_() for v in tensors.values()]
    out = fastformer.feed_forward(*leaves)
    (grad_x,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


@pytest.mark.parametrize("library", ["mkl", "onednn"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cpu_gemms_through_either_library(monkeypatch, library, activation, dtype, atol):
    """FASTFORMER_CPU_GEMM picks the library of the F.linear-form GEMMs (the default depends
    on the CPU's maker): both give the reference's results."""
    monkeypatch.setenv("FASTFORMER_CPU_GEMM", library)
    tensors = _inputs((37,), 24, 40, 19, activation, dtype, "cpu")
    _check_against_reference(tensors, atol, activation=activation)


def test_cpu_gemm_setting_must_name_a_library(monkeypatch):
    monkeypatch.setenv("FASTFORMER_CPU_GEMM", "blis")
    tensors = _inputs((5,), 8, 16, 8, "gelu", torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="FASTFORMER_CPU_GEMM must be 'onednn', 'mkl'"):
        fastformer.feed_forward(**tensors, activation="gelu")
