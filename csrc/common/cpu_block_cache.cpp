#include "common/cpu_block_cache.h"

#include "common/settings.h"

#include <c10/core/impl/alloc_cpu.h>

#include <map>
#include <mutex>

namespace xmodal {
namespace {

constexpr int64_t kMinCachedBytes = int64_t(1) << 20;

class BlockCache {
 public:
  void* take(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    held_ -= bytes;
    return p;
  }

  // A freed block stays for reuse while the cache is under its limit; else it goes back to the system.
  void give_back(void* p, int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + bytes <= limit()) {
        free_.emplace(bytes, p);
        held_ += bytes;
        return;
      }
    }
    c10::free_cpu(p);
  }

  int64_t release() {
    std::multimap<int64_t, void*> blocks;
    int64_t released = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      released = held_;
      held_ = 0;
    }
    for (auto& [bytes, p] : blocks) c10::free_cpu(p);
    return released;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

  bool enabled() const { return limit() > 0; }

 private:
  std::mutex mutex_;
  std::multimap<int64_t, void*> free_;  // size -> block
  int64_t held_ = 0;
  static int64_t limit() { return cpu_cache_mb() << 20; }  // xmodal.settings' cpu_cache_mb
};

// Never destroyed: tensors freed during interpreter shutdown still give their blocks back.
BlockCache& cache() {
  static BlockCache* c = new BlockCache();
  return *c;
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
  if (!options.device().is_cpu() || bytes < kMinCachedBytes || !cache().enabled()) return at::empty(sizes, options);
  void* p = cache().take(bytes);
  if (p == nullptr) p = c10::alloc_cpu(size_t(bytes));
  return at::from_blob(p, sizes, [bytes](void* q) { cache().give_back(q, bytes); }, options);
}

int64_t release_cpu_cache() { return cache().release(); }

int64_t cpu_cache_bytes() { return cache().held(); }

}  // namespace xmodal
