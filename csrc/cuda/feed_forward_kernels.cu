// Elementwise CUDA kernels of fastformer::feed_forward_fwd / _bwd (schemas and maths in ops.cpp,
// arguments in feed_forward_kernels.h): the work between the GEMMs, each pass one read of its
// inputs and one write of its outputs.
//
// Forward, per element (i, j) of hidden, from pre = x @ w1.T + b1 (GEMM1 adds the bias), with
// k_ij = keep_ij / (1 - p) (keep_ij: philox.h at offset i*H + j; k = 1 without dropout):
//   hidden_ij = k_ij * act(pre_ij)                          plain
//             = k_ij * act(pre_ij) * pre_i,H+j              gated: gate = pre[:, :H], up = pre[:, H:]
// Backward, from grad_hidden = grad_out @ w2 and pre, with d = k * grad_hidden:
//   grad_pre_ij = d_ij * act'(pre_ij)                       plain
//   grad_gate   = d * up * act'(gate),  grad_up = d * act(gate)
//   hidden      recomputed as in the forward (for grad_w2 = grad_out.T @ hidden)
//   grad_b1_j   = sum_i grad_pre_ij: each block sums its rows per column in registers, then
//                 over its thread rows in shared memory, and writes one partial per column; a
//                 second kernel sums the partials in a fixed order. No atomics, so the result
//                 is the same bit for bit on every run.
// Activations: relu; gelu = x Phi(x) (erff); gelu_tanh = x (1 + tanh(sqrt(2/pi)(x + 0.044715
// x^3))) / 2; silu = x sigmoid(x); derivatives in the comments below. The maths is in float for
// every dtype and each stored value is rounded once to the tensor's dtype; the build does not
// use --use_fast_math, whose tanh/erf approximations would be visible in float32 results.
//
// Thread mapping: a block is (bx, by) threads, bx * by = 256, bx the smallest power of two
// covering the row's 16-byte chunks (up to 32): each thread owns one chunk of N = 16 / sizeof(T)
// consecutive columns (plus the matching chunk of `up`) and walks rows_per_thread rows,
// by apart. grid.x counts row tiles (up to 2^31 - 1), grid.y column tiles (at most 65535, the
// kernels loop over the rest). Chunks are loaded with one 16-byte access when every pointer is
// 16-byte aligned and H is a multiple of N; otherwise element by element, with bounds. Indices
// are int64.
#include "cuda/feed_forward_kernels.h"
#include "philox.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastformer::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 8;
constexpr int kMaxGridY = 65535;

// Columns per thread: one 16-byte access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads n <= N consecutive elements as float; lanes past n read as 0. `vectorized` promises
// n == N and a 16-byte aligned p.
template <int N, typename T>
__device__ __forceinline__ void load(const T* p, int n, bool vectorized, float (&out)[N]) {
  if (vectorized) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int v = 0; v < N; ++v) {
      out[v] = static_cast<float>(pack.v[v]);
    }
  } else {
#pragma unroll
    for (int v = 0; v < N; ++v) {
      out[v] = v < n ? static_cast<float>(p[v]) : 0.f;
    }
  }
}

// Stores the first n values rounded to T, and replaces each value by its rounded self.
template <int N, typename T>
__device__ __forceinline__ void store(T* p, int n, bool vectorized, float (&values)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int v = 0; v < N; ++v) {
    pack.v[v] = static_cast<T>(values[v]);
    values[v] = static_cast<float>(pack.v[v]);
  }
  if (vectorized) {
    *reinterpret_cast<Pack<T, N>*>(p) = pack;
  } else {
#pragma unroll
    for (int v = 0; v < N; ++v) {
      if (v < n) {
        p[v] = pack.v[v];
      }
    }
  }
}

constexpr float kSqrtHalf = 0.70710678118654752440f;       // 1 / sqrt(2)
constexpr float kSqrtTwoOverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kInvSqrtTwoPi = 0.39894228040143267794f;   // 1 / sqrt(2 pi)
constexpr float kGeluCubic = 0.044715f;

