// The activation of fastformer::feed_forward_fwd / _bwd (schemas in ops.cpp), parsed once per
// call from its name, shared by the CPU and CUDA implementations.
#pragma once

#include <c10/util/Exception.h>

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

}  // namespace fastformer
