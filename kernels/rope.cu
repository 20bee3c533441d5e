// Rotary position embedding of x [B, T, H, R] in one pass, forward and backward, instead of the
// plain twins' chains of candle ops (ops::rope_interleaved_plain and ops::rope_half_plain:
// narrows, four products, an add, a sub and a stack or cat, then as many backward kernels with
// autograd's zero-fill and add per edge). Pair i of a row is (x[2i], x[2i+1]) when interleaved
// (MLA) and (x[i], x[i + R/2]) for the halves (the indexer); c and s are cos and sin of row t,
// column i of the [T, R/2] f32 tables, rounded to T as the twins cast them. With every
// product and sum rounded to T as the twins' ops round them:
//   forward:  a' = T(T(a c) - T(b s)),   b' = T(T(a s) + T(b c))
//   backward: da = T(T(da' c) + T(db' s)), db = T(T(db' c) - T(da' s))   (the rotation by -angle)
// which are the twins' results bit for bit (a sum of two terms rounds the same in either order,
// and autograd's zero-filled gradient plus a term is that term). __f*_rn keep nvcc from
// contracting a product into an fma.

#include <stdint.h>

#include "dtype.cuh"

// One thread per pair; pairs = B T H R/2. `inverse` rotates by the negative angle (the backward).
template <typename T>
__device__ void rope_pairs(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin, T* __restrict__ y,
                           long long pairs, int t_len, int heads, int half, int interleaved, int inverse) {
  for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs; p += (long long)gridDim.x * blockDim.x) {
    const int i = (int)(p % half);
    const long long row = p / half;  // (b t) h
    const int t = (int)((row / heads) % t_len);
    const long long base = row * 2 * half;
    const long long ia = interleaved ? base + 2 * i : base + i;
    const long long ib = interleaved ? ia + 1 : ia + half;
    const float c = round_to<T>(cos[(long long)t * half + i]), s = round_to<T>(sin[(long long)t * half + i]);
    const float a = to_f32(x[ia]), b = to_f32(x[ib]);
    float ya, yb;
    if (!inverse) {
      ya = __fsub_rn(round_to<T>(__fmul_rn(a, c)), round_to<T>(__fmul_rn(b, s)));
      yb = __fadd_rn(round_to<T>(__fmul_rn(a, s)), round_to<T>(__fmul_rn(b, c)));
    } else {
      ya = __fadd_rn(round_to<T>(__fmul_rn(a, c)), round_to<T>(__fmul_rn(b, s)));
      yb = __fsub_rn(round_to<T>(__fmul_rn(b, c)), round_to<T>(__fmul_rn(a, s)));
    }
    y[ia] = from_f32<T>(ya);
    y[ib] = from_f32<T>(yb);
  }
}

#define ROPE_KERNEL(T, SUF)                                                                                   \
  extern "C" __global__ void rope_##SUF(const T* x, const float* cos, const float* sin, T* y, long long pairs, \
                                        int t_len, int heads, int half, int interleaved, int inverse) {       \
    rope_pairs<T>(x, cos, sin, y, pairs, t_len, heads, half, interleaved, inverse);                           \
  }

ROPE_KERNEL(float, f32)
ROPE_KERNEL(__nv_bfloat16, bf16)
