// Row gather and its backward, a row scatter-add. candle's CUDA index_add loops over the
// indices serially in each thread, which is fine for a few hundred ids and hopeless for the
// millions the indexer's selected-key gather produces (T x k rows); here every (row, column)
// element is one thread. The scatter-add uses f32 atomics: its summation order is not
// deterministic.

#include <stdint.h>

// out[m, d] = src[idx[m], d]; src [N, D], idx [M], out [M, D].
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src, const uint32_t* __restrict__ idx,
                                           float* __restrict__ out, long long M, int D) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M * D) return;
  long long m = i / D;
  int d = (int)(i - m * D);
  out[i] = src[(long long)idx[m] * D + d];
}

// out[idx[m], d] += grad[m, d]; out [N, D] zero on entry.
extern "C" __global__ void scatter_add_rows_f32(const float* __restrict__ grad, const uint32_t* __restrict__ idx,
                                                float* __restrict__ out, long long M, int D) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M * D) return;
  long long m = i / D;
  int d = (int)(i - m * D);
  atomicAdd(out + (long long)idx[m] * D + d, grad[i]);
}
