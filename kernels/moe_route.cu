// MoE routing on the device: DeepSeek-V3's group-limited top-k choice per token, then the
// routed (token, slot) pairs sorted by expert with a stable counting sort.
//
// Choice (`moe_route`), the plain twin `model::moe::route_token` step for step:
//   b_i = s_i + bias_i (f32); a group's score = its best b plus its second best (f32, one
//   addition; one expert per group: that one); the `topk_group` best groups stay, every other
//   expert counts as -inf; the `top_k` best experts are chosen, best first.
// Order: Rust's f32::total_cmp (-0 below +0), ties to the lower index, for the groups and for
// the experts; every NaN is made one positive NaN first (`canon`), so NaNs rank above +inf and
// tie. Each pick is the largest (value, -index) pair strictly below the
// previous pick, so no "taken" set is kept and ties resolve the same way every time.
//
// Sort (`moe_count`, `moe_scan`, `moe_place`): slots s = t K + j in chunks of CHUNK; each chunk
// counts its slots per expert (a warp per expert, ballots over 32 slots at a time: no atomics),
// one block turns the counts into each chunk's first position per expert and the experts'
// offsets, and each chunk writes its slots there in slot order. The result is the host's
// per-expert lists concatenated: expert-major, slot order inside an expert (stable), the same
// on every run.

#include <stdint.h>

#define CHUNK 2048

// f32::total_cmp's order as an unsigned key: larger key = larger value.
__device__ __forceinline__ uint32_t total_order_key(float x) {
  int32_t b = __float_as_int(x);
  b ^= (int32_t)(((uint32_t)(b >> 31)) >> 1);
  return (uint32_t)b ^ 0x80000000u;
}

// One NaN pattern for every NaN (an addition's NaN payload and sign differ between the host
// and the GPU): NaN ranks above every number and NaNs tie, as `route_token` canonicalises.
__device__ __forceinline__ float canon(float x) { return isnan(x) ? __int_as_float(0x7fc00000) : x; }

// (value, lower index first) as one key: larger = picked earlier.
__device__ __forceinline__ uint64_t pick_key(float x, uint32_t i) {
  return ((uint64_t)total_order_key(x) << 32) | (uint64_t)(0xFFFFFFFFu - i);
}

// scores [n, e] f32 (sigmoid of the router logits), bias [e] f32 -> chosen [n, top_k] u32, best
// first. One thread per token; n_group <= 64 (the host checks).
extern "C" __global__ void moe_route(const float* __restrict__ scores, const float* __restrict__ bias,
                                     uint32_t* __restrict__ chosen, int64_t n, int e, int n_group, int topk_group,
                                     int top_k) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const float* row = scores + t * e;
  const int per_group = e / n_group;
  // Group scores: best plus second best biased score.
  float group_score[64];
  for (int g = 0; g < n_group; ++g) {
    uint64_t best = 0, second = 0;
    float vb = 0.f, vs = 0.f;
    for (int i = g * per_group; i < (g + 1) * per_group; ++i) {
      const float v = canon(row[i] + bias[i]);
      const uint64_t k = pick_key(v, i);
      if (k > best) {
        second = best, vs = vb;
        best = k, vb = v;
      } else if (k > second) {
        second = k, vs = v;
      }
    }
    group_score[g] = per_group > 1 ? canon(vb + vs) : vb;
  }
  // The topk_group best groups, as a bit mask.
  uint64_t kept = 0, last = ~0ull;
  for (int r = 0; r < topk_group && r < n_group; ++r) {
    uint64_t best = 0;
    int arg = 0;
    for (int g = 0; g < n_group; ++g) {
      const uint64_t k = pick_key(group_score[g], g);
      if (k < last && k > best) best = k, arg = g;
    }
    kept |= 1ull << arg;
    last = best;
  }
  // The top_k best experts, experts of dropped groups at -inf.
  last = ~0ull;
  for (int r = 0; r < top_k; ++r) {
    uint64_t best = 0;
    int arg = 0;
    for (int i = 0; i < e; ++i) {
      const float v = (kept >> (i / per_group)) & 1 ? canon(row[i] + bias[i]) : -INFINITY;
      const uint64_t k = pick_key(v, i);
      if (k < last && k > best) best = k, arg = i;
    }
    chosen[t * top_k + r] = (uint32_t)arg;
    last = best;
  }
}

