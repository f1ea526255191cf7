// Flash attention on CPU: the kernels of fastformer::cpu_attention_fwd / _bwd, which run the
// attention ops (fastformer/ops/attention.py) on float32 and float64 CPU tensors.
//
// The maths, masks, band, dropout draws and saved statistics are those of the Triton kernels
// (kernels/attention.py states them), so both backends give the same results, dropout
// masks included. For query i of head h and key j, in base 2:
//   s_ij = log2(e) * (cap(scale * q_i . k_j) + mask_ij - slope_bh * |j - (i + offset)|),
//          -inf where hidden (bool mask, band); the ALiBi term only with alibi_slopes;
//          cap(u) = softcap * tanh(u / softcap) with softcap > 0, else u
//   m_i = max_j s_ij,  l_i = sum_j exp2(s_ij - m_i),  out_i = sum_j exp2(s_ij - m_i) z_ij v_j / l_i
// with z_ij the dropout multiplier (keep / (1 - p)), drawn from Philox at offset
// ((b * Hq + h) * L + i) * S + j (philox.h). stats keeps (m_i, log2 l_i) per row.
//
// Tiles (TileShape): the forward takes a block of query rows of one head at a time, against
// the keys that one of them can see in chunks, with online softmax; the backward takes a
// block of keys of one kv head, accumulating its dK and dV over the query blocks (of every
// query head of its group) that see it, and dQ in place. Scores and probabilities
// live in per-thread tiles, never in an (L, S) matrix; tile products go through BLAS
// (cpu_blas.h). The band (causal, sliding windows) limits the keys of each query block and
// the queries of each key block, so causal attention does about half the work.
//
// Work split: the forward over (batch, head, query block); the backward over (batch, kv
// head), each task owning its rows of dK, dV and dQ (no atomics, deterministic). When there
// are fewer (batch, kv head) pairs than threads, each pair's keys are split into parts whose
// dQ go to separate buffers, summed at the end in a fixed order.
//
// Limits: float32 and float64 (the op layer computes float16/bfloat16 in float32); any head
// dims, Dv may differ from D; any strides (tensors BLAS cannot read in place, broadcast rows
// or a non-unit last stride, are copied: blas_matrices); int64 offsets throughout
// (BLAS takes 32-bit sizes: larger tiles or strides go through at::addmm_out instead).
// Outputs: out and dQ laid out in memory as q, dK as k, dV as v (empty_in_layout_of), each
// task zeroing the rows it accumulates into.
//
// The files: attention_cpu.h (this one: the problem, its band and mask, score rows, tiles),
// attention_cpu_math.h (vectorized exp2, tanh and reductions over score rows),
// attention_cpu.cpp (the problem's checks, tile shapes, output layout, op registration),
// attention_cpu_forward.cpp and attention_cpu_backward.cpp (the two kernels).
#pragma once

#include "cpu_allocation.h"
#include "cpu_blas.h"
#include "cpu_vec.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace fastformer {
namespace attention_cpu {

inline constexpr const char* kFwd = "cpu_attention_fwd";
inline constexpr const char* kBwd = "cpu_attention_bwd";
inline constexpr double kLog2e = 1.4426950408889634;
inline constexpr double kLn2 = 0.6931471805599453;

// Keys visible to query i: [lo(i), hi(i)), from the band
//   i + offset - left <= j <= i + offset + right   (a side < 0 is open), and 0 <= j < S.
// lo and hi never decrease with i, so a block of rows sees [lo(first), hi(last)).
struct Band {
  int64_t offset, left, right, L, S;

  int64_t lo(int64_t i) const {
    return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, S);
  }
  int64_t hi(int64_t i) const {
    return right < 0 ? S : std::clamp<int64_t>(i + offset + right + 1, 0, S);
  }
  // Queries that see some key of [j0, j1): [first_row(j0), end_row(j1)).
  int64_t first_row(int64_t j0) const {
    return right < 0 ? 0 : std::clamp<int64_t>(j0 - offset - right, 0, L);
  }
  int64_t end_row(int64_t j1) const {
    return left < 0 ? L : std::clamp<int64_t>(j1 - 1 - offset + left + 1, 0, L);
  }
};

