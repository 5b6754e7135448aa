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

// Where a chunk's 8-wide part ends: the elements after it (all of them
// when the addresses do not allow 16-byte access) go one at a time.
__device__ __forceinline__ size_t vec_end(const MtChunk &c, bool vec) {
  return vec ? c.start + ((c.end - c.start) & ~(size_t)7) : c.start;
}

// out[0] += sum of g^2 over every tensor of the table (one atomic per block).
template <typename T>
__device__ void multi_sumsq(const unsigned long long *tab, const unsigned long long *chunks, float *out) {
  const MtChunk c = mt_chunk(tab, chunks);
  const T *g = (const T *)c.t[4];
  const size_t e8 = vec_end(c, aligned16(g));
  float s = 0.f;
  for (size_t i = c.start + 8 * threadIdx.x; i < e8; i += 8 * blockDim.x) {
    float a[8];
    ld8(g + i, a);
    for (int j = 0; j < 8; j++) s += a[j] * a[j];
  }
  for (size_t i = e8 + threadIdx.x; i < c.end; i += blockDim.x) {
    const float a = ld(g, i);
    s += a * a;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(out, s);
}

struct Adam {
  float lr, b1, b2, eps, bc1, bc2, gscale, decay;
  // One element: updates m and v, returns the new f32 weight.
  __device__ __forceinline__ float step(float w32, float &m, float &v, float g) const {
    const float gi = g * gscale;
    m = m * b1 + gi * (1.f - b1);
    v = v * b2 + (gi * gi) * (1.f - b2);
    return w32 * decay - (m / bc1) / (sqrtf(v / bc2) + eps) * lr;
  }
};

// The clipping factor: gscale, or with `sumsq` (the gradients' sum of
// squares, multi_sumsq's, on the device) torch's clip_grad_norm_ factor
// max_norm / (norm + 1e-6) where the norm exceeds max_norm > 0 (else 1),
// in double as the host computes it (src/nn/optim.rs's clip_scale), so
// that the step need not wait for the host to read the norm.
__device__ __forceinline__ float clip_factor(float gscale, const float *sumsq, double max_norm) {
  if (!sumsq) return gscale;
  const double norm = sqrt((double)*sumsq);
  return max_norm > 0.0 && norm > max_norm ? (float)(max_norm / (norm + 1e-6)) : 1.f;
}

// One AdamW step of every tensor of the table: g' = g * gscale (clipping,
// see clip_factor);
// m, v the moments (f32); w32 the f32 weights (the master copy, or the
// parameter itself when it is f32), w the parameter (may alias w32).
// Decoupled decay first, as torch:
// w32 = w32 * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps); w = T(w32).
// Eight elements a thread at a time where the addresses allow.
template <typename T>
__device__ void multi_adamw(const unsigned long long *tab, const unsigned long long *chunks, float lr, float b1,
                            float b2, float eps, float bc1, float bc2, float gscale, const float *sumsq,
                            double max_norm) {
  const MtChunk c = mt_chunk(tab, chunks);
  gscale = clip_factor(gscale, sumsq, max_norm);
  float *w32 = (float *)c.t[0];
  T *w = (T *)c.t[1];
  float *m = (float *)c.t[2], *v = (float *)c.t[3];
  const T *g = (const T *)c.t[4];
  const Adam a{lr, b1, b2, eps, bc1, bc2, gscale, __uint_as_float((unsigned)c.t[6])};
  const bool vec = aligned16(w32) && aligned16(w) && aligned16(m) && aligned16(v) && aligned16(g);
  const size_t e8 = vec_end(c, vec);
  for (size_t i = c.start + 8 * threadIdx.x; i < e8; i += 8 * blockDim.x) {
    float gi[8], wi[8], mi[8], vi[8];
    ld8(g + i, gi);
    ld8(w32 + i, wi);
    ld8(m + i, mi);
    ld8(v + i, vi);
    for (int j = 0; j < 8; j++) wi[j] = a.step(wi[j], mi[j], vi[j], gi[j]);
    st8(m + i, mi);
    st8(v + i, vi);
    st8(w32 + i, wi);
    if ((const void *)w != (const void *)w32) st8(w + i, wi);
  }
  for (size_t i = e8 + threadIdx.x; i < c.end; i += blockDim.x) {
    float mi = m[i], vi = v[i];
    const float wi = a.step(w32[i], mi, vi, ld(g, i));
    m[i] = mi;
    v[i] = vi;
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
                                              float gscale, const float *sumsq, double max_norm) {                  \
    multi_adamw<T>(tab, chunks, lr, b1, b2, eps, bc1, bc2, gscale, sumsq, max_norm);                                \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
