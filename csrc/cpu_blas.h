// Row-major matrix products on raw pointers, for CPU kernels that multiply tiles (attention):
//   C (m x n, row stride ldc) = alpha * op(A) @ op(B) + beta * C
// op(A) is (m x k): A itself, row-major with row stride lda, or when trans_a the transpose
// of a row-major (k x m) A; op(B) is (k x n) likewise. beta = 0 ignores C's old contents
// (NaN included), as BLAS does.
//
// Why raw BLAS: a tile product is a few microseconds of work, about what a call of at::mm
// costs in dispatch alone. libtorch links a BLAS (MKL on x86-64 wheels) and exports its
// Fortran sgemm_/dgemm_, which torch's own CPU flash attention calls for its tiles; called
// inside at::parallel_for they run single-threaded on the calling thread. The symbols are
// declared weak: where a build of torch does not export them, or a size exceeds the 32-bit
// BLAS interface, the product goes through at::addmm_out on views of the same memory.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <cstdint>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastformer {

namespace blas_detail {

template <typename T>
at::Tensor view(const T* data, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // op(X) (rows x cols) of a row-major X: X itself, or the transpose of X (cols x rows).
  if (transposed) {
    return at::from_blob(const_cast<T*>(data), {cols, rows}, {ld, 1}, options).t();
  }
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
}

inline bool fits_int(int64_t v) {
  return v >= 0 && v <= INT_MAX;
}

}  // namespace blas_detail

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  if (m == 0 || n == 0) {
    return;
  }
  // Leading dimensions at least the stored row length, as BLAS requires (a single row may
  // come with any stride).
  lda = std::max(lda, trans_a ? m : k);
  ldb = std::max(ldb, trans_b ? k : n);
  ldc = std::max(ldc, n);
  const bool fits = blas_detail::fits_int(m) && blas_detail::fits_int(n) &&
                    blas_detail::fits_int(k) && blas_detail::fits_int(lda) &&
                    blas_detail::fits_int(ldb) && blas_detail::fits_int(ldc);
  auto* blas = std::is_same_v<T, float> ? reinterpret_cast<void*>(&sgemm_)
                                        : reinterpret_cast<void*>(&dgemm_);
  if (k > 0 && fits && blas != nullptr) {
    // Column-major BLAS sees each row-major matrix as its transpose: compute
    // C^T (n x m) = op(B)^T (n x k) @ op(A)^T (k x m).
    const char tb = trans_b ? 'T' : 'N';
    const char ta = trans_a ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&tb, &ta, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    } else {
      dgemm_(&tb, &ta, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    }
    return;
  }
  at::Tensor out = blas_detail::view<T>(c, m, n, ldc, false);
  at::addmm_out(out, out, blas_detail::view<T>(a, m, k, lda, trans_a),
                blas_detail::view<T>(b, k, n, ldb, trans_b), beta, alpha);
}

}  // namespace fastformer
