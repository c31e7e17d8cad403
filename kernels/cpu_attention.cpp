// Attention against the paged KV cache, compiled for the CPU (float32 or bfloat16): the engine's attention on the CPU,
// for decode tokens and prefill chunks alike.
//
// Each query token t, at position p_t = query_pos[t], attends to the keys at positions max(0, p_t - window + 1) ..
// p_t, which sit in cache slots kv_index[t, position] (column j of a row is position j; the tokens of a prefill
// chunk share one row, passed with row stride 0, and the causal mask is each token's own position). For each kv head,
// the G query heads that share it are done together, so a token reads every cached key and value row of its context
// once, in place: the torch path first copies each context into a padded tensor (index_select) and then runs SDPA
// over the copy with a mask, writing and reading the whole context a second time.
//
//     scores[g, j] = scale * q[t, h_g] . K[slot_j, kvh]      (h_g = kvh * G + g)
//     out[t, h_g]  = sum_j softmax_j(scores[g]) * V[slot_j, kvh]
//
// Work items are query tokens, or runs of a token's kv heads when there are too few tokens for the threads, spread
// over torch's intra-op threads and the compiled ops' helper thread where it has a core. Keys and values are
// prefetched ahead. Against the gather + SDPA path: loadtest/RESULTS.md, "The CPU kernels' design figures" and
// "The CPU attention in AVX-512 registers".
//
// q, out and the caches share one element type, float32 or bfloat16 (a bfloat16 cache: half the bytes per token);
// scores, softmax and the weighted sum of values are computed in float32, out rounded once.

#include <ATen/core/Tensor.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "cpu_element.h"
#include "cpu_helper.h"

namespace {

constexpr int64_t kAhead = 8;  // keys prefetched ahead

using loradock::BFloat16;
using loradock::exp_approx;
using loradock::kLine;
using loradock::narrow;
using loradock::widen;

#ifdef __AVX512F__
// 16 elements as float32 lanes (a bfloat16 is float32's upper half)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

// Lane i of the result: the sum of the 16 lanes of v[i]. Four rounds, each adding pairs of vectors after a shuffle
// that lines up halves of their partial sums (15 shuffle pairs and adds instead of 16 sums across lanes); the last
// round leaves lane 4l + q holding v[4q + l]'s sum, put in order by one permutation.
inline __m512 sum_lanes_16(const __m512 (&v)[16]) {
  __m512 halves[8], quarters[4], pairs[2];
  for (int i = 0; i < 8; ++i)  // v[2i]'s partial sums in 128-bit lanes 0-1, v[2i + 1]'s in 2-3
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane q: v[4i + q]'s four partial sums
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // in lane q: v[8i + q]'s two partial sums in slots 0 and 2, v[8i + 4 + q]'s in 1 and 3
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(quarters[2 * i], quarters[2 * i + 1]),
                             _mm512_unpackhi_ps(quarters[2 * i], quarters[2 * i + 1]));
  const __m512 sums = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(pairs[0]), _mm512_castps_pd(pairs[1]))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(pairs[0]), _mm512_castps_pd(pairs[1]))));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}
#endif

