// CPU kernels of fastformer::feed_forward_fwd / _bwd (schemas and maths in ops.cpp).
//
// The GEMMs go to ATen (MKL) or oneDNN (gemm_nt); everything between them is
// one parallel, vectorized pass over the (M, H1) pre-activation:
//   forward:  pre = x @ w1.T (+ b1 for half types, rounded once, as F.linear's), then the
//             pass: hidden = dropout(act(pre (+ b1 for float32/float64: bias_in_pass)))
//   backward: from grad_hidden = grad_out @ w2 and pre, with k the dropout multiplier
//     (keep / (1 - p), regenerated from the seed) and act' the derivative:
//       plain:  grad_pre = grad_hidden * k * act'(pre)
//       gated:  grad_gate = grad_hidden * k * up * act'(gate),  grad_up = grad_hidden * k * act(gate)
//     and hidden = dropout(act(pre)) recomputed for grad_w2 = grad_out.T @ hidden, and
//     grad_b1 = sum over rows of grad_pre, summed per chunk of rows, then over chunks in order
//     (deterministic).
//   Then grad_w1 = grad_pre.T @ x and grad_x = grad_pre @ w1.
// Saved for backward: x and pre only (eager keeps x, pre, hidden and the dropout mask); with
// preact = None the backward recomputes pre with one more GEMM.
//
// Elementwise maths in float (double for float64); each value is rounded once to x's dtype.
// Large outputs come from the huge-page allocator (cpu_allocation.h), so that a training loop
// does not pay a page fault per 4 KiB of every fresh GEMM output.
#include "cpu_allocation.h"
#include "cpu_vec.h"
#include "feed_forward.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <cmath>
#include <cstring>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastformer {
namespace {

using at::ScalarType;

constexpr const char* kOp = "feed_forward";
constexpr int64_t kGrainElements = 32768;

// ---------------------------------------------------------------------------------------------
// Activations on vectors of acc_t: the value, and the value with its derivative.

// (1 + tanh(u)) / 2 with u = sqrt(2 / pi) (x + 0.044715 x^3), computed as sigmoid(2u): one exp
// and one division instead of a tanh, and no cancellation in 1 + tanh(u) for u << 0.
template <typename V>
C10_ALWAYS_INLINE V tanh_gelu_gate(const V& x) {
  using acc_t = typename V::value_type;
  const V two_u = V(acc_t(2 * M_2_SQRTPI * M_SQRT1_2)) * (x + V(acc_t(0.044715)) * x * x * x);
  return V(acc_t(1)) / (V(acc_t(1)) + two_u.neg().exp());
}

// Phi(x) = (1 + erf(x / sqrt(2))) / 2, given gaussian = exp(-x^2 / 2). In float, erf comes from
// Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the formula at::vec's own float erf uses),
// which needs exactly that exponential: the backward pays one exp instead of two. In double
// (gradcheck's precision) the full-precision erf.
template <typename V>
C10_ALWAYS_INLINE V normal_cdf(const V& x, const V& gaussian) {
  using acc_t = typename V::value_type;
  const V half(acc_t(0.5));
  if constexpr (std::is_same_v<acc_t, double>) {
    return half * (V(acc_t(1)) + (x * V(acc_t(M_SQRT1_2))).erf());
  } else {
    const V z = x.abs() * V(acc_t(M_SQRT1_2));
    const V t = V(1.f) / (V(1.f) + V(0.3275911f) * z);
    V poly = at::vec::fmadd(t, V(1.061405429f), V(-1.453152027f));
    poly = at::vec::fmadd(poly, t, V(1.421413741f));
    poly = at::vec::fmadd(poly, t, V(-0.284496736f));
    poly = at::vec::fmadd(poly, t, V(0.254829592f));
    const V tail = half * poly * t * gaussian;  // (1 - erf(z)) / 2 = Phi(-|x|)
    return V::blendv(V(1.f) - tail, tail, x < V(0.f));
  }
}

template <ActivationKind A, typename V>
C10_ALWAYS_INLINE V activation(const V& x) {
  using acc_t = typename V::value_type;
  if constexpr (A == ActivationKind::kRelu) {
    return at::vec::clamp_min(x, V(acc_t(0)));
  } else if constexpr (A == ActivationKind::kGelu) {
    // x * Phi(x), Phi(x) = (1 + erf(x / sqrt(2))) / 2
    return x * V(acc_t(0.5)) * (V(acc_t(1)) + (x * V(acc_t(M_SQRT1_2))).erf());
  } else if constexpr (A == ActivationKind::kGeluTanh) {
    return x * tanh_gelu_gate(x);
  } else {
    // x * sigmoid(x)
    return x / (V(acc_t(1)) + x.neg().exp());
  }
}

template <ActivationKind A, typename V>
C10_ALWAYS_INLINE std::pair<V, V> activation_and_derivative(const V& x) {
  using acc_t = typename V::value_type;
  const V one(acc_t(1));
  const V half(acc_t(0.5));
  if constexpr (A == ActivationKind::kRelu) {
    // relu'(x) = 1 - [x <= 0], so a NaN passes its gradient on, as torch's threshold_backward.
    return {at::vec::clamp_min(x, V(acc_t(0))), V(acc_t(1)) - x.le(V(acc_t(0)))};
  } else if constexpr (A == ActivationKind::kGelu) {
    // d/dx x Phi(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    const V gaussian = (x * x * V(acc_t(-0.5))).exp();
    const V cdf = normal_cdf(x, gaussian);
    return {x * cdf, cdf + x * gaussian * V(acc_t(0.5 * M_2_SQRTPI * M_SQRT1_2))};
  } else if constexpr (A == ActivationKind::kGeluTanh) {
    // s = (1 + tanh(u)) / 2 = sigmoid(2u), u = k (x + c x^3):
    // d/dx x s = s + x s (1 - s) 2 du/dx,  du/dx = k (1 + 3 c x^2)
    const V s = tanh_gelu_gate(x);
    const V du2 = V(acc_t(2 * M_2_SQRTPI * M_SQRT1_2)) * (one + V(acc_t(3 * 0.044715)) * x * x);
    return {x * s, s + x * s * (one - s) * du2};
  } else {
    // s = sigmoid(x): d/dx x s = s (1 + x (1 - s))
    const V s = one / (one + x.neg().exp());
    return {x * s, s * (one + x * (one - s))};
  }
}

// ---------------------------------------------------------------------------------------------
// The elementwise passes. pre and hidden are contiguous (M, H1) and (M, H) buffers.

struct Shape {
  int64_t M;  // rows (tokens)
  int64_t H;  // hidden features: the width of hidden and of grad_hidden
  int64_t H1;  // width of pre: H, or 2H for gated activations
};

int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1));
}

