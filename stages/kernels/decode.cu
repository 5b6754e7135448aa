// One decode step of a Llama-family model for serving (bf16 weights, f32
// residual stream), as five launches per layer that src/nn/decode.rs records
// once per batch size into a CUDA graph:
//   qkv:    RMSNorm + q/k/v projections + rotary; k and v go straight into the
//           paged KV pool (blocks of 32 positions, (block, 32, kv, hd));
//   attn:   attention of each row against its sequence's cache, split over
//           position tiles (flash-decoding), partial (max, sum, output) per split;
//   o:      the splits combined + output projection, added to the residual;
//   gateup: RMSNorm + gate and up projections + SwiGLU;
//   down:   down projection, added to the residual;
// then head (final RMSNorm + LM head into f32 logits) and argmax.
// The projections are warp-per-output-row dot products (GEMV for small
// batches): BT rows of the batch are staged in shared memory in bf16 and
// every weight row is read once per BT rows.
#include "common.cuh"

typedef __nv_bfloat16 bf16;

#define KV_BLOCK 32
// Positions per attention block (one per thread).
#define TILE 128

struct Gemv {
  const float *x;        // residual (B, K) f32 (norm inputs)
  const bf16 *xin;       // (B, K) bf16 (plain input)
  const bf16 *norm;      // (K) RMSNorm weight
  const float *po;       // attention partials (B, nh, nsplit, hd)
  const float *pml;      // (B, nh, nsplit, 2): running max, sum
  const bf16 *w0, *w1, *w2;  // weights (rows, K): q/k/v, gate/up, or one
  float *out;            // f32 output (q, residual, logits)
  bf16 *outb;            // bf16 output (SwiGLU)
  bf16 *kc, *vc;         // this layer's paged keys / values
  const unsigned *pos;   // (B) position of the new token
  const unsigned *table; // (B, maxb) block ids
  const float *inv_freq; // (hd / 2)
  int B, K, N, nh, kv, hd, maxb, nsplit;
  float eps;
};

enum { IN_NORM = 0, IN_PLAIN = 1, IN_ATTN = 2 };
enum { OUT_QKV = 0, OUT_RESID = 1, OUT_SWIGLU = 2, OUT_LOGITS = 3 };

__device__ __forceinline__ void unpack8(const uint4 &u, float f[8]) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Rows b0..b0+nb of the input, as bf16 (BT, K) in shared memory; rows past
// nb are zero.
template <int IN, int BT> __device__ void stage(const Gemv &a, bf16 *xs, int b0, int nb) {
  const int K = a.K;
  for (int b = 0; b < BT; b++) {
    if (b >= nb) {
      for (int k = threadIdx.x; k < K; k += blockDim.x) xs[b * K + k] = __float2bfloat16(0.f);
      continue;
    }
    const int row = b0 + b;
    if (IN == IN_NORM) {
      const float *x = a.x + (size_t)row * K;
      float ss = 0.f;
      for (int k = threadIdx.x; k < K; k += blockDim.x) ss += x[k] * x[k];
      const float inv = rsqrtf(block_sum(ss) / K + a.eps);
      for (int k = threadIdx.x; k < K; k += blockDim.x)
        xs[b * K + k] = __float2bfloat16(x[k] * inv * __bfloat162float(a.norm[k]));
    } else if (IN == IN_PLAIN) {
      for (int k = threadIdx.x; k < K; k += blockDim.x) xs[b * K + k] = a.xin[(size_t)row * K + k];
    } else {
      // Combine the attention splits of each head: K = nh * hd.
      const int S = a.nsplit;
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const int h = k / a.hd, d = k % a.hd;
        const size_t base = ((size_t)row * a.nh + h) * S;
        float m = -INFINITY;
        for (int s = 0; s < S; s++) m = fmaxf(m, a.pml[(base + s) * 2]);
        float l = 0.f, o = 0.f;
        for (int s = 0; s < S; s++) {
          const float ms = a.pml[(base + s) * 2];
          if (ms == -INFINITY) continue;
          const float c = __expf(ms - m);
          l += a.pml[(base + s) * 2 + 1] * c;
          o += a.po[(base + s) * a.hd + d] * c;
        }
        xs[b * K + k] = __float2bfloat16(l > 0.f ? o / l : 0.f);
      }
    }
  }
}

