"""Suite of fastformer.layer_norm_residual, the fused (dropout +) residual add + LayerNorm:

    h   = dropout(x) + residual
    out = (h - mean(h)) * rstd * weight + bias       LayerNorm
    out = h * rstd * weight                          RMSNorm (rstd = 1 / sqrt(mean(h^2) + eps))

returning (out, h), as a pre-norm block needs both. Providers: fastformer; eager PyTorch
(the same lines, F.layer_norm / F.rms_norm); torch.compile of eager; Liger-Kernel's
LayerNorm/RMSNorm after an eager residual add; Apex's fused_layer_norm_affine /
fused_rms_norm_affine after an eager residual add; flash-attn's fused layer_norm_fn
(prenorm=True). Liger, Apex and flash-attn run on CUDA only and are recorded as skipped
elsewhere (or when not installed).

Modes: "fwd" (inputs without grad) and "fwd+bwd": forward, then one backward of both
outputs with fixed random gradients, torch.autograd.grad([out, h], inputs, [g_out, g_h]), as
in a pre-norm block where h also feeds the next residual (grad returns the gradients instead
of accumulating them into .grad, so no accumulation is timed).

Required bytes (each input read once, each output written once). M rows, N hidden; element
sizes s_x (x, out, grad_out, grad_x), s_r (residual, grad_residual), s_h (h, grad_h),
s_w (weight, bias and their grads); stats = 4*M bytes per float32 row statistic, rstd and
(LayerNorm only) mean, written by forward and read by backward. The dropout mask costs no
bytes: an ideal kernel regenerates it from its seed.

    forward  = M*N*(s_x + s_r)             read x, residual
             + N*s_w*(1 + has_bias)        read weight, bias
             + M*N*(s_x + s_h)             write out, h
    backward = M*N*(s_x + 2*s_h)           read grad_out, grad_h, h
             + N*s_w + stats               read weight, mean, rstd
             + M*N*(s_x + s_r)             write grad_x, grad_residual
             + N*s_w*(1 + has_bias)        write grad_weight, grad_bias
    fwd+bwd  = forward + stats (written) + backward
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device import Skip, require
from .harness import (
    Case,
    Context,
    Provider,
    Result,
    Suite,
    Target,
    compiled,
    input_sets,
    rotate,
    run_case,
)
from .measure import dtype_name

OP = "layer_norm_residual"
EPS = 1e-5
PROVIDERS = ["fastformer", "eager", "torch.compile", "liger", "apex", "flash_attn"]
# (rows, hidden sizes): the default run stays short on a 2-core CPU; the GPU default is the
# issue's target shapes; --full sweeps from BERT-base to very wide rows.
CPU_SHAPES = (8192, (512, 1024, 2048, 4096))
CPU_FULL_SHAPES = (8192, (512, 768, 1024, 1536, 2048, 3072, 4096, 8192))
GPU_SHAPES = (16384, (1024, 2048, 4096, 8192))
GPU_FULL_SHAPES = (
    16384,
    (768, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 8192, 12288, 16384, 32768, 65536),
)
# Variants (norm, dropout_p): LayerNorm only by default; --full adds RMSNorm and dropout.
DEFAULT_VARIANTS = (("layer", 0.0),)
FULL_VARIANTS = (("layer", 0.0), ("rms", 0.0), ("layer", 0.1))

Forward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor],
]


def required_bytes(
    rows: int,
    hidden: int,
    mode: str,
    *,
    s_x: int,
    s_r: int,
    s_h: int,
    s_w: int,
    has_bias: bool,
    rms: bool,
) -> int:
    """Bytes a perfect implementation moves (the formulas of the module docstring)."""
    act, params = rows * hidden, hidden * s_w * (1 + has_bias)
    forward = act * (s_x + s_r) + params + act * (s_x + s_h)
    if mode == "fwd":
        return forward
    stats = 4 * rows * (1 if rms else 2)
    backward = act * (s_x + 2 * s_h) + hidden * s_w + stats + act * (s_x + s_r) + params
    return forward + stats + backward


def _cases(ctx: Context) -> list[Case]:
    rows, hiddens = ctx.pick(CPU_SHAPES, CPU_FULL_SHAPES, GPU_SHAPES, GPU_FULL_SHAPES)
    dtypes = ctx.dtypes(
        [torch.float32, torch.bfloat16], [torch.bfloat16, torch.float16, torch.float32]
    )
    cases = []
    for dtype in dtypes:
        size = dtype.itemsize
        for norm, dropout_p in FULL_VARIANTS if ctx.full else DEFAULT_VARIANTS:
            for mode in ("fwd", "fwd+bwd"):
                for hidden in hiddens:
                    rms = norm == "rms"
                    name = (
                        f"{rows}x{hidden}"
                        + (" rms" if rms else "")
                        + (f" p={dropout_p:g}" if dropout_p else "")
                    )
                    nbytes = required_bytes(
                        rows,
                        hidden,
                        mode,
                        s_x=size,
                        s_r=size,
                        s_h=size,
                        s_w=size,
                        has_bias=not rms,
                        rms=rms,
                    )
                    params = {"rows": rows, "hidden": hidden, "norm": norm, "dropout_p": dropout_p}
                    cases.append(Case(OP, name, dtype_name(dtype), mode, params, bytes=nbytes))
    return cases


# ----------------------------------------------------------------------------- providers


def _eager(hidden: int, rms: bool, dropout_p: float) -> Forward:
    def eager(x, residual, weight, bias):
        h = (F.dropout(x, dropout_p, training=True) if dropout_p else x) + residual
        if rms:
            return F.rms_norm(h, (hidden,), weight, EPS), h
        return F.layer_norm(h, (hidden,), weight, bias, EPS), h

    return eager


def _fastformer(rms: bool, dropout_p: float) -> Forward:
    import fastformer  # here, not at module level: the harness must import without it

    op = fastformer.layer_norm_residual

    def fused(x, residual, weight, bias):
        return op(x, residual, weight, bias, eps=EPS, dropout_p=dropout_p, rms_norm=rms)

    return fused


def _liger(ctx: Context, rms: bool, dropout_p: float) -> Forward:
    require("liger_kernel", ctx.info.optional_baselines)
    if ctx.device.type != "cuda":
        raise Skip("Liger-Kernel's Triton kernels run on CUDA only")
    from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

    def liger(x, residual, weight, bias):
        # Liger has no residual or dropout: both stay eager, as a user of it would write.
        h = (F.dropout(x, dropout_p, training=True) if dropout_p else x) + residual
        if rms:  # in_place=False: the in-place backward would overwrite our fixed grad_out
            return liger_rms_norm(h, weight, EPS, in_place=False), h
        return liger_layer_norm(h, weight, bias, EPS), h

    return liger


def _apex(ctx: Context, hidden: int, rms: bool, dropout_p: float) -> Forward:
    require("apex", ctx.info.optional_baselines)
    if ctx.device.type != "cuda":
        raise Skip("Apex's fused layer norm runs on CUDA only")
    try:
        from apex.normalization.fused_layer_norm import (
            fused_layer_norm_affine,
            fused_rms_norm_affine,
        )
    except ImportError as error:  # apex without its CUDA extensions
        raise Skip(f"apex.normalization unavailable: {error}") from None

    def apex(x, residual, weight, bias):
        # Apex has no residual or dropout: both stay eager, as a user of it would write.
        h = (F.dropout(x, dropout_p, training=True) if dropout_p else x) + residual
        if rms:
            return fused_rms_norm_affine(h, weight, (hidden,), EPS), h
        return fused_layer_norm_affine(h, weight, bias, (hidden,), EPS), h

    return apex


def _flash_attn(ctx: Context, rms: bool, dropout_p: float) -> Forward:
    require("flash_attn", ctx.info.optional_baselines)
    if ctx.device.type != "cuda":
        raise Skip("flash-attn's Triton layer norm runs on CUDA only")
    from flash_attn.ops.triton.layer_norm import layer_norm_fn

    def flash(x, residual, weight, bias):
        # prenorm=True returns (out, residual_out), residual_out being our h.
        return layer_norm_fn(
            x,
            weight,
            bias,
            residual=residual,
            eps=EPS,
            dropout_p=dropout_p,
            prenorm=True,
            is_rms_norm=rms,
        )

    return flash


# ----------------------------------------------------------------------------- inputs and steps


@dataclass
class _Inputs:
    x: torch.Tensor
    residual: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_out: torch.Tensor | None  # fwd+bwd only
    grad_h: torch.Tensor | None

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return (self.x, self.residual, self.weight, *(() if self.bias is None else (self.bias,)))


def _make_inputs(ctx: Context, case: Case) -> list[_Inputs]:
    rows, hidden, grad = case.params["rows"], case.params["hidden"], case.mode == "fwd+bwd"
    dtype, device = getattr(torch, case.dtype), ctx.device
    act_bytes = rows * hidden * dtype.itemsize * (4 if grad else 2)  # x, residual (+ grads)

    def activation(requires_grad: bool) -> torch.Tensor:
        return torch.randn(rows, hidden, device=device, dtype=dtype).requires_grad_(requires_grad)

    # weight and bias (N elements) are shared by the sets: they stay cached in any kernel.
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_(grad)
    bias = (
        None
        if case.params["norm"] == "rms"
        else (0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_(grad)
    )
    return [
        _Inputs(
            activation(grad),
            activation(grad),
            weight,
            bias,
            activation(False) if grad else None,
            activation(False) if grad else None,
        )
        for _ in range(input_sets(ctx, act_bytes))
    ]


def _step(forward: Forward, sets: list[_Inputs], mode: str) -> Callable[[], object]:
    """One timed call: a forward, or a forward and its backward, on the next input set."""
    next_inputs = rotate(sets)
    if mode == "fwd":

        def step_forward():
            i = next_inputs()
            return forward(i.x, i.residual, i.weight, i.bias)

        return step_forward

    def step_forward_backward():
        i = next_inputs()
        out, h = forward(i.x, i.residual, i.weight, i.bias)
        return torch.autograd.grad((out, h), i.leaves, (i.grad_out, i.grad_h))

    return step_forward_backward


def _bench(ctx: Context, case: Case) -> Result:
    hidden, rms, p = case.params["hidden"], case.params["norm"] == "rms", case.params["dropout_p"]
    sets = _make_inputs(ctx, case)
    eager = _eager(hidden, rms, p)
    providers = [
        Provider("fastformer", lambda: _step(_fastformer(rms, p), sets, case.mode)),
        Provider("eager", lambda: _step(eager, sets, case.mode)),
        Provider(
            "torch.compile",
            lambda: _step(compiled(_eager(hidden, rms, p)), sets, case.mode),
            skip_on_error="torch.compile failed",
        ),
        Provider("liger", lambda: _step(_liger(ctx, rms, p), sets, case.mode)),
        Provider("apex", lambda: _step(_apex(ctx, hidden, rms, p), sets, case.mode)),
        Provider("flash_attn", lambda: _step(_flash_attn(ctx, rms, p), sets, case.mode)),
    ]
    return run_case(ctx, case, providers)


def _targets(ctx: Context) -> list[Target]:
    """The issue's goals. CPU: 2 threads, float32, 8192 x 1024. GPU: bfloat16, 16384 rows."""
    if ctx.device.type == "cpu":
        where = {
            "device": "cpu",
            "threads": 2,
            "dtype": "float32",
            "rows": 8192,
            "hidden": 1024,
            "norm": "layer",
            "dropout_p": 0.0,
        }
        return [
            Target(
                "forward >= 2x eager", "speedup", 2.0, {**where, "mode": "fwd"}, baseline="eager"
            ),
            Target(
                "forward+backward >= 1.5x eager",
                "speedup",
                1.5,
                {**where, "mode": "fwd+bwd"},
                baseline="eager",
            ),
        ]
    where = {
        "device": "cuda",
        "dtype": "bfloat16",
        "rows": 16384,
        "hidden": [1024, 2048, 4096, 8192],
        "norm": "layer",
        "dropout_p": 0.0,
    }
    return [
        Target("forward >= 80% of copy bandwidth", "share_of_peak", 0.8, {**where, "mode": "fwd"}),
        Target(
            "forward+backward >= 1.5x eager",
            "speedup",
            1.5,
            {**where, "mode": "fwd+bwd"},
            baseline="eager",
        ),
        Target(
            "forward+backward faster than torch.compile",
            "speedup",
            1.0,
            {**where, "mode": "fwd+bwd"},
            baseline="torch.compile",
        ),
    ]


SUITE = Suite(
    name=OP,
    title="residual + LayerNorm (fastformer.layer_norm_residual)",
    providers=PROVIDERS,
    cases=_cases,
    bench=_bench,
    targets=_targets,
    plot_x="hidden",
)