// act(x) and, when `derivative` is given, act'(x).
template <ActivationKind A>
__device__ __forceinline__ float activation(float x, float* derivative = nullptr) {
  if constexpr (A == ActivationKind::kRelu) {
    // relu(x) = max(x, 0) (NaN stays NaN, as in torch); relu'(x) = 1 - [x <= 0], so a NaN
    // passes its gradient on, as torch's threshold_backward does.
    if (derivative != nullptr) {
      *derivative = x <= 0.f ? 0.f : 1.f;
    }
    return x <= 0.f ? 0.f : x;
  } else if constexpr (A == ActivationKind::kGelu) {
    // x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2;  d/dx = Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi)
    const float cdf = 0.5f * (1.f + erff(x * kSqrtHalf));
    if (derivative != nullptr) {
      *derivative = cdf + x * kInvSqrtTwoPi * expf(-0.5f * x * x);
    }
    return x * cdf;
  } else if constexpr (A == ActivationKind::kGeluTanh) {
    // x (1 + tanh(u)) / 2, u = sqrt(2/pi) (x + c x^3), as x s with s = (1 + tanh(u)) / 2 =
    // sigmoid(2u), as the CPU kernels compute it: no cancellation in 1 + tanh(u) for u << 0.
    // d/dx = s + x 2 s (1 - s) du/dx, du/dx = sqrt(2/pi) (1 + 3 c x^2)
    const float x2 = x * x;
    const float s = 1.f / (1.f + expf(-2.f * kSqrtTwoOverPi * x * (1.f + kGeluCubic * x2)));
    if (derivative != nullptr) {
      *derivative =
          s + 2.f * x * s * (1.f - s) * kSqrtTwoOverPi * (1.f + 3.f * kGeluCubic * x2);
    }
    return x * s;
  } else {
    // silu(x) = x s, s = 1 / (1 + exp(-x));  d/dx = s (1 + x (1 - s))
    const float s = 1.f / (1.f + expf(-x));
    if (derivative != nullptr) {
      *derivative = s * (1.f + x * (1.f - s));
    }
    return x * s;
  }
}

// Dropout multipliers of a chunk: k_v = keep ? scale : 0 at offsets first + v.
template <int N>
__device__ __forceinline__ void dropout_scale(float (&k)[N], uint64_t seed, int64_t first,
                                              float p, float scale) {
#pragma unroll
  for (int v = 0; v < N; ++v) {
    k[v] = dropout_keep(seed, first + v, p) ? scale : 0.f;
  }
}

// Kernel parameters, one struct per kernel (fields as in feed_forward_kernels.h).
// Dropout as the kernels see it.
struct KernelDropout {
  const int64_t* seed;  // device pointer; nullptr: no dropout
  float p;              // drop probability
  float scale;          // 1 / (1 - p)
};

template <typename T>
struct ForwardParams {
  const T* pre;          // (M, H1)
  T* hidden;             // (M, H), may alias pre (plain activations)
  KernelDropout dropout;
  int64_t M;             // rows
  int64_t H;             // hidden columns
  int rows_per_thread;   // rows walked by each thread, blockDim.y apart
  bool vectorized;       // 16-byte accesses (aligned pointers, H % N == 0)
};

template <typename T>
struct BackwardParams {
  const T* grad_hidden;  // (M, H)
  const T* pre;          // (M, H1)
  T* grad_pre;           // (M, H1), may alias grad_hidden (plain activations)
  T* hidden;             // (M, H) or nullptr
  float* partial;        // (gridDim.x, H1) per-block column sums of grad_pre, or nullptr
  KernelDropout dropout;
  int64_t M;
  int64_t H;
  int rows_per_thread;
  bool vectorized;
};

