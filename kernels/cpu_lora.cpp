// The gathered-LoRA op compiled for the CPU (float32 or bfloat16): the engine's LoRA path when it serves on the CPU.
//
// For each segment of the step's metadata (a run of tokens sharing slot s, read through sorted_tokens) shorter
// than max_length tokens (longer ones, prefill chunks, go through torch's BLAS on the Python side):
//     y[t, o] += scales[s] * sum_{k < r} (x[t] . A[s, k]) * B[s, o, k],  r = ranks[s]
// and, for a slot the optional output affine maps (DoRA, lora_bias; mapped slots have rank > 0), in the same pass
// over the row, rounded once into y:
//     y[t, o] = out_scale[s, o] * (y[t, o] + delta[t, o]) + out_shift[s, o]
// Weights beyond a slot's rank are never read, nor the affine's vectors of a slot it does not map. Tokens go four at
// a time: the shrink reads each rank row of A once for the four of them, then the expand adds four ranks per pass
// over the four y rows, reading each vector of those four B rows once for the four tokens, so a tile's weights are
// read once, not once per token.
// Work items are tiles of up to four tokens of one segment.
//
// A decode step reads every used slot's weights once, mostly from memory (a step's adapter weights rarely stay
// in the caches between steps), so the last tile of a segment prefetches the next segment's weights, row by row,
// as it reads its own; and the shrink prefetches the tile's own B, a rank row per row of A it reads, so B streams in
// while the shrink runs instead of when the expand asks for it (loadtest/RESULTS.md, "Greedy tokens, and the AMX
// host again").
//
// Two entry points: lora_apply adds the deltas into y (tiles spread over torch's intra-op threads); lora_linear
// is a whole LoRA layer, the base linear plus the deltas, the base GEMM's chunks and the kernel's tiles shared by
// the caller and the helper thread (cpu_helper.h), so the step's adapter weights stream in during the GEMM instead
// of after it. Figures for each of these choices: loadtest/RESULTS.md, "The CPU kernels' design figures".
//
// Element types: x, A and B are all float32 or all bfloat16 (T below); y is T too, or float32 for lora_linear's
// scratch. Every sum is accumulated in float32: in bfloat16 the shrink's dot products are AVX512-BF16 `vdpbf16ps`
// where the compiler targets it (pairs of bfloat16 products summed into float32 lanes), bfloat16 -> float32
// conversions and FMAs elsewhere; a bfloat16 y is rounded once per token, after all of the token's ranks.
//
// Layout it needs (checked by the Python side, which otherwise uses the torch path): x, y, A rows and B's out
// dimension with unit stride, i.e. A [S, R, in] with in innermost and B [S, out, R] with out innermost.

#include <ATen/core/Tensor.h>

#include <ATen/ops/empty.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "cpu_element.h"
#include "cpu_helper.h"
#include "cpu_linear.h"

namespace {

constexpr int kTile = 4;         // tokens per work item
constexpr int64_t kRankChunk = 64;  // ranks shrunk (into registers / stack) before their expand

using loradock::BFloat16;
using loradock::TileHelper;
using loradock::Tiles;
using loradock::kLine;
using loradock::narrow;
using loradock::widen;
using loradock::with_element_type;

// dst[c] += delta[c] for c < n, rounded once into dst's type
template <typename Y>
void add_row(Y* __restrict dst, const float* __restrict delta, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) dst[c] = narrow<Y>(widen(dst[c]) + delta[c]);
}

// dst[c] = scale[c] * (dst[c] + delta[c]) + shift[c] for c < n, rounded once into dst's type
template <typename Y>
void add_row_mapped(Y* __restrict dst, const float* __restrict delta, const float* __restrict scale,
                    const float* __restrict shift, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) dst[c] = narrow<Y>(scale[c] * (widen(dst[c]) + delta[c]) + shift[c]);
}

// y[c] = scale[c] * y[c] + shift[c] for c < n: a float32 row that already holds its delta
void map_row(float* __restrict y, const float* __restrict scale, const float* __restrict shift, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] = scale[c] * y[c] + shift[c];
}

// The optional per-slot map of the output rows; scale == nullptr: no slot is mapped.
struct OutputAffine {
  const float* scale = nullptr;     // [S, out]
  const float* shift = nullptr;     // [S, out]
  const int32_t* mapped = nullptr;  // [S]
  int64_t out = 0;

