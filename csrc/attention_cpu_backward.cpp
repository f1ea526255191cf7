// The CPU attention's backward kernel (attention_cpu.h gives the overview): key blocks
// of a kv head against the query blocks that see them, dQ, dK and dV without atomics.
#include "attention_cpu.h"
#include "attention_cpu_math.h"

#include <ATen/Parallel.h>

namespace fastformer {
namespace attention_cpu {

namespace {

// Per-thread tiles of the backward: probabilities and dP / dS, with dropout the dropped
// probabilities and the dropout multipliers, with softcap the tanh of the capped scores
// (each empty without its feature).
template <typename T>
struct BackwardTiles {
  std::vector<T> p, p_dropped, ds, dropout_row, tanh;
  std::vector<int64_t> vis_lo, vis_hi;
  BackwardTiles(const TileShape& s, bool dropout, bool softcap)
      : p(s.m_bwd * s.n_bwd), p_dropped(dropout ? s.m_bwd * s.n_bwd : 0), ds(s.m_bwd * s.n_bwd),
        dropout_row(dropout ? s.m_bwd * s.n_bwd : 0), tanh(softcap ? s.m_bwd * s.n_bwd : 0),
        vis_lo(s.m_bwd), vis_hi(s.m_bwd) {}
};

// dK, dV of keys [j0, j0 + n) of kv head kv_h, and their share of dQ, from query block
// [i0, i0 + rows) of query head h; delta holds delta_i of those rows.
template <typename T>
void backward_tile(const Problem& p, const Heads<const T>& q, const Heads<const T>& k,
                   const Heads<const T>& v, const Heads<const T>& grad_out, const T* stats,
                   const T* delta, const Heads<T>& grad_q, const Heads<T>& grad_k,
                   const Heads<T>& grad_v, int64_t b, int64_t h,
                   int64_t i0, int64_t rows, int64_t j0, int64_t n, BackwardTiles<T>& t) {
  const int64_t ld = p.tiles.n_bwd;
  const int64_t kv_h = h / p.group;
  const T scale = static_cast<T>(p.scale);
  const int64_t row0 = (b * p.Hq + h) * p.L + i0;  // of stats
  const T alibi = p.alibi_base2<T>(b, h);
  const T* dout = grad_out.at(b, h, i0);
  gemm<T>(false, true, rows, n, p.D, p.tile_alpha<T>(), q.at(b, h, i0), q.sm, k.at(b, kv_h, j0),
          k.sm, T(0), t.p.data(), ld);
  int64_t* vis_lo = t.vis_lo.data();
  int64_t* vis_hi = t.vis_hi.data();
  for (int64_t r = 0; r < rows; ++r) {
    T* s = t.p.data() + r * ld;
    if (p.softcap > 0.0) {
      cap_scores<T>(s, n, p.cap2<T>(), t.tanh.data() + r * ld);
    }
    const char* mask_row = p.mask.kind == Mask::kNone ? nullptr : p.mask.row(b, h, i0 + r);
    std::tie(vis_lo[r], vis_hi[r]) = score_row<T>(s, n, p.mask, mask_row, p.band, alibi, i0 + r,
                                                 j0);
    T row_max_value = stats[(row0 + r) * 2];
    T log2_sum = stats[(row0 + r) * 2 + 1];
    if (row_max_value == -std::numeric_limits<T>::infinity()) {  // fully masked: p = 0
      row_max_value = std::numeric_limits<T>::infinity();
      log2_sum = T(0);
    }
    // exp2((s - max) - log2_sum): the max first, so huge scores keep their precision.
    exp2_shifted(s, n, row_max_value, log2_sum);
    if (p.dropout.enabled) {
      T* z = t.dropout_row.data() + r * ld;
      dropout_row_scale<T>(z, n, p.dropout.seed, (row0 + r) * p.S + j0, p.dropout.p,
                           static_cast<T>(p.dropout.scale));
      T* pd = t.p_dropped.data() + r * ld;
      for (int64_t j = 0; j < n; ++j) {
        pd[j] = s[j] * z[j];
      }
    }
  }
  const T* p_for_v = p.dropout.enabled ? t.p_dropped.data() : t.p.data();
  // dV_j += sum_i z_ij p_ij dO_i
  gemm<T>(true, false, n, p.DV, rows, T(1), p_for_v, ld, dout, grad_out.sm, T(1),
          grad_v.at(b, kv_h, j0), grad_v.sm);
  // dP_ij = dO_i . v_j
  gemm<T>(false, true, rows, n, p.DV, T(1), dout, grad_out.sm, v.at(b, kv_h, j0), v.sm, T(0),
          t.ds.data(), ld);
  for (int64_t r = 0; r < rows; ++r) {
    const T* pr = t.p.data() + r * ld;
    T* ds = t.ds.data() + r * ld;
    const T delta_i = delta[r];
    if (p.dropout.enabled) {
      const T* z = t.dropout_row.data() + r * ld;
      for (int64_t j = 0; j < n; ++j) {
        ds[j] = pr[j] * (ds[j] * z[j] - delta_i);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        ds[j] = pr[j] * (ds[j] - delta_i);
      }
    }
    if (p.softcap > 0.0) {  // through the cap: d (softcap tanh(u / softcap)) / du = 1 - tanh^2
      const T* th = t.tanh.data() + r * ld;
      for (int64_t j = 0; j < n; ++j) {
        ds[j] *= T(1) - th[j] * th[j];
      }
    }
    // Hidden scores get no gradient, even where dP is NaN (a NaN value the row cannot see).
    std::fill(ds, ds + vis_lo[r], T(0));
    std::fill(ds + vis_hi[r], ds + n, T(0));
    if (p.mask.kind == Mask::kBool) {
      const char* m = p.mask.row(b, h, i0 + r) + j0 * p.mask.sn * p.mask.item;
      for (int64_t j = 0; j < n; ++j) {
        ds[j] = bool_hidden(m, p.mask.sn, j) ? T(0) : ds[j];
      }
    }
  }
  // dQ_i += scale * sum_j dS_ij k_j,  dK_j += scale * sum_i dS_ij q_i
  gemm<T>(false, false, rows, p.D, n, scale, t.ds.data(), ld, k.at(b, kv_h, j0), k.sm, T(1),
          grad_q.at(b, h, i0), grad_q.sm);
  gemm<T>(true, false, n, p.D, rows, scale, t.ds.data(), ld, q.at(b, h, i0), q.sm, T(1),
          grad_k.at(b, kv_h, j0), grad_k.sm);
}

// delta_i = dO_i . out_i - dlse_i for every row i of head h, the dot product in double (it
// cancels in dS_ij = p_ij (dP_ij - delta_i), so it needs more than the inputs' precision).
template <typename T>
void rows_delta(const Heads<const T>& grad_out, const Heads<const T>& out, const T* grad_lse,
                const Problem& p, int64_t b, int64_t h, T* delta) {
  for (int64_t i = 0; i < p.L; ++i) {
    const T* d_o = grad_out.at(b, h, i);
    const T* o = out.at(b, h, i);
    double dot = 0.0;
    for (int64_t d = 0; d < p.DV; ++d) {
      dot += static_cast<double>(d_o[d]) * static_cast<double>(o[d]);
    }
    const T grad_lse_i = grad_lse == nullptr ? T(0) : grad_lse[(b * p.Hq + h) * p.L + i];
    delta[i] = static_cast<T>(dot) - grad_lse_i;
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> cpu_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& stats, const std::optional<Tensor>& grad_lse, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& seed, double scale,
    double softcap, double dropout_p, int64_t diagonal_offset, int64_t window_left,
    int64_t window_right) {
  const Problem p = problem_of(kBwd, q, k, v, mask, alibi_slopes, seed, scale, softcap,
                               dropout_p, diagonal_offset, window_left, window_right);
  const auto dtype = q.scalar_type();
  const std::vector<int64_t> out_shape{p.B, p.Hq, p.L, p.DV};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) &&
                  out.sizes() == at::IntArrayRef(out_shape),
              kBwd, ": grad_out and out must be (B, Hq, L, Dv) = (", p.B, ", ", p.Hq, ", ", p.L,
              ", ", p.DV, "), got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == dtype && out.scalar_type() == dtype &&
                  stats.scalar_type() == dtype,
              kBwd, ": grad_out, out and stats must have q's dtype ", dtype);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({p.B, p.Hq, p.L, 2}), kBwd,
              ": stats must be (B, Hq, L, 2), got ", stats.sizes());
  const Tensor stats_c = stats.contiguous();
  const Tensor q_blas = blas_matrices(q), k_blas = blas_matrices(k), v_blas = blas_matrices(v);
  const Tensor grad_out_blas = blas_matrices(grad_out), out_blas = blas_matrices(out);
  // The lse's gradient enters every p_ij of its row through delta (see rows_delta).
  const bool has_grad_lse = grad_lse.has_value() && grad_lse->defined();
  TORCH_CHECK(!has_grad_lse || grad_lse->sizes() == at::IntArrayRef({p.B, p.Hq, p.L}), kBwd,
              ": grad_lse must be (B, Hq, L), got ", grad_lse->sizes());
  const Tensor grad_lse_c = has_grad_lse ? grad_lse->to(dtype).contiguous() : Tensor();
  // Zeroed by the tasks that accumulate into them (in parallel, and warm in their caches).
  Tensor grad_q = empty_in_layout_of(q, {p.B, p.Hq, p.L, p.D}, dtype);
  Tensor grad_k = empty_in_layout_of(k, {p.B, p.Hkv, p.S, p.D}, dtype);
  Tensor grad_v = empty_in_layout_of(v, {p.B, p.Hkv, p.S, p.DV}, dtype);

