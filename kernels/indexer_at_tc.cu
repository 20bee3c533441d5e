// Lightning-indexer scores at each query's selected keys on tensor cores, and their backward:
//   I[n, j] = sum_h w[n, h] * ReLU(q[n, h, :] . k[idx[n, j], :])
// q [N, HI, DI] bf16, w [N, HI] f32 (scale folded in), k [NK, DI] bf16, idx [N, K] u32 absolute
// rows (0xFFFFFFFF = padding, scored 0), out [N, K] f32. The plain twin is indexer.cu's f32
// kernel (and the gather + matmul in model::indexer); this one rounds q and k to bf16 and
// accumulates every product in f32, as the selection's scoring kernel (indexer_topk.cu) does.
//
// Kernels are instantiated per NT (8-head n-tiles: HI <= 8 NT) and KS (DI = 16 KS). One block of
// 4 warps per query. Key tiles of KT = 128 gathered rows go through shared memory with cp.async
// (2 stages); a padding slot loads zeros, so its dot products, ReLU and score are exactly 0.
// mma.sync m16n8k16 (bf16 in, f32 accumulate):
//  scores  C[key, head] = K_tile[key, :] . q[head, :]: M = keys (warp w: keys 32w..32w+31 of the
//          tile), N = heads (all of them per warp, B fragments from the q tile in shared memory),
//          so the weighted ReLU sums over heads inside the thread, then over the quad (shuffles).
//          Every sum has a fixed order: the forward is bit-identical run to run.
// Backward from dI [N, K] f32, per (h, j) with a = q_h . k_j (recomputed as above):
//   dw[h] += dI_j ReLU(a);   G[h, j] = dI_j w_h [a > 0]  (staged in shared memory as bf16);
//   dq[h, :] += sum_j G[h, j] k_j     (M = heads, K = keys, N = dims; accumulated in registers);
//   dk[idx_j, :] += sum_h G[h, j] q_h (M = keys, K = heads, N = dims; f32 atomics, two floats
//          per atomic: the order of the adds across queries is not deterministic).
// dq and dw are written once per query (fixed order, deterministic); dk must be zero on entry.

#include <stdint.h>

#include "indexer_scores.cuh"
#include "mma.cuh"

#define AT_WARPS 4
#define AT_THREADS (AT_WARPS * 32)
#define AT_KT 128     // gathered keys per tile: 32 per warp
#define AT_STAGES 2   // cp.async pipeline depth
#define AT_INVALID 0xFFFFFFFFu
#define AT_FULL 0xFFFFFFFFu

