"""fastformer.scaled_dot_product_attention and fastformer.flash_attn_func: flash attention.

The dispatcher ops fastformer::attention_fwd / _bwd are defined here with
torch.library.custom_op, with fake kernels for torch.compile and an autograd formula. On
CUDA they run the Triton kernels of fastformer_kernels.attention; on CPU the C++ kernels of
fastformer._C (csrc/attention_cpu*: the same maths, masks, band and dropout draws, in
float32 or float64), or the Triton kernels through Triton's interpreter inside
fastformer.triton_on_cpu(). Calls the kernels do not support run torch's function and are
counted (fastformer.info()).

Both APIs reduce to one banded form: key j is visible to query i iff
    i + diagonal_offset - window_left <= j <= i + diagonal_offset + window_right
(a negative window side is unbounded): SDPA's is_causal is (0, -1, 0), flash-attn's causal
is bottom-right aligned, diagonal_offset = S - L.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension, backend
from ..reference import default_attention_scale
from ..reference import scaled_dot_product_attention as reference_attention
from . import _checks

OP = "scaled_dot_product_attention"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# torch's function, captured before fastformer.patch_sdpa() can replace it.
torch_sdpa = F.scaled_dot_product_attention

# The C++ CPU kernels compute in float32 or float64; float16 and bfloat16 CPU tensors are
# computed in float32 and rounded back (see _attend).
_CPP_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
backend.register_op(
    OP, backend.OpSupport(cuda_dtypes=_TRITON_DTYPES, cpu_dtypes=_checks.FLOAT_DTYPES)
)


def _runs_cpp(q: Tensor) -> bool:
    """Whether the C++ CPU kernels take this call (else the Triton kernels: on CUDA, or on
    CPU through the interpreter)."""
    return q.device.type == "cpu" and not backend.cpu_runs_triton()


def _statistics_dtype(q: Tensor) -> torch.dtype:
    """lse and stats: float32, float64 for float64 inputs (the C++ kernels only)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# Dispatcher ops, fake kernels, autograd
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("fastformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    seed: Tensor | None,
    scale: float,
    softcap: float,
    dropout_p: float,
    diagonal_offset: int,
    window_left: int,
    window_right: int,
    keep_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (B, Hq, L, Dv), lse (B, Hq, L), stats (B, Hq, L, 2): row max and log2 row sum
    of the base-2 scores for the backward, see kernels/attention.py, out_residual) of
    q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); mask broadcast to (B, Hq, L, S)
    (stride 0 where broadcast); alibi_slopes broadcast to (B, Hq), in _statistics_dtype(q),
    adding -slope * |j - (i + diagonal_offset)| to the scores; softcap > 0 caps the scaled
    products to softcap * tanh(scale * q.k / softcap) before both. lse and stats in
    _statistics_dtype(q). out_residual: with keep_residual and a half-precision q, out
    computed in float32 minus out (for the backward's delta); numel 0 otherwise (the C++
    kernels compute in float32 or float64)."""
    arguments = (q, k, v, mask, alibi_slopes, seed, scale, softcap, dropout_p)
    band = (diagonal_offset, window_left, window_right)
    if _runs_cpp(q):
        out, lse, stats = torch.ops.fastformer.cpu_attention_fwd(*arguments, *band)
        return out, lse, stats, q.new_empty((0,))
    from fastformer_kernels.attention import attention_forward

    return tuple(attention_forward(*arguments, *band, keep_residual))


def _output_like(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An empty output of `shape` laid out as the kernels write it: the Triton kernels
    contiguously; the C++ kernels in the memory order of `like` (its first three dims by
    stride, largest first, ties in dim order; the last innermost, as csrc/attention_cpu.cpp's
    empty_in_layout_of), so that outputs for views of (B, L, H, D) projections go back to
    (B, L, H * D) without a copy."""
    if not _runs_cpp(like):
        return like.new_empty(shape)
    order = sorted(range(3), key=lambda dim: -like.stride(dim))
    return torch.empty_permuted(shape, (*order, 3), dtype=like.dtype, device=like.device)


def _fake_cpu_fwd(q, k, v, *_options):
    """cpu_attention_fwd's outputs; _options: its arguments after v."""
    batch, heads, length, _ = q.shape
    out = _output_like(q, (batch, heads, length, v.shape[-1]))
    statistics = _statistics_dtype(q)
    lse = q.new_empty((batch, heads, length), dtype=statistics)
    return out, lse, q.new_empty((batch, heads, length, 2), dtype=statistics)


