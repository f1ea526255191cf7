// The elementwise CUDA kernels of the feed-forward op (feed_forward_kernels.cu), called by
// feed_forward_cuda.cu between its GEMMs. Plain pointers and sizes: no ATen here, so that the
// kernel file compiles quickly.
#pragma once

#include "feed_forward.h"

#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastformer::cuda {

// Shape of one call: pre is (rows, pre_cols) = [gate | up] for gated activations, hidden and
// grad_hidden are (rows, hidden_cols); all row-major and contiguous.
struct ElementwiseShape {
  int64_t rows;         // M
  int64_t hidden_cols;  // H
  int64_t pre_cols;     // H1: H, or 2H when gated
};

// Dropout of the hidden activation: keep (i, j) iff philox_uniform(*seed, i * H + j) >= p,
// kept values scaled by `scale` = 1 / (1 - p).
struct DropoutArgs {
  const int64_t* seed = nullptr;  // device pointer to the int64 seed; nullptr: no dropout
  float p = 0.f;                  // drop probability, compared as a float (philox.h)
  double scale = 1.0;             // 1 / (1 - p)
};

// Forward pass over pre = x @ w1.T + b1 (GEMM1's output, bias included):
//   hidden = dropout(act(pre))                 plain activations
//            dropout(act(gate) * up)           gated, gate = pre[:, :H], up = pre[:, H:]
// hidden may be pre itself (plain activation, pre not needed afterwards): each element is
// read before it is written, by the same thread.
struct ForwardArgs {
  const void* pre;  // (M, H1)
  void* hidden;     // (M, H) out
};

// Backward pass, with k the dropout multiplier (keep * scale, or 1) and d = grad_hidden * k:
//   plain:  grad_pre  = d * act'(pre)
//   gated:  grad_gate = d * up * act'(gate),   grad_up = d * act(gate)
//   hidden  = k * act(pre)  (gated: k * act(gate) * up), recomputed for grad_w2
//   grad_b1 = sum over rows of grad_pre (as rounded), in float, deterministic
// grad_pre may be grad_hidden itself (plain activations).
struct BackwardArgs {
  const void* grad_hidden;  // (M, H) grad_out @ w2
  const void* pre;          // (M, H1) the saved preact or its recomputation
  void* grad_pre;           // (M, H1) out
  void* hidden;             // (M, H) out, or nullptr when not needed
  void* grad_bias;          // (H1,) out, column sums of grad_pre in x's dtype, or nullptr
};

// The launchers run on `stream` (the current stream: the bias-gradient partial sums are
// allocated from the caching allocator for it). dtype: float32, float16 or bfloat16.
void launch_forward(c10::ScalarType dtype, Activation act, const ElementwiseShape& shape,
                    const ForwardArgs& args, const DropoutArgs& dropout, cudaStream_t stream);
void launch_backward(c10::ScalarType dtype, Activation act, const ElementwiseShape& shape,
                     const BackwardArgs& args, const DropoutArgs& dropout, cudaStream_t stream);

}  // namespace fastformer::cuda
