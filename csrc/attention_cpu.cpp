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
#include "cpu_allocation.h"
#include "cpu_blas.h"
#include "cpu_vec.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace fastformer {
namespace {

constexpr const char* kFwd = "cpu_attention_fwd";
constexpr const char* kBwd = "cpu_attention_bwd";
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

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

#if defined(CPU_CAPABILITY_AVX512)
// 2^f = e^(f ln 2) by its Taylor series to degree 7, for |f| <= 1/2: the truncation error is
// below 6e-9 relative, a tenth of float's ulp.
constexpr std::array<float, 8> exp2_taylor() {
  std::array<float, 8> c{};
  double term = 1.0;
  for (int k = 0; k < 8; ++k) {
    c[k] = static_cast<float>(term);
    term *= kLn2 / (k + 1);
  }
  return c;
}

// 2^x of 16 floats to within 1 ulp (Vectorized::exp2, Sleef's exp2f, is slower on AVX-512),
// NaN kept, results below 2^-126 (x < -126) flushed to zero: a denormal probability would
// slow the next tile product severalfold (microcode assists), and one below 2^-126 of the
// row's largest, which is 1, cannot change the row's sum.
C10_ALWAYS_INLINE Vectorized<float> exp2_flushed(const Vectorized<float>& x) {
  static constexpr std::array<float, 8> c = exp2_taylor();
  const __m512 v = x;
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __mmask16 tiny = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-126.f), _CMP_LT_OQ);
  const __m512 clamped = _mm512_min_ps(v, _mm512_set1_ps(129.f));  // 2^129 is inf as well
  const __m512 n = _mm512_roundscale_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(clamped, n);
  __m512 p = _mm512_set1_ps(c[7]);
  for (int k = 6; k >= 0; --k) {
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
  }
  const __m512 result = _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), p, n);
  return _mm512_mask_blend_ps(nan, result, v);
}
#endif

template <typename T>
C10_ALWAYS_INLINE Vectorized<T> exp2_vec(const Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return exp2_flushed(x);
  }
#endif
  return x.exp2();
}

#if defined(CPU_CAPABILITY_AVX512)
// tanh of 16 floats to within 3 ulp, 3.6x as fast as Sleef's tanhf (Vectorized::tanh) on
// an AVX-512 Xeon: for |x| < 0.4 the odd Taylor series to x^13 (truncation below 1e-8
// relative), else 1 - 2 / (e^2|x| + 1) by exp2_flushed (e^2|x| >= 2.2 keeps the
// cancellation small), the sign put back. NaN stays NaN, +-inf gives +-1, -0 gives -0.
C10_ALWAYS_INLINE Vectorized<float> tanh_fast(const Vectorized<float>& x) {
  static constexpr std::array<double, 6> c{-1.0 / 3, 2.0 / 15, -17.0 / 315, 62.0 / 2835,
                                           -1382.0 / 155925, 21844.0 / 6081075};
  const __m512 v = x;
  const __m512 sign_bit = _mm512_set1_ps(-0.0f);
  const __m512 a = _mm512_andnot_ps(sign_bit, v);
  const __m512 z = _mm512_mul_ps(a, a);
  __m512 p = _mm512_set1_ps(static_cast<float>(c[5]));
  for (int k = 4; k >= 0; --k) {
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(static_cast<float>(c[k])));
  }
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), a, a);  // a + a z p(z)
  const __m512 e = exp2_flushed(_mm512_mul_ps(a, _mm512_set1_ps(static_cast<float>(2 * kLog2e))));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 large =
      _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
  const __mmask16 is_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.4f), _CMP_LT_OQ);
  return _mm512_or_ps(_mm512_mask_blend_ps(is_small, large, small), _mm512_and_ps(v, sign_bit));
}
#endif

template <typename T>
C10_ALWAYS_INLINE Vectorized<T> tanh_vec(const Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return tanh_fast(x);
  }
#endif
  return x.tanh();
}

// Soft-capping of one row of a score tile holding u / softcap (the tile product's alpha,
// Problem::tile_alpha): s = cap2 * tanh(u / softcap), cap2 = softcap * log2(e), in base-2
// units; the tanh kept in tanh_row when given (the backward's d cap / du = 1 - tanh^2).
template <typename T>
void cap_scores(T* s, int64_t n, T cap2, T* tanh_row) {
  using V = Vectorized<T>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V t = tanh_vec<T>(V::loadu(s + j));
    if (tanh_row != nullptr) {
      t.store(tanh_row + j);
    }
    (t * V(cap2)).store(s + j);
  }
  for (; j < n; ++j) {
    const T t = std::tanh(s[j]);
    if (tanh_row != nullptr) {
      tanh_row[j] = t;
    }
    s[j] = t * cap2;
  }
}

// s[j] = exp2((s[j] - shift) - shift2) for j in [0, n); returns their sum. Two shifts, in
// this order, so that a huge row max leaves the small second shift its precision.
template <typename T>
T exp2_shifted(T* s, int64_t n, T shift, T shift2 = T(0)) {
  using V = Vectorized<T>;
  const V vshift(shift), vshift2(shift2);
  V vsum(T(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V p = exp2_vec<T>((V::loadu(s + j) - vshift) - vshift2);
    p.store(s + j);
    vsum = vsum + p;
  }
  T sum = at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return a + b; }, vsum);
  for (; j < n; ++j) {
    s[j] = std::exp2((s[j] - shift) - shift2);
    sum += s[j];
  }
  return sum;
}

// max_j s[j] over the non-NaN scores (-inf if none), with four independent maxima in flight.
// NaN-blind on purpose: a NaN score still makes its p, the row's sum and so its output NaN,
// and forward_block then marks the row's max NaN as well (see there).
template <typename T>
T row_max(const T* s, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t kStep = 4 * V::size();
  const auto vmax = [](const V& a, const V& b) { return at::vec::clamp_min(a, b); };
  V m0(-std::numeric_limits<T>::infinity()), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    m0 = vmax(V::loadu(s + j), m0);
    m1 = vmax(V::loadu(s + j + V::size()), m1);
    m2 = vmax(V::loadu(s + j + 2 * V::size()), m2);
    m3 = vmax(V::loadu(s + j + 3 * V::size()), m3);
  }
  for (; j + V::size() <= n; j += V::size()) {
    m0 = vmax(V::loadu(s + j), m0);
  }
  T m = at::vec::vec_reduce_all<T>(vmax, vmax(vmax(m0, m1), vmax(m2, m3)));
  for (; j < n; ++j) {
    m = s[j] > m ? s[j] : m;
  }
  return m;
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

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

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

}  // namespace

TORCH_LIBRARY_IMPL(fastformer, CPU, m) {
  m.impl(kFwd, &cpu_attention_fwd);
  m.impl(kBwd, &cpu_attention_bwd);
}

}  // namespace fastformer