// This block's chunk of the choice into shared memory, u32::MAX past the last slot (no
// expert's id); returns the chunk's first slot.
__device__ __forceinline__ int64_t load_chunk(const uint32_t* __restrict__ chosen, int64_t s, uint32_t* ids) {
  const int64_t c0 = (int64_t)blockIdx.x * CHUNK;
  const int len = (int)min((int64_t)CHUNK, s - c0);
  for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) ids[i] = i < len ? chosen[c0 + i] : 0xFFFFFFFFu;
  __syncthreads();
  return c0;
}

// Per chunk of CHUNK slots, the slots routed to each expert: hist [n_chunks, e].
extern "C" __global__ void moe_count(const uint32_t* __restrict__ chosen, int64_t s, uint32_t* __restrict__ hist,
                                     int e) {
  __shared__ uint32_t ids[CHUNK];
  load_chunk(chosen, s, ids);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int x = warp; x < e; x += warps) {
    uint32_t count = 0;
    for (int i = lane; i < CHUNK; i += 32) count += __popc(__ballot_sync(0xFFFFFFFFu, ids[i] == (uint32_t)x));
    if (lane == 0) hist[(size_t)blockIdx.x * e + x] = count;
  }
}

// One block: hist [n_chunks, e] -> base [n_chunks, e] (each chunk's first position among its
// expert's slots) and offsets [e + 1] (expert x's slots are order[offsets[x]..offsets[x + 1]]).
extern "C" __global__ void moe_scan(const uint32_t* __restrict__ hist, uint32_t* __restrict__ base,
                                    uint32_t* __restrict__ offsets, int64_t n_chunks, int e) {
  for (int x = threadIdx.x; x < e; x += blockDim.x) {
    uint32_t run = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      base[c * e + x] = run;
      run += hist[c * e + x];
    }
    offsets[x + 1] = run;  // the count, until the prefix sum below
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int x = 0; x < e; ++x) offsets[x + 1] += offsets[x];
  }
}

// Each chunk's slots to their places: order [s] (slot ids, expert-major, slot order within an
// expert), token [s] (order / k: the token of each sorted row) and position [s] (where slot i
// went: the inverse permutation).
extern "C" __global__ void moe_place(const uint32_t* __restrict__ chosen, int64_t s, const uint32_t* __restrict__ base,
                                     const uint32_t* __restrict__ offsets, uint32_t* __restrict__ order,
                                     uint32_t* __restrict__ token, uint32_t* __restrict__ position, int e, int k) {
  __shared__ uint32_t ids[CHUNK];
  const int64_t c0 = load_chunk(chosen, s, ids);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const uint32_t below = (1u << lane) - 1;
  for (int x = warp; x < e; x += warps) {
    uint32_t at = offsets[x] + base[(size_t)blockIdx.x * e + x];
    for (int i = lane; i < CHUNK; i += 32) {
      const uint32_t hit = __ballot_sync(0xFFFFFFFFu, ids[i] == (uint32_t)x);
      if (ids[i] == (uint32_t)x) {
        const uint32_t p = at + __popc(hit & below);
        order[p] = (uint32_t)(c0 + i);
        token[p] = (uint32_t)((c0 + i) / k);
        position[c0 + i] = p;
      }
      at += __popc(hit);
    }
  }
}

// Each token's K rows in the sorted order, ascending: rows [n, k] from position [n k] (the
// adjoint of the sorted gather: token t sums its rows in this order, as the host's transposed
// map does). One thread per token; k <= 32.
extern "C" __global__ void moe_token_rows(const uint32_t* __restrict__ position, uint32_t* __restrict__ rows, int64_t n,
                                          int k) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  uint32_t p[32];
  for (int j = 0; j < k; ++j) {
    const uint32_t v = position[t * k + j];
    int i = j;
    for (; i > 0 && p[i - 1] > v; --i) p[i] = p[i - 1];
    p[i] = v;
  }
  for (int j = 0; j < k; ++j) rows[t * k + j] = p[j];
}
