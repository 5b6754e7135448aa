// Loads and stores in f32 arithmetic for the kernels' storage types, and
// block-wide reductions.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// Eight consecutive elements as f32 (16-byte accesses: one for bf16, two
// for f32; the address 16-byte aligned).
__device__ __forceinline__ void ld8(const float *p, float *o) {
  const float4 a = *(const float4 *)p, b = *(const float4 *)(p + 4);
  o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
__device__ __forceinline__ void ld8(const __nv_bfloat16 *p, float *o) {
  const uint4 a = *(const uint4 *)p;
  const unsigned w[4] = {a.x, a.y, a.z, a.w};
  for (int j = 0; j < 4; j++) {
    const float2 f = __bfloat1622float2(*(const __nv_bfloat162 *)&w[j]);
    o[2 * j] = f.x, o[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void st8(float *p, const float *o) {
  *(float4 *)p = make_float4(o[0], o[1], o[2], o[3]);
  *(float4 *)(p + 4) = make_float4(o[4], o[5], o[6], o[7]);
}
__device__ __forceinline__ void st8(__nv_bfloat16 *p, const float *o) {
  unsigned w[4];
  for (int j = 0; j < 4; j++) {
    const __nv_bfloat162 b = __floats2bfloat162_rn(o[2 * j], o[2 * j + 1]);
    w[j] = *(const unsigned *)&b;
  }
  *(uint4 *)p = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ bool aligned16(const void *p) { return ((uintptr_t)p % 16) == 0; }

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduce over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `id` fills the lanes of missing warps.
template <typename Op> __device__ __forceinline__ float block_reduce(float v, Op op, float id) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  __syncthreads();
  if (l == 0) part[w] = v;
  __syncthreads();
  const int nw = blockDim.x / 32;
  v = l < nw ? part[l] : id;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, Sum(), 0.f); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, Max(), -INFINITY); }

// A shared-memory address for inline PTX.
__device__ __forceinline__ uint32_t saddr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without the registers; zeros when !valid.
__device__ __forceinline__ void cp16(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp4(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(saddr(dst)), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of the committed groups are in flight.
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// *p += (a, b, c, d) in global memory: one vector reduction on sm_90 (p
// 16-byte aligned), four atomics before.
__device__ __forceinline__ void red_add4(float *p, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
  atomicAdd(p + 2, c);
  atomicAdd(p + 3, d);
#endif
}
