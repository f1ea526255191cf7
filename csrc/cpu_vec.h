// Helpers shared by the CPU kernels: at::vec loads and stores that convert reduced types to
// their accumulation type, row views of 2-D tensors, and the dropout parameters of a call.
#pragma once

#include "philox.h"

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <optional>
#include <type_traits>

namespace fastformer {

using at::Tensor;
using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// Vector helpers, forced inline (called out of line, they would pass vectors through memory).
// One step covers two native acc_t vectors: 16 floats with AVX2, 32 with AVX-512 (one
// bf16/half vector, so reduced types convert without shuffles), or half as many doubles. A
// step of n < size() elements is the row's tail: loads leave the other lanes unspecified,
// stores write n elements, and reductions go through masked().

template <typename acc_t>
using Vec = at::vec::VectorizedN<acc_t, 2>;

template <typename acc_t, typename T>
C10_ALWAYS_INLINE Vec<acc_t> load(const T* p, int64_t n) {
  static_assert(std::is_same_v<T, acc_t> || std::is_same_v<acc_t, float>);
  if constexpr (std::is_same_v<T, acc_t>) {
    return n == Vec<acc_t>::size() ? Vec<acc_t>::loadu(p) : Vec<acc_t>::loadu(p, n);
  } else {
    const auto v = n == Vec<acc_t>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
    const auto [lo, hi] = at::vec::convert_to_float<T>(v);
    return Vec<acc_t>(lo, hi);
  }
}

// Stores v rounded to T and returns the stored values, read back as acc_t.
template <typename T, typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> store(T* p, const Vec<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    n == Vec<acc_t>::size() ? v.store(p) : v.store(p, static_cast<int>(n));
    return v;
  } else {
    const auto t = at::vec::convert_from_float<T>(v[0], v[1]);
    n == Vec<acc_t>::size() ? t.store(p) : t.store(p, static_cast<int>(n));
    const auto [lo, hi] = at::vec::convert_to_float<T>(t);
    return Vec<acc_t>(lo, hi);
  }
}

// v with the lanes past the first n zeroed, for sums over a row's tail.
template <typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> masked(const Vec<acc_t>& v, int64_t n) {
  return Vec<acc_t>::set(Vec<acc_t>(acc_t(0)), v, n);
}

template <typename acc_t>
C10_ALWAYS_INLINE acc_t sum_lanes(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

// Calls step(j, n) over [0, N) in steps of L elements, the last one possibly shorter. For the
// full steps n is a compile-time constant, so their loads and stores need no bounds.
template <int64_t L, typename F>
C10_ALWAYS_INLINE void for_each_step(int64_t N, const F& step) {
  int64_t j = 0;
  for (; j + L <= N; j += L) {
    step(j, std::integral_constant<int64_t, L>{});
  }
  if (j < N) {
    step(j, N - j);
  }
}

// Dropout multipliers of one row: keep ? 1 / (1 - p) : 0 for offsets first_offset + [0, N).
// A plain loop over philox_uniform, which the compiler vectorizes.
template <typename acc_t>
inline void dropout_row_scale(acc_t* out, int64_t N, uint64_t seed, int64_t first_offset, float p,
                       acc_t scale) {
  for (int64_t j = 0; j < N; ++j) {
    out[j] = dropout_keep(seed, first_offset + j, p) ? scale : acc_t(0);
  }
}

// A row-major (M, N) matrix with unit column stride; nullptr data stands for an absent one.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t stride = 0;

  T* row(int64_t i) const {
    return data == nullptr ? nullptr : data + i * stride;
  }
};

template <typename T>
Rows<T> rows_of(const std::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) {
    return {};
  }
  return {t->data_ptr<std::remove_const_t<T>>(), t->stride(0)};
}

struct Dropout {
  bool enabled = false;
  uint64_t seed = 0;
  float p = 0.f;
  double scale = 1.0;  // 1 / (1 - p)
};

inline Dropout make_dropout(const char* op, const std::optional<Tensor>& seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  Dropout dropout;
  if (p == 0.0) {
    return dropout;
  }
  TORCH_CHECK(seed.has_value() && seed->defined(), op, ": seed is required when dropout_p > 0");
  TORCH_CHECK(seed->device().is_cpu(), op, ": seed must be a CPU tensor, got device ",
              seed->device());
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::ScalarType::Long, op,
              ": seed must be an int64 tensor of one element, got ", seed->scalar_type(),
              " of shape ", seed->sizes());
  dropout.enabled = true;
  dropout.seed = static_cast<uint64_t>(seed->item<int64_t>());
  dropout.p = static_cast<float>(p);
  dropout.scale = 1.0 / (1.0 - p);
  return dropout;
}

}  // namespace fastformer
