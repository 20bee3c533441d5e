// Inline-PTX helpers shared by the tensor-core kernels (sm_80+ instructions, used on sm_90a):
// shared-memory addresses, 16-byte cp.async copies, ldmatrix and the bf16 mma.sync m16n8k16.
// Fragment layouts of mma.sync.m16n8k16.row.col (g = lane / 4, t4 = lane % 4):
//   A 16x16 row-major: a0 (row g, k 2 t4, +1), a1 (row g + 8), a2 (row g, k 2 t4 + 8), a3;
//   B 16x8 col-major: b0 (k 2 t4, +1; col g), b1 (k 2 t4 + 8, +9);
//   C 16x8 f32: c0, c1 (row g, cols 2 t4, +1), c2, c3 (row g + 8).
#pragma once
#include <stdint.h>

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared async copy; src_bytes 0 writes 16 zero bytes and reads nothing (src
// must still be a valid address).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// Lanes 0-15 give the addresses (those of lanes 16-31 are not read).
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// The same with generic pointers into shared memory.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) { ldsm_x4(r, smem_u32(p)); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ldsm_x4_t(r, smem_u32(p)); }
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) { cp_async16(smem_u32(dst), src, src_bytes); }

// Two floats -> packed bf16x2 (round to nearest even); `lo` goes to the low 16 bits, the element
// with the smaller column index in an mma fragment.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// d += a (16x16 row-major) * b (16x8 col-major), bf16 in, f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Sum of x over the eight lanes that hold one column of an m16n8 fragment (lanes 4 g + t for
// g = 0..7: a butterfly over xor 4, 8, 16, so every lane gets the same bits).
__device__ __forceinline__ float sum_over_fragment_rows(float x) {
  x += __shfl_xor_sync(0xFFFFFFFFu, x, 4);
  x += __shfl_xor_sync(0xFFFFFFFFu, x, 8);
  return x + __shfl_xor_sync(0xFFFFFFFFu, x, 16);
}
