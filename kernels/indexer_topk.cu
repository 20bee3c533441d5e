// Lightning-indexer scores of a block of query rows against every key, and the deterministic
// top-k of such score rows over each query's causal key range (the O(L^2) part of DSA's sparse
// stage).
//
// Scores (indexer_scores_rows_bf16_ks{1..8}, KS = DI / 16):
//   I[r, s] = sum_{h < HI} w[r, h] * ReLU(q[r, h, :] . k[s, :])   for s <= q0 + r, else -inf
// q [R, HI, DI] bf16, w [R, HI] f32, k [T, DI] bf16, out [R, T] f32; HI <= 64, DI = 16 KS.
// Tensor cores: mma.sync m16n8k16, bf16 inputs, f32 accumulation. The MMA's M axis is keys
// (A = a 64-key tile of k, streamed through shared memory with cp.async, 3 stages), its N axis
// is heads (B = q, held in registers for the whole block). So the sum over heads runs along N:
// in-thread over the warp's n-tiles, then over the 4 lanes of a quad (shuffles), then over the
// 1 or 2 warps that share a query row (shared memory, fixed order). Every sum has a fixed order:
// the output is bit-identical run to run. ReLU is fmaxf(x, 0); padded heads (h >= HI) have zero q
// and zero weight and add exactly 0.
// Block: 8 warps; a warp owns 32 heads of one query row (HI <= 32: one warp per row, 8 rows per
// block; else two warps per row, 4 rows per block). grid.x: row groups (heaviest first),
// grid.y: key ranges of KCH keys. Key tiles entirely above the block's last causal key are not
// computed; their outputs are written as -inf directly.
//
// Top-k (topk_rows_f32): one block of 512 threads per row. Row r's candidates are the keys
// start..=min(q0 + r, T - 1), start = starts[r] (the first key of the query's document under
// document masking; 0 when starts is null: plain causal), n of them. The kernel reads the row
// from `start` on, so every pass below sees exactly the candidates; the relative indices it
// selects are offset by start when written (order and ties are unchanged by the offset).
// n <= topk: the row is start..start+n-1 then 0xFFFFFFFF padding (a start past its query would
// leave n = 0, all padding; the caller guarantees start <= q0 + r). Otherwise a radix
// select on order-preserving u32 keys (-0.0 -> +0.0, NaN -> -inf, so that both tie with their
// twins exactly as in dsa::topk_key_range) with digits of 11, 11 and 10 bits finds the k-th
// largest key tau and `need`, the number of entries equal to tau that are taken (the lowest
// indices win ties). An ordered compaction pass then writes, in ascending index order, every
// entry with key > tau and the first `need` entries with key == tau. Histograms use integer
// shared-memory atomics (order-independent); the candidates cached in shared memory between the
// passes feed histograms only, so the result is deterministic.

#include <stdint.h>

#include "indexer_scores.cuh"
#include "mma.cuh"

#define NEG_INF __int_as_float(0xff800000)
#define FULL_MASK 0xFFFFFFFFu

// ---------------------------------------------------------------------------------------------
// Scores
// ---------------------------------------------------------------------------------------------

#define SC_WARPS 8
#define SC_THREADS (SC_WARPS * 32)
#define KT 64          // keys per tile
#define STAGES 3       // cp.async pipeline depth
#define KCH 4096       // keys per block (grid.y)

