// The gathered-LoRA op compiled for the CPU (fp32): the engine's LoRA path when it serves on the CPU.
//
// For each segment of the step's metadata (a run of tokens sharing slot s, read through sorted_tokens) and
// each slice i of the projection (columns off_i .. off_i + size_i of y):
//     y[t, off_i + o] += scales[i, s] * sum_{k < r} (x[t] . A[i, s, k]) * B[s, off_i + o, k],  r = ranks[i, s]
// Weights beyond a slot's rank are never read. Tokens go four at a time: the shrink reads each rank row of A
// once for the four of them, then the expand adds four ranks per pass over the four y rows, reading each vector
// of those four B rows once for the four tokens (1 slot, 32 tokens, rank 16, 256 -> 688, 1 thread: 14 us, 68
// GFLOP/s, against 21 us when each token's row took its own pass; MKL's mm pair for one adapter: 16 us).
// Work items are tiles of up to four tokens of one segment, spread over torch's intra-op threads.
//
// A decode step reads every used slot's weights once, mostly from memory (a step's adapter weights rarely stay
// in the caches between steps), so the last tile of a segment prefetches the next segment's weights, row by row,
// as it reads its own: demo-model decode step (32 tokens, 8 rank-16 adapters, 28 layers, caches flushed,
// 1 thread): 0.94-1.01 ms against 1.24-1.29 without, no change with warm caches.
//
// Layout it needs (checked by the Python side, which otherwise uses the torch path): x, y, A rows and B's out
// dimension with unit stride, i.e. A [n, S, R, in] with in innermost and B [S, out, R] with out innermost, which
// both layouts `slot_buffers` stores them in qualify (slot-major on the CPU, rank-outermost elsewhere).

#include <ATen/core/Tensor.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int kTile = 4;         // tokens per work item
constexpr int64_t kRankChunk = 64;  // ranks shrunk (into registers / stack) before their expand

struct NextWeights {  // the next segment's weights for the same slice, to prefetch; nullptr: none
  const float* A = nullptr;
  const float* B = nullptr;
};

struct SliceWeights {
  const float* A;        // A[i, s, 0, 0]
  int64_t a_rank_stride;  // elements between A[i, s, k] and A[i, s, k + 1]
  const float* B;        // B[s, off_i, 0]
  int64_t b_rank_stride;  // elements between B[s, :, k] and B[s, :, k + 1]
  int64_t out;           // size_i
  int64_t rank;          // r
  float scale;
};

// h[k][j] = scale * x_j . A[k0 + k] for the TL tokens x_j, k < count
template <int TL>
void shrink(float (*h)[kTile], const float* const* xs, const SliceWeights& w, int64_t in, int64_t k0, int64_t count,
            const NextWeights& next) {
  for (int64_t k = 0; k < count; ++k) {
    const float* __restrict a = w.A + (k0 + k) * w.a_rank_stride;
    if (next.A != nullptr)  // one 64-byte line per prefetch, into L2
      for (int64_t c = 0; c < in; c += 16) __builtin_prefetch(next.A + (k0 + k) * w.a_rank_stride + c, 0, 2);
    float acc[kTile] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (TL == kTile) {
      const float* __restrict x0 = xs[0];
      const float* __restrict x1 = xs[1];
      const float* __restrict x2 = xs[2];
      const float* __restrict x3 = xs[3];
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t c = 0; c < in; ++c) {
        const float weight = a[c];
        s0 += x0[c] * weight;
        s1 += x1[c] * weight;
        s2 += x2[c] * weight;
        s3 += x3[c] * weight;
      }
      acc[0] = s0, acc[1] = s1, acc[2] = s2, acc[3] = s3;
    } else {
      for (int j = 0; j < TL; ++j) {
        const float* __restrict xj = xs[j];
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < in; ++c) s += xj[c] * a[c];
        acc[j] = s;
      }
    }
    for (int j = 0; j < TL; ++j) h[k][j] = acc[j] * w.scale;
  }
}

// y_j += sum_k h[k][j] * B[k0 + k] for the TL token rows y_j, k < count, four ranks per pass over y. A full tile
// updates its four rows together: each vector of the four B rows is loaded once for the four tokens.
template <int TL>
void expand(float* const* ys, const float (*h)[kTile], const SliceWeights& w, int64_t k0, int64_t count,
            const NextWeights& next) {
  auto prefetch_rows = [&](int64_t k, int64_t n) {
    if (next.B != nullptr)
      for (int64_t q = k0 + k; q < k0 + k + n; ++q)
        for (int64_t o = 0; o < w.out; o += 16) __builtin_prefetch(next.B + q * w.b_rank_stride + o, 0, 2);
  };
  int64_t k = 0;
  for (; k + 4 <= count; k += 4) {
    prefetch_rows(k, 4);
    const float* __restrict b0 = w.B + (k0 + k) * w.b_rank_stride;
    const float* __restrict b1 = b0 + w.b_rank_stride;
    const float* __restrict b2 = b1 + w.b_rank_stride;
    const float* __restrict b3 = b2 + w.b_rank_stride;
    if constexpr (TL == kTile) {
      float* __restrict y0 = ys[0];
      float* __restrict y1 = ys[1];
      float* __restrict y2 = ys[2];
      float* __restrict y3 = ys[3];
      const float h00 = h[k][0], h01 = h[k][1], h02 = h[k][2], h03 = h[k][3];
      const float h10 = h[k + 1][0], h11 = h[k + 1][1], h12 = h[k + 1][2], h13 = h[k + 1][3];
      const float h20 = h[k + 2][0], h21 = h[k + 2][1], h22 = h[k + 2][2], h23 = h[k + 2][3];
      const float h30 = h[k + 3][0], h31 = h[k + 3][1], h32 = h[k + 3][2], h33 = h[k + 3][3];
#pragma omp simd
      for (int64_t o = 0; o < w.out; ++o) {
        const float v0 = b0[o], v1 = b1[o], v2 = b2[o], v3 = b3[o];
        y0[o] += h00 * v0 + h10 * v1 + h20 * v2 + h30 * v3;
        y1[o] += h01 * v0 + h11 * v1 + h21 * v2 + h31 * v3;
        y2[o] += h02 * v0 + h12 * v1 + h22 * v2 + h32 * v3;
        y3[o] += h03 * v0 + h13 * v1 + h23 * v2 + h33 * v3;
      }
    } else {
      for (int j = 0; j < TL; ++j) {
        float* __restrict y = ys[j];
        const float h0 = h[k][j], h1 = h[k + 1][j], h2 = h[k + 2][j], h3 = h[k + 3][j];
#pragma omp simd
        for (int64_t o = 0; o < w.out; ++o) y[o] += h0 * b0[o] + h1 * b1[o] + h2 * b2[o] + h3 * b3[o];
      }
    }
  }
  for (; k < count; ++k) {
    prefetch_rows(k, 1);
    const float* __restrict b = w.B + (k0 + k) * w.b_rank_stride;
    for (int j = 0; j < TL; ++j) {
      float* __restrict y = ys[j];
      const float hk = h[k][j];
#pragma omp simd
      for (int64_t o = 0; o < w.out; ++o) y[o] += hk * b[o];
    }
  }
}

