// Fused elementwise and row kernels for training (forward and backward):
// RMSNorm, rotary embedding, SwiGLU, softmax cross-entropy. f32 or bf16 storage, f32 arithmetic.
// Compiled to PTX by stages/build.rs; launched from stages/src/nn/fused.rs,
// which documents the semantics each must match (the plain compositions in
// stages/src/nn/ops.rs).

#include "common.cuh"

// Round to the storage type and back (what a composition in T does between ops).
__device__ __forceinline__ float rnd(float v, const float *) { return v; }
__device__ __forceinline__ float rnd(float v, const __nv_bfloat16 *) { return __bfloat162float(__float2bfloat16(v)); }

// y = T(x * rstd) * w, rstd = 1 / sqrt(mean(x^2) + eps); one block per row.
// Rows of a multiple of 8 values at 16-byte aligned addresses go 8 values a
// thread (16-byte accesses), others one at a time.
template <typename T>
__device__ void rmsnorm_fwd(const T *x, const T *w, T *y, float *rstd, int h, float eps) {
  const size_t row = blockIdx.x;
  const T *xr = x + row * h;
  T *yr = y + row * h;
  const int h8 = h % 8 == 0 && aligned16(x) && aligned16(w) && aligned16(y) ? h : 0;
  float s = 0.f;
  for (int c = 8 * threadIdx.x; c < h8; c += 8 * blockDim.x) {
    float a[8];
    ld8(xr + c, a);
    for (int j = 0; j < 8; j++) s += a[j] * a[j];
  }
  for (int c = h8 + threadIdx.x; c < h; c += blockDim.x) {
    const float v = ld(xr, c);
    s += v * v;
  }
  s = block_sum(s);
  const float r = rsqrtf(s / h + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int c = 8 * threadIdx.x; c < h8; c += 8 * blockDim.x) {
    float a[8], b[8];
    ld8(xr + c, a);
    ld8(w + c, b);
    for (int j = 0; j < 8; j++) a[j] = rnd(a[j] * r, xr) * b[j];
    st8(yr + c, a);
  }
  for (int c = h8 + threadIdx.x; c < h; c += blockDim.x) st(yr, c, rnd(ld(xr, c) * r, xr) * ld(w, c));
}

// dx = rstd * (dn - xhat * mean(dn * xhat)) (+ acc, the gradient summed so
// far, unless null), dn = dy * w, xhat = x * rstd; 8 values a thread as
// rmsnorm_fwd.
template <typename T>
__device__ void rmsnorm_bwd(const T *x, const T *w, const T *dy, const float *rstd, const T *acc, T *dx, int h) {
  const size_t row = blockIdx.x;
  const float r = rstd[row];
  const T *xr = x + row * h, *dyr = dy + row * h, *ar = acc ? acc + row * h : nullptr;
  T *dxr = dx + row * h;
  const int h8 =
      h % 8 == 0 && aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx) && aligned16(acc) ? h : 0;
  float s = 0.f;
  for (int c = 8 * threadIdx.x; c < h8; c += 8 * blockDim.x) {
    float a[8], b[8], d[8];
    ld8(xr + c, a);
    ld8(w + c, b);
    ld8(dyr + c, d);
    for (int j = 0; j < 8; j++) s += d[j] * b[j] * a[j] * r;
  }
  for (int c = h8 + threadIdx.x; c < h; c += blockDim.x) s += ld(dyr, c) * ld(w, c) * ld(xr, c) * r;
  s = block_sum(s) / h;
  for (int c = 8 * threadIdx.x; c < h8; c += 8 * blockDim.x) {
    float a[8], b[8], d[8];
    ld8(xr + c, a);
    ld8(w + c, b);
    ld8(dyr + c, d);
    float e[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (ar) ld8(ar + c, e);
    for (int j = 0; j < 8; j++) a[j] = r * (d[j] * b[j] - a[j] * r * s) + e[j];
    st8(dxr + c, a);
  }
  for (int c = h8 + threadIdx.x; c < h; c += blockDim.x) {
    const float xh = ld(xr, c) * r;
    st(dxr, c, r * (ld(dyr, c) * ld(w, c) - xh * s) + (ar ? ld(ar, c) : 0.f));
  }
}