  bool maps(int64_t slot) const { return scale != nullptr && mapped[slot] != 0; }
  const float* scale_row(int64_t slot) const { return scale + slot * out; }
  const float* shift_row(int64_t slot) const { return shift + slot * out; }
};

// The affine of the optional tensors: all three or none, scale and shift [S, out] float32, mapped [S] int32, each
// contiguous.
OutputAffine output_affine(const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& mapped, const at::Tensor& B) {
  TORCH_CHECK(scale.has_value() == shift.has_value() && shift.has_value() == mapped.has_value(),
              "the output affine takes its scale, shift and mapped tensors together");
  if (!scale.has_value()) return {};
  const int64_t slots = B.size(0), out = B.size(1);
  TORCH_CHECK(scale->sizes() == at::IntArrayRef({slots, out}) && shift->sizes() == at::IntArrayRef({slots, out}) &&
                  mapped->sizes() == at::IntArrayRef({slots}),
              "the output affine needs scale and shift [S, out] and mapped [S]");
  TORCH_CHECK(scale->scalar_type() == at::kFloat && shift->scalar_type() == at::kFloat &&
                  mapped->scalar_type() == at::kInt,
              "the output affine's scale and shift are float32, mapped int32");
  TORCH_CHECK(scale->is_contiguous() && shift->is_contiguous() && mapped->is_contiguous(),
              "the output affine's tensors must be contiguous");
  return {scale->data_ptr<float>(), shift->data_ptr<float>(), mapped->data_ptr<int32_t>(), out};
}

template <typename T>
struct NextWeights {  // the next segment's weights, to prefetch; nullptr: none
  const T* A = nullptr;
  const T* B = nullptr;
};

template <typename T>
struct SlotWeights {
  const T* A;            // A[s, 0, 0]
  int64_t a_rank_stride;  // elements between A[s, k] and A[s, k + 1]
  const T* B;            // B[s, 0, 0]
  int64_t b_rank_stride;  // elements between B[s, :, k] and B[s, :, k + 1]
  int64_t out;
  int64_t rank;          // r
  float scale;
};