template <int TL>
void apply_tile(const float* const* xs, float* const* ys, const SliceWeights& w, int64_t in, const NextWeights& next) {
  float h[kRankChunk][kTile];
  for (int64_t k0 = 0; k0 < w.rank; k0 += kRankChunk) {
    const int64_t count = std::min(kRankChunk, w.rank - k0);
    shrink<TL>(h, xs, w, in, k0, count, next);
    expand<TL>(ys, h, w, k0, count, next);
  }
}

}  // namespace

// y [T, out_total] += the LoRA deltas of the step's segments; see the header comment for the operands.
void lora_apply(at::Tensor y, at::Tensor x, at::Tensor A, at::Tensor B, at::Tensor scales,
                at::Tensor ranks, at::Tensor sorted_tokens, at::Tensor segment_slots,
                at::Tensor segment_starts, at::Tensor segment_lengths, int64_t num_segments,
                std::vector<int64_t> offsets, std::vector<int64_t> sizes) {
  TORCH_CHECK(x.dtype() == at::kFloat && y.dtype() == at::kFloat && A.dtype() == at::kFloat &&
                  B.dtype() == at::kFloat,
              "the CPU LoRA kernel takes float32");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && A.stride(3) == 1 && B.stride(1) == 1,
              "the CPU LoRA kernel needs unit strides along x/y columns, A's in and B's out");
  const int64_t n = A.size(0), S = A.size(1), in = A.size(3);
  const int32_t* tokens = sorted_tokens.data_ptr<int32_t>();  // [T]
  const int32_t* seg_slots = segment_slots.data_ptr<int32_t>();  // [>= num_segments]
  const int32_t* seg_starts = segment_starts.data_ptr<int32_t>();
  const int32_t* seg_lengths = segment_lengths.data_ptr<int32_t>();
  const float* scale_of = scales.data_ptr<float>();  // [n, S]
  const int32_t* rank_of = ranks.data_ptr<int32_t>();  // [n, S]
  const float* x_data = x.data_ptr<float>();
  float* y_data = y.data_ptr<float>();
  const float* A_data = A.data_ptr<float>();
  const float* B_data = B.data_ptr<float>();
  const int64_t x_row = x.stride(0), y_row = y.stride(0);

  std::vector<int64_t> first_tile(num_segments + 1, 0);  // tiles of segments before g
  for (int64_t g = 0; g < num_segments; ++g) first_tile[g + 1] = first_tile[g] + (seg_lengths[g] + kTile - 1) / kTile;

  at::parallel_for(0, first_tile[num_segments], 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t g = std::upper_bound(first_tile.begin(), first_tile.end(), tile) - first_tile.begin() - 1;
      const int64_t slot = seg_slots[g];
      const int64_t first = (tile - first_tile[g]) * kTile;
      const int count = static_cast<int>(std::min<int64_t>(kTile, seg_lengths[g] - first));
      const int32_t* rows = tokens + seg_starts[g] + first;
      for (int64_t i = 0; i < n; ++i) {
        const SliceWeights w{A_data + i * A.stride(0) + slot * A.stride(1), A.stride(2),
                             B_data + slot * B.stride(0) + offsets[i], B.stride(2),
                             sizes[i], rank_of[i * S + slot], scale_of[i * S + slot]};
        if (w.rank == 0) continue;
        NextWeights next;
        if (first + kTile >= seg_lengths[g] && g + 1 < num_segments) {  // the segment's last tile
          next.A = A_data + i * A.stride(0) + seg_slots[g + 1] * A.stride(1);
          next.B = B_data + seg_slots[g + 1] * B.stride(0) + offsets[i];
        }
        const float* xs[kTile];
        float* ys[kTile];
        for (int j = 0; j < count; ++j) {
          xs[j] = x_data + rows[j] * x_row;
          ys[j] = y_data + rows[j] * y_row + offsets[i];
        }
        switch (count) {
          case 4: apply_tile<4>(xs, ys, w, in, next); break;
          case 3: apply_tile<3>(xs, ys, w, in, next); break;
          case 2: apply_tile<2>(xs, ys, w, in, next); break;
          default: apply_tile<1>(xs, ys, w, in, next); break;
        }
      }
    }
  });
}
