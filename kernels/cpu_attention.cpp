// Decode attention against the paged KV cache, compiled for the CPU (fp32): the engine's attention for decode
// tokens when it serves on the CPU.
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
// Work items are (sequence, kv head) pairs spread over torch's intra-op threads.

#include <ATen/core/Tensor.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

void decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                      at::Tensor kv_index, at::Tensor query_pos, double scale, int64_t window) {
  // out, q: [B, H, D]; k_cache, v_cache: [slots, Hkv, D]; kv_index: [B, L] int64; query_pos: [B] int64;
  // window <= 0: no sliding window
  TORCH_CHECK(q.dtype() == at::kFloat && out.dtype() == at::kFloat && k_cache.dtype() == at::kFloat &&
                  v_cache.dtype() == at::kFloat,
              "the CPU decode attention takes float32");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "the CPU decode attention needs unit stride along head_dim");
  TORCH_CHECK(kv_index.dtype() == at::kLong && kv_index.stride(1) == 1 && query_pos.dtype() == at::kLong,
              "kv_index and query_pos must be int64, kv_index rows contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(2) == D, "query heads must be a multiple of kv heads, same head_dim");
  const int64_t G = H / Hkv, L = kv_index.size(1);
  const int64_t* positions = query_pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(positions[b] >= 0 && positions[b] < L, "query position outside the sequence's kv_index row");
  const float* q_data = q.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const float* k_data = k_cache.data_ptr<float>();
  const float* v_data = v_cache.data_ptr<float>();
  const int64_t* index_data = kv_index.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * L);  // [G, keys]
    std::vector<float> acc(G * D);     // [G, D]
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, kvh = item % Hkv;
      const int64_t last = positions[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t keys = last - first + 1;
      const int64_t* slots = index_data + b * kv_index.stride(0) + first;
      const float* qs = q_data + b * q.stride(0) + kvh * G * q.stride(1);

      for (int64_t j = 0; j < keys; ++j) {
        const float* __restrict k = k_data + slots[j] * k_cache.stride(0) + kvh * k_cache.stride(1);
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict qg = qs + g * q.stride(1);
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * k[d];
          scores[g * keys + j] = s * fscale;
        }
      }
      std::vector<float> totals(G);
      for (int64_t g = 0; g < G; ++g) {
        float* row = scores.data() + g * keys;
        const float top = *std::max_element(row, row + keys);
        float total = 0.f;
        for (int64_t j = 0; j < keys; ++j) total += row[j] = std::exp(row[j] - top);
        totals[g] = total;
      }

      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < keys; ++j) {
        const float* __restrict v = v_data + slots[j] * v_cache.stride(0) + kvh * v_cache.stride(1);
        for (int64_t g = 0; g < G; ++g) {
          float* __restrict a = acc.data() + g * D;
          const float p = scores[g * keys + j];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* __restrict o = out_data + b * out.stride(0) + (kvh * G + g) * out.stride(1);
        const float inverse = 1.f / totals[g];
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inverse;
      }
    }
  });
}
