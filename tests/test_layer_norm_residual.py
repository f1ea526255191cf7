"""fastformer.layer_norm_residual against fastformer/reference.py, on every implementation
this machine runs (C++ CPU; Triton through the interpreter on CPU, natively on a GPU)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import fastformer
from fastformer import reference
from tests.conftest import implementation_cases, requires_extension
from tests.tolerance import assert_all_close_to_reference


@dataclass(frozen=True)
class Flags:
    residual: bool = True
    weight: bool = True
    bias: bool = True
    rms_norm: bool = False
    residual_in_fp32: bool = False
    residual_fp32: bool = False  # pass the residual itself in float32
    params_fp32: bool = False  # float32 weight/bias with half-precision x (autocast style)


FLAG_CASES = {
    "layernorm": Flags(residual=False),
    "residual": Flags(),
    "rmsnorm": Flags(rms_norm=True, bias=False),
    "rmsnorm-bias": Flags(rms_norm=True),
    "no-affine": Flags(weight=False, bias=False),
    "weight-only": Flags(bias=False),
    "residual-in-fp32": Flags(residual_in_fp32=True),
    "first-layer-fp32": Flags(residual=False, residual_in_fp32=True),
    "fp32-residual": Flags(residual_fp32=True),
    "fp32-params": Flags(params_fp32=True, rms_norm=True),
}
# (rows..., hidden): one row, hidden 1, primes, not a multiple of any block, 3-D input;
# (257, 33) gives each backward program several row tiles, the last one partial.
SHAPES = [(1, 7), (5, 1), (33, 1023), (3, 1500), (2, 3, 40), (257, 33)]


def _inputs(shape, dtype, device, flags: Flags, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*size, dtype=dtype):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    hidden = shape[-1]
    half_x = dtype in (torch.float16, torch.bfloat16)
    residual_dtype = torch.float32 if flags.residual_fp32 and half_x else dtype
    param_dtype = torch.float32 if flags.params_fp32 else dtype
    return {
        "x": rand(*shape),
        "residual": rand(*shape, dtype=residual_dtype) if flags.residual else None,
        # weight around 1 and bias around 0 like trained parameters, but never exactly.
        "weight": (1 + 0.5 * rand(hidden, dtype=torch.float32)).to(param_dtype)
        if flags.weight
        else None,
        "bias": rand(hidden, dtype=param_dtype) if flags.bias else None,
    }


def _run(fn, tensors, grads, **kwargs):
    """Forward and backward of fn; returns out, h and the gradient of every input."""
    leaves = {
        k: None if v is None else v.detach().clone().requires_grad_() for k, v in tensors.items()
    }
    out, h = fn(leaves["x"], leaves["residual"], leaves["weight"], leaves["bias"], **kwargs)
    torch.autograd.backward([out, h], [grads["out"].to(out.dtype), grads["h"].to(h.dtype)])
    results = {"out": out.detach(), "h": h.detach()}
    for name, leaf in leaves.items():
        results[f"grad_{name}"] = None if leaf is None else leaf.grad
    return results


def _check_against_reference(tensors, atol, *, dropout_mask=None, **kwargs):
    x = tensors["x"]
    # A private generator: the op's dropout seed comes from the global one.
    generator = torch.Generator().manual_seed(1)
    grads = {name: torch.randn(x.shape, generator=generator).to(x.device) for name in ("out", "h")}
    fast = _run(fastformer.layer_norm_residual, tensors, grads, **kwargs)
    same = _run(reference.layer_norm_residual, tensors, grads, dropout_mask=dropout_mask, **kwargs)
    as64 = {k: None if v is None else v.double() for k, v in tensors.items()}
    ref64 = _run(reference.layer_norm_residual, as64, grads, dropout_mask=dropout_mask, **kwargs)
    # Results in float64 are compared with float64; the dtypes the op returns must match.
    assert_all_close_to_reference(fast, same, ref64, atol)


@requires_extension
@pytest.mark.parametrize("device, impl, dtype, atol", implementation_cases())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("flags", FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_matches_reference(use_implementation, device, impl, dtype, atol, shape, flags):
    use_implementation(device, impl)
    tensors = _inputs(shape, dtype, device, flags, seed=hash((shape, flags)) % 2**31)
    _check_against_reference(
        tensors, atol, rms_norm=flags.rms_norm, residual_in_fp32=flags.residual_in_fp32, eps=1e-5
    )


@requires_extension
@pytest.mark.slow
@pytest.mark.parametrize("device, impl, dtype, atol", implementation_cases())
@pytest.mark.parametrize("rows, hidden", [(19, 16384 + 3), (3, 65536)])
def test_large_hidden(use_implementation, device, impl, dtype, atol, rows, hidden):
    """Rows longer than a register tile take the chunked path; 19 rows give backward
    programs several rows each, accumulating their weight-gradient partials."""
    use_implementation(device, impl)
    for rms_norm in (False, True):
        tensors = _inputs((rows, hidden), dtype, device, Flags(rms_norm=rms_norm))
        _check_against_reference(tensors, atol, rms_norm=rms_norm)


@requires_extension
@pytest.mark.parametrize("device, impl, dtype, atol", implementation_cases())
@pytest.mark.parametrize("used", ["out", "h"])
def test_gradients_through_one_output(use_implementation, device, impl, dtype, atol, used):
    """Backward from out alone or from h alone: the op gets no gradient for the other (not
    a zero-filled one) and must give the reference's gradients, whose cotangent for the
    unused output is zero."""
    use_implementation(device, impl)
    tensors = _inputs((13, 40), dtype, device, Flags())
    generator = torch.Generator().manual_seed(4)
    cotangent = torch.randn(13, 40, generator=generator).to(device)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    outputs = dict(zip(("out", "h"), fastformer.layer_norm_residual(*leaves.values()), strict=True))
    outputs[used].backward(cotangent.to(outputs[used].dtype))
    fast = {"out": outputs["out"].detach(), "h": outputs["h"].detach()}
    fast.update({f"grad_{name}": leaf.grad for name, leaf in leaves.items()})
    grads = {n: cotangent if n == used else torch.zeros_like(cotangent) for n in ("out", "h")}
    same = _run(reference.layer_norm_residual, tensors, grads)
    as64 = {k: v.double() for k, v in tensors.items()}
    assert_all_close_to_reference(
        fast, same, _run(reference.layer_norm_residual, as64, grads), atol
    )


@requires_extension
@pytest.mark.parametrize("device, impl, dtype, atol", implementation_cases())
def test_non_contiguous_inputs(use_implementation, device, impl, dtype, atol):
    use_implementation(device, impl)
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(19, 70, generator=generator).to(device=device, dtype=dtype)
    transposed = torch.randn(37, 19, generator=generator).to(device=device, dtype=dtype).t()
    tensors = {
        "x": wide[:, 3:40],  # row slice: a row stride wider than the row
        "residual": transposed,  # column-major: copied into rows
        "weight": torch.randn(74, generator=generator).to(device=device, dtype=dtype)[::2],
        "bias": torch.randn(37, generator=generator).to(device=device, dtype=dtype),
    }
    _check_against_reference(tensors, atol)
    broadcast = dict(
        tensors,
        residual=torch.randn(1, 37, generator=generator)
        .to(device=device, dtype=dtype)
        .expand(19, 37),
    )
    _check_against_reference(broadcast, atol)  # rows of stride 0


@requires_extension
@pytest.mark.parametrize("device, impl, dtype, atol", implementation_cases())
def test_zero_rows(use_implementation, device, impl, dtype, atol):
    use_implementation(device, impl)
    x = torch.randn(0, 8, device=device, dtype=dtype, requires_grad=True)
    out, h = fastformer.layer_norm_residual(x, torch.randn_like(x), dropout_p=0.1)
    assert out.shape == h.shape == (0, 8)
    (out.sum() + h.sum()).backward()
    assert x.grad.shape == (0, 8)


# ----------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------


def _dropout_mask(shape, p, seed, device, dtype):
    """The keep-mask the op draws under this seed, read off h = dropout(ones)."""
    torch.manual_seed(seed)
    _, h = fastformer.layer_norm_residual(
        torch.ones(shape, device=device, dtype=dtype), dropout_p=p
    )
    return h != 0


@requires_extension
@pytest.mark.parametrize("device, impl, dtype, atol", implementation_cases())
@pytest.mark.parametrize("rms_norm", [False, True])
def test_dropout_matches_reference_with_its_mask(
    use_implementation, device, impl, dtype, atol, rms_norm
):
    use_implementation(device, impl)
    shape, p = (23, 257), 0.3
    tensors = _inputs(shape, dtype, device, Flags(rms_norm=rms_norm))
    mask = _dropout_mask(shape, p, seed=7, device=device, dtype=dtype)
    torch.manual_seed(7)  # the op draws the same seed again inside _check_against_reference
    _check_against_reference(tensors, atol, dropout_mask=mask, dropout_p=p, rms_norm=rms_norm)


@requires_extension
@pytest.mark.parametrize("device, impl, dtype, atol", implementation_cases())
def test_dropout_statistics_and_seeding(use_implementation, device, impl, dtype, atol):
    use_implementation(device, impl)
    p = 0.37
    shape = (512, 1000) if impl == "c++" else (128, 1000)  # the interpreter is slow
    masks = [_dropout_mask(shape, p, seed, device, dtype) for seed in (1, 1, 2)]
    kept = masks[0].float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, f"kept fraction {kept:.4f}, expected {1 - p}"
    assert torch.equal(masks[0], masks[1]), "same seed must give the same mask"
    assert not torch.equal(masks[0], masks[2]), "another seed must give another mask"
    # Kept elements are scaled by 1 / (1 - p), the rest are exactly zero.
    torch.manual_seed(1)
    _, h = fastformer.layer_norm_residual(
        torch.ones(shape, device=device, dtype=dtype), dropout_p=p
    )
    expected = torch.tensor(1 / (1 - p), dtype=dtype).item()
    assert torch.all((h == 0) | (h == expected))


@requires_extension
def test_dropout_off_in_eval_and_at_zero(use_implementation):
    x = torch.randn(4, 9)
    for kwargs in ({"dropout_p": 0.5, "training": False}, {"dropout_p": 0.0}):
        out, h = fastformer.layer_norm_residual(x, **kwargs)
        assert h is x, "without residual or dropout, h is x itself"
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (9,)))


@requires_extension
@pytest.mark.skipif(
    not fastformer.backend.triton_interpreter_enabled(), reason="needs the Triton interpreter"
)
def test_cpp_and_triton_draw_the_same_mask(use_implementation):
    """Both implementations run Triton's Philox: the same seed gives the same mask."""
    masks = {}
    for impl in ("c++", "triton"):
        use_implementation("cpu", impl)
        masks[impl] = _dropout_mask((37, 129), 0.5, seed=11, device="cpu", dtype=torch.float32)
    assert torch.equal(masks["c++"], masks["triton"])


