// The element types of the compiled CPU ops (cpu_lora.cpp, cpu_attention.cpp, cpu_fused.cpp): float32 and bfloat16,
// both summed in float32; and the arithmetic they share.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace loradock {

using BFloat16 = c10::BFloat16;

inline float widen(float v) { return v; }
inline float widen(BFloat16 v) { return static_cast<float>(v); }  // exact: bfloat16 is float32's upper half

// v rounded to T, to nearest even: c10's conversion, written without branches so that loops over it vectorize
template <typename T>
T narrow(float v);

template <>
inline float narrow<float>(float v) {
  return v;
}

template <>
inline BFloat16 narrow<BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return BFloat16(static_cast<uint16_t>(v != v ? 0x7fc0u : rounded), BFloat16::from_bits());
}

// e^x to about 2e-7 relative, written so that loops over it vectorize (libm's expf does not, nor float-to-int
// conversions under the default floating-point flags): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series
// to r^6, 2^n put in the exponent bits; infinity past float32's range, as expf.
inline float exp_approx(float x) {
  const bool overflows = x > 88.72f;
  x = std::min(std::max(x, -87.f), 88.f);
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds x / ln2 to the integer n, in the low bits
  const float shifted = x * 1.44269504f + kRound;
  const float n = shifted - kRound;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // ln2 in two parts: r stays exact
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  int32_t whole;
  std::memcpy(&whole, &shifted, sizeof whole);
  const int32_t bits = (whole - 0x4B400000 + 127) << 23;  // 0x4B400000: kRound's bits, leaving n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return overflows ? std::numeric_limits<float>::infinity() : p * scale;
}

template <typename T>
constexpr int64_t kLine = 64 / sizeof(T);  // elements per 64-byte cache line: one prefetch each

// f(T{}) with T the C++ type of `type`, float32 or bfloat16 (checked by the caller)
template <typename F>
void with_element_type(at::ScalarType type, F&& f) {
  if (type == at::kFloat) {
    f(float{});
  } else {
    f(BFloat16{});
  }
}

}  // namespace loradock
