// Decode attention against the paged KV cache, compiled for the CPU (float32 or bfloat16): the engine's attention
// for decode tokens when it serves on the CPU.
//
// Each decode sequence b has one query token at position p_b = query_pos[b] and attends to the keys at positions
// max(0, p_b - window + 1) .. p_b, which sit in cache slots kv_index[b, position] (column j of a decode row is
// position j). For each kv head, the G query heads that share it are done together, so every cached key and value
// row is read once per step, in place: the torch path first copies each sequence's context into a padded tensor
// (index_select) and then runs SDPA over the copy, writing and reading the whole context a second time.
//
//     scores[g, j] = scale * q[b, h_g] . K[slot_j, kvh]      (h_g = kvh * G + g)
//     out[b, h_g]  = sum_j softmax_j(scores[g]) * V[slot_j, kvh]
//
// Work items are sequences, or runs of a sequence's kv heads when there are too few sequences for the threads,
// spread over torch's intra-op threads and the compiled ops' helper thread where it has a core. Keys and values are prefetched a few keys ahead. Against the gather + SDPA
// path: loadtest/RESULTS.md, "The CPU kernels' design figures".
//
// q, out and the caches share one element type, float32 or bfloat16 (a bfloat16 cache: half the bytes per token);
// scores, softmax and the weighted sum of values are computed in float32, out rounded once.

#include <ATen/core/Tensor.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_element.h"
#include "cpu_helper.h"

namespace {

constexpr int64_t kAhead = 8;  // keys prefetched ahead

using loradock::exp_approx;
using loradock::kLine;
using loradock::narrow;
using loradock::widen;

// One call's work: items of a sequence's kv heads in runs, each a tile any thread may run (they write disjoint
// heads of out). There are enough runs per sequence for the threads to share: torch's, plus the compiled ops' helper
// thread where it has a core (cpu_helper.h; reading a long context is bound by memory, and two cores read it about
// twice as fast as one).
template <typename T>
class DecodeAttention final : public loradock::Tiles {
 public:
  DecodeAttention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& kv_index, const int64_t* positions, float scale, int64_t window, int64_t threads)
      : B_(q.size(0)), D_(q.size(2)), Hkv_(k_cache.size(1)), G_(q.size(1) / Hkv_),
        q_(q.data_ptr<T>()), q_seq_(q.stride(0)), q_head_(q.stride(1)), out_(out.data_ptr<T>()),
        out_seq_(out.stride(0)), out_head_(out.stride(1)), k_(k_cache.data_ptr<T>()), v_(v_cache.data_ptr<T>()),
        index_(kv_index.data_ptr<int64_t>()), index_row_(kv_index.stride(0)), positions_(positions),
        row_stride_(k_cache.stride(0)), head_stride_(k_cache.stride(1)), scale_(scale), window_(window) {
    // a sequence's kv heads in `chunks_` runs: a whole cache row ([Hkv, D], contiguous) read at once when there are
    // enough sequences to keep the threads busy, the heads split when there are not
    const int64_t wanted = std::min<int64_t>(Hkv_, (4 * threads + B_ - 1) / B_);  // runs per sequence
    per_chunk_ = (Hkv_ + wanted - 1) / wanted;  // kv heads per run
    chunks_ = (Hkv_ + per_chunk_ - 1) / per_chunk_;  // runs per sequence, none of them empty
  }

  int64_t num_tiles() const override { return B_ * chunks_; }

  void run_tile(int64_t item) const override {
    thread_local std::vector<float> scores, acc, queries, totals;  // [heads, keys], [heads, D], [heads, D], [heads]
    const int64_t b = item / chunks_;
    const int64_t kv_first = (item % chunks_) * per_chunk_, kv_end = std::min(Hkv_, kv_first + per_chunk_);
    const int64_t heads = (kv_end - kv_first) * G_;  // query heads kv_first * G .. kv_end * G - 1
    const int64_t last = positions_[b];
    const int64_t first = window_ > 0 ? std::max<int64_t>(0, last - window_ + 1) : 0;
    const int64_t keys = last - first + 1;
    scores.resize(heads * keys);
    acc.assign(heads * D_, 0.f);
    queries.resize(heads * D_);
    totals.resize(heads);
    const int64_t* slots = index_ + b * index_row_ + first;
    const T* qs = q_ + b * q_seq_ + kv_first * G_ * q_head_;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < D_; ++d) queries[h * D_ + d] = widen(qs[h * q_head_ + d]);
    auto kv_of = [&](int64_t h) { return (h / G_) * head_stride_; };  // query head h's kv head in a cache row

