// SwiGLU's elementwise part in one pass each way, instead of the plain twins' chains of candle
// ops (ops::silu_mul_plain: silu then a product; ops::silu_mul_backward_plain: about a dozen
// f32 passes with their casts). With g, u the gate and up products (dtype T) and every value
// computed in f32 with the twins' operation order (__f*_rn keep nvcc from contracting):
//   forward:  h = T(T(g / (1 + exp(-g))) * u)            (candle's silu, then the product in T)
//   backward: sig = 1 / (exp(-g) + 1), silu = g sig,
//             du = T(dh silu),  dg = T((dh u) (sig ((g (1 - sig)) + 1)))
// which are the twins' values bit for bit (expf and IEEE division as candle's kernels use).

#include <stdint.h>

#include "dtype.cuh"

template <typename T>
__device__ void silu_mul(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ h, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float x = to_f32(g[i]);
    const float s = round_to<T>(__fdiv_rn(x, __fadd_rn(1.0f, expf(-x))));
    h[i] = from_f32<T>(__fmul_rn(s, to_f32(u[i])));
  }
}

template <typename T>
__device__ void silu_mul_bwd(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ dh, T* __restrict__ dg,
                             T* __restrict__ du, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float x = to_f32(g[i]), up = to_f32(u[i]), d = to_f32(dh[i]);
    const float sig = __fdiv_rn(1.0f, __fadd_rn(expf(-x), 1.0f));
    const float silu = __fmul_rn(x, sig);
    du[i] = from_f32<T>(__fmul_rn(d, silu));
    const float inner = __fadd_rn(__fmul_rn(x, __fadd_rn(1.0f, -sig)), 1.0f);
    dg[i] = from_f32<T>(__fmul_rn(__fmul_rn(d, up), __fmul_rn(sig, inner)));
  }
}

#define SWIGLU_KERNELS(T, SUF)                                                                                      \
  extern "C" __global__ void silu_mul_##SUF(const T* g, const T* u, T* h, long long n) { silu_mul<T>(g, u, h, n); } \
  extern "C" __global__ void silu_mul_bwd_##SUF(const T* g, const T* u, const T* dh, T* out, long long n) {        \
    silu_mul_bwd<T>(g, u, dh, out, out + n, n); /* dg then du */                                                   \
  }

SWIGLU_KERNELS(float, f32)
SWIGLU_KERNELS(__nv_bfloat16, bf16)
