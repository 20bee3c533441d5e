// Tensor-core sparse MLA in absorbed (MQA) mode, bf16 inputs: forward with per-head LSE and
// backward (dq, dkv), the head-mean probabilities (the sparse-stage KL target), plus the small
// kernels around them (index compaction, backward prep, deterministic dkv reduction, f32 -> bf16).
//
// Shapes (row-major): q [N, H, DQK] bf16, kv [NKV, DQK] bf16 (one shared key per token; its first
// DV columns are also the value), idx [N, K] u32 absolute kv rows (0xFFFFFFFF, or any row >= NKV,
// is padding). Forward output [N, H, DV + 1] f32: the attention output, then the natural-log LSE
// of the scaled scores over the valid keys (-inf, with a zero output, when a query has none).
//
// Matrix products use mma.sync.m16n8k16 (bf16 in, f32 accumulate) with ldmatrix from shared
// memory. Every shared tile is row-major with 16-byte chunks XOR-swizzled inside each group of
// eight chunks (chunk c of row r lives at (c & ~7) | ((c ^ r) & 7)), so that the eight row
// addresses of one ldmatrix (eight consecutive rows, same chunk) hit distinct bank groups.
//
// Numerics: scores S = q . k accumulate in f32 (bf16 products are exact); softmax in f32 in the
// base-2 domain (x = S * scale * log2 e, p = 2^(x - m) with ex2.approx, max 2 ulp), the row sum
// of the unrounded f32 p; P is rounded to bf16 for P V. Backward: P recomputed from the stored
// LSE, dP = dO V^T in f32 with dO rounded to bf16, dS = P (dP - delta) in f32, then scale * dS
// and P rounded to bf16 as mma operands; dq, dkv accumulate in f32. delta = sum_d bf16(dO) * O.
//
// Padding keys are compacted away first (sparse_mla_tc_compact: valid indices in their original
// order plus a count per query), so tiles hold only valid keys except the last one's tail,
// which is zero-filled and masked with -inf scores.

#include <stdint.h>
#include <math.h>
#include <cuda_bf16.h>
#include "mma.cuh"
#include "wgmma.cuh"

typedef __nv_bfloat16 bf16;

#define INVALID 0xFFFFFFFFu
#define FULL 0xFFFFFFFFu
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

#define FWD_BK 64        // keys per forward tile
#define FWD_THREADS 256  // 8 warps for every row-group count
#define BWD_BK 32        // keys per backward tile
#define DET_CAP 4096     // entries sorted at once by the deterministic reduction

// ---------------------------------------------------------------------------------------------
// Small helpers (inline PTX).

// Barrier among the `count` threads (a multiple of 32) that use barrier `id` (1..15).
__device__ __forceinline__ void named_bar(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// D += A B: A 16x16 (row-major fragments a0..a3), B 16x8 (b0, b1), D 16x8 f32. Not `volatile`,
// unlike mma.cuh's mma_bf16_16816: the compiler may schedule these freely (this file's kernels
// were tuned so).
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x, max 2 ulp; 2^-inf = +0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Swizzled 16-byte chunk index (see the header).
__device__ __forceinline__ int swz(int chunk, int row) { return (chunk & ~7) | ((chunk ^ row) & 7); }

// Fire-and-forget f32x4 atomic add (sm_90); the address is 16-byte aligned.
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Index compaction: cidx[n, 0..cnt[n]) = the valid entries of idx[n, :] in their original order
// (valid: < NKV, so 0xFFFFFFFF is padding). One warp per query; entries past cnt are untouched.

extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_compact(const uint32_t* __restrict__ idx, uint32_t* __restrict__ cidx, uint32_t* __restrict__ cnt, int N,
                      int K, uint32_t NKV) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const uint32_t* in = idx + (size_t)n * K;
  uint32_t* o = cidx + (size_t)n * K;
  uint32_t base = 0;
  for (int j0 = 0; j0 < K; j0 += 32) {
    const int j = j0 + lane;
    const uint32_t v = j < K ? in[j] : INVALID;
    const bool ok = v < NKV;
    const unsigned m = __ballot_sync(FULL, ok);
    if (ok) o[base + __popc(m & ((1u << lane) - 1u))] = v;
    base += __popc(m);
  }
  if (lane == 0) cnt[n] = base;
}

// ---------------------------------------------------------------------------------------------
// Forward. One block per (query n, group of ROWS = 16 RG heads), 8 warps. Per tile of 64 keys:
//  S phase, warp (r, c), r < RG the row group (16 heads), c < WC = 8 / RG: S [16 x KPW] =
//    Q_r K^T over DQK for KPW = 64 / WC keys; row maxima exchanged among the row group's WC warps
//    (shared memory + named barrier); P = 2^(x - m) to shared memory as bf16 [ROWS][64]; the
//    rescale factor of each row to alpha_s.
//  P V phase, warp (rp, cq): RP = min(RG, 2) row groups (rows 16 RP rp ..) times the column
//    pairs cq, cq + WPV, ... (WPV = 8 RP / RG warps share a row pair): O *= alpha, O += P V.
//    Covering two row groups per warp halves the V fragment loads (ldmatrix bandwidth is the
//    limit of this mma.sync design).
// KV tiles are double-buffered with cp.async (the gather of tile t + 1 overlaps tile t); the
// rows of tile t + 2 are fetched from the compacted index list into registers meanwhile.
// Shared memory: Q [ROWS][DQK] | KV [2][64][DQK] | P [ROWS][64] | red [RG][WC][16] f32 |
// alpha [ROWS] f32 | lsum [ROWS] f32.

template <int RG>
__device__ __forceinline__ void fwd_impl(const bf16* __restrict__ q, const bf16* __restrict__ kv,
                                         const uint32_t* __restrict__ cidx, const uint32_t* __restrict__ cnt,
                                         float* __restrict__ out, int N, int H, int K, int DQK, int DV, float sl2) {
  constexpr int ROWS = 16 * RG;
  constexpr int WC = 8 / RG;         // S warps per row group
  constexpr int KPW = FWD_BK / WC;   // keys per warp in S
  constexpr int NT = KPW / 8;        // S n-tiles per warp
  constexpr int RP = RG >= 2 ? 2 : 1;  // row groups per P V warp
  constexpr int WPV = 8 * RP / RG;     // P V warps per row pair
  constexpr int MAXPP = 32 / WPV;      // O column pairs (16 columns) per warp at DV = 512
  constexpr int KPT = FWD_BK / (FWD_THREADS / 8);  // keys gathered per thread per tile
  extern __shared__ __align__(128) uint8_t smem[];
  const int rowbytes = DQK * 2;
  const int nch = DQK / 8;  // 16-byte chunks per row
  uint8_t* q_s = smem;
  uint8_t* kv_s = q_s + ROWS * rowbytes;
  uint8_t* p_s = kv_s + 2 * FWD_BK * rowbytes;
  float* red_s = reinterpret_cast<float*>(p_s + ROWS * 128);
  float* alpha_s = red_s + RG * WC * 16;
  float* lsum_s = alpha_s + ROWS;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = warp / WC, c = warp % WC;      // S roles
  const int rp = warp / WPV, cq = warp % WPV;  // P V roles
  const int g = lane >> 2, tig = lane & 3;
  const int n = N - 1 - (int)blockIdx.x;  // later queries usually select more keys: start them first
  const int h0 = blockIdx.y * ROWS;
  const int count = (int)cnt[n];
  const int ntiles = (count + FWD_BK - 1) / FWD_BK;
  const uint32_t* rowidx = cidx + (size_t)n * K;

  // Q tile; heads past H are zero rows.
  for (int i = tid; i < ROWS * nch; i += FWD_THREADS) {
    const int rr = i / nch, ch = i - rr * nch, h = h0 + rr;
    const bf16* src = q + ((size_t)n * H + min(h, H - 1)) * DQK + ch * 8;
    cp_async16(smem_u32(q_s + rr * rowbytes + swz(ch, rr) * 16), src, h < H ? 16u : 0u);
  }

  // Gather: thread owns keys (tid >> 3) + 32 i of a tile and chunks sub, sub + 8, ...
  const int sub = tid & 7;
  uint32_t pre[KPT];
  auto fetch_rows = [&](int t) {
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int j = t * FWD_BK + (tid >> 3) + i * (FWD_THREADS / 8);
      pre[i] = (j < count) ? rowidx[j] : INVALID;
    }
  };
  auto issue_tile = [&](int buf) {
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int key = (tid >> 3) + i * (FWD_THREADS / 8);
      const bool valid = pre[i] != INVALID;
      const bf16* src = kv + (size_t)(valid ? pre[i] : 0u) * DQK;
      uint8_t* d = kv_s + (buf * FWD_BK + key) * rowbytes;
      const int x = (sub ^ key) & 7;
      for (int ch = sub; ch < nch; ch += 8) cp_async16(smem_u32(d + ((ch & ~7) | x) * 16), src + ch * 8, valid ? 16u : 0u);
    }
  };
  fetch_rows(0);
  if (ntiles > 0) issue_tile(0);
  cp_async_commit();
  fetch_rows(1);

  float o[RP][MAXPP][2][4];
#pragma unroll
  for (int i = 0; i < RP; ++i)