@requires_extension
def test_activation_checkpointing_recomputes_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    x0, residual0 = torch.randn(16, 64), torch.randn(16, 64)
    weight0 = torch.randn(64)

    def block(x, residual, weight):
        out, h = fastformer.layer_norm_residual(x, residual, weight, dropout_p=0.4)
        return (out * h).sum()

    grads = []
    for use_checkpoint in (False, True):
        inputs = [t.clone().requires_grad_() for t in (x0, residual0, weight0)]
        torch.manual_seed(5)
        loss = checkpoint(block, *inputs, use_reentrant=False) if use_checkpoint else block(*inputs)
        loss.backward()
        grads.append([t.grad for t in inputs])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, autocast
# ----------------------------------------------------------------------------------------


@requires_extension
@pytest.mark.parametrize("rms_norm", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_gradcheck_float64_cpp(rms_norm, dropout_p):
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(*s, dtype=torch.float64, generator=generator, requires_grad=True)
        for s in ((3, 2, 11), (3, 2, 11), (11,), (11,))
    ]

    def fn(x, residual, weight, bias):
        torch.manual_seed(3)  # the same dropout mask at every evaluation
        out, h = fastformer.layer_norm_residual(
            x, residual, weight, bias, rms_norm=rms_norm, dropout_p=dropout_p
        )
        return out, h

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def _opcheck_args(dtype=torch.float32):
    x = torch.randn(6, 13, dtype=dtype, requires_grad=True)
    residual = torch.randn(6, 13, dtype=dtype, requires_grad=True)
    weight = torch.randn(13, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    seed = torch.tensor([42], dtype=torch.int64)
    return [
        (x, residual, weight, bias, seed, 1e-5, 0.2, False, torch.float32, True),
        (x, None, weight, None, None, 1e-6, 0.0, True, dtype, False),
    ]


@requires_extension
@pytest.mark.parametrize("impl", ["c++", "triton"])
def test_opcheck(use_implementation, impl):
    if impl == "triton" and not fastformer.backend.triton_interpreter_enabled():
        pytest.skip("needs the Triton interpreter")
    use_implementation("cpu", impl)
    for args in _opcheck_args():
        torch.library.opcheck(torch.ops.fastformer.layer_norm_residual_fwd.default, args)
    x = torch.randn(6, 13)
    _out, _h, mean, rstd = torch.ops.fastformer.layer_norm_residual_fwd(
        x, None, None, None, None, 1e-5, 0.0, False, torch.float32, False
    )
    bwd_args = (
        torch.randn(6, 13),
        torch.randn(6, 13),
        x,
        torch.randn(13),
        mean,
        rstd,
        None,
        0.0,
        False,
        True,
        torch.float32,
        torch.float32,
        False,
    )
    torch.library.opcheck(torch.ops.fastformer.layer_norm_residual_bwd.default, bwd_args)


def _compile_block(dropout_p):
    def block(x, residual, weight, bias):
        out, h = fastformer.layer_norm_residual(x, residual, weight, bias, dropout_p=dropout_p)
        return out.relu().sum() + h.square().sum()

    return block


def _loss_and_grads(fn, inputs, seed=0):
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed)
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach(), *(t.grad for t in leaves)]