@attention_fwd.register_fake
def _fake_fwd(q, k, v, *options):
    """attention_fwd's outputs; options: its arguments after v, keep_residual last."""
    keep_residual = options[-1]
    out, lse, stats = _fake_cpu_fwd(q, k, v)
    has_residual = keep_residual and q.dtype in _HALF_DTYPES and not _runs_cpp(q)
    return out, lse, stats, q.new_empty(out.shape if has_residual else (0,))


@torch.library.custom_op("fastformer::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    grad_lse: Tensor | None,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    seed: Tensor | None,
    scale: float,
    softcap: float,
    dropout_p: float,
    diagonal_offset: int,
    window_left: int,
    window_right: int,
    out_residual: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v) of attention_fwd, given its out_residual."""
    arguments = (grad_out, q, k, v, out, stats, grad_lse, mask, alibi_slopes, seed, scale)
    band = (softcap, dropout_p, diagonal_offset, window_left, window_right)
    if _runs_cpp(q):
        return tuple(torch.ops.fastformer.cpu_attention_bwd(*arguments, *band))
    from fastformer_kernels.attention_backward import attention_backward

    return tuple(attention_backward(*arguments, *band, out_residual))


@attention_bwd.register_fake
def _fake_bwd(grad_out, q, k, v, *_options):
    """The gradients of q, k, v; _options: the arguments after v (attention_bwd's or
    cpu_attention_bwd's, which has no out_residual)."""
    return tuple(_output_like(t, tuple(t.shape)) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, alibi_slopes, seed, *band, _keep_residual = inputs
    out, _lse, stats, out_residual = output
    ctx.mark_non_differentiable(stats, out_residual)
    # Unused outputs get no zero-filled gradients (out_residual is as large as out).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, stats, mask, alibi_slopes, seed, out_residual)
    ctx.band = band  # scale, softcap, dropout_p, diagonal_offset, window_left, window_right


def _backward(ctx, grad_out, grad_lse, _grad_stats, _grad_residual):
    q, k, v, out, stats, *optional, out_residual = ctx.saved_tensors  # optional: mask, slopes, seed
    if grad_out is None:  # only the lse was used
        grad_out = torch.zeros_like(out)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_q, grad_k, grad_v = attention_bwd(
        grad_out, q, k, v, out, stats, grad_lse, *optional, *ctx.band, out_residual
    )
    return grad_q, grad_k, grad_v, *(None,) * 10


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

if _extension.available:
    # The C++ CPU kernels are ops of their own (csrc/ops.cpp) with a C++ autograd formula
    # (csrc/autograd.cpp), called directly by _attend, and by attention_fwd / _bwd under
    # torch.compile: the same fake kernels.
    torch.library.register_fake("fastformer::cpu_attention_fwd")(_fake_cpu_fwd)
    torch.library.register_fake("fastformer::cpu_attention_bwd")(_fake_bwd)

_no_double_backward, _no_context = _checks.no_double_backward("scaled_dot_product_attention")
attention_bwd.register_autograd(_no_double_backward, setup_context=_no_context)


# ----------------------------------------------------------------------------------------
# Shared by both APIs: checks and the call of the op on (B, H, L, E) tensors
# ----------------------------------------------------------------------------------------


def _unit_last_stride(tensor: Tensor) -> Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _kernel_problem(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> str:
    """Why fastformer's kernels (C++ on CPU, Triton on CUDA or in the interpreter) cannot
    take this call; "" when they can."""
    reason = backend.fallback_reason(OP, query.device, query.dtype)
    if reason:
        return reason
    implementation = backend.implementation(OP, query.device, query.dtype)
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        return "a float mask that requires grad"
    if implementation == backend.CPP:
        return "" if _extension.available else "the compiled extension fastformer._C is not built"
    for name, dim in (("query/key", query.shape[-1]), ("value", value.shape[-1])):
        if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
            return f"{name} head dim {dim} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    return ""


def _falls_back(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> bool:
    """True when torch's function must run this call (counted, and warned about once)."""
    problem = _kernel_problem(query, key, value, mask)
    if problem:
        backend.note_fallback(OP, problem)
    return bool(problem)


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    dropout_p: float,
    diagonal_offset: int,
    window_left: int,
    window_right: int,
    alibi_slopes: Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Run the op on q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) (alibi_slopes,
    softcap: see attention_fwd): out in q's dtype and lse (B, Hq, L) in _statistics_dtype."""
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    # A window side of L + S or more hides no key: unbounded (-1), which also keeps the
    # kernels' band arithmetic i + offset + side far from int64 (and Triton's int32) limits.
    reach = q.shape[-2] + k.shape[-2]
    window_left = -1 if window_left >= reach else window_left
    window_right = -1 if window_right >= reach else window_right
    dtype, cpp = q.dtype, _runs_cpp(q)
    if cpp and dtype not in _CPP_DTYPES:
        # float16/bfloat16 on CPU: computed in float32 (autograd rounds the gradients back).
        q, k, v = q.float(), k.float(), v.float()
    arguments = (
        _unit_last_stride(q),
        _unit_last_stride(k),
        _unit_last_stride(v),
        mask,
        alibi_slopes,
        seed,
        scale,
        softcap,
        dropout_p,
        diagonal_offset,
        window_left,
        window_right,
    )
    if cpp and not torch.compiler.is_compiling():
        # The C++ op with its C++ autograd formula (csrc/autograd.cpp), without the custom
        # op's Python dispatch and autograd wrapper: about 75 us less a call.
        out, lse, _stats = torch.ops.fastformer.cpu_attention_fwd(*arguments)
    else:
        out, lse, _stats, _residual = attention_fwd(*arguments, _records_autograd(q, k, v))
    return (out if out.dtype == dtype else out.to(dtype)), lse


def _records_autograd(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------
# torch.nn.functional.scaled_dot_product_attention's API
# ----------------------------------------------------------------------------------------


def _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        _checks.check_tensor(OP, name, tensor)
        if tensor.dim() < 2:
            raise ValueError(
                f"{OP}: {name} must have at least 2 dimensions (..., L, E), "
                f"got shape {list(tensor.shape)}"
            )
    _checks.check_same_device(OP, "query", query, key=key, value=value, attn_mask=attn_mask)
    _check_same_dtype(OP, query=query, key=key, value=value)
    _checks.check_bool(OP, "is_causal", is_causal)
    _checks.check_bool(OP, "enable_gqa", enable_gqa)
    if not query.dim() == key.dim() == value.dim():
        raise ValueError(
            f"{OP}: query, key and value must have the same number of dimensions, "
            f"got {query.dim()}, {key.dim()} and {value.dim()}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"{OP}: key's last dimension must equal query's ({query.shape[-1]}), "
            f"got {key.shape[-1]}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"{OP}: key and value must have the same length (dim -2), "
            f"got {key.shape[-2]} and {value.shape[-2]}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"{OP}: key and value must agree in every dimension but the last, "
            f"got {list(key.shape)} and {list(value.shape)}"
        )
    lead = _leading_shape(query, key, enable_gqa)  # raises when they do not broadcast
    if attn_mask is not None:
        _checks.check_tensor(OP, "attn_mask", attn_mask, (torch.bool, *_checks.FLOAT_DTYPES))
        target = torch.Size((*lead, query.shape[-2], key.shape[-2]))
        try:
            # The mask must broadcast *to* the scores' shape, not widen it (more dims, or a
            # larger batch than query's and key's).
            if torch.broadcast_shapes(attn_mask.shape, target) != target:
                raise RuntimeError("the mask widens the scores")
        except RuntimeError:
            raise ValueError(
                f"{OP}: attn_mask of shape {list(attn_mask.shape)} does not "
                f"broadcast to (..., L, S) = {list(target)}"
            ) from None
    return (
        _checks.check_probability(OP, "dropout_p", dropout_p, allow_one=True),
        None if scale is None else _checks.real_number(OP, "scale", scale, "a float or None"),
    )


def _check_same_dtype(op: str, **tensors: Tensor) -> None:
    """query, key and value (q, k, v) must share one dtype, as torch's function requires."""
    (first, reference), *others = tensors.items()
    for name, tensor in others:
        if tensor.dtype != reference.dtype:
            raise TypeError(
                f"{op}: {name} must have {first}'s dtype ({reference.dtype}), got {tensor.dtype}"
            )


def _leading_shape(query: Tensor, key: Tensor, enable_gqa: bool) -> tuple[int, ...]:
    """The output's dimensions before (L, Ev): query's and key's broadcast together, as
    torch's function broadcasts them (a query of batch 1 against keys of batch 2); with
    enable_gqa the heads (dim -3) are query's, key's dividing them."""
    lead_q, lead_k = query.shape[:-2], key.shape[:-2]
    gqa = enable_gqa and query.dim() >= 3
    try:
        if gqa:
            heads_q, heads_k = lead_q[-1], lead_k[-1]
            if not (heads_q % heads_k == 0 if heads_k else heads_q == 0):
                raise RuntimeError("heads do not divide")
            return (*torch.broadcast_shapes(lead_q[:-1], lead_k[:-1]), heads_q)
        return tuple(torch.broadcast_shapes(lead_q, lead_k))
    except RuntimeError:
        expected = (
            "key's heads (dim -3) must divide query's and the other leading dimensions broadcast"
            if gqa
            else "their leading dimensions must broadcast (pass enable_gqa=True for fewer "
            "key/value heads)"
        )
        raise ValueError(
            f"{OP}: {expected}, got query {list(query.shape)} and key {list(key.shape)}"
        ) from None


def _broadcast_leading(
    query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """query, key and value expanded (stride 0, no copy) to their broadcast leading shape."""
    lead = _leading_shape(query, key, enable_gqa)
    kv_lead = (*lead[:-1], key.shape[-3]) if enable_gqa and query.dim() >= 3 else lead
    return (
        query.expand(*lead, *query.shape[-2:]),
        key.expand(*kv_lead, *key.shape[-2:]),
        value.expand(*kv_lead, *value.shape[-2:]),
    )


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, with the same signature and results.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev). A boolean mask keeps
    positions where True, a float mask is added; masks broadcast to (..., L, S) and are read
    through their strides, never materialised. is_causal aligns the diagonal to the upper
    left. A query row with every key masked gives zeros (and finite gradients). dropout_p is
    applied whenever it is > 0, as torch does.
    """
    dropout_p, scale = _check_sdpa(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, 0.0)


# scaled_dot_product_attention's optional arguments and their defaults.
_SDPA_OPTIONS = {
    name: parameter.default
    for name, parameter in inspect.signature(scaled_dot_product_attention).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


def softcapped_scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, *, softcap: float, **options: object
) -> Tensor:
    """scaled_dot_product_attention(query, key, value, **options) with the scaled scores
    capped to softcap * tanh(s / softcap) before the mask (Gemma 2's logit soft-capping;
    softcap > 0), in the kernels. The transformers integration's path for models that cap."""
    arguments = {**_SDPA_OPTIONS, **options}
    arguments["dropout_p"], arguments["scale"] = _check_sdpa(query, key, value, **arguments)
    softcap = _checks.check_positive(OP, "softcap", softcap)
    return _sdpa(query, key, value, **arguments, softcap=softcap)


def _sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    softcap: float,
) -> Tensor:
    """Both SDPA functions, after their checks (softcap 0: no capping). A mask together with
    is_causal keeps what both keep, as torch's function does."""
    if query.shape[:-3] != key.shape[:-3] or (
        not enable_gqa and query.shape[:-2] != key.shape[:-2]
    ):
        query, key, value = _broadcast_leading(query, key, value, enable_gqa)
    arguments = {
        "attn_mask": attn_mask,
        "dropout_p": dropout_p,
        "is_causal": is_causal,
        "scale": scale,
        "enable_gqa": enable_gqa,
    }
    if 0 in (query.numel(), key.numel(), value.numel()) or dropout_p == 1.0:
        # Nothing to attend (no rows, no keys, no heads), or every probability dropped:
        # zeros or an empty result, which the reference gives without a kernel launch.
        return reference_attention(query, key, value, **arguments, softcap=softcap)
    if _falls_back(query, key, value, attn_mask):
        if softcap > 0.0:  # torch's function has no softcap
            return reference_attention(query, key, value, **arguments, softcap=softcap)
        return _torch_sdpa(query, key, value, **arguments)

    source = key.shape[-2]
    # Flatten the leading dimensions to (B, H): views for the usual 3-D and 4-D inputs (4-D
    # ones as they are: a reshape costs about a microsecond a call).
    q, k, v = (_as_4d(query), _as_4d(key), _as_4d(value))
    mask = None
    if attn_mask is not None:
        # Broadcast by strides (0 where broadcast): a view, not a copy.
        mask = attn_mask.expand(*query.shape[:-1], source).reshape(*q.shape[:-1], source)
    out, _lse = _attend(
        q,
        k,
        v,
        mask,
        scale if scale is not None else default_attention_scale(query.shape[-1]),
        dropout_p,
        0,
        -1,
        0 if is_causal else -1,
        softcap=softcap,
    )
    return out if query.dim() == 4 else out.reshape(*query.shape[:-1], value.shape[-1])


def _torch_sdpa(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool, **options
) -> Tensor:
    """torch's function for a call the kernels do not take, given what fastformer's accepts
    too: a mask together with is_causal (merged into one mask, which torch's backends do not
    all take), and a float mask in another float dtype than query's (cast)."""
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
        attn_mask = attn_mask.to(query.dtype)
    if attn_mask is not None and is_causal:
        length, source = query.shape[-2], key.shape[-2]
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
        is_causal = False
    return torch_sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **options)


def _as_4d(tensor: Tensor) -> Tensor:
    """(..., H, L, E) as (B, H, L, E): leading dimensions flattened, a 2-D tensor given two."""
    if tensor.dim() == 4:
        return tensor
    return tensor.reshape(-1, *tensor.shape[-3:]) if tensor.dim() >= 3 else tensor[None, None]


# ----------------------------------------------------------------------------------------
# flash_attn.flash_attn_func's API
# ----------------------------------------------------------------------------------------


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, None]:
    """flash_attn.flash_attn_func, its arguments in its order: q (B, L, Hq, D),
    k (B, S, Hkv, D), v (B, S, Hkv, Dv).

    - causal aligns the diagonal to the bottom right (query i sees keys up to i + S - L,
      the KV-cache convention); window_size (left, right) limits each query to keys within
      that many positions of its diagonal (-1: unbounded); Hkv may divide Hq (GQA/MQA).
    - softcap > 0 caps the scaled scores, softcap * tanh(s / softcap), inside the kernels
      (Gemma 2's logit soft-capping), before the ALiBi bias and the band.
    - alibi_slopes, (Hq,) or (B, Hq): adds -slope * |i + S - L - j| to the score of query i
      and key j, computed inside the kernels from the slopes (in float32; float64 for
      float64 inputs). alibi_slopes gets no gradient (nor in flash-attn).
    - deterministic: accepted; fastformer's backward is always deterministic (no atomics).
    - return_attn_probs: returns (out, lse, None); the attention probabilities, which
      flash-attn returns for testing only, are not materialised.
    Returns out (B, L, Hq, Dv); with return_lse (out, lse), the log-sum-exp (B, Hq, L) in
    float32.
    """
    name = "flash_attn_func"
    for arg, tensor in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, arg, tensor)
        if tensor.dim() != 4:
            raise ValueError(
                f"{name}: {arg} must be 4-D (batch, seqlen, heads, head_dim), "
                f"got shape {list(tensor.shape)}"
            )
    _checks.check_same_device(name, "q", q, k=k, v=v)
    _check_same_dtype(name, q=q, k=k, v=v)
    dropout_p = _checks.check_probability(name, "dropout_p", dropout_p)
    for flag, value in (
        ("causal", causal),
        ("deterministic", deterministic),
        ("return_attn_probs", return_attn_probs),
        ("return_lse", return_lse),
    ):
        _checks.check_bool(name, flag, value)
    if softmax_scale is not None:
        softmax_scale = _checks.real_number(name, "softmax_scale", softmax_scale, "a float or None")
    if softcap != 0.0:
        softcap = _checks.check_positive(name, "softcap", softcap)
    window_size = _window_size(name, window_size)
    if k.shape[:-1] != v.shape[:-1] or k.shape[0] != q.shape[0]:
        raise ValueError(
            f"{name}: k and v must be (batch, seqlen_k, heads_k, *) with q's "
            f"batch, got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
        )
    divides = q.shape[2] % k.shape[2] == 0 if k.shape[2] else q.shape[2] == 0
    if k.shape[-1] != q.shape[-1] or not divides:
        raise ValueError(
            f"{name}: k must have q's head_dim and a head count dividing q's, "
            f"got q {list(q.shape)} and k {list(k.shape)}"
        )
    length, source = q.shape[1], k.shape[1]
    slopes = None if alibi_slopes is None else _alibi_slopes(name, alibi_slopes, q)
    scale = softmax_scale if softmax_scale is not None else default_attention_scale(q.shape[-1])
    window_left, window_right = window_size
    if causal:
        window_right = 0
    diagonal_offset = source - length
    # (B, L, H, D) -> (B, H, L, D): views; the kernels take any strides but the last.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    band = (scale, dropout_p, diagonal_offset, window_left, window_right)
    empty = 0 in (q.numel(), k.numel(), v.numel())
    if empty:  # nothing to attend: see scaled_dot_product_attention
        out, lse = _banded_attention_torch(
            qt, kt, vt, *band, alibi_slopes=slopes, softcap=softcap, attend=reference_attention
        )
    elif _falls_back(q, k, v, None):
        out, lse = _banded_attention_torch(qt, kt, vt, *band, alibi_slopes=slopes, softcap=softcap)
    else:
        out, lse = _attend(qt, kt, vt, None, *band, alibi_slopes=slopes, softcap=softcap)
    out, lse = out.transpose(1, 2), lse.float()  # lse in float32 from every path
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def _window_size(name: str, window_size: object) -> tuple[int, int]:
    """flash_attn_func's window_size: (left, right), ints >= -1 (-1: unbounded)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(
            f"{name}: window_size must be a (left, right) pair of ints >= -1, got {window_size!r}"
        )
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size):
        raise ValueError(f"{name}: window_size must be (left, right) ints >= -1, got {window_size}")
    return window_size[0], window_size[1]


def _alibi_slopes(name: str, slopes: object, q: Tensor) -> Tensor:
    """flash_attn_func's alibi_slopes of shape (Hq,) or (B, Hq), checked, as the op takes
    them: (B, Hq) (stride 0 over the batch for (Hq,)), without gradient, in float32
    (float64 for float64 inputs) whatever q's dtype, as flash-attn computes the bias."""
    batch, _, heads, _ = q.shape
    _checks.check_tensor(name, "alibi_slopes", slopes)
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(
            f"{name}: alibi_slopes must have shape [{heads}] or [{batch}, {heads}] "
            f"(heads, or batch x heads), got {list(slopes.shape)}"
        )
    _checks.check_same_device(name, "q", q, alibi_slopes=slopes)
    return slopes.detach().to(_statistics_dtype(q)).expand(batch, heads)