// One call's work: items of a query token's kv heads in runs, each a tile any thread may run (they write disjoint
// heads of out). There are enough runs per token for the threads to share: torch's, plus the compiled ops' helper
// thread where it has a core (cpu_helper.h; reading a long context is bound by memory, and two cores read it about
// twice as fast as one).
template <typename T>
class CachedAttention final : public loradock::Tiles {
 public:
  CachedAttention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& kv_index, const int64_t* positions, float scale, int64_t window, int64_t threads)
      : tokens_(q.size(0)), D_(q.size(2)), Hkv_(k_cache.size(1)), G_(q.size(1) / Hkv_),
        q_(q.data_ptr<T>()), q_row_(q.stride(0)), q_head_(q.stride(1)), out_(out.data_ptr<T>()),
        out_row_(out.stride(0)), out_head_(out.stride(1)), k_(k_cache.data_ptr<T>()), v_(v_cache.data_ptr<T>()),
        index_(kv_index.data_ptr<int64_t>()), index_row_(kv_index.stride(0)), positions_(positions),
        row_stride_(k_cache.stride(0)), head_stride_(k_cache.stride(1)), scale_(scale), window_(window) {
    // a token's kv heads in `chunks_` runs: a whole cache row ([Hkv, D], contiguous) read at once when there are
    // enough tokens to keep the threads busy, the heads split when there are not
    const int64_t wanted = std::min<int64_t>(Hkv_, (4 * threads + tokens_ - 1) / tokens_);  // runs per token
    per_chunk_ = (Hkv_ + wanted - 1) / wanted;  // kv heads per run
    chunks_ = (Hkv_ + per_chunk_ - 1) / per_chunk_;  // runs per token, none of them empty
  }

  int64_t num_tiles() const override { return tokens_ * chunks_; }

  void run_tile(int64_t item) const override {
    thread_local std::vector<float> scores, queries, totals;  // [heads, keys], [heads, D], [heads]
    const int64_t t = item / chunks_;
    const int64_t kv_first = (item % chunks_) * per_chunk_, kv_end = std::min(Hkv_, kv_first + per_chunk_);
    const int64_t heads = (kv_end - kv_first) * G_;  // query heads kv_first * G .. kv_end * G - 1
    const int64_t last = positions_[t];
    const int64_t first = window_ > 0 ? std::max<int64_t>(0, last - window_ + 1) : 0;
    const Item work{index_ + t * index_row_ + first, last - first + 1, kv_first, heads,
                       (kv_end - kv_first - 1) * head_stride_ + D_};
    scores.resize(heads * work.keys);
    queries.resize(heads * D_);
    totals.resize(heads);
    const T* qs = q_ + t * q_row_ + kv_first * G_ * q_head_;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < D_; ++d) queries[h * D_ + d] = widen(qs[h * q_head_ + d]);
    T* out = out_ + t * out_row_ + kv_first * G_ * out_head_;
#ifdef __AVX512F__
    if (D_ % kVectorHead == 0) {
      score_blocks(work, queries.data(), scores.data());
      softmax(work, scores.data(), totals.data());
      weigh_values_vectors(work, scores.data(), totals.data(), out);
      return;
    }
#endif
    score_keys(work, queries.data(), scores.data());
    softmax(work, scores.data(), totals.data());
    weigh_values(work, scores.data(), totals.data(), out);
  }

 private:
  struct Item {  // one work item: a query token's run of kv heads
    const int64_t* slots;  // [keys] the cache slot of each key it attends to
    int64_t keys;
    int64_t kv_first;  // its first kv head
    int64_t heads;     // its query heads: kv_first * G .. kv_first * G + heads - 1
    int64_t span;      // elements of a cache row it reads
  };

  const T* row_of(const T* cache, const Item& item, int64_t j) const {  // key j's row from the item's first kv head
    return cache + item.slots[j] * row_stride_ + item.kv_first * head_stride_;
  }
  int64_t kv_of(int64_t h) const { return (h / G_) * head_stride_; }  // query head h's kv head within a row
  void prefetch_row(const T* cache, const Item& item, int64_t j) const {
    const T* row = row_of(cache, item, j);
    for (int64_t f = 0; f < item.span; f += kLine<T>) __builtin_prefetch(row + f, 0, 3);  // one 64-byte line each
  }
  // Before key j's row is read: the rows kAhead keys on (at the first key, the first kAhead as well), as consecutive
  // keys sit in cache blocks scattered over memory.
  void prefetch_ahead(const T* cache, const Item& item, int64_t j) const {
    if (j == 0)
      for (int64_t i = 0; i < std::min<int64_t>(kAhead, item.keys); ++i) prefetch_row(cache, item, i);
    if (j + kAhead < item.keys) prefetch_row(cache, item, j + kAhead);
  }

  // scores[h, j] = scale * q_h . K_j
  void score_keys(const Item& item, const float* queries, float* scores) const {
    for (int64_t j = 0; j < item.keys; ++j) {
      prefetch_ahead(k_, item, j);
      const T* k_row = row_of(k_, item, j);
      for (int64_t h = 0; h < item.heads; ++h) {
        const T* __restrict k = k_row + kv_of(h);
        const float* __restrict qh = queries + h * D_;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D_; ++d) s += qh[d] * widen(k[d]);
        scores[h * item.keys + j] = s * scale_;
      }
    }
  }

  // each row of scores [heads, keys] -> its exponentials less the row's largest score; totals[h]: their sum
  void softmax(const Item& item, float* scores, float* totals) const {
    for (int64_t h = 0; h < item.heads; ++h) {
      float* row = scores + h * item.keys;
      const float top = *std::max_element(row, row + item.keys);
      for (int64_t j = 0; j < item.keys; ++j) row[j] = exp_approx(row[j] - top);  // vectorised: libm's expf is not
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < item.keys; ++j) total += row[j];
      totals[h] = total;
    }
  }

  // out[h] = sum_j scores[h, j] * V_j / totals[h]
  void weigh_values(const Item& item, const float* scores, const float* totals, T* out) const {
    thread_local std::vector<float> acc;  // [heads, D]
    acc.assign(item.heads * D_, 0.f);
    for (int64_t j = 0; j < item.keys; ++j) {
      prefetch_ahead(v_, item, j);
      const T* v_row = row_of(v_, item, j);
      for (int64_t h = 0; h < item.heads; ++h) {
        const T* __restrict v = v_row + kv_of(h);
        float* __restrict a = acc.data() + h * D_;
        const float p = scores[h * item.keys + j];
#pragma omp simd
        for (int64_t d = 0; d < D_; ++d) a[d] += p * widen(v[d]);
      }
    }
    for (int64_t h = 0; h < item.heads; ++h) {
      T* __restrict o = out + h * out_head_;
      const float inverse = 1.f / totals[h];
      for (int64_t d = 0; d < D_; ++d) o[d] = narrow<T>(acc[h * D_ + d] * inverse);
    }
  }