#pragma unroll
    for (int p = 0; p < MAXPP; ++p)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[i][p][nt][e] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // S rows g and g + 8 (log2 domain)
  const int npair = DV / 16;

  // ldmatrix lane roles; every ldmatrix row below has row & 7 == x7.
  const int x7 = lane & 7;
  const int a_hi = lane >> 4;
  const int a_lrow = (lane & 7) + 8 * ((lane >> 3) & 1);  // A (non-trans) row inside 16
  const uint32_t qa = smem_u32(q_s) + (16 * r + a_lrow) * rowbytes;
  const uint32_t pa = smem_u32(p_s) + (16 * RP * rp + a_lrow) * 128;  // + 16 * 128 per row group
  // B for S (non-trans, key rows): key b_key, chunk 2 kk + b_hi.
  const int b_key = c * KPW + (lane & 7) + (NT >= 2 ? 8 * (lane >> 4) : 0);
  const int b_hi = (lane >> 3) & 1;

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<0>();
    __syncthreads();  // tile t landed for everyone; everyone is done with tile t - 1
    if (t + 1 < ntiles) issue_tile((t + 1) & 1);
    cp_async_commit();
    fetch_rows(t + 2);
    const uint32_t kvb = smem_u32(kv_s) + (t & 1) * FWD_BK * rowbytes;

    // S = Q K^T for the warp's 16 heads x KPW keys.
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    const uint32_t kb = kvb + b_key * rowbytes;
    for (int g8 = 0; g8 < nch; g8 += 8) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, qa + (g8 + ((2 * kk + a_hi) ^ x7)) * 16);
        const uint32_t boff = (g8 + ((2 * kk + b_hi) ^ x7)) * 16;
        if constexpr (NT >= 2) {
#pragma unroll
          for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            ldsm_x4(b, kb + np * 16 * rowbytes + boff);
            mma16816(s[2 * np], a, b[0], b[1]);
            mma16816(s[2 * np + 1], a, b[2], b[3]);
          }
        } else {
          uint32_t b[2];
          ldsm_x2(b, kb + boff);
          mma16816(s[0], a, b[0], b[1]);
        }
      }
    }

    // Mask keys past the count, go to the log2 domain, row maxima.
    const int kbase = t * FWD_BK + c * KPW;
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int j = kbase + nt * 8 + 2 * tig;
      const bool v0 = j < count, v1 = j + 1 < count;
      s[nt][0] = v0 ? s[nt][0] * sl2 : -INFINITY;
      s[nt][1] = v1 ? s[nt][1] * sl2 : -INFINITY;
      s[nt][2] = v0 ? s[nt][2] * sl2 : -INFINITY;
      s[nt][3] = v1 ? s[nt][3] * sl2 : -INFINITY;
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(FULL, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(FULL, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FULL, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FULL, mx1, 2));
    if (tig == 0) {
      red_s[(r * WC + c) * 16 + g] = mx0;
      red_s[(r * WC + c) * 16 + g + 8] = mx1;
    }
    named_bar(1 + r, WC * 32);
#pragma unroll
    for (int cc = 0; cc < WC; ++cc) {
      mx0 = fmaxf(mx0, red_s[(r * WC + cc) * 16 + g]);
      mx1 = fmaxf(mx1, red_s[(r * WC + cc) * 16 + g + 8]);
    }
    // Every warp of the row group now holds the same new maxima (max is exact).
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
    const float al0 = ex2(m0 - mu0), al1 = ex2(m1 - mu1);  // 0 while nothing was valid
    m0 = mn0;
    m1 = mn1;
    if (c == 0 && tig == 0) {
      alpha_s[16 * r + g] = al0;
      alpha_s[16 * r + g + 8] = al1;
    }
    float ps0 = 0.f, ps1 = 0.f;
    uint8_t* prow0 = p_s + (16 * r + g) * 128;
    uint8_t* prow1 = prow0 + 8 * 128;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float p0 = ex2(s[nt][0] - mu0), p1 = ex2(s[nt][1] - mu0);
      const float p2 = ex2(s[nt][2] - mu1), p3 = ex2(s[nt][3] - mu1);
      ps0 += p0 + p1;
      ps1 += p2 + p3;
      const int pc = (c * NT + nt) ^ g;  // rows 16 r + g and + 8 both have row & 7 == g
      *reinterpret_cast<uint32_t*>(prow0 + pc * 16 + tig * 4) = pack_bf16(p0, p1);
      *reinterpret_cast<uint32_t*>(prow1 + pc * 16 + tig * 4) = pack_bf16(p2, p3);
    }
    l0 = l0 * al0 + ps0;  // per-thread partial sums; all partials of a row share the same shift
    l1 = l1 * al1 + ps1;
    __syncthreads();  // P and alpha of every row are in shared memory

    // O = alpha O + P V over the tile's 64 keys, rows of the warp's row pair, its column pairs.
#pragma unroll
    for (int i = 0; i < RP; ++i) {
      const int rw = 16 * (RP * rp + i) + g;
      const float a0 = alpha_s[rw], a1 = alpha_s[rw + 8];
#pragma unroll
      for (int p = 0; p < MAXPP; ++p)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          o[i][p][nt][0] *= a0;
          o[i][p][nt][1] *= a0;
          o[i][p][nt][2] *= a1;
          o[i][p][nt][3] *= a1;
        }
    }
    const uint32_t vb = kvb + a_lrow * rowbytes;  // trans-B key rows 16 kk + a_lrow
