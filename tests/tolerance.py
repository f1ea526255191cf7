"""The tolerance rule of DESIGN.md.

For each output and gradient:
    max|fast - ref64| <= 2 * max|same_precision - ref64| + atol
where ref64 is fastformer/reference.py run in float64 and same_precision is the same
reference run in the input dtype: fastformer may be at most twice as far from the exact
answer as plain PyTorch at the same precision, plus a small absolute slack.
"""

from __future__ import annotations

import torch
from torch import Tensor


def assert_close_to_reference(
    name: str, fast: Tensor, same_precision: Tensor, ref64: Tensor, atol: float
) -> None:
    assert fast.shape == ref64.shape, f"{name}: shape {list(fast.shape)} != {list(ref64.shape)}"
    assert fast.dtype == same_precision.dtype, (
        f"{name}: dtype {fast.dtype}, expected {same_precision.dtype}"
    )
    if fast.numel() == 0:
        return
    error = (fast.double() - ref64).abs().max().item()
    baseline = (same_precision.double() - ref64).abs().max().item()
    bound = 2 * baseline + atol
    # NaN (an unwritten, poisoned element) fails this comparison too.
    assert error <= bound, (
        f"{name}: max|fast - ref64| = {error:.3e} exceeds 2 * {baseline:.3e} + {atol:.0e}"
    )


def assert_all_close_to_reference(
    fast: dict[str, Tensor | None],
    same_precision: dict[str, Tensor | None],
    ref64: dict[str, Tensor | None],
    atol: float,
) -> None:
    """The rule for every named result; a result absent on one side must be absent on all."""
    for name, ref in ref64.items():
        if ref is None:
            assert fast[name] is None, f"{name}: expected no result, got one"
            continue
        assert fast[name] is not None, f"{name}: missing"
        assert_close_to_reference(name, fast[name], same_precision[name], ref, atol)


def random_like_shape(shape, dtype, device, generator=None) -> Tensor:
    """Fresh random values, never zeros: standard normal."""
    return torch.randn(shape, dtype=torch.float32, device=device, generator=generator).to(dtype)
