// The CPU attention's forward kernel (attention_cpu.h gives the overview): query blocks
// against their visible keys with online softmax.
#include "attention_cpu.h"
#include "attention_cpu_math.h"

#include <ATen/Parallel.h>

namespace fastformer {
namespace attention_cpu {

namespace {

template <typename T>
void forward_block(const Problem& p, const Heads<const T>& q, const Heads<const T>& k,
                   const Heads<const T>& v, const Heads<T>& out, T* lse, T* stats, int64_t b,
                   int64_t h,
                   int64_t i0, std::vector<T>& tile, std::vector<T>& acc,
                   std::vector<T>& dropout_row, std::vector<T>& row_stats) {
  const int64_t block_m = p.tiles.m_fwd, block_n = p.tiles.n_fwd;
  const int64_t rows = std::min(block_m, p.L - i0);
  const int64_t kv_h = h / p.group;
  const int64_t key_lo = p.band.lo(i0);
  const int64_t key_hi = std::max(key_lo, p.band.hi(i0 + rows - 1));
  const int64_t row0 = (b * p.Hq + h) * p.L + i0;  // of lse, stats
  const T alibi = p.alibi_base2<T>(b, h);
  T* m_i = row_stats.data();
  T* l_i = row_stats.data() + block_m;
  std::fill(m_i, m_i + rows, -std::numeric_limits<T>::infinity());
  std::fill(l_i, l_i + rows, T(0));
  if (key_lo >= key_hi) {  // no key visible to the block: its rows come out as zeros
    std::fill(acc.begin(), acc.begin() + rows * p.DV, T(0));
  }

  for (int64_t j0 = key_lo; j0 < key_hi; j0 += block_n) {
    const int64_t n = std::min(block_n, key_hi - j0);
    // The first chunk writes acc (beta = 0) instead of rescaling and adding to zeros.
    const bool first_chunk = j0 == key_lo;
    gemm<T>(false, true, rows, n, p.D, p.tile_alpha<T>(), q.at(b, h, i0), q.sm,
            k.at(b, kv_h, j0), k.sm, T(0), tile.data(), block_n);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      T* s = tile.data() + r * block_n;
      if (p.softcap > 0.0) {
        cap_scores<T>(s, n, p.cap2<T>(), nullptr);
      }
      const char* mask_row = p.mask.kind == Mask::kNone ? nullptr : p.mask.row(b, h, i);
      score_row<T>(s, n, p.mask, mask_row, p.band, alibi, i, j0);
      // std::max keeps a NaN m_i (NaN < x is false), so a NaN row stays NaN.
      const T m_new = std::max(m_i[r], row_max(s, n));
      // A row that sees no key yet keeps m = -inf; shifting by 0 avoids -inf - -inf.
      const T m_safe = m_new == -std::numeric_limits<T>::infinity() ? T(0) : m_new;
      const T alpha = std::exp2(m_i[r] - m_safe);
      // A NaN score makes p, and so l and the whole output row, NaN (as at the reference).
      l_i[r] = l_i[r] * alpha + exp2_shifted(s, n, m_safe);
      if (!first_chunk && alpha != T(1)) {
        T* a = acc.data() + r * p.DV;
        for (int64_t d = 0; d < p.DV; ++d) {
          a[d] *= alpha;
        }
      }
      if (p.dropout.enabled) {
        dropout_row_scale<T>(dropout_row.data(), n, p.dropout.seed, (row0 + r) * p.S + j0,
                             p.dropout.p, T(1));
        for (int64_t j = 0; j < n; ++j) {
          s[j] *= dropout_row[j];
        }
      }
      // The row's max is NaN once its sum is (row_max skips NaN): the saved statistics then
      // make every p of the row NaN in the backward too, as at the reference.
      m_i[r] = std::isnan(l_i[r]) ? l_i[r] : m_new;
    }
    gemm<T>(false, false, rows, p.DV, n, T(1), tile.data(), block_n, v.at(b, kv_h, j0), v.sm,
            first_chunk ? T(0) : T(1), acc.data(), p.DV);
  }

  for (int64_t r = 0; r < rows; ++r) {
    const bool empty = l_i[r] == T(0);  // every key masked: zeros, lse -inf
    const T inv = empty ? T(0) : static_cast<T>(p.dropout.scale) / l_i[r];
    const T* a = acc.data() + r * p.DV;
    T* o = out.at(b, h, i0 + r);
    for (int64_t d = 0; d < p.DV; ++d) {
      o[d] = a[d] * inv;
    }
    const T row_max_value = empty ? -std::numeric_limits<T>::infinity() : m_i[r];
    const T log2_sum = empty ? -std::numeric_limits<T>::infinity() : std::log2(l_i[r]);
    lse[row0 + r] = (row_max_value + log2_sum) * static_cast<T>(kLn2);
    stats[(row0 + r) * 2] = row_max_value;
    stats[(row0 + r) * 2 + 1] = log2_sum;
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> cpu_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& seed, double scale,
    double softcap, double dropout_p, int64_t diagonal_offset, int64_t window_left,
    int64_t window_right) {
  const Problem p = problem_of(kFwd, q, k, v, mask, alibi_slopes, seed, scale, softcap,
                               dropout_p, diagonal_offset, window_left, window_right);
  const auto dtype = q.scalar_type();
  Tensor out = empty_in_layout_of(q, {p.B, p.Hq, p.L, p.DV}, dtype);
  Tensor lse = at::empty({p.B, p.Hq, p.L}, q.options());
  Tensor stats = at::empty({p.B, p.Hq, p.L, 2}, q.options());
  const int64_t block_m = p.tiles.m_fwd;
  const int64_t blocks = (p.L + block_m - 1) / block_m;
  const Tensor q_blas = blas_matrices(q), k_blas = blas_matrices(k), v_blas = blas_matrices(v);
  AT_DISPATCH_FLOATING_TYPES(dtype, kFwd, [&] {
    using T = scalar_t;
    const auto qh = Heads<const T>::of(q_blas);
    const auto kh = Heads<const T>::of(k_blas);
    const auto vh = Heads<const T>::of(v_blas);
    const auto outh = Heads<T>::of(out);
    T* lse_data = lse.data_ptr<T>();
    T* stats_data = stats.data_ptr<T>();
    at::parallel_for(0, p.B * p.Hq * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> tile(block_m * p.tiles.n_fwd), acc(block_m * p.DV),
          dropout_row(p.tiles.n_fwd), row_stats(2 * block_m);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks;
        forward_block<T>(p, qh, kh, vh, outh, lse_data, stats_data, bh / p.Hq, bh % p.Hq,
                         (task % blocks) * block_m, tile, acc, dropout_row, row_stats);
      }
    });
  });
  return {out, lse, stats};
}

}  // namespace attention_cpu
}  // namespace fastformer