// dots[j] = x_j . a for the TL rows x_j, summed in float32
template <int TL, typename T>
void dot_rows(float (&dots)[kTile], const T* const* xs, const T* __restrict a, int64_t in) {
  if constexpr (TL == kTile) {
    const T* __restrict x0 = xs[0];
    const T* __restrict x1 = xs[1];
    const T* __restrict x2 = xs[2];
    const T* __restrict x3 = xs[3];
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t c = 0; c < in; ++c) {
      const float weight = widen(a[c]);
      s0 += widen(x0[c]) * weight;
      s1 += widen(x1[c]) * weight;
      s2 += widen(x2[c]) * weight;
      s3 += widen(x3[c]) * weight;
    }
    dots[0] = s0, dots[1] = s1, dots[2] = s2, dots[3] = s3;
  } else {
    for (int j = 0; j < TL; ++j) {
      const T* __restrict xj = xs[j];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < in; ++c) s += widen(xj[c]) * widen(a[c]);
      dots[j] = s;
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// The same in bfloat16 with vdpbf16ps: 32 products per instruction, each pair summed into a float32 lane (the
// products are exact in float32); the row's tail through a masked load, whose zeros add nothing.
template <int TL>
void dot_rows(float (&dots)[kTile], const BFloat16* const* xs, const BFloat16* __restrict a, int64_t in) {
  __m512 sums[TL];
  for (int j = 0; j < TL; ++j) sums[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < in; c += 32) {
    const __mmask32 lanes = in - c >= 32 ? ~__mmask32{0} : (__mmask32{1} << (in - c)) - 1;
    const __m512bh weight = (__m512bh)_mm512_maskz_loadu_epi16(lanes, a + c);
    for (int j = 0; j < TL; ++j)
      sums[j] = _mm512_dpbf16_ps(sums[j], (__m512bh)_mm512_maskz_loadu_epi16(lanes, xs[j] + c), weight);
  }
  for (int j = 0; j < TL; ++j) dots[j] = _mm512_reduce_add_ps(sums[j]);
}
#endif

// h[k][j] = scale * x_j . A[k0 + k] for the TL tokens x_j, k < count; B's rows k0 .. k0 + count prefetched meanwhile
template <int TL, typename T>
void shrink(float (*h)[kTile], const T* const* xs, const SlotWeights<T>& w, int64_t in, int64_t k0, int64_t count,
            const NextWeights<T>& next) {
  for (int64_t k = 0; k < count; ++k) {
    const T* __restrict a = w.A + (k0 + k) * w.a_rank_stride;
    if (next.A != nullptr)  // one 64-byte line per prefetch, into L2
      for (int64_t c = 0; c < in; c += kLine<T>)
        __builtin_prefetch(next.A + (k0 + k) * w.a_rank_stride + c, 0, 2);
    for (int64_t o = 0; o < w.out; o += kLine<T>)  // rank row k of this tile's B, read by the expand next
      __builtin_prefetch(w.B + (k0 + k) * w.b_rank_stride + o, 0, 2);
    float dots[kTile];
    dot_rows<TL>(dots, xs, a, in);
    for (int j = 0; j < TL; ++j) h[k][j] = dots[j] * w.scale;
  }
}

// y_j += sum_k h[k][j] * B[k0 + k] for the TL float32 rows y_j, k < count, four ranks per pass over y. A full tile
// updates its four rows together: each vector of the four B rows is loaded once for the four tokens.
template <int TL, typename T>
void expand(float* const* ys, const float (*h)[kTile], const SlotWeights<T>& w, int64_t k0, int64_t count,
            const NextWeights<T>& next) {
  auto prefetch_rows = [&](int64_t k, int64_t n) {
    if (next.B != nullptr)
      for (int64_t q = k0 + k; q < k0 + k + n; ++q)
        for (int64_t o = 0; o < w.out; o += kLine<T>) __builtin_prefetch(next.B + q * w.b_rank_stride + o, 0, 2);
  };
  int64_t k = 0;
  for (; k + 4 <= count; k += 4) {
    prefetch_rows(k, 4);
    const T* __restrict b0 = w.B + (k0 + k) * w.b_rank_stride;
    const T* __restrict b1 = b0 + w.b_rank_stride;
    const T* __restrict b2 = b1 + w.b_rank_stride;
    const T* __restrict b3 = b2 + w.b_rank_stride;
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
        const float v0 = widen(b0[o]), v1 = widen(b1[o]), v2 = widen(b2[o]), v3 = widen(b3[o]);
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
        for (int64_t o = 0; o < w.out; ++o)
          y[o] += h0 * widen(b0[o]) + h1 * widen(b1[o]) + h2 * widen(b2[o]) + h3 * widen(b3[o]);
      }
    }
  }
  for (; k < count; ++k) {
    prefetch_rows(k, 1);
    const T* __restrict b = w.B + (k0 + k) * w.b_rank_stride;
    for (int j = 0; j < TL; ++j) {
      float* __restrict y = ys[j];
      const float hk = h[k][j];
#pragma omp simd
      for (int64_t o = 0; o < w.out; ++o) y[o] += hk * widen(b[o]);
    }
  }
}

template <int TL, typename T>
void apply_tile(const T* const* xs, float* const* ys, const SlotWeights<T>& w, int64_t in,
                const NextWeights<T>& next) {
  float h[kRankChunk][kTile];
  for (int64_t k0 = 0; k0 < w.rank; k0 += kRankChunk) {
    const int64_t count = std::min(kRankChunk, w.rank - k0);
    shrink<TL>(h, xs, w, in, k0, count, next);
    expand<TL>(ys, h, w, k0, count, next);
  }
}

// One call's operands as raw pointers, and its work: tiles of up to four tokens of one segment. Tiles write
// disjoint rows of y, so any thread may run any tile. T: the element type of x, A and B; Y: y's. The expand adds
// into float32 rows: y's own when Y is float, else a tile's float32 rows, added into y's once at the tile's end.
template <typename T, typename Y>
class LoraCall final : public Tiles {
  static constexpr bool kStaged = !std::is_same_v<Y, float>;