// Shared memory: STAGES key tiles [KT][DI + 8] bf16 (each row padded by 16 bytes: the row stride
// is an odd number of 16-byte units, so ldmatrix's 8 rows hit 8 distinct bank groups), then
// red [SC_WARPS][KT] f32 (per-warp partial sums of a tile).
template <int KS>
__device__ __forceinline__ void scores_body(const uint16_t* __restrict__ q, const float* __restrict__ w,
                                            const uint16_t* __restrict__ k, float* __restrict__ out, int R, int HI,
                                            int T, int q0, int wpr) {
  constexpr int DI = 16 * KS;
  constexpr int ROWB = DI * 2 + 16;     // bytes per key row in shared memory
  constexpr int STAGE_BYTES = KT * ROWB;
  constexpr int CPR = DI / 8;           // 16-byte chunks per key row
  extern __shared__ __align__(16) unsigned char sc_smem[];
  float* red = reinterpret_cast<float*>(sc_smem + STAGES * STAGE_BYTES);
  const uint32_t sbase0 = smem_u32(sc_smem);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int rows_pb = SC_WARPS / wpr;                       // query rows per block
  const int groups = (R + rows_pb - 1) / rows_pb;
  const int rb = (groups - 1 - (int)blockIdx.x) * rows_pb;  // later rows (more keys) first
  const int kbeg = (int)blockIdx.y * KCH;
  const int kend = min(kbeg + KCH, T);
  const int rlast = min(rb + rows_pb, R) - 1;
  // Causal keys of this block's key range: [kbeg, min(kend, q0 + rlast + 1)).
  const long long climit = min((long long)kend, (long long)q0 + rlast + 1);
  const int ccount = (int)max(climit - (long long)kbeg, 0LL);
  const int ntiles = (ccount + KT - 1) / KT;

  // Outputs past the computed tiles are all above the diagonal.
  const int fstart = kbeg + ntiles * KT;
  for (int rr = rb; rr <= rlast; ++rr) {
    float* o = out + (size_t)rr * T;
    for (int s = fstart + tid; s < kend; s += SC_THREADS) o[s] = NEG_INF;
  }
  if (ntiles == 0) return;  // block-uniform

  // B fragments (q) and weights of this warp's query row and 32-head slice, for the whole block.
  // B (16x8, col): reg 0 holds k = 2*t4, 2*t4+1, reg 1 holds k + 8, both at n = g (the head).
  // C (16x8): c0,c1 at (row g, cols 2*t4, 2*t4+1), c2,c3 at row g+8; rows are keys, cols heads.
  const int lr = warp / wpr, r = rb + lr, hbase = (warp % wpr) * 32;
  const bool rvalid = r < R;
  uint32_t bq[KS][4][2];
  float wv[4][2];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int h = hbase + nt * 8 + g;
    const bool ok = rvalid && h < HI;
    const uint32_t* qrow = reinterpret_cast<const uint32_t*>(q + ((size_t)(ok ? r : 0) * HI + (ok ? h : 0)) * DI);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      bq[ks][nt][0] = ok ? qrow[(ks * 16 + 2 * t4) / 2] : 0u;
      bq[ks][nt][1] = ok ? qrow[(ks * 16 + 2 * t4 + 8) / 2] : 0u;
    }
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int hc = hbase + nt * 8 + 2 * t4 + c;
      wv[nt][c] = (rvalid && hc < HI) ? w[(size_t)r * HI + hc] : 0.f;
    }
  }

  // Async load of key tile j into stage st; keys >= T are zero-filled (their outputs are never
  // written).
  auto load_tile = [&](int j, int st) {
    const int key0 = kbeg + j * KT;
    const uint32_t dst0 = sbase0 + st * STAGE_BYTES;
    for (int i = tid; i < KT * CPR; i += SC_THREADS) {
      const int m = i / CPR, c = i - m * CPR;
      const int s = key0 + m;
      const bool ok = s < T;
      const uint16_t* src = k + (size_t)(ok ? s : 0) * DI + c * 8;
      cp_async16(dst0 + m * ROWB + c * 16, src, ok ? 16 : 0);
    }
  };

