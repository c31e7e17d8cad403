// The greedy token of each row of a step's logits, for the CPU: torch's argmax scans a row one element at a time on
// one thread (and bfloat16 logits are widened first), which over a large vocabulary costs a decode step as much as
// some of its layers; two vectorized passes over each row, the rows shared with the helper thread, take a fraction
// of that (figures: loadtest/RESULTS.md, "Greedy tokens, and the AMX host again").
//
// Same answer as torch.argmax: the first index of the row's largest value, NaN counting as larger than any number
// (the first NaN wins where there is one).

#include <ATen/core/Tensor.h>

#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>

#include "cpu_element.h"
#include "cpu_helper.h"

namespace {

using loradock::widen;
using loradock::with_element_type;

template <typename T>
int64_t greedy_index(const T* __restrict row, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int nan = 0;  // int, not bool: a bool reduction keeps GCC from vectorizing the loop
#pragma omp simd reduction(max : best) reduction(| : nan)
  for (int64_t c = 0; c < n; ++c) {
    const float v = widen(row[c]);
    best = std::max(best, v);
    nan |= v != v;
  }
  constexpr int64_t kBlock = 64;  // the second pass tests a block's lanes together, then finds the hit in it
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t c = start; c < end; ++c) {
      const float v = widen(row[c]);
      hit |= nan ? v != v : v == best;
    }
    if (!hit) continue;
    for (int64_t c = start; c < end; ++c) {
      const float v = widen(row[c]);
      if (nan ? v != v : v == best) return c;
    }
  }
  return 0;  // not reached: the row holds its own maximum
}

template <typename T>
class GreedyRows final : public loradock::Tiles {
 public:
  GreedyRows(const at::Tensor& logits, at::Tensor& tokens)
      : logits_(logits.data_ptr<T>()), row_(logits.stride(0)), vocab_(logits.size(1)),
        tokens_(tokens.data_ptr<int64_t>()), rows_(logits.size(0)) {}

  int64_t num_tiles() const override { return rows_; }
  void run_tile(int64_t tile) const override { tokens_[tile] = greedy_index(logits_ + tile * row_, vocab_); }

 private:
  const T* logits_;
  int64_t row_, vocab_;
  int64_t* tokens_;
  int64_t rows_;
};

}  // namespace

// logits [N, vocab] float32 or bfloat16, unit stride along the vocabulary -> [N] int64, each row's argmax
at::Tensor greedy_tokens(at::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.stride(1) == 1 &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "greedy_tokens: expected float32 or bfloat16 logits [N, vocab] with unit stride along the vocabulary");
  at::Tensor tokens = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  with_element_type(logits.scalar_type(), [&](auto element) {
    loradock::run_with_helper(GreedyRows<decltype(element)>(logits, tokens));
  });
  return tokens;
}
