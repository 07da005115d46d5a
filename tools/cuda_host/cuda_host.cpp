// Runtime of the host harness (see cuda_host.h): block barriers, warp exchange, launches, the
// launcher registry and the CUDA error state.
#include "cuda_host.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace cuda_host {

namespace {

// Seconds a barrier waits before calling it a deadlock (divergent __syncthreads or shuffle mask).
int deadlock_seconds() {
  const char* s = std::getenv("CUDA_HOST_DEADLOCK_S");
  return s ? std::atoi(s) : 120;
}

// A barrier that threads leave for good with drop() (an exited GPU thread no longer counts), that
// checks every thread of a phase arrives from the same call site, and that runs `on_release` in the
// last arriving thread before any waiter is released. Lock-free: (expected, arrived) in one atomic
// word, waiters sleep on a futex over the generation counter (no mutex hand-off on release, which
// made a condition-variable barrier of hundreds of threads mostly system time).
class Barrier {
 public:
  void reset(int expected) {
    state_.store(static_cast<uint64_t>(expected) << 32, std::memory_order_relaxed);
    site_.store(-1, std::memory_order_relaxed);
  }

  void wait(int site, const char* what, const std::function<void()>& on_release = {}) {
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    int first = -1;
    if (!site_.compare_exchange_strong(first, site, std::memory_order_relaxed) && first != site)
      die("divergent %s: threads of one block wait at line %d and at line %d", what, first, site);
    const uint64_t s = state_.fetch_add(1, std::memory_order_acq_rel) + 1;
    if (arrived(s) == expected(s)) {
      release(on_release);
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(deadlock_seconds());
    while (gen_.load(std::memory_order_acquire) == gen) {
      const timespec slice{1, 0};
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, gen, &slice, nullptr, 0);
      if (std::chrono::steady_clock::now() > deadline) {
        const uint64_t now = state_.load();
        die("deadlock in %s (line %d): %u of %u threads arrived; the others exited or wait elsewhere", what, site,
            arrived(now), expected(now));
      }
    }
  }

  void drop() {
    const uint64_t s = state_.fetch_sub(uint64_t{1} << 32, std::memory_order_acq_rel) - (uint64_t{1} << 32);
    if (arrived(s) > 0 && arrived(s) == expected(s)) release({});
  }

 private:
  static uint32_t arrived(uint64_t s) { return static_cast<uint32_t>(s); }
  static uint32_t expected(uint64_t s) { return static_cast<uint32_t>(s >> 32); }

  // Every other thread of the phase is waiting (or gone): nothing else touches the barrier here.
  void release(const std::function<void()>& on_release) {
    if (on_release) on_release();
    state_.store(state_.load(std::memory_order_relaxed) & ~uint64_t{0xFFFFFFFF}, std::memory_order_relaxed);
    site_.store(-1, std::memory_order_relaxed);
    gen_.fetch_add(1, std::memory_order_release);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
  }

  std::atomic<uint64_t> state_{0};
  std::atomic<int> site_{-1};
  std::atomic<uint32_t> gen_{0};
  static_assert(sizeof(std::atomic<uint32_t>) == 4 && std::atomic<uint32_t>::is_always_lock_free, "futex word");
};

// State shared by the threads of the running block (one block runs at a time).
struct Block {
  int n_threads = 0, n_warps = 0;
  Barrier sync, done;
  std::unique_ptr<Barrier[]> warp_sync;
  std::unique_ptr<std::atomic<unsigned>[]> warp_alive;  // bit per lane that has not exited
  std::vector<unsigned long long> slots;                // warp exchange, 32 per warp
  std::mutex marked_mu;
  std::vector<const void*> marked;  // __shared__ variables already poisoned in this block
  std::vector<unsigned char> dyn_smem;

  int warp_size(int w) const { return std::min(32, n_threads - 32 * w); }
  unsigned full_mask(int w) const { return warp_size(w) == 32 ? 0xFFFFFFFFu : (1u << warp_size(w)) - 1u; }

  // Called with every thread of the block stopped (before the first block, and by the last thread
  // to finish a block): barriers back to full strength, shared memory poisoned again.
  void start_block() {
    sync.reset(n_threads);
    for (int w = 0; w < n_warps; ++w) {
      warp_sync[w].reset(warp_size(w));
      warp_alive[w].store(full_mask(w), std::memory_order_relaxed);
    }
    marked.clear();
    if (!dyn_smem.empty()) std::memset(dyn_smem.data(), 0xFF, dyn_smem.size());
  }
};

thread_local Block* tl_block = nullptr;
thread_local int tl_tid = 0;
thread_local cudaError_t tl_error = cudaSuccess;

Block& block() {
  if (tl_block == nullptr) die("a device intrinsic was called outside a kernel");
  return *tl_block;
}

std::map<std::string, std::pair<std::size_t, Invoker>>& registry() {
  static std::map<std::string, std::pair<std::size_t, Invoker>> r;
  return r;
}

bool valid_config(dim3 g, dim3 b, std::size_t smem) {
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  return threads >= 1 && threads <= 1024 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && g.x >= 1 &&
         g.x <= 2147483647u && g.y >= 1 && g.y <= 65535 && g.z >= 1 && g.z <= 65535 && smem <= 48 * 1024;
}

uint3 unflatten(unsigned long long i, dim3 d) {
  return uint3{static_cast<unsigned>(i % d.x), static_cast<unsigned>(i / d.x % d.y),
               static_cast<unsigned>(i / d.x / d.y)};
}

}  // namespace