 public:
  LoraCall(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& scales,
           const at::Tensor& ranks, const at::Tensor& sorted_tokens, const at::Tensor& segment_slots,
           const at::Tensor& segment_starts, const at::Tensor& segment_lengths, int64_t num_segments,
           int64_t max_length, const OutputAffine& affine, bool overwrite)
      : x_(x.data_ptr<T>()), x_row_(x.stride(0)), y_(y.data_ptr<Y>()), y_row_(y.stride(0)),
        A_(A.data_ptr<T>()), a_slot_(A.stride(0)), a_rank_(A.stride(1)), in_(A.size(2)),
        B_(B.data_ptr<T>()), b_slot_(B.stride(0)), b_rank_(B.stride(2)), out_(B.size(1)),
        scales_(scales.data_ptr<float>()), ranks_(ranks.data_ptr<int32_t>()),
        tokens_(sorted_tokens.data_ptr<int32_t>()), slots_(segment_slots.data_ptr<int32_t>()),
        starts_(segment_starts.data_ptr<int32_t>()), lengths_(segment_lengths.data_ptr<int32_t>()),
        max_length_(max_length), first_tile_(num_segments + 1, 0), affine_(affine), overwrite_(overwrite) {
    static_assert(!kStaged || std::is_same_v<Y, T>, "a y of another type than x is float32 scratch");
    TORCH_CHECK(!(kStaged && overwrite), "the CPU LoRA kernel overwrites float32 scratch only");
    TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && A.stride(2) == 1 && B.stride(1) == 1,
                "the CPU LoRA kernel needs unit strides along x/y columns, A's in and B's out");
    TORCH_CHECK(num_segments <= segment_slots.size(0), "more segments than the metadata holds");
    for (int64_t g = 0; g < num_segments; ++g)  // tiles of the segments before g + 1 (none for a long segment)
      first_tile_[g + 1] = first_tile_[g] + (mine(g) ? (lengths_[g] + kTile - 1) / kTile : 0);
  }

  int64_t num_tiles() const override { return first_tile_.back(); }
  int64_t num_segments() const { return static_cast<int64_t>(first_tile_.size()) - 1; }

  void run_tile(int64_t tile) const override {
    const int64_t g = std::upper_bound(first_tile_.begin(), first_tile_.end(), tile) - first_tile_.begin() - 1;
    const int64_t slot = slots_[g];
    const int64_t first = (tile - first_tile_[g]) * kTile;
    const int count = static_cast<int>(std::min<int64_t>(kTile, lengths_[g] - first));
    const int32_t* rows = tokens_ + starts_[g] + first;
    const SlotWeights<T> w{A_ + slot * a_slot_, a_rank_, B_ + slot * b_slot_, b_rank_, out_, ranks_[slot],
                           scales_[slot]};
    const T* xs[kTile];
    float* ys[kTile];
    for (int j = 0; j < count; ++j) {
      xs[j] = x_ + rows[j] * x_row_;
      if constexpr (!kStaged) {
        ys[j] = y_ + rows[j] * y_row_;
        if (overwrite_) std::fill(ys[j], ys[j] + out_, 0.f);
      }
    }
    if (w.rank == 0) return;  // never mapped: a layer maps only the slots it holds an adapter module for
    if constexpr (kStaged) {
      thread_local std::vector<float> staged;  // [count, out]: the tile's float32 rows, kept for the next tile
      staged.assign(count * out_, 0.f);
      for (int j = 0; j < count; ++j) ys[j] = staged.data() + j * out_;
    }
    NextWeights<T> next;
    if (first + kTile >= lengths_[g]) {  // the segment's last tile: prefetch the next segment the kernel runs
      int64_t h = g + 1;
      while (h < num_segments() && !mine(h)) ++h;
      if (h < num_segments()) next = {A_ + slots_[h] * a_slot_, B_ + slots_[h] * b_slot_};
    }
    switch (count) {
      case 4: apply_tile<4>(xs, ys, w, in_, next); break;
      case 3: apply_tile<3>(xs, ys, w, in_, next); break;
      case 2: apply_tile<2>(xs, ys, w, in_, next); break;
      default: apply_tile<1>(xs, ys, w, in_, next); break;
    }
    if (!affine_.maps(slot)) {
      if constexpr (kStaged)
        for (int j = 0; j < count; ++j) add_row(y_ + rows[j] * y_row_, ys[j], out_);
      return;
    }
    const float* scale = affine_.scale_row(slot);
    const float* shift = affine_.shift_row(slot);
    if constexpr (kStaged) {
      for (int j = 0; j < count; ++j) add_row_mapped(y_ + rows[j] * y_row_, ys[j], scale, shift, out_);
    } else if (!overwrite_) {  // y's own rows, holding their deltas now (scratch rows are mapped in add_rows_into)
      for (int j = 0; j < count; ++j) map_row(ys[j], scale, shift, out_);
    }
  }

  // dst[t] += y[t] for the tokens of the kernel's segments (y written with overwrite), rounded once into T; a
  // mapped slot's rows: dst[t] = out_scale * (dst[t] + y[t]) + out_shift
  void add_rows_into(at::Tensor& dst) const {
    TORCH_CHECK(dst.stride(1) == 1, "the LoRA deltas are added into rows with unit column stride");
    T* d = dst.data_ptr<T>();
    const int64_t d_row = dst.stride(0);
    for (int64_t g = 0; g < num_segments(); ++g) {
      if (!mine(g)) continue;
      const int64_t slot = slots_[g];
      const bool mapped = affine_.maps(slot);
      for (int64_t e = starts_[g]; e < starts_[g] + lengths_[g]; ++e) {
        if (mapped)
          add_row_mapped(d + tokens_[e] * d_row, y_ + tokens_[e] * y_row_, affine_.scale_row(slot),
                         affine_.shift_row(slot), out_);
        else
          add_row(d + tokens_[e] * d_row, y_ + tokens_[e] * y_row_, out_);
      }
    }
  }

 private:
  bool mine(int64_t g) const { return lengths_[g] < max_length_; }  // longer segments go through BLAS

  const T* x_;
  int64_t x_row_;
  Y* y_;
  int64_t y_row_;
  const T* A_;  // [S, R, in]
  int64_t a_slot_, a_rank_, in_;
  const T* B_;  // [S, out, R], out innermost
  int64_t b_slot_, b_rank_, out_;
  const float* scales_;  // [S]
  const int32_t* ranks_;  // [S]
  const int32_t* tokens_;  // [T]
  const int32_t* slots_;   // [>= num_segments]
  const int32_t* starts_;
  const int32_t* lengths_;
  int64_t max_length_;
  std::vector<int64_t> first_tile_;  // [num_segments + 1]
  OutputAffine affine_;
  bool overwrite_;  // y holds scratch: each tile zeroes its rows before adding
};