@requires_extension
@pytest.mark.parametrize("backend_name", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend_name):
    torch._dynamo.reset()
    inputs = [torch.randn(*s) for s in ((4, 5, 24), (4, 5, 24), (24,), (24,))]
    block = _compile_block(dropout_p=0.0)
    compiled = torch.compile(block, fullgraph=True, backend=backend_name)
    for eager, compiled_result in zip(
        _loss_and_grads(block, inputs), _loss_and_grads(compiled, inputs), strict=True
    ):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-5)


@requires_extension
def test_torch_compile_dropout_is_seeded():
    """Compiled, the seed comes from inductor's own generator (other numbers than eager's),
    still reproducible under torch.manual_seed; aot_eager keeps eager's numbers exactly."""
    torch._dynamo.reset()
    inputs = [torch.randn(*s) for s in ((6, 40), (6, 40), (40,), (40,))]
    block = _compile_block(dropout_p=0.3)
    eager = _loss_and_grads(block, inputs)
    same = _loss_and_grads(torch.compile(block, fullgraph=True, backend="aot_eager"), inputs)
    for a, b in zip(eager, same, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    first, again = _loss_and_grads(compiled, inputs), _loss_and_grads(compiled, inputs)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@requires_extension
def test_autocast_bfloat16_cpu():
    """Under autocast the activations are bfloat16 while the weights stay float32."""
    linear = torch.nn.Linear(32, 32)
    norm = fastformer.nn.LayerNorm(32)
    x, residual = torch.randn(8, 32), torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x)
        out, h = norm(y, residual)
    assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert h.dtype == torch.float32  # the float32 residual keeps the stream in float32
    expected_out, expected_h = reference.layer_norm_residual(
        y.double(), residual.double(), norm.weight.double(), norm.bias.double()
    )
    torch.testing.assert_close(h.double(), expected_h, rtol=0, atol=1e-2)
    torch.testing.assert_close(out.double(), expected_out, rtol=0, atol=5e-2)
    out.float().sum().backward()
    assert norm.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------