template <typename T, ActivationKind A, bool kGated>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardParams<T> p) {
  constexpr int N = kVec<T>;
  const int64_t H = p.H;
  const int64_t H1 = kGated ? 2 * H : H;
  const bool dropout = p.dropout.seed != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  const int64_t width = static_cast<int64_t>(blockDim.x) * N;  // columns of one tile
  const int64_t first_row =
      static_cast<int64_t>(blockIdx.x) * blockDim.y * p.rows_per_thread + threadIdx.y;
  for (int64_t col = blockIdx.y * width + threadIdx.x * N; col < H; col += gridDim.y * width) {
    const int n = static_cast<int>(std::min<int64_t>(N, H - col));
    for (int r = 0; r < p.rows_per_thread; ++r) {
      const int64_t row = first_row + static_cast<int64_t>(r) * blockDim.y;
      if (row >= p.M) {
        break;
      }
      const T* pre_row = p.pre + row * H1;
      float h[N];
      load(pre_row + col, n, p.vectorized, h);
#pragma unroll
      for (int v = 0; v < N; ++v) {
        h[v] = activation<A>(h[v]);
      }
      if constexpr (kGated) {
        float up[N];
        load(pre_row + H + col, n, p.vectorized, up);
#pragma unroll
        for (int v = 0; v < N; ++v) {
          h[v] *= up[v];
        }
      }
      if (dropout) {
        float k[N];
        dropout_scale(k, seed, row * H + col, p.dropout.p, p.dropout.scale);
#pragma unroll
        for (int v = 0; v < N; ++v) {
          h[v] *= k[v];
        }
      }
      store(p.hidden + row * H + col, n, p.vectorized, h);
    }
  }
}

template <typename T, ActivationKind A, bool kGated>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardParams<T> p) {
  constexpr int N = kVec<T>;
  constexpr int kParts = kGated ? 2 : 1;  // column sums per thread chunk: gate (and up)
  // [by][kParts][bx * N] column sums of each thread row, when p.partial is given.
  extern __shared__ float thread_sums[];
  const int64_t H = p.H;
  const int64_t H1 = kGated ? 2 * H : H;
  const bool dropout = p.dropout.seed != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  const int width = static_cast<int>(blockDim.x) * N;  // columns of one tile
  const int64_t first_row =
      static_cast<int64_t>(blockIdx.x) * blockDim.y * p.rows_per_thread + threadIdx.y;
  // The tile loop is uniform across the block (it synchronizes); threads past H idle in it.
  for (int64_t tile = static_cast<int64_t>(blockIdx.y) * width; tile < H;
       tile += static_cast<int64_t>(gridDim.y) * width) {
    const int64_t col = tile + threadIdx.x * N;
    const int n = col < H ? static_cast<int>(std::min<int64_t>(N, H - col)) : 0;
    float sum_gate[N] = {};
    float sum_up[N] = {};
    for (int r = 0; n > 0 && r < p.rows_per_thread; ++r) {
      const int64_t row = first_row + static_cast<int64_t>(r) * blockDim.y;
      if (row >= p.M) {
        break;
      }
      const T* pre_row = p.pre + row * H1;
      float grad[N];
      float gate[N];
      float up[N] = {};
      load(p.grad_hidden + row * H + col, n, p.vectorized, grad);
      load(pre_row + col, n, p.vectorized, gate);
      if constexpr (kGated) {
        load(pre_row + H + col, n, p.vectorized, up);
      }
      float k[N];
      if (dropout) {
        dropout_scale(k, seed, row * H + col, p.dropout.p, p.dropout.scale);
      } else {
#pragma unroll
        for (int v = 0; v < N; ++v) {
          k[v] = 1.f;
        }
      }
      float grad_gate[N];
      float grad_up[N] = {};
      float h[N];
#pragma unroll
      for (int v = 0; v < N; ++v) {
        float derivative;
        const float a = activation<A>(gate[v], &derivative);
        const float d = grad[v] * k[v];
        if constexpr (kGated) {
          grad_gate[v] = d * up[v] * derivative;
          grad_up[v] = d * a;
          h[v] = a * up[v] * k[v];
        } else {
          grad_gate[v] = d * derivative;
          h[v] = a * k[v];
        }
      }
      T* grad_pre_row = p.grad_pre + row * H1;
      store(grad_pre_row + col, n, p.vectorized, grad_gate);
      if constexpr (kGated) {
        store(grad_pre_row + H + col, n, p.vectorized, grad_up);
      }
      if (p.hidden != nullptr) {
        store(p.hidden + row * H + col, n, p.vectorized, h);
      }
#pragma unroll
      for (int v = 0; v < N; ++v) {
        sum_gate[v] += grad_gate[v];  // rounded by store: the sums see the stored grad_pre
        sum_up[v] += grad_up[v];
      }
    }
    if (p.partial != nullptr) {
      float* mine = thread_sums + threadIdx.y * kParts * width + threadIdx.x * N;
#pragma unroll
      for (int v = 0; v < N; ++v) {
        mine[v] = sum_gate[v];
        if constexpr (kGated) {
          mine[width + v] = sum_up[v];
        }
      }
      __syncthreads();
      if (threadIdx.y == 0) {
        float* out = p.partial + static_cast<int64_t>(blockIdx.x) * H1;
        for (int v = 0; v < n; ++v) {
          for (int part = 0; part < kParts; ++part) {
            float s = 0.f;
            for (unsigned y = 0; y < blockDim.y; ++y) {
              s += thread_sums[(y * kParts + part) * width + threadIdx.x * N + v];
            }
            out[part * H + col + v] = s;
          }
        }
      }
      __syncthreads();
    }
  }
}

