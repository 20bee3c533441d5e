// Dense attention of DSA's dense stages: (1) dense causal attention forward with the per-head
// LSE, (2) the streaming warm-up KL between the head-mean attention probabilities and the
// lightning indexer's softmax, with its gradient into the indexer, and (3, 4) the dense
// attention's backward (the dense pre-training stage; see its section below). No L x L tensor
// is stored.
//
// Shapes (row-major): q, k [B, H, T, DQK] bf16; v [B, H, T, DV] bf16; out [B, H, T, DV] bf16;
// lse [B, H, T] f32 (natural log of sum_s exp(scale * q.k) over the keys of t);
// qi [B, T, HI, DI] f32; w [B, T, HI] f32; ki [B, T, DI] f32;
// kl [B, T] f32; dqi [B, T, HI, DI] f32; dw [B, T, HI] f32; dki [B, T, DI] f32;
// starts [B, T] u32 or null.
//
// Keys of a query. Query t of sequence b sees the keys start[b, t] <= s <= t: start is the
// first token of its document under document masking; a null `starts` means start 0 for every
// query (plain causal attention: no tile is skipped, the results equal all-zero starts bit for
// bit). Every other key is masked: -inf logit, p = 0, ds = 0, dI = 0. The caller guarantees
// start <= t, so every row has at least its own key (the kernels do not check it).
// Tiles: a block skips the key tiles that no query of its tile sees: with starts, the leading
// ones before the smallest start of its queries (kernels 1, 2 and 4: the keys its queries see
// are the union of [start[t], t] over consecutive t, one interval from that smallest start to
// the last query, so no later tile is entirely masked), and in kernel 3 (which walks queries)
// the query tiles none of whose queries sees a key of its block. A skipped tile is one whose
// every entry is masked: processing it would add exact zeros (p = 0, dI = 0) and leave the
// online softmax's (m, l) unchanged, so the unmasked entries are summed in the same order.
//
// Maths of (2), per sequence b and query t over its keys s (start[b, t] <= s <= t):
//   p[t,s]  = (1/H) sum_h exp(scale * q_h[t].k_h[s] - lse_h[t])    (head mean = L1-normalised sum)
//   I[t,s]  = sum_j w[t,j] ReLU(qi[t,j].ki[s]),   lseI[t] = logsumexp_s I[t,s]
//   kl[t]   = sum_s p (log p - (I - lseI)), with 0 log 0 = 0
//   dI[t,s] = g (exp(I - lseI) - p)                (gradient of g * sum_t kl[t] w.r.t. I)
//   G_j     = dI * w[t,j] * 1[qi[t,j].ki[s] > 0]
//   dqi[t,j,:] = sum_s G_j[t,s] ki[s,:];  dki[s,:] = sum_t sum_j G_j[t,s] qi[t,j,:];
//   dw[t,j]    = sum_s dI[t,s] ReLU(qi[t,j].ki[s]).
//
// Numerics. Every product runs on the tensor cores (mma.sync m16n8k16, bf16 inputs, f32
// accumulators). q, k, v are bf16 already; qi and ki (f32 in memory) are rounded to bf16
// (round-to-nearest-even) when staged in shared memory, so the indexer logits, the ReLU masks
// and the gradients see bf16-rounded qi/ki (the plain twin is f32). The G_j operand of the
// dqi/dki products is rounded to bf16 (relative 2^-9 per element); the attention P of the
// forward's P.V product too (as in FlashAttention). Softmaxes, logits, LSEs, the KL and dw are
// f32. Masked entries (s > t, s < start, or s >= T) are -inf in every softmax and carry p = 0,
// dI = 0.
// The ReLU mask is strict (> 0). Exponentials use exp2f on log2e-scaled arguments.
//
// Kernel (1) dense_attn_fwd_dvN: FlashAttention-2 style. One block of 4 warps per (64 queries,
// head, sequence); each warp owns 16 query rows; key/value tiles of 64 rows are double
// buffered with cp.async; online softmax in f32; output tile kept in registers (N = DV padded
// to 32/64/128/256).
//
// Kernel (2) warmup_kl_bf16: one block of 8 warps per (128 queries, sequence); each warp owns
// 16 query rows. Keys are processed in chunks of 64. Pass 1 computes, chunk by chunk, the
// indexer logits and an online row LSE. Pass 2, chunk by chunk: (A) for every head, stage the
// q rows and the chunk's k rows (cp.async, double buffered), recompute the scores on the
// tensor cores and accumulate exp(scale*s - lse_h) into p; (B1) recompute the indexer logits
// I, then dI and the KL terms (kept in registers); (B2) for every indexer head j: recompute
// qi_j.ki^T for the ReLU mask, form G_j (registers, plus a bf16 copy in shared memory),
// dqi_j += G_j ki (registers; added into dqi in global memory; this block is the only writer
// of its rows, so no atomics and a fixed order), dw (shared memory, one owner thread per
// entry), and dki_chunk += G_j^T qi_j (registers, over all j); at the end of the chunk dki is
// added to global memory with f32 atomicAdd (the order of those additions across query
// blocks is NOT deterministic; everything else is). Workspace: none beyond the outputs
// (the row LSEs of I live in registers).

#include <stdint.h>
#include <math.h>

#include "mma.cuh"

#define FULL 0xFFFFFFFFu
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

typedef uint16_t bf16_t;  // raw bf16 bits

