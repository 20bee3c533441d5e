// Strided row copy: out[a, b, 0:W1] = x1[a, b, :] and out[a, b, W1:W1+W2] = x2[a, b, :], out
// contiguous [A, B, W1 + W2], each input read through its own strides for a and b (its last dim
// contiguous), with a cast to the output dtype (round to nearest even, as candle's casts).
// Why: the absorbed attention moves [T, H, C]-sized tensors between token-major (the kernels')
// and head-major (the per-head products') layouts and joins the latent and RoPE parts of the
// query; candle's generic strided copy does that at about a tenth of the memory bandwidth
// (index arithmetic per element over every dim). Here a block walks whole rows: one division
// per row, consecutive threads on consecutive elements of a row (coalesced both ways).
// Plain twin: Tensor::cat + to_dtype + contiguous (kernels::join_rows::join_rows_plain).

#include <stdint.h>

#include "dtype.cuh"

template <typename TI, typename TO>
__device__ void join_rows(const TI* __restrict__ x1, const TI* __restrict__ x2, TO* __restrict__ out, long long rows, long long nb,
                          int w1, int w2, long long s1a, long long s1b, long long s2a, long long s2b) {
  const int w = w1 + w2;
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const long long a = r / nb, b = r - a * nb;
    const TI* row1 = x1 + a * s1a + b * s1b;
    const TI* row2 = x2 + a * s2a + b * s2b;
    TO* o = out + r * w;
    for (int i = threadIdx.x; i < w1; i += blockDim.x) o[i] = from_f32<TO>(to_f32(row1[i]));
    for (int i = threadIdx.x; i < w2; i += blockDim.x) o[w1 + i] = from_f32<TO>(to_f32(row2[i]));
  }
}

#define JOIN_KERNEL(TI, TO, SUF)                                                                                        \
  extern "C" __global__ void join_rows_##SUF(const TI* x1, const TI* x2, TO* out, long long rows, long long nb, int w1, \
                                             int w2, long long s1a, long long s1b, long long s2a, long long s2b) {       \
    join_rows<TI, TO>(x1, x2, out, rows, nb, w1, w2, s1a, s1b, s2a, s2b);                                               \
  }

JOIN_KERNEL(__nv_bfloat16, __nv_bfloat16, bf16_bf16)
JOIN_KERNEL(__nv_bfloat16, float, bf16_f32)
JOIN_KERNEL(float, __nv_bfloat16, f32_bf16)
JOIN_KERNEL(float, float, f32_f32)
