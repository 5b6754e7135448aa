// Loads and stores in f32 arithmetic for the kernels' storage types, and
// block-wide reductions.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }

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