// The element type of x, A and B: float32 or bfloat16, the same for the three.
at::ScalarType element_type(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kBFloat16) && A.scalar_type() == type && B.scalar_type() == type,
              "the CPU LoRA kernel takes x, A and B all float32 or all bfloat16");
  return type;
}

}  // namespace

// y [T, out] += the LoRA deltas of the step's segments shorter than max_length, their rows mapped where the output
// affine (out_scale, out_shift, out_mapped: all or none) maps the slot; see the header comment.
void lora_apply(at::Tensor y, at::Tensor x, at::Tensor A, at::Tensor B, at::Tensor scales, at::Tensor ranks,
                at::Tensor sorted_tokens, at::Tensor segment_slots, at::Tensor segment_starts,
                at::Tensor segment_lengths, int64_t num_segments, int64_t max_length,
                std::optional<at::Tensor> out_scale, std::optional<at::Tensor> out_shift,
                std::optional<at::Tensor> out_mapped) {
  const at::ScalarType type = element_type(x, A, B);
  TORCH_CHECK(y.scalar_type() == type, "the CPU LoRA kernel adds into a y of x's dtype");
  const OutputAffine affine = output_affine(out_scale, out_shift, out_mapped, B);
  with_element_type(type, [&](auto element) {
    using T = decltype(element);
    const LoraCall<T, T> call(y, x, A, B, scales, ranks, sorted_tokens, segment_slots, segment_starts,
                              segment_lengths, num_segments, max_length, affine, /*overwrite=*/false);
    call.run_all();
  });
}

