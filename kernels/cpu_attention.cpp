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
// spread over torch's intra-op threads. Keys and values are prefetched a few keys ahead. Against the gather + SDPA
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

namespace {

constexpr int64_t kAhead = 8;  // keys prefetched ahead

using loradock::kLine;
using loradock::narrow;
using loradock::widen;

template <typename T>
void attend(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& kv_index, const int64_t* positions, float scale, int64_t window) {
  const int64_t B = q.size(0), D = q.size(2), Hkv = k_cache.size(1);
  const int64_t G = q.size(1) / Hkv, L = kv_index.size(1);
  const T* q_data = q.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const T* k_data = k_cache.data_ptr<T>();
  const T* v_data = v_cache.data_ptr<T>();
  const int64_t* index_data = kv_index.data_ptr<int64_t>();
  const int64_t row_stride = k_cache.stride(0), head_stride = k_cache.stride(1);  // the same for v_cache

  // Work items: a sequence's kv heads in `chunks` runs, so a whole cache row ([Hkv, D], contiguous) is read at once
  // when there are enough sequences to keep the threads busy, and the heads are split when there are not.
  const int64_t wanted = std::min<int64_t>(Hkv, (4 * at::get_num_threads() + B - 1) / B);  // runs per sequence
  const int64_t per_chunk = (Hkv + wanted - 1) / wanted;  // kv heads per run
  const int64_t chunks = (Hkv + per_chunk - 1) / per_chunk;  // runs per sequence, none of them empty

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(per_chunk * G * L);  // [heads of the item, keys]
    std::vector<float> acc(per_chunk * G * D);     // [heads of the item, D]
    std::vector<float> queries(per_chunk * G * D);  // [heads of the item, D]: the item's queries in float32
    std::vector<float> totals(per_chunk * G);
    std::vector<int64_t> kv_of(per_chunk * G);  // where the item's query head h finds its kv head in a cache row
    for (int64_t h = 0; h < per_chunk * G; ++h) kv_of[h] = (h / G) * head_stride;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t kv_first = (item % chunks) * per_chunk, kv_end = std::min(Hkv, kv_first + per_chunk);
      const int64_t heads = (kv_end - kv_first) * G;  // query heads kv_first * G .. kv_end * G - 1
      const int64_t last = positions[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t keys = last - first + 1;
      const int64_t* slots = index_data + b * kv_index.stride(0) + first;
      const T* qs = q_data + b * q.stride(0) + kv_first * G * q.stride(1);
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < D; ++d) queries[h * D + d] = widen(qs[h * q.stride(1) + d]);

      // keys are prefetched kAhead ahead: consecutive keys sit in cache blocks scattered over memory
      const int64_t span = (kv_end - kv_first - 1) * head_stride + D;  // elements of a row the item reads
      auto row_of = [&](const T* cache, int64_t j) { return cache + slots[j] * row_stride + kv_first * head_stride; };
      auto prefetch_row = [&](const T* cache, int64_t j) {
        const T* row = row_of(cache, j);
        for (int64_t f = 0; f < span; f += kLine<T>) __builtin_prefetch(row + f, 0, 3);  // one 64-byte line each
      };
      for (int64_t j = 0; j < std::min<int64_t>(kAhead, keys); ++j) prefetch_row(k_data, j);
      for (int64_t j = 0; j < keys; ++j) {
        if (j + kAhead < keys) prefetch_row(k_data, j + kAhead);
        const T* k_row = row_of(k_data, j);
        for (int64_t h = 0; h < heads; ++h) {
          const T* __restrict k = k_row + kv_of[h];
          const float* __restrict qh = queries.data() + h * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qh[d] * widen(k[d]);
          scores[h * keys + j] = s * scale;
        }
      }
      for (int64_t j = 0; j < std::min<int64_t>(kAhead, keys); ++j) prefetch_row(v_data, j);
      for (int64_t h = 0; h < heads; ++h) {
        float* row = scores.data() + h * keys;
        const float top = *std::max_element(row, row + keys);
        float total = 0.f;
        for (int64_t j = 0; j < keys; ++j) total += row[j] = std::exp(row[j] - top);
        totals[h] = total;
      }

      std::fill(acc.begin(), acc.begin() + heads * D, 0.f);
      for (int64_t j = 0; j < keys; ++j) {
        if (j + kAhead < keys) prefetch_row(v_data, j + kAhead);
        const T* v_row = row_of(v_data, j);
        for (int64_t h = 0; h < heads; ++h) {
          const T* __restrict v = v_row + kv_of[h];
          float* __restrict a = acc.data() + h * D;
          const float p = scores[h * keys + j];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * widen(v[d]);
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* __restrict o = out_data + b * out.stride(0) + (kv_first * G + h) * out.stride(1);
        const float inverse = 1.f / totals[h];
        for (int64_t d = 0; d < D; ++d) o[d] = narrow<T>(acc[h * D + d] * inverse);
      }
    }
  });
}

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
  loradock::with_element_type(type, [&](auto element) {
    attend<decltype(element)>(out, q, k_cache, v_cache, kv_index, positions, fscale, window);
  });
}