// out_j = sum_t partial_tj over t in [0, tiles), rounded to T. Block (32, 8): each thread row
// sums every 8th tile, then thread row 0 adds the 8 sums in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(const float* partial, int64_t tiles, int64_t cols, T* out) {
  __shared__ float sums[kThreads / 32][32];
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * 32; first < cols;
       first += static_cast<int64_t>(gridDim.x) * 32) {
    const int64_t col = first + threadIdx.x;
    float s = 0.f;
    if (col < cols) {
      for (int64_t t = threadIdx.y; t < tiles; t += blockDim.y) {
        s += partial[t * cols + col];
      }
    }
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
      float total = 0.f;
      for (unsigned y = 0; y < blockDim.y; ++y) {
        total += sums[y][threadIdx.x];
      }
      out[col] = static_cast<T>(total);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration and dispatch

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

struct Grid {
  dim3 grid;
  dim3 block;
  int rows_per_thread;
};

Grid make_grid(int64_t M, int64_t H, int N) {
  const int64_t chunks = ceil_div(H, N);
  unsigned bx = 1;
  while (bx < 32 && bx < chunks) {
    bx *= 2;
  }
  const unsigned by = kThreads / bx;
  const int64_t row_tiles = ceil_div(M, static_cast<int64_t>(by) * kRowsPerThread);
  TORCH_CHECK(row_tiles <= std::numeric_limits<int32_t>::max(),
              "feed_forward: too many rows for one launch: ", M);
  const int64_t col_tiles = std::min<int64_t>(ceil_div(chunks, bx), kMaxGridY);
  return {dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles)),
          dim3(bx, by), kRowsPerThread};
}

bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, kind constant, gated constant) for the dtype and activation: float,
// float16, bfloat16 x the six activations (gated ones: silu and gelu only).
template <typename F>
void dispatch(c10::ScalarType dtype, Activation act, const F& f) {
  const auto with_type = [&](auto type_tag) {
    if (act.gated) {
      TORCH_CHECK(act.kind == ActivationKind::kSilu || act.kind == ActivationKind::kGelu,
                  "feed_forward: gated activations are swiglu and geglu");
      if (act.kind == ActivationKind::kSilu) {
        f(type_tag, std::integral_constant<ActivationKind, ActivationKind::kSilu>{},
          std::true_type{});
      } else {
        f(type_tag, std::integral_constant<ActivationKind, ActivationKind::kGelu>{},
          std::true_type{});
      }
    } else {
      dispatch_activation(act.kind, [&](auto kind) { f(type_tag, kind, std::false_type{}); });
    }
  };
  switch (dtype) {
    case c10::ScalarType::Float:
      return with_type(TypeTag<float>{});
    case c10::ScalarType::Half:
      return with_type(TypeTag<c10::Half>{});
    case c10::ScalarType::BFloat16:
      return with_type(TypeTag<c10::BFloat16>{});
    default:
      TORCH_CHECK(false, "feed_forward: CUDA kernels take float32, float16 or bfloat16, got ",
                  dtype);
  }
}

}  // namespace