// ---------------------------------------------------------------------------------------------
// Small PTX helpers.

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(FULL, v, 1));
  return fmaxf(v, __shfl_xor_sync(FULL, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(FULL, v, 1);
  return v + __shfl_xor_sync(FULL, v, 2);
}

// Copy rows r0 .. r0 + nrows of a [T, D] bf16 matrix (row stride D) into shared memory with
// row stride D + 8 (the 16-byte pad puts the 8 rows of an ldmatrix in distinct banks when D is
// a multiple of 16). Rows at or past T are zero-filled.
__device__ __forceinline__ void load_rows_async(bf16_t* dst, const bf16_t* src, int r0, int nrows, int T, int D,
                                                int nthreads) {
  const int cpr = D >> 3;  // 16-byte chunks per row
  const int stride = D + 8;
  for (int i = threadIdx.x; i < nrows * cpr; i += nthreads) {
    const int r = i / cpr, c = i - r * cpr;
    const bool ok = r0 + r < T;
    const bf16_t* s = ok ? src + (size_t)(r0 + r) * D + c * 8 : src;
    cp_async16(dst + r * stride + c * 8, s, ok ? 16 : 0);
  }
}

// The first key tile (of `tile` keys) that a block's queries t0..last see: the smallest
// start[t] over them, clamped to t (a start never passes its query), divided by `tile`; 0
// without starts. A block reduction (integer atomicMin: order-free) through `scratch`, one int
// of shared memory not otherwise in use during the call (the kernels pass the start of their
// dynamic shared memory before their first copy into it: no static shared memory is added to
// the dynamic size the host budgets); every thread of the block must call it.
__device__ __forceinline__ int first_key_tile(const uint32_t* __restrict__ sb, int t0, int last, int tile,
                                              int nthreads, int* scratch) {
  if (!sb) return 0;  // block-uniform
  if (threadIdx.x == 0) *scratch = last;
  __syncthreads();
  int m = last;
  for (int t = t0 + (int)threadIdx.x; t <= last; t += nthreads) m = min(m, (int)min(sb[t], (uint32_t)t));
  atomicMin(scratch, m);
  __syncthreads();
  const int first = *scratch / tile;
  __syncthreads();  // the scratch word is free again
  return first;
}

// Fragment address helpers (lane l of the warp; all tiles row-major in shared memory).
// A operand [m][k] (non-transposed): 16x16 block at (m0, k0).
__device__ __forceinline__ int a_row(int lane) { return lane & 15; }
__device__ __forceinline__ int a_col(int lane) { return (lane >> 4) << 3; }
// B operand stored [n][k] (non-transposed ldmatrix), two n-tiles (16 n) x 16 k.
__device__ __forceinline__ int bnk_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
__device__ __forceinline__ int bnk_col(int lane) { return ((lane >> 3) & 1) << 3; }
// B operand stored [k][n] (ldmatrix.trans), 16 k x two n-tiles (16 n).
__device__ __forceinline__ int bkn_row(int lane) { return (lane & 7) + (((lane >> 3) & 1) << 3); }
__device__ __forceinline__ int bkn_col(int lane) { return (lane >> 4) << 3; }
// A operand stored [k][m] (ldmatrix.trans): 16 m x 16 k.
__device__ __forceinline__ int akm_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
__device__ __forceinline__ int akm_col(int lane) { return ((lane >> 3) & 1) << 3; }

// Warp-level tile products shared by the dense attention kernels (mma.sync m16n8k16).
// acc[2 NP][4] += A B^T: A the 16 rows at `a` (row stride sa), B the NP * 16 rows at `b` (row
// stride sb), both [rows][depth] row-major in shared memory, depth a multiple of 16.
template <int NP>
__device__ __forceinline__ void warp_abt(float (&acc)[2 * NP][4], const bf16_t* a, int sa, const bf16_t* b, int sb, int depth,
                                         int lane) {
  for (int kk = 0; kk < depth / 16; ++kk) {
    uint32_t af[4];
    ldsm_x4(af, a + a_row(lane) * sa + kk * 16 + a_col(lane));
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t bb[4];
      ldsm_x4(bb, b + (np * 16 + bnk_row(lane)) * sb + kk * 16 + bnk_col(lane));
      mma_bf16_16816(acc[2 * np], af, bb[0], bb[1]);
      mma_bf16_16816(acc[2 * np + 1], af, bb[2], bb[3]);
    }
  }
}