// The pre-activation's element j of a row: the GEMM's value, plus b1[j] when the bias is
// added here rather than by the GEMM (bias non-null: see bias_in_pass).
template <typename acc_t, typename T, typename N>
C10_ALWAYS_INLINE Vec<acc_t> load_pre(const T* pre_row, const T* bias, int64_t j, N n) {
  Vec<acc_t> value = load<acc_t>(pre_row + j, n);
  if (bias != nullptr) {
    value = value + load<acc_t>(bias + j, n);
  }
  return value;
}

// hidden = dropout(act(pre + b1)) (gated: act(gate) * up), b1 only when given. hidden may
// alias pre for plain activations (each element is read before it is overwritten).
template <ActivationKind A, bool kGated, typename T>
void forward_pass(const T* pre, const T* b1, T* hidden, const Dropout& dropout, const Shape& s) {
  using acc_t = at::opmath_type<T>;
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const acc_t scale = static_cast<acc_t>(dropout.scale);
  at::parallel_for(0, s.M, grain_rows(s.H1), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> keep_scale(dropout.enabled ? s.H : 0);
    for (int64_t i = begin; i < end; ++i) {
      const T* pre_row = pre + i * s.H1;
      T* hidden_row = hidden + i * s.H;
      if (dropout.enabled) {
        dropout_row_scale(keep_scale.data(), s.H, dropout.seed, i * s.H, dropout.p, scale);
      }
      for_each_step<L>(s.H, [&](int64_t j, auto n) {
        V h = activation<A>(load_pre<acc_t>(pre_row, b1, j, n));
        if constexpr (kGated) {
          h = h * load_pre<acc_t>(pre_row, b1, s.H + j, n);
        }
        if (dropout.enabled) {
          h = h * load<acc_t>(keep_scale.data() + j, n);
        }
        store(hidden_row + j, h, n);
      });
    }
  });
}