def _key_offsets(length: int, source: int, diagonal_offset: int, device: torch.device) -> Tensor:
    """(L, S): j - (i + diagonal_offset), where key j lies from query i's diagonal."""
    diagonal = torch.arange(length, device=device)[:, None] + diagonal_offset
    return torch.arange(source, device=device)[None, :] - diagonal


def _banded_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    dropout_p: float,
    diagonal_offset: int,
    window_left: int,
    window_right: int,
    *,
    alibi_slopes: Tensor | None = None,
    softcap: float = 0.0,
    attend: Callable[..., Tensor] = torch_sdpa,
) -> tuple[Tensor, Tensor]:
    """The same banded attention through torch's function (or `attend`, with its
    signature), for calls the kernels do not take; the band becomes an explicit (L, S)
    boolean mask, or with ALiBi slopes (B, H) a float one, the bias added. softcap and the
    bias go through the reference's math: torch's function has no softcap, and with a float
    mask it gives NaN rather than zeros for a row that sees no key."""
    offsets = _key_offsets(q.shape[-2], k.shape[-2], diagonal_offset, q.device)
    bias = None
    if alibi_slopes is not None:  # (B, H, L, S), materialised (the kernels compute it)
        bias = -alibi_slopes[:, :, None, None] * offsets.abs().to(alibi_slopes.dtype)
    visible = torch.ones_like(offsets, dtype=torch.bool)
    if window_left >= 0:
        visible &= offsets >= -window_left
    if window_right >= 0:
        visible &= offsets <= window_right
    groups = q.shape[1] // k.shape[1] if k.shape[1] else 1
    mask = visible if bias is None else bias.masked_fill(~visible, float("-inf"))
    if bias is not None or softcap > 0.0:
        attend = functools.partial(reference_attention, softcap=softcap)
    out = attend(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=groups > 1)
    scores = (q.float() @ k.repeat_interleave(groups, dim=1).float().transpose(-2, -1)) * scale
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return out, lse
