// The optimizer step on CUDA, as torch's fused AdamW: the global gradient
// norm and the AdamW update, one launch each for all the parameters of a
// dtype instead of ~14 elementwise ops per tensor. Compiled to PTX by
// stages/build.rs; launched from stages/src/nn/optim.rs, whose composed
// AdamW::step (torch.optim.AdamW's update) they match.
//
// `tab` holds 8 words per tensor: w32, w, m, v, g (device addresses), n,
// decay (f32 bits), unused. Block b takes chunk `chunks[b]` = tensor << 32 |
// chunk number, of MT_CHUNK elements (a tensor's last chunk may be shorter).

#include "common.cuh"

#define MT_CHUNK 65536

struct MtChunk {
  const unsigned long long *t;
  size_t start, end;
};

__device__ __forceinline__ MtChunk mt_chunk(const unsigned long long *tab, const unsigned long long *chunks) {
  const unsigned long long e = chunks[blockIdx.x];
  const unsigned long long *t = tab + (e >> 32) * 8;
  const size_t start = (size_t)(e & 0xffffffffull) * MT_CHUNK;
  const size_t n = (size_t)t[5];
  return MtChunk{t, start, start + MT_CHUNK < n ? start + MT_CHUNK : n};
}

// out[0] += sum of g^2 over every tensor of the table (one atomic per block).
template <typename T>
__device__ void multi_sumsq(const unsigned long long *tab, const unsigned long long *chunks, float *out) {
  const MtChunk c = mt_chunk(tab, chunks);
  const T *g = (const T *)c.t[4];
  float s = 0.f;
  for (size_t i = c.start + threadIdx.x; i < c.end; i += blockDim.x) {
    const float a = ld(g, i);
    s += a * a;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(out, s);
}

// One AdamW step of every tensor of the table: g' = g * gscale (clipping);
// m, v the moments (f32); w32 the f32 weights (the master copy, or the
// parameter itself when it is f32), w the parameter (may alias w32).
// Decoupled decay first, as torch:
// w32 = w32 * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps); w = T(w32).
template <typename T>
__device__ void multi_adamw(const unsigned long long *tab, const unsigned long long *chunks, float lr, float b1,
                            float b2, float eps, float bc1, float bc2, float gscale) {
  const MtChunk c = mt_chunk(tab, chunks);
  float *w32 = (float *)c.t[0];
  T *w = (T *)c.t[1];
  float *m = (float *)c.t[2], *v = (float *)c.t[3];
  const T *g = (const T *)c.t[4];
  const float decay = __uint_as_float((unsigned)c.t[6]);
  for (size_t i = c.start + threadIdx.x; i < c.end; i += blockDim.x) {
    const float gi = ld(g, i) * gscale;
    const float mi = m[i] * b1 + gi * (1.f - b1);
    const float vi = v[i] * b2 + (gi * gi) * (1.f - b2);
    m[i] = mi;
    v[i] = vi;
    const float wi = w32[i] * decay - (mi / bc1) / (sqrtf(vi / bc2) + eps) * lr;
    w32[i] = wi;
    st(w, i, wi);
  }
}

#define INSTANTIATE(T, TN)                                                                                          \
  extern "C" __global__ void multi_sumsq_##TN(const unsigned long long *tab, const unsigned long long *chunks,      \
                                              float *out) {                                                         \
    multi_sumsq<T>(tab, chunks, out);                                                                               \
  }                                                                                                                 \
  extern "C" __global__ void multi_adamw_##TN(const unsigned long long *tab, const unsigned long long *chunks,      \
                                              float lr, float b1, float b2, float eps, float bc1, float bc2,        \
                                              float gscale) {                                                       \
    multi_adamw<T>(tab, chunks, lr, b1, b2, eps, bc1, bc2, gscale);                                                 \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