// Output unit u: its weight rows (two for q/k/v pairs and gate/up).
template <int OUT> __device__ __forceinline__ void rows(const Gemv &a, int u, const bf16 *&r0, const bf16 *&r1) {
  const size_t K = a.K;
  if (OUT == OUT_QKV) {
    const int half = a.hd / 2, hh = u / half, i = u % half;
    const bf16 *w;
    int h;
    if (hh < a.nh) {
      w = a.w0;
      h = hh;
    } else if (hh < a.nh + a.kv) {
      w = a.w1;
      h = hh - a.nh;
    } else {
      w = a.w2;
      h = hh - a.nh - a.kv;
    }
    r0 = w + (size_t)(h * a.hd + i) * K;
    r1 = w + (size_t)(h * a.hd + i + half) * K;
  } else if (OUT == OUT_SWIGLU) {
    r0 = a.w0 + (size_t)u * K;
    r1 = a.w1 + (size_t)u * K;
  } else {
    r0 = a.w0 + (size_t)u * K;
    r1 = r0;
  }
}

template <int OUT> __device__ __forceinline__ void epilogue(const Gemv &a, int u, int b, float v0, float v1) {
  if (OUT == OUT_RESID) {
    a.out[(size_t)b * a.N + u] += v0;
  } else if (OUT == OUT_LOGITS) {
    a.out[(size_t)b * a.N + u] = v0;
  } else if (OUT == OUT_SWIGLU) {
    a.outb[(size_t)b * a.N + u] = __float2bfloat16(v0 / (1.f + __expf(-v0)) * v1);
  } else {
    const int half = a.hd / 2, hh = u / half, i = u % half;
    const unsigned p = a.pos[b];
    if (hh < a.nh + a.kv) {
      float s, c;
      sincosf((float)p * a.inv_freq[i], &s, &c);
      const float y0 = v0 * c - v1 * s, y1 = v1 * c + v0 * s;
      v0 = y0;
      v1 = y1;
    }
    if (hh < a.nh) {
      float *q = a.out + ((size_t)b * a.nh + hh) * a.hd;
      q[i] = v0;
      q[i + half] = v1;
    } else {
      const unsigned slot = a.table[(size_t)b * a.maxb + p / KV_BLOCK] * KV_BLOCK + p % KV_BLOCK;
      const int g = hh < a.nh + a.kv ? hh - a.nh : hh - a.nh - a.kv;
      bf16 *c = (hh < a.nh + a.kv ? a.kc : a.vc) + ((size_t)slot * a.kv + g) * a.hd;
      c[i] = __float2bfloat16(v0);
      c[i + half] = __float2bfloat16(v1);
    }
  }
}

// Grid (row groups, batch chunks of BT); each warp takes UN output units at
// a time (four weight rows in flight: the loads of a decode step are
// latency-bound, not bandwidth-bound, at small batches).
template <int IN, int OUT, int BT> __device__ void gemv(const Gemv &a) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16 *xs = reinterpret_cast<bf16 *>(smem);
  const int b0 = blockIdx.y * BT;
  const int nb = min(BT, a.B - b0);
  stage<IN, BT>(a, xs, b0, nb);
  __syncthreads();
  constexpr int NR = (OUT == OUT_QKV || OUT == OUT_SWIGLU) ? 2 : 1;
  constexpr int UN = 4 / NR;
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int chunks = a.K / 8;
  for (int u0 = (blockIdx.x * warps + threadIdx.x / 32) * UN; u0 < a.N; u0 += gridDim.x * warps * UN) {
    const uint4 *w[UN][NR];
#pragma unroll
    for (int j = 0; j < UN; j++) {
      const bf16 *r0, *r1;
      rows<OUT>(a, min(u0 + j, a.N - 1), r0, r1);
      w[j][0] = reinterpret_cast<const uint4 *>(r0);
      w[j][NR - 1] = reinterpret_cast<const uint4 *>(r1);
    }
    float acc[UN][NR][BT];
#pragma unroll
    for (int j = 0; j < UN; j++)
#pragma unroll
      for (int r = 0; r < NR; r++)
#pragma unroll
        for (int b = 0; b < BT; b++) acc[j][r][b] = 0.f;
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
      uint4 raw[UN][NR];
#pragma unroll
      for (int j = 0; j < UN; j++)
#pragma unroll
        for (int r = 0; r < NR; r++) raw[j][r] = __ldg(w[j][r] + c);
      float wf[UN][NR][8];
#pragma unroll
      for (int j = 0; j < UN; j++)
#pragma unroll
        for (int r = 0; r < NR; r++) unpack8(raw[j][r], wf[j][r]);
#pragma unroll
      for (int b = 0; b < BT; b++) {
        float xv[8];
        unpack8(*reinterpret_cast<const uint4 *>(xs + b * a.K + c * 8), xv);
#pragma unroll
        for (int j = 0; j < UN; j++)
#pragma unroll
          for (int r = 0; r < NR; r++)
#pragma unroll
            for (int i = 0; i < 8; i++) acc[j][r][b] += wf[j][r][i] * xv[i];
      }
    }
