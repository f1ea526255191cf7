// Counter-based random numbers identical, bit for bit, to Triton's `tl.rand(seed, offset)`
// (triton/language/random.py), so that a CPU kernel and a Triton kernel given the same seed
// draw the same dropout mask.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011):
//   key     (k0, k1)         = (low 32 bits, high 32 bits) of the seed, read as uint64
//   counter (c0, c1, c2, c3) = (low 32 bits, high 32 bits of the int64 offset, 0, 0)
//   10 rounds of
//     c0' = mulhi(B, c2) ^ c1 ^ k0      c1' = mullo(B, c2)
//     c2' = mulhi(A, c0) ^ c3 ^ k1      c3' = mullo(A, c0)
//     k0 += 0x9E3779B9,  k1 += 0xBB67AE85
//   with A = 0xD2511F53, B = 0xCD9E8D57, mulhi/mullo the high/low 32 bits of the 64-bit
//   product. tl.rand keeps only the first output word c0.
// Uniform float: x = int32 bit pattern of c0; x < 0 ? ~x : x lies in [0, 2^31 - 1], and
//   u = float(x) * 4.6566127342e-10f, the largest scale keeping u < 1 after float rounding,
//   so u lies in [0, 1).
//
// Each output depends only on (seed, offset): any thread can draw any element, and a loop over
// consecutive offsets has no loop-carried state. The multiplies are written as 64-bit products
// of zero-extended 32-bit words so that compilers vectorize such loops (vpmuludq on x86) and
// nvcc emits one mul.wide.u32 per product. The functions are host and device functions when
// compiled by nvcc (csrc/cuda/), plain inline functions otherwise: the same code, bit for bit.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FASTFORMER_HOST_DEVICE __host__ __device__
#else
#define FASTFORMER_HOST_DEVICE
#endif

namespace fastformer {

// First output word of Philox4x32-10 for the counter (offset_lo, offset_hi, 0, 0).
FASTFORMER_HOST_DEVICE inline uint32_t philox4x32_10_c0(uint64_t seed, int64_t offset) {
  constexpr uint32_t kRoundA = 0xD2511F53u;
  constexpr uint32_t kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u;
  constexpr uint32_t kKeyB = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32);
  uint32_t c2 = 0;
  uint32_t c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_a = static_cast<uint64_t>(kRoundA) * c0;
    const uint64_t prod_b = static_cast<uint64_t>(kRoundB) * c2;
    c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// tl.rand(seed, offset): a float in [0, 1).
FASTFORMER_HOST_DEVICE inline float philox_uniform(uint64_t seed, int64_t offset) {
  int32_t x = static_cast<int32_t>(philox4x32_10_c0(seed, offset));
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Dropout with drop probability p keeps the element at `offset` iff its uniform is >= p
// (so p = 0 keeps everything). p is compared as a float, as a Triton kernel receives it.
FASTFORMER_HOST_DEVICE inline bool dropout_keep(uint64_t seed, int64_t offset, float p) {
  return philox_uniform(seed, offset) >= p;
}

}  // namespace fastformer
