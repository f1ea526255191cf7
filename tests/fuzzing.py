"""Property-based fuzzing of every public fastformer op against fastformer/reference.py:
the shared part (profiles, memory layouts, running an op and the DESIGN.md rule). The tests
are test_fuzz_attention.py, test_fuzz_norm_ff.py and test_fuzz_regressions.py.

Hypothesis draws shapes (awkward sizes, zero-size dimensions, L != S, grouped kv heads,
value head dims != query/key head dims), dtypes, feature flags, masks and memory layouts
(permuted views such as (B, L, H, D) buffers read as (B, H, L, D), step-2 slices with a
storage offset, stride-0 expanded masks and residuals, stride-0 incoming gradients) for

- fastformer.scaled_dot_product_attention and fastformer.flash_attn_func, on the C++ CPU
  kernels and on the Triton kernels through Triton's interpreter (float32 and float16
  only, tiny shapes: the interpreter is slow);
- fastformer.layer_norm_residual, on the C++ CPU kernels and the Triton kernels;
- fastformer.feed_forward, on the C++ CPU kernels, with every activation;

and checks the output and the gradient of every input by the rule of DESIGN.md
(tests/tolerance.py): max|fast - ref64| <= 2 * max|same_precision - ref64| + atol. Dropout
is kept at 0 except in one test that only checks shapes and finiteness. Tensor values come
from a torch.Generator seeded with a drawn integer, so the example Hypothesis prints on a
failure (with its @reproduce_failure blob) replays exactly.

Profiles (FASTFORMER_FUZZ_PROFILE): "ci", the default, runs the file in 30 to 60 seconds on
two cores; "long" runs 500 examples per test (about 20 minutes, mostly the interpreter):

    FASTFORMER_FUZZ_PROFILE=long python -m pytest tests/test_fuzz_*.py

Bugs the fuzzing found are kept as minimal regression tests (test_fuzz_regressions.py);
where the rule itself cannot hold
(ill-conditioned or half-precision corners, each explained where it is excluded), the
strategies stay out of those corners.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.conftest import HAS_EXTENSION, HAS_INTERPRETER
from tests.tolerance import assert_all_close_to_reference

# ----------------------------------------------------------------------------------------
# Hypothesis profiles, for this module only: registered under prefixed names (Hypothesis
# has a built-in "ci" profile that other test files may rely on) and applied per test
# through @fuzz_settings, never with settings.load_profile.
# ----------------------------------------------------------------------------------------

_COMMON = dict(
    deadline=None,  # interpreter runs vary widely in time; the example budget bounds them
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fastformer-fuzz-ci", max_examples=20, **_COMMON)
settings.register_profile("fastformer-fuzz-long", max_examples=500, **_COMMON)
PROFILE = os.environ.get("FASTFORMER_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"FASTFORMER_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")


def fuzz_settings(ci_examples: int) -> settings:
    """The selected profile; under "ci", with this test's own example budget (the
    interpreter tests afford far fewer examples than the C++ ones)."""
    profile = settings.get_profile(f"fastformer-fuzz-{PROFILE}")
    return settings(profile, max_examples=ci_examples) if PROFILE == "ci" else profile


requires_interpreter = pytest.mark.skipif(
    not (HAS_EXTENSION and HAS_INTERPRETER), reason="needs the Triton interpreter"
)

# atol of the DESIGN.md rule per dtype; float64 is compared with float64, so its bound is
# the slack alone.
ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTERPRETER_DTYPES = [torch.float32, torch.float16]  # the interpreter mishandles bfloat16

seeds = st.integers(0, 2**32 - 1)

# ----------------------------------------------------------------------------------------
# Tensors in drawn memory layouts
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a tensor's elements sit: in a buffer holding its dims in the order `order` (the
    tensor is a permuted view of it), whose dim `stepped` (if any) is read with step 2 from
    offset 1."""

    order: tuple[int, ...]
    stepped: int | None = None


def layouts(ndim: int) -> st.SearchStrategy[Layout]:
    """Contiguous about half the time, else a permuted and/or step-sliced view."""
    contiguous = st.just(Layout(tuple(range(ndim))))
    if ndim == 0:
        return contiguous
    strided = st.builds(
        Layout, st.permutations(range(ndim)).map(tuple), st.none() | st.integers(0, ndim - 1)
    )
    return contiguous | strided


