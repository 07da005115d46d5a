// A cache for the large CPU allocations of a native call (the compact encoder's intermediates).
//
// Why: a batch-32 compact-encoder call allocates and frees tens of MB of intermediates (QKV, the
// attention context, FFN hidden, LayerNorm outputs) one tensor at a time. glibc hands large freed
// blocks back to the OS (munmap, heap trim), so the next call takes a page fault on every fresh
// 4 KiB page: 10-16 k faults, 40-60 ms of system time, per ~350 ms call of a 95 %-sparse BERT-base
// at 32 x 128 on the 2-core CPU here (worse when other code, e.g. a dense model, churned the heap
// in between). Inside a WorkspaceScope, CPU allocations of at least kMinBytes are served from a
// process-wide cache of blocks freed earlier (best fit within 1/8 of the size), so a repeated call
// reuses the same memory and takes no faults.
//
// Mechanism: the first scope installs Workspace (below) as the CPU allocator. Outside a scope (and
// on threads not in one, e.g. parallel_for workers) it forwards to the allocator it replaced, so
// nothing else changes; a block it served returns to the cache when its tensor dies, on any thread.
// At most cap bytes stay cached (COFI_WORKSPACE_MB, default 1024; least recently freed blocks are
// dropped first); release() frees them all.
// COFI_WORKSPACE=0 turns the scope off (read per call: A/B timing).
#pragma once
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

#include "env_flag.h"

namespace cofi {
namespace cpu {

class Workspace final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{64} << 10;

  static Workspace& get() {
    static Workspace* w = new Workspace();  // never destroyed: tensors may outlive static teardown
    return *w;
  }

  // Installs this allocator once; false when another allocator of higher priority holds the slot.
  bool install() {
    std::call_once(installed_, [this] {
      prev_ = c10::GetCPUAllocator();
      c10::SetCPUAllocator(this, /*priority=*/0);
    });
    return c10::GetCPUAllocator() == this;
  }

  c10::DataPtr allocate(size_t n) override {
    if (!active() || n < kMinBytes) return prev_->allocate(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(n);
      if (it != free_.end() && it->first - n <= n / 8) {
        p = it->second->ptr;
        in_use_[p] = it->first;
        cached_ -= it->first;
        lru_.erase(it->second);
        free_.erase(it);
        ++hits_;
      }
    }
    if (p == nullptr) {
      p = c10::alloc_cpu(n);
      std::lock_guard<std::mutex> lock(mu_);
      in_use_[p] = n;
      ++misses_;
    }
    return {p, p, &Workspace::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Workspace::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every cached block; returns the bytes freed.
  int64_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t freed = 0;
    for (const Block& b : lru_) {
      c10::free_cpu(b.ptr);
      freed += static_cast<int64_t>(b.size);
    }
    lru_.clear();
    free_.clear();
    cached_ = 0;
    return freed;
  }

  // {cached bytes, bytes in use, hits, misses}
  std::array<int64_t, 4> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t used = 0;
    for (auto& kv : in_use_) used += static_cast<int64_t>(kv.second);
    return {static_cast<int64_t>(cached_), used, hits_, misses_};
  }

  static bool enabled() { return env_flag_on("COFI_WORKSPACE"); }

  // Turns the calling thread's workspace on (when enabled and installable); returns the previous
  // state for exit().
  static bool enter() {
    const bool prev = active();
    if (enabled() && get().install()) active() = true;
    return prev;
  }
  static void exit(bool previous) { active() = previous; }

  static bool& active() {
    static thread_local bool on = false;
    return on;
  }

 private:
  Workspace() = default;

  static size_t cap_bytes() {  // read per free, so a process can change it
    const char* mb = std::getenv("COFI_WORKSPACE_MB");
    return (mb != nullptr ? static_cast<size_t>(std::strtoull(mb, nullptr, 10)) : size_t{1024}) << 20;
  }

  // Frees a block this allocator served: back to the cache, which then drops its least recently
  // freed blocks past the cap (blocks of sizes the current work no longer asks for, e.g. another
  // model's, go first). Anything else reached through raw_deleter belongs to the replaced allocator.
  static void deleter(void* p) {
    Workspace& w = get();
    {
      std::lock_guard<std::mutex> lock(w.mu_);
      auto it = w.in_use_.find(p);
      if (it != w.in_use_.end()) {
        const size_t n = it->second;
        w.in_use_.erase(it);
        w.lru_.push_front(Block{p, n, {}});
        w.lru_.front().slot = w.free_.emplace(n, w.lru_.begin());
        w.cached_ += n;
        const size_t cap = cap_bytes();
        while (w.cached_ > cap) {
          const Block& old = w.lru_.back();
          c10::free_cpu(old.ptr);
          w.cached_ -= old.size;
          w.free_.erase(old.slot);
          w.lru_.pop_back();
        }
        return;
      }
    }
    // (a deleter must not throw; without a raw deleter the replaced allocator's raw_allocate could
    // not have made p either, so that branch is only a guard)
    c10::DeleterFnPtr d = w.prev_->raw_deleter();
    if (d != nullptr) {
      d(p);
    } else {
      c10::free_cpu(p);
    }
  }

  struct Block;
  using Lru = std::list<Block>;
  using BySize = std::multimap<size_t, Lru::iterator>;
  struct Block {
    void* ptr;
    size_t size;
    BySize::iterator slot;  // its entry in free_
  };

  c10::Allocator* prev_ = nullptr;
  std::once_flag installed_;
  std::mutex mu_;
  Lru lru_;       // cached blocks, most recently freed first
  BySize free_;   // the same blocks by size (best fit)
  std::unordered_map<void*, size_t> in_use_;
  size_t cached_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Serves this thread's CPU allocations from the Workspace while alive (when `on`, e.g. the call's
// tensors are on the CPU, and the workspace is enabled and installable).
class WorkspaceScope {
 public:
  explicit WorkspaceScope(bool on = true) : prev_(on ? Workspace::enter() : Workspace::active()) {}
  ~WorkspaceScope() { Workspace::exit(prev_); }
  WorkspaceScope(const WorkspaceScope&) = delete;
  WorkspaceScope& operator=(const WorkspaceScope&) = delete;

 private:
  bool prev_;
};

}  // namespace cpu
}  // namespace cofi