__device__ __forceinline__ uint16_t at_bf16(float x) {  // round to nearest even
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// Shared-memory rows are padded by 16 bytes so that a row stride is an odd number of 16-byte
// units: ldmatrix's 8 rows then fall in 8 distinct bank groups.
template <int KS>
struct AtGeom {
  static constexpr int DI = 16 * KS;
  static constexpr int ROWB = DI * 2 + 16;          // bytes per q or key row
  static constexpr int CPR = DI / 8;                // 16-byte chunks per row
  static constexpr int STAGE = AT_KT * ROWB;        // bytes per key tile
};

// The query's q rows (heads 0..QROWS-1, zero past HI) into shared memory.
template <int KS>
__device__ __forceinline__ void at_load_q(unsigned char* q_s, const uint16_t* q, int n, int HI, int QROWS) {
  using G = AtGeom<KS>;
  for (int i = threadIdx.x; i < QROWS * G::CPR; i += AT_THREADS) {
    const int h = i / G::CPR, c = i - h * G::CPR;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (h < HI) v = *reinterpret_cast<const uint4*>(q + ((size_t)n * HI + h) * G::DI + c * 8);
    *reinterpret_cast<uint4*>(q_s + h * G::ROWB + c * 16) = v;
  }
}

// Gather key tile t0..t0+KT of the query's selection into a stage; the rows' indices to rows_s.
template <int KS>
__device__ __forceinline__ void at_load_keys(uint32_t dst0, uint32_t* rows_s, const uint16_t* k,
                                             const uint32_t* row, int t0, int K) {
  using G = AtGeom<KS>;
  for (int i = threadIdx.x; i < AT_KT * G::CPR; i += AT_THREADS) {
    const int m = i / G::CPR, c = i - m * G::CPR, j = t0 + m;
    const uint32_t s = (j < K) ? row[j] : AT_INVALID;
    const bool ok = s != AT_INVALID;
    cp_async16(dst0 + m * G::ROWB + c * 16, k + (size_t)(ok ? s : 0) * G::DI + c * 8, ok ? 16 : 0);
    if (c == 0) rows_s[m] = s;
  }
}

// a[key, head] for this warp's 32 keys (2 m-tiles) of the tile at `kst` and every head of q_s:
// acc[mt][nt] is the C fragment (rows keys 16 mt + g, + 8; cols heads 8 nt + 2 t4, + 1).
template <int NT, int KS>
__device__ __forceinline__ void at_scores_tile(float (&acc)[2][NT][4], uint32_t kst, uint32_t qs, int warp, int lane) {
  using G = AtGeom<KS>;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
  // A (keys, row-major): lanes 0-15 rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8.
  const uint32_t a_off = kst + (warp * 32 + (lane & 15)) * G::ROWB + (lane >> 4) * 16;
  // B (q rows = heads, non-transposed 8x8 blocks): matrix mt = lane / 8 -> heads 8 (nt + mt / 2)
  // + lane % 8 at k 8 (mt % 2), giving b0, b1 of n-tiles nt and nt + 1.
  const int bm = lane >> 3, br = lane & 7;
  const uint32_t b_off = qs + ((bm >> 1) * 8 + br) * G::ROWB + (bm & 1) * 16;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) ldsm_x4(a[mt], a_off + mt * 16 * G::ROWB + ks * 32);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      if (nt + 1 < NT) {
        uint32_t b[4];
        ldsm_x4(b, b_off + nt * 8 * G::ROWB + ks * 32);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_bf16_16816(acc[mt][nt], a[mt], b[0], b[1]);
          mma_bf16_16816(acc[mt][nt + 1], a[mt], b[2], b[3]);
        }
      } else {
        uint32_t b[2];
        ldsm_x2(b, b_off + nt * 8 * G::ROWB + ks * 32);  // lanes 0-15 give the addresses
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma_bf16_16816(acc[mt][nt], a[mt], b[0], b[1]);
      }
    }
  }
}

// The head weights of this thread's C-fragment columns (heads 8 nt + 2 t4 + c), 0 past HI.
template <int NT>
__device__ __forceinline__ void at_load_weights(float (&wv)[NT][2], const float* w, int n, int HI, int t4) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int h = nt * 8 + 2 * t4 + c;
      wv[nt][c] = h < HI ? w[(size_t)n * HI + h] : 0.f;
    }
}