#pragma unroll
    for (int kk = 0; kk < FWD_BK / 16; ++kk) {
      uint32_t a[RP][4];
#pragma unroll
      for (int i = 0; i < RP; ++i) ldsm_x4(a[i], pa + i * 16 * 128 + ((2 * kk + a_hi) ^ x7) * 16);
      const uint32_t vrow = vb + 16 * kk * rowbytes;
#pragma unroll
      for (int p = 0; p < MAXPP; ++p) {
        const int cp = cq + WPV * p;
        if (cp < npair) {
          uint32_t b[4];
          ldsm_x4_t(b, vrow + swz(2 * cp + a_hi, x7) * 16);
#pragma unroll
          for (int i = 0; i < RP; ++i) {
            mma16816(o[i][p][0], a[i], b[0], b[1]);
            mma16816(o[i][p][1], a[i], b[2], b[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // Row sums: over the quad, then over the row group's S warps (fixed order). All reads of
  // red_s in the last tile happened before its second block barrier.
  l0 += __shfl_xor_sync(FULL, l0, 1);
  l0 += __shfl_xor_sync(FULL, l0, 2);
  l1 += __shfl_xor_sync(FULL, l1, 1);
  l1 += __shfl_xor_sync(FULL, l1, 2);
  if (tig == 0) {
    red_s[(r * WC + c) * 16 + g] = l0;
    red_s[(r * WC + c) * 16 + g + 8] = l1;
  }
  named_bar(1 + r, WC * 32);
  if (c == 0 && tig == 0) {
    float L0 = 0.f, L1 = 0.f;
#pragma unroll
    for (int cc = 0; cc < WC; ++cc) {
      L0 += red_s[(r * WC + cc) * 16 + g];
      L1 += red_s[(r * WC + cc) * 16 + g + 8];
    }
    lsum_s[16 * r + g] = L0;
    lsum_s[16 * r + g + 8] = L1;
    const int hA = h0 + 16 * r + g, hB = hA + 8;
    if (hA < H) out[((size_t)n * H + hA) * (DV + 1) + DV] = L0 > 0.f ? (m0 + log2f(L0)) * LN2 : -INFINITY;
    if (hB < H) out[((size_t)n * H + hB) * (DV + 1) + DV] = L1 > 0.f ? (m1 + log2f(L1)) * LN2 : -INFINITY;
  }
  __syncthreads();  // lsum_s complete
#pragma unroll
  for (int i = 0; i < RP; ++i) {
    const int rw = 16 * (RP * rp + i) + g;
    const float L0 = lsum_s[rw], L1 = lsum_s[rw + 8];
    const float inv0 = L0 > 0.f ? 1.f / L0 : 0.f, inv1 = L1 > 0.f ? 1.f / L1 : 0.f;
    const int hA = h0 + rw, hB = hA + 8;
    float* outA = out + ((size_t)n * H + hA) * (DV + 1);
    float* outB = outA + 8 * (size_t)(DV + 1);
#pragma unroll
    for (int p = 0; p < MAXPP; ++p) {
      const int cp = cq + WPV * p;
      if (cp < npair) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int col = 16 * cp + 8 * nt + 2 * tig;
          if (hA < H) {
            outA[col] = o[i][p][nt][0] * inv0;
            outA[col + 1] = o[i][p][nt][1] * inv0;
          }
          if (hB < H) {
            outB[col] = o[i][p][nt][2] * inv1;
            outB[col + 1] = o[i][p][nt][3] * inv1;
          }
        }
      }
    }
  }
}

#define FWD_KERNEL(RG)                                                                                            \
  extern "C" __global__ void __launch_bounds__(FWD_THREADS, 1)                                                     \
      sparse_mla_tc_fwd_rg##RG(const bf16* __restrict__ q, const bf16* __restrict__ kv,                          \
                               const uint32_t* __restrict__ cidx, const uint32_t* __restrict__ cnt,              \
                               float* __restrict__ out, int N, int H, int K, int DQK, int DV, float sl2) {       \
    fwd_impl<RG>(q, kv, cidx, cnt, out, N, H, K, DQK, DV, sl2);                                                  \
  }
FWD_KERNEL(1)
FWD_KERNEL(2)
FWD_KERNEL(4)

// ---------------------------------------------------------------------------------------------
// Backward prep, one warp per (n, h): dob = bf16(dout[:, :DV]), delta = sum_d dob * out (f32,
// with the same rounded dO that dP uses), lse2 = LSE * log2 e. out and dout are [N*H, DV + 1].

extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_bwd_prep(const float* __restrict__ out, const float* __restrict__ dout, bf16* __restrict__ dob,
                       float* __restrict__ lse2, float* __restrict__ delta, int NH, int DV) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= NH) return;
  const float* o = out + (size_t)row * (DV + 1);
  const float* go = dout + (size_t)row * (DV + 1);
  float s = 0.f;
  for (int d = lane; d < DV; d += 32) {
    const bf16 b = __float2bfloat16_rn(go[d]);
    dob[(size_t)row * DV + d] = b;
    s = fmaf(__bfloat162float(b), o[d], s);
  }
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL, s, off);
  if (lane == 0) {
    delta[row] = s;
    lse2[row] = o[DV] * LOG2E;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. One block per (query n, group of ROWS = 16 RG heads); 2 RG warps: warp (r, c), r the
// row group, c the half. Per tile of 32 keys:
//  1. S [ROWS x 32] and dP [ROWS x 32], P = 2^(S sl2 - lse2), dS' = scale P (dP - delta); P and
//     dS' go to shared memory as bf16. On mma.sync (WG false) warp (r, c) computes rows 16 r ..
//     and keys 16 c .. of both, sharing one B fragment per k-step of the value dims. On wgmma
//     (WG true: ROWS 64, DQK 576, DV 512, sm_90a) warpgroup 0 computes S and warpgroup 1 dP,
//     each the whole [64 x 32] tile (36 and 32 products m64n32k16, operands from shared memory);
//     warpgroup 0 passes P in f32 through shared memory (both warpgroups' accumulators have the
//     same layout, so thread t of one holds the elements of thread t of the other) and warpgroup
//     1 forms dS'. Same f32 values either way: the products add the same exact bf16 terms in
//     the same k order.
//  2. dQ [16 x DQK/2] += dS'_r [16 x 32] K [32 x DQK/2] (column half c), in registers all along;
//     on wgmma each warpgroup accumulates [64 x 288] (one n256 and one n32 product per k16 step,
//     A = dS' and B = the KV tile from shared memory), issued before phase 3 and waited for
//     after it, so the tensor cores run them while phase 3's mma.sync work issues.
//  3. dKV tile [32 x DQK] = dS'^T Q + P^T dO: warp w takes keys 16 (w & 1) .. + 15 and column
//     pairs (w >> 1) + RG i, three pairs at a time; each finished 16 x 48 piece is added to dkv
//     with f32x4 atomics (det == 0) or stored to the deterministic chunk buffer
//     detbuf[hg][n - n0][j][DQK] (det != 0; j the compacted position, every valid j written).
// dq (bf16) is written once at the end (dq = sum over tiles; scale is folded into dS').
// Shared memory (1024-aligned; every matrix a row of swizzle blocks of 128-byte rows, chunk c of
// row r at c ^ (r & 7), which is both what wgmma reads and conflict-free for ldmatrix):
// Q [DQK/64][ROWS][128 B] | dO [DV/64][ROWS][128 B] | KV [2][DQK/64][32][128 B] |
// P|dS [ROWS][128 B] (P keys in chunks 0-3, dS' in chunks 4-7) | key rows [2][32] u32 |
// (WG) P exchange [16][128] f32.

#define BWD_TILE_BLOCK (BWD_BK * 128)  // one swizzle block of a KV tile

// Byte offset of (row, 16-byte chunk ch) in a row of swizzle blocks of `block_bytes` each.
__device__ __forceinline__ uint32_t blk_off(int row, int ch, int block_bytes) {
  return (uint32_t)((ch >> 3) * block_bytes + row * 128 + (((ch ^ row) & 7) << 4));
}

template <int RG, bool WG, int CW>
__device__ __forceinline__ void bwd_impl(const bf16* __restrict__ q, const bf16* __restrict__ kv,
                                         const uint32_t* __restrict__ cidx, const uint32_t* __restrict__ cnt,
                                         const bf16* __restrict__ dob, const float* __restrict__ lse2,
                                         const float* __restrict__ delta, bf16* __restrict__ dq,
                                         float* __restrict__ dkv, float* __restrict__ detbuf, int N, int H, int K,
                                         int DQK, int DV, float scale, float sl2, int n0, int nlen, int det,
                                         int chunk, const uint8_t* __restrict__ cmask, int hq) {
  constexpr int ROWS = 16 * RG;
  constexpr int NTHREADS = 64 * RG * CW;
  constexpr int PW = RG * CW;                   // phase-3 warps per key half
  constexpr int KPT = BWD_BK / (NTHREADS / 8);  // keys gathered per thread per tile
  constexpr int MAXPH = 18;                     // dq column pairs per warp (DQK / 32 <= 18)
  constexpr int QB = ROWS * 128;                // one swizzle block of Q or dO
  static_assert(!WG || (RG == 4 && CW == 1), "the wgmma phase 1 takes 64-row blocks");
  static_assert(NTHREADS <= 256, "a tile's key rows are gathered by at most 32 groups of 8 threads");
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t q_s = (raw + 1023u) & ~1023u;
  const uint32_t do_s = q_s + (DQK / 64) * QB;
  const uint32_t kv_s = do_s + (DV / 64) * QB;
  const uint32_t tile_bytes = (DQK / 64) * BWD_TILE_BLOCK;
  const uint32_t pds_s = kv_s + 2 * tile_bytes;
  uint8_t* pds_p = smem_raw + (pds_s - raw);
  uint32_t* krow_s = reinterpret_cast<uint32_t*>(pds_p + ROWS * 128);
  float* xch_s = reinterpret_cast<float*>(krow_s + 2 * BWD_BK);  // WG only: [16][128]
  uint8_t* kmask_s = reinterpret_cast<uint8_t*>(xch_s + 16 * 128);  // WG only: [2][32]
  const int nchq = DQK / 8, ncho = DV / 8;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = warp >> 1, c = warp & 1;
  // Phases 1 and 2 (S, dP and dQ) run on the first 2 RG warps; phase 3 (dKV) on all 2 RG CW.
  const bool row_warp = warp < 2 * RG;
  const int g = lane >> 2, tig = lane & 3;
  const int n = n0 + nlen - 1 - (int)blockIdx.x;
  const int hg = blockIdx.y, h0 = hg * ROWS;
  const int count = (int)cnt[n];
  const int ntiles = (count + BWD_BK - 1) / BWD_BK;
  const uint32_t* rowidx = cidx + (size_t)n * K;
  (void)N;

  for (int i = tid; i < ROWS * nchq; i += NTHREADS) {
    const int rr = i / nchq, ch = i - rr * nchq, h = h0 + rr;
    cp_async16(q_s + blk_off(rr, ch, QB), q + ((size_t)n * H + min(h, H - 1)) * DQK + ch * 8, h < H ? 16u : 0u);
  }
  for (int i = tid; i < ROWS * ncho; i += NTHREADS) {
    const int rr = i / ncho, ch = i - rr * ncho, h = h0 + rr;
    cp_async16(do_s + blk_off(rr, ch, QB), dob + ((size_t)n * H + min(h, H - 1)) * DV + ch * 8, h < H ? 16u : 0u);
  }

  const int sub = tid & 7;
  uint32_t pre[KPT];
  uint8_t prem[KPT];  // WG: the key's row mask (merged queries), all rows without one
  auto fetch_rows = [&](int t) {
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int j = t * BWD_BK + (tid >> 3) + i * (NTHREADS / 8);
      pre[i] = (j < count) ? rowidx[j] : INVALID;
      if constexpr (WG) prem[i] = (cmask != nullptr && j < count) ? cmask[(size_t)n * K + j] : (uint8_t)0xFF;
    }
  };
  auto issue_tile = [&](int buf) {
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int key = (tid >> 3) + i * (NTHREADS / 8);
      const bool valid = pre[i] != INVALID;
      if (sub == 0) krow_s[buf * BWD_BK + key] = pre[i];
      if constexpr (WG) {
        if (sub == 0) kmask_s[buf * BWD_BK + key] = prem[i];
      }
      const bf16* src = kv + (size_t)(valid ? pre[i] : 0u) * DQK;
      const uint32_t d = kv_s + buf * tile_bytes;
      for (int ch = sub; ch < nchq; ch += 8) cp_async16(d + blk_off(key, ch, BWD_TILE_BLOCK), src + ch * 8, valid ? 16u : 0u);
    }
  };
  fetch_rows(0);
  if (ntiles > 0) issue_tile(0);
  cp_async_commit();
  fetch_rows(1);

  // Per-row softmax statistics of this thread's phase-1 rows: 16 r + g (A) and + 8 (B) on
  // mma.sync, 16 (warp & 3) + g and + 8 on wgmma.
  const int sA = h0 + 16 * (WG ? (warp & 3) : r) + g, sB = sA + 8;
  const bool rvA = row_warp && sA < H, rvB = row_warp && sB < H;
  const float lseA = rvA ? lse2[(size_t)n * H + sA] : 0.f, lseB = rvB ? lse2[(size_t)n * H + sB] : 0.f;
  const float dlA = rvA ? delta[(size_t)n * H + sA] : 0.f, dlB = rvB ? delta[(size_t)n * H + sB] : 0.f;
  // dq rows (phase 2): 16 r + g and + 8.
  const int hA = h0 + 16 * r + g, hB = hA + 8;

  const int nph = DQK / 32;  // dq column pairs per half
  const int npq = DQK / 16, npv = DV / 16;
  // dq accumulators: on mma.sync [16 x DQK/2] a warp in m16n8 fragments; on wgmma [64 x 288] a
  // warpgroup (columns 0-287 for warpgroup 0, 288-575 for 1) as one n256 and one n32 product.
  float dqa[WG ? 1 : MAXPH][2][4];
  float dqw[WG ? 128 : 1], dqx[WG ? 16 : 1];
  if constexpr (WG) {
#pragma unroll
    for (int i = 0; i < 128; ++i) dqw[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) dqx[i] = 0.f;
  } else {
#pragma unroll
    for (int p = 0; p < MAXPH; ++p)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dqa[p][nt][e] = 0.f;
  }

  // ldmatrix lane roles (every ldmatrix row below has row & 7 == x7).
  const int x7 = lane & 7;
  const int a_row = 16 * r + (lane & 7) + 8 * ((lane >> 3) & 1);
  const int a_hi = lane >> 4;
  const uint32_t qa = q_s + a_row * 128;
  const uint32_t oa = do_s + a_row * 128;
  const uint32_t dsa = pds_s + a_row * 128;
  const int b_key = 16 * c + (lane & 7) + 8 * (lane >> 4);
  const int b_hi = (lane >> 3) & 1;
  const int t_row = (lane & 7) + 8 * ((lane >> 3) & 1);  // trans-B rows (keys or heads)
  // Phase 3 roles: keys 16 kg .., column pairs cs + RG i; trans-A rows (heads) at_row.
  const int kg = warp & 1, cs = warp >> 1;
  const int at_row = (lane & 7) + 8 * (lane >> 4);
  const int at_ch = 2 * kg + ((lane >> 3) & 1);  // key chunk of the P / dS' tiles

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<0>();
    if constexpr (WG) fence_async_smem();
    __syncthreads();
    const int buf = t & 1;
    if (t + 1 < ntiles) issue_tile(buf ^ 1);
    cp_async_commit();
    fetch_rows(t + 2);
    const uint32_t kvb = kv_s + buf * tile_bytes;

    // Phase 1: S and dP, then P and dS' into the P|dS tile.
    if constexpr (WG) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
      // The warpgroup index through a shuffle: provably warp-uniform, so ptxas keeps the two
      // branches' products asynchronous (with tid >> 7 it serialises them).
      const int wg = __shfl_sync(FULL, tid >> 7, 0), wr = tid & 127;
      const int row = 16 * (warp & 3) + g;  // and row + 8; row & 7 == g
      float acc[16];
      wgmma_fence();
      if (wg == 0) {
#pragma unroll
        for (int ks = 0; ks < 576 / 16; ++ks)
          wgmma_m64n32k16_ss(acc, wgmma_desc(q_s + (ks >> 2) * QB + (ks & 3) * 32, 16, 1024),
                             wgmma_desc(kvb + (ks >> 2) * BWD_TILE_BLOCK + (ks & 3) * 32, 16, 1024), ks != 0);
      } else {
#pragma unroll
        for (int ks = 0; ks < 512 / 16; ++ks)
          wgmma_m64n32k16_ss(acc, wgmma_desc(do_s + (ks >> 2) * QB + (ks & 3) * 32, 16, 1024),
                             wgmma_desc(kvb + (ks >> 2) * BWD_TILE_BLOCK + (ks & 3) * 32, 16, 1024), ks != 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_regs(acc);
      const int kbase = t * BWD_BK;
      // Merged queries (cmask): row r belongs to query r / hq of the block, and a key counts for
      // it where the key's mask has that query's bit (a gate, not a product: a query without
      // keys has LSE -inf).
      const uint32_t bitA = 1u << (row / hq), bitB = 1u << ((row + 8) / hq);
      const uint8_t* km = kmask_s + buf * BWD_BK;
      if (wg == 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int kt = 8 * j + 2 * tig, key = kbase + kt;
          const uint32_t m0 = key < count ? km[kt] : 0u, m1 = key + 1 < count ? km[kt + 1] : 0u;
          const float p0 = (m0 & bitA) ? ex2(fmaf(acc[4 * j + 0], sl2, -lseA)) : 0.f;
          const float p1 = (m1 & bitA) ? ex2(fmaf(acc[4 * j + 1], sl2, -lseA)) : 0.f;
          const float p2 = (m0 & bitB) ? ex2(fmaf(acc[4 * j + 2], sl2, -lseB)) : 0.f;
          const float p3 = (m1 & bitB) ? ex2(fmaf(acc[4 * j + 3], sl2, -lseB)) : 0.f;
          xch_s[(4 * j + 0) * 128 + wr] = p0;
          xch_s[(4 * j + 1) * 128 + wr] = p1;
          xch_s[(4 * j + 2) * 128 + wr] = p2;
          xch_s[(4 * j + 3) * 128 + wr] = p3;
          *reinterpret_cast<uint32_t*>(pds_p + row * 128 + ((j ^ g) << 4) + tig * 4) = pack_bf16(p0, p1);
          *reinterpret_cast<uint32_t*>(pds_p + (row + 8) * 128 + ((j ^ g) << 4) + tig * 4) = pack_bf16(p2, p3);
        }
      }
      __syncthreads();  // P in f32 handed over
      if (wg == 1) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float p0 = xch_s[(4 * j + 0) * 128 + wr], p1 = xch_s[(4 * j + 1) * 128 + wr];
          const float p2 = xch_s[(4 * j + 2) * 128 + wr], p3 = xch_s[(4 * j + 3) * 128 + wr];
          const float d0 = scale * p0 * (acc[4 * j + 0] - dlA), d1 = scale * p1 * (acc[4 * j + 1] - dlA);
          const float d2 = scale * p2 * (acc[4 * j + 2] - dlB), d3 = scale * p3 * (acc[4 * j + 3] - dlB);
          *reinterpret_cast<uint32_t*>(pds_p + row * 128 + (((4 + j) ^ g) << 4) + tig * 4) = pack_bf16(d0, d1);
          *reinterpret_cast<uint32_t*>(pds_p + (row + 8) * 128 + (((4 + j) ^ g) << 4) + tig * 4) = pack_bf16(d2, d3);
        }
      }