// The weight's gradient of RMSNorm: column sums of dy * T(x * rstd) in f32,
// as partial sums (deterministic, no atomics) that the caller adds up. A
// thread takes 8 neighbouring columns (16-byte loads where h % 8 == 0 and
// the rows are aligned), so a row of h takes G = ceil(h / 8) threads and a
// block of B threads runs R = max(1, B / G) row lanes: lane r of block b
// takes rows b * R + r, + gridDim.x * R, ... into part row b * R + r
// (part: gridDim.x * R rows of h; rmsnorm_dw_lanes gives R on the host).
template <typename T>
__device__ void rmsnorm_dw(const T *x, const T *dy, const float *rstd, float *part, int m, int h) {
  const int G = (h + 7) / 8, R = max(1, (int)blockDim.x / G);
  const bool vec = h % 8 == 0 && aligned16(x) && aligned16(dy);
  for (int gi = threadIdx.x; gi < G * R; gi += blockDim.x) {
    const int r = gi / G, c0 = (gi % G) * 8;
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int row = blockIdx.x * R + r; row < m; row += gridDim.x * R) {
      const float rs = rstd[row];
      const size_t base = (size_t)row * h + c0;
      if (vec) {
        float a[8], d[8];
        ld8(x + base, a);
        ld8(dy + base, d);
#pragma unroll
        for (int j = 0; j < 8; j++) s[j] += d[j] * rnd(a[j] * rs, x);
      } else {
        for (int j = 0; j < 8 && c0 + j < h; j++) s[j] += ld(dy, base + j) * rnd(ld(x, base + j) * rs, x);
      }
    }
    float *o = part + ((size_t)blockIdx.x * R + r) * h + c0;
    for (int j = 0; j < 8 && c0 + j < h; j++) o[j] = s[j];
  }
}

// dx (+ acc) as rmsnorm_bwd and the weight's gradient as rmsnorm_dw's partial
// column sums, in one pass over x and dy: a block walks rows blockIdx.x,
// + gridDim.x, ..., into part row blockIdx.x (gridDim.x rows of h). Thread
// t owns columns 8 (t + k blockDim.x) .. + 7 for k < CH (the host picks CH
// with 8 CH blockDim.x >= h) and keeps their w and dw sums in registers;
// 16-byte accesses where h % 8 == 0 and the addresses allow.
template <typename T, int CH>
__device__ void rmsnorm_bwd_dw(const T *x, const T *w, const T *dy, const float *rstd, const T *acc, T *dx,
                               float *part, int m, int h) {
  const bool vec = h % 8 == 0 && aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx) && aligned16(acc);
  float wr[CH][8], dws[CH][8];
  auto load = [&](const T *p, int c0, float *o) {
    if (vec && c0 < h) {
      ld8(p + c0, o);
    } else {
#pragma unroll
      for (int j = 0; j < 8; j++) o[j] = c0 + j < h ? ld(p, c0 + j) : 0.f;
    }
  };