// For each LoRA layer i of a group that reads the same x (a layer's q, k and v projections, say): linear(x, W_i,
// bias_i) [T, out_i] plus the LoRA deltas of the step's segments shorter than max_length, W_i given as chunks of its
// output rows (one or more, cpu_linear.h). Every GEMM chunk and every delta tile of the group is a tile of one job,
// run by the caller and the helper thread together: the deltas into float32 scratch the caller then adds, so the
// adapter weights stream in from memory alongside the base weights instead of after them, and one call covers what
// would be a call per layer. Where torch's threads already take every CPU the caller may run on (no core left for
// the helper), and for groups whose scratch would exceed kMaxDelta (long prefill chunks of a wide model), it runs the
// GEMMs, then the kernel, as lora_apply does. The affine's lists hold one optional tensor per layer.
std::vector<at::Tensor> lora_linear(
    at::Tensor x, std::vector<std::vector<at::Tensor>> weights, std::vector<std::optional<at::Tensor>> biases,
    std::vector<at::Tensor> A, std::vector<at::Tensor> B, std::vector<at::Tensor> scales,
    std::vector<at::Tensor> ranks, at::Tensor sorted_tokens, at::Tensor segment_slots, at::Tensor segment_starts,
    at::Tensor segment_lengths, int64_t num_segments, int64_t max_length,
    std::vector<std::optional<at::Tensor>> out_scale, std::vector<std::optional<at::Tensor>> out_shift,
    std::vector<std::optional<at::Tensor>> out_mapped) {
  const size_t layers = weights.size();
  TORCH_CHECK(biases.size() == layers && A.size() == layers && B.size() == layers && scales.size() == layers &&
                  ranks.size() == layers && out_scale.size() == layers && out_shift.size() == layers &&
                  out_mapped.size() == layers,
              "lora_linear: one entry per layer in every list");
  std::vector<std::unique_ptr<loradock::LinearChunks>> bases;
  std::vector<OutputAffine> affines;
  int64_t needed = 0;
  for (size_t i = 0; i < layers; ++i) {
    bases.push_back(std::make_unique<loradock::LinearChunks>(x, weights[i], biases[i]));
    TORCH_CHECK(x.size(1) == A[i].size(2) && bases[i]->out_features() == B[i].size(1),
                "lora_linear: expected x [T, in], weights [out, in] in chunks, A [S, R, in] and B [S, out, R]");
    TORCH_CHECK(element_type(x, A[i], B[i]) == x.scalar_type(), "lora_linear: x, A and B of one dtype");
    affines.push_back(output_affine(out_scale[i], out_shift[i], out_mapped[i], B[i]));
    needed += x.size(0) * bases[i]->out_features();
  }
  std::vector<at::Tensor> ys(layers);
  constexpr int64_t kMaxDelta = int64_t{1} << 22;  // floats (16 MB)
  if (needed > kMaxDelta || !loradock::helper_has_a_cpu()) {
    loradock::run_with_helper(loradock::TilesList(loradock::jobs_of(bases)));
    for (size_t i = 0; i < layers; ++i) {
      ys[i] = bases[i]->result();
      lora_apply(ys[i], x, A[i], B[i], scales[i], ranks[i], sorted_tokens, segment_slots, segment_starts,
                 segment_lengths, num_segments, max_length, out_scale[i], out_shift[i], out_mapped[i]);
    }
    return ys;
  }
  thread_local at::Tensor scratch;  // [>= T * sum(out)] float32, kept between calls (a fresh one would page-fault)
  if (!scratch.defined() || scratch.numel() < needed) scratch = at::empty({needed}, x.options().dtype(at::kFloat));
  with_element_type(x.scalar_type(), [&](auto element) {
    using T = decltype(element);
    std::vector<std::unique_ptr<LoraCall<T, float>>> calls;
    std::vector<const Tiles*> jobs = loradock::jobs_of(bases);
    int64_t offset = 0;
    for (size_t i = 0; i < layers; ++i) {
      const int64_t out = bases[i]->out_features();
      at::Tensor delta = scratch.narrow(0, offset, x.size(0) * out).view({x.size(0), out});  // [T, out_i]
      offset += x.size(0) * out;
      calls.push_back(std::make_unique<LoraCall<T, float>>(delta, x, A[i], B[i], scales[i], ranks[i], sorted_tokens,
                                                           segment_slots, segment_starts, segment_lengths,
                                                           num_segments, max_length, affines[i], /*overwrite=*/true));
      jobs.push_back(calls.back().get());
    }
    TileHelper::instance().run_alongside(loradock::TilesList(std::move(jobs)), [] {});
    for (size_t i = 0; i < layers; ++i) {
      ys[i] = bases[i]->result();
      calls[i]->add_rows_into(ys[i]);
    }
  });
  return ys;
}
