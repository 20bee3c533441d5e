// RMSNorm over the last dim D of [rows, D] rows, forward and backward, in one pass each instead
// of the plain twin's chain of candle ops (ops::rms_norm_plain: nine forward ops, about thirty
// backward kernels with autograd's zero-fill and add per edge). T is the activations' dtype
// (bf16 or f32); w is already in T. Per row, as the twin rounds it:
//   ms = (sum x^2) * (1/D),  s = sqrt(ms + eps),  n = x / s  (f32, IEEE division and sqrt)
//   y  = T(T(n) * w)         (the product of two bf16 values is exact in f32, rounded once)
// Backward, for dy [rows, D] in T (dx with the twin's two roundings to T):
//   dn = f32(T(dy * w)),  dot = sum dn x,  dx = T(dn / s - x (dot / (D s^3)))
//   dw = T(sum over rows of dy * T(n))   (f32 products and sums, per chunk of rows, chunks summed
//        after; the twin rounds each product to T and sums in T: this is the more accurate one)
// The sums run in another order than candle's reductions, so s can differ from the twin's by
// an f32 rounding, and T(n) then by one step of T in rare elements (y by up to two). __f*_rn keep nvcc from
// contracting multiply-adds (each step rounds as the twin's op does).

#include <stdint.h>

#include "dtype.cuh"

#define FULL 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;  // the same bits in every lane (each lane adds the same pairs in the same order)
}

// s of one row, for a warp (lanes stride the row).
template <typename T> __device__ __forceinline__ float row_scale(const T* xr, int d, float inv_d, float eps, int lane) {
  float ss = 0.f;
  for (int j = lane; j < d; j += 32) {
    const float v = to_f32(xr[j]);
    ss = __fadd_rn(ss, __fmul_rn(v, v));
  }
  return __fsqrt_rn(__fadd_rn(__fmul_rn(warp_sum(ss), inv_d), eps));
}

// One warp per row.
template <typename T>
__device__ void rms_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, long long rows, int d, float inv_d, float eps) {
  const int lane = threadIdx.x & 31;
  const long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const T* xr = x + r * d;
  const float s = row_scale(xr, d, inv_d, eps, lane);
  for (int j = lane; j < d; j += 32) {
    const float nb = round_to<T>(__fdiv_rn(to_f32(xr[j]), s));
    y[r * d + j] = from_f32<T>(__fmul_rn(nb, to_f32(w[j])));
  }
}

// s of every row (for the backward's two passes), one warp per row.
template <typename T>
__device__ void rms_scale(const T* __restrict__ x, float* __restrict__ scale, long long rows, int d, float inv_d, float eps) {
  const int lane = threadIdx.x & 31;
  const long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const float s = row_scale(x + r * d, d, inv_d, eps, lane);
  if (lane == 0) scale[r] = s;
}

// dx of one row per warp, from the row's s.
template <typename T>
__device__ void rms_bwd_dx(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy, const float* __restrict__ scale,
                           T* __restrict__ dx, long long rows, int d, float inv_d) {
  const int lane = threadIdx.x & 31;
  const long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const T* xr = x + r * d;
  const T* dyr = dy + r * d;
  const float s = scale[r];
  float dot = 0.f;
  for (int j = lane; j < d; j += 32) dot = __fadd_rn(dot, __fmul_rn(round_to<T>(__fmul_rn(to_f32(dyr[j]), to_f32(w[j]))), to_f32(xr[j])));
  dot = warp_sum(dot);
  const float a = __fmul_rn(__fdiv_rn(dot, __fmul_rn(__fmul_rn(s, s), s)), inv_d);
  for (int j = lane; j < d; j += 32) {
    const float dn = round_to<T>(__fmul_rn(to_f32(dyr[j]), to_f32(w[j])));
    dx[r * d + j] = from_f32<T>(__fsub_rn(__fdiv_rn(dn, s), __fmul_rn(to_f32(xr[j]), a)));
  }
}

// Partial dw of a chunk of `chunk` rows: block (32, 8), grid (ceil(D / 32), chunks); thread
// (tx, ty) sums rows ty, ty + 8, ... of the chunk for column 32 bx + tx, and the eight partial
// sums of a column meet in a fixed order (deterministic).
template <typename T>
__device__ void rms_bwd_dw(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ scale,
                           float* __restrict__ partial, long long rows, int d, int chunk) {
  __shared__ float acc[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int j = blockIdx.x * 32 + tx;
  const long long r0 = (long long)blockIdx.y * chunk;
  const long long r1 = r0 + chunk < rows ? r0 + chunk : rows;
  float sum = 0.f;
  if (j < d)
    for (long long r = r0 + ty; r < r1; r += 8) {
      const float nb = round_to<T>(__fdiv_rn(to_f32(x[r * d + j]), scale[r]));
      sum = __fadd_rn(sum, __fmul_rn(to_f32(dy[r * d + j]), nb));
    }
  acc[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && j < d) {
    float t = acc[0][tx];
#pragma unroll
    for (int i = 1; i < 8; ++i) t = __fadd_rn(t, acc[i][tx]);
    partial[(long long)blockIdx.y * d + j] = t;
  }
}

#define RMS_KERNELS(T, SUF)                                                                                          \
  extern "C" __global__ void rms_norm_fwd_##SUF(const T* x, const T* w, T* y, long long rows, int d, float inv_d,    \
                                                float eps) {                                                         \
    rms_fwd<T>(x, w, y, rows, d, inv_d, eps);                                                                        \
  }                                                                                                                  \
  extern "C" __global__ void rms_norm_scale_##SUF(const T* x, float* scale, long long rows, int d, float inv_d,     \
                                                  float eps) {                                                       \
    rms_scale<T>(x, scale, rows, d, inv_d, eps);                                                                     \
  }                                                                                                                  \
  extern "C" __global__ void rms_norm_bwd_dx_##SUF(const T* x, const T* w, const T* dy, const float* scale, T* dx,   \
                                                   long long rows, int d, float inv_d) {                             \
    rms_bwd_dx<T>(x, w, dy, scale, dx, rows, d, inv_d);                                                              \
  }                                                                                                                  \
  extern "C" __global__ void rms_norm_bwd_dw_##SUF(const T* x, const T* dy, const float* scale, float* partial,      \
                                                   long long rows, int d, int chunk) {                               \
    rms_bwd_dw<T>(x, dy, scale, partial, rows, d, chunk);                                                            \
  }

RMS_KERNELS(float, f32)
RMS_KERNELS(__nv_bfloat16, bf16)
