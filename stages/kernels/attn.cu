// Causal attention over packed variable-length sequences (flash-attention
// style: scores never leave the chip), forward and backward, f32 or bf16
// storage with f32 arithmetic; grouped-query attention (several query heads
// per key/value head). Compiled to PTX by stages/build.rs (nvcc) and launched
// from stages/src/nn/flash.rs.
//
// Layouts (contiguous): q, o, dq (N, Hq, D); k, v, dk, dv (N, Hkv, D);
// lse (Hq, N) f32, the log2-sum-exp2 of each row's scaled scores;
// delta (N, Hq) f32, rowsum(dO * O). `tiles` has 4 ints per tile: the first
// and one-past-last row of the tile (at most R = 4096 / D rows, all of one
// sequence), and the first and one-past-last row of its sequence. Row i
// attends to rows seq_start..=i of its own sequence. A block (128 threads)
// does one tile of one head.
//
// Each row is handled by P = D / 32 neighbouring threads, thread `part`
// owning dims part, part + P, ... (32 of them): dot products are reduced
// with warp shuffles, and the threads of a row read neighbouring shared
// memory words (no bank conflicts). Loop bounds are block-uniform so every
// shuffle has the whole warp.

#include "common.cuh"



template <int P> __device__ __forceinline__ float rowsum(float x) {
#pragma unroll
  for (int o = 1; o < P; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Rows r0.. of `src` (row stride `stride` elements, `head` selects the
// D-wide slice) into sh[r * D + c], zeros past `end`.
template <typename T, int D, int NT>
__device__ __forceinline__ void stage(float *sh, const T *src, int r0, int nrows, int end, int stride, int head) {
  for (int idx = threadIdx.x; idx < nrows * D; idx += NT) {
    int r = idx / D, c = idx % D, row = r0 + r;
    sh[idx] = row < end ? ld(src, ((size_t)row * stride + head) * D + c) : 0.f;
  }
}

template <typename T, int D, int NT>
__device__ __forceinline__ void unstage(T *dst, const float *sh, int r0, int end, int stride, int head) {
  for (int idx = threadIdx.x; idx < 4096; idx += NT) {
    int r = idx / D, c = idx % D, row = r0 + r;
    if (row < end) st(dst, ((size_t)row * stride + head) * D + c, sh[idx]);
  }
}

template <typename T, int D>
__device__ void fwd(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ o,
                    float *__restrict__ lse, const int *__restrict__ tiles, int n, int hq, int hkv, float sl2) {
  constexpr int P = D / 32, R = 4096 / D, NT = R * P, BK = R;
  __shared__ float ks[4096];
  __shared__ float vs[4096];
  const int t = blockIdx.x, h = blockIdx.y, g = h / (hq / hkv);
  const int q0 = tiles[4 * t], q1 = tiles[4 * t + 1], s0 = tiles[4 * t + 2];
  const int row = threadIdx.x / P, part = threadIdx.x % P;
  const int i = min(q0 + row, q1 - 1);
  float qr[32], acc[32];
  stage<T, D, NT>(ks, q, q0, R, q1, hq, h);
  __syncthreads();
#pragma unroll
  for (int c = 0; c < 32; c++) {
    qr[c] = ks[row * D + c * P + part] * sl2;
    acc[c] = 0.f;
  }
  __syncthreads();
  float m = -INFINITY, l = 0.f;
  for (int kb = s0; kb < q1; kb += BK) {
    const int nk = min(BK, q1 - kb);
    stage<T, D, NT>(ks, k, kb, nk, q1, hkv, g);
    stage<T, D, NT>(vs, v, kb, nk, q1, hkv, g);
    __syncthreads();
    for (int c0 = 0; c0 < nk; c0 += 16) {
      float s[16];
      float mx = m;
#pragma unroll
      for (int u = 0; u < 16; u++) {
        const int r = c0 + u;
        float x = -INFINITY;
        if (r < nk) {
          const float *kr = ks + r * D + part;
          float d = 0.f;
#pragma unroll
          for (int c = 0; c < 32; c++) d += qr[c] * kr[c * P];
          d = rowsum<P>(d);
          if (kb + r <= i) x = d;
        }
        s[u] = x;
        mx = fmaxf(mx, x);
      }
      if (mx == -INFINITY) continue;
      const float corr = exp2f(m - mx);
      l *= corr;
#pragma unroll
      for (int c = 0; c < 32; c++) acc[c] *= corr;
#pragma unroll
      for (int u = 0; u < 16; u++) {
        const int r = c0 + u;
        if (r < nk) {
          const float p = exp2f(s[u] - mx);
          l += p;
          const float *vr = vs + r * D + part;
#pragma unroll
          for (int c = 0; c < 32; c++) acc[c] += p * vr[c * P];
        }
      }
      m = mx;
    }
    __syncthreads();
  }
  const float inv = 1.f / l;
#pragma unroll
  for (int c = 0; c < 32; c++) ks[row * D + c * P + part] = acc[c] * inv;
  if (part == 0 && q0 + row < q1) lse[(size_t)h * n + q0 + row] = m + log2f(l);
  __syncthreads();
  unstage<T, D, NT>(o, ks, q0, q1, hq, h);
}

template <typename T, int D>
__device__ void bwd_dq(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                       const T *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ delta,
                       T *__restrict__ dq, const int *__restrict__ tiles, int n, int hq, int hkv, float sl2,
                       float scale) {
  constexpr int P = D / 32, R = 4096 / D, NT = R * P, BK = R;
  __shared__ float ks[4096];
  __shared__ float vs[4096];
  const int t = blockIdx.x, h = blockIdx.y, g = h / (hq / hkv);
  const int q0 = tiles[4 * t], q1 = tiles[4 * t + 1], s0 = tiles[4 * t + 2];
  const int row = threadIdx.x / P, part = threadIdx.x % P;
  const int i = min(q0 + row, q1 - 1);
  float qr[32], dr[32], acc[32];
  stage<T, D, NT>(ks, q, q0, R, q1, hq, h);
  stage<T, D, NT>(vs, dout, q0, R, q1, hq, h);
  __syncthreads();
#pragma unroll
  for (int c = 0; c < 32; c++) {
    qr[c] = ks[row * D + c * P + part] * sl2;
    dr[c] = vs[row * D + c * P + part];
    acc[c] = 0.f;
  }
  const float li = lse[(size_t)h * n + i], di = delta[(size_t)i * hq + h];
  __syncthreads();
  for (int kb = s0; kb < q1; kb += BK) {
    const int nk = min(BK, q1 - kb);
    stage<T, D, NT>(ks, k, kb, nk, q1, hkv, g);
    stage<T, D, NT>(vs, v, kb, nk, q1, hkv, g);
    __syncthreads();
    for (int r = 0; r < nk; r++) {
      const float *kr = ks + r * D + part, *vr = vs + r * D + part;
      float x = 0.f, y = 0.f;
#pragma unroll
      for (int c = 0; c < 32; c++) {
        x += qr[c] * kr[c * P];
        y += dr[c] * vr[c * P];
      }
      x = rowsum<P>(x);
      y = rowsum<P>(y);
      const float p = kb + r <= i ? exp2f(x - li) : 0.f;
      const float ds = p * (y - di);
#pragma unroll
      for (int c = 0; c < 32; c++) acc[c] += ds * kr[c * P];
    }
    __syncthreads();
  }
#pragma unroll
  for (int c = 0; c < 32; c++) ks[row * D + c * P + part] = acc[c] * scale;
  __syncthreads();
  unstage<T, D, NT>(dq, ks, q0, q1, hq, h);
}

template <typename T, int D>
__device__ void bwd_dkv(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                        const T *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ delta,
                        T *__restrict__ dk, T *__restrict__ dv, const int *__restrict__ tiles, int n, int hq, int hkv,
                        float sl2, float scale) {
  constexpr int P = D / 32, R = 4096 / D, NT = R * P, BQ = R;
  __shared__ float qs[4096];
  __shared__ float ds_[4096];
  __shared__ float ls[BQ], dd[BQ];
  const int t = blockIdx.x, g = blockIdx.y, rep = hq / hkv;
  const int j0 = tiles[4 * t], j1 = tiles[4 * t + 1], e = tiles[4 * t + 3];
  const int row = threadIdx.x / P, part = threadIdx.x % P;
  const int j = min(j0 + row, j1 - 1);
  float kr[32], vr[32], dka[32], dva[32];
  stage<T, D, NT>(qs, k, j0, R, j1, hkv, g);
  stage<T, D, NT>(ds_, v, j0, R, j1, hkv, g);
  __syncthreads();
#pragma unroll
  for (int c = 0; c < 32; c++) {
    kr[c] = qs[row * D + c * P + part] * sl2;
    vr[c] = ds_[row * D + c * P + part];
    dka[c] = 0.f;
    dva[c] = 0.f;
  }
  __syncthreads();
  for (int hh = 0; hh < rep; hh++) {
    const int h = g * rep + hh;
    for (int qb = j0; qb < e; qb += BQ) {
      const int nq = min(BQ, e - qb);
      stage<T, D, NT>(qs, q, qb, nq, e, hq, h);
      stage<T, D, NT>(ds_, dout, qb, nq, e, hq, h);
      for (int r = threadIdx.x; r < nq; r += NT) {
        ls[r] = lse[(size_t)h * n + qb + r];
        dd[r] = delta[(size_t)(qb + r) * hq + h];
      }
      __syncthreads();
      for (int r = 0; r < nq; r++) {
        const float *qr = qs + r * D + part, *dr = ds_ + r * D + part;
        float x = 0.f, y = 0.f;
#pragma unroll
        for (int c = 0; c < 32; c++) {
          x += kr[c] * qr[c * P];
          y += vr[c] * dr[c * P];
        }
        x = rowsum<P>(x);
        y = rowsum<P>(y);
        const float p = qb + r >= j ? exp2f(x - ls[r]) : 0.f;
        const float s = p * (y - dd[r]);
#pragma unroll
        for (int c = 0; c < 32; c++) {
          dva[c] += p * dr[c * P];
          dka[c] += s * qr[c * P];
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int c = 0; c < 32; c++) {
    qs[row * D + c * P + part] = dka[c] * scale;
    ds_[row * D + c * P + part] = dva[c];
  }
  __syncthreads();
  unstage<T, D, NT>(dk, qs, j0, j1, hkv, g);
  unstage<T, D, NT>(dv, ds_, j0, j1, hkv, g);
}

#define INSTANTIATE(T, TN, D)                                                                                        \
  extern "C" __global__ void __launch_bounds__(128)                                                       \
      attn_fwd_##D##_##TN(const T *q, const T *k, const T *v, T *o, float *lse, const int *tiles, int n, int hq,     \
                          int hkv, float sl2) {                                                                      \
    fwd<T, D>(q, k, v, o, lse, tiles, n, hq, hkv, sl2);                                                              \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(128)                                                       \
      attn_bwd_dq_##D##_##TN(const T *q, const T *k, const T *v, const T *dout, const float *lse,                   \
                             const float *delta, T *dq, const int *tiles, int n, int hq, int hkv, float sl2,        \
                             float scale) {                                                                          \
    bwd_dq<T, D>(q, k, v, dout, lse, delta, dq, tiles, n, hq, hkv, sl2, scale);                                      \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(128)                                                       \
      attn_bwd_dkv_##D##_##TN(const T *q, const T *k, const T *v, const T *dout, const float *lse,                  \
                              const float *delta, T *dk, T *dv, const int *tiles, int n, int hq, int hkv, float sl2, \
                              float scale) {                                                                         \
    bwd_dkv<T, D>(q, k, v, dout, lse, delta, dk, dv, tiles, n, hq, hkv, sl2, scale);                                 \
  }

INSTANTIATE(float, f32, 64)
INSTANTIATE(float, f32, 128)
INSTANTIATE(__nv_bfloat16, bf16, 64)
INSTANTIATE(__nv_bfloat16, bf16, 128)