// From grad_hidden (M, H) and pre (M, H1) (plus b1 when given, as in forward_pass): grad_pre
// (M, H1), which may alias grad_hidden for plain activations, hidden (M, H) recomputed, and
// grad_b1 (H1,) when given.
template <ActivationKind A, bool kGated, typename T>
void backward_pass(const T* grad_hidden, const T* pre, const T* b1, T* grad_pre, T* hidden,
                   at::opmath_type<T>* grad_b1, const Dropout& dropout, const Shape& s) {
  using acc_t = at::opmath_type<T>;
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const acc_t scale = static_cast<acc_t>(dropout.scale);
  const int64_t grain = grain_rows(s.H1);
  // Fixed chunks of rows, each with its own partial sums of grad_b1.
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (s.M + grain - 1) / grain));
  std::vector<acc_t> b1_partial(grad_b1 != nullptr ? num_chunks * s.H1 : 0, acc_t(0));

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> keep_scale(dropout.enabled ? s.H : 0);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* db = grad_b1 != nullptr ? b1_partial.data() + chunk * s.H1 : nullptr;
      for (int64_t i = chunk * s.M / num_chunks; i < (chunk + 1) * s.M / num_chunks; ++i) {
        const T* pre_row = pre + i * s.H1;
        const T* gh_row = grad_hidden + i * s.H;
        T* gp_row = grad_pre + i * s.H1;
        T* hidden_row = hidden + i * s.H;
        if (dropout.enabled) {
          dropout_row_scale(keep_scale.data(), s.H, dropout.seed, i * s.H, dropout.p, scale);
        }
        // Stores a gradient of pre, rounded, and adds the rounded value to the bias sums.
        const auto store_grad = [&](int64_t j, const V& g, auto n) {
          const V rounded = store(gp_row + j, g, n);
          if (db != nullptr) {
            store(db + j, load<acc_t>(db + j, n) + rounded, n);
          }
        };
        for_each_step<L>(s.H, [&](int64_t j, auto n) {
          V k = V(acc_t(1));
          if (dropout.enabled) {
            k = load<acc_t>(keep_scale.data() + j, n);
          }
          const V gh = load<acc_t>(gh_row + j, n) * k;
          const auto [a, da] = activation_and_derivative<A>(load_pre<acc_t>(pre_row, b1, j, n));
          if constexpr (kGated) {
            const V up = load_pre<acc_t>(pre_row, b1, s.H + j, n);
            store(hidden_row + j, a * up * k, n);
            store_grad(j, gh * up * da, n);
            store_grad(s.H + j, gh * a, n);
          } else {
            store(hidden_row + j, a * k, n);
            store_grad(j, gh * da, n);
          }
        });
      }
    }
  });
  if (grad_b1 != nullptr) {
    for (int64_t j = 0; j < s.H1; ++j) {
      acc_t total = 0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        total += b1_partial[chunk * s.H1 + j];
      }
      grad_b1[j] = total;
    }
  }
}

// Instantiates a pass for the activation and dtype of a call.
template <typename F>
void dispatch_pass(const Activation& act, ScalarType dtype, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, kOp, [&] {
    dispatch_activation(act.kind, [&](auto kind) {
      if (act.gated) {
        f(kind, std::true_type{}, static_cast<scalar_t*>(nullptr));
      } else {
        f(kind, std::false_type{}, static_cast<scalar_t*>(nullptr));
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks (the Python layer checks first and names the user's arguments; these guard
// direct calls of the dispatcher op).

void check_matrix(const Tensor& t, ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, kOp, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must have x's dtype ", dtype, ", got ",
              t.scalar_type());
}

// b1 / b2 as a contiguous (n,) tensor, or nullopt.
std::optional<Tensor> check_bias(const std::optional<Tensor>& b, int64_t n, ScalarType dtype,
                                 const char* name) {
  if (!b.has_value() || !b->defined()) {
    return std::nullopt;
  }
  TORCH_CHECK(b->device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got ", b->device());
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, kOp, ": ", name, " must have shape [", n,
              "], got ", b->sizes());
  TORCH_CHECK(b->scalar_type() == dtype, kOp, ": ", name, " must have x's dtype ", dtype,
              ", got ", b->scalar_type());
  return b->contiguous();
}

// Checks x, w1, w2 against each other; returns the shape and the activation.
std::pair<Shape, Activation> check_operands(const Tensor& x, const Tensor& w1, const Tensor& w2,
                                            std::string_view activation_name) {
  const Activation act = parse_activation(activation_name);
  const ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double ||
                  dtype == ScalarType::BFloat16 || dtype == ScalarType::Half,
              kOp, ": x must be float32, float64, bfloat16 or float16, got ", dtype);
  check_matrix(x, dtype, "x");
  check_matrix(w1, dtype, "w1");
  check_matrix(w2, dtype, "w2");
  const FeedForwardSizes sizes = check_feed_forward_sizes(act, x.sizes(), w1.sizes(), w2.sizes());
  return {Shape{sizes.M, sizes.H, sizes.H1}, act};
}

Tensor new_buffer(int64_t rows, int64_t cols, ScalarType dtype) {
  return empty_cpu_huge_pages({rows, cols}, dtype);
}

// out = a @ b (+ bias broadcast over rows), into a fresh huge-page buffer, through ATen (MKL).
Tensor matmul(const Tensor& a, const Tensor& b, const std::optional<Tensor>& bias) {
  Tensor out = new_buffer(a.size(0), b.size(1), a.scalar_type());
  if (bias.has_value()) {
    at::addmm_out(out, *bias, a, b);
  } else {
    at::mm_out(out, a, b);
  }
  return out;
}

// oneDNN's inner product, as torch.compile's CPU backend calls it, when this torch has it.
using LinearPointwise = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                               c10::string_view, c10::List<std::optional<c10::Scalar>>,
                               std::optional<c10::string_view>);
std::optional<c10::TypedOperatorHandle<LinearPointwise>> onednn_linear_op() {
  static const auto op = []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    const auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value() || !at::globalContext().userEnabledMkldnn()) {
      return std::nullopt;
    }
    return handle->typed<LinearPointwise>();
  }();
  return op;
}

// Whether this CPU's maker is AMD (cpuid vendor "AuthenticAMD"); false off x86-64.
bool cpu_is_amd() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) {
    return false;
  }
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::string_view(vendor) == "AuthenticAMD";
#else
  return false;