#pragma unroll
  for (int k = 0; k < CH; k++) {
    load(w, 8 * (threadIdx.x + k * blockDim.x), wr[k]);
#pragma unroll
    for (int j = 0; j < 8; j++) dws[k][j] = 0.f;
  }
  for (int row = blockIdx.x; row < m; row += gridDim.x) {
    const float r = rstd[row];
    const T *xr = x + (size_t)row * h, *dyr = dy + (size_t)row * h;
    T *dxr = dx + (size_t)row * h;
    float a[CH][8], d[CH][8], s = 0.f;
#pragma unroll
    for (int k = 0; k < CH; k++) {
      const int c0 = 8 * (threadIdx.x + k * blockDim.x);
      load(xr, c0, a[k]);
      load(dyr, c0, d[k]);
#pragma unroll
      for (int j = 0; j < 8; j++) s += d[k][j] * wr[k][j] * a[k][j] * r;
    }
    s = block_sum(s) / h;
#pragma unroll
    for (int k = 0; k < CH; k++) {
      const int c0 = 8 * (threadIdx.x + k * blockDim.x);
      float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (acc) load(acc + (size_t)row * h, c0, o);
#pragma unroll
      for (int j = 0; j < 8; j++) {
        o[j] += r * (d[k][j] * wr[k][j] - a[k][j] * r * s);
        dws[k][j] += d[k][j] * rnd(a[k][j] * r, x);
      }
      if (vec && c0 < h) {
        st8(dxr + c0, o);
      } else {
        for (int j = 0; j < 8 && c0 + j < h; j++) st(dxr, c0 + j, o[j]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < CH; k++) {
    const int c0 = 8 * (threadIdx.x + k * blockDim.x);
    float *o = part + (size_t)blockIdx.x * h + c0;
    for (int j = 0; j < 8 && c0 + j < h; j++) o[j] = dws[k][j];
  }
}

// out (h, in T) = the column sums of part (rows x h, f32), in a fixed order:
// a block takes 32 columns with 8 row lanes, the lanes added in shared memory.
template <typename T> __device__ void colsum(const float *part, T *out, int rows, int h) {
  __shared__ float sh[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x % 32, lane = threadIdx.x / 32;
  float s = 0.f;
  if (c < h)
    for (int r = lane; r < rows; r += 8) s += part[(size_t)r * h + c];
  sh[lane][threadIdx.x % 32] = s;
  __syncthreads();
  if (lane == 0 && c < h) {
    float t = 0.f;
#pragma unroll
    for (int l = 0; l < 8; l++) t += sh[l][threadIdx.x];
    st(out, c, t);
  }
}

// Rotary embedding, rotate_half layout: x (n, heads, d), cos/sin (n, d/2),
// on heads 0..rot-1 of each row; the others are copied (the values of a
// packed q, k, v projection). sign = 1: forward; sign = -1: the backward
// (rotation by the opposite angle).
// 8 pairs a thread (16-byte accesses) where d / 2 is a multiple of 8 and the
// addresses allow, else a pair a thread; the same arithmetic either way.
template <typename T>
__device__ void rope(const T *x, const T *cs, const T *sn, T *y, int n, int heads, int d, float sign, int rot) {
  const int half = d / 2;
  if (half % 8 == 0 && (size_t)n * heads * (half / 8) < 0xffffffffull && aligned16(x) && aligned16(cs) &&
      aligned16(sn) && aligned16(y)) {
    const unsigned hv = half / 8, rows = (unsigned)n * heads, total = rows * hv;
    for (unsigned idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
      const unsigned nh = idx / hv, i = (idx - nh * hv) * 8, t = nh / heads;
      const size_t base = (size_t)nh * d + i;
      float c[8], sv[8], x1[8], x2[8];
      ld8(x + base, x1);
      ld8(x + base + half, x2);
      if ((int)(nh - t * heads) >= rot) {
        st8(y + base, x1);
        st8(y + base + half, x2);
        continue;
      }
      ld8(cs + (size_t)t * half + i, c);
      ld8(sn + (size_t)t * half + i, sv);
      float y1[8], y2[8];
#pragma unroll
      for (int j = 0; j < 8; j++) {
        const float sj = sign * sv[j];
        y1[j] = x1[j] * c[j] - x2[j] * sj;
        y2[j] = x2[j] * c[j] + x1[j] * sj;
      }
      st8(y + base, y1);
      st8(y + base + half, y2);
    }
    return;
  }
  const size_t total = (size_t)n * heads * half;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x) {
    const size_t i = idx % half, nh = idx / half, t = nh / heads;
    const size_t base = nh * d;
    const float x1 = ld(x, base + i), x2 = ld(x, base + half + i);
    if ((int)(nh - t * heads) >= rot) {
      st(y, base + i, x1);
      st(y, base + half + i, x2);
      continue;
    }
    const float c = ld(cs, t * half + i), s = sign * ld(sn, t * half + i);
    st(y, base + i, x1 * c - x2 * s);
    st(y, base + half + i, x2 * c + x1 * s);
  }
}

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

// y = f(a, b) element by element, in f32 rounded once to T; 8 elements a
// thread where the addresses allow (16-byte accesses), the rest one at a
// time. (candle's binary kernels go one element a thread: ~1.4 TB/s on an
// H200 in bf16.)
template <typename T, typename F> __device__ void map2(const T *a, const T *b, T *y, size_t n, F f) {
  const size_t n8 = aligned16(a) && aligned16(b) && aligned16(y) ? n & ~(size_t)7 : 0;
  const size_t id = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = 8 * id; i < n8; i += 8 * stride) {
    float x[8], z[8];
    ld8(a + i, x);
    ld8(b + i, z);
    for (int j = 0; j < 8; j++) z[j] = f(x[j], z[j]);
    st8(y + i, z);
  }
  for (size_t i = n8 + id; i < n; i += stride) st(y, i, f(ld(a, i), ld(b, i)));
}

// y = silu(g) * u (silu rounded to T, as the composition does).
template <typename T> __device__ void swiglu_fwd(const T *g, const T *u, T *y, size_t n) {
  map2(g, u, y, n, [g](float a, float b) { return b * rnd(a * sigmoid(a), g); });
}

// y = a + b.
template <typename T> __device__ void add_vec(const T *a, const T *b, T *y, size_t n) {
  map2(a, b, y, n, [](float x, float z) { return x + z; });
}

// dg = dy * u * silu'(g), du = dy * silu(g); as swiglu_fwd, 8 at a time.
template <typename T> __device__ void swiglu_bwd(const T *g, const T *u, const T *dy, T *dg, T *du, size_t n) {
  const bool vec = aligned16(g) && aligned16(u) && aligned16(dy) && aligned16(dg) && aligned16(du);
  const size_t n8 = vec ? n & ~(size_t)7 : 0;
  const size_t id = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = 8 * id; i < n8; i += 8 * stride) {
    float a[8], b[8], d[8], o[8];
    ld8(g + i, a);
    ld8(u + i, b);
    ld8(dy + i, d);
    for (int j = 0; j < 8; j++) {
      const float s = sigmoid(a[j]);
      o[j] = d[j] * b[j] * s * (1.f + a[j] * (1.f - s));
      b[j] = d[j] * rnd(a[j] * s, g);
    }
    st8(dg + i, o);
    st8(du + i, b);
  }
  for (size_t i = n8 + id; i < n; i += stride) {
    const float a = ld(g, i), s = sigmoid(a), d = ld(dy, i);
    st(dg, i, d * ld(u, i) * s * (1.f + a * (1.f - s)));
    st(du, i, d * rnd(a * s, g));
  }
}