#else
      __trap();  // built for another target: the host never launches the wgmma variant
#endif
    } else if (row_warp) {
      float sa[2][4], dpa[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sa[nt][e] = dpa[nt][e] = 0.f;
      const uint32_t kb = kvb + b_key * 128;
      for (int g8 = 0; g8 < ncho; g8 += 8) {
        const uint32_t qblk = qa + (g8 >> 3) * QB, oblk = oa + (g8 >> 3) * QB, kblk = kb + (g8 >> 3) * BWD_TILE_BLOCK;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint32_t aoff = ((2 * kk + a_hi) ^ x7) << 4;
          uint32_t aq[4], ao[4], b[4];
          ldsm_x4(aq, qblk + aoff);
          ldsm_x4(ao, oblk + aoff);
          ldsm_x4(b, kblk + (((2 * kk + b_hi) ^ x7) << 4));
          mma16816(sa[0], aq, b[0], b[1]);
          mma16816(sa[1], aq, b[2], b[3]);
          mma16816(dpa[0], ao, b[0], b[1]);
          mma16816(dpa[1], ao, b[2], b[3]);
        }
      }
      for (int g8 = ncho; g8 < nchq; g8 += 8) {
        const uint32_t qblk = qa + (g8 >> 3) * QB, kblk = kb + (g8 >> 3) * BWD_TILE_BLOCK;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t aq[4], b[4];
          ldsm_x4(aq, qblk + (((2 * kk + a_hi) ^ x7) << 4));
          ldsm_x4(b, kblk + (((2 * kk + b_hi) ^ x7) << 4));
          mma16816(sa[0], aq, b[0], b[1]);
          mma16816(sa[1], aq, b[2], b[3]);
        }
      }
      const int kbase = t * BWD_BK + 16 * c;
      uint8_t* pA = pds_p + (16 * r + g) * 128;  // rows 16 r + g and + 8: row & 7 == g
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int j = kbase + 8 * nt + 2 * tig;
        const bool v0 = j < count, v1 = j + 1 < count;
        const float p0 = (v0 && rvA) ? ex2(fmaf(sa[nt][0], sl2, -lseA)) : 0.f;
        const float p1 = (v1 && rvA) ? ex2(fmaf(sa[nt][1], sl2, -lseA)) : 0.f;
        const float p2 = (v0 && rvB) ? ex2(fmaf(sa[nt][2], sl2, -lseB)) : 0.f;
        const float p3 = (v1 && rvB) ? ex2(fmaf(sa[nt][3], sl2, -lseB)) : 0.f;
        const float d0 = scale * p0 * (dpa[nt][0] - dlA), d1 = scale * p1 * (dpa[nt][1] - dlA);
        const float d2 = scale * p2 * (dpa[nt][2] - dlB), d3 = scale * p3 * (dpa[nt][3] - dlB);
        const int ch = 2 * c + nt;
        *reinterpret_cast<uint32_t*>(pA + ((ch ^ g) << 4) + tig * 4) = pack_bf16(p0, p1);
        *reinterpret_cast<uint32_t*>(pA + 8 * 128 + ((ch ^ g) << 4) + tig * 4) = pack_bf16(p2, p3);
        *reinterpret_cast<uint32_t*>(pA + (((4 + ch) ^ g) << 4) + tig * 4) = pack_bf16(d0, d1);
        *reinterpret_cast<uint32_t*>(pA + 8 * 128 + (((4 + ch) ^ g) << 4) + tig * 4) = pack_bf16(d2, d3);
      }
    }
    if constexpr (WG) fence_async_smem();  // dS' is read by wgmma below
    __syncthreads();  // P and dS' of the whole tile are visible

    // Phase 2: dQ += dS' K. On wgmma the products are issued here and run while phase 3 issues
    // its mma.sync work; they are waited for at the end of the tile (they read the KV buffer
    // that the next tile's gather refills and the dS' that its phase 1 rewrites).
    if constexpr (WG) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
      // A: dS' [64 heads x 32 keys], K-major in chunks 4-7 of the P|dS tile (a k16 step is 32
      // bytes). B: the KV tile [32 keys x 576], N-major (64 dims a 4096-byte block, 8 keys a
      // 1024-byte group, a k16 step 16 rows = 2048 bytes). Warpgroup 0 takes dims 0-255 (blocks
      // 0-3) and 256-287 (the first half of block 4), warpgroup 1 288-319 (its second half,
      // 64 bytes into each row) and 320-575 (blocks 5-8).
      const int wg = __shfl_sync(FULL, tid >> 7, 0);
      const uint32_t wide = kvb + (wg == 0 ? 0 : 5) * BWD_TILE_BLOCK;
      const uint32_t narrow = kvb + 4 * BWD_TILE_BLOCK + (wg == 0 ? 0 : 64);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BWD_BK / 16; ++kk) {
        const uint64_t da = wgmma_desc(pds_s + 64 + kk * 32, 16, 1024);
        wgmma_m64n256k16_ss_tb(dqw, da, wgmma_desc(wide + kk * 2048, BWD_TILE_BLOCK, 1024), 1);
        wgmma_m64n32k16_ss_tb(dqx, da, wgmma_desc(narrow + kk * 2048, BWD_TILE_BLOCK, 1024), 1);
      }
      wgmma_commit();
