// The helper thread of the compiled CPU ops: a second thread that runs numbered work items (tiles) alongside the
// caller, on the core torch's compute threads leave to the event loop. The gathered-LoRA kernel (cpu_lora.cpp) and
// the chunked base linear (cpu_linear.cpp) hand it their tiles; one instance per process.

#pragma once

#include <ATen/Parallel.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace loradock {

// What the helper thread runs: numbered tiles that any thread may run, each once.
class Tiles {
 public:
  virtual ~Tiles() = default;
  virtual int64_t num_tiles() const = 0;
  virtual void run_tile(int64_t tile) const = 0;

  // Every tile, spread over torch's intra-op threads.
  void run_all() const {
    at::parallel_for(0, num_tiles(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) run_tile(tile);
    });
  }
};

// A second thread that runs a call's tiles while the caller runs the base GEMM, so the LoRA work, which mostly
// waits on its weights from memory, overlaps the GEMM instead of following it. Tiles are claimed one at a time
// from one atomic word, [job:16 | tiles:24 | next tile:24], by the helper and, once the GEMM is done, by the
// caller too: the caller never waits for the helper to wake up, only for a tile the helper has started.
//
// The helper runs at idle priority (SCHED_IDLE on Linux): it takes only cycles no other thread wants, so the
// core it shares with the server's event loop and the clients stays theirs. Between jobs it spins for up to
// kSpin (the LoRA layers of one forward pass come tens to hundreds of microseconds apart, and waking a sleeping
// thread costs the caller more than spinning costs the idle core), then sleeps until the next job.
// A caller whose last tile is still on the helper spins for up to kCallerSpin, then sleeps too: if something
// else has the helper's core, the caller's own, now idle core lets the scheduler move the helper there.
class TileHelper {
 public:
  static constexpr int64_t kMaxTiles = (int64_t{1} << 24) - 1;

  static TileHelper& instance() {
    static TileHelper* helper = [] {
      pthread_atfork(nullptr, nullptr, [] { forked_ = true; });  // a forked child has no helper thread
      return new TileHelper();  // never destroyed: its detached thread may outlive static destruction
    }();
    return *helper;
  }

  // Runs call's tiles, part on the helper, while `meanwhile` runs on the caller; returns once all are done.
  template <typename F>
  void run_alongside(const Tiles& call, F&& meanwhile) {
    std::unique_lock<std::mutex> caller(caller_, std::try_to_lock);
    const int64_t tiles = call.num_tiles();
    if (!caller.owns_lock() || forked_ || tiles == 0 || tiles > kMaxTiles) {  // e.g. another caller has it
      meanwhile();
      call.run_all();
      return;
    }
    job_ = &call;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t job = (job_of(state_.load(std::memory_order_relaxed)) + 1) & 0xffff;
    state_.store(job << 48 | static_cast<uint64_t>(tiles) << 24, std::memory_order_seq_cst);
    if (helper_sleeping_.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_helper_.notify_one();
    }
    try {
      meanwhile();
    } catch (...) {
      finish(tiles);  // the helper may be running a tile of `call`: let it end before call goes away
      throw;
    }
    finish(tiles);
  }

 private:
  TileHelper() { std::thread([this] { serve(); }).detach(); }

