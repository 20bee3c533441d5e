// Sparse MLA in absorbed (MQA) mode over each query's selected keys: forward with per-head
// log-sum-exp, backward, and the head-mean probabilities that are the sparse-stage KL target.
//
// Shapes (row-major, f32): q [N, H, DQK] (latent query C plus rope R), kv [NKV, DQK] (one shared
// key per token; its first DV = C dims are also the value), idx [N, K] u32 absolute kv rows,
// 0xFFFFFFFF for padding. scale multiplies the scores. Output of the forward: [N, H, DV + 1],
// the attention output followed by the row's natural-log LSE of the scaled scores.
//
// Version 1 runs on CUDA cores (FFMA): one block per (query, group of 8 heads); 4 warps, each
// owning 2 heads; a tile of 32 selected kv rows is gathered into shared memory once and read by
// every head of the block; lane j scores key j of the tile; online softmax per head; each lane
// accumulates DV/32 output dims. The backward accumulates dkv with atomics (its summation
// order is not deterministic; a deterministic key-centric pass is planned), the block's
// per-key sums over heads being one small product in shared memory. Numerics: f32
// throughout, expf/logf (no fast-math), the same max-shifted softmax as the plain twin.

#include <stdint.h>
#include <math.h>

#define WARPS 4
#define HEADS_PER_WARP 2
#define HEADS_PER_BLOCK (WARPS * HEADS_PER_WARP)
#define TILE 32
#define MAXV 16   // DV <= 512
#define MAXQ 18   // DQK <= 576
#define INVALID 0xFFFFFFFFu
#define FULL 0xFFFFFFFFu

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
}

// Gather a tile of selected kv rows into shared memory (row stride DQK + 1 avoids bank
// conflicts when lane j reads row j). Padding rows are zero.
__device__ __forceinline__ void load_tile(float* kv_s, const float* kv, const uint32_t* row, int t0,
                                          int K, int DQK) {
  const int stride = DQK + 1;
  for (int i = threadIdx.x; i < TILE * DQK; i += blockDim.x) {
    int r = i / DQK, d = i - r * DQK, j = t0 + r;
    uint32_t s = (j < K) ? row[j] : INVALID;
    kv_s[r * stride + d] = (s != INVALID) ? kv[(size_t)s * DQK + d] : 0.f;
  }
}

// Stage the rows of heads h0 .. h0 + HEADS_PER_BLOCK of query n into shared memory, times
// `mul`; heads past H are zero. src is [N, H, stride] with the first D columns wanted.
__device__ __forceinline__ void load_heads(float* dst, const float* src, int n, int H, int h0, int D, int stride,
                                           float mul) {
  for (int i = threadIdx.x; i < HEADS_PER_BLOCK * D; i += blockDim.x) {
    int hh = i / D, d = i - hh * D, h = h0 + hh;
    dst[i] = (h < H) ? src[((size_t)n * H + h) * stride + d] * mul : 0.f;
  }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
sparse_mla_fwd_f32(const float* __restrict__ q, const float* __restrict__ kv, const uint32_t* __restrict__ idx,
                   float* __restrict__ out, int N, int H, int K, int DQK, int DV, float scale) {
  extern __shared__ float smem[];
  const int stride = DQK + 1;
  float* kv_s = smem;
  float* q_s = kv_s + TILE * stride;  // [HEADS_PER_BLOCK][DQK], pre-scaled
  const int n = blockIdx.x, h0 = blockIdx.y * HEADS_PER_BLOCK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_heads(q_s, q, n, H, h0, DQK, DQK, scale);
  float m[HEADS_PER_WARP], l[HEADS_PER_WARP], acc[HEADS_PER_WARP][MAXV];
#pragma unroll
  for (int hw = 0; hw < HEADS_PER_WARP; ++hw) {
    m[hw] = -INFINITY;
    l[hw] = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) acc[hw][i] = 0.f;
  }
  const uint32_t* row = idx + (size_t)n * K;
  for (int t0 = 0; t0 < K; t0 += TILE) {
    __syncthreads();
    load_tile(kv_s, kv, row, t0, K, DQK);
    __syncthreads();
    const int j = t0 + lane;
    const bool valid = j < K && row[j] != INVALID;
    const float* kv_j = kv_s + lane * stride;
#pragma unroll
    for (int hw = 0; hw < HEADS_PER_WARP; ++hw) {
      const int hh = warp * HEADS_PER_WARP + hw;
      if (h0 + hh >= H) continue;  // warp-uniform
      const float* qh = q_s + hh * DQK;
      float sc = -INFINITY;
      if (valid) {
        float dot = 0.f;
        for (int d = 0; d < DQK; ++d) dot = fmaf(qh[d], kv_j[d], dot);
        sc = dot;
      }
      const float m_new = fmaxf(m[hw], warp_max(sc));
      if (m_new == -INFINITY) continue;  // nothing valid yet (warp-uniform)
      const float p = valid ? expf(sc - m_new) : 0.f;
      const float corr = (m[hw] == -INFINITY) ? 0.f : expf(m[hw] - m_new);
      l[hw] = l[hw] * corr + warp_sum(p);
#pragma unroll
      for (int i = 0; i < MAXV; ++i) acc[hw][i] *= corr;
      for (int jj = 0; jj < TILE; ++jj) {
        const float pj = __shfl_sync(FULL, p, jj);
        const float* v = kv_s + jj * stride;
#pragma unroll
        for (int i = 0; i < MAXV; ++i) {
          const int d = lane + 32 * i;
          if (d < DV) acc[hw][i] = fmaf(pj, v[d], acc[hw][i]);
        }
      }
      m[hw] = m_new;
    }
  }
#pragma unroll
  for (int hw = 0; hw < HEADS_PER_WARP; ++hw) {
    const int h = h0 + warp * HEADS_PER_WARP + hw;
    if (h >= H) continue;
    float* o = out + ((size_t)n * H + h) * (DV + 1);
    const float inv = 1.f / l[hw];
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int d = lane + 32 * i;
      if (d < DV) o[d] = acc[hw][i] * inv;
    }
    if (lane == 0) o[DV] = m[hw] + logf(l[hw]);
  }
}