void die(const char* fmt, ...) {
  std::fprintf(stderr, "cuda_host: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

void set_last_error(cudaError_t e) { tl_error = e; }

void syncthreads(int line) { block().sync.wait(line, "__syncthreads"); }

int lane_id() { return tl_tid % 32; }

unsigned active_warp_mask() { return block().warp_alive[tl_tid / 32].load(std::memory_order_relaxed); }

void warp_exchange(unsigned mask, const void* v, void* out, std::size_t bytes, int src, const char* what) {
  Block& b = block();
  const int w = tl_tid / 32, lane = tl_tid % 32;
  const unsigned alive = b.warp_alive[w].load(std::memory_order_relaxed);
  if ((mask & alive) != alive || !(mask >> lane & 1u))
    die("%s with mask 0x%08x in a warp whose live lanes are 0x%08x: only full-warp masks are modelled", what, mask,
        alive);
  if (src >= 0 && !(alive >> src & 1u)) die("%s reads lane %d, which has exited", what, src);
  unsigned long long* slot = b.slots.data() + 32 * w;
  std::memcpy(&slot[lane], v, bytes);
  b.warp_sync[w].wait(-1, what);
  std::memcpy(out, src >= 0 ? static_cast<const void*>(&slot[src]) : v, bytes);
  b.warp_sync[w].wait(-1, what);
}

unsigned warp_ballot(unsigned mask, int pred) {
  Block& b = block();
  const int w = tl_tid / 32, lane = tl_tid % 32;
  const unsigned alive = b.warp_alive[w].load(std::memory_order_relaxed);
  if ((mask & alive) != alive) die("__ballot_sync with mask 0x%08x in a warp whose live lanes are 0x%08x", mask, alive);
  unsigned long long* slot = b.slots.data() + 32 * w;
  slot[lane] = pred ? 1 : 0;
  b.warp_sync[w].wait(-1, "__ballot_sync");
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((alive >> l & 1u) && slot[l]) r |= 1u << l;
  b.warp_sync[w].wait(-1, "__ballot_sync");
  return r & mask;
}

void syncwarp() {
  Block& b = block();
  b.warp_sync[tl_tid / 32].wait(-1, "__syncwarp");
}

void shared_mark(void* p, std::size_t bytes) {
  Block& b = block();
  std::lock_guard<std::mutex> lk(b.marked_mu);
  if (std::find(b.marked.begin(), b.marked.end(), p) != b.marked.end()) return;
  std::memset(p, 0xFF, bytes);
  b.marked.push_back(p);
}

void* dynamic_shared_base() { return block().dyn_smem.data(); }

void run_grid(dim3 grid, dim3 blk, std::size_t smem, const std::function<void()>& body) {
  if (!valid_config(grid, blk, smem)) {
    set_last_error(cudaErrorInvalidConfiguration);
    return;
  }
  Block b;
  b.n_threads = static_cast<int>(blk.x * blk.y * blk.z);
  b.n_warps = (b.n_threads + 31) / 32;
  b.warp_sync = std::make_unique<Barrier[]>(b.n_warps);
  b.warp_alive = std::make_unique<std::atomic<unsigned>[]>(b.n_warps);
  b.slots.assign(32ull * b.n_warps, 0);
  b.dyn_smem.assign(smem, 0);
  b.done.reset(b.n_threads);
  b.start_block();
  const unsigned long long n_blocks = 1ull * grid.x * grid.y * grid.z;
  std::vector<std::thread> threads;
  threads.reserve(b.n_threads);
  for (int t = 0; t < b.n_threads; ++t) {
    threads.emplace_back([&b, &body, grid, blk, n_blocks, t] {
      tl_block = &b;
      tl_tid = t;
      threadIdx = unflatten(static_cast<unsigned>(t), blk);
      blockDim = blk;
      gridDim = grid;
      for (unsigned long long i = 0; i < n_blocks; ++i) {
        blockIdx = unflatten(i, grid);
        body();
        b.sync.drop();
        b.warp_alive[t / 32].fetch_and(~(1u << (t % 32)), std::memory_order_relaxed);
        b.warp_sync[t / 32].drop();
        b.done.wait(0, "the end of a block", [&b] { b.start_block(); });
      }
      tl_block = nullptr;
    });
  }
  for (std::thread& th : threads) th.join();
}

void register_launcher(const char* name, std::size_t n_args, Invoker fn) {
  registry()[name] = {n_args, std::move(fn)};
}

long long call_launcher(const char* name, const Arg* args, std::size_t n_args) {
  auto it = registry().find(name);
  if (it == registry().end()) die("no launcher named %s in this build", name);
  if (it->second.first != n_args) die("%s takes %zu arguments, got %zu", name, it->second.first, n_args);
  return it->second.second(args, n_args);
}

}  // namespace cuda_host

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_host::tl_error;
  cuda_host::tl_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cuda_host::tl_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

unsigned __ballot_sync(unsigned mask, int pred) { return cuda_host::warp_ballot(mask, pred); }
