// CPU kernels of fastformer::layer_norm_residual_fwd / _bwd (schemas in ops.cpp).
//
// Forward, per row i of the (M, N) input, with acc_t the accumulation type (float; double for
// float64 x), k_ij the dropout keep bit of philox.h at offset i*N + j and s = 1 / (1 - p):
//   h_ij  = round_to_h_dtype(x_ij * k_ij * s + residual_ij)          (computed in acc_t)
//   mean  = sum_j h_ij / N,   var = sum_j (h_ij - mean)^2 / N          (two passes: no
//   rstd  = 1 / sqrt(var + eps)                                          cancellation)
//   out   = (h - mean) * rstd * w + b
// RMSNorm is the same with mean = 0 (and no mean output). Statistics are taken from the rounded
// h, as eager PyTorch does when it materializes h = x + residual before normalizing.
// Backward, with xhat = (h - mean) * rstd and g = grad_out * w:
//   dh      = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))        (RMS: no mean_j(g))
//             + grad_h
//   grad_x  = dh * k * s,   grad_residual = dh
//   grad_w  = sum_i grad_out * xhat,   grad_b = sum_i grad_out
//
// Each row is handled by one thread: a pass over the row computes h (or the gradient sums),
// later passes re-read it from L1/L2, so x, residual, grad_out and h are read from memory once
// and every output is written once. Rows may be strided (unit column stride, any row stride);
// outputs are contiguous. grad_w / grad_b are summed per chunk of rows and then over chunks,
// so the result does not depend on thread timing.
//
// Types: x in {float32, float64, bfloat16, float16}; residual and h each in x's dtype or acc_t;
// weight and bias in any floating dtype (converted to acc_t up front).
#include "cpu_allocation.h"
#include "cpu_vec.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastformer {
namespace {

using at::ScalarType;
using at::Tensor;
using at::vec::Vectorized;

constexpr const char* kOp = "layer_norm_residual";

// Rows handed to one task: enough work to outweigh the cost of waking a thread.
constexpr int64_t kGrainElements = 32768;

int64_t grain_rows(int64_t N) {
  return std::max<int64_t>(1, kGrainElements / N);
}


// ---------------------------------------------------------------------------------------------
// Forward

template <typename x_t, typename r_t, typename h_t>
void forward_kernel(const Tensor& x, const std::optional<Tensor>& residual, const Tensor& w,
                    const Tensor& b, const Dropout& dropout, double eps, bool rms_norm,
                    const Tensor& out, const Tensor& h, const Tensor& mean, const Tensor& rstd) {
  using acc_t = at::opmath_type<x_t>;
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  const Rows<const x_t> x_rows = rows_of<const x_t>(x);
  const Rows<const r_t> r_rows = rows_of<const r_t>(residual);
  const Rows<h_t> h_rows = rows_of<h_t>(h);
  const Rows<x_t> out_rows = rows_of<x_t>(out);
  const acc_t* w_data = w.const_data_ptr<acc_t>();
  const acc_t* b_data = b.const_data_ptr<acc_t>();
  acc_t* mean_data = rms_norm ? nullptr : mean.data_ptr<acc_t>();
  acc_t* rstd_data = rstd.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(dropout.scale);

  at::parallel_for(0, M, grain_rows(N), [&](int64_t begin, int64_t end) {
    // h of the current row in acc_t, for the statistics and normalization passes.
    std::vector<acc_t> h_acc(N);
    std::vector<acc_t> keep_scale(dropout.enabled ? N : 0);
    for (int64_t i = begin; i < end; ++i) {
      const x_t* x_row = x_rows.row(i);
      const r_t* r_row = r_rows.row(i);
      h_t* h_row = h_rows.row(i);
      if (dropout.enabled) {
        dropout_row_scale(keep_scale.data(), N, dropout.seed, i * N, dropout.p, scale);
      }

      V sum(acc_t(0));
      for_each_step<L>(N, [&](int64_t j, auto n) {
        V hj = load<acc_t>(x_row + j, n);
        if (dropout.enabled) {
          hj = hj * load<acc_t>(keep_scale.data() + j, n);
        }
        if (r_row != nullptr) {
          hj = hj + load<acc_t>(r_row + j, n);
        }
        // Without h_row h is x itself, already exact in h_t.
        if (h_row != nullptr) {
          hj = store(h_row + j, hj, n);
        }
        store(h_acc.data() + j, hj, n);
        sum = sum + masked(hj, n);
      });
      const acc_t row_mean = rms_norm ? acc_t(0) : sum_lanes(sum) / N;

      V sq_sum(acc_t(0));
      for_each_step<L>(N, [&](int64_t j, auto n) {
        const V d = masked(load<acc_t>(h_acc.data() + j, n) - V(row_mean), n);
        sq_sum = at::vec::fmadd(d, d, sq_sum);
      });
      const acc_t row_var = sum_lanes(sq_sum) / N;
      const acc_t row_rstd = acc_t(1) / std::sqrt(row_var + static_cast<acc_t>(eps));

      x_t* out_row = out_rows.row(i);
      for_each_step<L>(N, [&](int64_t j, auto n) {
        const V xhat = (load<acc_t>(h_acc.data() + j, n) - V(row_mean)) * V(row_rstd);
        const V w_j = load<acc_t>(w_data + j, n);
        store(out_row + j, at::vec::fmadd(xhat, w_j, load<acc_t>(b_data + j, n)), n);
      });
      if (mean_data != nullptr) {
        mean_data[i] = row_mean;
      }
      rstd_data[i] = row_rstd;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename x_t, typename r_t, typename h_t>
void backward_kernel(const Tensor& grad_out, const std::optional<Tensor>& grad_h, const Tensor& h,
                     const Tensor& w, const std::optional<Tensor>& mean, const Tensor& rstd,
                     const Dropout& dropout, bool rms_norm, const Tensor& grad_x,
                     const Tensor& grad_residual, const Tensor& grad_weight,
                     const Tensor& grad_bias) {
  using acc_t = at::opmath_type<x_t>;
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const int64_t M = grad_out.size(0);
  const int64_t N = grad_out.size(1);
  const Rows<const x_t> go_rows = rows_of<const x_t>(grad_out);
  const Rows<const h_t> gh_rows = rows_of<const h_t>(grad_h);
  const Rows<const h_t> h_rows = rows_of<const h_t>(h);
  const Rows<x_t> gx_rows = rows_of<x_t>(grad_x);
  const Rows<r_t> gr_rows = rows_of<r_t>(grad_residual);
  const acc_t* w_data = w.const_data_ptr<acc_t>();
  const acc_t* mean_data = rms_norm ? nullptr : mean->const_data_ptr<acc_t>();
  const acc_t* rstd_data = rstd.const_data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(dropout.scale);
  const bool need_dw = grad_weight.defined();
  const bool need_db = grad_bias.defined();

  // Fixed chunks of rows, one per task, each with its own row of weight/bias partial sums.
  const int64_t num_chunks =
      std::min<int64_t>(at::get_num_threads(), (M + grain_rows(N) - 1) / grain_rows(N));
  std::vector<acc_t> dw_partial(need_dw ? num_chunks * N : 0, acc_t(0));
  std::vector<acc_t> db_partial(need_db ? num_chunks * N : 0, acc_t(0));

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> keep_scale(dropout.enabled ? N : 0);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* dw = need_dw ? dw_partial.data() + chunk * N : nullptr;
      acc_t* db = need_db ? db_partial.data() + chunk * N : nullptr;
      for (int64_t i = chunk * M / num_chunks; i < (chunk + 1) * M / num_chunks; ++i) {
        const x_t* go_row = go_rows.row(i);
        const h_t* h_row = h_rows.row(i);
        const h_t* gh_row = gh_rows.row(i);
        const acc_t row_mean = rms_norm ? acc_t(0) : mean_data[i];
        const acc_t row_rstd = rstd_data[i];
        const auto xhat_at = [&](int64_t j, auto n) {
          return (load<acc_t>(h_row + j, n) - V(row_mean)) * V(row_rstd);
        };

        V sum_g(acc_t(0));
        V sum_gx(acc_t(0));
        for_each_step<L>(N, [&](int64_t j, auto n) {
          const V g = masked(load<acc_t>(go_row + j, n) * load<acc_t>(w_data + j, n), n);
          sum_g = sum_g + g;
          sum_gx = at::vec::fmadd(g, xhat_at(j, n), sum_gx);
        });
        // dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) = a * g + c * xhat + b0
        const acc_t a = row_rstd;
        const acc_t b0 = rms_norm ? acc_t(0) : -row_rstd * sum_lanes(sum_g) / N;
        const acc_t c = -row_rstd * sum_lanes(sum_gx) / N;

        if (dropout.enabled) {
          dropout_row_scale(keep_scale.data(), N, dropout.seed, i * N, dropout.p, scale);
        }
        x_t* gx_row = gx_rows.row(i);
        r_t* gr_row = gr_rows.row(i);
        for_each_step<L>(N, [&](int64_t j, auto n) {
          const V dy = load<acc_t>(go_row + j, n);
          const V xhat = xhat_at(j, n);
          V dh = at::vec::fmadd(dy * load<acc_t>(w_data + j, n), V(a),
                                at::vec::fmadd(xhat, V(c), V(b0)));
          if (gh_row != nullptr) {
            dh = dh + load<acc_t>(gh_row + j, n);
          }
          if (gr_row != nullptr) {
            store(gr_row + j, dh, n);
          }
          store(gx_row + j, dropout.enabled ? dh * load<acc_t>(keep_scale.data() + j, n) : dh, n);
          if (dw != nullptr) {
            store(dw + j, at::vec::fmadd(dy, xhat, load<acc_t>(dw + j, n)), n);
          }
          if (db != nullptr) {
            store(db + j, dy + load<acc_t>(db + j, n), n);
          }
        });
      }
    }
  });

  // Sum the per-chunk partials, in chunk order so that the result is deterministic.
  const auto reduce_chunks = [&](const std::vector<acc_t>& partial, const Tensor& result) {
    acc_t* out = result.data_ptr<acc_t>();
    for (int64_t j = 0; j < N; ++j) {
      acc_t total = 0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        total += partial[chunk * N + j];
      }
      out[j] = total;
    }
  };
  if (need_dw) {
    reduce_chunks(dw_partial, grad_weight);
  }
  if (need_db) {
    reduce_chunks(db_partial, grad_bias);
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch and argument checks

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T = x_t or T = its accumulation type, whichever dtype names (the
// caller has checked that it is one of them).
template <typename x_t, typename F>
void dispatch_x_or_acc(ScalarType dtype, const F& f) {
  if (dtype == c10::CppTypeToScalarType<x_t>::value) {
    f(TypeTag<x_t>{});
  } else {
    f(TypeTag<at::opmath_type<x_t>>{});
  }
}

ScalarType acc_type_of(ScalarType x_dtype) {
  return x_dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

void check_x_dtype(ScalarType dtype, const char* name) {
  TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Double ||
                  dtype == ScalarType::BFloat16 || dtype == ScalarType::Half,
              kOp, ": ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

void check_x_or_acc_dtype(ScalarType dtype, ScalarType x_dtype, const char* name) {
  const ScalarType acc = acc_type_of(x_dtype);
  TORCH_CHECK(dtype == x_dtype || dtype == acc, kOp, ": ", name, " must be ", x_dtype, " or ",
              acc, " (x's dtype or its accumulation type), got ", dtype);
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got device ",
              t.device());
}

// An (M, N) operand read or written row by row.
void check_rows(const Tensor& t, int64_t M, int64_t N, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == N, kOp, ": ", name,
              " must have shape [M, N] = [", M, ", ", N, "], got ", t.sizes());
  TORCH_CHECK(N <= 1 || t.stride(1) == 1, kOp, ": ", name,
              " must have unit stride along its last dimension (rows may be strided), got strides ",
              t.strides(), "; pass ", name, ".contiguous()");
}

// weight / bias as a contiguous (N,) tensor of acc_dtype; `fill` stands in for an absent one.
Tensor row_vector(const std::optional<Tensor>& t, int64_t N, ScalarType acc_dtype, double fill,
                  const char* name) {
  if (!t.has_value() || !t->defined()) {
    return at::full({N}, fill, at::TensorOptions().dtype(acc_dtype));
  }
  check_cpu(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == N, kOp, ": ", name, " must have shape [N] = [", N,
              "], got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), kOp, ": ", name,
              " must have a floating dtype, got ", t->scalar_type());
  return t->to(acc_dtype).contiguous();
}


std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_residual_fwd_cpu(
    const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& seed, double eps,
    double dropout_p, bool rms_norm, ScalarType h_dtype, bool store_h) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (M, N), got shape ", x.sizes());
  const ScalarType x_dtype = x.scalar_type();
  check_x_dtype(x_dtype, "x");
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  TORCH_CHECK(N >= 1, kOp, ": x must have at least one column, got shape ", x.sizes());
  check_rows(x, M, N, "x");
  const ScalarType acc_dtype = acc_type_of(x_dtype);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    check_rows(*residual, M, N, "residual");
    check_x_or_acc_dtype(residual->scalar_type(), x_dtype, "residual");
  }
  check_x_or_acc_dtype(h_dtype, x_dtype, "h_dtype");
  const Dropout dropout = make_dropout(kOp, seed, dropout_p);
  TORCH_CHECK(store_h || (!has_residual && !dropout.enabled && h_dtype == x_dtype), kOp,
              ": store_h=False requires h == x: no residual, dropout_p == 0, h_dtype == x.dtype");
  const Tensor w = row_vector(weight, N, acc_dtype, 1.0, "weight");
  const Tensor b = row_vector(bias, N, acc_dtype, 0.0, "bias");

  const Tensor out = empty_cpu_huge_pages({M, N}, x_dtype);
  const Tensor h = store_h ? empty_cpu_huge_pages({M, N}, h_dtype) : at::empty({0}, h_dtype);
  const Tensor mean = at::empty({rms_norm ? 0 : M}, acc_dtype);
  const Tensor rstd = at::empty({M}, acc_dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, kOp, [&] {
    using x_t = scalar_t;
    dispatch_x_or_acc<x_t>(has_residual ? residual->scalar_type() : x_dtype, [&](auto r_tag) {
      dispatch_x_or_acc<x_t>(h_dtype, [&](auto h_tag) {
        using r_t = typename decltype(r_tag)::type;
        using h_t = typename decltype(h_tag)::type;
        forward_kernel<x_t, r_t, h_t>(x, residual, w, b, dropout, eps, rms_norm, out, h, mean,
                                      rstd);
      });
    });
  });
  return {out, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_residual_bwd_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_h, const Tensor& h,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd,
    const std::optional<Tensor>& seed, double dropout_p, bool rms_norm, bool has_bias,
    ScalarType x_dtype, std::optional<ScalarType> residual_dtype, bool store_grad_residual) {
  check_x_dtype(x_dtype, "x_dtype");
  TORCH_CHECK(grad_out.dim() == 2, kOp, ": grad_out must be 2-D (M, N), got shape ",
              grad_out.sizes());
  const int64_t M = grad_out.size(0);
  const int64_t N = grad_out.size(1);
  TORCH_CHECK(N >= 1, kOp, ": grad_out must have at least one column, got shape ",
              grad_out.sizes());
  const ScalarType acc_dtype = acc_type_of(x_dtype);
  check_rows(grad_out, M, N, "grad_out");
  TORCH_CHECK(grad_out.scalar_type() == x_dtype, kOp, ": grad_out must have dtype x_dtype = ",
              x_dtype, ", got ", grad_out.scalar_type());
  check_rows(h, M, N, "h");
  check_x_or_acc_dtype(h.scalar_type(), x_dtype, "h");
  const bool has_grad_h = grad_h.has_value() && grad_h->defined();
  if (has_grad_h) {
    check_rows(*grad_h, M, N, "grad_h");
    TORCH_CHECK(grad_h->scalar_type() == h.scalar_type(), kOp,
                ": grad_h must have h's dtype ", h.scalar_type(), ", got ",
                grad_h->scalar_type());
  }
  // mean / rstd: (M,) statistics of the forward, in acc_dtype.
  const auto stats = [&](const Tensor& t, const char* name) {
    check_cpu(t, name);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == M, kOp, ": ", name, " must have shape [M] = [", M,
                "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == acc_dtype, kOp, ": ", name, " must have dtype ", acc_dtype,
                ", got ", t.scalar_type());
    return t.contiguous();
  };
  const Tensor rstd_c = stats(rstd, "rstd");
  const std::optional<Tensor> mean_c =
      rms_norm ? std::nullopt : std::optional<Tensor>(stats(mean, "mean"));
  if (residual_dtype.has_value()) {
    check_x_or_acc_dtype(*residual_dtype, x_dtype, "residual_dtype");
  }
  TORCH_CHECK(!store_grad_residual || residual_dtype.has_value(), kOp,
              ": store_grad_residual=True requires residual_dtype");
  const Dropout dropout = make_dropout(kOp, seed, dropout_p);
  const bool has_weight = weight.has_value() && weight->defined();
  const Tensor w = row_vector(weight, N, acc_dtype, 1.0, "weight");
  const ScalarType r_dtype = residual_dtype.value_or(x_dtype);

  const Tensor grad_x = empty_cpu_huge_pages({M, N}, x_dtype);
  const Tensor grad_residual =
      store_grad_residual ? empty_cpu_huge_pages({M, N}, r_dtype) : at::empty({0}, r_dtype);
  const Tensor grad_weight = at::empty({has_weight ? N : 0}, acc_dtype);
  const Tensor grad_bias = at::empty({has_bias ? N : 0}, acc_dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, kOp, [&] {
    using x_t = scalar_t;
    dispatch_x_or_acc<x_t>(r_dtype, [&](auto r_tag) {
      dispatch_x_or_acc<x_t>(h.scalar_type(), [&](auto h_tag) {
        using r_t = typename decltype(r_tag)::type;
        using h_t = typename decltype(h_tag)::type;
        backward_kernel<x_t, r_t, h_t>(
            grad_out, grad_h, h, w, mean_c, rstd_c, dropout, rms_norm, grad_x,
            store_grad_residual ? grad_residual : Tensor(), has_weight ? grad_weight : Tensor(),
            has_bias ? grad_bias : Tensor());
      });
    });
  });
  return {grad_x, grad_residual, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastformer, CPU, m) {
  m.impl("layer_norm_residual_fwd", &layer_norm_residual_fwd_cpu);
  m.impl("layer_norm_residual_bwd", &layer_norm_residual_bwd_cpu);
}

}  // namespace fastformer