// acc[NP8][4] += P B: P the warp's 16 x (16 KK) f32 tile in mma accumulator layout (p[2 KK][4]),
// rounded to bf16 as the A operand; B the 16 KK rows at `b` (row stride sb), [k][n] row-major,
// read with ldmatrix.trans; only the first n (a multiple of 16, <= 8 NP8) columns.
template <int KK, int NP8>
__device__ __forceinline__ void warp_pb(float (&acc)[NP8][4], const float (&p)[2 * KK][4], const bf16_t* b, int sb, int n,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    uint32_t a[4];
    a[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
    a[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
    a[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int np = 0; np < NP8 / 2; ++np) {
      if (np * 16 < n) {
        uint32_t bb[4];
        ldsm_x4_t(bb, b + (kk * 16 + bkn_row(lane)) * sb + np * 16 + bkn_col(lane));
        mma_bf16_16816(acc[2 * np], a, bb[0], bb[1]);
        mma_bf16_16816(acc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: dense causal attention forward with per-head LSE (keys start[b, t] <= s <= t).

#define FA_BM 64
#define FA_BN 64
#define FA_THREADS 128

template <int DVP>
__device__ __forceinline__ void dense_fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                          const bf16_t* __restrict__ v, const uint32_t* __restrict__ starts,
                                          bf16_t* __restrict__ out, float* __restrict__ lse, int T, int H, int DQK,
                                          int DV, float scale_log2) {
  extern __shared__ __align__(16) unsigned char fa_smem[];
  const int SQ = DQK + 8, SV = DV + 8;
  bf16_t* q_s = (bf16_t*)fa_smem;      // [FA_BM][SQ]
  bf16_t* k_s = q_s + FA_BM * SQ;       // [2][FA_BN][SQ]
  bf16_t* v_s = k_s + 2 * FA_BN * SQ;   // [2][FA_BN][SV]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, cq = lane & 3;
  const int ntiles = (T + FA_BM - 1) / FA_BM;
  const int tile = ntiles - 1 - (int)blockIdx.x;  // longest rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const int t0 = tile * FA_BM;
  const size_t bh = (size_t)b * H + h;
  const bf16_t* qb = q + bh * T * DQK;
  const bf16_t* kb = k + bh * T * DQK;
  const bf16_t* vb = v + bh * T * DV;
  const int last = min(t0 + FA_BM, T) - 1;
  const int nkt = last / FA_BN + 1;
  const uint32_t* sb = starts ? starts + (size_t)b * T : nullptr;
  const int kt0 = first_key_tile(sb, t0, last, FA_BN, FA_THREADS, (int*)fa_smem);  // earlier tiles: all masked

  load_rows_async(q_s, qb, t0, FA_BM, T, DQK, FA_THREADS);
  load_rows_async(k_s, kb, kt0 * FA_BN, FA_BN, T, DQK, FA_THREADS);
  load_rows_async(v_s, vb, kt0 * FA_BN, FA_BN, T, DV, FA_THREADS);
  cp_async_commit();

  float o[DVP / 8][4];
#pragma unroll
  for (int nt = 0; nt < DVP / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int row0 = t0 + warp * 16 + gq;  // this thread's rows: row0 and row0 + 8
  int st[2];                             // and their first keys
#pragma unroll
  for (int r = 0; r < 2; ++r) st[r] = (sb && row0 + 8 * r < T) ? (int)min(sb[row0 + 8 * r], (uint32_t)T) : 0;

  for (int kt = kt0; kt < nkt; ++kt) {
    const int buf = (kt - kt0) & 1;
    if (kt + 1 < nkt) {
      load_rows_async(k_s + (buf ^ 1) * FA_BN * SQ, kb, (kt + 1) * FA_BN, FA_BN, T, DQK, FA_THREADS);
      load_rows_async(v_s + (buf ^ 1) * FA_BN * SV, vb, (kt + 1) * FA_BN, FA_BN, T, DV, FA_THREADS);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16_t* ks = k_s + buf * FA_BN * SQ;
    const bf16_t* vs = v_s + buf * FA_BN * SV;

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    warp_abt<4>(s, q_s + warp * 16 * SQ, SQ, ks, SQ, DQK, lane);

    // Scale into the log2 domain, mask (s > t, s < start or s >= T -> -inf), online softmax.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row0 + ((e >> 1) << 3);
        const int col = kt * FA_BN + nt * 8 + 2 * cq + (e & 1);
        float x = s[nt][e] * scale_log2;
        if (col > row || col < st[e >> 1] || col >= T) x = -INFINITY;
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float ref[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mn = fmaxf(m[r], quad_max(mx[r]));
      ref[r] = (mn == -INFINITY) ? 0.f : mn;  // a fully masked row stays at p = 0
      alpha[r] = exp2f(m[r] - ref[r]);        // m = -inf -> 0
      m[r] = mn;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - ref[e >> 1]);
        s[nt][e] = p;
        rs[e >> 1] += p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + rs[r];  // per-thread partial; quad-summed at the end
#pragma unroll
    for (int nt = 0; nt < DVP / 8; ++nt) {
      o[nt][0] *= alpha[0];
      o[nt][1] *= alpha[0];
      o[nt][2] *= alpha[1];
      o[nt][3] *= alpha[1];
    }

    // O += P V: P (bf16) straight from the score fragments, V via ldmatrix.trans.
    warp_pb<4, DVP / 8>(o, s, vs, SV, DV, lane);
    __syncthreads();  // buffer `buf` is refilled in the next iteration
  }

  // Normalise and write the output (bf16) and the natural-log LSE.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    const int row = row0 + 8 * r;
    if (row < T) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      bf16_t* orow = out + (bh * T + row) * DV;
#pragma unroll
      for (int nt = 0; nt < DVP / 8; ++nt) {
        if (nt * 8 < DV) {
          *(uint32_t*)(orow + nt * 8 + 2 * cq) = pack_bf16(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
        }
      }
      if (cq == 0) lse[bh * T + row] = (m[r] + log2f(l[r])) * LN2;
    }
  }
}

#define DENSE_FWD(DVP)                                                                                     \
  extern "C" __global__ void __launch_bounds__(FA_THREADS) dense_attn_fwd_dv##DVP(                      \
      const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,              \
      const uint32_t* __restrict__ starts, bf16_t* __restrict__ out, float* __restrict__ lse, int T, int H,  \
      int DQK, int DV, float scale_log2) {                                                                   \
    dense_fwd<DVP>(q, k, v, starts, out, lse, T, H, DQK, DV, scale_log2);                                \
  }
DENSE_FWD(32)
DENSE_FWD(64)
DENSE_FWD(128)
DENSE_FWD(256)

// ---------------------------------------------------------------------------------------------
// Kernel 2: streaming warm-up KL and its gradient into the indexer.

#define KL_BM 128  // queries per block (8 warps x 16 rows)
#define KL_BC 64   // keys per chunk
#define KL_THREADS 256
#define KL_SG (KL_BC + 8)  // row stride of the G tile (bf16)

// Shared memory. Region R is used by phase A (attention tiles) or by the indexer phases
// (f32 staging of qi_j, its bf16 tile, the G tile); then the bf16 ki chunk and dw [KL_BM][HI].
struct KlSmem {
  bf16_t* qk;      // phase A: buffer i holds q rows at qk + i * qk_buf, then k rows at + KL_BM * SQ
  size_t qk_buf;   // elements per phase-A buffer
  float* stg;
  bf16_t* tile;
  bf16_t* gs;
  bf16_t* ki;
  float* dws;
};

__device__ __forceinline__ KlSmem kl_carve(unsigned char* base, int DQK, int DI, int nbuf) {
  KlSmem s;
  const int SQ = DQK + 8, SI = DI + 8;
  const size_t a_bytes = (size_t)nbuf * (KL_BM + KL_BC) * SQ * 2;
  const size_t b_bytes = (size_t)KL_BM * DI * 4 + (size_t)KL_BM * SI * 2 + (size_t)KL_BM * KL_SG * 2;
  const size_t region = a_bytes > b_bytes ? a_bytes : b_bytes;
  bf16_t* a = (bf16_t*)base;
  s.qk = a;
  s.qk_buf = (size_t)(KL_BM + KL_BC) * SQ;  // a second buffer only when nbuf == 2
  s.stg = (float*)base;
  s.tile = (bf16_t*)(base + (size_t)KL_BM * DI * 4);
  s.gs = s.tile + KL_BM * SI;
  s.ki = (bf16_t*)(base + region);
  s.dws = (float*)(base + region + (size_t)KL_BC * SI * 2);
  return s;
}

struct KlArgs {
  const bf16_t* q;
  const bf16_t* k;
  const float* lse;
  const float* qi;
  const float* w;
  const float* ki;
  int T, H, DQK, HI, DI, nbuf, b, t0;
};

// Stage ki rows c0 .. c0 + KL_BC as bf16 (synchronous; rows >= T are zero).
__device__ __forceinline__ void stage_ki(const KlSmem& sm, const KlArgs& A, int c0) {
  const int cpr = A.DI >> 2, SI = A.DI + 8;
  for (int i = threadIdx.x; i < KL_BC * cpr; i += KL_THREADS) {
    const int r = i / cpr, c = i - r * cpr, s = c0 + r;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (s < A.T) x = *(const float4*)(A.ki + ((size_t)A.b * A.T + s) * A.DI + 4 * c);
    uint2 u;
    u.x = pack_bf16(x.x, x.y);
    u.y = pack_bf16(x.z, x.w);
    *(uint2*)(sm.ki + r * SI + 4 * c) = u;
  }
}

// Start copying qi[b, t0 .. t0 + KL_BM, j, :] (f32) into the staging buffer; rows >= T are zero.
__device__ __forceinline__ void issue_qi(const KlSmem& sm, const KlArgs& A, int j) {
  const int cpr = A.DI >> 2;
  for (int i = threadIdx.x; i < KL_BM * cpr; i += KL_THREADS) {
    const int r = i / cpr, c = i - r * cpr, t = A.t0 + r;
    const bool ok = t < A.T;
    const float* src = ok ? A.qi + (((size_t)A.b * A.T + t) * A.HI + j) * A.DI + 4 * c : A.qi;
    cp_async16(sm.stg + r * A.DI + 4 * c, src, ok ? 16 : 0);
  }
  cp_async_commit();
}

// Staged f32 qi_j -> bf16 tile (row stride DI + 8).
__device__ __forceinline__ void convert_qi(const KlSmem& sm, const KlArgs& A) {
  const int cpr = A.DI >> 2, SI = A.DI + 8;
  for (int i = threadIdx.x; i < KL_BM * cpr; i += KL_THREADS) {
    const int r = i / cpr, c = i - r * cpr;
    const float4 x = *(const float4*)(sm.stg + r * A.DI + 4 * c);
    uint2 u;
    u.x = pack_bf16(x.x, x.y);
    u.y = pack_bf16(x.z, x.w);
    *(uint2*)(sm.tile + r * SI + 4 * c) = u;
  }
}

// Top of an iteration over indexer heads: wait for qi_j, convert it to the bf16 tile, start
// the copy of qi_{j+1}. The barriers also order the previous iteration's reads of the tile
// (and of the G tile) before they are overwritten.
__device__ __forceinline__ void next_head_tile(const KlSmem& sm, const KlArgs& A, int j) {
  cp_async_wait<0>();
  __syncthreads();
  convert_qi(sm, A);
  __syncthreads();
  if (j + 1 < A.HI) issue_qi(sm, A, j + 1);
}

// z = qi_j (this warp's 16 rows) . ki_chunk^T (64 keys), f32.
__device__ __forceinline__ void index_z(float (&z)[8][4], const KlSmem& sm, int DI, int warp, int lane) {
  const int SI = DI + 8;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) z[nt][0] = z[nt][1] = z[nt][2] = z[nt][3] = 0.f;
  for (int kk = 0; kk < DI / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, sm.tile + (warp * 16 + a_row(lane)) * SI + kk * 16 + a_col(lane));
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t bb[4];
      ldsm_x4(bb, sm.ki + (np * 16 + bnk_row(lane)) * SI + kk * 16 + bnk_col(lane));
      mma_bf16_16816(z[2 * np], a, bb[0], bb[1]);
      mma_bf16_16816(z[2 * np + 1], a, bb[2], bb[3]);
    }
  }
}

// Indexer logits of this warp's rows against the staged ki chunk: I = sum_j w_j ReLU(z_j).
// Identical instruction sequence in both passes, so pass 2 reproduces pass 1's logits.
__device__ __forceinline__ void indexer_logits(float (&I)[8][4], const KlSmem& sm, const KlArgs& A, int warp,
                                               int lane, int ra, int rb) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) I[nt][0] = I[nt][1] = I[nt][2] = I[nt][3] = 0.f;
  __syncthreads();  // region R is free (previous phase done)
  issue_qi(sm, A, 0);
  for (int j = 0; j < A.HI; ++j) {
    next_head_tile(sm, A, j);
    const float wa = ra < A.T ? A.w[((size_t)A.b * A.T + ra) * A.HI + j] : 0.f;
    const float wb = rb < A.T ? A.w[((size_t)A.b * A.T + rb) * A.HI + j] : 0.f;
    float z[8][4];
    index_z(z, sm, A.DI, warp, lane);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      I[nt][0] += wa * fmaxf(z[nt][0], 0.f);
      I[nt][1] += wa * fmaxf(z[nt][1], 0.f);
      I[nt][2] += wb * fmaxf(z[nt][2], 0.f);
      I[nt][3] += wb * fmaxf(z[nt][3], 0.f);
    }
  }
}