template <int NT, int KS>
__device__ __forceinline__ void at_fwd_body(const uint16_t* __restrict__ q, const float* __restrict__ w,
                                            const uint16_t* __restrict__ k, const uint32_t* __restrict__ idx,
                                            float* __restrict__ out, int HI, int K) {
  using G = AtGeom<KS>;
  extern __shared__ __align__(16) unsigned char at_smem[];
  unsigned char* q_s = at_smem;                                  // [8 NT][ROWB]
  unsigned char* k_s = q_s + NT * 8 * G::ROWB;                   // [STAGES][KT][ROWB]
  uint32_t* rows_s = reinterpret_cast<uint32_t*>(k_s + AT_STAGES * G::STAGE);  // [STAGES][KT]
  const int n = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const uint32_t* row = idx + (size_t)n * K;
  const int ntiles = (K + AT_KT - 1) / AT_KT;
  at_load_q<KS>(q_s, q, n, HI, NT * 8);
  float wv[NT][2];
  at_load_weights<NT>(wv, w, n, HI, t4);
  const uint32_t k0 = smem_u32(k_s), qs = smem_u32(q_s);
  at_load_keys<KS>(k0, rows_s, k, row, 0, K);
  cp_async_commit();
  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<0>();
    __syncthreads();  // tile `it` (and q_s) visible to all; the other stage is free
    if (it + 1 < ntiles) at_load_keys<KS>(k0 + ((it + 1) % AT_STAGES) * G::STAGE, rows_s + ((it + 1) % AT_STAGES) * AT_KT, k, row, (it + 1) * AT_KT, K);
    cp_async_commit();
    float acc[2][NT][4];
    at_scores_tile<NT, KS>(acc, k0 + (it % AT_STAGES) * G::STAGE, qs, warp, lane);
    // Lane t4 of a quad holds key 8 t4 + g of the warp's 32: the warp writes 32 floats once each.
    const float v = weighted_relu_key<NT>(acc, wv, t4);
    const int j = it * AT_KT + warp * 32 + t4 * 8 + g;
    if (j < K) out[(size_t)n * K + j] = v;  // padding slots: zero keys, so v is exactly 0
  }
  cp_async_wait<0>();
}

template <int NT, int KS>
__device__ __forceinline__ void at_bwd_body(const uint16_t* __restrict__ q, const float* __restrict__ w,
                                            const uint16_t* __restrict__ k, const uint32_t* __restrict__ idx,
                                            const float* __restrict__ dI, float* __restrict__ dq,
                                            float* __restrict__ dw, float* __restrict__ dk, int HI, int K) {
  using G = AtGeom<KS>;
  constexpr int DI = G::DI;
  constexpr int MTH = (NT + 1) / 2;           // 16-head m-tiles (heads padded to 16 MTH)
  constexpr int QROWS = 16 * MTH;
  constexpr int NTD = DI / 8;                 // 8-dim n-tiles
  // dq [QROWS, DI] over the 4 warps: warp w owns head m-tile w % MTH (MTH <= 4 divides 4) and
  // NDW dim n-tiles starting at (w / MTH) NDW (pairs of n-tiles; with fewer than 8 n-tile
  // blocks in all, the warps whose start is past DI have no dq block).
  constexpr int NDW = (NTD * MTH / 4) < 2 ? 2 : NTD * MTH / 4;
  static_assert(NDW % 2 == 0, "dims per warp: pairs of n-tiles");
  constexpr int GROWB = AT_KT * 2 + 16;       // bytes per G row (heads x keys, bf16)
  extern __shared__ __align__(16) unsigned char at_smem[];
  unsigned char* q_s = at_smem;                                     // [QROWS][ROWB]
  unsigned char* k_s = q_s + QROWS * G::ROWB;                       // [STAGES][KT][ROWB]
  unsigned char* g_s = k_s + AT_STAGES * G::STAGE;                  // [QROWS][GROWB]
  uint32_t* rows_s = reinterpret_cast<uint32_t*>(g_s + QROWS * GROWB);  // [STAGES][KT]
  float* red = reinterpret_cast<float*>(rows_s + AT_STAGES * AT_KT);   // [WARPS][8 NT]
  const int n = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const uint32_t* row = idx + (size_t)n * K;
  const int ntiles = (K + AT_KT - 1) / AT_KT;
  at_load_q<KS>(q_s, q, n, HI, QROWS);
  // G rows of padded heads (>= 8 NT) are never written: zero them once.
  for (int i = tid; i < (QROWS - NT * 8) * (GROWB / 4); i += AT_THREADS)
    reinterpret_cast<uint32_t*>(g_s + NT * 8 * GROWB)[i] = 0u;
  float wv[NT][2], dwp[NT][2];
  at_load_weights<NT>(wv, w, n, HI, t4);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) dwp[nt][0] = dwp[nt][1] = 0.f;
  const int qm = warp % MTH, d0 = (warp / MTH) * NDW;  // this warp's dq block
  const bool has_dq = d0 < NTD;                          // warp-uniform
  float dqa[NDW][4];
