// HugePageCPUAllocator (see cpu_allocation.h) and the functions behind the ops that report
// on and empty its cache (schemas in ops.cpp).
#include "cpu_allocation.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <string>

#include <sys/mman.h>

namespace fastformer {

namespace {

size_t cache_limit_from_environment() {
  const char* value = std::getenv("FASTFORMER_CPU_CACHE_MIB");
  if (value == nullptr || *value == '\0') {
    return size_t{1024} << 20;
  }
  try {
    const long long mib = std::stoll(value);
    TORCH_CHECK(mib >= 0, "FASTFORMER_CPU_CACHE_MIB must be >= 0, got ", value);
    return static_cast<size_t>(mib) << 20;
  } catch (const std::logic_error&) {
    TORCH_CHECK(false, "FASTFORMER_CPU_CACHE_MIB must be a whole number of MiB, got '", value,
                "'");
  }
}

}  // namespace

HugePageCPUAllocator& HugePageCPUAllocator::instance() {
  static auto* const allocator = new HugePageCPUAllocator(cache_limit_from_environment());
  return *allocator;
}

c10::DataPtr HugePageCPUAllocator::allocate(size_t nbytes) {
  if (nbytes < kMinCached) {
    return c10::GetDefaultCPUAllocator()->allocate(nbytes);
  }
  const bool huge = nbytes >= kHugePage;
  const size_t unit = huge ? kHugePage : kSmallUnit;
  const size_t rounded = (nbytes + unit - 1) / unit * unit;
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = free_blocks_.find(rounded);
    if (found != free_blocks_.end() && !found->second.empty()) {
      const Lru::iterator entry = found->second.back();  // the most recently freed
      found->second.pop_back();
      ptr = entry->second;
      lru_.erase(entry);
      cached_bytes_ -= rounded;
      ++reuses_;
    } else {
      ++fresh_;
    }
  }
  if (ptr == nullptr) {
    const size_t alignment = huge ? kHugePage : size_t{4096};
    TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&ptr, alignment, rounded) == 0,
                     "fastformer: out of CPU memory allocating ", nbytes, " bytes");
    if (huge) {
      madvise(ptr, rounded, MADV_HUGEPAGE);
    }
  }
  return {ptr, new Block{ptr, rounded}, &release, c10::Device(c10::DeviceType::CPU)};
}

void HugePageCPUAllocator::release(void* block) {
  instance().recycle(static_cast<Block*>(block));
}

void HugePageCPUAllocator::recycle(Block* block) {
  void* ptr = block->ptr;
  const size_t bytes = block->bytes;
  delete block;
  std::vector<void*> evicted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (bytes <= limit_bytes_) {
      while (cached_bytes_ + bytes > limit_bytes_) {
        // The least recently freed block is the first of its size's entries.
        const auto [old_bytes, old_ptr] = lru_.front();
        auto& same_size = free_blocks_[old_bytes];
        same_size.erase(same_size.begin());
        lru_.pop_front();
        cached_bytes_ -= old_bytes;
        evicted.push_back(old_ptr);
      }
      lru_.emplace_back(bytes, ptr);
      free_blocks_[bytes].push_back(std::prev(lru_.end()));
      cached_bytes_ += bytes;
      ptr = nullptr;
    }
  }
  for (void* old_ptr : evicted) {
    std::free(old_ptr);
  }
  std::free(ptr);  // a block larger than the whole cache (free(nullptr) does nothing)
}

HugePageCPUAllocator::Stats HugePageCPUAllocator::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto blocks = static_cast<int64_t>(lru_.size());
  return {static_cast<int64_t>(cached_bytes_), blocks, static_cast<int64_t>(limit_bytes_),
          reuses_, fresh_};
}

void HugePageCPUAllocator::empty_cache() {
  Lru blocks;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    blocks.swap(lru_);
    free_blocks_.clear();
    cached_bytes_ = 0;
  }
  for (const auto& entry : blocks) {
    std::free(entry.second);
  }
}

at::Tensor empty_cpu_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &HugePageCPUAllocator::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

std::vector<int64_t> cpu_cache_stats() {
  const auto s = HugePageCPUAllocator::instance().stats();
  return {s.cached_bytes, s.cached_blocks, s.limit_bytes, s.reuses, s.fresh};
}

void empty_cpu_cache() {
  HugePageCPUAllocator::instance().empty_cache();
}

}  // namespace fastformer