#pragma unroll
  for (int j = 0; j < STAGES - 1; ++j) {
    if (j < ntiles) load_tile(j, j);
    cp_async_commit();
  }

  // ldmatrix.x4 lane address: lanes 0-15 rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8, so the
  // four registers are the A fragment a0a1 (rows 0-7, k 0-7), a2a3 (rows 8-15, k 0-7),
  // a4a5 (rows 0-7, k 8-15), a6a7 (rows 8-15, k 8-15).
  const uint32_t lane_off = (lane & 15) * ROWB + (lane >> 4) * 16;

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of tile `it` have landed
    __syncthreads();              // everyone's have; stage (it-1)%STAGES and red are free again
    {
      const int nj = it + STAGES - 1;
      if (nj < ntiles) load_tile(nj, nj % STAGES);
      cp_async_commit();  // possibly empty: keeps the group count uniform
    }
    const uint32_t sb = sbase0 + (it % STAGES) * STAGE_BYTES + lane_off;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {  // two halves of 32 keys each (bounds the accumulators)
      float acc[2][4][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) ldsm_x4(a[mt], sb + (hf * 32 + mt * 16) * ROWB + ks * 32);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) mma_bf16_16816(acc[mt][nt], a[mt], bq[ks][nt][0], bq[ks][nt][1]);
      }
      // Weighted ReLU summed over this thread's 8 heads, then over the quad's 4 lanes (32 heads);
      // lane t4 of each quad holds key 8 t4 + g of the warp's 32.
      const float v = weighted_relu_key<4>(acc, wv, t4);
      red[warp * KT + hf * 32 + t4 * 8 + g] = v;
    }
    __syncthreads();
    // Sum the warps of each query row (fixed order) and store: rows_pb rows x 64 keys, coalesced.
    const int key0 = kbeg + it * KT;
    for (int o = tid; o < rows_pb * KT; o += SC_THREADS) {
      const int lrr = o / KT, m = o - lrr * KT;
      const int rr = rb + lrr, s = key0 + m;
      if (rr < R && s < kend) {
        float v = red[(lrr * wpr) * KT + m];
        if (wpr == 2) v += red[(lrr * wpr + 1) * KT + m];
        out[(size_t)rr * T + s] = (s <= q0 + rr) ? v : NEG_INF;
      }
    }
  }
  cp_async_wait<0>();  // no copies outstanding at exit (the trailing groups are empty)
}

#define SCORES_KERNEL(KSV)                                                                                       \
  extern "C" __global__ void __launch_bounds__(SC_THREADS, 2)                                                    \
      indexer_scores_rows_bf16_ks##KSV(const uint16_t* __restrict__ q, const float* __restrict__ w,              \
                                       const uint16_t* __restrict__ k, float* __restrict__ out, int R, int HI,   \
                                       int T, int q0, int wpr) {                                                 \
    scores_body<KSV>(q, w, k, out, R, HI, T, q0, wpr);                                                           \
  }

SCORES_KERNEL(1)
SCORES_KERNEL(2)
SCORES_KERNEL(3)
SCORES_KERNEL(4)
SCORES_KERNEL(5)
SCORES_KERNEL(6)
SCORES_KERNEL(7)
SCORES_KERNEL(8)

// ---------------------------------------------------------------------------------------------
// Top-k
// ---------------------------------------------------------------------------------------------

#define TK_THREADS 512  // two blocks per multiprocessor (64 registers each)
#define TK_WARPS (TK_THREADS / 32)
#define TK_V 8  // entries per lane per chunk of the compaction pass
#define HIST_BINS 2048

// Order-preserving key: a > b as scores (with -0.0 == +0.0 and NaN == -inf) iff key(a) > key(b).
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t u = __float_as_uint(x);
  if (x != x) u = 0xFF800000u;     // NaN ranks with -inf (as dsa::topk_key_range does)
  if (u == 0x80000000u) u = 0u;    // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of v over the block's threads in thread order; *total gets the sum.