// Softmax cross-entropy of one row of logits per block, and its gradient in
// place: loss[row] = logsumexp(x) - x[t]; x <- gs * (softmax(x) - onehot(t))
// (gs: the factor the loss will be scaled by, so that no later pass scales
// the gradients).
// Both in f32 from the stored logits (the loss is the end of the graph, so
// the gradient is known in the forward pass). Rows of a multiple of 8
// values at 16-byte aligned addresses go 8 values a thread at a time (the
// kernel is bound by memory: scalar 2-byte loads reached ~1.3 TB/s).
template <typename T> __device__ void ce_grad(T *x, const uint32_t *tgt, float *loss, int v, float gs) {
  const size_t row = blockIdx.x;
  T *xr = x + row * v;
  const uint32_t t = tgt[row];
  const float xt = ld(xr, t); // read before any thread overwrites it (the reductions sync)
  const int v8 = v % 8 == 0 && aligned16(x) ? v : 0;
  float mx = -INFINITY, s = 0.f;
  for (int c = 8 * threadIdx.x; c < v8; c += 8 * blockDim.x) {
    float a[8];
    ld8(xr + c, a);
    float cm = a[0];
    for (int j = 1; j < 8; j++) cm = fmaxf(cm, a[j]);
    if (cm > mx) {
      s *= expf(mx - cm);
      mx = cm;
    }
    for (int j = 0; j < 8; j++) s += expf(a[j] - mx);
  }
  for (int c = v8 + threadIdx.x; c < v; c += blockDim.x) {
    const float a = ld(xr, c);
    if (a > mx) {
      s = s * expf(mx - a) + 1.f;
      mx = a;
    } else {
      s += expf(a - mx);
    }
  }
  const float m = block_max(mx);
  s = block_sum(mx == -INFINITY ? 0.f : s * expf(mx - m));
  const float lse = m + logf(s);
  if (threadIdx.x == 0) loss[row] = lse - xt;
  for (int c = 8 * threadIdx.x; c < v8; c += 8 * blockDim.x) {
    float a[8];
    ld8(xr + c, a);
    for (int j = 0; j < 8; j++) a[j] = gs * (expf(a[j] - lse) - (c + j == (int)t ? 1.f : 0.f));
    st8(xr + c, a);
  }
  for (int c = v8 + threadIdx.x; c < v; c += blockDim.x)
    st(xr, c, gs * (expf(ld(xr, c) - lse) - (c == (int)t ? 1.f : 0.f)));
}

