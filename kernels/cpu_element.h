// The element types of the compiled CPU ops (cpu_lora.cpp, cpu_attention.cpp): float32 and bfloat16, both summed
// in float32.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

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
