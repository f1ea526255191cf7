// The activation of fastformer::feed_forward_fwd / _bwd (schemas in ops.cpp), parsed once per
// call from its name, shared by the CPU and CUDA implementations.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>
#include <type_traits>

namespace fastformer {

// The elementwise function applied to the pre-activation (the gate's, for gated ones).
enum class ActivationKind { kRelu, kGelu, kGeluTanh, kSilu };

struct Activation {
  ActivationKind kind;
  bool gated;  // hidden = act(gate) * up, with pre = [gate | up]
};

inline Activation parse_activation(std::string_view name) {
  if (name == "relu") return {ActivationKind::kRelu, false};
  if (name == "gelu") return {ActivationKind::kGelu, false};
  if (name == "gelu_tanh") return {ActivationKind::kGeluTanh, false};
  if (name == "silu") return {ActivationKind::kSilu, false};
  if (name == "swiglu") return {ActivationKind::kSilu, true};
  if (name == "geglu") return {ActivationKind::kGelu, true};
  TORCH_CHECK(false, "feed_forward: activation must be one of relu, gelu, gelu_tanh, silu, ",
              "swiglu, geglu; got '", name, "'");
}

// The sizes of one call: x (M, K), w1 (H1, K), w2 (N, H), with H1 = 2H for gated activations.
struct FeedForwardSizes {
  int64_t M, K, H, H1, N;
};

// Checks that the 2-D shapes of x, w1 and w2 chain (the caller has checked their ranks).
inline FeedForwardSizes check_feed_forward_sizes(const Activation& act, c10::IntArrayRef x,
                                                 c10::IntArrayRef w1, c10::IntArrayRef w2) {
  const int64_t H1 = w1[0];
  TORCH_CHECK(w1[1] == x[1], "feed_forward: w1 must have shape [hidden, ", x[1],
              "] (x's feature size), got ", w1);
  TORCH_CHECK(!act.gated || H1 % 2 == 0, "feed_forward: a gated activation needs w1 with an ",
              "even number of rows (gate, then up), got ", w1);
  const int64_t H = act.gated ? H1 / 2 : H1;
  TORCH_CHECK(w2[1] == H, "feed_forward: w2 must have shape [out_features, ", H, "], got ", w2);
  return {x[0], x[1], H, H1, w2[0]};
}

// Calls f(std::integral_constant<ActivationKind, kind>{}), so kernels are compiled once per
// activation with no branch in their inner loops.
template <typename F>
decltype(auto) dispatch_activation(ActivationKind kind, const F& f) {
  switch (kind) {
    case ActivationKind::kRelu:
      return f(std::integral_constant<ActivationKind, ActivationKind::kRelu>{});
    case ActivationKind::kGelu:
      return f(std::integral_constant<ActivationKind, ActivationKind::kGelu>{});
    case ActivationKind::kGeluTanh:
      return f(std::integral_constant<ActivationKind, ActivationKind::kGeluTanh>{});
    case ActivationKind::kSilu:
      return f(std::integral_constant<ActivationKind, ActivationKind::kSilu>{});
  }
  TORCH_CHECK(false, "feed_forward: unknown activation kind");
}

// The library running the CPU feed-forward's float32/bfloat16 GEMMs of the form x @ W.T:
// "onednn" or "mkl" (FASTFORMER_CPU_GEMM, else by the CPU's maker; feed_forward_cpu.cpp).
std::string cpu_gemm_library();

}  // namespace fastformer