#endif
    } else if (row_warp) {
#pragma unroll
      for (int kk = 0; kk < BWD_BK / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, dsa + (((4 + 2 * kk + a_hi) ^ x7) << 4));
        const uint32_t krow = kvb + (t_row + 16 * kk) * 128;
#pragma unroll
        for (int p = 0; p < MAXPH; ++p) {
          if (p < nph) {
            const int ch = 2 * (c * nph + p) + a_hi;
            uint32_t b[4];
            ldsm_x4_t(b, krow + (ch >> 3) * BWD_TILE_BLOCK + (((ch ^ x7) & 7) << 4));
            mma16816(dqa[p][0], a, b[0], b[1]);
            mma16816(dqa[p][1], a, b[2], b[3]);
          }
        }
      }
    }

    // Phase 3: dKV tile, 16 keys x 3 column pairs at a time.
    {
      const uint32_t dsb = pds_s + at_row * 128 + (((4 + at_ch) ^ x7) << 4);
      const uint32_t psb = pds_s + at_row * 128 + ((at_ch ^ x7) << 4);
      const uint32_t qt = q_s + t_row * 128, ot = do_s + t_row * 128;
      const uint32_t rowA = krow_s[buf * BWD_BK + 16 * kg + g];
      const uint32_t rowB = krow_s[buf * BWD_BK + 16 * kg + g + 8];
      const bool odd = tig & 1;
      const uint32_t myrow = odd ? rowB : rowA;
      const int mykey = t * BWD_BK + 16 * kg + g + (odd ? 8 : 0);  // compacted position
      for (int grp = 0; cs + PW * 3 * grp < npq; ++grp) {
        float acc[3][2][4];
#pragma unroll
        for (int jj = 0; jj < 3; ++jj)
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[jj][nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < RG; ++ks) {
          uint32_t ad[4], ap[4];
          ldsm_x4_t(ad, dsb + ks * 16 * 128);
          ldsm_x4_t(ap, psb + ks * 16 * 128);
#pragma unroll
          for (int jj = 0; jj < 3; ++jj) {
            const int cp = cs + PW * (3 * grp + jj);
            if (cp < npq) {
              const int ch = 2 * cp + a_hi;
              const uint32_t off = (ch >> 3) * QB + ks * 16 * 128 + (((ch ^ x7) & 7) << 4);
              uint32_t b[4];
              ldsm_x4_t(b, qt + off);
              mma16816(acc[jj][0], ad, b[0], b[1]);
              mma16816(acc[jj][1], ad, b[2], b[3]);
              if (cp < npv) {
                ldsm_x4_t(b, ot + off);
                mma16816(acc[jj][0], ap, b[0], b[1]);
                mma16816(acc[jj][1], ap, b[2], b[3]);
              }
            }
          }
        }
        // Even lanes of a quad pair take row g, odd lanes row g + 8, four columns each.
#pragma unroll
        for (int jj = 0; jj < 3; ++jj) {
          const int cp = cs + PW * (3 * grp + jj);
          if (cp < npq) {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
              const float s0 = odd ? acc[jj][nt][0] : acc[jj][nt][2];
              const float s1 = odd ? acc[jj][nt][1] : acc[jj][nt][3];
              const float r0 = __shfl_xor_sync(FULL, s0, 1), r1 = __shfl_xor_sync(FULL, s1, 1);
              const float v0 = odd ? r0 : acc[jj][nt][0], v1 = odd ? r1 : acc[jj][nt][1];
              const float v2 = odd ? acc[jj][nt][2] : r0, v3 = odd ? acc[jj][nt][3] : r1;
              const int col = 16 * cp + 8 * nt + 2 * (tig & ~1);
              if (myrow != INVALID) {
                if (det) {
                  float* dst = detbuf + ((size_t)(hg * chunk + (n - n0)) * K + mykey) * DQK + col;
                  *reinterpret_cast<float4*>(dst) = make_float4(v0, v1, v2, v3);
                } else {
                  red_add_v4(dkv + (size_t)myrow * DQK + col, v0, v1, v2, v3);
                }
              }
            }
          }
        }
      }
    }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (WG) {
      wgmma_wait<0>();  // this tile's dQ products, before the barrier that frees its buffers
      wgmma_fence_regs(dqw);
      wgmma_fence_regs(dqx);
    }
#endif
  }
  cp_async_wait<0>();

  if constexpr (WG) {
    // dq rows 16 (warp & 3) + g and + 8 of the block; n8 tile j of each product at d[4 j ..].
    const int wg = tid >> 7;
    const int hr = h0 + 16 * (warp & 3) + g;
    const int c_wide = wg == 0 ? 0 : 320, c_narrow = wg == 0 ? 256 : 288;
    bf16* rowA = dq + ((size_t)n * H + hr) * DQK;
    bf16* rowB = rowA + 8 * DQK;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = c_wide + 8 * j + 2 * tig;
      *reinterpret_cast<uint32_t*>(rowA + col) = pack_bf16(dqw[4 * j + 0], dqw[4 * j + 1]);
      *reinterpret_cast<uint32_t*>(rowB + col) = pack_bf16(dqw[4 * j + 2], dqw[4 * j + 3]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = c_narrow + 8 * j + 2 * tig;
      *reinterpret_cast<uint32_t*>(rowA + col) = pack_bf16(dqx[4 * j + 0], dqx[4 * j + 1]);
      *reinterpret_cast<uint32_t*>(rowB + col) = pack_bf16(dqx[4 * j + 2], dqx[4 * j + 3]);
    }
  } else if (row_warp) {
    // dq rows hA, hB; columns of half c.
#pragma unroll
    for (int p = 0; p < MAXPH; ++p) {
      if (p < nph) {
        const int cp = c * nph + p;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int col = 16 * cp + 8 * nt + 2 * tig;
          if (hA < H) *reinterpret_cast<uint32_t*>(dq + ((size_t)n * H + hA) * DQK + col) = pack_bf16(dqa[p][nt][0], dqa[p][nt][1]);
          if (hB < H) *reinterpret_cast<uint32_t*>(dq + ((size_t)n * H + hB) * DQK + col) = pack_bf16(dqa[p][nt][2], dqa[p][nt][3]);
        }
      }
    }
  }
}

#define BWD_KERNEL(RG, CW, NAME)                                                                                   \
  extern "C" __global__ void __launch_bounds__(64 * RG * CW, 1) NAME(                                              \
      const bf16* __restrict__ q, const bf16* __restrict__ kv, const uint32_t* __restrict__ cidx,                 \
      const uint32_t* __restrict__ cnt, const bf16* __restrict__ dob, const float* __restrict__ lse2,             \
      const float* __restrict__ delta, bf16* __restrict__ dq, float* __restrict__ dkv, float* __restrict__ detbuf, \
      int N, int H, int K, int DQK, int DV, float scale, float sl2, int n0, int nlen, int det, int chunk) {         \
    bwd_impl<RG, false, CW>(q, kv, cidx, cnt, dob, lse2, delta, dq, dkv, detbuf, N, H, K, DQK, DV, scale, sl2, n0, nlen, det, \
                 chunk, nullptr, 64);                                                                              \
  }
BWD_KERNEL(1, 1, sparse_mla_tc_bwd_rg1)
BWD_KERNEL(2, 1, sparse_mla_tc_bwd_rg2)
BWD_KERNEL(4, 1, sparse_mla_tc_bwd_rg4)
// Few heads: 4 (16 heads) or 2 (32 heads) times the warps for phase 3, 256 threads a block.
BWD_KERNEL(1, 4, sparse_mla_tc_bwd_rg1_cw4)
BWD_KERNEL(2, 2, sparse_mla_tc_bwd_rg2_cw2)