  // Tasks: (batch, kv head, part of its key blocks). Parts > 1 only when there are fewer
  // (batch, kv head) pairs than threads; part > 0 writes dQ into its own buffer.
  const int64_t block_m = p.tiles.m_bwd, block_n = p.tiles.n_bwd;
  const int64_t key_blocks = (p.S + block_n - 1) / block_n;
  const int64_t pairs = p.B * p.Hkv;
  const int64_t threads = at::get_num_threads();
  const int64_t parts_wanted = pairs >= threads ? 1 : (threads + pairs - 1) / pairs;
  const int64_t parts = std::max<int64_t>(1, std::min(key_blocks, parts_wanted));
  Tensor grad_q_parts = parts > 1 ? at::empty({parts - 1, p.B, p.Hq, p.L, p.D}, q.options())
                                  : Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, kBwd, [&] {
    using T = scalar_t;
    const auto qh = Heads<const T>::of(q_blas);
    const auto kh = Heads<const T>::of(k_blas);
    const auto vh = Heads<const T>::of(v_blas);
    const auto doh = Heads<const T>::of(grad_out_blas);
    const auto outh = Heads<const T>::of(out_blas);
    // dQ of part 0 goes to grad_q, of part i > 0 to grad_q_parts[i - 1].
    std::vector<Heads<T>> dq_parts{Heads<T>::of(grad_q)};
    for (int64_t part = 1; part < parts; ++part) {
      dq_parts.push_back(Heads<T>::of(grad_q_parts[part - 1]));
    }
    const auto dkh = Heads<T>::of(grad_k);
    const auto dvh = Heads<T>::of(grad_v);
    const T* stats_data = stats_c.data_ptr<T>();
    const T* grad_lse_data = has_grad_lse ? grad_lse_c.data_ptr<T>() : nullptr;
    at::parallel_for(0, pairs * parts, 1, [&](int64_t begin, int64_t end) {
      BackwardTiles<T> tiles(p.tiles, p.dropout.enabled, p.softcap > 0.0);
      std::vector<T> delta(p.group * p.L);  // delta of the group's query heads
      for (int64_t task = begin; task < end; ++task) {
        const int64_t pair = task / parts, part = task % parts;
        const int64_t b = pair / p.Hkv, kv_h = pair % p.Hkv;
        for (int64_t g = 0; g < p.group; ++g) {
          const int64_t h = kv_h * p.group + g;
          rows_delta<T>(doh, outh, grad_lse_data, p, b, h, delta.data() + g * p.L);
        }
        const int64_t first_block = part * key_blocks / parts;
        const int64_t end_block = (part + 1) * key_blocks / parts;
        // This task's share of the outputs: its part's dQ rows of the group's query heads,
        // and dK, dV of its key blocks.
        for (int64_t h = kv_h * p.group; h < (kv_h + 1) * p.group; ++h) {
          zero_rows(dq_parts[part], b, h, 0, p.L, p.D);
        }
        const int64_t key_begin = first_block * block_n;
        const int64_t key_end = std::min(p.S, end_block * block_n);
        zero_rows(dkh, b, kv_h, key_begin, key_end, p.D);
        zero_rows(dvh, b, kv_h, key_begin, key_end, p.DV);
        for (int64_t kb = first_block; kb < end_block; ++kb) {
          const int64_t j0 = kb * block_n, n = std::min(block_n, p.S - j0);
          const int64_t row_begin = p.band.first_row(j0), row_end = p.band.end_row(j0 + n);
          for (int64_t h = kv_h * p.group; h < (kv_h + 1) * p.group; ++h) {
            for (int64_t i0 = row_begin; i0 < row_end; i0 += block_m) {
              const T* delta_rows = delta.data() + (h - kv_h * p.group) * p.L + i0;
              backward_tile<T>(p, qh, kh, vh, doh, stats_data, delta_rows, dq_parts[part],
                               dkh, dvh, b, h, i0, std::min(block_m, row_end - i0), j0, n,
                               tiles);
            }
          }
        }
      }
    });
  });
  if (parts > 1) {
    grad_q.add_(grad_q_parts.sum(0));
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace attention_cpu
}  // namespace fastformer