// The mask of one call, broadcast to (B, Hq, L, S) by its strides (0 where broadcast).
struct Mask {
  enum Kind { kNone, kBool, kFloat, kDouble, kHalf, kBFloat16 } kind = kNone;
  const char* data = nullptr;  // byte address of element (0, 0, 0, 0)
  int64_t item = 0;            // bytes per element
  int64_t sb = 0, sh = 0, sm = 0, sn = 0;

  static Mask of(const std::optional<Tensor>& mask) {
    Mask m;
    if (!mask.has_value() || !mask->defined()) {
      return m;
    }
    switch (mask->scalar_type()) {
      case at::kBool: m.kind = kBool; break;
      case at::kFloat: m.kind = kFloat; break;
      case at::kDouble: m.kind = kDouble; break;
      case at::kHalf: m.kind = kHalf; break;
      case at::kBFloat16: m.kind = kBFloat16; break;
      default: TORCH_CHECK(false, kFwd, ": mask must be bool or floating point, got ",
                           mask->scalar_type());
    }
    m.data = static_cast<const char*>(mask->data_ptr());
    m.item = mask->element_size();
    m.sb = mask->stride(0);
    m.sh = mask->stride(1);
    m.sm = mask->stride(2);
    m.sn = mask->stride(3);
    return m;
  }

  const char* row(int64_t b, int64_t h, int64_t i) const {
    return data + (b * sb + h * sh + i * sm) * item;
  }
};

// A float mask value in base-2 score units, as the Triton kernels scale it: -inf stays -inf,
// finite values stay finite (finfo.min * log2(e) would overflow to -inf).
template <typename T, typename M>
inline T mask_bias(M value) {
  const T bias = static_cast<T>(value);
  if (bias == -std::numeric_limits<T>::infinity()) {
    return bias;
  }
  return std::max(bias * static_cast<T>(kLog2e), std::numeric_limits<T>::lowest());
}

template <typename T, typename M>
inline void add_mask(T* s, int64_t n, const char* row, int64_t sn) {
  const M* m = reinterpret_cast<const M*>(row);
  if (sn == 1) {
    for (int64_t j = 0; j < n; ++j) {
      s[j] += mask_bias<T>(m[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      s[j] += mask_bias<T>(m[j * sn]);
    }
  }
}

// Whether key j0 + j is hidden from the row by a bool mask (nonzero keeps it).
inline bool bool_hidden(const char* row, int64_t sn, int64_t j) {
  return row[j * sn] == 0;
}

// One row of a score tile: the base-2 scores s[0, n) of query i with keys j0 + [0, n)
// (log2(e) * scale * q_i . k_j from the tile product, capped by cap_scores with a softcap)
// become masked scores, with the ALiBi bias -alibi * |j - (i + offset)| when alibi (the
// head's slope times log2(e)) is not 0. Returns the row's visible range within the tile,
// [vis_lo, vis_hi).
template <typename T>
std::pair<int64_t, int64_t> score_row(T* s, int64_t n, const Mask& mask, const char* mask_row,
                                      const Band& band, T alibi, int64_t i, int64_t j0) {
  const char* m = mask_row == nullptr ? nullptr : mask_row + j0 * mask.sn * mask.item;
  switch (mask.kind) {
    case Mask::kNone: break;
    case Mask::kBool:
      for (int64_t j = 0; j < n; ++j) {
        s[j] = bool_hidden(m, mask.sn, j) ? -std::numeric_limits<T>::infinity() : s[j];
      }
      break;
    case Mask::kFloat: add_mask<T, float>(s, n, m, mask.sn); break;
    case Mask::kDouble: add_mask<T, double>(s, n, m, mask.sn); break;
    case Mask::kHalf: add_mask<T, at::Half>(s, n, m, mask.sn); break;
    case Mask::kBFloat16: add_mask<T, at::BFloat16>(s, n, m, mask.sn); break;
  }
  if (alibi != T(0)) {  // a slope of 0 adds nothing; NaN or inf ones apply (as at the reference)
    const int64_t diagonal = i + band.offset - j0;  // the tile column of query i's diagonal
    for (int64_t j = 0; j < n; ++j) {
      s[j] -= alibi * static_cast<T>(std::abs(j - diagonal));
    }
  }
  const int64_t vis_lo = std::clamp<int64_t>(band.lo(i) - j0, 0, n);
  const int64_t vis_hi = std::clamp<int64_t>(band.hi(i) - j0, vis_lo, n);
  std::fill(s, s + vis_lo, -std::numeric_limits<T>::infinity());
  std::fill(s + vis_hi, s + n, -std::numeric_limits<T>::infinity());
  return {vis_lo, vis_hi};
}

// Strided (B, H, rows, cols) tensor with unit column stride, by (batch, head) matrices.
template <typename T>
struct Heads {
  T* data;
  int64_t sb, sh, sm;

  static Heads of(const Tensor& t) {
    return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1),
            t.size(2) > 1 ? t.stride(2) : t.size(3)};
  }
  T* at(int64_t b, int64_t h, int64_t row = 0) const {
    return data + b * sb + h * sh + row * sm;
  }
};