KernelDropout kernel_dropout(const DropoutArgs& dropout) {
  return {dropout.seed, dropout.p, static_cast<float>(dropout.scale)};
}

void launch_forward(c10::ScalarType dtype, Activation act, const ElementwiseShape& shape,
                    const ForwardArgs& args, const DropoutArgs& dropout, cudaStream_t stream) {
  if (shape.rows == 0 || shape.hidden_cols == 0) {
    return;
  }
  dispatch(dtype, act, [&](auto type_tag, auto kind, auto gated) {
    using T = typename decltype(type_tag)::type;
    constexpr int N = kVec<T>;
    const Grid g = make_grid(shape.rows, shape.hidden_cols, N);
    ForwardParams<T> p;
    p.pre = static_cast<const T*>(args.pre);
    p.hidden = static_cast<T*>(args.hidden);
    p.dropout = kernel_dropout(dropout);
    p.M = shape.rows;
    p.H = shape.hidden_cols;
    p.rows_per_thread = g.rows_per_thread;
    p.vectorized = shape.hidden_cols % N == 0 && aligned16(args.pre) && aligned16(args.hidden);
    forward_kernel<T, decltype(kind)::value, decltype(gated)::value>
        <<<g.grid, g.block, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_backward(c10::ScalarType dtype, Activation act, const ElementwiseShape& shape,
                     const BackwardArgs& args, const DropoutArgs& dropout, cudaStream_t stream) {
  if (shape.rows == 0 || shape.hidden_cols == 0) {
    if (args.grad_bias != nullptr && shape.pre_cols > 0) {
      // No rows: the bias gradient is zero.
      C10_CUDA_CHECK(cudaMemsetAsync(args.grad_bias, 0, shape.pre_cols * c10::elementSize(dtype),
                                     stream));
    }
    return;
  }
  dispatch(dtype, act, [&](auto type_tag, auto kind, auto gated) {
    using T = typename decltype(type_tag)::type;
    constexpr int N = kVec<T>;
    constexpr int kParts = decltype(gated)::value ? 2 : 1;
    const Grid g = make_grid(shape.rows, shape.hidden_cols, N);
    const int64_t tiles = g.grid.x;
    // Partial column sums, (tiles, H1) floats, from the caching allocator for this stream.
    c10::DataPtr partial;
    if (args.grad_bias != nullptr) {
      partial = c10::cuda::CUDACachingAllocator::get()->allocate(tiles * shape.pre_cols *
                                                                 sizeof(float));
    }
    BackwardParams<T> p;
    p.grad_hidden = static_cast<const T*>(args.grad_hidden);
    p.pre = static_cast<const T*>(args.pre);
    p.grad_pre = static_cast<T*>(args.grad_pre);
    p.hidden = static_cast<T*>(args.hidden);
    p.partial = static_cast<float*>(partial.get());
    p.dropout = kernel_dropout(dropout);
    p.M = shape.rows;
    p.H = shape.hidden_cols;
    p.rows_per_thread = g.rows_per_thread;
    p.vectorized = shape.hidden_cols % N == 0 && aligned16(args.grad_hidden) &&
                   aligned16(args.pre) && aligned16(args.grad_pre) && aligned16(args.hidden);
    const size_t shared_bytes =
        args.grad_bias != nullptr ? sizeof(float) * kThreads * N * kParts : 0;
    backward_kernel<T, decltype(kind)::value, decltype(gated)::value>
        <<<g.grid, g.block, shared_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (args.grad_bias != nullptr) {
      const int64_t blocks = std::min<int64_t>(ceil_div(shape.pre_cols, 32),
                                               std::numeric_limits<int32_t>::max());
      column_sum_kernel<T><<<static_cast<unsigned>(blocks), dim3(32, kThreads / 32), 0, stream>>>(
          p.partial, tiles, shape.pre_cols, static_cast<T*>(args.grad_bias));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace fastformer::cuda
