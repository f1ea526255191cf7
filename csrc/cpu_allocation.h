// Allocation of large CPU output tensors: transparent huge pages, and a bounded cache of
// freed blocks.
//
// Why: a fresh multi-megabyte buffer usually comes straight from mmap, and the kernel maps
// such memory lazily, one zeroed 4 KiB page per fault. For a memory-bound kernel that writes
// its output once, this first touch dominates: a 32 MB output costs ~9 ms of page faults
// against ~1.3 ms for writing memory that is already mapped. Whether glibc hands back mapped
// or fresh memory depends on its heap's history (its mmap threshold moves, its heap is
// trimmed), so the same call is fast or slow by accident. This allocator makes it
// deterministic:
//  - blocks of 2 MiB and more are 2 MiB-aligned, rounded to whole huge pages and marked
//    madvise(MADV_HUGEPAGE), so a first touch takes 512x fewer faults (THP "madvise" mode,
//    the usual default; where huge pages are unavailable madvise fails harmlessly);
//  - freed blocks are kept, up to a bound (beyond it the least recently freed go first),
//    and handed out again for the same rounded size, already mapped: in a training or
//    inference loop every output after the first is free of page faults. Like torch's CUDA
//    caching allocator, the cache holds memory after the tensors are freed: at most
//    FASTFORMER_CPU_CACHE_MIB MiB (default 1024; 0 disables it), released by
//    fastformer.empty_cpu_cache().
// Blocks from 256 KiB to 2 MiB (a layer norm's output at 1024 tokens x 256 features) are
// cached the same way, rounded to 64 KiB, without huge pages: in a Transformer training step
// on 2 CPU cores this made the step 2% faster. Smaller requests go to torch's default CPU
// allocator. The memory comes from a c10::Allocator rather than at::from_blob so that the
// tensors are ordinary CPU tensors with resizable storage (autograd, in-place ops, resize_,
// pickling all work).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#include <cstddef>
#include <list>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastformer {

class HugePageCPUAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kMinCached = size_t{256} << 10;  // smaller: torch's allocator
  static constexpr size_t kSmallUnit = size_t{64} << 10;  // rounding below kHugePage

  struct Stats {
    int64_t cached_bytes;  // held in the cache, free for reuse
    int64_t cached_blocks;
    int64_t limit_bytes;  // the bound on cached_bytes
    int64_t reuses;  // allocations served from the cache
    int64_t fresh;  // allocations that mapped new memory
  };

  // The process-wide instance (never destroyed: storages may outlive static destruction).
  static HugePageCPUAllocator& instance();

  c10::DataPtr allocate(size_t nbytes) override;
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  Stats stats();
  void empty_cache();  // returns every cached block to the system

 private:
  struct Block {
    void* ptr;
    size_t bytes;  // rounded to whole huge pages
  };
  explicit HugePageCPUAllocator(size_t limit_bytes) : limit_bytes_(limit_bytes) {}
  static void release(void* block);  // the DataPtr deleter; its context is a Block*
  void recycle(Block* block);

  // Cached blocks, least recently freed first; when a freed block does not fit under the
  // bound, the oldest go, so blocks of sizes a program no longer uses never crowd out the
  // ones it does.
  using Lru = std::list<std::pair<size_t, void*>>;  // (rounded bytes, block)

  std::mutex mutex_;
  Lru lru_;
  // rounded bytes -> that size's entries of lru_, least recently freed first
  std::unordered_map<size_t, std::vector<Lru::iterator>> free_blocks_;
  size_t cached_bytes_ = 0;
  const size_t limit_bytes_;
  int64_t reuses_ = 0;
  int64_t fresh_ = 0;
};

// torch.empty(sizes, dtype) on the CPU, through HugePageCPUAllocator.
at::Tensor empty_cpu_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype);

// Behind the ops fastformer::cpu_cache_stats and fastformer::empty_cpu_cache.
std::vector<int64_t> cpu_cache_stats();  // [cached_bytes, cached_blocks, limit_bytes, reuses, fresh]
void empty_cpu_cache();

}  // namespace fastformer
