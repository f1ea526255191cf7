// Allocation of large CPU output tensors in transparent huge pages.
//
// Why: a fresh multi-megabyte output usually comes straight from mmap (glibc's malloc maps every
// request of 32 MiB or more afresh, smaller ones whenever its heap has been trimmed), and the
// kernel maps such memory lazily, one 4 KiB page per fault, zeroing each. For a memory-bound
// kernel that writes its output once, this first touch dominates: a 32 MB output costs ~9 ms of
// page faults against ~1.3 ms for writing memory that is already mapped. Backed by 2 MiB huge
// pages the same output takes 512x fewer faults (~3 ms). On kernels whose THP mode is "madvise"
// (the usual default) only regions marked with madvise(MADV_HUGEPAGE) get huge pages, and only
// 2 MiB-aligned 2 MiB ranges can be mapped by one, so the buffer is 2 MiB-aligned, rounded up to
// whole huge pages and marked. Where huge pages are unavailable madvise fails harmlessly and the
// memory is ordinary.
//
// The memory comes from a c10::Allocator rather than at::from_blob so that the tensors are
// ordinary CPU tensors with resizable storage (autograd, in-place ops, resize_, pickling all
// work): only their allocator differs. Allocations below 32 MiB go to the default CPU
// allocator: glibc serves those from its heap once its dynamic mmap threshold has risen
// (it rises to the size of freed mapped chunks, up to 32 MiB), so in a loop they come back
// already mapped and huge pages would only add faults; from 32 MiB on, glibc maps every
// request afresh, and there huge pages pay.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>

#include <sys/mman.h>

namespace fastformer {

class HugePageCPUAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;
  // glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: requests this large are always mmapped.
  static constexpr size_t kAlwaysMapped = size_t{32} << 20;

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kAlwaysMapped) {
      return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    }
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&ptr, kHugePage, rounded) == 0,
                     "HugePageCPUAllocator: not enough memory: you tried to allocate ", nbytes,
                     " bytes.");
    madvise(ptr, rounded, MADV_HUGEPAGE);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* ptr) {
    std::free(ptr);
  }
};

// torch.empty(sizes, dtype) on the CPU, in huge pages from 32 MiB on.
inline at::Tensor empty_cpu_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype) {
  // Never destroyed: storages keep a pointer to their allocator, and may outlive static
  // destruction.
  static auto* const allocator = new HugePageCPUAllocator();
  return at::detail::empty_generic(
      sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

}  // namespace fastformer
