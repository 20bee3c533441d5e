// Row sums through a sparse row map (CSR), the one kernel behind `rows::RowMap`:
//   out[i, c] = sum over j in [off[i], off[i + 1]) of x[src[j], c]
// added in f32 in increasing j, rounded once to the output type. A gather is the map with one
// entry per row; its adjoint (a scatter-add) is the transposed map, so forward and backward
// are both this kernel and both deterministic: no atomics, a fixed order of additions.
// One block per output row; its threads stride over the columns (coalesced row reads).
// candle's own index_add gives one thread per column a serial loop over all ids instead.
//
// The MoE combine's two passes (`RowPlan::apply_weighted`, `RowPlan::gather_scaled_dot`), each
// the plain twin's chain of candle ops in one pass, with its roundings:
//   weighted sum:  out[i, c] = T(sum over j of f32(T(x[src[j], c] w[src[j]])))   (the product
//                  rounded to T as candle's broadcast_mul rounds it; the sum as row_sum's)
//   gather-scale and gather-dot (a gather: one entry per output row, g = x[src[i]]):
//                  gw[i, c] = T(g[c] w[i]),  dot[i] = sum over c of f32(g[c]) f32(y[i, c]) (f32;
//                  the twin's candle sum adds in another order: equal to f32 rounding)
// A bf16 x bf16 product is exact in f32, so rounding it once to T is T's own product.

#include <stdint.h>

#include "dtype.cuh"

template <typename T>
__device__ void row_sum(const T* __restrict__ x, const uint32_t* __restrict__ src, const uint32_t* __restrict__ off,
                        T* __restrict__ out, int d) {
  const size_t i = blockIdx.x;
  const uint32_t begin = off[i], end = off[i + 1];
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (uint32_t j = begin; j < end; ++j) acc += to_f32(x[(size_t)src[j] * d + c]);
    out[i * d + c] = from_f32<T>(acc);
  }
}

extern "C" __global__ void rows_sum_f32(const float* x, const uint32_t* src, const uint32_t* off, float* out, int d) {
  row_sum<float>(x, src, off, out, d);
}
extern "C" __global__ void rows_sum_bf16(const __nv_bfloat16* x, const uint32_t* src, const uint32_t* off, __nv_bfloat16* out, int d) {
  row_sum<__nv_bfloat16>(x, src, off, out, d);
}
extern "C" __global__ void rows_sum_f16(const __half* x, const uint32_t* src, const uint32_t* off, __half* out, int d) {
  row_sum<__half>(x, src, off, out, d);
}

template <typename T>
__device__ void row_wsum(const T* __restrict__ x, const T* __restrict__ w, const uint32_t* __restrict__ src,
                         const uint32_t* __restrict__ off, T* __restrict__ out, int d) {
  const size_t i = blockIdx.x;
  const uint32_t begin = off[i], end = off[i + 1];
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (uint32_t j = begin; j < end; ++j) {
      const size_t r = src[j];
      acc += round_to<T>(__fmul_rn(to_f32(x[r * d + c]), to_f32(w[r])));
    }
    out[i * d + c] = from_f32<T>(acc);
  }
}

// A gather (one entry per output row, g = x[src[i]]) scaled by a weight per output row.
template <typename T>
__device__ void gather_scale(const T* __restrict__ x, const T* __restrict__ w, const uint32_t* __restrict__ src,
                             T* __restrict__ gw, int d) {
  const size_t i = blockIdx.x, r = src[i];
  const float wi = to_f32(w[i]);
  for (int c = threadIdx.x; c < d; c += blockDim.x) gw[i * d + c] = from_f32<T>(__fmul_rn(to_f32(x[r * d + c]), wi));
}

// The gathered rows' dot products with y's rows (f32); one block of 256 threads per row.
template <typename T>
__device__ void gather_dot(const T* __restrict__ x, const T* __restrict__ y, const uint32_t* __restrict__ src,
                           float* __restrict__ dot, int d) {
  __shared__ float part[8];
  const size_t i = blockIdx.x, r = src[i];
  float acc = 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) acc = fmaf(to_f32(x[r * d + c]), to_f32(y[i * d + c]), acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int k = 0; k < (int)(blockDim.x >> 5); ++k) sum += part[k];
    dot[i] = sum;
  }
}

#define WEIGHTED_KERNELS(T, SUF)                                                                                   \
  extern "C" __global__ void rows_wsum_##SUF(const T* x, const T* w, const uint32_t* src, const uint32_t* off,    \
                                             T* out, int d) {                                                     \
    row_wsum<T>(x, w, src, off, out, d);                                                                           \
  }                                                                                                                \
  extern "C" __global__ void rows_gather_scale_##SUF(const T* x, const T* w, const uint32_t* src, T* gw, int d) { \
    gather_scale<T>(x, w, src, gw, d);                                                                             \
  }                                                                                                                \
  extern "C" __global__ void __launch_bounds__(256)                                                                \
      rows_gather_dot_##SUF(const T* x, const T* y, const uint32_t* src, float* dot, int d) {                      \
    gather_dot<T>(x, y, src, dot, d);                                                                              \
  }

WEIGHTED_KERNELS(float, f32)
WEIGHTED_KERNELS(__nv_bfloat16, bf16)