// Attention target of this warp's rows over the chunk: P[t,s] = sum_h exp2(scale_log2 * s_h
// - lse_h[t] log2e) (not yet divided by H; masked entries are discarded by the caller).
__device__ __forceinline__ void head_sum_probs(float (&P)[8][4], const KlSmem& sm, const KlArgs& A, int c0, int warp,
                                               int lane, int ra, int rb, float scale_log2) {
  const int SQ = A.DQK + 8;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) P[nt][0] = P[nt][1] = P[nt][2] = P[nt][3] = 0.f;
  const size_t plane = (size_t)A.T * A.DQK;
  const bf16_t* qb = A.q + (size_t)A.b * A.H * plane;
  const bf16_t* kb = A.k + (size_t)A.b * A.H * plane;
  // Buffer i: q rows at qk_s(i), k rows at qk_s(i) + KL_BM * SQ.
  auto qk_s = [&](int i) { return sm.qk + (size_t)i * sm.qk_buf; };
  load_rows_async(qk_s(0), qb, A.t0, KL_BM, A.T, A.DQK, KL_THREADS);
  load_rows_async(qk_s(0) + KL_BM * SQ, kb, c0, KL_BC, A.T, A.DQK, KL_THREADS);
  cp_async_commit();
  for (int h = 0; h < A.H; ++h) {
    const int buf = (A.nbuf == 2) ? (h & 1) : 0;
    if (A.nbuf == 2 && h + 1 < A.H) {
      load_rows_async(qk_s(buf ^ 1), qb + (size_t)(h + 1) * plane, A.t0, KL_BM, A.T, A.DQK, KL_THREADS);
      load_rows_async(qk_s(buf ^ 1) + KL_BM * SQ, kb + (size_t)(h + 1) * plane, c0, KL_BC, A.T, A.DQK, KL_THREADS);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const float* lh = A.lse + ((size_t)A.b * A.H + h) * A.T;
    const float la = ra < A.T ? lh[ra] * LOG2E : 0.f;
    const float lb = rb < A.T ? lh[rb] * LOG2E : 0.f;
    const bf16_t* qs = qk_s(buf);
    const bf16_t* ks = qs + KL_BM * SQ;
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    for (int kk = 0; kk < A.DQK / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, qs + (warp * 16 + a_row(lane)) * SQ + kk * 16 + a_col(lane));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        ldsm_x4(bb, ks + (np * 16 + bnk_row(lane)) * SQ + kk * 16 + bnk_col(lane));
        mma_bf16_16816(s[2 * np], a, bb[0], bb[1]);
        mma_bf16_16816(s[2 * np + 1], a, bb[2], bb[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      P[nt][0] += exp2f(fmaf(s[nt][0], scale_log2, -la));
      P[nt][1] += exp2f(fmaf(s[nt][1], scale_log2, -la));
      P[nt][2] += exp2f(fmaf(s[nt][2], scale_log2, -lb));
      P[nt][3] += exp2f(fmaf(s[nt][3], scale_log2, -lb));
    }
    __syncthreads();  // this buffer may be refilled next
    if (A.nbuf == 1 && h + 1 < A.H) {
      load_rows_async(qk_s(0), qb + (size_t)(h + 1) * plane, A.t0, KL_BM, A.T, A.DQK, KL_THREADS);
      load_rows_async(qk_s(0) + KL_BM * SQ, kb + (size_t)(h + 1) * plane, c0, KL_BC, A.T, A.DQK, KL_THREADS);
      cp_async_commit();
    }
  }
}

extern "C" __global__ void __launch_bounds__(KL_THREADS, 1)
    warmup_kl_bf16(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const float* __restrict__ lse,
                   const float* __restrict__ qi, const float* __restrict__ w, const float* __restrict__ ki,
                   const uint32_t* __restrict__ starts, float* __restrict__ kl, float* __restrict__ dqi,
                   float* __restrict__ dw, float* __restrict__ dki, int T, int H, int DQK, int HI, int DI,
                   float scale_log2, float g, int nbuf) {
  extern __shared__ __align__(16) unsigned char kl_smem[];
  const KlSmem sm = kl_carve(kl_smem, DQK, DI, nbuf);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, cq = lane & 3;
  const int ntiles = (T + KL_BM - 1) / KL_BM;
  const int tile = ntiles - 1 - (int)blockIdx.x;  // longest rows first
  const int b = blockIdx.y;
  const int t0 = tile * KL_BM;
  const int rows_end = min(t0 + KL_BM, T);
  const int nchunks = (rows_end + KL_BC - 1) / KL_BC;
  const int SI = DI + 8;
  KlArgs A;
  A.q = q; A.k = k; A.lse = lse; A.qi = qi; A.w = w; A.ki = ki;
  A.T = T; A.H = H; A.DQK = DQK; A.HI = HI; A.DI = DI; A.nbuf = nbuf; A.b = b; A.t0 = t0;
  const int rl0 = warp * 16 + gq, rl1 = rl0 + 8;  // this thread's local rows
  const int ra = t0 + rl0, rb = t0 + rl1;         // and their positions
  const uint32_t* sb = starts ? starts + (size_t)b * T : nullptr;
  const int sa = (sb && ra < T) ? (int)min(sb[ra], (uint32_t)T) : 0;  // first keys of ra and rb
  const int sr = (sb && rb < T) ? (int)min(sb[rb], (uint32_t)T) : 0;
  // Key chunks before ci0 are masked for every row of the block (both passes skip them).
  const int ci0 = first_key_tile(sb, t0, rows_end - 1, KL_BC, KL_THREADS, (int*)sm.dws);

  for (int i = tid; i < KL_BM * HI; i += KL_THREADS) sm.dws[i] = 0.f;

  // ---- Pass 1: row LSE of the indexer logits over each row's keys (online, f32).
  float mI[2] = {-INFINITY, -INFINITY}, lI[2] = {0.f, 0.f};
  for (int ci = ci0; ci < nchunks; ++ci) {
    const int c0 = ci * KL_BC;
    __syncthreads();  // previous chunk's readers of the ki tile are done
    stage_ki(sm, A, c0);
    float I[8][4];
    indexer_logits(I, sm, A, warp, lane, ra, rb);
    float cm[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = (e < 2) ? ra : rb;
        const int col = c0 + nt * 8 + 2 * cq + (e & 1);
        if (col > row || col < ((e < 2) ? sa : sr) || col >= T) I[nt][e] = -INFINITY;
        cm[e >> 1] = fmaxf(cm[e >> 1], I[nt][e]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // Every lane runs the shuffles (no early exit); rows past T have no valid key and keep
      // m = -inf, l = 0 through the finite reference 0.
      const float mn = fmaxf(mI[r], quad_max(cm[r]));
      const float ref = (mn == -INFINITY) ? 0.f : mn;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        sum += exp2f((I[nt][2 * r] - ref) * LOG2E);
        sum += exp2f((I[nt][2 * r + 1] - ref) * LOG2E);
      }
      sum = quad_sum(sum);
      lI[r] = lI[r] * exp2f((mI[r] - ref) * LOG2E) + sum;
      mI[r] = mn;
    }
  }
  float lseI[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) lseI[r] = mI[r] + logf(lI[r]);

  // ---- Pass 2: target, KL and gradients, chunk by chunk.
  float klacc[2] = {0.f, 0.f};
  const float inv_h = 1.f / (float)H;
  for (int ci = ci0; ci < nchunks; ++ci) {
    const int c0 = ci * KL_BC;
    __syncthreads();  // previous chunk done with every shared buffer
    stage_ki(sm, A, c0);

    // (A) head-mean attention probabilities.
    float pd[8][4];  // p, then dI
    head_sum_probs(pd, sm, A, c0, warp, lane, ra, rb, scale_log2);

    // (B1) indexer logits, KL terms, dI.
    float I[8][4];
    indexer_logits(I, sm, A, warp, lane, ra, rb);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int row = r ? rb : ra;
        const int col = c0 + nt * 8 + 2 * cq + (e & 1);
        float d = 0.f;
        if (col <= row && col >= (r ? sr : sa) && col < T && row < T) {
          const float pr = pd[nt][e] * inv_h;
          const float lq = I[nt][e] - lseI[r];  // log softmax(I)
          if (pr > 0.f) klacc[r] += pr * (logf(pr) - lq);
          d = g * (exp2f(lq * LOG2E) - pr);
        }
        pd[nt][e] = d;
      }
    }

    // (B2) gradients, indexer head by indexer head.
    const int kg = warp & 3, ch = warp >> 2;  // dki tile of this warp: keys kg*16.., columns ch*64..
    float dk[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) dk[nt][0] = dk[nt][1] = dk[nt][2] = dk[nt][3] = 0.f;
    __syncthreads();
    issue_qi(sm, A, 0);
    for (int j = 0; j < HI; ++j) {
      next_head_tile(sm, A, j);
      const float wa = ra < T ? w[((size_t)b * T + ra) * HI + j] : 0.f;
      const float wb = rb < T ? w[((size_t)b * T + rb) * HI + j] : 0.f;
      float z[8][4];
      index_z(z, sm, DI, warp, lane);
      // G = dI * w * 1[z > 0] (bf16: A fragments in registers and a copy in shared memory);
      // dw partial = sum_s dI * ReLU(z) (f32).
      uint32_t ga[4][4];
      float dwa = 0.f, dwb = 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        float gv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float zz = z[nt][e], d = pd[nt][e];
          const bool pos = zz > 0.f;
          if (e < 2) dwa += pos ? d * zz : 0.f;
          else dwb += pos ? d * zz : 0.f;
          gv[e] = pos ? d * (e < 2 ? wa : wb) : 0.f;
        }
        const uint32_t lo = pack_bf16(gv[0], gv[1]), hi = pack_bf16(gv[2], gv[3]);
        ga[nt >> 1][(nt & 1) * 2] = lo;
        ga[nt >> 1][(nt & 1) * 2 + 1] = hi;
        *(uint32_t*)(sm.gs + rl0 * KL_SG + nt * 8 + 2 * cq) = lo;
        *(uint32_t*)(sm.gs + rl1 * KL_SG + nt * 8 + 2 * cq) = hi;
      }
      dwa = quad_sum(dwa);
      dwb = quad_sum(dwb);
      if (cq == 0) {  // one owner thread per (row, j): fixed summation order over chunks
        sm.dws[rl0 * HI + j] += dwa;
        sm.dws[rl1 * HI + j] += dwb;
      }
      // dqi[rows, j, :] += G (16 x 64 keys) . ki_chunk (64 x DI), in two halves of 64 columns.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (half * 64 < DI) {
          float u[8][4];
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) u[nt][0] = u[nt][1] = u[nt][2] = u[nt][3] = 0.f;
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
              if (half * 64 + np * 16 < DI) {
                uint32_t bb[4];
                ldsm_x4_t(bb, sm.ki + (kk * 16 + bkn_row(lane)) * SI + half * 64 + np * 16 + bkn_col(lane));
                mma_bf16_16816(u[2 * np], ga[kk], bb[0], bb[1]);
                mma_bf16_16816(u[2 * np + 1], ga[kk], bb[2], bb[3]);
              }
            }
          }
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const int col = half * 64 + nt * 8 + 2 * cq;
            if (col < DI) {
              if (ra < T) {
                float2* p = (float2*)(dqi + (((size_t)b * T + ra) * HI + j) * DI + col);
                float2 o = *p;
                o.x += u[nt][0];
                o.y += u[nt][1];
                *p = o;
              }
              if (rb < T) {
                float2* p = (float2*)(dqi + (((size_t)b * T + rb) * HI + j) * DI + col);
                float2 o = *p;
                o.x += u[nt][2];
                o.y += u[nt][3];
                *p = o;
              }
            }
          }
        }
      }
      __syncthreads();  // the G tile is complete
      // dki_chunk[keys kg*16.., cols ch*64..] += G^T (keys x 128 rows) . qi_j (128 rows x DI).
      if (ch * 64 < DI) {
#pragma unroll 2
        for (int kt = 0; kt < KL_BM / 16; ++kt) {
          uint32_t a[4];
          ldsm_x4_t(a, sm.gs + (kt * 16 + akm_row(lane)) * KL_SG + kg * 16 + akm_col(lane));
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            if (ch * 64 + np * 16 < DI) {
              uint32_t bb[4];
              ldsm_x4_t(bb, sm.tile + (kt * 16 + bkn_row(lane)) * SI + ch * 64 + np * 16 + bkn_col(lane));
              mma_bf16_16816(dk[2 * np], a, bb[0], bb[1]);
              mma_bf16_16816(dk[2 * np + 1], a, bb[2], bb[3]);
            }
          }
        }
      }
    }
    // dki rows of this chunk receive contributions from every query block: f32 atomics.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = c0 + kg * 16 + gq + ((e >> 1) << 3);
        const int col = ch * 64 + nt * 8 + 2 * cq + (e & 1);
        if (key < T && col < DI) atomicAdd(dki + ((size_t)b * T + key) * DI + col, dk[nt][e]);
      }
    }
  }

  // ---- Outputs owned by this block: kl and dw rows.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float s = quad_sum(klacc[r]);
    const int row = r ? rb : ra;
    if (cq == 0 && row < T) kl[(size_t)b * T + row] = s;
  }
  __syncthreads();
  for (int i = tid; i < KL_BM * HI; i += KL_THREADS) {
    const int r = i / HI, t = t0 + r;
    if (t < T) dw[((size_t)b * T + t) * HI + (i - r * HI)] = sm.dws[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels 3 and 4: dense causal attention backward (the dense stage trains the attention).
//
// Maths (FlashAttention-2's backward), per (b, h), queries t and their keys start[b, t] <= s <= t:
//   p[t,s] = exp(scale q[t].k[s] - lse[t]);  delta[t] = sum_d dout[t,d] out[t,d]
//   dv[s]  = sum_t p[t,s] dout[t];  dp[t,s] = dout[t].v[s];  ds[t,s] = p[t,s] (dp[t,s] - delta[t])
//   dq[t]  = scale sum_s ds[t,s] k[s];  dk[s] = scale sum_t ds[t,s] q[t]
// lse is the forward's (natural log), delta is computed by the caller (f32).
//
// Two kernels instead of FlashAttention-2's one with atomic dq: kernel 3 owns 64 keys and
// walks the query tiles after them (dk, dv); kernel 4 owns 64 queries and walks the key tiles
// before them (dq). Each output row has exactly one writer and a fixed summation order, so
// the backward is deterministic (bitwise repeatable) at the price of computing q.k and
// dout.v twice (7 products per pair instead of 5).
//
// Numerics: products on the tensor cores (bf16 inputs, f32 accumulators); p and ds are rounded
// to bf16 as operands of the dv, dk and dq products (relative 2^-9 each, as in
// FlashAttention); exponentials, delta and every accumulator are f32; outputs are f32.
// Masked pairs (s > t, s < start[b, t], or t, s >= T) carry p = 0 and ds = 0.
//
// Register budget per thread: kernel 3 holds dk (DQKP / 2 floats) and dv (DVP / 2) plus two
// 16 x 32 tiles (16 floats each); kernel 4 holds dq (DQKP / 2) plus two 16 x 64 tiles. The
// host takes these kernels only for DQKP + DVP <= 320 (the 671B shape 192 + 128).

#define BW_BK 64  // kernel 3: keys per block (4 warps x 16)
#define BW_BQ 32  // kernel 3: queries per tile
#define BW_THREADS 128

template <int DQKP, int DVP>
__device__ __forceinline__ void dense_bwd_dkdv(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                               const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                                               const float* __restrict__ lse, const float* __restrict__ delta,
                                               const uint32_t* __restrict__ starts, float* __restrict__ dk,
                                               float* __restrict__ dv, int T, int H, int DQK, int DV, float scale,
                                               float scale_log2) {
  extern __shared__ __align__(16) unsigned char bw_smem[];
  const int SQ = DQK + 8, SV = DV + 8;
  bf16_t* k_s = (bf16_t*)bw_smem;          // [BW_BK][SQ]
  bf16_t* v_s = k_s + BW_BK * SQ;          // [BW_BK][SV]
  bf16_t* q_s = v_s + BW_BK * SV;          // [2][BW_BQ][SQ]
  bf16_t* do_s = q_s + 2 * BW_BQ * SQ;     // [2][BW_BQ][SV]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, cq = lane & 3;
  const int s0 = blockIdx.x * BW_BK;  // block 0 has the most query tiles: launched first
  const int h = blockIdx.y, b = blockIdx.z;
  const size_t bh = (size_t)b * H + h;
  const bf16_t* qb = q + bh * T * DQK;
  const bf16_t* kb = k + bh * T * DQK;
  const bf16_t* vb = v + bh * T * DV;
  const bf16_t* dob = dout + bh * T * DV;
  const float* lseb = lse + bh * T;
  const float* deltab = delta + bh * T;
  const uint32_t* sb = starts ? starts + (size_t)b * T : nullptr;
  const int nqt = (T + BW_BQ - 1) / BW_BQ;
  // Does query tile qt see a key of this block (a query of it starts at or before the block's
  // last key)? Without starts every tile from the diagonal on does. With starts a barrier
  // (block-uniform answer); every thread calls it.
  auto live = [&](int qt) -> bool {
    if (!sb) return true;
    const int t = qt * BW_BQ + tid;
    return __syncthreads_or(tid < BW_BQ && t < T && sb[t] < (uint32_t)(s0 + BW_BK));
  };
  // The query tiles walked: the diagonal's and those after it, dead ones skipped (not loaded).
  auto next_live = [&](int qt) -> int {
    do ++qt;
    while (qt < nqt && !live(qt));
    return qt;
  };
  int qt = s0 / BW_BQ;
  if (!live(qt)) qt = next_live(qt);

  load_rows_async(k_s, kb, s0, BW_BK, T, DQK, BW_THREADS);
  load_rows_async(v_s, vb, s0, BW_BK, T, DV, BW_THREADS);
  load_rows_async(q_s, qb, qt * BW_BQ, BW_BQ, T, DQK, BW_THREADS);
  load_rows_async(do_s, dob, qt * BW_BQ, BW_BQ, T, DV, BW_THREADS);
  cp_async_commit();

  float dka[DQKP / 8][4], dva[DVP / 8][4];
#pragma unroll
  for (int nt = 0; nt < DQKP / 8; ++nt) dka[nt][0] = dka[nt][1] = dka[nt][2] = dka[nt][3] = 0.f;
#pragma unroll
  for (int nt = 0; nt < DVP / 8; ++nt) dva[nt][0] = dva[nt][1] = dva[nt][2] = dva[nt][3] = 0.f;
  const int key0 = s0 + warp * 16 + gq;  // this thread's keys: key0 and key0 + 8

  for (int buf = 0; qt < nqt; buf ^= 1) {
    const int nx = next_live(qt);
    if (nx < nqt) {
      load_rows_async(q_s + (buf ^ 1) * BW_BQ * SQ, qb, nx * BW_BQ, BW_BQ, T, DQK, BW_THREADS);
      load_rows_async(do_s + (buf ^ 1) * BW_BQ * SV, dob, nx * BW_BQ, BW_BQ, T, DV, BW_THREADS);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16_t* qs = q_s + buf * BW_BQ * SQ;
    const bf16_t* dos = do_s + buf * BW_BQ * SV;

    // s^T = K Q^T and dp^T = V dout^T for this warp's 16 keys x 32 queries.
    float st[4][4], dpt[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
    warp_abt<2>(st, k_s + warp * 16 * SQ, SQ, qs, SQ, DQK, lane);
    warp_abt<2>(dpt, v_s + warp * 16 * SV, SV, dos, SV, DV, lane);

    // p^T and ds^T in place (element e: key key0 + 8 (e >> 1), query col).
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = qt * BW_BQ + nt * 8 + 2 * cq + e;
        const bool in = col < T;
        const float l2 = in ? lseb[col] * LOG2E : 0.f;
        const float dl = in ? deltab[col] : 0.f;
        const int sc = (in && sb) ? (int)min(sb[col], (uint32_t)T) : 0;  // the query's first key
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key = key0 + 8 * r, i = 2 * r + e;
          const float p = (in && key <= col && key >= sc) ? exp2f(st[nt][i] * scale_log2 - l2) : 0.f;
          st[nt][i] = p;
          dpt[nt][i] = p * (dpt[nt][i] - dl);
        }
      }
    }

    // dv += p^T dout and dk += ds^T q (A operands from the registers, B via ldmatrix.trans).
    warp_pb<2, DVP / 8>(dva, st, dos, SV, DV, lane);
    warp_pb<2, DQKP / 8>(dka, dpt, qs, SQ, DQK, lane);
    __syncthreads();  // buffer `buf` is refilled in the next iteration
    qt = nx;
  }
  cp_async_wait<0>();  // no copy outstanding at exit (every query tile may have been dead)

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key < T) {
      float* dkr = dk + (bh * T + key) * DQK;
      float* dvr = dv + (bh * T + key) * DV;
#pragma unroll
      for (int nt = 0; nt < DQKP / 8; ++nt)
        if (nt * 8 < DQK) *(float2*)(dkr + nt * 8 + 2 * cq) = make_float2(dka[nt][2 * r] * scale, dka[nt][2 * r + 1] * scale);
#pragma unroll
      for (int nt = 0; nt < DVP / 8; ++nt)
        if (nt * 8 < DV) *(float2*)(dvr + nt * 8 + 2 * cq) = make_float2(dva[nt][2 * r], dva[nt][2 * r + 1]);
    }
  }
}

