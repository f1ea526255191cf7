// Autograd of the C++ ops: the kernels of the Autograd dispatch key, for every device.
//
// Why in C++: a formula registered from Python (torch.library.register_autograd) runs
// Python at every call, even without gradients (its wrapper decides, then redispatches):
// about 140 us a call of layer_norm_residual_fwd on the 2-core CPU measured, more than
// the kernel itself at 1024 x 256, and as much again in backward. Here the forward
// records a node only when some input requires grad under grad mode, and the backward
// calls the backward op through the dispatcher (its CPU kernel, or the CUDA kernel
// registered from Python).
//
// Each formula saves what its backward op needs (see the schemas in ops.cpp) and marks the
// saved statistics non-differentiable; gradients of unused outputs are not materialized
// (a zero-filled (M, hidden) buffer would cost a pass over memory), so the backward
// makes the ones it needs. The backward ops themselves take no gradients: their Autograd
// kernel (no_double_backward) makes create_graph=True fail loudly at the second backward
// instead of returning gradients that silently miss the op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastformer {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of an op (each caller keeps it in a static: one lookup).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor or_undefined(const std::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

std::optional<Tensor> defined_or_none(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// A (..., features) gradient as 2-D rows with unit column stride, copied only when no such
// view exists (a gradient may arrive expanded, with stride 0).
Tensor as_rows(const Tensor& t, int64_t features) {
  Tensor rows = t.reshape({-1, features});
  return rows.stride(-1) == 1 ? rows : at::empty(rows.sizes(), rows.options()).copy_(rows);
}

// ------------------------------------------------------------------------------------------
// layer_norm_residual
// ------------------------------------------------------------------------------------------

using LayerNormResidualFwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, double, double, bool,
    at::ScalarType, bool);
using LayerNormResidualBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const Tensor&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, const std::optional<Tensor>&, double, bool, bool,
    at::ScalarType, std::optional<at::ScalarType>, bool);

// Whether t's gradient is stored as a leaf's .grad as it is: t is a leaf, or a view of one
// (a view's backward passes views of the same gradient). Anything else hands its gradient to
// a backward formula, which makes tensors of its own.
bool reaches_leaf(const Tensor& t) {
  return t.is_leaf() || (t.is_view() && t._base().is_leaf());
}

