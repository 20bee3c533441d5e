// Rows x [S, D] in T (bf16 or f32) rounded to e4m3 codes with one f32 scale per row, and back:
// the MoE's FP8 dispatch (model::dispatch) and the indexer's FP8 selection scores
// (model::fp8_scores, power-of-two scales). Per row, as the host twins round it:
//   amax  = max |x|                              (exact in f32)
//   scale = f32(max(amax, 2^-100) / 448)          (one correctly rounded division), or with pow2
//           the smallest power of two with max(amax, 2^-100) / scale <= 448 (exact, from the bits)
//   code  = e4m3(clamp(f32(x / scale), -448, 448)) (one division, then nearest even into e4m3)
//   back  = T(f32(e4m3_value(code) * scale))      (one product, one rounding to T)
// __f*_rn keep nvcc from replacing the divisions by reciprocal products. Equal to the host's
// bits: `gpu-selftest --only fp8-dispatch`.

#include <stdint.h>

#include "dtype.cuh"
#include "e4m3.cuh"

#define FULL 0xffffffffu

// The smallest power of two s with a / s <= 448 = 1.75 2^8, for a >= 2^-100 (normal): with
// a = M 2^E (M in [1, 2)), s = 2^(E - 8) when M <= 1.75, else 2^(E - 7).
__device__ __forceinline__ float pow2_scale(float a) {
  const uint32_t bits = __float_as_uint(a);
  const int e = (int)((bits >> 23) & 0xff) - 127 - 8 + ((bits & 0x7fffff) > 0x600000u ? 1 : 0);
  return __uint_as_float((uint32_t)(e + 127) << 23);
}

// One warp per row: the row's amax, its scale, then its codes.
template <typename T>
__device__ void quantize(const T* __restrict__ x, uint8_t* __restrict__ codes, float* __restrict__ scales, int64_t rows,
                         int64_t cols, int pow2) {
  const int lane = threadIdx.x & 31;
  const int64_t r = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const T* xr = x + r * cols;
  float amax = 0.f;
  for (int64_t c = lane; c < cols; c += 32) amax = fmaxf(amax, fabsf(to_f32(xr[c])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, o));  // a max is exact in any order
  const float scale = pow2 ? pow2_scale(fmaxf(amax, 0x1p-100f)) : __fdiv_rn(fmaxf(amax, 0x1p-100f), 448.f);
  for (int64_t c = lane; c < cols; c += 32)
    codes[r * cols + c] = f32_to_e4m3(fminf(fmaxf(__fdiv_rn(to_f32(xr[c]), scale), -448.f), 448.f));
  if (lane == 0) scales[r] = scale;
}

// One thread per value.
template <typename T>
__device__ void dequantize(const uint8_t* __restrict__ codes, const float* __restrict__ scales, T* __restrict__ out,
                           int64_t rows, int64_t cols) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  out[i] = from_f32<T>(__fmul_rn(e4m3_to_f32(codes[i]), scales[i / cols]));
}

extern "C" __global__ void fp8_rows_quantize_bf16(const __nv_bfloat16* x, uint8_t* codes, float* scales, int64_t rows,
                                                  int64_t cols, int pow2) {
  quantize<__nv_bfloat16>(x, codes, scales, rows, cols, pow2);
}
extern "C" __global__ void fp8_rows_quantize_f32(const float* x, uint8_t* codes, float* scales, int64_t rows,
                                                 int64_t cols, int pow2) {
  quantize<float>(x, codes, scales, rows, cols, pow2);
}
extern "C" __global__ void fp8_rows_dequantize_bf16(const uint8_t* codes, const float* scales, __nv_bfloat16* out,
                                                    int64_t rows, int64_t cols) {
  dequantize<__nv_bfloat16>(codes, scales, out, rows, cols);
}
extern "C" __global__ void fp8_rows_dequantize_f32(const uint8_t* codes, const float* scales, float* out, int64_t rows,
                                                   int64_t cols) {
  dequantize<float>(codes, scales, out, rows, cols);
}