template <int DQKP, int DVP>
__device__ __forceinline__ void dense_bwd_dq(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                             const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                                             const float* __restrict__ lse, const float* __restrict__ delta,
                                             const uint32_t* __restrict__ starts, float* __restrict__ dq, int T, int H,
                                             int DQK, int DV, float scale, float scale_log2) {
  extern __shared__ __align__(16) unsigned char bw_smem[];
  const int SQ = DQK + 8, SV = DV + 8;
  bf16_t* q_s = (bf16_t*)bw_smem;        // [FA_BM][SQ]
  bf16_t* do_s = q_s + FA_BM * SQ;       // [FA_BM][SV]
  bf16_t* k_s = do_s + FA_BM * SV;       // [2][FA_BN][SQ]
  bf16_t* v_s = k_s + 2 * FA_BN * SQ;    // [2][FA_BN][SV]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, cq = lane & 3;
  const int ntiles = (T + FA_BM - 1) / FA_BM;
  const int tile = ntiles - 1 - (int)blockIdx.x;  // longest rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const int t0 = tile * FA_BM;
  const size_t bh = (size_t)b * H + h;
  const bf16_t* qb = q + bh * T * DQK;
  const bf16_t* kb = k + bh * T * DQK;
  const bf16_t* vb = v + bh * T * DV;
  const bf16_t* dob = dout + bh * T * DV;
  const int last = min(t0 + FA_BM, T) - 1;
  const int nkt = last / FA_BN + 1;
  const uint32_t* sb = starts ? starts + (size_t)b * T : nullptr;
  const int kt0 = first_key_tile(sb, t0, last, FA_BN, BW_THREADS, (int*)bw_smem);  // earlier tiles: all masked

  load_rows_async(q_s, qb, t0, FA_BM, T, DQK, BW_THREADS);
  load_rows_async(do_s, dob, t0, FA_BM, T, DV, BW_THREADS);
  load_rows_async(k_s, kb, kt0 * FA_BN, FA_BN, T, DQK, BW_THREADS);
  load_rows_async(v_s, vb, kt0 * FA_BN, FA_BN, T, DV, BW_THREADS);
  cp_async_commit();

  float dqa[DQKP / 8][4];
#pragma unroll
  for (int nt = 0; nt < DQKP / 8; ++nt) dqa[nt][0] = dqa[nt][1] = dqa[nt][2] = dqa[nt][3] = 0.f;
  const int row0 = t0 + warp * 16 + gq;  // this thread's rows: row0 and row0 + 8
  float l2[2], dl[2];
  int sr[2];  // the rows' first keys
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    l2[r] = row < T ? lse[bh * T + row] * LOG2E : 0.f;
    dl[r] = row < T ? delta[bh * T + row] : 0.f;
    sr[r] = (sb && row < T) ? (int)min(sb[row], (uint32_t)T) : 0;
  }

  for (int kt = kt0; kt < nkt; ++kt) {
    const int buf = (kt - kt0) & 1;
    if (kt + 1 < nkt) {
      load_rows_async(k_s + (buf ^ 1) * FA_BN * SQ, kb, (kt + 1) * FA_BN, FA_BN, T, DQK, BW_THREADS);
      load_rows_async(v_s + (buf ^ 1) * FA_BN * SV, vb, (kt + 1) * FA_BN, FA_BN, T, DV, BW_THREADS);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16_t* ks = k_s + buf * FA_BN * SQ;
    const bf16_t* vs = v_s + buf * FA_BN * SV;

    // s = Q K^T and dp = dout V^T for this warp's 16 rows x 64 keys.
    float s[8][4], dp[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    warp_abt<4>(s, q_s + warp * 16 * SQ, SQ, ks, SQ, DQK, lane);
    warp_abt<4>(dp, do_s + warp * 16 * SV, SV, vs, SV, DV, lane);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, row = row0 + 8 * r;
        const int col = kt * FA_BN + nt * 8 + 2 * cq + (e & 1);
        const float p = (row < T && col <= row && col >= sr[r]) ? exp2f(s[nt][e] * scale_log2 - l2[r]) : 0.f;
        dp[nt][e] = p * (dp[nt][e] - dl[r]);
      }
    }

    // dq += ds K (A from the registers, K via ldmatrix.trans).
    warp_pb<4, DQKP / 8>(dqa, dp, ks, SQ, DQK, lane);
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row < T) {
      float* dqr = dq + (bh * T + row) * DQK;
#pragma unroll
      for (int nt = 0; nt < DQKP / 8; ++nt)
        if (nt * 8 < DQK) *(float2*)(dqr + nt * 8 + 2 * cq) = make_float2(dqa[nt][2 * r] * scale, dqa[nt][2 * r + 1] * scale);
    }
  }
}

