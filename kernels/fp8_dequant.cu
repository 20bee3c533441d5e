// FP8 e4m3fn weights with 128 x 128 block scales to the model dtype, on the device: the frozen
// weights a layer holds in FP8 (`model::fp8_frozen`), dequantised when the layer runs.
//   out[r, c] = T(e4m3(w8[r, c]) * scales[r / 128, c / 128])
// e4m3 decoded exactly into f32 (sign, 4 exponent bits with bias 7, 3 mantissa bits;
// subnormals m 2^-9; 0x7f / 0xff NaN), one f32 product (round to nearest), one rounding to T
// (round to nearest even): the loader's host loop (`fp8::dequantize_into`) step for step.
// One thread per 4 consecutive values of a row.

#include <stdint.h>

#include "dtype.cuh"
#include "e4m3.cuh"

template <typename T>
__device__ void dequant(const uint8_t* __restrict__ w8, const float* __restrict__ scales, T* __restrict__ out,
                        int64_t rows, int64_t cols) {
  const int64_t col_blocks = (cols + 127) / 128;
  const int64_t quads = (cols + 3) / 4;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * quads) return;
  const int64_t r = i / quads, c0 = (i % quads) * 4;
  const float* srow = scales + (r / 128) * col_blocks;
  for (int64_t c = c0; c < c0 + 4 && c < cols; ++c)
    out[r * cols + c] = from_f32<T>(e4m3_to_f32(w8[r * cols + c]) * srow[c / 128]);
}

extern "C" __global__ void fp8_dequant_bf16(const uint8_t* w8, const float* scales, __nv_bfloat16* out, int64_t rows,
                                            int64_t cols) {
  dequant<__nv_bfloat16>(w8, scales, out, rows, cols);
}
extern "C" __global__ void fp8_dequant_f32(const uint8_t* w8, const float* scales, float* out, int64_t rows,
                                           int64_t cols) {
  dequant<float>(w8, scales, out, rows, cols);
}