#ifdef __AVX512F__
  // The same two products in AVX-512 registers, for head dimensions that are multiples of kVectorHead: the loops
  // above spend a horizontal sum per key and head, and keep the weighted sums in memory, so they run at a fraction of
  // the bandwidth two cores have.
  static constexpr int64_t kVectorHead = 64;  // a head's slice of a value row: four vectors

  // Scores for blocks of 16 keys: a head's 16 dot products as 16 vector sums, summed across lanes together
  // (sum_lanes_16); the next block's rows prefetched while this one is scored.
  void score_blocks(const Item& item, const float* queries, float* scores) const {
    const __m512 scale = _mm512_set1_ps(scale_);
    for (int64_t j = 0; j < std::min<int64_t>(16, item.keys); ++j) prefetch_row(k_, item, j);
    for (int64_t j0 = 0; j0 < item.keys; j0 += 16) {
      const int64_t n = std::min<int64_t>(16, item.keys - j0);
      for (int64_t j = j0 + 16; j < std::min(j0 + 32, item.keys); ++j) prefetch_row(k_, item, j);
      const T* rows[16];
      for (int64_t i = 0; i < 16; ++i) rows[i] = row_of(k_, item, j0 + std::min(i, n - 1));  // a short block repeats
      for (int64_t h = 0; h < item.heads; ++h) {
        __m512 sums[16];
        for (int i = 0; i < 16; ++i) sums[i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < D_; c += 16) {
          const __m512 q = _mm512_loadu_ps(queries + h * D_ + c);
          for (int i = 0; i < 16; ++i) sums[i] = _mm512_fmadd_ps(q, load16(rows[i] + kv_of(h) + c), sums[i]);
        }
        const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
        _mm512_mask_storeu_ps(scores + h * item.keys + j0, lanes, _mm512_mul_ps(sum_lanes_16(sums), scale));
      }
    }
  }

  // out[h] = sum_j scores[h, j] * V_j / totals[h], four heads of a kv head at a time, their 64-wide slices of the
  // weighted sum in registers while the keys stream by.
  void weigh_values_vectors(const Item& item, const float* scores, const float* totals, T* out) const {
    bool first_pass = true;
    for (int64_t kv = 0; kv < item.heads / G_; ++kv)
      for (int64_t c = 0; c < D_; c += kVectorHead)
        for (int64_t g = 0; g < G_; g += 4) {
          const int64_t h = kv * G_ + g;
          switch (std::min<int64_t>(4, G_ - g)) {
            case 4: weigh_slice<4>(item, scores, totals, out, h, c, first_pass); break;
            case 3: weigh_slice<3>(item, scores, totals, out, h, c, first_pass); break;
            case 2: weigh_slice<2>(item, scores, totals, out, h, c, first_pass); break;
            default: weigh_slice<1>(item, scores, totals, out, h, c, first_pass); break;
          }
          first_pass = false;
        }
  }

  // heads h .. h + NG - 1 (one kv head's), columns c .. c + 63; the first pass over the keys prefetches their rows
  template <int NG>
  void weigh_slice(const Item& item, const float* scores, const float* totals, T* out, int64_t h, int64_t c,
                   bool prefetch) const {
    __m512 acc[NG][4];
    for (int g = 0; g < NG; ++g)
      for (int x = 0; x < 4; ++x) acc[g][x] = _mm512_setzero_ps();
    const int64_t offset = kv_of(h) + c;
    for (int64_t j = 0; j < item.keys; ++j) {
      if (prefetch) prefetch_ahead(v_, item, j);
      const T* v = row_of(v_, item, j) + offset;
      const __m512 values[4] = {load16(v), load16(v + 16), load16(v + 32), load16(v + 48)};
      for (int g = 0; g < NG; ++g) {
        const __m512 p = _mm512_set1_ps(scores[(h + g) * item.keys + j]);
        for (int x = 0; x < 4; ++x) acc[g][x] = _mm512_fmadd_ps(p, values[x], acc[g][x]);
      }
    }
    for (int g = 0; g < NG; ++g) {
      alignas(64) float slice[kVectorHead];
      const __m512 inverse = _mm512_set1_ps(1.f / totals[h + g]);
      for (int x = 0; x < 4; ++x) _mm512_store_ps(slice + 16 * x, _mm512_mul_ps(acc[g][x], inverse));
      T* __restrict o = out + (h + g) * out_head_ + c;
      for (int64_t d = 0; d < kVectorHead; ++d) o[d] = narrow<T>(slice[d]);
    }
  }