def randn(
    shape: Sequence[int],
    dtype: torch.dtype,
    generator: torch.Generator,
    layout: Layout | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Standard normal values (times scale) in the given layout."""
    layout = layout or Layout(tuple(range(len(shape))))
    buffer_shape = [shape[d] for d in layout.order]
    if layout.stepped is not None:
        buffer_shape[layout.stepped] = 2 * buffer_shape[layout.stepped] + 1
    buffer = (scale * torch.randn(buffer_shape, generator=generator)).to(dtype)
    if layout.stepped is not None:
        index = [slice(None)] * len(shape)
        index[layout.stepped] = slice(1, None, 2)
        buffer = buffer[tuple(index)]
    inverse = sorted(range(len(shape)), key=lambda d: layout.order[d])
    tensor = buffer.permute(inverse)
    assert tuple(tensor.shape) == tuple(shape)
    return tensor


# ----------------------------------------------------------------------------------------
# Forward, backward and the DESIGN.md rule, for any op
# ----------------------------------------------------------------------------------------

Inputs = dict[str, Tensor | None]
Results = dict[str, Tensor | None]
# Runs an op on leaves and names its outputs; those requiring grad are backpropagated.
Call = Callable[[Inputs], dict[str, Tensor]]


def _run(
    call: Call,
    inputs: Inputs,
    differentiable: Sequence[str],
    cotangents: Callable[[dict[str, Tensor]], dict[str, Tensor]],
) -> tuple[Results, dict[str, Tensor]]:
    """Outputs and the gradient of every differentiable input, and the cotangents used. The
    leaves are detached views of the inputs, so the op sees the drawn strides (clone() would
    make some of them contiguous)."""
    leaves = {
        name: t.detach().requires_grad_() if t is not None and name in differentiable else t
        for name, t in inputs.items()
    }
    outputs = call(leaves)
    grads = cotangents(outputs)
    if grads:
        torch.autograd.backward(
            [outputs[n] for n in grads], [g.to(outputs[n].dtype) for n, g in grads.items()]
        )
    results: Results = {name: out.detach() for name, out in outputs.items()}
    for name in differentiable:
        leaf = leaves[name]
        # autograd leaves .grad None where no gradient flowed (an empty output): zero.
        grad = None if leaf is None else leaf.grad
        results[f"grad_{name}"] = (
            torch.zeros_like(leaf) if leaf is not None and grad is None else grad
        )
    return results, grads


def _random_cotangents(
    generator: torch.Generator, broadcast: bool, tokens: int, scale: float = 1.0
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """Random incoming gradients for the outputs that require grad, in their dtypes, times
    `scale`; `broadcast` gives one value expanded with stride 0, as `out.mean().backward()`
    does. They are scaled as a loss averaged over `tokens` would scale them, so that
    parameter gradients (sums over the tokens) stay O(1): the rule's atol is about one unit
    in the last place at 1, and a one-ulp difference on a gradient of 50 is no bug."""

    def draw(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        grads = {}
        for name, out in outputs.items():
            if out.requires_grad:
                shape, size = (
                    ((), scale / tokens) if broadcast else (out.shape, scale / tokens**0.5)
                )
                grads[name] = randn(shape, out.dtype, generator, scale=size).expand(out.shape)
        return grads

    return draw


def _as64(inputs: Inputs) -> Inputs:
    return {
        k: t.double() if t is not None and t.is_floating_point() else t for k, t in inputs.items()
    }


@dataclass
class Problem:
    """One drawn call of an op: its inputs, the op and the reference as Calls (taking the
    same leaves), which inputs are differentiated, and how the results are compared."""

    inputs: Inputs
    fast: Call
    ref: Call
    differentiable: list[str]
    dtype: torch.dtype  # the inputs' dtype, which sets the rule's atol
    tokens: int = 1  # what parameter gradients sum over (see _random_cotangents)
    grad_scale: float = 1.0  # of the cotangents, where the op amplifies them
    may_be_neginf: tuple[str, ...] = ()  # outputs that may hold -inf (a log-sum-exp)


def assert_matches_reference(
    problem: Problem, generator: torch.Generator, broadcast_grad: bool = False
) -> None:
    """The DESIGN.md rule for every output and input gradient of the op, against the
    reference run in the inputs' dtypes and in float64, all three backpropagating the same
    cotangents. Outputs in `may_be_neginf` must be -inf at exactly the float64 reference's
    positions and obey the rule elsewhere."""
    inputs, differentiable = problem.inputs, problem.differentiable
    cotangents = _random_cotangents(generator, broadcast_grad, problem.tokens, problem.grad_scale)
    fast, grads = _run(problem.fast, inputs, differentiable, cotangents)
    same, _ = _run(problem.ref, inputs, differentiable, lambda _: grads)
    ref64, _ = _run(problem.ref, _as64(inputs), differentiable, lambda _: grads)
    for name in problem.may_be_neginf:
        where = torch.isneginf(ref64[name])
        assert torch.equal(torch.isneginf(fast[name]), where), f"{name}: -inf misplaced"
        for results in (fast, same, ref64):
            results[name] = results[name].masked_fill(where, 0.0)
    assert_all_close_to_reference(fast, same, ref64, ATOL[problem.dtype])


# ----------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ----------------------------------------------------------------------------------------
