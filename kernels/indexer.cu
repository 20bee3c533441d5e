// Lightning-indexer scores at each query's selected keys, and their backward:
//   I[n, j] = sum_h w[n, h] * ReLU(q[n, h, :] . k[idx[n, j], :])
// q [N, HI, DI], w [N, HI] (scale folded in), k [NK, DI], idx [N, K] u32 absolute rows
// (0xFFFFFFFF = padding, scored 0). The sparse-stage KL needs only these [N, K] scores, so
// nothing of size [N, HI, K] or [N, K, DI] is ever stored. f32, CUDA cores (version 1).
// One block per query, 4 warps; warps split the heads, lanes the 32 keys of a tile.

#include <stdint.h>

#define WARPS 4
#define TILE 32
#define MAX_DI 128
#define DPL (MAX_DI / 32)         // dims per lane
#define MAX_HPW 16                // heads per warp: HI <= 64
#define INVALID 0xFFFFFFFFu
#define FULL 0xFFFFFFFFu

__device__ __forceinline__ void load_keys(float* k_s, const float* k, const uint32_t* row, int t0, int K, int DI) {
  for (int i = threadIdx.x; i < TILE * DI; i += blockDim.x) {
    int r = i / DI, d = i - r * DI, j = t0 + r;
    uint32_t s = (j < K) ? row[j] : INVALID;
    k_s[r * (DI + 1) + d] = (s != INVALID) ? k[(size_t)s * DI + d] : 0.f;
  }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
indexer_scores_at_f32(const float* __restrict__ q, const float* __restrict__ w, const float* __restrict__ k,
                      const uint32_t* __restrict__ idx, float* __restrict__ out, int N, int HI, int DI, int K) {
  extern __shared__ float smem[];
  float* q_s = smem;                       // [HI][DI]
  float* k_s = q_s + HI * DI;              // [TILE][DI+1]
  float* part = k_s + TILE * (DI + 1);     // [WARPS][TILE]
  const int n = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) q_s[i] = q[(size_t)n * HI * DI + i];
  const uint32_t* row = idx + (size_t)n * K;
  for (int t0 = 0; t0 < K; t0 += TILE) {
    __syncthreads();
    load_keys(k_s, k, row, t0, K, DI);
    __syncthreads();
    const float* kj = k_s + lane * (DI + 1);
    float acc = 0.f;
    for (int h = warp; h < HI; h += WARPS) {
      const float* qh = q_s + h * DI;
      float a = 0.f;
      for (int d = 0; d < DI; ++d) a = fmaf(qh[d], kj[d], a);
      acc = fmaf(w[(size_t)n * HI + h], fmaxf(a, 0.f), acc);
    }
    part[warp * TILE + lane] = acc;
    __syncthreads();
    const int j = t0 + lane;
    if (warp == 0 && j < K) {
      float s = 0.f;
      for (int x = 0; x < WARPS; ++x) s += part[x * TILE + lane];
      out[(size_t)n * K + j] = (row[j] != INVALID) ? s : 0.f;
    }
  }
}

// Backward from dI [N, K]: per (n, h, j) with a = q_h . k_j:
//   dw[n, h] += dI_j ReLU(a);  g = dI_j w_h [a > 0];  dq[n, h] += g k_j;  dk[idx_j] += g q_h.
// dq [N, HI, DI] and dw [N, HI] are written; dk [NK, DI] must be zero and is accumulated with
// one atomic per element per block (order not deterministic). g is staged in shared memory so
// that dk's per-tile sum over heads is one small product (no shared-memory atomics).
extern "C" __global__ void __launch_bounds__(WARPS * 32)
indexer_scores_at_bwd_f32(const float* __restrict__ q, const float* __restrict__ w, const float* __restrict__ k,
                          const uint32_t* __restrict__ idx, const float* __restrict__ dI, float* __restrict__ dq,
                          float* __restrict__ dw, float* __restrict__ dk, int N, int HI, int DI, int K) {
  extern __shared__ float smem[];
  float* q_s = smem;                       // [HI][DI]
  float* k_s = q_s + HI * DI;              // [TILE][DI+1]
  float* g_s = k_s + TILE * (DI + 1);      // [HI][TILE]
  const int n = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < HI * DI; i += blockDim.x) q_s[i] = q[(size_t)n * HI * DI + i];
  float dq_acc[MAX_HPW][DPL];
  float dw_acc[MAX_HPW];
#pragma unroll
  for (int x = 0; x < MAX_HPW; ++x) {
    dw_acc[x] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) dq_acc[x][i] = 0.f;
  }
  const uint32_t* row = idx + (size_t)n * K;
  for (int t0 = 0; t0 < K; t0 += TILE) {
    __syncthreads();
    load_keys(k_s, k, row, t0, K, DI);
    __syncthreads();
    const int j = t0 + lane;
    const bool valid = j < K && row[j] != INVALID;
    const float dij = valid ? dI[(size_t)n * K + j] : 0.f;
    const float* kj = k_s + lane * (DI + 1);
#pragma unroll
    for (int x = 0; x < MAX_HPW; ++x) {
      const int h = warp + x * WARPS;
      if (h >= HI) break;  // warp-uniform
      const float* qh = q_s + h * DI;
      float a = 0.f;
      if (valid)
        for (int d = 0; d < DI; ++d) a = fmaf(qh[d], kj[d], a);
      dw_acc[x] = fmaf(dij, fmaxf(a, 0.f), dw_acc[x]);
      const float g = (a > 0.f) ? dij * w[(size_t)n * HI + h] : 0.f;
      g_s[h * TILE + lane] = g;
      for (int jj = 0; jj < TILE; ++jj) {
        const float gj = __shfl_sync(FULL, g, jj);
        const float* kr = k_s + jj * (DI + 1);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          const int d = lane + 32 * i;
          if (d < DI) dq_acc[x][i] = fmaf(gj, kr[d], dq_acc[x][i]);
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < TILE * DI; i += blockDim.x) {
      const int r = i / DI, d = i - r * DI, jr = t0 + r;
      const uint32_t s = (jr < K) ? row[jr] : INVALID;
      if (s == INVALID) continue;
      float acc = 0.f;
      for (int h = 0; h < HI; ++h) acc = fmaf(g_s[h * TILE + r], q_s[h * DI + d], acc);
      atomicAdd(dk + (size_t)s * DI + d, acc);
    }
  }
#pragma unroll
  for (int x = 0; x < MAX_HPW; ++x) {
    const int h = warp + x * WARPS;
    if (h >= HI) break;
    float s = dw_acc[x];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    if (lane == 0) dw[(size_t)n * HI + h] = s;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      if (d < DI) dq[((size_t)n * HI + h) * DI + d] = dq_acc[x][i];
    }
  }
}