struct LayerNormResidual : torch::autograd::Function<LayerNormResidual> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& residual,
                               const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias,
                               const std::optional<Tensor>& seed, double eps, double dropout_p,
                               bool rms_norm, at::ScalarType h_dtype, bool store_h) {
    static const auto op = op_handle<LayerNormResidualFwd>("fastformer::layer_norm_residual_fwd");
    auto [out, h, mean, rstd] = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return op.call(x, residual, weight, bias, seed, eps, dropout_p, rms_norm, h_dtype,
                     store_h);
    }();
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    // The normalized input is h, or x itself when h was not written (h equals x).
    ctx->save_for_backward(
        {store_h ? h : x, or_undefined(weight), mean, rstd, or_undefined(seed)});
    auto& saved = ctx->saved_data;
    saved["store_h"] = store_h;
    saved["dropout_p"] = dropout_p;
    saved["rms_norm"] = rms_norm;
    saved["x_dtype"] = x.scalar_type();
    if (residual.has_value()) {
      saved["residual_dtype"] = residual->scalar_type();
    }
    if (bias.has_value()) {
      saved["bias_dtype"] = bias->scalar_type();
    }
    // grad_residual equals grad_x unless dropout or a dtype difference separates them. The
    // one tensor is handed to both inputs then, unless a leaf would keep it as its .grad
    // (see reaches_leaf): two leaves sharing one .grad would each accumulate the other's.
    saved["store_grad_residual"] =
        residual.has_value() &&
        (dropout_p > 0.0 || residual->scalar_type() != x.scalar_type() ||
         (x.requires_grad() && residual->requires_grad() &&
          (reaches_leaf(x) || reaches_leaf(*residual))));
    return {out, h, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<LayerNormResidualBwd>("fastformer::layer_norm_residual_bwd");
    const variable_list saved_tensors = ctx->get_saved_variables();
    const Tensor &normalized = saved_tensors[0], &weight = saved_tensors[1];
    const auto& saved = ctx->saved_data;
    const auto x_dtype = saved.at("x_dtype").toScalarType();
    const bool has_residual = saved.count("residual_dtype") > 0;
    const bool has_bias = saved.count("bias_dtype") > 0;
    const bool store_grad_residual = saved.at("store_grad_residual").toBool();
    const int64_t features = normalized.size(-1);
    // Without grad_out only h was used (gradients are not materialized).
    const Tensor grad_out = grads[0].defined()
                                ? as_rows(grads[0], features)
                                : at::zeros(normalized.sizes(), normalized.options().dtype(x_dtype));
    // Without h, the gradient of h reaches x directly.
    std::optional<Tensor> grad_h;
    if (saved.at("store_h").toBool() && grads[1].defined()) {
      grad_h = as_rows(grads[1], features);
    }
    const std::optional<at::ScalarType> residual_dtype =
        has_residual ? std::optional(saved.at("residual_dtype").toScalarType()) : std::nullopt;
    auto [grad_x, grad_residual, grad_weight, grad_bias] =
        op.call(grad_out, grad_h, normalized, defined_or_none(weight), saved_tensors[2],
                saved_tensors[3], defined_or_none(saved_tensors[4]),
                saved.at("dropout_p").toDouble(), saved.at("rms_norm").toBool(), has_bias,
                x_dtype, residual_dtype, store_grad_residual);
    if (!has_residual) {
      grad_residual = Tensor();
    } else if (!store_grad_residual) {
      grad_residual = grad_x;
    }
    grad_weight = weight.defined() ? grad_weight.to(weight.scalar_type()) : Tensor();
    grad_bias = has_bias ? grad_bias.to(saved.at("bias_dtype").toScalarType()) : Tensor();
    return {grad_x,   grad_residual, grad_weight, grad_bias, Tensor(),
            Tensor(), Tensor(),      Tensor(),    Tensor(),  Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_residual_fwd(
    const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& seed, double eps,
    double dropout_p, bool rms_norm, at::ScalarType h_dtype, bool store_h) {
  const variable_list outputs = LayerNormResidual::apply(x, residual, weight, bias, seed, eps,
                                                         dropout_p, rms_norm, h_dtype, store_h);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

// ------------------------------------------------------------------------------------------
// feed_forward
// ------------------------------------------------------------------------------------------

using FeedForwardFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                  const std::optional<Tensor>&, const Tensor&,
                                                  const std::optional<Tensor>&, c10::string_view,
                                                  double, const std::optional<Tensor>&, bool);
using FeedForwardBwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
    const std::optional<Tensor>&, c10::string_view, double, const std::optional<Tensor>&, bool);

struct FeedForward : torch::autograd::Function<FeedForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1,
                               const std::optional<Tensor>& b1, const Tensor& w2,
                               const std::optional<Tensor>& b2, c10::string_view activation,
                               double dropout_p, const std::optional<Tensor>& seed,
                               bool save_preact) {
    static const auto op = op_handle<FeedForwardFwd>("fastformer::feed_forward_fwd");
    auto [out, preact] = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return op.call(x, w1, b1, w2, b2, activation, dropout_p, seed, save_preact);
    }();
    // preact is saved for backward, never a result to differentiate.
    ctx->mark_non_differentiable({preact});
    ctx->set_materialize_grads(false);
    // Backward needs x and the pre-activation (or recomputes it from x, w1, b1): never the
    // hidden activation or a dropout mask.
    ctx->save_for_backward({x, w1, or_undefined(b1), w2, save_preact ? preact : Tensor(),
                            or_undefined(seed)});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["has_b2"] = b2.has_value();
    return {out, preact};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<FeedForwardBwd>("fastformer::feed_forward_bwd");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &x = s[0], &w1 = s[1], &b1 = s[2], &w2 = s[3];
    const bool has_b2 = ctx->saved_data.at("has_b2").toBool();
    const Tensor grad_out = grads[0].defined() ? grads[0].contiguous()
                                               : at::zeros({x.size(0), w2.size(0)}, x.options());
    const std::string activation = ctx->saved_data.at("activation").toStringRef();
    auto [grad_x, grad_w1, grad_b1, grad_w2, grad_b2] =
        op.call(grad_out, x, w1, defined_or_none(b1), w2, defined_or_none(s[4]), activation,
                ctx->saved_data.at("dropout_p").toDouble(), defined_or_none(s[5]), has_b2);
    return {grad_x,   grad_w1,  b1.defined() ? grad_b1 : Tensor(),
            grad_w2,  has_b2 ? grad_b2 : Tensor(),
            Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor> feed_forward_fwd(const Tensor& x, const Tensor& w1,
                                            const std::optional<Tensor>& b1, const Tensor& w2,
                                            const std::optional<Tensor>& b2,
                                            c10::string_view activation, double dropout_p,
                                            const std::optional<Tensor>& seed, bool save_preact) {
  const variable_list outputs =
      FeedForward::apply(x, w1, b1, w2, b2, activation, dropout_p, seed, save_preact);
  return {outputs[0], outputs[1]};
}

// ------------------------------------------------------------------------------------------
// cpu_attention
// ------------------------------------------------------------------------------------------

using CpuAttentionFwd = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, double, double, double, int64_t,
    int64_t, int64_t);