// out (n, d) = rows ids of table (V, d): a block a row.
template <typename T> __device__ void gather_rows(const T *table, const uint32_t *ids, T *out, int d) {
  const T *src = table + (size_t)ids[blockIdx.x] * d;
  T *dst = out + (size_t)blockIdx.x * d;
  const int d8 = d / 8 * 8;
  if (aligned16(src) && aligned16(dst))
    for (int c = 8 * threadIdx.x; c < d8; c += 8 * blockDim.x) {
      float a[8];
      ld8(src + c, a);
      st8(dst + c, a);
    }
  else
    for (int c = threadIdx.x; c < d8; c += blockDim.x) st(dst, c, ld(src, c));
  for (int c = d8 + threadIdx.x; c < d; c += blockDim.x) st(dst, c, ld(src, c));
}

// The backward of gather_rows: dt (V, d) += the rows of g (n, d) summed per
// distinct id, a block per id. seg holds nseg + 1 starts, then the nseg
// distinct ids, then the n row numbers sorted by id (stably): block s sums
// rows order[starts[s]..starts[s + 1]] in that order in f32, so the result
// does not depend on scheduling.
template <typename T> __device__ void segment_add(T *dt, const T *g, const uint32_t *seg, int nseg, int d) {
  const uint32_t *starts = seg, *uniq = seg + nseg + 1, *order = uniq + nseg;
  const uint32_t a = starts[blockIdx.x], b = starts[blockIdx.x + 1];
  T *dst = dt + (size_t)uniq[blockIdx.x] * d;
  const int d8 = aligned16(dt) && aligned16(g) && d % 8 == 0 ? d : 0;
  for (int c = 8 * threadIdx.x; c < d8; c += 8 * blockDim.x) {
    float acc[8], v[8];
    ld8(dst + c, acc);
    for (uint32_t j = a; j < b; j++) {
      ld8(g + (size_t)order[j] * d + c, v);
#pragma unroll
      for (int i = 0; i < 8; i++) acc[i] += v[i];
    }
    st8(dst + c, acc);
  }
  for (int c = d8 + threadIdx.x; c < d; c += blockDim.x) {
    float acc = ld(dst, c);
    for (uint32_t j = a; j < b; j++) acc += ld(g, (size_t)order[j] * d + c);
    st(dst, c, acc);
  }
}

// splitmix64's finaliser: a 64-bit hash.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A dropout mask made on the device (src/nn/fused.rs's dropout_values):
// element i is `keep`, or 0 where the high half of a hash of (seed, i)
// is below thr (p * 2^32).
template <typename T> __device__ void dropout_mask(T *y, size_t n, unsigned long long seed, unsigned thr, float keep) {
  const size_t id = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = id; i < n; i += stride) st(y, i, (unsigned)(mix64(seed ^ mix64(i)) >> 32) >= thr ? keep : 0.f);
}

