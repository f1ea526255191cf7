// Operator schemas of fastformer: the one place every op's signature is defined.
//
// CPU kernels register themselves beside their implementation (TORCH_LIBRARY_IMPL in
// <op>_cpu.cpp); the CUDA kernels of the Triton ops are registered from Python
// (fastformer/ops/<op>.py), as are the fake kernels and autograd formulas.
#include "cpu_allocation.h"

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

  // The cache of freed CPU output blocks (cpu_allocation.h): its state
  // [cached_bytes, cached_blocks, limit_bytes, reuses, fresh], and a call that empties it.
  m.def("cpu_cache_stats() -> int[]", &fastformer::cpu_cache_stats);
  m.def("empty_cpu_cache() -> ()", &fastformer::empty_cpu_cache);
}

// The extension is a Python module only so that `import fastformer._C` loads the library
// (and with it the registrations above); it exposes no Python functions of its own.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