using CpuAttentionBwd = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, double, double, double, int64_t, int64_t, int64_t);

struct CpuAttention : torch::autograd::Function<CpuAttention> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const Tensor& v, const std::optional<Tensor>& mask,
                               const std::optional<Tensor>& alibi_slopes,
                               const std::optional<Tensor>& seed, double scale, double softcap,
                               double dropout_p, int64_t diagonal_offset, int64_t window_left,
                               int64_t window_right) {
    static const auto op = op_handle<CpuAttentionFwd>("fastformer::cpu_attention_fwd");
    auto [out, lse, stats] = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return op.call(q, k, v, mask, alibi_slopes, seed, scale, softcap, dropout_p,
                     diagonal_offset, window_left, window_right);
    }();
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);  // lse is often unused
    ctx->save_for_backward({q, k, v, out, stats, or_undefined(mask), or_undefined(alibi_slopes),
                            or_undefined(seed)});
    auto& saved = ctx->saved_data;
    saved["scale"] = scale;
    saved["softcap"] = softcap;
    saved["dropout_p"] = dropout_p;
    saved["diagonal_offset"] = diagonal_offset;
    saved["window_left"] = window_left;
    saved["window_right"] = window_right;
    return {out, lse, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<CpuAttentionBwd>("fastformer::cpu_attention_bwd");
    const variable_list s = ctx->get_saved_variables();
    const Tensor& out = s[3];
    const auto& saved = ctx->saved_data;
    Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);  // only lse used
    if (grad_out.stride(-1) != 1) {
      grad_out = grad_out.contiguous();
    }
    auto [grad_q, grad_k, grad_v] =
        op.call(grad_out, s[0], s[1], s[2], out, s[4], defined_or_none(grads[1]),
                defined_or_none(s[5]), defined_or_none(s[6]), defined_or_none(s[7]),
                saved.at("scale").toDouble(), saved.at("softcap").toDouble(),
                saved.at("dropout_p").toDouble(), saved.at("diagonal_offset").toInt(),
                saved.at("window_left").toInt(), saved.at("window_right").toInt());
    variable_list result(12);
    result[0] = grad_q;
    result[1] = grad_k;
    result[2] = grad_v;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> cpu_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& seed, double scale,
    double softcap, double dropout_p, int64_t diagonal_offset, int64_t window_left,
    int64_t window_right) {
  const variable_list outputs =
      CpuAttention::apply(q, k, v, mask, alibi_slopes, seed, scale, softcap, dropout_p,
                          diagonal_offset, window_left, window_right);
  return {outputs[0], outputs[1], outputs[2]};
}

// ------------------------------------------------------------------------------------------
// The backward ops: no gradients of gradients
// ------------------------------------------------------------------------------------------

// Runs the op below autograd; when some tensor argument requires grad under grad mode
// (a backward with create_graph=True), its outputs get an Error node, which raises if a
// second backward reaches it.
void no_double_backward(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  std::vector<Tensor> inputs;
  for (const c10::IValue& argument : torch::jit::last(*stack, schema.arguments().size())) {
    if (argument.isTensor()) {
      inputs.push_back(argument.toTensor());
    }
  }
  const bool records = torch::autograd::compute_requires_grad(inputs);
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (!records) {
    return;
  }
  auto node = c10::make_intrusive<torch::autograd::Error>(
      schema.name() +
          ": double backward (gradients of gradients, create_graph=True) is not supported",
      torch::autograd::collect_next_edges(inputs));
  for (const c10::IValue& output : torch::jit::last(*stack, schema.returns().size())) {
    const Tensor& t = output.toTensor();
    if (t.defined() && torch::autograd::isDifferentiableType(t.scalar_type())) {
      torch::autograd::set_history(t, node);
    }
  }
}

TORCH_LIBRARY_IMPL(fastformer, Autograd, m) {
  m.impl("layer_norm_residual_fwd", &layer_norm_residual_fwd);
  m.impl("feed_forward_fwd", &feed_forward_fwd);
  m.impl("cpu_attention_fwd", &cpu_attention_fwd);
  for (const char* name : {"layer_norm_residual_bwd", "feed_forward_bwd", "cpu_attention_bwd"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_double_backward>());
  }
}

}  // namespace
}  // namespace fastformer
