// The element-wise work of a llama-style decoder layer fused for the CPU in bfloat16 (`fused_decoder.py`): each op
// one pass over its rows instead of the five to eight ATen ops, each a pass and an allocation, that HF's modelling
// code runs for it. Each rounds to bfloat16 where HF's code does, so the results are HF's but for the variance's
// summation order (RMSNorm) and the exp's last bit (SiLU); rotary is bit-identical.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <tuple>

#include "cpu_element.h"

// 512-bit vectors where the CPU has them (GCC prefers 256 bits for -march=native on most AVX512 CPUs): these loops
// are pure arithmetic, where the wider vectors pay
#pragma GCC target("prefer-vector-width=512")

namespace {

using loradock::BFloat16;
using loradock::exp_approx;
using loradock::narrow;
using loradock::widen;

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              name, ": expected bfloat16 rows [T, C] with unit column stride");
}

// out = weight * bf16(x * rsqrt(mean(x^2) + eps)) for one row, as HF's LlamaRMSNorm in bfloat16
void norm_row(BFloat16* __restrict out, const BFloat16* __restrict x, const BFloat16* __restrict weight, int64_t n,
              float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t c = 0; c < n; ++c) squares += widen(x[c]) * widen(x[c]);
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
  for (int64_t c = 0; c < n; ++c)
    out[c] = narrow<BFloat16>(widen(weight[c]) * widen(narrow<BFloat16>(widen(x[c]) * inv)));
}

}  // namespace

// RMSNorm of each row of x [T, C] with weight [C].
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm: expected a contiguous bfloat16 weight [C]");
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  const BFloat16* w = weight.data_ptr<BFloat16>();
  for (int64_t t = 0; t < x.size(0); ++t)
    norm_row(out.data_ptr<BFloat16>() + t * x.size(1), x.data_ptr<BFloat16>() + t * x.stride(0), w, x.size(1),
             static_cast<float>(eps));
  return out;
}

// (residual + x, its RMSNorm): the residual stream after a sub-layer and the next sub-layer's input, in one pass.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  check_rows(x, "add_rms_norm");
  check_rows(residual, "add_rms_norm");
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x and residual differ in shape");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == x.size(1),
              "add_rms_norm: expected a contiguous bfloat16 weight [C]");
  const int64_t n = x.size(1);
  at::Tensor sum = at::empty({x.size(0), n}, x.options());
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  for (int64_t t = 0; t < x.size(0); ++t) {
    const BFloat16* a = residual.data_ptr<BFloat16>() + t * residual.stride(0);
    const BFloat16* b = x.data_ptr<BFloat16>() + t * x.stride(0);
    BFloat16* s = sum.data_ptr<BFloat16>() + t * n;
    for (int64_t c = 0; c < n; ++c) s[c] = narrow<BFloat16>(widen(a[c]) + widen(b[c]));
    norm_row(out.data_ptr<BFloat16>() + t * n, s, weight.data_ptr<BFloat16>(), n, static_cast<float>(eps));
  }
  return {sum, out};
}

// bf16(bf16(silu(gate)) * up) for gate, up [T, I]: the llama MLP's activation, as HF's act_fn(gate) * up.
at::Tensor silu_and_mul(at::Tensor gate, at::Tensor up) {
  check_rows(gate, "silu_and_mul");
  check_rows(up, "silu_and_mul");
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_and_mul: gate and up differ in shape");
  const int64_t n = gate.size(1);
  at::Tensor out = at::empty({gate.size(0), n}, gate.options());
  for (int64_t t = 0; t < gate.size(0); ++t) {
    const BFloat16* g = gate.data_ptr<BFloat16>() + t * gate.stride(0);
    const BFloat16* u = up.data_ptr<BFloat16>() + t * up.stride(0);
    BFloat16* o = out.data_ptr<BFloat16>() + t * n;
    for (int64_t c = 0; c < n; ++c) {
      const float v = widen(g[c]);
      o[c] = narrow<BFloat16>(widen(narrow<BFloat16>(v / (1.f + exp_approx(-v)))) * widen(u[c]));
    }
  }
  return out;
}

// x [T, H, D] rotated by each token's cos, sin [T, D]: HF's x * cos + rotate_half(x) * sin, each product and the sum
// rounded to bfloat16 as there.
at::Tensor rotary(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1,
              "rotary: expected bfloat16 x [T, H, D] with unit stride along D");
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2) && x.size(2) % 2 == 0,
              "rotary: expected contiguous bfloat16 cos and sin [T, D], D even");
  const int64_t heads = x.size(1), dim = x.size(2), half = dim / 2;
  at::Tensor out = at::empty({x.size(0), heads, dim}, x.options());
  for (int64_t t = 0; t < x.size(0); ++t) {
    const BFloat16* c = cos.data_ptr<BFloat16>() + t * dim;
    const BFloat16* s = sin.data_ptr<BFloat16>() + t * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const BFloat16* v = x.data_ptr<BFloat16>() + t * x.stride(0) + h * x.stride(1);
      BFloat16* o = out.data_ptr<BFloat16>() + (t * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) {
        const float rotated = d < half ? -widen(v[d + half]) : widen(v[d - half]);
        o[d] = narrow<BFloat16>(widen(narrow<BFloat16>(widen(v[d]) * widen(c[d]))) +
                                widen(narrow<BFloat16>(rotated * widen(s[d]))));
      }
    }
  }
  return out;
}
