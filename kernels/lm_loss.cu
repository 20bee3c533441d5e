// Next-token cross-entropy of logit rows and its gradient, fused: one block per row, two
// kernels (the loss and the row's max and sum; then the gradient from them).
//   m = max_v x[v], s = sum_v exp(x[v] - m), lse = log(s) + m
//   nll = lse - x[t]
//   grad[v] = (w / s) exp(x[v] - m) - w [v == t]       (d(w * nll) / dx, in the logits' dtype)
// x is read in its dtype (bf16 or f32) and every operation runs in f32. Pass 1 keeps a running
// (max, sum) per thread (the sum rescaled when the max grows), merged over the block in a fixed
// order; pass 2 reads the row again and writes the gradient. So the [rows, V] f32 work that the
// plain twin (losses::nll_rows_and_grad: max, shift, exp, sum, scale, scatter, cast, each a
// pass over f32 copies) holds never exists: two reads of the row and one write. The sums run
// in another order than the twin's, so values agree to f32 rounding (not bit for bit).
// A target outside the vocabulary gives a NaN loss (the caller validated the tokens) and a
// gradient without its -w term. -inf logits add nothing to the sum (probability 0), and a NaN
// logit makes its row's loss and gradient NaN.

#include <stdint.h>

#define CE_THREADS 1024
#define CE_WARPS (CE_THREADS / 32)

__device__ __forceinline__ float ce_load(const float* x, int i) { return x[i]; }
__device__ __forceinline__ float ce_load(const uint16_t* x, int i) { return __uint_as_float((uint32_t)x[i] << 16); }
__device__ __forceinline__ void ce_store(float* g, int i, float v) { g[i] = v; }
__device__ __forceinline__ void ce_store(uint16_t* g, int i, float v) {  // round to nearest even
  uint32_t u = __float_as_uint(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN stays NaN (quiet), as candle's cast keeps it
    g[i] = (uint16_t)((u >> 16) | 0x40u);
    return;
  }
  u += 0x7FFFu + ((u >> 16) & 1u);
  g[i] = (uint16_t)(u >> 16);
}

// (m1, s1) + (m2, s2) -> the pair of the union: sums rescaled to the larger max.
__device__ __forceinline__ void ce_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

// Pass 1: stats[row] = (nll, m, s).
template <typename T>
__device__ __forceinline__ void ce_stats_body(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                                              float* __restrict__ stats, int V) {
  __shared__ float red_m[CE_WARPS], red_s[CE_WARPS];
  const size_t row = blockIdx.x;
  const T* x = logits + row * (size_t)V;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float m = -INFINITY, s = 0.f;
  for (int v = tid; v < V; v += CE_THREADS) {
    const float xv = ce_load(x, v);
    if (xv > m) {
      s = s * expf(m - xv) + 1.f;
      m = xv;
    } else if (xv != -INFINITY) {  // exp(-inf - m) adds 0; with m still -inf it would add NaN
      s += expf(xv - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xFFFFFFFFu, m, o), s2 = __shfl_xor_sync(0xFFFFFFFFu, s, o);
    ce_merge(m, s, m2, s2);
  }
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
  }
  __syncthreads();
  if (tid == 0) {
    float mm = red_m[0], ss = red_s[0];
    for (int i = 1; i < CE_WARPS; ++i) ce_merge(mm, ss, red_m[i], red_s[i]);
    const uint32_t t = targets[row];
    stats[row * 3] = (t < (uint32_t)V) ? (logf(ss) + mm) - ce_load(x, (int)t) : __int_as_float(0x7fc00000);
    stats[row * 3 + 1] = mm;
    stats[row * 3 + 2] = ss;
  }
}

// Pass 2: the gradient of w * nll from the row's (m, s).
template <typename T>
__device__ __forceinline__ void ce_grad_body(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                                             const float* __restrict__ stats, float w, T* __restrict__ grad, int V) {
  const size_t row = blockIdx.x;
  const T* x = logits + row * (size_t)V;
  T* g = grad + row * (size_t)V;
  const float mm = stats[row * 3 + 1], scale = w / stats[row * 3 + 2];
  const uint32_t t = targets[row];
  for (int v = threadIdx.x; v < V; v += CE_THREADS) {
    float gv = scale * expf(ce_load(x, v) - mm);
    if ((uint32_t)v == t) gv += -w;
    ce_store(g, v, gv);
  }
}

#define CE_KERNELS(SUFFIX, T)                                                                                   \
  extern "C" __global__ void __launch_bounds__(CE_THREADS)                                                      \
      lm_ce_stats_##SUFFIX(const T* __restrict__ logits, const uint32_t* __restrict__ targets,                  \
                           float* __restrict__ stats, int V) {                                                  \
    ce_stats_body<T>(logits, targets, stats, V);                                                                \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(CE_THREADS)                                                      \
      lm_ce_grad_##SUFFIX(const T* __restrict__ logits, const uint32_t* __restrict__ targets,                   \
                          const float* __restrict__ stats, float w, T* __restrict__ grad, int V) {              \
    ce_grad_body<T>(logits, targets, stats, w, grad, V);                                                        \
  }

CE_KERNELS(f32, float)
CE_KERNELS(bf16, uint16_t)
