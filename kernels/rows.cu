// Row sums through a sparse row map (CSR), the one kernel behind `rows::RowMap`:
//   out[i, c] = sum over j in [off[i], off[i + 1]) of x[src[j], c]
// added in f32 in increasing j, rounded once to the output type. A gather is the map with one
// entry per row; its adjoint (a scatter-add) is the transposed map, so forward and backward
// are both this kernel and both deterministic: no atomics, a fixed order of additions.
// One block per output row; its threads stride over the columns (coalesced row reads).
// candle's own index_add gives one thread per column a serial loop over all ids instead.

#include <stdint.h>

#include "dtype.cuh"

template <typename T>
__device__ void row_sum(const T* __restrict__ x, const uint32_t* __restrict__ src, const uint32_t* __restrict__ off,
                        T* __restrict__ out, int d) {
  const size_t i = blockIdx.x;
  const uint32_t begin = off[i], end = off[i + 1];
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (uint32_t j = begin; j < end; ++j) acc += to_f32(x[(size_t)src[j] * d + c]);
    out[i * d + c] = from_f32<T>(acc);
  }
}

extern "C" __global__ void rows_sum_f32(const float* x, const uint32_t* src, const uint32_t* off, float* out, int d) {
  row_sum<float>(x, src, off, out, d);
}
extern "C" __global__ void rows_sum_bf16(const __nv_bfloat16* x, const uint32_t* src, const uint32_t* off, __nv_bfloat16* out, int d) {
  row_sum<__nv_bfloat16>(x, src, off, out, d);
}
extern "C" __global__ void rows_sum_f16(const __half* x, const uint32_t* src, const uint32_t* off, __half* out, int d) {
  row_sum<__half>(x, src, off, out, d);
}