BAD_INPUTS = [
    ({"x": "not a tensor"}, TypeError, "x must be a torch.Tensor"),
    ({"x": torch.ones(2, 3, dtype=torch.int32)}, TypeError, "x must have dtype"),
    ({"x": torch.ones(())}, ValueError, "last .*dimension"),
    ({"x": torch.ones(2, 0)}, ValueError, "last .*dimension"),
    ({"residual": torch.ones(2, 4)}, ValueError, r"residual must have shape \[2, 3\]"),
    ({"weight": torch.ones(4)}, ValueError, r"weight must have shape \[3\]"),
    ({"bias": torch.ones(3, 1)}, ValueError, r"bias must have shape \[3\]"),
    (
        {"residual": torch.ones(2, 3, dtype=torch.float64)},
        TypeError,
        "residual must have x's dtype",
    ),
    (
        {"residual": torch.ones(2, 3, device="meta")},
        ValueError,
        "residual must be on the same device",
    ),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ({"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ({"dropout_p": float("nan")}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ({"eps": -1e-5}, ValueError, "eps must be a finite number >= 0"),
    ({"eps": float("inf")}, ValueError, "eps must be a finite number >= 0"),
    ({"eps": float("nan")}, ValueError, "eps must be a finite number >= 0"),
    ({"eps": 10**400}, ValueError, "eps must be a float >= 0, got an int beyond"),
    ({"eps": "1e-5"}, TypeError, "eps must be a float >= 0"),
    ({"rms_norm": 1}, TypeError, "rms_norm must be a bool"),
]


@pytest.mark.parametrize(
    "change, error, message",
    BAD_INPUTS,
    ids=[f"{next(iter(c))}-{i}" for i, (c, _, _) in enumerate(BAD_INPUTS)],
)
def test_bad_input_names_the_argument(change, error, message):
    arguments = {"x": torch.ones(2, 3), "residual": None, "weight": None, "bias": None}
    arguments.update(change)
    positional = [arguments.pop(k) for k in ("x", "residual", "weight", "bias")]
    with pytest.raises(error, match=message):
        fastformer.layer_norm_residual(*positional, **arguments)


def test_missing_extension_says_how_to_build(monkeypatch):
    from fastformer import _extension

    monkeypatch.setattr(_extension, "available", False)
    monkeypatch.setattr(_extension, "load_error", "ImportError: no module fastformer._C")
    with pytest.raises(fastformer.ExtensionNotBuiltError, match="pip install --no-build-isolation"):
        fastformer.layer_norm_residual(torch.ones(2, 3))


@requires_extension
@pytest.mark.skipif(
    not fastformer.backend.triton_interpreter_enabled(), reason="needs the Triton interpreter"
)
def test_unsupported_case_falls_back_visibly(use_implementation):
    """float64 has no Triton kernel: it runs plain PyTorch, warns, and info() counts it."""
    use_implementation("cpu", "triton")
    before = fastformer.info()["fallback_calls"].get("layer_norm_residual", 0)
    fastformer.backend._warned.discard("layer_norm_residual")
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="running plain PyTorch"):
        out, _ = fastformer.layer_norm_residual(x)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (5,)))
    assert fastformer.info()["fallback_calls"]["layer_norm_residual"] == before + 1
    assert fastformer.info()["ops"]["layer_norm_residual"]["cpu"]["float64"] == "torch (fallback)"