// Head-mean probabilities over the selected keys: pmean [N, K] = mean_h exp(s[h, j] - lse[h]).
// One block per query; warps take heads in turn; lane j owns key j of the tile.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
sparse_mla_probs_f32(const float* __restrict__ q, const float* __restrict__ kv, const uint32_t* __restrict__ idx,
                     const float* __restrict__ fwd_out, float* __restrict__ pmean, int N, int H, int K, int DQK,
                     int DV, float scale) {
  extern __shared__ float smem[];
  const int stride = DQK + 1;
  float* kv_s = smem;
  float* part = kv_s + TILE * stride;  // [WARPS][TILE]
  const int n = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t* row = idx + (size_t)n * K;
  for (int t0 = 0; t0 < K; t0 += TILE) {
    __syncthreads();
    load_tile(kv_s, kv, row, t0, K, DQK);
    __syncthreads();
    const int j = t0 + lane;
    const bool valid = j < K && row[j] != INVALID;
    float sum = 0.f;
    for (int h = warp; h < H; h += WARPS) {
      const float* qh = q + ((size_t)n * H + h) * DQK;
      const float lse = fwd_out[((size_t)n * H + h) * (DV + 1) + DV];
      if (valid) {
        float dot = 0.f;
        for (int d = 0; d < DQK; ++d) dot = fmaf(qh[d], kv_s[lane * stride + d], dot);
        sum += expf(dot * scale - lse);
      }
    }
    part[warp * TILE + lane] = sum;
    __syncthreads();
    if (warp == 0 && j < K) {
      float total = 0.f;
      for (int w = 0; w < WARPS; ++w) total += part[w * TILE + lane];
      pmean[(size_t)n * K + j] = total / H;
    }
  }
}