#pragma unroll
  for (int x = 0; x < NDW; ++x)
#pragma unroll
    for (int e = 0; e < 4; ++e) dqa[x][e] = 0.f;
  const uint32_t k0 = smem_u32(k_s), qs = smem_u32(q_s), gs = smem_u32(g_s);
  const int bm = lane >> 3, br = lane & 7;  // ldmatrix x4 lane -> (matrix, row)
  at_load_keys<KS>(k0, rows_s, k, row, 0, K);
  cp_async_commit();
  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<0>();
    __syncthreads();  // tile `it` visible; G of the previous tile no longer read
    if (it + 1 < ntiles) at_load_keys<KS>(k0 + ((it + 1) % AT_STAGES) * G::STAGE, rows_s + ((it + 1) % AT_STAGES) * AT_KT, k, row, (it + 1) * AT_KT, K);
    cp_async_commit();
    const uint32_t kst = k0 + (it % AT_STAGES) * G::STAGE;
    const uint32_t* rows_t = rows_s + (it % AT_STAGES) * AT_KT;
    // 1. a, dw and G for this warp's 32 keys.
    {
      float acc[2][NT][4];
      at_scores_tile<NT, KS>(acc, kst, qs, warp, lane);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int kl = warp * 32 + mt * 16 + g + hr * 8;  // key within the tile
          const int j = it * AT_KT + kl;
          const float di = (j < K) ? dI[(size_t)n * K + j] : 0.f;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const float a = acc[mt][nt][hr * 2 + c];
              dwp[nt][c] = fmaf(di, fmaxf(a, 0.f), dwp[nt][c]);
              const float gv = (a > 0.f) ? di * wv[nt][c] : 0.f;
              *reinterpret_cast<uint16_t*>(g_s + (nt * 8 + 2 * t4 + c) * GROWB + kl * 2) = at_bf16(gv);
            }
        }
    }
    __syncthreads();  // G complete
    // 2. dq[h, d] += sum_j G[h, j] K[j, d]: A = G (heads x keys) from g_s, B = K via .trans.
#pragma unroll
    for (int ks = 0; ks < AT_KT / 16 && has_dq; ++ks) {
      uint32_t a[4];
      ldsm_x4(a, gs + (qm * 16 + (lane & 15)) * GROWB + (ks * 16 + (lane >> 4) * 8) * 2);
#pragma unroll
      for (int x = 0; x < NDW; x += 2) {
        // matrices: (keys +0, dims x), (keys +8, dims x), (keys +0, dims x+1), (keys +8, dims x+1)
        uint32_t b[4];
        ldsm_x4_t(b, kst + (ks * 16 + (bm & 1) * 8 + br) * G::ROWB + ((d0 + x + (bm >> 1)) * 8) * 2);
        mma_bf16_16816(dqa[x], a, b[0], b[1]);
        mma_bf16_16816(dqa[x + 1], a, b[2], b[3]);
      }
    }
    // 3. dk[j, d] += sum_h G[h, j] q[h, d]: A = G^T (keys x heads) via .trans, B = q via .trans.
#pragma unroll
    for (int dc = 0; dc < NTD; dc += 4) {  // 32 dims at a time (bounds the accumulators)
      float acc[2][4][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int x = 0; x < 4; ++x)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][x][e] = 0.f;