# ----------------------------------------------------------------------------------------
# The CPU output cache
# ----------------------------------------------------------------------------------------


@requires_extension
@pytest.mark.parametrize(
    "rows, cached",
    [(1024, True), (256, True), (16, False)],
    ids=["4MiB-huge-pages", "1MiB", "64KiB-torch-allocator"],
)
def test_cpu_outputs_from_the_cache_by_size(rows, cached):
    """Outputs of 256 KiB and more come from fastformer's cache (huge pages from 2 MiB),
    smaller ones from torch's allocator; either way they hold the results."""
    x = torch.randn(rows, 1024)
    fastformer.empty_cpu_cache()
    out, h = fastformer.layer_norm_residual(x, x)
    del out, h
    before = fastformer.info()["cpu_output_cache"]["reuses"]
    _out, h = fastformer.layer_norm_residual(x, x)
    assert fastformer.info()["cpu_output_cache"]["reuses"] == before + (2 if cached else 0)
    torch.testing.assert_close(h, x + x)
    fastformer.empty_cpu_cache()


_CACHE_BOUND_SCRIPT = """
import torch, fastformer
def run(rows):
    out, h = fastformer.layer_norm_residual(torch.ones(rows, 1024), torch.ones(rows, 1024))
    del out, h
    stats = fastformer.info()["cpu_output_cache"]
    assert stats["cached_mib"] <= 8, stats
    return stats
run(512)  # two 2 MiB outputs: 4 MiB cached
before = run(1024)["reuses"]  # two 4 MiB outputs: the 2 MiB blocks make room for both
assert run(1024)["reuses"] == before + 2, "the 4 MiB blocks were not both cached"
print("ok")
"""


