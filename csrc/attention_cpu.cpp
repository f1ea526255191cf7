// The CPU attention's problem (checks, tile shapes, output layout) and the registration of
// its two kernels; attention_cpu.h gives the overview.
#include "attention_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

namespace fastformer {
namespace attention_cpu {

// An empty (B, H, rows, cols) tensor laid out in memory as `like` is: its first three dims
// ordered by like's strides (largest first, ties in dim order), cols innermost. Outputs so
// laid out let a caller's view of (B, L, H, D) projections (q = x.unflatten(-1, (H, D))
// .transpose(1, 2)) go back to (B, L, H * D) without a copy. The fake kernels
// (fastformer/ops/attention.py, _cpp_layout_like) follow the same rule.
Tensor empty_in_layout_of(const Tensor& like, std::array<int64_t, 4> sizes, at::ScalarType dtype) {
  std::array<int64_t, 3> order{0, 1, 2};
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return like.stride(a) > like.stride(b); });
  Tensor physical = empty_cpu_huge_pages(
      {sizes[order[0]], sizes[order[1]], sizes[order[2]], sizes[3]}, dtype);
  std::array<int64_t, 4> logical{0, 0, 0, 3};  // the physical dim of each logical dim
  for (int64_t i = 0; i < 3; ++i) {
    logical[order[i]] = i;
  }
  return physical.permute(logical);
}

// Swept on 2 Intel Xeon cores with AVX-512, fp32, head dims 64 and 128, L = S from 128 to
// 2048, causal and not: forward tiles of 512 keys and, under a band (causal, windows), 64
// query rows up to L = 256 (finer blocks skip more of the band), 128 below L = 1024, 256
// from there; without a band 256 rows at every length (each query block repacks its keys
// for the BLAS product, so more rows amortize that: 5-10% faster than 64 or 128 rows at
// L = 256 to 512, B x H = 8 to 16); 256 x 128 backward
// tiles (fewer, larger products; a thread's tiles, 256 KiB, 512 KiB with dropout, stay in
// L2 across the five products of a tile). Tiles never exceed the problem
// (a decoding step, L = 1, allocates one row, not 256), and a forward has a query block
// for every thread where the (batch, head) pairs, `heads`, are few.
TileShape tile_shape(int64_t L, int64_t S, bool banded, int64_t heads) {
  const auto fit = [](int64_t tile, int64_t size) { return std::clamp<int64_t>(size, 1, tile); };
  int64_t m_fwd = !banded ? 256 : (L <= 256 ? 64 : (L < 1024 ? 128 : 256));
  while (m_fwd > 32 && heads * ((L + m_fwd - 1) / m_fwd) < at::get_num_threads()) {
    m_fwd /= 2;
  }
  return {fit(m_fwd, L), fit(512, S), fit(256, L), fit(128, S)};
}

namespace {

// The slopes (B, Hq), any strides (0 where broadcast) and floating dtype, as Problem::alibi.
std::vector<double> alibi_slopes_of(const char* op, const std::optional<Tensor>& slopes,
                                    int64_t B, int64_t Hq) {
  if (!slopes.has_value() || !slopes->defined()) {
    return {};
  }
  TORCH_CHECK(slopes->dim() == 2 && slopes->size(0) == B && slopes->size(1) == Hq &&
                  slopes->is_floating_point() && slopes->device().is_cpu(),
              op, ": alibi_slopes must be a floating-point CPU tensor broadcast to (B, Hq) = (",
              B, ", ", Hq, "), got ", slopes->scalar_type(), " ", slopes->sizes());
  const Tensor values = slopes->to(at::kDouble).contiguous();
  const double* data = values.data_ptr<double>();
  return std::vector<double>(data, data + B * Hq);
}

}  // namespace

Problem problem_of(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                   const std::optional<Tensor>& mask,
                   const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& seed,
                   double scale, double softcap, double dropout_p, int64_t diagonal_offset,
                   int64_t window_left, int64_t window_right) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k and v must be 4-D (B, H, L, E), got ", q.sizes(), ", ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": q, k and v must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              op, ": q, k and v must all be float32 or all float64, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && Hkv > 0 && Hq % Hkv == 0,
              op, ": k and v must be (B, Hkv, S, *) with Hkv dividing q's heads, got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op,
              ": softcap must be finite and >= 0 (0: no capping), got ", softcap);
  TORCH_CHECK(k.size(2) == v.size(2) && k.size(3) == q.size(3), op,
              ": k must have q's head dim and v k's length, got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  const int64_t L = q.size(2), S = k.size(2);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == B && mask->size(1) == Hq &&
                    mask->size(2) == L && mask->size(3) == S,
                op, ": mask must be broadcast to (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ",
                S, "), got ", mask->sizes());
  }
  // A window side of L + S or more hides no key: open (-1). An offset beyond 2 (L + S) either
  // way sees the same keys as one of 2 (L + S). So Band's sums stay far from int64's limits
  // whatever a caller passes.
  const int64_t reach = L + S;
  window_left = window_left >= reach ? -1 : window_left;
  window_right = window_right >= reach ? -1 : window_right;
  diagonal_offset = std::clamp<int64_t>(diagonal_offset, -2 * reach, 2 * reach);
  const bool banded = window_left >= 0 || window_right >= 0;  // a side < 0 is open
  const TileShape tiles = tile_shape(L, S, banded, B * Hq);
  Problem p{B, Hq, Hkv, Hq / Hkv, L, S, q.size(3), v.size(3), tiles, scale,
            Band{diagonal_offset, window_left, window_right, L, S}, Mask::of(mask),
            make_dropout(op, seed, dropout_p), alibi_slopes_of(op, alibi_slopes, B, Hq), softcap};
  return p;
}

// t itself when BLAS can read each (batch, head) matrix of t through its strides: a unit
// last stride and rows at least a row apart (not broadcast rows of stride 0, which BLAS's
// leading dimension cannot express); else a contiguous copy.
Tensor blas_matrices(const Tensor& t) {
  const bool unit_columns = t.size(3) <= 1 || t.stride(3) == 1;
  const bool rows_apart = t.size(2) <= 1 || t.stride(2) >= t.size(3);
  return unit_columns && rows_apart ? t : t.contiguous();
}

}  // namespace attention_cpu

TORCH_LIBRARY_IMPL(fastformer, CPU, m) {
  m.impl(attention_cpu::kFwd, &attention_cpu::cpu_attention_fwd);
  m.impl(attention_cpu::kBwd, &attention_cpu::cpu_attention_bwd);
}

}  // namespace fastformer
