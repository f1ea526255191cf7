// Operator schemas of fastformer: the one place every op's signature is defined.
//
// CPU kernels register themselves beside their implementation (TORCH_LIBRARY_IMPL in
// <op>_cpu.cpp), the autograd formulas in autograd.cpp; the CUDA kernels of the Triton ops
// are registered from Python (fastformer/ops/<op>.py), as are the fake kernels.
#include "cpu_allocation.h"
#include "feed_forward.h"

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastformer, m) {
  // Fused (dropout +) residual add + LayerNorm / RMSNorm, forward, on 2-D rows (M, N).
  //   h   = dropout(x) + residual            (h = dropout(x) without residual), rounded to h_dtype
  //   out = (h - mean) * rstd * weight + bias (RMS: h * rstd * weight), in x's dtype
  // mean, rstd: (M,) in x's accumulation type (float32; float64 for float64 x); mean is
  // empty for RMS. h is empty when store_h is false (the caller then uses x as h).
  // seed: int64 tensor of one element on x's device, required when dropout_p > 0.
  m.def(
      "layer_norm_residual_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor? seed, float eps, float dropout_p, bool rms_norm, ScalarType h_dtype, "
      "bool store_h) -> (Tensor out, Tensor h, Tensor mean, Tensor rstd)");
  // Backward of the above. h is the saved normalized input (h, or x when store_h was false).
  // grad_h: gradient flowing into the returned h, if any. Absent results are empty tensors:
  // grad_residual unless store_grad_residual, grad_weight without weight, grad_bias
  // without has_bias. grad_weight and grad_bias are in the accumulation type.
  m.def(
      "layer_norm_residual_bwd(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor? weight, "
      "Tensor mean, Tensor rstd, Tensor? seed, float dropout_p, bool rms_norm, bool has_bias, "
      "ScalarType x_dtype, ScalarType? residual_dtype, bool store_grad_residual) "
      "-> (Tensor grad_x, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");

  // Fused feed-forward, forward, on 2-D rows x (M, K); x, w1, b1, w2, b2 of one dtype:
  //   pre    = x @ w1.T + b1                               (M, H1), w1 (H1, K), b1 (H1,)
  //   hidden = dropout(act(pre))                           (M, H),  H1 = H
  //            dropout(act(pre[:, :H]) * pre[:, H:])       gated ("swiglu", "geglu"): H1 = 2H
  //   out    = hidden @ w2.T + b2                          (M, N),  w2 (N, H), b2 (N,)
  // act: "relu", "gelu" (exact, erf), "gelu_tanh", "silu"; "swiglu" = silu(gate) * up,
  // "geglu" = gelu(gate) * up (exact). Elementwise maths in float32 (float64 for float64).
  // Dropout (dropout_p > 0; seed: int64 tensor of one element on x's device) keeps hidden
  // element (i, j) iff philox_uniform(seed, i * H + j) >= dropout_p (philox.h) and scales it by
  // 1 / (1 - dropout_p). preact is pre in x's dtype when save_preact, else empty; for "relu"
  // it may hold relu(pre) instead, which is all the backward needs, and on CPU in float32 /
  // float64 pre - b1 (the kernels' passes add b1 there): only the backward reads it.
  m.def(
      "feed_forward_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, "
      "float dropout_p, Tensor? seed, bool save_preact) -> (Tensor out, Tensor preact)");
  // Backward of the above. preact: the forward's saved preact, or None to recompute it from
  // x, w1, b1. Gradients in x's dtype (bias gradients summed in float32, then rounded);
  // grad_b1 is empty when b1 is None, grad_b2 when has_b2 is false.
  m.def(
      "feed_forward_bwd(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, "
      "Tensor? preact, str activation, float dropout_p, Tensor? seed, bool has_b2) "
      "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");

  // Flash attention on CPU tensors (float32, float64): the kernels fastformer::attention_fwd /
  // _bwd (fastformer/ops/attention.py) run for CPU tensors unless Triton's interpreter is
  // switched on. q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), any strides, Hkv
  // dividing Hq; mask broadcast to (B, Hq, L, S) by its strides (bool keeps where
  // true, float is added to the scores); alibi_slopes (B, Hq), any strides, adds
  // -slope * |j - (i + diagonal_offset)| to the score of query i and key j; softcap > 0 caps
  // the scaled products first, softcap * tanh(scale * q.k / softcap). Key j is visible
  // to query i iff
  //   i + diagonal_offset - window_left <= j <= i + diagonal_offset + window_right
  // (a negative side is unbounded). Returns out (B, Hq, L, Dv), lse (B, Hq, L) and stats
  // (B, Hq, L, 2) = (row max, log2 row sum) of the base-2 scores, all in q's dtype (out laid
  // out in memory as q is; the backward's grad_q, grad_k, grad_v as q, k, v); a row that
  // sees no key gives zeros and lse -inf. Dropout as in feed_forward_fwd, drawn at
  // offset ((b * Hq + h) * L + i) * S + j.
  m.def(
      "cpu_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi_slopes, "
      "Tensor? seed, float scale, float softcap, float dropout_p, int diagonal_offset, "
      "int window_left, int window_right) -> (Tensor out, Tensor lse, Tensor stats)");
  // Backward of the above; grad_lse, when given, is the gradient flowing into lse.
  m.def(
      "cpu_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor stats, Tensor? grad_lse, Tensor? mask, Tensor? alibi_slopes, Tensor? seed, "
      "float scale, float softcap, float dropout_p, int diagonal_offset, int window_left, "
      "int window_right) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // The cache of freed CPU output blocks (cpu_allocation.h): its state
  // [cached_bytes, cached_blocks, limit_bytes, reuses, fresh], and a call that empties it.
  m.def("cpu_cache_stats() -> int[]", &fastformer::cpu_cache_stats);
  m.def("empty_cpu_cache() -> ()", &fastformer::empty_cpu_cache);
  // The library of the CPU feed-forward's x @ W.T GEMMs: "onednn" or "mkl".
  m.def("cpu_gemm_library() -> str", &fastformer::cpu_gemm_library);
}

// The extension is a Python module only so that `import fastformer._C` loads the library
// (and with it the registrations above); it exposes no Python functions of its own.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