@requires_extension
def test_cpu_cache_bound_evicts_the_least_recently_freed():
    """Under FASTFORMER_CPU_CACHE_MIB=8, outputs of a new size take the place of cached
    blocks of an older one (a fresh process: the bound is read once)."""
    result = subprocess.run(
        [sys.executable, "-c", _CACHE_BOUND_SCRIPT],
        env={**os.environ, "FASTFORMER_CPU_CACHE_MIB": "8"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@requires_extension
def test_cpu_outputs_reuse_freed_blocks_and_empty_releases_them():
    def stats():
        return fastformer.info()["cpu_output_cache"]

    x = torch.randn(1024, 1024)  # 4 MiB outputs: above the 2 MiB huge-page size
    fastformer.empty_cpu_cache()
    for _ in range(3):
        out, h = fastformer.layer_norm_residual(x, x)
        del out, h
    after_loop = stats()
    assert after_loop["cached_blocks"] >= 2 and after_loop["cached_mib"] >= 8
    reused = after_loop["reuses"]
    out, h = fastformer.layer_norm_residual(x, x)
    assert stats()["reuses"] == reused + 2
    torch.testing.assert_close(h, x + x)  # a reused block holds fresh results
    fastformer.empty_cpu_cache()
    assert stats()["cached_mib"] == 0
    # Outputs from the cache are ordinary tensors: resizable and picklable.
    out.resize_(2048, 1024)
    assert out.shape == (2048, 1024)
    buffer = io.BytesIO()
    torch.save(h, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), x + x)


def test_double_backward_raises_clearly():
    x = torch.randn(4, 16, requires_grad=True)
    out, _h = fastformer.layer_norm_residual(x, torch.randn(4, 16), torch.randn(16))
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


@requires_extension
@pytest.mark.parametrize("view", [False, True])
def test_leaf_x_and_residual_get_gradients_of_their_own(view):
    """x and residual have equal gradients; leaves (or views of leaves) must not share one
    tensor as .grad, or accumulating into one would change the other."""
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(4, 8, generator=generator, requires_grad=True)
    residual = torch.randn(4, 8, generator=generator, requires_grad=True)
    weight = torch.randn(8, generator=generator)
    grad_out = torch.randn(4, 8, generator=generator)
    inputs = (x.view(2, 2, 8), residual.view(2, 2, 8)) if view else (x, residual)
    for _ in range(2):  # two micro-batches: gradients accumulate
        out, _h = fastformer.layer_norm_residual(*inputs, weight)
        out.reshape(4, 8).backward(grad_out)
    assert x.grad.data_ptr() != residual.grad.data_ptr()
    expected = torch.autograd.grad(
        reference.layer_norm_residual(x, residual, weight)[0], x, grad_out
    )[0]
    torch.testing.assert_close(x.grad, 2 * expected)
    torch.testing.assert_close(residual.grad, 2 * expected)


@requires_extension
def test_eps_zero_as_torch():
    x = torch.randn(3, 8)
    x[0] = 1.0  # a constant row: 0 / sqrt(0), NaN as in torch
    weight, bias = torch.randn(8), torch.randn(8)
    out, _h = fastformer.layer_norm_residual(x, None, weight, bias, eps=0.0)
    torch.testing.assert_close(
        out, torch.nn.functional.layer_norm(x, (8,), weight, bias, eps=0.0), equal_nan=True
    )


@requires_extension
def test_torch_compile_dynamic_shapes():
    def step(x, residual):
        return fastformer.layer_norm_residual(x, residual, eps=1e-6)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (4, 6):
        x, residual = torch.randn(rows, 8), torch.randn(rows, 8)
        for got, expected in zip(compiled(x, residual), step(x, residual), strict=True):
            torch.testing.assert_close(got, expected)