// An empty (B, H, rows, cols) tensor laid out in memory as `like` is (see attention_cpu.cpp).
Tensor empty_in_layout_of(const Tensor& like, std::array<int64_t, 4> sizes, at::ScalarType dtype);

// Sets rows [begin, end) of head (b, h) of t, each `cols` wide, to zero.
template <typename T>
void zero_rows(const Heads<T>& t, int64_t b, int64_t h, int64_t begin, int64_t end,
               int64_t cols) {
  for (int64_t row = begin; row < end; ++row) {
    T* data = t.at(b, h, row);
    std::fill(data, data + cols, T(0));
  }
}

// Tile shapes: query rows and keys of a forward tile, of a backward tile.
struct TileShape {
  int64_t m_fwd, n_fwd, m_bwd, n_bwd;
};

// The tiles of a problem (see attention_cpu.cpp for how they were chosen).
TileShape tile_shape(int64_t L, int64_t S, bool banded, int64_t heads);

// One call's problem: sizes (Hkv kv heads, each shared by `group` query heads; value head dim
// DV), tiles, the score's scale, band, mask, dropout, ALiBi slopes and softcap.
struct Problem {
  int64_t B, Hq, Hkv, group, L, S, D, DV;
  TileShape tiles;
  double scale;
  Band band;
  Mask mask;
  Dropout dropout;
  std::vector<double> alibi;  // ALiBi slope of head (b, h) at b * Hq + h; empty without
  double softcap;  // > 0: scores capped to softcap * tanh(u / softcap); 0: not capped

  // alpha of a score tile's product q k^T: log2(e) * scale, or scale / softcap when
  // capped (cap_scores then takes the tile to base-2 scores).
  template <typename T>
  T tile_alpha() const {
    return static_cast<T>(softcap > 0.0 ? scale / softcap : scale * kLog2e);
  }
  // cap_scores's cap2 (0 when not capped).
  template <typename T>
  T cap2() const {
    return static_cast<T>(softcap * kLog2e);
  }

  // The ALiBi slope of head (b, h) in base-2 score units (0 without ALiBi): score_row's alibi.
  template <typename T>
  T alibi_base2(int64_t b, int64_t h) const {
    return alibi.empty() ? T(0) : static_cast<T>(alibi[b * Hq + h] * kLog2e);
  }
};

// The checked problem of one call of either kernel (op names it in errors).
Problem problem_of(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                   const std::optional<Tensor>& mask,
                   const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& seed,
                   double scale, double softcap, double dropout_p, int64_t diagonal_offset,
                   int64_t window_left, int64_t window_right);

// t itself when BLAS can read each (batch, head) matrix of t through its strides, else a
// contiguous copy (see attention_cpu.cpp).
Tensor blas_matrices(const Tensor& t);

// The kernels of fastformer::cpu_attention_fwd / _bwd.
std::tuple<Tensor, Tensor, Tensor> cpu_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& seed, double scale,
    double softcap, double dropout_p, int64_t diagonal_offset, int64_t window_left,
    int64_t window_right);
std::tuple<Tensor, Tensor, Tensor> cpu_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& stats, const std::optional<Tensor>& grad_lse, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& seed, double scale,
    double softcap, double dropout_p, int64_t diagonal_offset, int64_t window_left,
    int64_t window_right);

}  // namespace attention_cpu
}  // namespace fastformer
