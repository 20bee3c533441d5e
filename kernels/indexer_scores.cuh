// The lightning indexer's score from mma C fragments, shared by the two tensor-core scoring
// kernels (indexer_topk.cu: every causal key; indexer_at_tc.cu: the selected keys).
#pragma once

// acc[mt][nt]: C fragments of a = k . q for a warp's 32 keys (rows: keys 16 mt + g and + 8) and
// 8 NT heads (cols: heads 8 nt + 2 t4, + 1); wv[nt][c]: the weights of this thread's heads
// (0 for padded heads). The weighted ReLU is summed over the thread's heads, then over the
// quad's four lanes (xor 1, 2: a fixed order, so the result is the same run to run). Returns the
// score of key 8 t4 + g of the 32, so the warp's lanes hold each key once.
template <int NT>
__device__ __forceinline__ float weighted_relu_key(const float (&acc)[2][NT][4], const float (&wv)[NT][2], int t4) {
  float p[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    float p0 = 0.f, p1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      p0 = fmaf(wv[nt][0], fmaxf(acc[mt][nt][0], 0.f), p0);
      p0 = fmaf(wv[nt][1], fmaxf(acc[mt][nt][1], 0.f), p0);
      p1 = fmaf(wv[nt][0], fmaxf(acc[mt][nt][2], 0.f), p1);
      p1 = fmaf(wv[nt][1], fmaxf(acc[mt][nt][3], 0.f), p1);
    }
    p0 += __shfl_xor_sync(0xFFFFFFFFu, p0, 1);
    p0 += __shfl_xor_sync(0xFFFFFFFFu, p0, 2);
    p1 += __shfl_xor_sync(0xFFFFFFFFu, p1, 1);
    p1 += __shfl_xor_sync(0xFFFFFFFFu, p1, 2);
    p[mt][0] = p0;  // key 16 mt + g
    p[mt][1] = p1;  // key 16 mt + g + 8
  }
  // t4 -> key 8 t4 + g: t4 = 0: p[0][0], 1: p[0][1], 2: p[1][0], 3: p[1][1].
  return (t4 == 0) ? p[0][0] : (t4 == 1) ? p[0][1] : (t4 == 2) ? p[1][0] : p[1][1];
}
