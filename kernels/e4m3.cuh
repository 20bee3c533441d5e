// FP8 e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities, 0x7f / 0xff
// NaN, largest finite 448) to and from f32, shared by fp8_dequant.cu and fp8_rows.cu.
#pragma once
#include <stdint.h>

// Exact: (8 + man) 2^(exp - 10) for normals, man 2^-9 for subnormals.
__device__ __forceinline__ float e4m3_to_f32(uint8_t b) {
  const int exp = (b >> 3) & 0x0f, man = b & 0x07;
  if (exp == 0x0f && man == 0x07) return __int_as_float(0x7fc00000);
  const float mag = exp == 0 ? ldexpf((float)man, -9) : ldexpf((float)(8 + man), exp - 10);
  return (b & 0x80) ? -mag : mag;
}

// q finite with |q| <= 448, rounded to the nearest e4m3 value, ties to even (the host's
// float8::F8E4M3::from_f32 on the same range, sign of zero kept). The scalings by powers of two
// are exact; rintf rounds half to even.
__device__ __forceinline__ uint8_t f32_to_e4m3(float q) {
  const uint8_t sign = signbit(q) ? 0x80 : 0;
  const float a = fabsf(q);
  if (a < 0.015625f) return sign | (uint8_t)rintf(a * 512.f);  // below 2^-6: steps of 2^-9 (8 is 2^-6's code)
  int e;
  frexpf(a, &e);  // a in [2^(e-1), 2^e)
  int m = (int)rintf(ldexpf(a, 4 - e));  // 8..16: the significand with 3 fraction bits
  if (m == 16) { m = 8; ++e; }
  return sign | (uint8_t)(((e + 6) << 3) | (m - 8));
}
