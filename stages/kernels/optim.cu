// The optimizer step on CUDA: the global gradient norm and AdamW, one launch
// per parameter tensor each instead of ~14 elementwise ops. Compiled to PTX
// by stages/build.rs; launched from stages/src/nn/optim.rs, whose composed
// AdamW::step (torch.optim.AdamW's update) they match.

#include "common.cuh"

// out[0] += sum of g^2 (grid-stride; one atomic per block).
template <typename T> __device__ void sumsq(const T *g, size_t n, float *out) {
  float s = 0.f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float a = ld(g, i);
    s += a * a;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(out, s);
}

// One AdamW step: g' = g * gscale (clipping); m, v the moments (f32); w32 the
// f32 weights (the master copy, or the parameter itself when it is f32), w
// the parameter (may alias w32). Decoupled decay first, as torch:
// w32 = w32 * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps); w = T(w32).
template <typename T>
__device__ void adamw(float *w32, T *w, float *m, float *v, const T *g, size_t n, float lr, float b1, float b2,
                      float eps, float decay, float bc1, float bc2, float gscale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
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
  extern "C" __global__ void sumsq_##TN(const T *g, size_t n, float *out) { sumsq<T>(g, n, out); }                 \
  extern "C" __global__ void adamw_##TN(float *w32, T *w, float *m, float *v, const T *g, size_t n, float lr,      \
                                        float b1, float b2, float eps, float decay, float bc1, float bc2,          \
                                        float gscale) {                                                             \
    adamw<T>(w32, w, m, v, g, n, lr, b1, b2, eps, decay, bc1, bc2, gscale);                                         \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