#endif

  int64_t tokens_, D_, Hkv_, G_;
  const T* q_;
  int64_t q_row_, q_head_;
  T* out_;
  int64_t out_row_, out_head_;
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

void cached_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                      at::Tensor kv_index, at::Tensor query_pos, double scale, int64_t window) {
  // out, q: [T, H, D]; k_cache, v_cache: [slots, Hkv, D]; kv_index: [T, L] int64 (a prefill chunk's one row
  // expanded, stride 0); query_pos: [T] int64; window <= 0: no sliding window
  const at::ScalarType type = q.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kBFloat16) && out.scalar_type() == type &&
                  k_cache.scalar_type() == type && v_cache.scalar_type() == type,
              "the CPU attention takes q, out and the caches all float32 or all bfloat16");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "the CPU attention needs unit stride along head_dim");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "the key and value caches must have one shape and layout");
  TORCH_CHECK(kv_index.dtype() == at::kLong && kv_index.stride(1) == 1 && query_pos.dtype() == at::kLong,
              "kv_index and query_pos must be int64, kv_index rows contiguous");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(2) == D, "query heads must be a multiple of kv heads, same head_dim");
  TORCH_CHECK(out.sizes() == q.sizes() && kv_index.size(0) == T && query_pos.numel() == T && query_pos.is_contiguous(),
              "one kv_index row and one position per query token");
  const int64_t* positions = query_pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(positions[t] >= 0 && positions[t] < kv_index.size(1),
                "query position outside the token's kv_index row");
  if (T == 0) return;
  const float fscale = static_cast<float>(scale);
  const bool helper = loradock::helper_has_a_cpu();
  loradock::with_element_type(type, [&](auto element) {
    const CachedAttention<decltype(element)> call(out, q, k_cache, v_cache, kv_index, positions, fscale, window,
                                                  at::get_num_threads() + (helper ? 1 : 0));
    if (helper)
      loradock::TileHelper::instance().run_alongside(call, [] {});
    else
      call.run_all();
  });
}