#pragma unroll
      for (int hk = 0; hk < MTH; ++hk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          // matrices: (heads +0, keys +0), (heads +0, keys +8), (heads +8, keys +0), (heads +8, keys +8),
          // transposed: a0 (keys 0-7, heads 0-7), a1 (keys 8-15, heads 0-7), a2 (keys 0-7, heads 8-15), a3.
          ldsm_x4_t(a[mt], gs + (hk * 16 + (bm >> 1) * 8 + br) * GROWB + (warp * 32 + mt * 16 + (bm & 1) * 8) * 2);
#pragma unroll
        for (int x = 0; x < 4; x += 2) {
          uint32_t b[4];
          ldsm_x4_t(b, qs + (hk * 16 + (bm & 1) * 8 + br) * G::ROWB + ((dc + x + (bm >> 1)) * 8) * 2);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_bf16_16816(acc[mt][x], a[mt], b[0], b[1]);
            mma_bf16_16816(acc[mt][x + 1], a[mt], b[2], b[3]);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const uint32_t s = rows_t[warp * 32 + mt * 16 + g + hr * 8];
          if (s == AT_INVALID) continue;
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int d = (dc + x) * 8 + 2 * t4;
            atomicAdd(reinterpret_cast<float2*>(dk + (size_t)s * DI + d), make_float2(acc[mt][x][hr * 2], acc[mt][x][hr * 2 + 1]));
          }
        }
    }
  }
  cp_async_wait<0>();
  // dq: C fragment rows heads qm 16 + g (+8), cols dims (d0 + x) 8 + 2 t4 (+1).
#pragma unroll
  for (int x = 0; x < NDW && has_dq; ++x)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int h = qm * 16 + g + hr * 8, d = (d0 + x) * 8 + 2 * t4;
      if (h < HI) *reinterpret_cast<float2*>(dq + ((size_t)n * HI + h) * DI + d) = make_float2(dqa[x][hr * 2], dqa[x][hr * 2 + 1]);
    }
  // dw: over the 8 key rows g of the warp (shuffles), then over the warps (fixed order).
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float s = dwp[nt][c];
      s += __shfl_xor_sync(AT_FULL, s, 4);
      s += __shfl_xor_sync(AT_FULL, s, 8);
      s += __shfl_xor_sync(AT_FULL, s, 16);
      if (g == 0) red[warp * NT * 8 + nt * 8 + 2 * t4 + c] = s;
    }
  __syncthreads();
  for (int h = tid; h < HI; h += AT_THREADS) {
    float s = 0.f;
    for (int x = 0; x < AT_WARPS; ++x) s += red[x * NT * 8 + h];
    dw[(size_t)n * HI + h] = s;
  }
}

#define AT_KERNELS(NTV, KSV)                                                                                      \
  extern "C" __global__ void __launch_bounds__(AT_THREADS, 2)                                                     \
      indexer_at_fwd_bf16_nt##NTV##_ks##KSV(const uint16_t* __restrict__ q, const float* __restrict__ w,         \
                                            const uint16_t* __restrict__ k, const uint32_t* __restrict__ idx,    \
                                            float* __restrict__ out, int HI, int K) {                            \
    at_fwd_body<NTV, KSV>(q, w, k, idx, out, HI, K);                                                              \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(AT_THREADS, 2)                                                     \
      indexer_at_bwd_bf16_nt##NTV##_ks##KSV(const uint16_t* __restrict__ q, const float* __restrict__ w,         \
                                            const uint16_t* __restrict__ k, const uint32_t* __restrict__ idx,    \
                                            const float* __restrict__ dI, float* __restrict__ dq,                \
                                            float* __restrict__ dw, float* __restrict__ dk, int HI, int K) {     \
    at_bwd_body<NTV, KSV>(q, w, k, idx, dI, dq, dw, dk, HI, K);                                                   \
  }

// NT in {1, 2, 4, 8} (HI <= 8, 16, 32, 64), KS in {2, 4, 8} (DI 32, 64, 128).
AT_KERNELS(1, 2)
AT_KERNELS(1, 4)
AT_KERNELS(1, 8)
AT_KERNELS(2, 2)
AT_KERNELS(2, 4)
AT_KERNELS(2, 8)
AT_KERNELS(4, 2)
AT_KERNELS(4, 4)
AT_KERNELS(4, 8)
AT_KERNELS(8, 2)
AT_KERNELS(8, 4)
AT_KERNELS(8, 8)
