// AdamW on f32 tensors in two passes, each operation rounded as the plain twin's candle ops
// round it (train::optim::AdamW::step_with_norms), so the results are the twin's bit for bit
// (up to the sign of zeros: candle's affine x * mul + add turns -0 into +0):
//   pass 1 (moments):  g' = g * gscale;  m' = m * b1 + g' * (1 - b1);  v' = v * b2 + (g' * g') * (1 - b2)
//   pass 2 (weights):  update = (m' * ibc1) / (sqrt(v' * ibc2) + eps);  w' = w - update * lr
//                      [- w * (lr * wd) when the tensor decays]
// ibc = 1 / (1 - beta^t) as candle's `tensor / f64` multiplies by the reciprocal. Every scalar is
// the f64 value rounded to f32, as candle's affine takes it. The __f*_rn intrinsics keep nvcc
// from contracting a multiply and an add into one fma (which rounds once, not twice).
// mv holds m' then v' ([2, n]).

#include <stdint.h>

extern "C" __global__ void adamw_moments_f32(const float* __restrict__ g, const float* __restrict__ m,
                                             const float* __restrict__ v, float* __restrict__ mv, long long n,
                                             float gscale, float b1, float omb1, float b2, float omb2) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float gg = __fmul_rn(g[i], gscale);
    mv[i] = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gg, omb1));
    mv[n + i] = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gg, gg), omb2));
  }
}

extern "C" __global__ void adamw_weights_f32(const float* __restrict__ w, const float* __restrict__ mv,
                                             float* __restrict__ out, long long n, float ibc1, float ibc2, float eps,
                                             float lr, float decay, int has_decay) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float m_hat = __fmul_rn(mv[i], ibc1), v_hat = __fmul_rn(mv[n + i], ibc2);
    const float update = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), eps));
    float next = __fsub_rn(w[i], __fmul_rn(update, lr));
    if (has_decay) next = __fsub_rn(next, __fmul_rn(w[i], decay));
    out[i] = next;
  }
}