#define DENSE_BWD(DQKP, DVP)                                                                                    \
  extern "C" __global__ void __launch_bounds__(BW_THREADS) dense_attn_bwd_dkdv_##DQKP##_##DVP(                \
      const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,                   \
      const bf16_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,             \
      const uint32_t* __restrict__ starts, float* __restrict__ dk, float* __restrict__ dv, int T, int H, int DQK,  \
      int DV, float scale, float scale_log2) {                                                                    \
    dense_bwd_dkdv<DQKP, DVP>(q, k, v, dout, lse, delta, starts, dk, dv, T, H, DQK, DV, scale, scale_log2);      \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(BW_THREADS) dense_attn_bwd_dq_##DQKP##_##DVP(                  \
      const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,                   \
      const bf16_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,             \
      const uint32_t* __restrict__ starts, float* __restrict__ dq, int T, int H, int DQK, int DV, float scale,     \
      float scale_log2) {                                                                                         \
    dense_bwd_dq<DQKP, DVP>(q, k, v, dout, lse, delta, starts, dq, T, H, DQK, DV, scale, scale_log2);            \
  }
// Padded head dims (DQKP, DVP) with DQKP + DVP <= 320; the host picks the smallest that fit.
DENSE_BWD(64, 32)
DENSE_BWD(64, 64)
DENSE_BWD(64, 128)
DENSE_BWD(128, 32)
DENSE_BWD(128, 64)
DENSE_BWD(128, 128)
DENSE_BWD(192, 32)
DENSE_BWD(192, 64)
DENSE_BWD(192, 128)