// The wgmma variant (phase 1 on warpgroup products): H a multiple of 64, DQK 576, DV 512; grid as
// sparse_mla_tc_bwd_rg4 (one block of 256 threads per query and 64 heads). With cmask it runs
// merged queries (sparse_mla_tc_merge_queries): "query" n is the block of 64 / hq consecutive
// queries of hq heads each (H = 64: the same q, dO, LSE and delta rows), its keys their union
// (cidx, cnt, K = the union's capacity) and cmask[n, j] bit s says whether query s of the block
// has key j; rows r of query r / hq take only their query's keys. cmask null: every row every key
// (hq 64).
extern "C" __global__ void __launch_bounds__(256, 1) sparse_mla_tc_bwd_wg(
    const bf16* __restrict__ q, const bf16* __restrict__ kv, const uint32_t* __restrict__ cidx,
    const uint32_t* __restrict__ cnt, const bf16* __restrict__ dob, const float* __restrict__ lse2,
    const float* __restrict__ delta, bf16* __restrict__ dq, float* __restrict__ dkv, float* __restrict__ detbuf,
    int N, int H, int K, int DQK, int DV, float scale, float sl2, int n0, int nlen, int det, int chunk,
    const uint8_t* __restrict__ cmask, int hq) {
  bwd_impl<4, true, 1>(q, kv, cidx, cnt, dob, lse2, delta, dq, dkv, detbuf, N, H, K, 576, 512, scale, sl2, n0, nlen, det,
                    chunk, cmask, hq);
}

// ---------------------------------------------------------------------------------------------
// Merged queries (sparse_mla_tc_bwd_wg and the wgmma forward with cmask, the head-mean
// probabilities with uslot): group u is the G = 64 / H consecutive queries G u .. G u + G - 1 (H
// heads each; G <= 8). Its keys: every valid slot (< NKV < 2^29) of those queries as (key,
// query) (and, with slots, the slot), bitonic-sorted in shared memory, then each run of one key
// becomes as many entries as the most times one query selected it: entry r of a run has bit s
// where query s selected the key more than r times, so every query's slots, duplicates included,
// appear exactly once (a key each query selected once is one entry for the whole group).
// uidx[u, 0 .. ucnt[u]) ascending by kv row, umask the bits; with slots, uslot[u, e, s] the slot
// of query s that entry e stands for (0xFFFF where its bit is clear; K < 2^16). Capacity G K a
// group, entries past ucnt untouched. One block of 256 threads per group; P2 (G K rounded up to
// a power of two) entries of dynamic shared memory (u32 without slots: key << 3 | query; u64
// with: key << 35 | query << 32 | slot).

template <typename E, bool SLOTS>
__device__ __forceinline__ void merge_impl(const uint32_t* __restrict__ idx, uint32_t* __restrict__ uidx,
                                           uint8_t* __restrict__ umask, uint16_t* __restrict__ uslot,
                                           uint32_t* __restrict__ ucnt, int K, int G, uint32_t NKV, int P2) {
  constexpr int QS = SLOTS ? 32 : 0;  // where the query sits in an entry
  constexpr E NONE = ~(E)0;
  extern __shared__ __align__(16) uint8_t merge_smem[];
  E* ent = reinterpret_cast<E*>(merge_smem);
  __shared__ uint32_t wsum[8];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const size_t u = blockIdx.x;
  const int total = G * K;
  for (int i = tid; i < P2; i += 256) {
    E e = NONE;
    if (i < total) {
      const int s = i / K, slot = i - s * K;
      const uint32_t key = idx[(u * G + s) * K + slot];
      if (key < NKV) e = ((E)key << (QS + 3)) | ((E)s << QS) | (SLOTS ? (E)slot : (E)0);
    }
    ent[i] = e;
  }
  __syncthreads();
  for (int k = 2; k <= P2; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < P2; i += 256) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const E a = ent[i], b = ent[ixj];
          if ((a > b) == ((i & k) == 0)) {
            ent[i] = b;
            ent[ixj] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  auto key_of = [](E e) { return (uint32_t)(e >> (QS + 3)); };
  auto query_of = [](E e) { return (uint32_t)(e >> QS) & 7u; };
  auto same_pair = [](E a, E b) { return (a >> QS) == (b >> QS); };  // one key, one query
  // A run of one key belongs to the thread whose span holds its first entry.
  const int per = (P2 + 255) / 256;
  const int lo = min(tid * per, P2), hi = min(lo + per, P2);
  auto starts_run = [&](int i) { return ent[i] != NONE && (i == 0 || key_of(ent[i - 1]) != key_of(ent[i])); };
  auto run_entries = [&](int i) {
    const uint32_t key = key_of(ent[i]);
    uint32_t most = 0, rank = 0;
    for (int j = i; j < P2 && ent[j] != NONE && key_of(ent[j]) == key; ++j) {
      rank = (j > i && same_pair(ent[j], ent[j - 1])) ? rank + 1 : 0;
      most = max(most, rank + 1);
    }
    return most;
  };
  uint32_t mine = 0;
  for (int i = lo; i < hi; ++i)
    if (starts_run(i)) mine += run_entries(i);
  uint32_t incl = mine;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t v = __shfl_up_sync(FULL, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) wsum[warp] = incl;
  __syncthreads();
  uint32_t pos = incl - mine, all = 0;
  for (int w = 0; w < 8; ++w) {
    if (w < warp) pos += wsum[w];
    all += wsum[w];
  }
  uint32_t* ou = uidx + u * (size_t)total;
  uint8_t* om = umask + u * (size_t)total;
  for (int i = lo; i < hi; ++i) {
    if (!starts_run(i)) continue;
    const uint32_t key = key_of(ent[i]), entries = run_entries(i);
    for (uint32_t r = 0; r < entries; ++r) {
      ou[pos + r] = key;
      om[pos + r] = 0;
      if constexpr (SLOTS) {
        for (int s = 0; s < G; ++s) uslot[(u * total + pos + r) * G + s] = 0xFFFFu;
      }
    }
    uint32_t rank = 0;
    for (int j = i; j < P2 && ent[j] != NONE && key_of(ent[j]) == key; ++j) {
      rank = (j > i && same_pair(ent[j], ent[j - 1])) ? rank + 1 : 0;
      const uint32_t s = query_of(ent[j]);
      om[pos + rank] |= (uint8_t)(1u << s);
      if constexpr (SLOTS) uslot[(u * total + pos + rank) * G + s] = (uint16_t)(ent[j] & 0xFFFFFFFFu);
    }
    pos += entries;
  }
  if (tid == 0) ucnt[u] = all;
}

extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_merge_queries(const uint32_t* __restrict__ idx, uint32_t* __restrict__ uidx, uint8_t* __restrict__ umask,
                            uint32_t* __restrict__ ucnt, int K, int G, uint32_t NKV, int P2) {
  merge_impl<uint32_t, false>(idx, uidx, umask, nullptr, ucnt, K, G, NKV, P2);
}
extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_merge_queries_slots(const uint32_t* __restrict__ idx, uint32_t* __restrict__ uidx,
                                  uint8_t* __restrict__ umask, uint16_t* __restrict__ uslot, uint32_t* __restrict__ ucnt,
                                  int K, int G, uint32_t NKV, int P2) {
  merge_impl<unsigned long long, true>(idx, uidx, umask, uslot, ucnt, K, G, NKV, P2);
}

// ---------------------------------------------------------------------------------------------
// Deterministic dkv for queries n0 .. n0 + nlen: detbuf[hg][nl][j][:] holds the head-group-summed
// contribution of (n0 + nl, compacted position j). Entries are grouped by kv row (count, scan,
// fill with atomics in any order), then each row's list is sorted (key nl * K + j, i.e.
// ascending (n, j)) and summed in that order, head groups in ascending order inside an entry;
// the chunk's sum is added to dkv (one block per row, so this is a plain read-modify-write).

extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_det_count(const uint32_t* __restrict__ cidx, const uint32_t* __restrict__ cnt,
                        uint32_t* __restrict__ rowcount, int n0, int nlen, int K) {
  const size_t total = (size_t)nlen * K;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    const int nl = (int)(i / K), j = (int)(i - (size_t)nl * K), n = n0 + nl;
    if (j < (int)cnt[n]) atomicAdd(rowcount + cidx[(size_t)n * K + j], 1u);
  }
}

// Exclusive scan of rowcount into offset (one block of 1024 threads); cursor reset to 0.
extern "C" __global__ void __launch_bounds__(1024)
sparse_mla_tc_det_scan(const uint32_t* __restrict__ rowcount, uint32_t* __restrict__ offset,
                       uint32_t* __restrict__ cursor, int NKV) {
  __shared__ uint32_t part[1024];
  const int tid = threadIdx.x;
  const int per = (NKV + 1023) / 1024;
  const int b = min(tid * per, NKV), e = min(b + per, NKV);
  uint32_t s = 0;
  for (int i = b; i < e; ++i) s += rowcount[i];
  part[tid] = s;
  __syncthreads();
  for (int off = 1; off < 1024; off <<= 1) {
    const uint32_t v = tid >= off ? part[tid - off] : 0u;
    __syncthreads();
    part[tid] += v;
    __syncthreads();
  }
  uint32_t run = tid > 0 ? part[tid - 1] : 0u;
  for (int i = b; i < e; ++i) {
    offset[i] = run;
    run += rowcount[i];
    cursor[i] = 0u;
  }
}

extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_det_fill(const uint32_t* __restrict__ cidx, const uint32_t* __restrict__ cnt,
                       const uint32_t* __restrict__ offset, uint32_t* __restrict__ cursor, uint32_t* __restrict__ list,
                       int n0, int nlen, int K) {
  const size_t total = (size_t)nlen * K;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    const int nl = (int)(i / K), j = (int)(i - (size_t)nl * K), n = n0 + nl;
    if (j < (int)cnt[n]) {
      const uint32_t row = cidx[(size_t)n * K + j];
      const uint32_t pos = atomicAdd(cursor + row, 1u);
      list[offset[row] + pos] = (uint32_t)nl * (uint32_t)K + (uint32_t)j;
    }
  }
}

// One block per kv row (grid-stride). Entries are unique keys in [0, nlen K). A list longer
// than DET_CAP is handled in key windows of DET_CAP keys (each holds at most DET_CAP entries),
// visited in ascending order, so the summation order is the same ascending order.
extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_det_reduce(const float* __restrict__ detbuf, const uint32_t* __restrict__ rowcount,
                         const uint32_t* __restrict__ offset, const uint32_t* __restrict__ list,
                         float* __restrict__ dkv, int NKV, int K, int DQK, int chunk, int hgroups, int nlen) {
  __shared__ uint32_t keys[DET_CAP];
  __shared__ uint32_t nsel;
  const int tid = threadIdx.x;
  const uint32_t span = (uint32_t)nlen * (uint32_t)K;
  for (int row = blockIdx.x; row < NKV; row += gridDim.x) {
    const uint32_t len = rowcount[row];
    if (len == 0) continue;  // block-uniform
    const uint32_t* lst = list + offset[row];
    float acc[3] = {0.f, 0.f, 0.f};  // dims tid, tid + 256, tid + 512 (DQK <= 768)
    const uint32_t win = len <= DET_CAP ? span : (uint32_t)DET_CAP;
    for (uint32_t lo = 0; lo < span; lo += win) {
      const uint32_t hi = (span - lo > win) ? lo + win : span;
      __syncthreads();  // the previous window (or row) is done with keys / nsel
      if (tid == 0) nsel = 0u;
      __syncthreads();
      for (uint32_t i = tid; i < len; i += blockDim.x) {
        const uint32_t e = lst[i];
        if (e >= lo && e < hi) keys[atomicAdd(&nsel, 1u)] = e;
      }
      __syncthreads();
      const uint32_t m = nsel;
      if (m == 0) continue;  // block-uniform
      uint32_t p2 = 1;
      while (p2 < m) p2 <<= 1;
      for (uint32_t i = m + tid; i < p2; i += blockDim.x) keys[i] = INVALID;
      __syncthreads();
      // Bitonic sort, ascending.
      for (uint32_t k = 2; k <= p2; k <<= 1) {
        for (uint32_t j = k >> 1; j > 0; j >>= 1) {
          for (uint32_t i = tid; i < p2; i += blockDim.x) {
            const uint32_t ixj = i ^ j;
            if (ixj > i) {
              const uint32_t a = keys[i], b = keys[ixj];
              const bool up = (i & k) == 0;
              if ((a > b) == up) {
                keys[i] = b;
                keys[ixj] = a;
              }
            }
          }
          __syncthreads();
        }
      }
      for (uint32_t i = 0; i < m; ++i) {
        const uint32_t e = keys[i];
        for (int hgi = 0; hgi < hgroups; ++hgi) {
          const float* src = detbuf + ((size_t)hgi * chunk * K + e) * DQK;
#pragma unroll
          for (int u = 0; u < 3; ++u) {
            const int d = tid + 256 * u;
            if (d < DQK) acc[u] += src[d];
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 3; ++u) {
      const int d = tid + 256 * u;
      if (d < DQK) dkv[(size_t)row * DQK + d] += acc[u];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Head-mean probabilities, the sparse-stage KL target (not differentiated):
//   pmean[n, j] = (1/H) sum_h exp(scale q[n, h] . kv[idx[n, j]] - lse[n, h])
// for valid slots j, 0 for padding; lse is column DV of the forward's output [N, H, DV + 1].
//
// sparse_mla_tc_compact_pos: as sparse_mla_tc_compact, plus cpos[n, i] = the slot j of the i-th
// valid entry, so that results go back to their slots (pmean is zero-filled by the host first).
//
// sparse_mla_tc_probs_rg{RG}: one block per (query n, pass of ROWS = 16 RG heads), 8 warps;
// RG = 8 when H > 64, so one pass covers every head up to H = 128 (H > 128: several passes write
// per-pass sums part[pass][n][j], added in pass order by sparse_mla_tc_probs_sum). Warp (r, c),
// r < RG the row group, c < WC = 8 / RG, keeps its 16 heads' Q as mma A fragments in registers
// for the whole block (DQK / 16 k-steps x 4 registers, <= 144) and per 64-key tile computes
// S [16 x KPW] for keys c KPW .. c KPW + KPW - 1 with B fragments from the swizzled kv tile (one
// ldmatrix.x4 per two mma). p = 2^(S sl2 - lse2_h) in f32 (ex2.approx, max 2 ulp; the forward's
// base-2 domain, lse2 = lse log2 e); heads past H give 0. Fixed summation order: per thread row
// g plus row g + 8, then over g by xor-shuffles 4, 8, 16 (a butterfly: every lane gets the same
// bits), then over the row groups r = 0, 1, .. in shared memory, then over passes in order; no
// atomics anywhere, so results are bit-identical run to run. Columns past the valid count (zero
// kv rows in the last tile) are computed but never written.
// KV tiles: PR_STAGES = 3 cp.async stages (Q needs no shared memory here, so a third stage fits
// at DQK = 576); the rows of tile t + 3 are fetched into registers meanwhile. The column sums of
// tile t go to red [t & 1][RG][64] and are stored by threads 0..63 after the next tile's block
// barrier (so one barrier per tile). Shared memory: KV [3][64][DQK] bf16 | red [2][RG][64] f32.

#define PR_BK 64
#define PR_THREADS 256
#define PR_STAGES 3
#define PR_MAXKS 36  // DQK / 16 k-steps at most (DQK <= 576)


extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_compact_pos(const uint32_t* __restrict__ idx, uint32_t* __restrict__ cidx, uint32_t* __restrict__ cpos,
                          uint32_t* __restrict__ cnt, int N, int K, uint32_t NKV) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const uint32_t* in = idx + (size_t)n * K;
  uint32_t* o = cidx + (size_t)n * K;
  uint32_t* op = cpos + (size_t)n * K;
  uint32_t base = 0;
  for (int j0 = 0; j0 < K; j0 += 32) {
    const int j = j0 + lane;
    const uint32_t v = j < K ? in[j] : INVALID;
    const bool ok = v < NKV;
    const unsigned m = __ballot_sync(FULL, ok);
    if (ok) {
      const uint32_t at = base + __popc(m & ((1u << lane) - 1u));
      o[at] = v;
      op[at] = (uint32_t)j;
    }
    base += __popc(m);
  }
  if (lane == 0) cnt[n] = base;
}

// Merged queries (cmask non-null, RG 4: sparse_mla_tc_probs_merged): "query" n is the group of 4
// consecutive queries of 16 heads (row group r = query 4 n + r), cidx / cnt / K its keys' union
// (sparse_mla_tc_merge_queries_slots), and each row group's column sums go straight to its own
// query's slots: out[(4 n + r) Kq + uslot[n, j, r]] for the entries j whose mask has bit r (the
// others, where the query did not select the key, are never stored).
template <int RG>
__device__ __forceinline__ void probs_impl(const bf16* __restrict__ q, const bf16* __restrict__ kv,
                                           const uint32_t* __restrict__ cidx, const uint32_t* __restrict__ cpos,
                                           const uint32_t* __restrict__ cnt, const float* __restrict__ fwd_out,
                                           float* __restrict__ out, int N, int H, int K, int DQK, int DV, float sl2,
                                           const uint8_t* __restrict__ cmask, const uint16_t* __restrict__ uslot,
                                           int Kq) {
  constexpr int ROWS = 16 * RG;
  constexpr int WC = 8 / RG;                       // warps per row group
  constexpr int KPW = PR_BK / WC;                  // keys per warp
  constexpr int NT = KPW / 8;                      // n-tiles per warp
  constexpr int KPT = PR_BK / (PR_THREADS / 8);    // keys gathered per thread per tile
  extern __shared__ __align__(128) uint8_t smem[];
  const int rowbytes = DQK * 2;
  const int nch = DQK / 8;   // 16-byte chunks per row
  const int nks = DQK / 16;  // mma k-steps
  uint8_t* kv_s = smem;
  float* red_s = reinterpret_cast<float*>(kv_s + PR_STAGES * PR_BK * rowbytes);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = warp / WC, c = warp % WC;
  const int g = lane >> 2, tig = lane & 3;
  const int n = N - 1 - (int)blockIdx.x;  // later queries usually select more keys: start them first
  const int h0 = blockIdx.y * ROWS;
  const int count = (int)cnt[n];
  if (count == 0) return;  // block-uniform; the output stays zero
  const int ntiles = (count + PR_BK - 1) / PR_BK;
  const uint32_t* rowidx = cidx + (size_t)n * K;
  const uint32_t* rowpos = cpos != nullptr ? cpos + (size_t)n * K : nullptr;  // null: merged queries

  // Gather: thread owns keys (tid >> 3) + 32 i of a tile and chunks sub, sub + 8, ...
  const int sub = tid & 7;
  uint32_t pre[KPT];
  auto fetch_rows = [&](int t) {
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int j = t * PR_BK + (tid >> 3) + i * (PR_THREADS / 8);
      pre[i] = (j < count) ? rowidx[j] : INVALID;
    }
  };
  auto issue_tile = [&](int buf) {
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int key = (tid >> 3) + i * (PR_THREADS / 8);
      const bool valid = pre[i] != INVALID;
      const bf16* src = kv + (size_t)(valid ? pre[i] : 0u) * DQK;
      uint8_t* d = kv_s + (buf * PR_BK + key) * rowbytes;
      const int x = (sub ^ key) & 7;
      for (int ch = sub; ch < nch; ch += 8) cp_async16(smem_u32(d + ((ch & ~7) | x) * 16), src + ch * 8, valid ? 16u : 0u);
    }
  };
  fetch_rows(0);
  issue_tile(0);
  cp_async_commit();
  fetch_rows(1);
  if (ntiles > 1) issue_tile(1);
  cp_async_commit();  // possibly empty: the group count stays "tiles issued so far + 1"
  fetch_rows(2);

  // Q rows hA = h0 + 16 r + g and hB = hA + 8 as A fragments (a0: row g, cols 2 tig, +1;
  // a1: row g + 8; a2, a3: cols + 8), straight from global memory; heads past H are zero.
  const int hA = h0 + 16 * r + g, hB = hA + 8;
  const bool rvA = hA < H, rvB = hB < H;
  const bf16* qA = q + ((size_t)n * H + (rvA ? hA : 0)) * DQK + 2 * tig;
  const bf16* qB = q + ((size_t)n * H + (rvB ? hB : 0)) * DQK + 2 * tig;
  uint32_t qf[PR_MAXKS][4];
#pragma unroll
  for (int ks = 0; ks < PR_MAXKS; ++ks) {
    const bool in = ks < nks;
    qf[ks][0] = (in && rvA) ? __ldg(reinterpret_cast<const unsigned int*>(qA + 16 * ks)) : 0u;
    qf[ks][1] = (in && rvB) ? __ldg(reinterpret_cast<const unsigned int*>(qB + 16 * ks)) : 0u;
    qf[ks][2] = (in && rvA) ? __ldg(reinterpret_cast<const unsigned int*>(qA + 16 * ks + 8)) : 0u;
    qf[ks][3] = (in && rvB) ? __ldg(reinterpret_cast<const unsigned int*>(qB + 16 * ks + 8)) : 0u;
  }
  const float lA = rvA ? fwd_out[((size_t)n * H + hA) * (DV + 1) + DV] * LOG2E : 0.f;
  const float lB = rvB ? fwd_out[((size_t)n * H + hB) * (DV + 1) + DV] * LOG2E : 0.f;

  // B (non-trans, key rows): key b_key, chunk 2 ks + b_hi; b_key & 7 == lane & 7.
  const int x7 = lane & 7;
  const int b_key = c * KPW + (lane & 7) + (NT >= 2 ? 8 * (lane >> 4) : 0);
  const int b_hi = (lane >> 3) & 1;
  const bool single = gridDim.y == 1;

  // Threads 0..63 store tile t's column sums (row groups in order) to slot cpos of key t*64+tid;
  // `mypos` was read one tile earlier.
  uint32_t mypos = 0;
  auto store_sums = [&](int t) {
    if (tid < PR_BK) {
      const int j = t * PR_BK + tid;
      if (j < count && cmask != nullptr) {
        const float* rs = red_s + (t & 1) * RG * PR_BK + tid;
        const uint32_t m = cmask[(size_t)n * K + j];
        const float per_query = (float)(H / RG);
#pragma unroll
        for (int rr = 0; rr < RG; ++rr) {
          if (m & (1u << rr)) {
            const uint32_t slot = uslot[((size_t)n * K + j) * RG + rr];
            out[((size_t)n * RG + rr) * Kq + slot] = rs[rr * PR_BK] / per_query;
          }
        }
      } else if (j < count) {
        const float* rs = red_s + (t & 1) * RG * PR_BK + tid;
        float tot = 0.f;
#pragma unroll
        for (int rr = 0; rr < RG; ++rr) tot += rs[rr * PR_BK];
        if (single)
          out[(size_t)n * K + mypos] = tot / (float)H;
        else
          out[((size_t)blockIdx.y * N + n) * K + mypos] = tot;
      }
    }
  };

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<1>();  // all groups but the newest: tile t has landed (for this thread's copies)
    __syncthreads();    // ... for everyone; everyone is done with tile t - 1 and red [(t - 1) & 1] is full
    if (t + 2 < ntiles) issue_tile((t + 2) % PR_STAGES);  // the buffer of tile t - 1
    cp_async_commit();
    fetch_rows(t + 3);
    if (t > 0) store_sums(t - 1);
    if (tid < PR_BK && cmask == nullptr) {
      const int j = t * PR_BK + tid;
      mypos = j < count ? rowpos[j] : 0u;
    }

    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    const uint32_t kb = smem_u32(kv_s) + ((t % PR_STAGES) * PR_BK + b_key) * rowbytes;
#pragma unroll
    for (int ks = 0; ks < PR_MAXKS; ++ks) {
      if (ks < nks) {
        const uint32_t boff = swz(2 * ks + b_hi, x7) * 16;
        if constexpr (NT >= 2) {
#pragma unroll
          for (int np = 0; np < NT / 2; ++np) {
            uint32_t b[4];
            ldsm_x4(b, kb + np * 16 * rowbytes + boff);
            mma16816(s[2 * np], qf[ks], b[0], b[1]);
            mma16816(s[2 * np + 1], qf[ks], b[2], b[3]);
          }
        } else {
          uint32_t b[2];
          ldsm_x2(b, kb + boff);
          mma16816(s[0], qf[ks], b[0], b[1]);
        }
      }
    }

    // Probabilities and their sums over the warp's 16 rows, per key column.
    float* rs = red_s + (t & 1) * RG * PR_BK + r * PR_BK + c * KPW;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float p0 = rvA ? ex2(fmaf(s[nt][0], sl2, -lA)) : 0.f;  // row g, col 2 tig
      const float p1 = rvA ? ex2(fmaf(s[nt][1], sl2, -lA)) : 0.f;  // row g, col 2 tig + 1
      const float p2 = rvB ? ex2(fmaf(s[nt][2], sl2, -lB)) : 0.f;  // row g + 8, col 2 tig
      const float p3 = rvB ? ex2(fmaf(s[nt][3], sl2, -lB)) : 0.f;  // row g + 8, col 2 tig + 1
      float c0 = p0 + p2, c1 = p1 + p3;
      c0 = sum_over_fragment_rows(c0);
      c1 = sum_over_fragment_rows(c1);
      if (g == 0) *reinterpret_cast<float2*>(rs + nt * 8 + 2 * tig) = make_float2(c0, c1);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // red [(ntiles - 1) & 1] is full
  store_sums(ntiles - 1);
}

#define PROBS_KERNEL(RG)                                                                                           \
  extern "C" __global__ void __launch_bounds__(PR_THREADS, 1)                                                       \
      sparse_mla_tc_probs_rg##RG(const bf16* __restrict__ q, const bf16* __restrict__ kv,                         \
                                 const uint32_t* __restrict__ cidx, const uint32_t* __restrict__ cpos,            \
                                 const uint32_t* __restrict__ cnt, const float* __restrict__ fwd_out,             \
                                 float* __restrict__ out, int N, int H, int K, int DQK, int DV, float sl2) {      \
    probs_impl<RG>(q, kv, cidx, cpos, cnt, fwd_out, out, N, H, K, DQK, DV, sl2, nullptr, nullptr, K);               \
  }
PROBS_KERNEL(1)
PROBS_KERNEL(2)
PROBS_KERNEL(4)
PROBS_KERNEL(8)
// Merged queries: groups of 4 queries of 16 heads (H 64 per group), K the union's capacity, Kq the
// queries' own slots (probs_impl's comment).
extern "C" __global__ void __launch_bounds__(PR_THREADS, 1)
    sparse_mla_tc_probs_merged(const bf16* __restrict__ q, const bf16* __restrict__ kv, const uint32_t* __restrict__ cidx,
                               const uint32_t* __restrict__ cnt, const uint8_t* __restrict__ cmask,
                               const uint16_t* __restrict__ uslot, const float* __restrict__ fwd_out,
                               float* __restrict__ out, int N, int K, int Kq, int DQK, int DV, float sl2) {
  probs_impl<4>(q, kv, cidx, nullptr, cnt, fwd_out, out, N, 64, K, DQK, DV, sl2, cmask, uslot, Kq);
}

// pmean[i] = (sum over passes p = 0, 1, .. of part[p][i]) / H, in pass order.
extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_probs_sum(const float* __restrict__ part, float* __restrict__ pmean, int passes, size_t len, int H) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int p = 0; p < passes; ++p) s += part[(size_t)p * len + i];
    pmean[i] = s / (float)H;
  }
}

// f32 -> bf16 (round to nearest even).
extern "C" __global__ void __launch_bounds__(256)
sparse_mla_tc_to_bf16(const float* __restrict__ src, bf16* __restrict__ dst, size_t len) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}