    // keys are prefetched kAhead ahead: consecutive keys sit in cache blocks scattered over memory
    const int64_t span = (kv_end - kv_first - 1) * head_stride_ + D_;  // elements of a row the item reads
    auto row_of = [&](const T* cache, int64_t j) { return cache + slots[j] * row_stride_ + kv_first * head_stride_; };
    auto prefetch_row = [&](const T* cache, int64_t j) {
      const T* row = row_of(cache, j);
      for (int64_t f = 0; f < span; f += kLine<T>) __builtin_prefetch(row + f, 0, 3);  // one 64-byte line each
    };
    for (int64_t j = 0; j < std::min<int64_t>(kAhead, keys); ++j) prefetch_row(k_, j);
    for (int64_t j = 0; j < keys; ++j) {
      if (j + kAhead < keys) prefetch_row(k_, j + kAhead);
      const T* k_row = row_of(k_, j);
      for (int64_t h = 0; h < heads; ++h) {
        const T* __restrict k = k_row + kv_of(h);
        const float* __restrict qh = queries.data() + h * D_;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D_; ++d) s += qh[d] * widen(k[d]);
        scores[h * keys + j] = s * scale_;
      }
    }
    for (int64_t j = 0; j < std::min<int64_t>(kAhead, keys); ++j) prefetch_row(v_, j);
    for (int64_t h = 0; h < heads; ++h) {
      float* row = scores.data() + h * keys;
      const float top = *std::max_element(row, row + keys);
      for (int64_t j = 0; j < keys; ++j) row[j] = exp_approx(row[j] - top);  // vectorised: libm's expf is not
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < keys; ++j) total += row[j];
      totals[h] = total;
    }
    for (int64_t j = 0; j < keys; ++j) {
      if (j + kAhead < keys) prefetch_row(v_, j + kAhead);
      const T* v_row = row_of(v_, j);
      for (int64_t h = 0; h < heads; ++h) {
        const T* __restrict v = v_row + kv_of(h);
        float* __restrict a = acc.data() + h * D_;
        const float p = scores[h * keys + j];
#pragma omp simd
        for (int64_t d = 0; d < D_; ++d) a[d] += p * widen(v[d]);
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      T* __restrict o = out_ + b * out_seq_ + (kv_first * G_ + h) * out_head_;
      const float inverse = 1.f / totals[h];
      for (int64_t d = 0; d < D_; ++d) o[d] = narrow<T>(acc[h * D_ + d] * inverse);
    }
  }

 private:
  int64_t B_, D_, Hkv_, G_;
  const T* q_;
  int64_t q_seq_, q_head_;
  T* out_;
  int64_t out_seq_, out_head_;
  const T* k_;
  const T* v_;
  const int64_t* index_;
  int64_t index_row_;
  const int64_t* positions_;
  int64_t row_stride_, head_stride_;  // the same for v_cache
  float scale_;
  int64_t window_;
  int64_t per_chunk_ = 1, chunks_ = 1;
};

}  // namespace

void decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                      at::Tensor kv_index, at::Tensor query_pos, double scale, int64_t window) {
  // out, q: [B, H, D]; k_cache, v_cache: [slots, Hkv, D]; kv_index: [B, L] int64; query_pos: [B] int64;
  // window <= 0: no sliding window
  const at::ScalarType type = q.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kBFloat16) && out.scalar_type() == type &&
                  k_cache.scalar_type() == type && v_cache.scalar_type() == type,
              "the CPU decode attention takes q, out and the caches all float32 or all bfloat16");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "the CPU decode attention needs unit stride along head_dim");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "the key and value caches must have one shape and layout");
  TORCH_CHECK(kv_index.dtype() == at::kLong && kv_index.stride(1) == 1 && query_pos.dtype() == at::kLong,
              "kv_index and query_pos must be int64, kv_index rows contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(2) == D, "query heads must be a multiple of kv heads, same head_dim");
  const int64_t* positions = query_pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(positions[b] >= 0 && positions[b] < kv_index.size(1),
                "query position outside the sequence's kv_index row");
  if (B == 0) return;
  const float fscale = static_cast<float>(scale);
  const bool helper = loradock::helper_has_a_cpu();
  loradock::with_element_type(type, [&](auto element) {
    const DecodeAttention<decltype(element)> call(out, q, k_cache, v_cache, kv_index, positions, fscale, window,
                                                  at::get_num_threads() + (helper ? 1 : 0));
    if (helper)
      loradock::TileHelper::instance().run_alongside(call, [] {});
    else
      call.run_all();
  });
}