// Uses scratch[TK_WARPS]; ends with a barrier so the scratch may be reused at once.
__device__ __forceinline__ uint32_t block_excl_scan(uint32_t v, uint32_t* scratch, uint32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t y = __shfl_up_sync(FULL_MASK, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    uint32_t t = (lane < TK_WARPS) ? scratch[lane] : 0u;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t y = __shfl_up_sync(FULL_MASK, t, o);
      if (lane >= o) t += y;
    }
    if (lane < TK_WARPS) scratch[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  const uint32_t base = warp ? scratch[warp - 1] : 0u;
  *total = scratch[TK_WARPS - 1];
  __syncthreads();
  return base + x - v;
}

// The bin b of hist[nb] that holds the kk-th largest key (1-based, counting from the top bin):
// above(b) < kk <= above(b) + hist[b], with above(b) = sum of the bins over b. Exactly one
// thread finds it and writes res[0] = b, res[1] = kk - above(b); ends with a barrier.
__device__ __forceinline__ void find_bucket(const uint32_t* hist, int nb, uint32_t kk, uint32_t* res,
                                            uint32_t* scratch) {
  const int per = nb / TK_THREADS;  // bins per thread (nb is a multiple of TK_THREADS), from the top down
  const int top = nb - 1 - (int)threadIdx.x * per;
  uint32_t local = 0;
  for (int j = 0; j < per; ++j) local += hist[top - j];
  uint32_t total;
  uint32_t above = block_excl_scan(local, scratch, &total);
  for (int j = 0; j < per; ++j) {
    const uint32_t h = hist[top - j];
    if (above < kk && above + h >= kk) {
      res[0] = (uint32_t)(top - j);
      res[1] = kk - above;
    }
    above += h;
  }
  __syncthreads();
}

// f(key) for every candidate of the row (row[0..n)), 4 loads in flight per thread.
template <class F>
__device__ __forceinline__ void for_row(const float* __restrict__ row, int n, F f) {
  int i = threadIdx.x;
  for (; i + 3 * TK_THREADS < n; i += 4 * TK_THREADS) {
    const float a = row[i], b = row[i + TK_THREADS], c = row[i + 2 * TK_THREADS], d = row[i + 3 * TK_THREADS];
    f(order_key(a));
    f(order_key(b));
    f(order_key(c));
    f(order_key(d));
  }
  for (; i < n; i += TK_THREADS) f(order_key(row[i]));
}

// scores [R, T] f32 (row r is query q0 + r), starts [R] u32 or null (row r's first key; null:
// 0), out [R, K] u32, K = min(topk, T), topk >= 1.
// Dynamic shared memory: (HIST_BINS + cap) u32 (histogram, then the candidate cache).
extern "C" __global__ void __launch_bounds__(TK_THREADS, 2)
topk_rows_f32(const float* __restrict__ scores, const uint32_t* __restrict__ starts, uint32_t* __restrict__ out,
              int R, int T, int q0, int topk, int K, int cap) {
  extern __shared__ __align__(16) uint32_t tk_smem[];
  uint32_t* hist = tk_smem;
  uint32_t* cache = tk_smem + HIST_BINS;
  __shared__ uint32_t s_scan[TK_WARPS];
  __shared__ uint32_t s_res[2];
  __shared__ uint32_t s_cnt;
  __shared__ uint32_t s_g[TK_WARPS], s_e[TK_WARPS], s_tot[2];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = blockIdx.x;
  const int end = (int)min((long long)q0 + r + 1, (long long)T);  // one past the last candidate
  const int start = starts ? (int)min(starts[r], (uint32_t)end) : 0;
  // The candidates only: row[i] is key start + i, for i < n.
  const float* row = scores + (size_t)r * T + start;
  uint32_t* orow = out + (size_t)r * K;
  const int n = end - start;

  if (n <= topk) {  // every candidate, ascending; K >= n here
    for (int i = tid; i < K; i += TK_THREADS) orow[i] = (i < n) ? (uint32_t)(start + i) : 0xFFFFFFFFu;
    return;
  }

  // Digit 1: key bits 31..21.
  for (int i = tid; i < HIST_BINS; i += TK_THREADS) hist[i] = 0;
  __syncthreads();
  for_row(row, n, [&](uint32_t key) { atomicAdd(&hist[key >> 21], 1u); });
  __syncthreads();
  find_bucket(hist, HIST_BINS, (uint32_t)topk, s_res, s_scan);
  const uint32_t b1 = s_res[0];
  uint32_t kk = s_res[1];
  const uint32_t cnt1 = hist[b1];
  const bool use_cache = cnt1 <= (uint32_t)cap;  // block-uniform
  __syncthreads();

  // Digit 2: bits 20..10 among keys with digit 1 == b1; those keys are cached when they fit.
  for (int i = tid; i < HIST_BINS; i += TK_THREADS) hist[i] = 0;
  if (tid == 0) s_cnt = 0;
  __syncthreads();
  for_row(row, n, [&](uint32_t key) {
    if ((key >> 21) == b1) {
      atomicAdd(&hist[(key >> 10) & 0x7FF], 1u);
      if (use_cache) cache[atomicAdd(&s_cnt, 1u)] = key;
    }
  });
  __syncthreads();
  find_bucket(hist, HIST_BINS, kk, s_res, s_scan);
  const uint32_t hi22 = (b1 << 11) | s_res[0];  // key >> 10 of the threshold
  kk = s_res[1];
  __syncthreads();

  // Digit 3: bits 9..0 among keys with key >> 10 == hi22.
  for (int i = tid; i < 1024; i += TK_THREADS) hist[i] = 0;
  __syncthreads();
  if (use_cache) {
    for (uint32_t j = tid; j < cnt1; j += TK_THREADS) {
      const uint32_t key = cache[j];
      if ((key >> 10) == hi22) atomicAdd(&hist[key & 0x3FF], 1u);
    }
  } else {
    for_row(row, n, [&](uint32_t key) {
      if ((key >> 10) == hi22) atomicAdd(&hist[key & 0x3FF], 1u);
    });
  }
  __syncthreads();
  find_bucket(hist, 1024, kk, s_res, s_scan);
  const uint32_t tau = (hi22 << 10) | s_res[0];
  const uint32_t need = s_res[1];  // entries equal to tau that are taken (1 <= need)

  // Ordered compaction. A chunk is TK_THREADS * TK_V consecutive entries; warp w owns the
  // 32 * TK_V entries starting at w * 32 * TK_V of it (lane-interleaved, so loads coalesce).
  // Slot of a taken entry i = #(key > tau before i) + min(#(key == tau before i), need).
  uint32_t gt_base = 0, eq_base = 0;
  const uint32_t lt_mask = (1u << lane) - 1u;
  for (int cb = 0; cb < n; cb += TK_THREADS * TK_V) {
    const int wb = cb + warp * 32 * TK_V;
    uint32_t mgt[TK_V], meq[TK_V];
    float x[TK_V];
#pragma unroll
    for (int j = 0; j < TK_V; ++j) {
      const int i = wb + j * 32 + lane;
      x[j] = (i < n) ? row[i] : NEG_INF;
    }
    uint32_t cg = 0, ce = 0;
#pragma unroll
    for (int j = 0; j < TK_V; ++j) {
      const int i = wb + j * 32 + lane;
      const uint32_t key = order_key(x[j]);
      mgt[j] = __ballot_sync(FULL_MASK, i < n && key > tau);
      meq[j] = __ballot_sync(FULL_MASK, i < n && key == tau);
      cg += __popc(mgt[j]);
      ce += __popc(meq[j]);
    }
    if (lane == 0) {
      s_g[warp] = cg;
      s_e[warp] = ce;
    }
    __syncthreads();
    if (warp == 0) {
      const uint32_t a = (lane < TK_WARPS) ? s_g[lane] : 0u, b = (lane < TK_WARPS) ? s_e[lane] : 0u;
      uint32_t ia = a, ib = b;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t ya = __shfl_up_sync(FULL_MASK, ia, o);
        const uint32_t yb = __shfl_up_sync(FULL_MASK, ib, o);
        if (lane >= o) {
          ia += ya;
          ib += yb;
        }
      }
      if (lane < TK_WARPS) {
        s_g[lane] = ia - a;
        s_e[lane] = ib - b;
      }
      if (lane == 31) {
        s_tot[0] = ia;
        s_tot[1] = ib;
      }
    }
    __syncthreads();
    uint32_t run_g = gt_base + s_g[warp], run_e = eq_base + s_e[warp];
    const uint32_t tot_g = s_tot[0], tot_e = s_tot[1];
#pragma unroll
    for (int j = 0; j < TK_V; ++j) {
      const uint32_t gb = run_g + __popc(mgt[j] & lt_mask);
      const uint32_t eb = run_e + __popc(meq[j] & lt_mask);
      const bool is_gt = (mgt[j] >> lane) & 1u, is_eq = (meq[j] >> lane) & 1u;
      if (is_gt || (is_eq && eb < need)) orow[gb + min(eb, need)] = (uint32_t)(start + wb + j * 32 + lane);
      run_g += __popc(mgt[j]);
      run_e += __popc(meq[j]);
    }
    gt_base += tot_g;
    eq_base += tot_e;
    __syncthreads();  // s_g, s_e, s_tot are rewritten by the next chunk
  }
}
