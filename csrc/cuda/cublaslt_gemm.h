// One cuBLASLt matmul with an epilogue (cublaslt_gemm.cu), in cuBLAS's column-major terms:
//
//   D (m x n, leading dimension ldd) = op_a(A) (m x k) @ op_b(B) (k x n), then the epilogue,
//
// where op_a(A) = A (stored m x k, lda >= m) or A^T (stored k x m, lda >= k), likewise for B.
// A row-major torch matrix X (r x c, contiguous) is, read column-major, X^T (c x r, ld = c); so a
// row-major product C = P @ Q is computed as C^T = Q^T @ P^T with D = C's buffer, m = C's
// columns, n = C's rows: the caller swaps the operands and transposes. feed_forward_cuda.cu
// derives each of its GEMMs this way.
//
// No cublasLt.h here: callers see only this small interface.
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastformer::cuda {

// The epilogues used by the feed-forward op (cublasLtEpilogue_t of the same name).
enum class LtEpilogue {
  kDefault,      // D = A @ B
  kBias,         // D = A @ B + bias (bias: m values, broadcast over columns)
  kRelu,         // D = relu(A @ B)
  kReluBias,     // D = relu(A @ B + bias)
  kGelu,         // D = gelu_tanh(A @ B)
  kGeluBias,     // D = gelu_tanh(A @ B + bias)
  kGeluAux,      // D = gelu_tanh(Z), aux = Z = A @ B
  kGeluAuxBias,  // D = gelu_tanh(Z), aux = Z = A @ B + bias
  kDGelu,        // D = (A @ B) * gelu_tanh'(aux)
  kDGeluBGrad,   // as kDGelu, and bias = row sums of D (m values; the bias gradient)
  kBGradB,       // D = A @ B, and bias = column sums of op_b(B) over k (n values)
};

struct LtMatmul {
  int64_t m, n, k;
  bool transpose_a;
  const void* a;
  int64_t lda;
  bool transpose_b;
  const void* b;
  int64_t ldb;
  void* d;  // C = D (beta = 0)
  int64_t ldd;
  LtEpilogue epilogue = LtEpilogue::kDefault;
  // kBias / kReluBias / kGeluBias / kGeluAuxBias: the bias to add (input, D's dtype);
  // kDGeluBGrad / kBGradB: where the bias gradient is written (D's dtype).
  void* bias = nullptr;
  // kGeluAux*: written with the pre-activation; kDGelu*: read. Same layout and dtype as D,
  // leading dimension ld_aux (a multiple of 8).
  void* aux = nullptr;
  int64_t ld_aux = 0;
};

// Runs the matmul on `stream` (the current stream of the current device; A, B, D of `dtype`:
// float32, float16 or bfloat16, float32 accumulation; for float32, TF32 tensor cores when
// allow_tf32, as torch's matmul precision setting allows ATen's GEMMs). Returns false, having
// launched nothing, when cuBLASLt has no algorithm for it or any cuBLASLt call fails (a warning,
// once, gives the status); the caller then computes the same result another way. Never throws
// for cuBLASLt's sake.
bool lt_matmul(const LtMatmul& mm, c10::ScalarType dtype, bool allow_tf32, cudaStream_t stream);

}  // namespace fastformer::cuda