  static uint64_t job_of(uint64_t state) { return state >> 48; }
  static int64_t tiles_of(uint64_t state) { return (state >> 24) & 0xffffff; }
  static int64_t next_of(uint64_t state) { return state & 0xffffff; }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  // Spins until done() or for `spin`, then sleeps on `wake` under mutex_ (flagged in `sleeping`) until done().
  template <typename Done>
  void wait_until(Done&& done, std::chrono::microseconds spin, std::atomic<bool>& sleeping,
                  std::condition_variable& wake) {
    const auto spin_until = std::chrono::steady_clock::now() + spin;
    while (!done()) {
      if (std::chrono::steady_clock::now() < spin_until) {
        pause();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      sleeping.store(true, std::memory_order_seq_cst);
      wake.wait(lock, done);
      sleeping.store(false, std::memory_order_relaxed);
    }
  }

  // The caller's part: the tiles nobody has claimed (on torch's intra-op threads), then a wait for those the
  // helper is running.
  void finish(int64_t tiles) {
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      while (claim_and_run()) {
      }
    });
    wait_until([&] { return done_.load(std::memory_order_seq_cst) == tiles; }, kCallerSpin, caller_sleeping_,
               wake_caller_);
  }

  // Claims the current job's next tile and runs it; false when none is left.
  bool claim_and_run() {
    uint64_t state = state_.load(std::memory_order_acquire);
    while (next_of(state) < tiles_of(state)) {
      if (state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) {
        job_->run_tile(next_of(state));
        done_.fetch_add(1, std::memory_order_seq_cst);
        return true;
      }
    }
    return false;
  }

  void serve() {
    at::init_num_threads();  // this thread's OpenMP team size from torch's setting: the GEMMs it runs stay on it
#ifdef __linux__
    sched_param idle{};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &idle);  // best effort: without it the helper still works
#endif
    uint64_t seen = job_of(state_.load(std::memory_order_acquire));
    for (;;) {
      wait_until([&] { return job_of(state_.load(std::memory_order_seq_cst)) != seen; }, kSpin, helper_sleeping_,
                 wake_helper_);
      seen = job_of(state_.load(std::memory_order_acquire));
      bool ran = false;
      while (claim_and_run()) ran = true;
      if (ran && caller_sleeping_.load(std::memory_order_seq_cst)) {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_caller_.notify_one();
      }
    }
  }

  static constexpr std::chrono::microseconds kSpin{1000};
  static constexpr std::chrono::microseconds kCallerSpin{20};
  static inline bool forked_ = false;
  std::mutex caller_;  // one caller at a time owns the job slot
  const Tiles* job_ = nullptr;  // published by the release of state_, valid until done_ reaches its tiles
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::mutex mutex_;  // guards the sleeps below
  std::atomic<bool> helper_sleeping_{false}, caller_sleeping_{false};
  std::condition_variable wake_helper_, wake_caller_;
};

// CPUs the calling thread may run on.
inline int64_t usable_cpus() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}


// Whether torch's compute threads leave a CPU to the helper thread.
inline bool helper_has_a_cpu() {
  static const int64_t cpus = usable_cpus();  // those of the first caller, the engine thread
  return at::get_num_threads() < cpus;
}

// Runs call's tiles on the caller and, where there are several and torch's compute threads leave a CPU free, on the
// helper thread too; else one after another on the caller (each, say a GEMM, free to use all of torch's threads).
inline void run_with_helper(const Tiles& call) {
  if (call.num_tiles() > 1 && helper_has_a_cpu()) {
    TileHelper::instance().run_alongside(call, [] {});
    return;
  }
  for (int64_t tile = 0; tile < call.num_tiles(); ++tile) call.run_tile(tile);
}

// Several jobs run as one: the first's tiles, then the second's, and so on.
class TilesList final : public Tiles {
 public:
  explicit TilesList(std::vector<const Tiles*> jobs) : jobs_(std::move(jobs)), first_tile_{0} {
    for (const Tiles* job : jobs_) first_tile_.push_back(first_tile_.back() + job->num_tiles());
  }
  int64_t num_tiles() const override { return first_tile_.back(); }
  void run_tile(int64_t tile) const override {
    const size_t job = std::upper_bound(first_tile_.begin(), first_tile_.end(), tile) - first_tile_.begin() - 1;
    jobs_[job]->run_tile(tile - first_tile_[job]);
  }

 private:
  std::vector<const Tiles*> jobs_;
  std::vector<int64_t> first_tile_;  // [jobs + 1]
};

}  // namespace loradock