// Backward. delta [N, H] = sum_d dout . out (precomputed). dq [N, H, DQK] is written; dkv
// [NKV, DQK] must be zero on entry and is accumulated with one global atomic per element per
// block (summation order across blocks is not deterministic).
// Per key j: p = exp(s - lse); dp = dout_h . v_j; ds = p (dp - delta_h);
// dq_h += scale ds kv_j;  dkv_j += scale ds q_h  (+ p dout_h on the value dims).
// The block's dkv tile [TILE, DQK] is a small matrix product over its heads,
// dS^T [TILE, HPB] x (scale Q) [HPB, DQK] + P^T [TILE, HPB] x dO [HPB, DV], computed by all
// threads from ds and p staged in shared memory (no shared-memory atomics).
extern "C" __global__ void __launch_bounds__(WARPS * 32)
sparse_mla_bwd_f32(const float* __restrict__ q, const float* __restrict__ kv, const uint32_t* __restrict__ idx,
                   const float* __restrict__ fwd_out, const float* __restrict__ dout, const float* __restrict__ delta,
                   float* __restrict__ dq, float* __restrict__ dkv, int N, int H, int K, int DQK, int DV, float scale) {
  extern __shared__ float smem[];
  const int stride = DQK + 1;
  float* kv_s = smem;                              // [TILE][stride]
  float* q_s = kv_s + TILE * stride;               // [HEADS_PER_BLOCK][DQK], scaled
  float* do_s = q_s + HEADS_PER_BLOCK * DQK;       // [HEADS_PER_BLOCK][DV]
  float* ds_s = do_s + HEADS_PER_BLOCK * DV;       // [HEADS_PER_BLOCK][TILE]
  float* p_s = ds_s + HEADS_PER_BLOCK * TILE;      // [HEADS_PER_BLOCK][TILE]
  const int n = blockIdx.x, h0 = blockIdx.y * HEADS_PER_BLOCK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_heads(q_s, q, n, H, h0, DQK, DQK, scale);
  load_heads(do_s, dout, n, H, h0, DV, DV + 1, 1.f);
  float dq_acc[HEADS_PER_WARP][MAXQ];
#pragma unroll
  for (int hw = 0; hw < HEADS_PER_WARP; ++hw)
#pragma unroll
    for (int i = 0; i < MAXQ; ++i) dq_acc[hw][i] = 0.f;
  const uint32_t* row = idx + (size_t)n * K;
  for (int t0 = 0; t0 < K; t0 += TILE) {
    __syncthreads();
    load_tile(kv_s, kv, row, t0, K, DQK);
    __syncthreads();
    const int j = t0 + lane;
    const bool valid = j < K && row[j] != INVALID;
    const float* kv_j = kv_s + lane * stride;
#pragma unroll
    for (int hw = 0; hw < HEADS_PER_WARP; ++hw) {
      const int hh = warp * HEADS_PER_WARP + hw, h = h0 + hh;
      float ds = 0.f, p = 0.f;
      if (h < H && valid) {
        const float* qh = q_s + hh * DQK;
        const float* doh = do_s + hh * DV;
        float dot = 0.f, dp = 0.f;
        for (int d = 0; d < DQK; ++d) dot = fmaf(qh[d], kv_j[d], dot);
        for (int d = 0; d < DV; ++d) dp = fmaf(doh[d], kv_j[d], dp);
        const size_t nh = (size_t)n * H + h;
        p = expf(dot - fwd_out[nh * (DV + 1) + DV]);
        ds = p * (dp - delta[nh]);
      }
      ds_s[hh * TILE + lane] = ds;
      p_s[hh * TILE + lane] = p;
      if (h >= H) continue;  // warp-uniform
      // dq: lane owns dims lane + 32 i; sum over the tile's keys.
      for (int jj = 0; jj < TILE; ++jj) {
        const float dsj = __shfl_sync(FULL, ds, jj) * scale;
        const float* kvr = kv_s + jj * stride;
#pragma unroll
        for (int i = 0; i < MAXQ; ++i) {
          const int d = lane + 32 * i;
          if (d < DQK) dq_acc[hw][i] = fmaf(dsj, kvr[d], dq_acc[hw][i]);
        }
      }
    }
    __syncthreads();
    // dkv tile: element (r, d) sums over the block's heads; one global atomic each.
    for (int i = threadIdx.x; i < TILE * DQK; i += blockDim.x) {
      const int r = i / DQK, d = i - r * DQK, jr = t0 + r;
      const uint32_t s = (jr < K) ? row[jr] : INVALID;
      if (s == INVALID) continue;
      float g = 0.f;
#pragma unroll
      for (int hh = 0; hh < HEADS_PER_BLOCK; ++hh) {
        g = fmaf(ds_s[hh * TILE + r], q_s[hh * DQK + d], g);  // q_s is pre-scaled
        if (d < DV) g = fmaf(p_s[hh * TILE + r], do_s[hh * DV + d], g);
      }
      atomicAdd(dkv + (size_t)s * DQK + d, g);
    }
  }
#pragma unroll
  for (int hw = 0; hw < HEADS_PER_WARP; ++hw) {
    const int h = h0 + warp * HEADS_PER_WARP + hw;
    if (h >= H) continue;
#pragma unroll
    for (int i = 0; i < MAXQ; ++i) {
      const int d = lane + 32 * i;
      if (d < DQK) dq[((size_t)n * H + h) * DQK + d] = dq_acc[hw][i];
    }
  }
}