#define INSTANTIATE(T, TN)                                                                                          \
  extern "C" __global__ void rmsnorm_fwd_##TN(const T *x, const T *w, T *y, float *rstd, int h, float eps) {       \
    rmsnorm_fwd<T>(x, w, y, rstd, h, eps);                                                                          \
  }                                                                                                                 \
  extern "C" __global__ void rmsnorm_bwd_##TN(const T *x, const T *w, const T *dy, const float *rstd, const T *acc,  \
                                              T *dx, int h) {                                                       \
    rmsnorm_bwd<T>(x, w, dy, rstd, acc, dx, h);                                                                     \
  }                                                                                                                 \
  extern "C" __global__ void rmsnorm_dw_##TN(const T *x, const T *dy, const float *rstd, float *part, int m,       \
                                             int h) {                                                               \
    rmsnorm_dw<T>(x, dy, rstd, part, m, h);                                                                         \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(256, 4) rmsnorm_bwd_dw1_##TN(const T *x, const T *w, const T *dy, const float *rstd,          \
                                                  const T *acc, T *dx, float *part, int m, int h) {                \
    rmsnorm_bwd_dw<T, 1>(x, w, dy, rstd, acc, dx, part, m, h);                                                      \
  }                                                                                                                 \
  extern "C" __global__ void rmsnorm_bwd_dw2_##TN(const T *x, const T *w, const T *dy, const float *rstd,          \
                                                  const T *acc, T *dx, float *part, int m, int h) {                \
    rmsnorm_bwd_dw<T, 2>(x, w, dy, rstd, acc, dx, part, m, h);                                                      \
  }                                                                                                                 \
  extern "C" __global__ void rmsnorm_bwd_dw4_##TN(const T *x, const T *w, const T *dy, const float *rstd,          \
                                                  const T *acc, T *dx, float *part, int m, int h) {                \
    rmsnorm_bwd_dw<T, 4>(x, w, dy, rstd, acc, dx, part, m, h);                                                      \
  }                                                                                                                 \
  extern "C" __global__ void colsum_##TN(const float *part, T *out, int rows, int h) {                              \
    colsum<T>(part, out, rows, h);                                                                                  \
  }                                                                                                                 \
  extern "C" __global__ void rope_##TN(const T *x, const T *cs, const T *sn, T *y, int n, int heads, int d,        \
                                       float sign, int rot) {                                                       \
    rope<T>(x, cs, sn, y, n, heads, d, sign, rot);                                                                  \
  }                                                                                                                 \
  extern "C" __global__ void swiglu_fwd_##TN(const T *g, const T *u, T *y, size_t n) { swiglu_fwd<T>(g, u, y, n); } \
  extern "C" __global__ void add_vec_##TN(const T *a, const T *b, T *y, size_t n) { add_vec<T>(a, b, y, n); }      \
  extern "C" __global__ void swiglu_bwd_##TN(const T *g, const T *u, const T *dy, T *dg, T *du, size_t n) {        \
    swiglu_bwd<T>(g, u, dy, dg, du, n);                                                                             \
  }                                                                                                                 \
  extern "C" __global__ void ce_grad_##TN(T *x, const uint32_t *tgt, float *loss, int v, float gs) {               \
    ce_grad<T>(x, tgt, loss, v, gs);                                                                                \
  }                                                                                                                 \
  extern "C" __global__ void gather_rows_##TN(const T *t, const uint32_t *ids, T *out, int d) {                    \
    gather_rows<T>(t, ids, out, d);                                                                                 \
  }                                                                                                                 \
  extern "C" __global__ void segment_add_##TN(T *dt, const T *g, const uint32_t *seg, int nseg, int d) {           \
    segment_add<T>(dt, g, seg, nseg, d);                                                                            \
  }                                                                                                                 \
  extern "C" __global__ void dropout_mask_##TN(T *y, size_t n, unsigned long long seed, unsigned thr, float keep) { \
    dropout_mask<T>(y, n, seed, thr, keep);                                                                         \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
