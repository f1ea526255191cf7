// Vectorized maths over the rows of a score tile, for the CPU attention kernels
// (attention_cpu.h): exp2 and tanh (AVX-512 versions of their own where built for it),
// soft-capping, shifted exponentials with their sum, and the row maximum.
#pragma once

#include "attention_cpu.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastformer {
namespace attention_cpu {

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

}  // namespace attention_cpu
}  // namespace fastformer