#endif
}

// Which library runs the GEMMs of the form F.linear computes: FASTFORMER_CPU_GEMM=onednn|mkl,
// by default oneDNN's inner product on AMD CPUs (about 10% faster than MKL's sgemm on the AMD
// EPYC measured) and ATen's MKL path elsewhere (on the Intel Xeon measured, MKL ran every
// feed-forward GEMM as fast or faster, and writing into fastformer's huge-page buffers spares
// the page faults of oneDNN's fresh outputs: a feed-forward step 2% faster, a Transformer
// training step 1.5%).
bool prefer_onednn() {
  const char* choice = std::getenv("FASTFORMER_CPU_GEMM");
  const std::string_view name = choice == nullptr ? "" : choice;
  TORCH_CHECK(name.empty() || name == "onednn" || name == "mkl", kOp,
              ": FASTFORMER_CPU_GEMM must be 'onednn', 'mkl' or unset, got '", name, "'");
  if (!name.empty()) {
    return name == "onednn";
  }
  static const bool amd = cpu_is_amd();
  return amd;
}

// out = a @ w.T (+ bias): the GEMMs of the form F.linear computes, through oneDNN where
// prefer_onednn() says so and it supports the dtype (float32, bfloat16), else through ATen.
Tensor gemm_nt(const Tensor& a, const Tensor& w, const std::optional<Tensor>& bias) {
  const auto op = onednn_linear_op();
  const bool use_onednn = op.has_value() && a.size(0) > 0 && a.size(1) > 0 &&
                          (a.scalar_type() == ScalarType::Float ||
                           a.scalar_type() == ScalarType::BFloat16) &&
                          prefer_onednn();
  if (!use_onednn) {
    return matmul(a, w.t(), bias);
  }
  return op->call(a, w, bias, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

// Where b1 is added to x @ w1.T. float32 and float64: in the elementwise passes, which read
// pre anyway; the GEMM then neither fills its output with the broadcast bias first nor reads
// it back (two passes over (M, H1) fewer: 2% of a forward at 2048 x 512 -> 2048, 1.5% of a
// forward+backward), and pre, and the saved preact, hold x @ w1.T alone. float16 and
// bfloat16: by the GEMM, which adds it before rounding once to the half type (as F.linear).
bool bias_in_pass(ScalarType dtype) {
  return dtype == ScalarType::Float || dtype == ScalarType::Double;
}

// b1 for the GEMM of pre: unless bias_in_pass.
std::optional<Tensor> gemm_bias(const std::optional<Tensor>& b1, ScalarType dtype) {
  return bias_in_pass(dtype) ? std::nullopt : b1;
}

// b1's data for the passes: when bias_in_pass, else nullptr (the GEMM added it).
template <typename T>
const T* pass_bias(const std::optional<Tensor>& b1, ScalarType dtype) {
  return b1.has_value() && bias_in_pass(dtype) ? b1->const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// The ops

std::tuple<Tensor, Tensor> feed_forward_fwd_cpu(const Tensor& x, const Tensor& w1,
                                                const std::optional<Tensor>& b1,
                                                const Tensor& w2,
                                                const std::optional<Tensor>& b2,
                                                c10::string_view activation, double dropout_p,
                                                const std::optional<Tensor>& seed,
                                                bool save_preact) {
  // The GEMMs write into preallocated outputs (mm_out), which autograd refuses to record; the
  // op's own autograd formula (autograd.cpp) is what differentiates it.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [s, act] = check_operands(x, w1, w2, activation);
  const ScalarType dtype = x.scalar_type();
  const std::optional<Tensor> bias1 = check_bias(b1, s.H1, dtype, "b1");
  const std::optional<Tensor> bias2 = check_bias(b2, w2.size(0), dtype, "b2");
  const Dropout dropout = make_dropout(kOp, seed, dropout_p);

  Tensor pre = gemm_nt(x, w1, gemm_bias(bias1, dtype));
  // Plain activations without a saved pre write hidden over pre: one (M, H) buffer fewer.
  const bool in_place = !act.gated && !save_preact;
  Tensor hidden = in_place ? pre : new_buffer(s.M, s.H, dtype);
  dispatch_pass(act, dtype, [&](auto kind, auto gated, auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    forward_pass<decltype(kind)::value, decltype(gated)::value, T>(
        pre.const_data_ptr<T>(), pass_bias<T>(bias1, dtype), hidden.data_ptr<T>(), dropout, s);
  });
  Tensor out = gemm_nt(hidden, w2, bias2);
  return {out, save_preact ? pre : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> feed_forward_bwd_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
    const Tensor& w2, const std::optional<Tensor>& preact, c10::string_view activation,
    double dropout_p, const std::optional<Tensor>& seed, bool has_b2) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
  const auto [s, act] = check_operands(x, w1, w2, activation);
  const ScalarType dtype = x.scalar_type();
  check_matrix(grad_out, dtype, "grad_out");
  TORCH_CHECK(grad_out.size(0) == s.M && grad_out.size(1) == w2.size(0), kOp,
              ": grad_out must have shape [", s.M, ", ", w2.size(0), "], got ", grad_out.sizes());
  const std::optional<Tensor> bias1 = check_bias(b1, s.H1, dtype, "b1");
  const Dropout dropout = make_dropout(kOp, seed, dropout_p);

  Tensor pre;
  if (!preact.has_value() || !preact->defined()) {
    pre = gemm_nt(x, w1, gemm_bias(bias1, dtype));  // recomputed, as the forward computed it
  } else {
    check_matrix(*preact, dtype, "preact");
    TORCH_CHECK(preact->size(0) == s.M && preact->size(1) == s.H1, kOp,
                ": preact must have shape [", s.M, ", ", s.H1, "], got ", preact->sizes());
    pre = preact->contiguous();
  }
  Tensor grad_hidden = gemm_nt(grad_out, w2.t(), std::nullopt);
  Tensor grad_pre = act.gated ? new_buffer(s.M, s.H1, dtype) : grad_hidden;
  Tensor hidden = new_buffer(s.M, s.H, dtype);
  // Bias gradients are summed in the accumulation type (float; double for float64).
  const ScalarType acc_dtype = dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor grad_b1_acc = at::empty({bias1.has_value() ? s.H1 : 0}, acc_dtype);
  dispatch_pass(act, dtype, [&](auto kind, auto gated, auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    backward_pass<decltype(kind)::value, decltype(gated)::value, T>(
        grad_hidden.const_data_ptr<T>(), pre.const_data_ptr<T>(), pass_bias<T>(bias1, dtype),
        grad_pre.data_ptr<T>(), hidden.data_ptr<T>(),
        bias1.has_value() ? grad_b1_acc.data_ptr<at::opmath_type<T>>() : nullptr, dropout, s);
  });

  Tensor grad_w2 = matmul(grad_out.t(), hidden, std::nullopt);
  Tensor grad_b2 = has_b2 ? at::sum(grad_out, {0}, false, acc_dtype).to(dtype)
                          : at::empty({0}, x.options());
  Tensor grad_w1 = matmul(grad_pre.t(), x, std::nullopt);
  Tensor grad_x = gemm_nt(grad_pre, w1.t(), std::nullopt);
  Tensor grad_b1 = grad_b1_acc.to(dtype);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

std::string cpu_gemm_library() {
  return prefer_onednn() && onednn_linear_op().has_value() ? "onednn" : "mkl";
}

TORCH_LIBRARY_IMPL(fastformer, CPU, m) {
  m.impl("feed_forward_fwd", &feed_forward_fwd_cpu);
  m.impl("feed_forward_bwd", &feed_forward_bwd_cpu);
}

}  // namespace fastformer