#pragma unroll
    for (int j = 0; j < UN; j++) {
#pragma unroll
      for (int b = 0; b < BT; b++) {
        const float s0 = warp_sum(acc[j][0][b]);
        const float s1 = NR == 2 ? warp_sum(acc[j][NR - 1][b]) : 0.f;
        if (lane == b % 32 && b < nb && u0 + j < a.N) epilogue<OUT>(a, u0 + j, b0 + b, s0, s1);
      }
    }
  }
}

#define GEMV(name, IN, OUT)                                                                       \
  extern "C" __global__ void dec_##name##_1(Gemv a) { gemv<IN, OUT, 1>(a); }                       \
  extern "C" __global__ void dec_##name##_2(Gemv a) { gemv<IN, OUT, 2>(a); }                       \
  extern "C" __global__ void dec_##name##_4(Gemv a) { gemv<IN, OUT, 4>(a); }                       \
  extern "C" __global__ void dec_##name##_8(Gemv a) { gemv<IN, OUT, 8>(a); }                       \
  extern "C" __global__ void dec_##name##_16(Gemv a) { gemv<IN, OUT, 16>(a); }

GEMV(qkv, IN_NORM, OUT_QKV)
GEMV(o, IN_ATTN, OUT_RESID)
GEMV(gateup, IN_NORM, OUT_SWIGLU)
GEMV(down, IN_PLAIN, OUT_RESID)
GEMV(head, IN_NORM, OUT_LOGITS)

struct Attn {
  const float *q;        // (B, nh, hd), rotated
  const bf16 *kc, *vc;   // this layer's paged keys / values
  const unsigned *pos;   // (B)
  const unsigned *table; // (B, maxb)
  float *po;             // (B, nh, nsplit, hd)
  float *pml;            // (B, nh, nsplit, 2)
  int nh, kv, maxb, nsplit;
  float scale;
};

#define MAX_REP 8

