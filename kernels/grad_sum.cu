// A gradient added to its f32 sum in place (`train::accumulate::GradSum` on the GPU), one pass
// instead of the plain twin's four (cast to f32, narrow, add, slice_set, each a whole copy):
//   add:  sum[i] = sum[i] + f32(g[i])      copy: sum[i] = f32(g[i])
// One IEEE f32 addition per element, as the twin's `old + f32(g)`; widening bf16 to f32 is
// exact, so the sums are the twin's bit for bit. `vec` (the caller checked that both pointers
// are 16-byte aligned for f32 x 4 and 8-byte for bf16 x 4, and n is a multiple of 4): four
// elements per thread and iteration.

#include <stdint.h>

#include "dtype.cuh"

struct __align__(8) bf16x4 {
  __nv_bfloat16 v[4];
};

template <typename T>
__device__ __forceinline__ float4 load4(const T* g, long long i);
template <>
__device__ __forceinline__ float4 load4<float>(const float* g, long long i) {
  return reinterpret_cast<const float4*>(g)[i];
}
template <>
__device__ __forceinline__ float4 load4<__nv_bfloat16>(const __nv_bfloat16* g, long long i) {
  const bf16x4 q = reinterpret_cast<const bf16x4*>(g)[i];
  return make_float4(to_f32(q.v[0]), to_f32(q.v[1]), to_f32(q.v[2]), to_f32(q.v[3]));
}

template <typename T>
__device__ void grad_sum(float* __restrict__ sum, const T* __restrict__ g, long long n, int add, int vec) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (vec) {
    float4* s4 = reinterpret_cast<float4*>(sum);
    for (; i < n / 4; i += stride) {
      const float4 v = load4<T>(g, i);
      if (add) {
        const float4 s = s4[i];
        s4[i] = make_float4(__fadd_rn(s.x, v.x), __fadd_rn(s.y, v.y), __fadd_rn(s.z, v.z), __fadd_rn(s.w, v.w));
      } else {
        s4[i] = v;
      }
    }
    return;
  }
  for (; i < n; i += stride) {
    const float v = to_f32(g[i]);
    sum[i] = add ? __fadd_rn(sum[i], v) : v;
  }
}

extern "C" __global__ void grad_sum_f32(float* sum, const float* g, long long n, int add, int vec) {
  grad_sum<float>(sum, g, n, add, vec);
}
extern "C" __global__ void grad_sum_bf16(float* sum, const __nv_bfloat16* g, long long n, int add, int vec) {
  grad_sum<__nv_bfloat16>(sum, g, n, add, vec);
}