// Grid (nsplit, kv, B), TILE threads. Split s takes position tiles s,
// s + nsplit, ... of its row's sequence (positions 0..=pos), for the rep
// query heads of kv head g, with an online softmax across its tiles.
template <int HD> __device__ void attn(const Attn &a) {
  const int s0 = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int rep = a.nh / a.kv, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int len = a.pos[b] + 1;
  __shared__ float qs[MAX_REP][HD];
  __shared__ float sc[MAX_REP][TILE];
  // The tile's values, staged by the threads that score their keys (the
  // accumulation below then reads shared memory, not dependent global loads).
  __shared__ __align__(16) bf16 vs[TILE][HD];
  __shared__ float mrun[MAX_REP], lrun[MAX_REP], corr[MAX_REP];
  for (int k = tid; k < rep * HD; k += TILE)
    qs[k / HD][k % HD] = a.q[((size_t)b * a.nh + g * rep + k / HD) * HD + k % HD] * a.scale;
  if (tid < rep) {
    mrun[tid] = -INFINITY;
    lrun[tid] = 0.f;
  }
  constexpr int PER = (MAX_REP * HD + TILE - 1) / TILE;
  float acc[PER];
#pragma unroll
  for (int j = 0; j < PER; j++) acc[j] = 0.f;
  const size_t row = (size_t)a.kv * HD;
  __syncthreads();
  for (int t0 = s0 * TILE; t0 < len; t0 += a.nsplit * TILE) {
    const int p = t0 + tid;
    if (p < len) {
      const unsigned slot = a.table[(size_t)b * a.maxb + p / KV_BLOCK] * KV_BLOCK + p % KV_BLOCK;
      const uint4 *kr = reinterpret_cast<const uint4 *>(a.kc + slot * row + (size_t)g * HD);
      const uint4 *vr = reinterpret_cast<const uint4 *>(a.vc + slot * row + (size_t)g * HD);
#pragma unroll
      for (int c = 0; c < HD / 8; c++) reinterpret_cast<uint4 *>(vs[tid])[c] = vr[c];
      float d[MAX_REP];
#pragma unroll
      for (int r = 0; r < MAX_REP; r++) d[r] = 0.f;
#pragma unroll
      for (int c = 0; c < HD / 8; c++) {
        float kv8[8];
        unpack8(kr[c], kv8);
#pragma unroll
        for (int r = 0; r < MAX_REP; r++)
          if (r < rep)
#pragma unroll
            for (int i = 0; i < 8; i++) d[r] += qs[r][c * 8 + i] * kv8[i];
      }
#pragma unroll
      for (int r = 0; r < MAX_REP; r++)
        if (r < rep) sc[r][tid] = d[r];
    } else {
      for (int r = 0; r < rep; r++) sc[r][tid] = -INFINITY;
    }
    __syncthreads();
    // Per head: the tile's max, the new running max, probabilities in place.
    for (int r = warp; r < rep; r += TILE / 32) {
      float m = -INFINITY;
      for (int t = lane; t < TILE; t += 32) m = fmaxf(m, sc[r][t]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      const float mn = fmaxf(mrun[r], m);
      float l = 0.f;
      for (int t = lane; t < TILE; t += 32) {
        const float e = sc[r][t] == -INFINITY ? 0.f : __expf(sc[r][t] - mn);
        sc[r][t] = e;
        l += e;
      }
      l = warp_sum(l);
      if (lane == 0) {
        const float c = mrun[r] == -INFINITY ? 0.f : __expf(mrun[r] - mn);
        corr[r] = c;
        lrun[r] = lrun[r] * c + l;
        mrun[r] = mn;
      }
    }
    __syncthreads();
    const int n = min(TILE, len - t0);
#pragma unroll
    for (int j = 0; j < PER; j++) {
      const int k = tid + j * TILE;
      if (k < rep * HD) {
        const int r = k / HD, d = k % HD;
        float o = acc[j] * corr[r];
        for (int t = 0; t < n; t++) o += sc[r][t] * __bfloat162float(vs[t][d]);
        acc[j] = o;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < PER; j++) {
    const int k = tid + j * TILE;
    if (k < rep * HD) {
      const int h = g * rep + k / HD;
      a.po[(((size_t)b * a.nh + h) * a.nsplit + s0) * HD + k % HD] = acc[j];
    }
  }
  if (tid < rep) {
    const size_t i = ((size_t)b * a.nh + g * rep + tid) * a.nsplit + s0;
    a.pml[i * 2] = mrun[tid];
    a.pml[i * 2 + 1] = lrun[tid];
  }
}

extern "C" __global__ void dec_attn_64(Attn a) { attn<64>(a); }
extern "C" __global__ void dec_attn_128(Attn a) { attn<128>(a); }

// x (B, H) f32 = embed rows of the tokens.
extern "C" __global__ void dec_embed(const unsigned *tok, const bf16 *embed, float *x, int H) {
  const int b = blockIdx.x;
  const bf16 *e = embed + (size_t)tok[b] * H;
  for (int k = threadIdx.x; k < H; k += blockDim.x) x[(size_t)b * H + k] = __bfloat162float(e[k]);
}

// Index of the largest logit of each row (the first on ties, as torch.argmax).
extern "C" __global__ void dec_argmax(const float *logits, unsigned *out, int V) {
  const int b = blockIdx.x;
  const float *l = logits + (size_t)b * V;
  float best = -INFINITY;
  int at = 0x7fffffff;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = l[i];
    if (v > best || (v == best && i < at)) {
      best = v;
      at = i;
    }
  }
  __shared__ float bv[32];
  __shared__ int bi[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, at, o);
    if (ov > best || (ov == best && oi < at)) {
      best = ov;
      at = oi;
    }
  }
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    bv[w] = best;
    bi[w] = at;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < (int)blockDim.x / 32; i++)
      if (bv[i] > best || (bv[i] == best && bi[i] < at)) {
        best = bv[i];
        at = bi[i];
      }
    if (at == 0x7fffffff) at = 0;  // all NaN
    out[b] = (unsigned)at;
  }
}
