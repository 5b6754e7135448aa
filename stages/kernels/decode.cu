// One decode step of a Llama-family model for serving (bf16 weights, f32
// residual stream), as five launches per layer that src/nn/decode.rs records
// once per batch size into a CUDA graph:
//   qkv:    RMSNorm + q/k/v projections + rotary; k and v go straight into the
//           paged KV pool (blocks of 32 positions, (block, 32, kv, hd));
//   attn:   attention of each row against its sequence's cache, split over
//           position tiles (flash-decoding); the last split block of a row
//           and kv head to finish combines the splits into bf16;
//   o:      output projection, added to the residual;
//   gateup: RMSNorm + gate and up projections + SwiGLU;
//   down:   down projection, added to the residual;
// then head (final RMSNorm + LM head into f32 logits, keeping each row's
// argmax). The projections run on tensor cores (mma_proj: bf16 mma.sync
// with f32 sums) or, as warp-per-output-row dot products (gemv), on CUDA
// cores, with a separate argmax kernel. Both stage BT rows of the batch in
// shared memory in bf16 and read every weight row once per BT rows.
#include "common.cuh"

typedef __nv_bfloat16 bf16;

#define KV_BLOCK 32
// Positions per attention block (one per thread).
#define TILE 128

struct Gemv {
  const float *x;        // residual (B, K) f32 (norm inputs)
  const bf16 *xin;       // (B, K) bf16 (plain input)
  const bf16 *norm;      // (K) RMSNorm weight
  const bf16 *w0, *w1, *w2;  // weights (rows, K): q/k/v, gate/up, or one
  float *out;            // f32 output (q, residual, logits)
  bf16 *outb;            // bf16 output (SwiGLU)
  bf16 *kc, *vc;         // this layer's paged keys / values
  const unsigned *pos;   // (B) position of the new token
  const unsigned *table; // (B, maxb) block ids
  const float *inv_freq; // (hd / 2)
  unsigned long long *best; // (B) argmax keys of the LM head (argmax_key)
  int B, K, N, nh, kv, hd, maxb;
  float eps;
  float *out2;           // OUT_RESID: also the new residual here, when set
  const float *parts;    // IN_PARTS: (np, B, K) partial rows to add to x
  int np;
  // OUT_LOGITS: with hbest (host memory mapped into the device), the last
  // block to finish (counted in *hdone, back to 0 after) copies the rows'
  // argmax keys there: no copy of its own after the kernel.
  unsigned long long *hbest;
  unsigned *hdone;
  // A chain of steps (dec_embed_io with seq): the keys go to half (*seq - 1) & 1
  // of hbest (halves of hstride keys); null: hbest itself.
  const unsigned *seq;
  int hstride;
  // OUT_LOGITS with hbest, one row (a launch of several chained steps with
  // the LM head as its own kernel): the block that publishes the key also
  // feeds the argmax (clamped to the N rows) to the next step, its
  // embedding row of these (N, K) into x (f32) and best reset; null: none.
  const bf16 *feed;
};

// IN_PARTS: as IN_NORM, of x plus the partial rows `parts` (the LM head
// after the two-kernel layers).
enum { IN_NORM = 0, IN_PLAIN = 1, IN_PARTS = 2 };
// OUT_MLP: gate/up + SwiGLU + this tile's share of the down projection,
// summed into the residual `out` (f32 reductions; see mma_proj).
enum { OUT_QKV = 0, OUT_RESID = 1, OUT_SWIGLU = 2, OUT_LOGITS = 3, OUT_MLP = 4 };

__device__ __forceinline__ void unpack8(const uint4 &u, float f[8]) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// The sum over each group of W consecutive lanes (the whole warp by default).
template <int W = 32> __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Programmatic dependent launch (sm_90): a kernel lets the next one start
// at once (pdl_launch) and waits for the previous one to finish before it
// touches what that one wrote (pdl_wait), so that launch latency and the
// weight loads of a kernel overlap the kernel before it. Both are no-ops
// for a launch without the attribute.
__device__ __forceinline__ void pdl_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

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
    } else {
      for (int k = threadIdx.x; k < K; k += blockDim.x) xs[b * K + k] = a.xin[(size_t)row * K + k];
    }
  }
}

// The weight row of rotary pair u's first (`second` 0) or second half: pairs
// of q's heads, then k's, then v's; rows K long.
__device__ __forceinline__ const bf16 *qkv_row(const bf16 *q, const bf16 *k, const bf16 *v, int nh, int kv, int hd,
                                               size_t K, int u, int second) {
  const int half = hd / 2, hh = u / half, i = u % half;
  const bf16 *w;
  int h;
  if (hh < nh) {
    w = q;
    h = hh;
  } else if (hh < nh + kv) {
    w = k;
    h = hh - nh;
  } else {
    w = v;
    h = hh - nh - kv;
  }
  return w + (size_t)(h * hd + i + second * half) * K;
}

// Output unit u: its weight rows (two for q/k/v pairs and gate/up).
template <int OUT> __device__ __forceinline__ void rows(const Gemv &a, int u, const bf16 *&r0, const bf16 *&r1) {
  const size_t K = a.K;
  if (OUT == OUT_QKV) {
    r0 = qkv_row(a.w0, a.w1, a.w2, a.nh, a.kv, a.hd, K, u, 0);
    r1 = qkv_row(a.w0, a.w1, a.w2, a.nh, a.kv, a.hd, K, u, 1);
  } else if (OUT == OUT_SWIGLU || OUT == OUT_MLP) {
    r0 = a.w0 + (size_t)u * K;
    r1 = a.w1 + (size_t)u * K;
  } else {
    r0 = a.w0 + (size_t)u * K;
    r1 = r0;
  }
}

// For q/k/v, `p` is row b's position and `blk` the block that holds it
// (looked up by the caller).
template <int OUT>
__device__ __forceinline__ void epilogue(const Gemv &a, int u, int b, float v0, float v1, unsigned p = 0,
                                         unsigned blk = 0) {
  if (OUT == OUT_RESID) {
    const size_t i = (size_t)b * a.N + u;
    const float r = a.out[i] + v0;
    a.out[i] = r;
    if (a.out2) a.out2[i] = r;
  } else if (OUT == OUT_LOGITS) {
    a.out[(size_t)b * a.N + u] = v0;
  } else if (OUT == OUT_SWIGLU) {
    a.outb[(size_t)b * a.N + u] = __float2bfloat16(v0 / (1.f + __expf(-v0)) * v1);
  } else {
    const int half = a.hd / 2, hh = u / half, i = u % half;
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
      const unsigned slot = blk * KV_BLOCK + p % KV_BLOCK;
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
  pdl_launch();
  pdl_wait();
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
        if (lane == b % 32 && b < nb && u0 + j < a.N) {
          const unsigned p = OUT == OUT_QKV ? a.pos[b0 + b] : 0u;
          const unsigned blk = OUT == OUT_QKV ? a.table[(size_t)(b0 + b) * a.maxb + p / KV_BLOCK] : 0u;
          epilogue<OUT>(a, u0 + j, b0 + b, s0, s1, p, blk);
        }
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
GEMV(o, IN_PLAIN, OUT_RESID)
GEMV(gateup, IN_NORM, OUT_SWIGLU)
GEMV(down, IN_PLAIN, OUT_RESID)
GEMV(head, IN_NORM, OUT_LOGITS)

// ---- The same projections on tensor cores (bf16 mma.sync, f32 sums) ----
//
// A block takes a tile of 16 weight rows: for paired outputs (q/k/v rotary
// halves, gate/up) rows 0-7 are the first rows of 8 units and rows 8-15
// their partners, so a thread ends with both values of a unit for its
// batch columns; otherwise 16 units. The block's warps split K in chunks
// of 32; the batch (BT rows, a multiple of 8) is staged once per block in
// shared memory with a padded row stride. Weights are the MMA's A operand
// (16 x 16, row-major = the weight's own layout), the batch its B operand
// (16 x 8, "col" = a batch row's own layout). Because a dot product does
// not care about the order of k, each thread loads 8 consecutive k of a
// row (one 16-byte load) and feeds them as the k of its fragments in two
// MMAs: A and B see the same permutation of k.

__device__ __forceinline__ void mma16816(float c[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#define LAY_PMAX 16

// *p (through L2) if ok, else zeros.
__device__ __forceinline__ float4 ldcg4_if(const float4 *p, bool ok) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n}\n"
               : "+f"(v.x), "+f"(v.y), "+f"(v.z), "+f"(v.w)
               : "l"(p), "r"((int)ok));
  return v;
}

// A residual row, x + parts[0] + ... + parts[np - 1] (rows pstride floats
// apart; summed in that order, every load in flight at once), RMSNorm'd
// (weight g) into xs (bf16, K) by the whole block; the sum also goes to
// xout when that is set. K % 4 == 0, K <= 4 V blockDim.x, np <= PM.
template <int V, int PM = LAY_PMAX>
__device__ void norm_row_parts(const float *x, const float *parts, int np, size_t pstride, const bf16 *g, float eps,
                               int K, bf16 *xs, float *xout) {
  const int K4 = K / 4;
  float4 v[V];
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < V; e++) {
    const int i = threadIdx.x + e * blockDim.x;
    v[e] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < K4) {
      // Every load issued before the first add: each under a predicate of
      // its own that dies at once (as `if (k < np)` loads, the compiler ran
      // out of predicate registers and put the last ones behind branches
      // after the first adds: a second round trip to L2). A row past np
      // stays zero, and adding zero changes no sum.
      float4 w[PM];
      const float4 *pp = reinterpret_cast<const float4 *>(parts) + i;
#pragma unroll
      for (int k = 0; k < PM; k++) w[k] = ldcg4_if(pp + k * (pstride / 4), k < np);
      v[e] = __ldcg(reinterpret_cast<const float4 *>(x) + i);
#pragma unroll
      for (int k = 0; k < PM; k++) {
        v[e].x += w[k].x;
        v[e].y += w[k].y;
        v[e].z += w[k].z;
        v[e].w += w[k].w;
      }
      if (xout) reinterpret_cast<float4 *>(xout)[i] = v[e];
    }
    ss += v[e].x * v[e].x + v[e].y * v[e].y + v[e].z * v[e].z + v[e].w * v[e].w;
  }
  const float inv = rsqrtf(block_sum(ss) / K + eps);
#pragma unroll
  for (int e = 0; e < V; e++) {
    const int i = threadIdx.x + e * blockDim.x;
    if (i < K4) {
      const __nv_bfloat162 *gg = reinterpret_cast<const __nv_bfloat162 *>(g) + 2 * i;
      const float2 g0 = __bfloat1622float2(gg[0]), g1 = __bfloat1622float2(gg[1]);
      __nv_bfloat162 *d = reinterpret_cast<__nv_bfloat162 *>(xs) + 2 * i;
      d[0] = __floats2bfloat162_rn(v[e].x * inv * g0.x, v[e].y * inv * g0.y);
      d[1] = __floats2bfloat162_rn(v[e].z * inv * g1.x, v[e].w * inv * g1.y);
    }
  }
}

// Rows b0..b0+nb of the input as bf16 (BT, SK) in shared memory; rows past
// nb are zero. Norm rows go a warp per row, two rows at a time with the
// row in registers (K <= 1024: one round trip to memory per row pair). The
// residual is read through L2 (ld.global.cg): in the persistent steps other
// blocks wrote it during the kernel.
template <int IN> __device__ void stage_rows(const Gemv &a, bf16 *xs, int SK, int b0, int nb, int BT) {
  const int K = a.K, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  if (IN == IN_PARTS) {
    for (int b = 0; b < BT; b++) {
      bf16 *dst = xs + (size_t)b * SK;
      if (b < nb) {
        const size_t r = (size_t)(b0 + b) * K;
        norm_row_parts<2>(a.x + r, a.parts + r, a.np, (size_t)a.B * K, a.norm, a.eps, K, dst, nullptr);
      } else {
        for (int k = threadIdx.x * 8; k < K; k += blockDim.x * 8) *reinterpret_cast<uint4 *>(dst + k) = make_uint4(0, 0, 0, 0);
      }
    }
    return;
  }
  if (IN == IN_NORM && K <= 1024) {
    constexpr int V = 8;
    for (int b = (threadIdx.x / 32) * 2; b < BT; b += nw * 2) {
      float4 v[2][V];
      float ss[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; r++)
#pragma unroll
        for (int i = 0; i < V; i++) {
          const int k = (lane + i * 32) * 4;
          v[r][i] = b + r < nb && k < K ? __ldcg(reinterpret_cast<const float4 *>(a.x + (size_t)(b0 + b + r) * K + k))
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
          ss[r] += v[r][i].x * v[r][i].x + v[r][i].y * v[r][i].y + v[r][i].z * v[r][i].z + v[r][i].w * v[r][i].w;
        }
#pragma unroll
      for (int r = 0; r < 2; r++) {
        if (b + r >= BT) break;
        const float inv = rsqrtf(warp_sum(ss[r]) / K + a.eps);
        bf16 *dst = xs + (size_t)(b + r) * SK;
#pragma unroll
        for (int i = 0; i < V; i++) {
          const int k = (lane + i * 32) * 4;
          if (k >= K) break;
          const __nv_bfloat162 *g = reinterpret_cast<const __nv_bfloat162 *>(a.norm + k);
          const float2 g0 = __bfloat1622float2(g[0]), g1 = __bfloat1622float2(g[1]);
          __nv_bfloat162 *d = reinterpret_cast<__nv_bfloat162 *>(dst + k);
          d[0] = __floats2bfloat162_rn(v[r][i].x * inv * g0.x, v[r][i].y * inv * g0.y);
          d[1] = __floats2bfloat162_rn(v[r][i].z * inv * g1.x, v[r][i].w * inv * g1.y);
        }
      }
    }
    return;
  }
  for (int b = threadIdx.x / 32; b < BT; b += nw) {
    bf16 *dst = xs + (size_t)b * SK;
    if (b >= nb) {
      for (int k = lane * 8; k < K; k += 256) *reinterpret_cast<uint4 *>(dst + k) = make_uint4(0, 0, 0, 0);
      continue;
    }
    const int row = b0 + b;
    if (IN == IN_NORM) {
      const float *x = a.x + (size_t)row * K;
      float ss = 0.f;
      for (int k = lane * 4; k < K; k += 128) {
        const float4 v = __ldcg(reinterpret_cast<const float4 *>(x + k));
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
      const float inv = rsqrtf(warp_sum(ss) / K + a.eps);
      for (int k = lane * 4; k < K; k += 128) {
        const float4 v = __ldcg(reinterpret_cast<const float4 *>(x + k));
        const __nv_bfloat162 *g = reinterpret_cast<const __nv_bfloat162 *>(a.norm + k);
        const float2 g0 = __bfloat1622float2(g[0]), g1 = __bfloat1622float2(g[1]);
        __nv_bfloat162 *d = reinterpret_cast<__nv_bfloat162 *>(dst + k);
        d[0] = __floats2bfloat162_rn(v.x * inv * g0.x, v.y * inv * g0.y);
        d[1] = __floats2bfloat162_rn(v.z * inv * g1.x, v.w * inv * g1.y);
      }
    } else {
      const uint4 *src = reinterpret_cast<const uint4 *>(a.xin + (size_t)row * K);
      for (int c = lane; c < K / 8; c += 32) reinterpret_cast<uint4 *>(dst)[c] = src[c];
    }
  }
}

// A logit and its index as one orderable 64-bit key: the larger logit
// wins, then the smaller index (torch.argmax's first on ties).
__device__ __forceinline__ unsigned long long argmax_key(float v, unsigned i) {
  if (isnan(v)) return 0xffffffffu - i;  // below every number (as the CUDA-core argmax skips NaN)
  const unsigned bits = __float_as_uint(v);
  const unsigned key = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return ((unsigned long long)key << 32) | (0xffffffffu - i);
}

// One row's argmax (its key in *best, reset to 0 for the next step's
// head) as the next step's token, clamped to the vocabulary's n rows, and
// that token's embedding row of width h into x (every thread of the
// block; the LM head's blocks have all staged x already).
__device__ void feed_argmax(unsigned long long *best, unsigned n, const bf16 *embed, int h, float *x) {
  __shared__ unsigned tok;
  if (threadIdx.x == 0) {
    const unsigned long long k = atomicExch(best, 0ull);
    tok = min(0xffffffffu - (unsigned)k, n - 1u);
  }
  __syncthreads();
  const bf16 *e = embed + (size_t)tok * h;
  for (int i = threadIdx.x; i < h; i += blockDim.x) x[i] = __bfloat162float(e[i]);
}

// A hook that does nothing (mma_proj's `fin` by default).
struct Nop {
  __device__ void operator()() const {}
};

// The LM head's blocks, each after its atomicMax into a.best: the last to
// arrive copies the keys to a.hbest (mapped host memory), resets the
// count, feeds the argmax to the next step where a.feed is set, then runs
// `fin` (every thread of that block). (Every block of the
// launch calls this once.)
template <class Fin = Nop> __device__ void publish_best(const Gemv &a, Fin fin = Fin()) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(a.hdone, 1u) == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  unsigned long long *hb = a.hbest + (a.seq ? (size_t)((*a.seq + 1u) & 1u) * a.hstride : 0);
  for (int i = threadIdx.x; i < a.B; i += blockDim.x) hb[i] = atomicOr(a.best + i, 0ull);
  if (threadIdx.x == 0) *a.hdone = 0u;
  // (No system-scope fence: the host reads the keys once the step's event
  // or stream has completed, which makes the kernel's writes visible.)
  // (Every block staged x before it counted itself done: none reads it.)
  if (a.feed) feed_argmax(a.best, (unsigned)a.N, a.feed, a.K, const_cast<float *>(a.x));
  fin();
}

// Block (bx, by) of (nbx tile blocks, batch chunks of BT): it loads its
// first tile's weights, waits (`wait`: for the kernel before, or a grid
// barrier in the persistent step), stages its batch chunk once, then takes
// tiles bx, bx + nbx, ...; blockDim.x / 32 warps split K. Shared memory: the staged rows, then the warps' partial sums.
// OUT_MLP (gate/up, N = the intermediate size, K = the hidden size; w2 the
// down projection, (K, N)): a tile's 8 SwiGLU values of each row stay in
// shared memory (rounded to bf16, as the unfused kernels store them) and
// are multiplied at once by the tile's 8 columns of w2 (copied to shared
// memory with cp.async, the first tile's before the wait), each block
// adding its (rows, K) share into `out` with 16-byte reductions: the down
// projection needs no launch of its own. `out` must hold the residual
// already (OUT_RESID's out2) and must not be `x`, which other blocks may
// still be reading. Then the partial sums, 8 x K bf16 of w2, 8 x BT f32.
// The LM head also keeps each row's running argmax (shared, then one
// global atomicMax per block and row into a.best).
// G: the block's warps in G groups, each taking its own tiles (tile bx G
// + group, then every nbx G-th) with its own barriers (named barrier 1 +
// group), so that a block keeps G tiles' weights in flight (the LM head
// inside the persistent step, one block an SM; G = 1 elsewhere).
// fin: run by the block that publishes the keys (publish_best), after.
template <int IN, int OUT, int BT, int G = 1, class Wait, class Fin = Nop>
__device__ void mma_proj(const Gemv &a, int bx, int nbx, int by, Wait wait, Fin fin = Fin()) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16 *xs = reinterpret_cast<bf16 *>(smem);
  constexpr int NT = BT / 8;
  constexpr bool PAIR = OUT == OUT_QKV || OUT == OUT_SWIGLU || OUT == OUT_MLP;
  constexpr int UNITS = PAIR ? 8 : 16;
  pdl_launch();
  const int SK = a.K + 8;
  const int b0 = by * BT;
  const int nb = min(BT, a.B - b0);
  static_assert(G == 1 || (G == 2 && OUT != OUT_MLP && !PAIR), "mma_proj: two tile groups, 16-row tiles (OUT_RESID / OUT_LOGITS)");
  // (G = 1: the block's warps, threads and barrier.)
  // (Unsigned, as blockDim.x and threadIdx.x: the loops over them compile
  // as they did before the groups.)
  const unsigned gthreads = G == 1 ? blockDim.x : blockDim.x / G;
  const unsigned grp = G == 1 ? 0u : threadIdx.x / gthreads, gtid = G == 1 ? threadIdx.x : threadIdx.x % gthreads;
  const int lane = threadIdx.x % 32, warp = gtid / 32, nw = gthreads / 32;
  const int g = lane / 4, t = lane % 4;
  auto group_sync = [&] {
    if constexpr (G == 1)
      __syncthreads();
    else if (grp == 0)
      asm volatile("bar.sync 1, %0;" ::"r"(gthreads) : "memory");
    else
      asm volatile("bar.sync 2, %0;" ::"r"(gthreads) : "memory");
  };
  float *red = reinterpret_cast<float *>(smem + (((size_t)BT * SK * 2 + 15) / 16) * 16) + grp * nw * NT * 4 * 32;
  bf16 *sdown = reinterpret_cast<bf16 *>(red + nw * NT * 4 * 32);
  float *sact = reinterpret_cast<float *>(sdown + (OUT == OUT_MLP ? 8 * a.K : 0));
  // OUT_MLP: the 8 columns of w2 from unit tl * 8 on, a row of K 16 bytes.
  auto copy_down = [&](int tl) {
    for (int h = threadIdx.x; h < a.K; h += blockDim.x)
      cp16(sdown + (size_t)h * 8, tl * 8 + 8 <= a.N ? a.w2 + (size_t)h * a.N + tl * 8 : a.w2, tl * 8 + 8 <= a.N);
    cp_commit();
  };
  __shared__ unsigned long long best[BT];
  if (OUT == OUT_LOGITS)
    for (int i = threadIdx.x; i < BT; i += blockDim.x) best[i] = 0ull;
  // q/k/v: each row's position and the block that holds it (inputs of the
  // step, uploaded before its first kernel: read before the wait below).
  __shared__ unsigned spos[PAIR ? BT : 1], sblk[PAIR ? BT : 1];
  if (OUT == OUT_QKV)
    for (int i = threadIdx.x; i < nb; i += blockDim.x) {
      spos[i] = a.pos[b0 + i];
      sblk[i] = a.table[(size_t)(b0 + i) * a.maxb + spos[i] / KV_BLOCK];
    }
  const int chunks = (a.K + 31) / 32;
  const int tiles = (a.N + UNITS - 1) / UNITS;
  // This thread's weight rows of a tile: g and g + 8.
  auto tile_rows = [&](int tile, const bf16 *&ra, const bf16 *&rb) {
    if (PAIR) {
      rows<OUT>(a, min(tile * 8 + g, a.N - 1), ra, rb);
    } else {
      const bf16 *unused;
      rows<OUT>(a, min(tile * 16 + g, a.N - 1), ra, unused);
      rows<OUT>(a, min(tile * 16 + 8 + g, a.N - 1), rb, unused);
    }
  };
  // Warp w takes chunks w, w + nw, ...; the first P of them are loaded
  // at once (for the first tile before waiting on the previous kernel:
  // no kernel writes weights), the rest as they come.
  constexpr int P = 6;
  uint4 wa[P], wb[P];
  const bf16 *ra, *rb;
  auto prefetch = [&]() {
#pragma unroll
    for (int i = 0; i < P; i++) {
      const int k = (warp + i * nw) * 32 + t * 8;
      const bool ok = k < a.K;
      wa[i] = ok ? __ldg(reinterpret_cast<const uint4 *>(ra + k)) : make_uint4(0, 0, 0, 0);
      wb[i] = ok ? __ldg(reinterpret_cast<const uint4 *>(rb + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  int tile = bx * G + grp;
  if (tile < tiles) {
    tile_rows(tile, ra, rb);
    prefetch();
    if (OUT == OUT_MLP) copy_down(tile);
  }
  wait();
  if (bx * G >= tiles) {  // (a persistent kernel's block without a tile here)
    if (OUT == OUT_LOGITS && a.hbest) publish_best(a, fin);
    return;
  }
  stage_rows<IN>(a, xs, SK, b0, nb, BT);
  __syncthreads();
  for (; tile < tiles; tile += nbx * G) {
    if (OUT == OUT_MLP)
      for (int i = threadIdx.x; i < 8 * BT; i += blockDim.x) sact[i] = 0.f;
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    auto step = [&](int c, const uint4 &ua, const uint4 &ub) {
      const int k = c * 32 + t * 8;
#pragma unroll
      for (int j = 0; j < NT; j++) {
        const uint4 x =
            k < a.K ? *reinterpret_cast<const uint4 *>(xs + (size_t)(j * 8 + g) * SK + k) : make_uint4(0, 0, 0, 0);
        mma16816(acc[j], ua.x, ub.x, ua.y, ub.y, x.x, x.y);
        mma16816(acc[j], ua.z, ub.z, ua.w, ub.w, x.z, x.w);
      }
    };
#pragma unroll
    for (int i = 0; i < P; i++) {
      const int c = warp + i * nw;
      if (c < chunks) step(c, wa[i], wb[i]);  // warp-uniform: mma.sync needs every lane
    }
    for (int c = warp + P * nw; c < chunks; c += nw) {
      const int k = c * 32 + t * 8;
      const bool ok = k < a.K;
      const uint4 ua = ok ? __ldg(reinterpret_cast<const uint4 *>(ra + k)) : make_uint4(0, 0, 0, 0);
      const uint4 ub = ok ? __ldg(reinterpret_cast<const uint4 *>(rb + k)) : make_uint4(0, 0, 0, 0);
      step(c, ua, ub);
    }
    // The next tile's weights load while this one's sums are added.
    if (tile + nbx * G < tiles) {
      tile_rows(tile + nbx * G, ra, rb);
      prefetch();
    }
    // Sum the warps' partials.
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) red[((warp * NT + j) * 4 + e) * 32 + lane] = acc[j][e];
    group_sync();
    // Fragment (j, lane, e): e < 2 is row g, column 2t + e of n-tile j;
    // e >= 2 is row g + 8, the same column.
    for (int i = gtid; i < NT * 32 * 2; i += gthreads) {
      const int j = i / 64, ln = (i / 2) % 32, e = i % 2;
      const int col = j * 8 + (ln % 4) * 2 + e, gg = ln / 4;
      if (col >= nb) continue;
      float v0 = 0.f, v1 = 0.f;
      for (int w = 0; w < nw; w++) {
        v0 += red[((w * NT + j) * 4 + e) * 32 + ln];
        v1 += red[((w * NT + j) * 4 + e + 2) * 32 + ln];
      }
      if (OUT == OUT_MLP) {
        if (tile * 8 + gg < a.N)
          sact[gg * BT + col] = __bfloat162float(__float2bfloat16(v0 / (1.f + __expf(-v0)) * v1));
      } else if (PAIR) {
        const int u = tile * 8 + gg;
        if (u < a.N) epilogue<OUT>(a, u, b0 + col, v0, v1, spos[col], sblk[col]);
      } else {
        const int u = tile * 16 + gg;
        if (u < a.N) epilogue<OUT>(a, u, b0 + col, v0, 0.f);
        if (u + 8 < a.N) epilogue<OUT>(a, u + 8, b0 + col, v1, 0.f);
        if (OUT == OUT_LOGITS) {
          unsigned long long k = 0ull;
          if (u < a.N) k = argmax_key(v0, u);
          if (u + 8 < a.N) k = max(k, argmax_key(v1, u + 8));
          atomicMax(&best[col], k);
        }
      }
    }
    group_sync();
    if (OUT == OUT_MLP) {
      // out[b0 + col, h..h+3] += w2[h..h+3, tile's 8] . act[tile's 8, col]
      // (a tile past N has zero columns and zero values).
      cp_wait<0>();
      __syncthreads();
      const int K4 = a.K / 4;
      for (int i = threadIdx.x; i < K4 * nb; i += blockDim.x) {
        const int col = i / K4, h = (i % K4) * 4;
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int r = 0; r < 4; r++) {
          float w[8];
          unpack8(*reinterpret_cast<const uint4 *>(sdown + (size_t)(h + r) * 8), w);
#pragma unroll
          for (int uu = 0; uu < 8; uu++) s[r] = fmaf(w[uu], sact[uu * BT + col], s[r]);
        }
        red_add4(a.out + (size_t)(b0 + col) * a.K + h, s[0], s[1], s[2], s[3]);
      }
      __syncthreads();
      if (tile + nbx < tiles) copy_down(tile + nbx);
    }
  }
  if (OUT == OUT_LOGITS) {
    if constexpr (G > 1) __syncthreads();  // every group's keys in `best`
    for (int i = threadIdx.x; i < nb; i += blockDim.x) atomicMax(a.best + b0 + i, best[i]);
    if (a.hbest) publish_best(a, fin);
  }
}

// A launch of its own: blocks (x: tiles, y: batch chunks) and waiting for
// the kernel before it (programmatic dependent launch).
template <int IN, int OUT, int BT> __device__ void mma_kernel(const Gemv &a) {
  mma_proj<IN, OUT, BT>(a, blockIdx.x, gridDim.x, blockIdx.y, [] { pdl_wait(); });
}

#define MMA(name, IN, OUT)                                                                        \
  extern "C" __global__ void tc_##name##_8(Gemv a) { mma_kernel<IN, OUT, 8>(a); }                  \
  extern "C" __global__ void tc_##name##_16(Gemv a) { mma_kernel<IN, OUT, 16>(a); }                \
  extern "C" __global__ void tc_##name##_32(Gemv a) { mma_kernel<IN, OUT, 32>(a); }                \
  extern "C" __global__ void tc_##name##_64(Gemv a) { mma_kernel<IN, OUT, 64>(a); }

MMA(qkv, IN_NORM, OUT_QKV)
MMA(o, IN_PLAIN, OUT_RESID)
MMA(gateup, IN_NORM, OUT_SWIGLU)
MMA(mlp, IN_NORM, OUT_MLP)
MMA(down, IN_PLAIN, OUT_RESID)
MMA(head, IN_NORM, OUT_LOGITS)
MMA(headp, IN_PARTS, OUT_LOGITS)

// The LM head of one row on CUDA cores (decode.rs's PIPE_DECODE_HEAD1; as
// tc_headp_8 at one row: x plus the np partial rows, RMSNorm'd and rounded
// to bf16, against every weight row, the logits into out and the argmax
// into best, the last block publishing it). No tile barriers: each warp
// takes groups of 8 weight rows (warp w: groups w, w + warps, ...), 4 lanes
// a row, lane q of a row every 4th 16 bytes of it from the q-th, in passes
// of HEAD1_CH 16-byte loads a lane; the next pass's loads are issued before
// the adds of the one before, across groups too, and the first before the
// programmatic wait. Each lane keeps its best key; one atomicMax a block.
// K % 8 == 0, K <= 8 blockDim.x (norm_row_parts<2>). Shared memory: K bf16,
// then K f32.
// (Inside the persistent step's launches of several steps, as dec_lph's
// head, it was slower than tc_headp_8's code there: H200, 0.3501-0.3506
// against 0.3471 ms a step at 8 steps a launch; docs/results.md §5.)
#define HEAD1_CH 9
__device__ void head1(const Gemv &a) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16 *xb = reinterpret_cast<bf16 *>(smem);
  float *xf = reinterpret_cast<float *>(smem + ((size_t)a.K * 2 + 15) / 16 * 16);
  pdl_launch();
  const int lane = threadIdx.x % 32, q = lane % 4, rl = lane / 4;
  const int nw = blockDim.x / 32, gw = blockIdx.x * nw + threadIdx.x / 32, tw = gridDim.x * nw;
  const int nc = a.K / 8, per = (nc + 3) / 4, passes = (per + HEAD1_CH - 1) / HEAD1_CH;
  const int groups = (a.N + 7) / 8;
  const int total = gw < groups ? ((groups - 1 - gw) / tw + 1) * passes : 0;
  // Load s: group gw + (s / passes) tw, pass s % passes.
  auto load = [&](int s, uint4(&w)[HEAD1_CH]) {
    const int g = gw + (s / passes) * tw, p = s % passes;
    const uint4 *r = reinterpret_cast<const uint4 *>(a.w0 + (size_t)min(g * 8 + rl, a.N - 1) * a.K);
#pragma unroll
    for (int j = 0; j < HEAD1_CH; j++) {
      const int c = q + 4 * (p * HEAD1_CH + j);
      w[j] = c < nc ? __ldg(r + c) : make_uint4(0, 0, 0, 0);
    }
  };
  float acc = 0.f;
  unsigned long long best = 0ull;
  // Adds of load s; after a group's last pass, its row sums and keys.
  auto add = [&](int s, const uint4(&w)[HEAD1_CH]) {
    const int g = gw + (s / passes) * tw, p = s % passes;
#pragma unroll
    for (int j = 0; j < HEAD1_CH; j++) {
      const int c = q + 4 * (p * HEAD1_CH + j);
      if (c < nc) {
        float wf[8];
        unpack8(w[j], wf);
        const float4 x0 = *reinterpret_cast<const float4 *>(xf + c * 8);
        const float4 x1 = *reinterpret_cast<const float4 *>(xf + c * 8 + 4);
        acc = fmaf(wf[0], x0.x, acc);
        acc = fmaf(wf[1], x0.y, acc);
        acc = fmaf(wf[2], x0.z, acc);
        acc = fmaf(wf[3], x0.w, acc);
        acc = fmaf(wf[4], x1.x, acc);
        acc = fmaf(wf[5], x1.y, acc);
        acc = fmaf(wf[6], x1.z, acc);
        acc = fmaf(wf[7], x1.w, acc);
      }
    }
    if (p == passes - 1) {
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      const int row = g * 8 + rl;
      if (q == 0 && row < a.N) {
        if (a.out) a.out[row] = acc;
        best = max(best, argmax_key(acc, row));
      }
      acc = 0.f;
    }
  };
  uint4 wa[HEAD1_CH], wb[HEAD1_CH];
  if (total > 0) load(0, wa);
  pdl_wait();
  norm_row_parts<2>(a.x, a.parts, a.np, (size_t)a.B * a.K, a.norm, a.eps, a.K, xb, nullptr);
  __syncthreads();
  for (int i = threadIdx.x; i < a.K; i += blockDim.x) xf[i] = __bfloat162float(xb[i]);
  __syncthreads();
  for (int s = 0; s < total; s += 2) {
    if (s + 1 < total) load(s + 1, wb);
    add(s, wa);
    if (s + 1 < total) {
      if (s + 2 < total) load(s + 2, wa);
      add(s + 1, wb);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
  __shared__ unsigned long long sbest;
  if (threadIdx.x == 0) sbest = 0ull;
  __syncthreads();
  if (lane == 0) atomicMax(&sbest, best);
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(a.best, sbest);
  if (a.hbest) publish_best(a);
}
extern "C" __global__ void __launch_bounds__(256) dec_head1(Gemv a) { head1(a); }

struct Attn {
  const float *q;        // (B, nh, hd), rotated
  const bf16 *kc, *vc;   // this layer's paged keys / values
  const unsigned *pos;   // (B)
  const unsigned *table; // (B, maxb)
  float *po;             // (B, nh, nsplit, hd)
  float *pml;            // (B, nh, nsplit, 2)
  bf16 *ao;              // (B, nh * hd) the combined output
  unsigned *count;       // (B, kv) splits done (zero between steps)
  int nh, kv, maxb, nsplit;
  float scale;
};

#define MAX_REP 8

// After a split block of (row b, kv head g) has written its partial
// output and (max, sum): the last of the S split blocks to finish combines
// the splits into the bf16 attention output (and resets the counter for
// the next step). NT threads a block.
template <int HD, int NT> __device__ void finish_splits(const Attn &a, int g, int b, int S) {
  const int rep = a.nh / a.kv, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  __shared__ bool last;
  __shared__ float wts[MAX_REP][32];
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(a.count + (size_t)b * a.kv + g, 1u) == (unsigned)S - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int r = warp; r < rep; r += NT / 32) {
    const size_t base = ((size_t)b * a.nh + g * rep + r) * a.nsplit;
    const float ms = lane < S ? __ldcg(a.pml + (base + lane) * 2) : -INFINITY;
    float m = ms;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float e = ms == -INFINITY ? 0.f : __expf(ms - m);
    const float l = warp_sum(lane < S ? e * __ldcg(a.pml + (base + lane) * 2 + 1) : 0.f);
    wts[r][lane] = l > 0.f ? e / l : 0.f;
  }
  __syncthreads();
  for (int k = tid; k < rep * HD; k += NT) {
    const int r = k / HD, d = k % HD;
    const size_t base = ((size_t)b * a.nh + g * rep + r) * a.nsplit;
    float o = 0.f;
    for (int s = 0; s < S; s++) o += wts[r][s] * __ldcg(a.po + (base + s) * HD + d);
    a.ao[((size_t)b * a.nh + g * rep + r) * HD + d] = __float2bfloat16(o);
  }
  if (tid == 0) a.count[(size_t)b * a.kv + g] = 0u;
}

// Block (s0, g, b) of a grid (nsplit, kv, B), TILE threads. Of the S
// splits that take part (one
// per tile of the sequence, at most nsplit), split s takes
// position tiles s, s + S, ... of its row's sequence (positions 0..=pos),
// for the rep query heads of kv head g, with an online softmax across its
// tiles.
template <int HD> __device__ void attn(const Attn &a, int s0, int g, int b, int nsplit) {
  const int rep = a.nh / a.kv, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  pdl_launch();
  // The step's inputs (positions, block tables) were uploaded before its
  // first kernel: read them before waiting for the kernel before this one.
  const int len = a.pos[b] + 1;
  // Splits that take part: one per tile up to nsplit (a single split
  // writes the output itself; more are combined by the last to finish).
  const int S = min(nsplit, (len + TILE - 1) / TILE);
  if (s0 >= S) return;
  const unsigned first = s0 * TILE + tid < len ? a.table[(size_t)b * a.maxb + (s0 * TILE + tid) / KV_BLOCK] : 0u;
  pdl_wait();
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
  for (int t0 = s0 * TILE; t0 < len; t0 += S * TILE) {
    const int p = t0 + tid;
    if (p < len) {
      const unsigned blk = t0 == s0 * TILE ? first : a.table[(size_t)b * a.maxb + p / KV_BLOCK];
      const unsigned slot = blk * KV_BLOCK + p % KV_BLOCK;
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
        // Four running sums: the shared-memory loads of one do not wait
        // for the previous product.
        float o[4] = {acc[j] * corr[r], 0.f, 0.f, 0.f};
        int t = 0;
        for (; t + 4 <= n; t += 4)
#pragma unroll
          for (int u = 0; u < 4; u++) o[u] += sc[r][t + u] * __bfloat162float(vs[t + u][d]);
        for (; t < n; t++) o[0] += sc[r][t] * __bfloat162float(vs[t][d]);
        acc[j] = (o[0] + o[1]) + (o[2] + o[3]);
      }
    }
    __syncthreads();
  }
  if (S == 1) {
#pragma unroll
    for (int j = 0; j < PER; j++) {
      const int k = tid + j * TILE;
      if (k < rep * HD) {
        const float l = lrun[k / HD];
        a.ao[((size_t)b * a.nh + g * rep) * HD + k] = __float2bfloat16(l > 0.f ? acc[j] / l : 0.f);
      }
    }
    return;
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
  finish_splits<HD, TILE>(a, g, b, S);
}

extern "C" __global__ void dec_attn_64(Attn a) { attn<64>(a, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x); }
extern "C" __global__ void dec_attn_128(Attn a) { attn<128>(a, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x); }

// Scores s (lane j: position j's, j < n <= 32) folded into a warp's
// online softmax (m, l) per query head and its P.V sums (acc: this lane's
// HD / 32 dimensions of each head) over the values vw (rows RS = HD + 8
// apart). s becomes the probabilities.
template <int HD, int REP, bool COMPACT>
__device__ __forceinline__ void attend_fold(const bf16 *vw, float (&s)[REP], int n, float (&m)[REP], float (&l)[REP],
                                            float (&acc)[REP][HD / 32]) {
  constexpr int RS = HD + 8, DL = HD / 32;
  constexpr int UV = COMPACT ? 2 : 8;
  const int lane = threadIdx.x % 32;
  // The warp's online softmax, per query head: s becomes the
  // probabilities (relative to the warp's running max).
#pragma unroll
  for (int r = 0; r < REP; r++) {
    const float x = lane < n ? s[r] : -INFINITY;
    float mx = x;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float mn = fmaxf(m[r], mx);
    const float e = x == -INFINITY ? 0.f : __expf(x - mn);
    const float corr = m[r] == -INFINITY ? 0.f : __expf(m[r] - mn);
    l[r] = l[r] * corr + warp_sum(e);
    m[r] = mn;
#pragma unroll
    for (int d = 0; d < DL; d++) acc[r][d] *= corr;
    s[r] = e;
  }
  // P.V over the warp's positions: position j's probabilities from lane j.
#pragma unroll UV
  for (int j = 0; j < n; j++) {
    const bf16 *vr = vw + j * RS + lane * DL;
    float v[DL];
    if constexpr (DL == 2) {
      const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(vr));
      v[0] = f.x;
      v[1] = f.y;
    } else {
      const uint2 u = *reinterpret_cast<const uint2 *>(vr);
      const float2 f0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
      const float2 f1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
      v[0] = f0.x;
      v[1] = f0.y;
      v[2] = f1.x;
      v[3] = f1.y;
    }
#pragma unroll
    for (int r = 0; r < REP; r++) {
      const float pr = __shfl_sync(0xffffffffu, s[r], j);
#pragma unroll
      for (int d = 0; d < DL; d++) acc[r][d] += pr * v[d];
    }
  }
}

// One warp's share of a chunk of keys and values in shared memory (rows
// RS = HD + 8 apart, from kw and vw): its n positions (a lane each; n may
// be 32 or more, or none) scored against the REP scaled query heads qs
// (REP, HD), folded into the warp's online softmax (m, l) and P.V sums
// (acc: this lane's HD / 32 dimensions of each head).
// COMPACT: loops over the pieces and positions not unrolled (the cluster
// kernels run this once a step, where the time follows the code's length).
template <int HD, int REP, bool COMPACT = false>
__device__ __forceinline__ void attend32(const bf16 *kw, const bf16 *vw, const float *qs, int n, float (&m)[REP],
                                         float (&l)[REP], float (&acc)[REP][HD / 32]) {
  constexpr int RS = HD + 8, PIECES = HD / 8;
  constexpr int UP = COMPACT ? 1 : PIECES;
  const int lane = threadIdx.x % 32;
  n = min(n, 32);
  float s[REP];
#pragma unroll
  for (int r = 0; r < REP; r++) s[r] = 0.f;
  if (lane < n) {
    const bf16 *kr = kw + lane * RS;
#pragma unroll UP
    for (int c = 0; c < PIECES; c++) {
      float k8[8];
      unpack8(*reinterpret_cast<const uint4 *>(kr + c * 8), k8);
#pragma unroll
      for (int r = 0; r < REP; r++)
#pragma unroll
        for (int i = 0; i < 8; i++) s[r] += qs[r * HD + c * 8 + i] * k8[i];
    }
  }
  attend_fold<HD, REP, COMPACT>(vw, s, n, m, l, acc);
}

// attend32 for n <= 16 positions with the scores on tensor cores: the 16
// keys from kw are A (a row each, 8 consecutive dimensions a thread as
// mma_proj feeds them), the query heads qb (REP <= 8, bf16, scaled) the
// columns of B; the scores go through sw (16 x 8 floats, the warp's own
// shared memory) to lane j = position j.
template <int HD, int REP>
__device__ __forceinline__ void attend16_tc(const bf16 *kw, const bf16 *vw, const bf16 *qb, float *sw, int n,
                                            float (&m)[REP], float (&l)[REP], float (&acc)[REP][HD / 32]) {
  static_assert(REP <= 8, "attend16_tc: a column of B per query head");
  constexpr int RS = HD + 8;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  n = min(n, 16);
  float s[REP];
#pragma unroll
  for (int r = 0; r < REP; r++) s[r] = 0.f;
  if (n > 0) {  // warp-uniform: mma.sync needs every lane
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    const bf16 *qr = qb + min(g, REP - 1) * HD + t * 8, *k0 = kw + g * RS + t * 8, *k1 = k0 + 8 * RS;
#pragma unroll
    for (int c = 0; c < HD / 32; c++) {
      const uint4 q = *reinterpret_cast<const uint4 *>(qr + c * 32);
      const uint4 ka = *reinterpret_cast<const uint4 *>(k0 + c * 32);
      const uint4 kb = *reinterpret_cast<const uint4 *>(k1 + c * 32);
      mma16816(d, ka.x, kb.x, ka.y, kb.y, q.x, q.y);
      mma16816(d, ka.z, kb.z, ka.w, kb.w, q.z, q.w);
    }
    // d: positions g and g + 8, heads 2t and 2t + 1.
    *reinterpret_cast<float2 *>(sw + g * 8 + 2 * t) = make_float2(d[0], d[1]);
    *reinterpret_cast<float2 *>(sw + (g + 8) * 8 + 2 * t) = make_float2(d[2], d[3]);
    __syncwarp();
    if (lane < n)
#pragma unroll
      for (int r = 0; r < REP; r++) s[r] = sw[lane * 8 + r];
    __syncwarp();
  }
  attend_fold<HD, REP, true>(vw, s, n, m, l, acc);
}

// N softmax states of REP heads folded into one (part: (N, REP, HD), a
// state's PS floats apart, its unnormalised P.V; ml: (N, REP, 2), its max
// and sum), by NT threads: out(r, d, o, sum, max) for each output, a
// thread each, o and sum relative to max (o / sum is the attention output;
// no positions at all: sum 0). A state with no positions (max -inf) adds
// nothing.
template <int HD, int N, int REP, int PS, int NT, class Out>
__device__ __forceinline__ void fold_states(const float *part, const float *ml, Out out) {
  for (int k = threadIdx.x; k < REP * HD; k += NT) {
    const int r = k / HD, d = k % HD;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < N; w++) mx = fmaxf(mx, ml[(w * REP + r) * 2]);
    float o = 0.f, sum = 0.f;
#pragma unroll
    for (int w = 0; w < N; w++) {
      const float mw = ml[(w * REP + r) * 2];
      if (mw != -INFINITY) {
        const float e = __expf(mw - mx);
        o += e * part[w * PS + r * HD + d];
        sum += e * ml[(w * REP + r) * 2 + 1];
      }
    }
    out(r, d, o, sum, mx);
  }
}

// The NW warps' softmax states meet (part: (NW, REP, HD), a warp's PS
// floats apart, wml: (NW, REP, 2) in shared memory): fold_states' out for
// each output of the REP heads.
template <int HD, int NW, int REP, int PS = REP * HD, class Out>
__device__ __forceinline__ void merge_warps(float *part, float *wml, const float (&m)[REP], const float (&l)[REP],
                                            const float (&acc)[REP][HD / 32], Out out) {
  constexpr int DL = HD / 32;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int r = 0; r < REP; r++) {
    if (lane == 0) {
      wml[(warp * REP + r) * 2] = m[r];
      wml[(warp * REP + r) * 2 + 1] = l[r];
    }
#pragma unroll
    for (int d = 0; d < DL; d++) part[warp * PS + r * HD + lane * DL + d] = acc[r][d];
  }
  __syncthreads();
  fold_states<HD, NW, REP, PS, 32 * NW>(part, wml, out);
}

// Attention of each row against its cache, built for latency (the
// five-launch step's; the persistent step runs `attn` above). Block
// (s0, g, b) of a grid (nsplit, kv, B) has NW warps and takes chunks of
// CH = 32 NW positions: chunk s0, s0 + S, ... of its row's sequence. Before
// it waits for the q/k/v kernel it copies its first chunk's keys and
// values (all but the new position, which that kernel writes) into shared
// memory with cp.async, so the copies overlap that kernel. Each warp then
// scores 32 positions (a lane each), keeps its own online softmax and P.V
// sums (a lane holds HD / 32 dimensions of every query head of the group),
// and the warps meet once at the end. REP query heads a kv head (a
// template argument: the heads' loops unroll without guards, so their
// shuffles and exponentials overlap). Shared memory: ks, vs, qs, part and
// wml below (src/nn/decode.rs's attnc_smem sizes it).
template <int HD, int NW, int REP> __device__ void attn_chunked(const Attn &a) {
  constexpr int CH = 32 * NW, RS = HD + 8, PIECES = HD / 8, DL = HD / 32;
  static_assert(DL == 2 || DL == 4, "head dims 64 and 128");
  extern __shared__ __align__(16) unsigned char dyn[];
  // Keys and values (CH, RS): rows padded by 16 bytes, so a quarter warp's
  // 16-byte loads of eight rows hit distinct banks.
  bf16 *ks = reinterpret_cast<bf16 *>(dyn), *vs = ks + CH * RS;
  float *qs = reinterpret_cast<float *>(vs + CH * RS); // (MAX_REP, HD), scaled
  float *part = qs + MAX_REP * HD;                     // (NW, MAX_REP, HD)
  float *wml = part + NW * MAX_REP * HD;               // (NW, MAX_REP, 2)
  const int s0 = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  constexpr int rep = REP;
  const int tid = threadIdx.x, warp = tid / 32;
  pdl_launch();
  // Positions and block tables were uploaded before the step's first kernel.
  const int len = a.pos[b] + 1;
  const int S = min(a.nsplit, (len + CH - 1) / CH);
  if (s0 >= S) return;
  const size_t row = (size_t)a.kv * HD;
  // Positions lo..hi-1 of the chunk that starts at c0 into shared memory.
  auto stage = [&](int c0, int lo, int hi) {
    for (int i = tid; i < (hi - lo) * PIECES; i += 32 * NW) {
      const int p = lo + i / PIECES, c = i % PIECES;
      const unsigned blk = a.table[(size_t)b * a.maxb + p / KV_BLOCK];
      const size_t off = (size_t)(blk * KV_BLOCK + p % KV_BLOCK) * row + (size_t)g * HD + c * 8;
      cp16(ks + (p - c0) * RS + c * 8, a.kc + off, true);
      cp16(vs + (p - c0) * RS + c * 8, a.vc + off, true);
    }
    cp_commit();
  };
  int c0 = s0 * CH;
  stage(c0, c0, min(c0 + CH, len - 1));
  pdl_wait();
  if (len - 1 < c0 + CH) stage(c0, len - 1, len);
  for (int k = tid; k < rep * HD; k += 32 * NW) qs[k] = a.q[((size_t)b * a.nh + g * rep) * HD + k] * a.scale;
  float m[REP], l[REP], acc[REP][DL];
#pragma unroll
  for (int r = 0; r < REP; r++) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int d = 0; d < DL; d++) acc[r][d] = 0.f;
  }
  for (;;) {
    cp_wait<0>();
    __syncthreads();
    attend32<HD, REP>(ks + warp * 32 * RS, vs + warp * 32 * RS, qs, len - (c0 + warp * 32), m, l, acc);
    c0 += S * CH;
    if (c0 >= len) break;
    __syncthreads(); // every warp is done with this chunk's keys and values
    stage(c0, c0, min(c0 + CH, len));
  }
  merge_warps<HD, NW, REP>(part, wml, m, l, acc, [&](int r, int d, float o, float sum, float mx) {
    const size_t h = (size_t)b * a.nh + g * rep + r;
    if (S == 1) {
      a.ao[h * HD + d] = __float2bfloat16(sum > 0.f ? o / sum : 0.f);
    } else {
      a.po[(h * a.nsplit + s0) * HD + d] = o;
      if (d == 0) {
        a.pml[(h * a.nsplit + s0) * 2] = mx;
        a.pml[(h * a.nsplit + s0) * 2 + 1] = sum;
      }
    }
  });
  if (S > 1) finish_splits<HD, 32 * NW>(a, g, b, S);
}

// Warps of the chunked attention: 8 (256 positions a chunk) at head dim 64,
// 4 (128) at 128.
#define ATTNC_WARPS(HD) ((HD) <= 64 ? 8 : 4)
// One kernel per head dim and query heads a kv head (each gets its own
// register budget): dec_attnc_<HD>_<REP>.
#define ATTNC(HD, REP)                                                                                  \
  extern "C" __global__ void __launch_bounds__(32 * ATTNC_WARPS(HD), 1) dec_attnc_##HD##_##REP(Attn a) { \
    attn_chunked<HD, ATTNC_WARPS(HD), REP>(a);                                                          \
  }
#define ATTNC_REPS(HD) ATTNC(HD, 1) ATTNC(HD, 2) ATTNC(HD, 3) ATTNC(HD, 4) ATTNC(HD, 5) ATTNC(HD, 6) ATTNC(HD, 7) ATTNC(HD, 8)
ATTNC_REPS(64)
ATTNC_REPS(128)

// x (B, H) f32 = embed rows of the tokens; the rows' argmax keys reset.
extern "C" __global__ void dec_embed(const unsigned *tok, const bf16 *embed, float *x, int H,
                                     unsigned long long *best) {
  const int b = blockIdx.x;
  pdl_launch();
  pdl_wait();
  if (threadIdx.x == 0) best[b] = 0ull;
  const bf16 *e = embed + (size_t)tok[b] * H;
  for (int k = threadIdx.x; k < H; k += blockDim.x) x[(size_t)b * H + k] = __bfloat162float(e[k]);
}

// dec_embed for a step whose inputs are in mapped host memory: hin's n
// values (tokens, positions, block tables) copied into the device's `tok`
// buffer, the persistent step's nctr counters zeroed, then the embedding
// (each block reading its token from hin). The kernels after it must not
// read the inputs before it ends (no programmatic launch).
// (Reads of host memory take a trip over the bus each: they are issued
// together, 16 bytes a thread, before any store.)
// With `seq` (null: none; a chain of one-row steps, Llama::decode_greedy;
// one block): the inputs are in half *seq & 1 of hin (halves of `stride` values, a
// multiple of 4: the host fills one half while a step may still read the
// other); a token of 0xffffffff stands for the step before's argmax (its
// key still in best); the step is counted in *seq, and the LM head's last
// block writes the key to the same half of its host buffer.
extern "C" __global__ void dec_embed_io(unsigned *__restrict__ tok, const bf16 *embed, float *x, int H,
                                        unsigned long long *best, const unsigned *__restrict__ hin, int n,
                                        int stride, unsigned *ctr, int nctr, unsigned *seq) {
  const int b = blockIdx.x, tid = b * blockDim.x + threadIdx.x, nt = gridDim.x * blockDim.x;
  pdl_launch();
  pdl_wait();
  __shared__ unsigned t, s;
  if (seq) {
    if (threadIdx.x == 0) s = *seq;
    __syncthreads();
    hin += (size_t)(s & 1u) * stride;
  }
  if (threadIdx.x == 0) {
    const unsigned v = hin[b];
    t = seq && v == 0xffffffffu ? 0xffffffffu - (unsigned)best[b] : v;
  }
  // n / 4 16-byte pieces (host_in and tok are 16-byte aligned), then the
  // rest one by one.
  const int n4 = n / 4;
  for (int i = tid; i < n4; i += nt) reinterpret_cast<uint4 *>(tok)[i] = reinterpret_cast<const uint4 *>(hin)[i];
  if (tid < n - 4 * n4) tok[4 * n4 + tid] = hin[4 * n4 + tid];
  if (b == 0)
    for (int i = threadIdx.x; i < nctr; i += blockDim.x) ctr[i] = 0u;
  __syncthreads();  // (best read, the inputs copied)
  if (threadIdx.x == 0) {
    best[b] = 0ull;
    if (seq) {
      tok[b] = t;
      *seq = s + 1u;
    }
  }
  const bf16 *e = embed + (size_t)t * H;
  for (int k = threadIdx.x; k < H; k += blockDim.x) x[(size_t)b * H + k] = __bfloat162float(e[k]);
}

// The largest logit of each row and its index (the first on ties, as
// torch.argmax) as an argmax_key (for the LM head on CUDA cores; the
// tensor-core head keeps the key itself).
extern "C" __global__ void dec_argmax(const float *logits, unsigned long long *out, int V) {
  const int b = blockIdx.x;
  pdl_launch();
  pdl_wait();
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
    out[b] = argmax_key(l[at], (unsigned)at);
  }
}

// ---- The whole step as one persistent kernel (small batches) ----
//
// One block per SM, TILE threads, looping over the step's phases (embed,
// then per layer qkv, attn, o, gateup, down, then the head) with a grid
// barrier between phases instead of a kernel boundary. A block loads the
// weights of its first tile of a projection before it waits at the barrier
// (weights never change), so the barrier's latency hides that of the
// loads. The grid must be co-resident (a cooperative launch) and
// `bar` zero at the start.

struct MegaLayer {
  const bf16 *ln1, *q, *k, *v, *o, *ln2, *gate, *up, *down;
  bf16 *kc, *vc;
};

struct Mega {
  Gemv g;    // x, pos, table, inv_freq, best, B, nh, kv, hd, maxb, eps
  Attn at;   // q, pos, table, po, pml, ao, count, nh, kv, maxb, nsplit, scale
  const MegaLayer *layers;
  const unsigned *tok;
  const bf16 *embed, *norm, *head;
  float *logits;
  bf16 *act;
  unsigned *bar;
  int L, H, I, V;
  // Profiling (PIPE_DECODE_MEGA_MASK; wrong results when not all set):
  // the phases that run (1 qkv, 2 attn, 4 o, 8 gateup, 16 down, 32 head;
  // a skipped phase still has its barrier).
  int mask;
};

// Every block arrives, then waits for all gridDim.x of them: arrivals
// counted in *bar, `epoch` (the same in every thread) the barriers passed.
// The block's writes are ordered before thread 0's release by the
// __syncthreads; the acquire orders the block's later reads after every
// block's release. (Fences around a plain atomicAdd instead: 1.23 against
// 1.17 ms a SmolLM2 step; a __nanosleep in the poll: no better.)
// The block's writes done, its thread 0 adds one to the counter c
// (release: what the block wrote is seen by whoever acquires the count).
__device__ __forceinline__ void block_arrive(unsigned *c) {
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c) : "memory");
}

// Until the counter c reaches target: thread 0 polls it with acquire loads
// (sleeping `sleep` ns between polls, 0: not), then the block goes on.
__device__ __forceinline__ void block_await(const unsigned *c, unsigned target, int sleep = 0) {
  if (threadIdx.x == 0) {
    unsigned v;
    for (;;) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
      if (v >= target) break;
      if (sleep) __nanosleep(sleep);
    }
  }
  __syncthreads();
}

__device__ __forceinline__ void grid_sync(unsigned *bar, unsigned &epoch) {
  epoch += gridDim.x;
  block_arrive(bar);
  block_await(bar, epoch);
}

// A projection phase of the step (or, when the profiling mask skips it,
// just its barrier).
template <int IN, int OUT, class Sync> __device__ void phase(const Mega &m, int bit, const Gemv &a, Sync sync) {
  if (m.mask & bit)
    mma_proj<IN, OUT, 8>(a, blockIdx.x, gridDim.x, 0, sync);
  else
    sync();
}

template <int HD> __device__ void mega(const Mega &m) {
  unsigned epoch = 0;
  const int B = m.g.B, H = m.H;
  auto sync = [&] { grid_sync(m.bar, epoch); };
  // Embed (the step's inputs were uploaded before the launch).
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < B * H; i += gridDim.x * blockDim.x)
    const_cast<float *>(m.g.x)[i] = __bfloat162float(m.embed[(size_t)m.tok[i / H] * H + i % H]);
  if (blockIdx.x == 0 && threadIdx.x < B) m.g.best[threadIdx.x] = 0ull;
  const int nh = m.g.nh, kv = m.g.kv;
  for (int l = 0; l < m.L; l++) {
    const MegaLayer &w = m.layers[l];
    Gemv a = m.g;
    a.norm = w.ln1;
    a.w0 = w.q;
    a.w1 = w.k;
    a.w2 = w.v;
    a.out = const_cast<float *>(m.at.q);
    a.kc = w.kc;
    a.vc = w.vc;
    a.K = H;
    a.N = (nh + 2 * kv) * HD / 2;
    phase<IN_NORM, OUT_QKV>(m, 1, a, sync);
    Attn at = m.at;
    at.kc = w.kc;
    at.vc = w.vc;
    sync();
    const int items = m.mask & 2 ? at.nsplit * kv * B : 0;
    for (int it = blockIdx.x; it < items; it += gridDim.x) {
      attn<HD>(at, it % at.nsplit, (it / at.nsplit) % kv, it / (at.nsplit * kv), at.nsplit);
      __syncthreads();
    }
    a = m.g;
    a.xin = at.ao;
    a.out = const_cast<float *>(m.g.x);
    a.w0 = w.o;
    a.K = nh * HD;
    a.N = H;
    phase<IN_PLAIN, OUT_RESID>(m, 4, a, sync);
    a = m.g;
    a.norm = w.ln2;
    a.w0 = w.gate;
    a.w1 = w.up;
    a.outb = m.act;
    a.K = H;
    a.N = m.I;
    phase<IN_NORM, OUT_SWIGLU>(m, 8, a, sync);
    a = m.g;
    a.xin = m.act;
    a.out = const_cast<float *>(m.g.x);
    a.w0 = w.down;
    a.K = m.I;
    a.N = H;
    phase<IN_PLAIN, OUT_RESID>(m, 16, a, sync);
  }
  Gemv a = m.g;
  a.norm = m.norm;
  a.w0 = m.head;
  a.out = m.logits;
  a.K = H;
  a.N = m.V;
  phase<IN_NORM, OUT_LOGITS>(m, 32, a, sync);
}

extern "C" __global__ void __launch_bounds__(TILE, 1) dec_mega_64(Mega m) { mega<64>(m); }
extern "C" __global__ void __launch_bounds__(TILE, 1) dec_mega_128(Mega m) { mega<128>(m); }

// ---- The whole step as one persistent kernel, weights streamed ----
//
// `dec_stream_<HD>_<BT>` (src/nn/decode.rs's `PIPE_DECODE_STREAM`): one block
// of SNT threads per SM, BT rows (1, 2, 4 or 8). Every block owns a fixed
// share of every layer's weights: rotary pairs of q/k/v rows; for blocks
// 0..nh-1 the attention of query head j and its rows of the transposed
// output projection; for the others a range of MLP units (a unit: a gate
// row, an up row and a row of the transposed down projection). Those rows,
// then the block's rows of the LM head, form one fixed sequence of chunks of
// `ch` rows that streams through a ring of NSLOT shared-memory slots with
// bulk copies (TMA), NSLOT - 1 chunks ahead of the one in use: the weights do not
// depend on the step's values, so their loads run ahead across phases and
// barriers, and a phase's work starts from shared memory. Per layer:
//   A (every block): RMSNorm of the residual (each block does the rows
//      itself), its q/k/v pairs + rotary + KV write; then a release add on
//      the q/k/v counter;
//   B (blocks 0..nh-1): wait for every block's q/k/v (the keys and values
//      of older positions, which no block writes in this step, were loaded
//      into registers before), attention of head j for every row, then
//      its share of the output projection (attention output times its 64 or
//      128 rows of o^T) summed into the next residual with f32 reductions;
//   grid barrier;
//   C (the other blocks): RMSNorm, gate/up + SwiGLU, then down^T rows
//      times the SwiGLU values summed into the next residual;
//   grid barrier.
// Residuals rotate over three buffers (input, after attention, after the
// MLP): a buffer is zeroed two phases before it is summed into, and each
// block adds its slice of the previous residual into the new one, so no
// block waits for a copy. Values written during the kernel are read with
// ld.global.cg (L2), never through L1. The sums' order varies: the last
// bits of a step's logits vary from run to run.

#define SNT 256
#define SNW (SNT / 32)
#define NSLOT 8
// Rows a slot holds at most (src/nn/decode.rs's stream_ch caps `ch`).
#define SCH_MAX 192

struct StreamLayer {
  const bf16 *ln1, *q, *k, *v, *ot, *ln2, *gate, *up, *downt;
  bf16 *kc, *vc;
};

struct Stream {
  const StreamLayer *layers;
  const unsigned *tok, *pos, *table;
  const bf16 *embed, *norm, *head;
  const float *inv_freq;
  float *x;                 // (3, BT, H): the residual buffers
  float *q;                 // (BT, nh, hd)
  float *logits;            // (BT, V)
  unsigned long long *best; // (BT) argmax keys
  unsigned *bar;            // [0] grid barrier, [1] q/k/v done (zero at the start)
  int L, H, I, V, nh, kv, maxb;
  int ch;                   // weight rows a ring slot holds (>= 3)
  float eps, scale;
  // Profiling (PIPE_DECODE_STREAM_MASK; wrong results unless all set): the
  // work that runs (1 q/k/v, 2 attention, 4 o, 8 MLP, 16 head, 32 norms and
  // residual slices); chunks, waits and barriers always run.
  int mask;
};

// Block blockIdx.x's share of the step.
struct Plan {
  int p0, np, nq;  // rotary pairs p0.. (np), in nq chunks of pp
  int head;        // attention head, or -1
  int u0, nu;      // MLP units u0.. (nu), in chunks of up
  int nx;          // chunks of a layer after the q/k/v ones
  int v0, nv;      // LM head rows
  int per, total;  // chunks a layer, chunks of the step
  int pp, up;
};

__device__ __forceinline__ int share(int n, int j, int parts) { return (int)((long long)n * j / parts); }

template <int HD> __device__ Plan plan(const Stream &s) {
  Plan p;
  const int G = gridDim.x, j = blockIdx.x;
  const int P = (s.nh + 2 * s.kv) * HD / 2;
  p.pp = s.ch / 2;
  p.up = s.ch / 3;
  p.p0 = share(P, j, G);
  p.np = share(P, j + 1, G) - p.p0;
  p.nq = (p.np + p.pp - 1) / p.pp;
  if (j < s.nh) {
    p.head = j;
    p.u0 = p.nu = 0;
    p.nx = (HD + s.ch - 1) / s.ch;
  } else {
    const int M = G - s.nh, m = j - s.nh;
    p.head = -1;
    p.u0 = share(s.I, m, M);
    p.nu = share(s.I, m + 1, M) - p.u0;
    p.nx = (p.nu + p.up - 1) / p.up;
  }
  p.v0 = share(s.V, j, G);
  p.nv = share(s.V, j + 1, G) - p.v0;
  p.per = p.nq + p.nx;
  p.total = s.L * p.per + (p.nv + s.ch - 1) / s.ch;
  return p;
}

// Row r of the block's chunk c (null past the chunk's rows or the step).
template <int HD>
__device__ const bf16 *chunk_row(const Stream &s, const StreamLayer *layers, const Plan &p, int c, int r) {
  if (c >= p.total || r >= s.ch) return nullptr;
  if (c >= s.L * p.per) {
    const int i = (c - s.L * p.per) * s.ch + r;
    return i < p.nv ? s.head + (size_t)(p.v0 + i) * s.H : nullptr;
  }
  const StreamLayer &w = layers[c / p.per];
  int k = c % p.per;
  if (k < p.nq) {
    const int pr = k * p.pp + r / 2;
    if (r >= 2 * p.pp || pr >= p.np) return nullptr;
    return qkv_row(w.q, w.k, w.v, s.nh, s.kv, HD, s.H, p.p0 + pr, r & 1);
  }
  k -= p.nq;
  if (p.head >= 0) {
    const int d = k * s.ch + r;
    return d < HD ? w.ot + (size_t)(p.head * HD + d) * s.H : nullptr;
  }
  const int uu = k * p.up + r / 3;
  if (r >= 3 * p.up || uu >= p.nu) return nullptr;
  const int u = p.u0 + uu, kind = r % 3;
  return (kind == 0 ? w.gate : kind == 1 ? w.up : w.downt) + (size_t)u * s.H;
}

// A slot's mbarrier (shared memory): one arrival (the expected bytes) a
// phase, completed when the bulk copies of the chunk have landed.
__device__ __forceinline__ void mbar_init(unsigned long long *b) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(saddr(b)) : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned long long *b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(saddr(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long *b, unsigned parity) {
  asm volatile("{\n.reg .pred P1;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n@P1 bra DONE;\n"
               "bra WAIT;\nDONE:\n}" ::"r"(saddr(b)),
               "r"(parity)
               : "memory");
}
// `bytes` global -> shared by the TMA engine, counted on mbarrier `b`.
__device__ __forceinline__ void bulk_copy(void *dst, const void *src, unsigned bytes, unsigned long long *b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   saddr(dst)),
               "l"(src), "r"(bytes), "r"(saddr(b))
               : "memory");
}

// The block's chunk c into its ring slot: warp 0 sets the slot's expected
// bytes and issues a bulk copy a row (the TMA engine: per-thread 16-byte
// cp.async filled a ring at ~6 GB/s an SM). Nothing past the step's chunks.
template <int HD>
__device__ void issue(const Stream &s, const StreamLayer *layers, const Plan &p, bf16 *ring,
                      unsigned long long *bars, int c) {
  if (c >= p.total || threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  bf16 *slot = ring + (size_t)(c % NSLOT) * s.ch * s.H;
  unsigned long long *bar = bars + c % NSLOT;
  const bf16 *src[SCH_MAX / 32];
  unsigned n = 0;
#pragma unroll
  for (int j = 0; j < SCH_MAX / 32; j++) {
    const int r = lane + 32 * j;
    src[j] = r < s.ch ? chunk_row<HD>(s, layers, p, c, r) : nullptr;
    n += src[j] != nullptr;
  }
  n = __reduce_add_sync(0xffffffffu, n);
  // (The slot's last readers passed a __syncthreads before this.)
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  if (lane == 0) mbar_expect(bar, n * s.H * 2);
  __syncwarp();
#pragma unroll
  for (int j = 0; j < SCH_MAX / 32; j++)
    if (src[j]) bulk_copy(slot + (size_t)(lane + 32 * j) * s.H, src[j], s.H * 2, bar);
}

// The next chunk of the block's sequence (`c`, advanced), once its copies
// have landed; the chunk NSLOT - 1 on goes into the slot the previous one
// used (every thread is past it: the barrier).
template <int HD>
__device__ const bf16 *take(const Stream &s, const StreamLayer *layers, const Plan &p, bf16 *ring,
                            unsigned long long *bars, int &c) {
  mbar_wait(bars + c % NSLOT, (c / NSLOT) & 1);
  __syncthreads();
  issue<HD>(s, layers, p, ring, bars, c + NSLOT - 1);
  const bf16 *w = ring + (size_t)(c % NSLOT) * s.ch * s.H;
  c++;
  return w;
}

// The warp's dot products of R weight rows (shared memory) with the BT
// staged rows xs (bf16, (BT, H)); every lane gets the sums.
template <int BT, int R>
__device__ __forceinline__ void dots(const bf16 *const *rows, const bf16 *xs, int H, float (&out)[R][BT]) {
  const int lane = threadIdx.x % 32;
  float acc[R][BT];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int b = 0; b < BT; b++) acc[r][b] = 0.f;
  for (int c = lane; c < H / 8; c += 32) {
    float w[R][8];
#pragma unroll
    for (int r = 0; r < R; r++) unpack8(*reinterpret_cast<const uint4 *>(rows[r] + c * 8), w[r]);
#pragma unroll
    for (int b = 0; b < BT; b++) {
      float xv[8];
      unpack8(*reinterpret_cast<const uint4 *>(xs + (size_t)b * H + c * 8), xv);
#pragma unroll
      for (int r = 0; r < R; r++)
#pragma unroll
        for (int i = 0; i < 8; i++) acc[r][b] = fmaf(w[r][i], xv[i], acc[r][b]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int b = 0; b < BT; b++) out[r][b] = warp_sum(acc[r][b]);
}

// xs = RMSNorm(x) * g of the BT rows in bf16 (stage_rows).
template <int BT> __device__ void norm_rows(const Stream &s, const float *x, const bf16 *g, bf16 *xs) {
  Gemv a{};
  a.x = x;
  a.norm = g;
  a.K = s.H;
  a.eps = s.eps;
  stage_rows<IN_NORM>(a, xs, s.H, 0, BT, BT);
}

// The block's slice of the (BT, H) residual: `zero` cleared, `from` added
// into `into`.
template <int BT> __device__ void residual_slice(const Stream &s, float *zero, const float *from, float *into) {
  const int n4 = BT * s.H / 4, lo = share(n4, blockIdx.x, gridDim.x), hi = share(n4, blockIdx.x + 1, gridDim.x);
  for (int i = lo + threadIdx.x; i < hi; i += SNT) {
    reinterpret_cast<float4 *>(zero)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 v = __ldcg(reinterpret_cast<const float4 *>(from) + i);
    red_add4(into + (size_t)i * 4, v.x, v.y, v.z, v.w);
  }
}

// Keys and values of older positions that a warp's first round reads
// (positions warp * 32 + lane, all in one KV block), loaded before the
// wait: no block writes them in this step. Values only at head dim 64 (a
// lane's two dimensions of 32 positions: 32 registers).
template <int HD> struct AttPre {
  uint4 k[HD / 8];
  unsigned v[HD == 64 ? 32 : 1];
};

template <int HD>
__device__ void att_load(const Stream &s, const StreamLayer &w, int b, int g, int len, AttPre<HD> &pre) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, base = warp * 32;
  if (base >= len - 1) return;
  const size_t row = (size_t)s.kv * HD;
  const unsigned blk = s.table[(size_t)b * s.maxb + warp];
  if (base + lane < len - 1) {
    const uint4 *kr = reinterpret_cast<const uint4 *>(w.kc + (size_t)(blk * KV_BLOCK + lane) * row + g * HD);
#pragma unroll
    for (int c = 0; c < HD / 8; c++) pre.k[c] = kr[c];
  }
  if constexpr (HD == 64) {
#pragma unroll
    for (int i = 0; i < 32; i++)
      if (base + i < len - 1)
        pre.v[i] = *reinterpret_cast<const unsigned *>(w.vc + (size_t)(blk * KV_BLOCK + i) * row + g * HD + lane * 2);
  }
}

// Attention of row b, query head h over positions 0..len-1 into out (HD
// f32, shared): warps take 32 positions a round (a lane each), each with
// its own online softmax and P.V sums (a lane holds HD / 32 dimensions),
// meeting once at the end. `pre` holds the first round's older positions.
template <int HD>
__device__ void att_run(const Stream &s, const StreamLayer &w, int b, int h, int len, const AttPre<HD> &pre,
                        float *qs, float *wsum, float *out) {
  constexpr int DL = HD / 32;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = h / (s.nh / s.kv);
  const size_t row = (size_t)s.kv * HD;
  for (int d = tid; d < HD; d += SNT) qs[d] = __ldcg(s.q + ((size_t)b * s.nh + h) * HD + d) * s.scale;
  __syncthreads();
  float m = -INFINITY, l = 0.f, acc[DL];
#pragma unroll
  for (int d = 0; d < DL; d++) acc[d] = 0.f;
  for (int r0 = 0; r0 < len; r0 += SNW * 32) {
    const int base = r0 + warp * 32;
    if (base >= len) break;  // warp-uniform
    const int p = base + lane;
    const unsigned blk = s.table[(size_t)b * s.maxb + base / KV_BLOCK];
    float sc = -INFINITY;
    if (p < len) {
      uint4 kk[HD / 8];
      const uint4 *kr = reinterpret_cast<const uint4 *>(w.kc + (size_t)(blk * KV_BLOCK + lane) * row + g * HD);
      if (r0 == 0 && p < len - 1) {
#pragma unroll
        for (int c = 0; c < HD / 8; c++) kk[c] = pre.k[c];
      } else {
#pragma unroll
        for (int c = 0; c < HD / 8; c++) kk[c] = __ldcg(kr + c);
      }
      float d = 0.f;
#pragma unroll
      for (int c = 0; c < HD / 8; c++) {
        float k8[8];
        unpack8(kk[c], k8);
#pragma unroll
        for (int i = 0; i < 8; i++) d = fmaf(qs[c * 8 + i], k8[i], d);
      }
      sc = d;
    }
    float mx = sc;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float mn = fmaxf(m, mx);
    const float e = p < len ? __expf(sc - mn) : 0.f;
    const float corr = m == -INFINITY ? 0.f : __expf(m - mn);
    l = l * corr + warp_sum(e);
    m = mn;
#pragma unroll
    for (int d = 0; d < DL; d++) acc[d] *= corr;
    const int n = min(32, len - base);
#pragma unroll
    for (int i = 0; i < 32; i++) {
      if (i < n) {
        const float pr = __shfl_sync(0xffffffffu, e, i);
        const bf16 *vr = w.vc + (size_t)(blk * KV_BLOCK + i) * row + g * HD + lane * DL;
        if constexpr (DL == 2) {
          unsigned u;
          if (r0 == 0 && base + i < len - 1)
            u = pre.v[i];
          else
            u = __ldcg(reinterpret_cast<const unsigned *>(vr));
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u));
          acc[0] = fmaf(pr, f.x, acc[0]);
          acc[1] = fmaf(pr, f.y, acc[1]);
        } else {
          const uint2 u = __ldcg(reinterpret_cast<const uint2 *>(vr));
          const float2 f0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
          const float2 f1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
          acc[0] = fmaf(pr, f0.x, acc[0]);
          acc[1] = fmaf(pr, f0.y, acc[1]);
          acc[2] = fmaf(pr, f1.x, acc[2]);
          acc[3] = fmaf(pr, f1.y, acc[3]);
        }
      }
    }
  }
  // wsum: (SNW, HD + 2): a warp's sums, then its max and total.
  float *mine = wsum + warp * (HD + 2);
#pragma unroll
  for (int d = 0; d < DL; d++) mine[lane * DL + d] = acc[d];
  if (lane == 0) {
    mine[HD] = m;
    mine[HD + 1] = l;
  }
  __syncthreads();
  for (int d = tid; d < HD; d += SNT) {
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < SNW; k++) mx = fmaxf(mx, wsum[k * (HD + 2) + HD]);
    float o = 0.f, sum = 0.f;
#pragma unroll
    for (int k = 0; k < SNW; k++) {
      const float mw = wsum[k * (HD + 2) + HD];
      if (mw != -INFINITY) {
        const float e = __expf(mw - mx);
        o += e * wsum[k * (HD + 2) + d];
        sum += e * wsum[k * (HD + 2) + HD + 1];
      }
    }
    // As the other paths, the attention output is rounded to bf16.
    out[d] = __bfloat162float(__float2bfloat16(sum > 0.f ? o / sum : 0.f));
  }
  __syncthreads();
}

// acc[b][0..8) += vals[u * us + b * bs] * rows[u][t * 8 ..] over n rows of
// a chunk, `stride` apart (thread t < H / 8).
template <int BT>
__device__ __forceinline__ void axpy_rows(const bf16 *rows, int stride, int n, int H, const float *vals, int us,
                                          int bs, float (&acc)[BT][8]) {
  const int t = threadIdx.x;
  if (t >= H / 8) return;
  for (int u = 0; u < n; u++) {
    float w[8];
    unpack8(*reinterpret_cast<const uint4 *>(rows + (size_t)u * stride + t * 8), w);
#pragma unroll
    for (int b = 0; b < BT; b++) {
      const float a = vals[u * us + b * bs];
#pragma unroll
      for (int i = 0; i < 8; i++) acc[b][i] = fmaf(a, w[i], acc[b][i]);
    }
  }
}

template <int BT> __device__ __forceinline__ void add_rows(float *x, int H, const float (&acc)[BT][8]) {
  const int t = threadIdx.x;
  if (t >= H / 8) return;
#pragma unroll
  for (int b = 0; b < BT; b++) {
    float *p = x + (size_t)b * H + t * 8;
    red_add4(p, acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
    red_add4(p + 4, acc[b][4], acc[b][5], acc[b][6], acc[b][7]);
  }
}

template <int BT> __device__ __forceinline__ void zero_acc(float (&acc)[BT][8]) {
#pragma unroll
  for (int b = 0; b < BT; b++)
#pragma unroll
    for (int i = 0; i < 8; i++) acc[b][i] = 0.f;
}

template <int HD, int BT> __device__ void stream_step(const Stream &s) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int H = s.H, G = gridDim.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  bf16 *ring = reinterpret_cast<bf16 *>(smem);
  bf16 *xs = ring + (size_t)NSLOT * s.ch * H;          // (BT, H)
  float *act = reinterpret_cast<float *>(xs + BT * H); // (SCH_MAX / 3, BT) SwiGLU values
  float *att = act + SCH_MAX / 3 * BT;                 // (BT, HD)
  float *qs = att + BT * HD;                           // (HD)
  float *wsum = qs + HD;                               // (SNW, HD + 2)
  // The layer table, copied once (the ring's row addresses come from it).
  StreamLayer *sl = reinterpret_cast<StreamLayer *>(wsum + ((SNW * (HD + 2) + 3) / 4) * 4);
  for (int i = tid; i < s.L * (int)(sizeof(StreamLayer) / 8); i += SNT)
    reinterpret_cast<unsigned long long *>(sl)[i] = reinterpret_cast<const unsigned long long *>(s.layers)[i];
  __shared__ __align__(8) unsigned long long bars[NSLOT];
  if (tid < NSLOT) mbar_init(bars + tid);
  if (tid == 0) asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  __shared__ unsigned spos[BT], sblk[BT];
  __shared__ unsigned long long sbest[BT];
  const Plan p = plan<HD>(s);
  // The first NSLOT - 1 chunks (the step's inputs are not needed for them).
  for (int c = 0; c < NSLOT - 1; c++) issue<HD>(s, sl, p, ring, bars, c);
  int c = 0;
  if (tid < BT) {
    spos[tid] = s.pos[tid];
    sblk[tid] = s.table[(size_t)tid * s.maxb + spos[tid] / KV_BLOCK];
    sbest[tid] = 0ull;
  }
  const size_t BH = (size_t)BT * H;
  auto xb = [&](int i) { return s.x + (size_t)(i % 3) * BH; };
  // Embed into buffer 0; buffer 1 (the first layer's sum after attention) zeroed.
  for (size_t i = (size_t)blockIdx.x * SNT + tid; i < BH; i += (size_t)G * SNT) {
    s.x[i] = __bfloat162float(s.embed[(size_t)s.tok[i / H] * H + i % H]);
    s.x[BH + i] = 0.f;
  }
  if (blockIdx.x == 0 && tid < BT) s.best[tid] = 0ull;
  unsigned epoch = 0;
  grid_sync(s.bar, epoch);
  Gemv e{};  // the q/k/v epilogue's arguments
  e.pos = s.pos;
  e.table = s.table;
  e.inv_freq = s.inv_freq;
  e.out = s.q;
  e.nh = s.nh;
  e.kv = s.kv;
  e.hd = HD;
  e.maxb = s.maxb;
  for (int l = 0; l < s.L; l++) {
    const StreamLayer &w = s.layers[l];
    float *xin = xb(2 * l), *xmid = xb(2 * l + 1), *xout = xb(2 * l + 2);
    // A: q/k/v. Attention blocks first load the older keys and values of
    // row 0 (they are not written in this step).
    AttPre<HD> pre;
    const int g = p.head >= 0 ? p.head / (s.nh / s.kv) : 0;
    if (p.head >= 0 && (s.mask & 2)) att_load<HD>(s, w, 0, g, spos[0] + 1, pre);
    if (s.mask & 32) {
      norm_rows<BT>(s, xin, w.ln1, xs);
      residual_slice<BT>(s, xout, xin, xmid);
    }
    e.kc = w.kc;
    e.vc = w.vc;
    for (int k = 0; k < p.nq; k++) {
      const bf16 *wc = take<HD>(s, sl, p, ring, bars, c);  // (its barrier also orders xs)
      const int n = s.mask & 1 ? min(p.pp, p.np - k * p.pp) : 0;
      for (int it = warp; it < n; it += SNW) {
        const bf16 *rows[2] = {wc + (size_t)(2 * it) * H, wc + (size_t)(2 * it + 1) * H};
        float v[2][BT];
        dots<BT, 2>(rows, xs, H, v);
        float v0 = 0.f, v1 = 0.f;
#pragma unroll
        for (int b = 0; b < BT; b++)
          if (lane == b) {
            v0 = v[0][b];
            v1 = v[1][b];
          }
        if (lane < BT) epilogue<OUT_QKV>(e, p.p0 + k * p.pp + it, lane, v0, v1, spos[lane], sblk[lane]);
      }
    }
    block_arrive(s.bar + 1);
    if (p.head >= 0) {
      // B: attention of head p.head for every row, then its share of the
      // output projection.
      block_await(s.bar + 1, (unsigned)(G * (l + 1)));
      for (int b = 0; b < (s.mask & 2 ? BT : 0); b++) {
        const int len = spos[b] + 1;
        if (b > 0) att_load<HD>(s, w, b, g, len, pre);
        att_run<HD>(s, w, b, p.head, len, pre, qs, wsum, att + b * HD);
      }
      float acc[BT][8];
      zero_acc<BT>(acc);
      for (int k = 0; k < p.nx; k++) {
        const bf16 *wc = take<HD>(s, sl, p, ring, bars, c);
        const int d0 = k * s.ch, n = s.mask & 4 ? min(s.ch, HD - d0) : 0;
        // o^T row d's value for row b: att[b * HD + d].
        axpy_rows<BT>(wc, H, n, H, att + d0, 1, HD, acc);
      }
      add_rows<BT>(xmid, H, acc);
    }
    grid_sync(s.bar, epoch);
    // C: the MLP (blocks without a head); every block's residual slice.
    if (s.mask & 32) residual_slice<BT>(s, xin, xmid, xout);
    if (p.head < 0) {
      if (s.mask & 32) norm_rows<BT>(s, xmid, w.ln2, xs);
      float acc[BT][8];
      zero_acc<BT>(acc);
      for (int k = 0; k < p.nx; k++) {
        const bf16 *wc = take<HD>(s, sl, p, ring, bars, c);
        const int n = s.mask & 8 ? min(p.up, p.nu - k * p.up) : 0;
        for (int it = warp; it < n; it += SNW) {
          const bf16 *rows[2] = {wc + (size_t)(3 * it) * H, wc + (size_t)(3 * it + 1) * H};
          float v[2][BT];
          dots<BT, 2>(rows, xs, H, v);
          if (lane < BT) {
            float g0 = 0.f, u0 = 0.f;
#pragma unroll
            for (int b = 0; b < BT; b++)
              if (lane == b) {
                g0 = v[0][b];
                u0 = v[1][b];
              }
            // Rounded to bf16 as the other paths store SwiGLU's output.
            act[it * BT + lane] = __bfloat162float(__float2bfloat16(g0 / (1.f + __expf(-g0)) * u0));
          }
        }
        __syncthreads();
        axpy_rows<BT>(wc + 2 * (size_t)H, 3 * H, n, H, act, BT, 1, acc);
      }
      add_rows<BT>(xout, H, acc);
    }
    grid_sync(s.bar, epoch);
  }
  // The final norm and the block's rows of the LM head, keeping each row's
  // argmax (lane b of each warp for row b).
  const float *xf = xb(2 * s.L);
  norm_rows<BT>(s, xf, s.norm, xs);
  unsigned long long best = 0ull;
  const int nhc = (p.nv + s.ch - 1) / s.ch;
  for (int k = 0; k < nhc; k++) {
    const bf16 *wc = take<HD>(s, sl, p, ring, bars, c);
    const int n = s.mask & 16 ? min(s.ch, p.nv - k * s.ch) : 0;
    for (int it = warp; it < n; it += SNW) {
      const bf16 *rows[1] = {wc + (size_t)it * H};
      float v[1][BT];
      dots<BT, 1>(rows, xs, H, v);
      const int vi = p.v0 + k * s.ch + it;
#pragma unroll
      for (int b = 0; b < BT; b++)
        if (lane == b) {
          s.logits[(size_t)b * s.V + vi] = v[0][b];
          best = max(best, argmax_key(v[0][b], vi));
        }
    }
  }
  if (lane < BT) atomicMax(&sbest[lane], best);
  __syncthreads();
  if (tid < BT) atomicMax(s.best + tid, sbest[tid]);
}

#define STREAM(HD, BT)                                                                               \
  extern "C" __global__ void __launch_bounds__(SNT, 1) dec_stream_##HD##_##BT(Stream s) { stream_step<HD, BT>(s); }
STREAM(64, 1)
STREAM(64, 2)
STREAM(64, 4)
STREAM(64, 8)
STREAM(128, 1)
STREAM(128, 2)
STREAM(128, 4)
STREAM(128, 8)

// ---- Two cluster kernels a layer (small batches) ----
//
// A decode step of up to LAY_BMAX rows as two launches a layer instead of
// five, each a grid of thread-block clusters (sm_90) whose blocks share
// their results through distributed shared memory instead of a launch:
//   dec_la: a cluster of LAY_C blocks per (kv head g, row b): RMSNorm, the
//           block's share of g's q/k/v rows (rotary; k and v into the
//           paged pool) pushed into the cluster's blocks, attention split
//           over the blocks by position ranges and combined, and each
//           block's rows of the output projection over g's columns;
//   dec_lb: gate/up, SwiGLU and down, 16 units a block, the down
//           projection's shares summed over each cluster.
// Their weight products and attention scores run on tensor cores (the
// row broadcast over B's columns). At one row, dec_lp_* runs both kinds
// of blocks for all layers in one persistent launch (below).
// Neither adds into the residual with atomics: a kernel reads its input
// as a base row plus partial rows (`pin`, summed in a fixed order: the
// kv heads' output projections, or the MLP clusters' down projections),
// writes that sum as the next base (xout, one block) and its own partial
// rows (pout); the LM head sums the last ones (Gemv::parts). So a step's
// sums are the same from run to run, but for the persistent step's MLP,
// which adds its clusters' rows into one with atomics by default
// (LayP::acc).
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

#define LAY_C 8
// Lay::tm's slots: LAY_T's 64, then lp_mark's 3.
#define LAY_TM 64
#define LAY_NW 8
#define LAY_BMAX 2
#define LAY_UB 16
static_assert(LAY_UB == 2 * LAY_NW, "dec_lb: two units a warp");

struct Lay {
  const float *xin;     // (B, H) base of the residual
  const float *pin;     // (np_in, B, H) partial rows to add to it
  float *xout;          // (B, H) base + partials (the next kernel's base)
  float *pout;          // (np_out, B, H) this kernel's partial rows
  const bf16 *norm;     // (H)
  const bf16 *w0, *w1, *w2, *w3;  // dec_la: q, k, v, o; dec_lb: gate, up, down
  bf16 *kc, *vc;        // dec_la: this layer's paged keys / values
  const unsigned *pos;  // (B)
  const unsigned *table; // (B, maxb)
  const float *inv_freq; // (hd / 2)
  int B, H, N, nh, kv, maxb, np_in;
  float eps, scale;
  // Profiling (PIPE_DECODE_LAY_TIMES): block 0's thread 0 stores clock64()
  // at each phase here (tm[i]) and the global timer in ns (tm[32 + i]);
  // the persistent step's marks past those (lp_mark, from LAY_TM);
  // null: not. rep (PIPE_DECODE_LAY_TIMES=2): some phases run twice (the
  // same instructions on the same data), the second pass timed apart.
  long long *tm;
  int rep;
  // dec_la: sequences of at most `whole` positions (at most LaShape::CH)
  // are attended whole by every block of the cluster (each stages its own
  // range of keys and pushes it to the others with its q/k/v), with no
  // merge of the blocks' ranges (no push of softmax states, barrier or
  // combine); 0: never (src/nn/decode.rs's la_whole: 64 by default).
  int whole;
  // dec_lb in the persistent step (LayP::acc): the cluster's partial rows
  // added into this (B, H) row with atomics instead of stored in pout.
  float *acc;
};

// The GPU's global timer (ns).
__device__ __forceinline__ long long global_ns() {
  unsigned long long gt;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(gt));
  return (long long)gt;
}

#define LAY_T(i)                                                                    \
  do {                                                                              \
    if (a.tm && threadIdx.x == 0 && t0) {                                           \
      a.tm[i] = clock64();                                                          \
      a.tm[32 + (i)] = global_ns();                                                 \
    }                                                                               \
  } while (0)

// Row b of a dec_la / dec_lb input (xin + pin) into xs; with `out`, into
// xout too. gs: the norm's weights, copied to shared memory before the wait.
// Few partial rows (dec_lb's: one a kv head) take a short path: its
// loads and adds stop at 4.
__device__ void lay_norm_row(const Lay &a, int b, const bf16 *gs, bf16 *xs, bool out) {
  const size_t H = a.H;
  const float *x = a.xin + b * H, *p = a.pin + b * H;
  float *xo = out ? a.xout + b * H : nullptr;
  if (a.np_in <= 4)
    norm_row_parts<1, 4>(x, p, a.np_in, a.B * H, gs, a.eps, a.H, xs, xo);
  else
    norm_row_parts<1>(x, p, a.np_in, a.B * H, gs, a.eps, a.H, xs, xo);
}

// The norm's weights (H bf16) into shared memory (cp.async, uncommitted).
__device__ __forceinline__ void lay_copy_norm(const Lay &a, bf16 *gs) {
  for (int i = threadIdx.x; i < a.H / 8; i += blockDim.x) cp16(gs + i * 8, a.norm + i * 8, true);
}

// Tensor-core products of a block's weight rows (shared memory) with one
// or two staged rows, as mma_proj does them (8 consecutive k a thread, fed
// to two MMAs): a row-major tile of 16 weight rows is A, the staged row
// (broadcast to the 8 columns of B; with two rows, column n is row
// min(n % 2, BT - 1), so that the thread of columns 2t, 2t + 1 holds
// both rows' sums) is B. The row strides are padded to 64 bytes past a
// multiple of 128 (LAY_PAD elements), so that the two rows a quarter-warp
// reads hit different banks. These phases run once a step: an MMA does in
// one instruction what took 16 FMAs and their unpacking.
#define LAY_PAD 32

// Rows r0.. r0 + 15 (stride ws) . x over the k-chunk of 32 at k0 (x:
// this thread's 8 of it), its two halves added into s0 and s1 (the same
// sums or two, to halve a chain of dependent MMAs).
__device__ __forceinline__ void lay_mma_chunk(float (&s0)[4], float (&s1)[4], const bf16 *w, int ws, int r0, int k0,
                                              const uint4 &x) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint4 wa = *reinterpret_cast<const uint4 *>(w + (size_t)(r0 + g) * ws + k0 + t * 8);
  const uint4 wb = *reinterpret_cast<const uint4 *>(w + (size_t)(r0 + g + 8) * ws + k0 + t * 8);
  mma16816(s0, wa.x, wb.x, wa.y, wb.y, x.x, x.y);
  mma16816(s1, wa.z, wb.z, wa.w, wb.w, x.z, x.w);
}

// dec_la's q/k/v units of kv head g: REP * HD / 2 rotary pairs of its
// query heads, then HD / 2 of k, then HD / 2 of v; U of them, UPB a block,
// as rows 2u and 2u + 1 of MTQ tiles of 16. The output projection's OR =
// H / LAY_C rows a block: MTO (runtime) tiles over OC columns.
template <int HD, int REP> struct LaShape {
  static constexpr int HALF = HD / 2, U = (REP + 2) * HALF, UPB = (U + LAY_C - 1) / LAY_C, OC = REP * HD;
  static constexpr int MTQ = (2 * UPB + 15) / 16, OS = OC + LAY_PAD;
  static constexpr int CH = 128, RS = HD + 8;
  // A warp's floats of `part`: its softmax state, before that its q/k/v
  // sums and its attention scores (16 x 8).
  static constexpr int PARTN = OC > 128 ? OC : 128;
  // Threads of the q/k/v epilogue (a unit and a cluster rank each) per thread.
  static constexpr int EU = (UPB * LAY_C + 32 * LAY_NW - 1) / (32 * LAY_NW);
  static_assert(CH <= 16 * LAY_NW, "dec_la: a chunk's positions, at most 16 a warp (attend16_tc)");
  static_assert(MTQ * 16 <= PARTN, "dec_la: the q/k/v sums of the warps fit in `part`");
};

// dec_la's dynamic shared memory, in this order (src/nn/decode.rs's
// la_smem sizes it): the block's q/k/v rows (16 MTQ, H + LAY_PAD) and
// output rows (16 MTO, OS) of the weights, a chunk of keys and values
// (CH, RS) each, the normed row and the norm's weights (H bf16 each), the
// attention output and the scaled queries (REP, HD) bf16 each, then f32
// (each part a multiple of 16 bytes): the new key and value (HD each),
// the warps' softmax states (`part`, (LAY_NW, PARTN), and (LAY_NW, REP,
// 2); before them, the warps' q/k/v sums and attention scores), the
// cluster's blocks' (LAY_C, REP, HD) and (LAY_C, REP, 2).
// g, b: the kv head and row; wait(): until the kernel's input is there
// (the kernel before, or in the persistent step the layer's MLP); done():
// after its last write.
template <int HD, int REP, class Wait, class Done>
__device__ void lay_attn(const Lay &a, int g, int b, Wait wait, Done done) {
  using S = LaShape<HD, REP>;
  constexpr int HALF = S::HALF, U = S::U, UPB = S::UPB, OC = S::OC, CH = S::CH, RS = S::RS, DL = HD / 32;
  constexpr int MTQ = S::MTQ, OS = S::OS, EU = S::EU, PARTN = S::PARTN, NT = 32 * LAY_NW;
  constexpr int PIECES = HD / 8;
  cg::cluster_group cl = cg::this_cluster();
  const int j = cl.block_rank();
  const bool t0 = j == 0 && g == 0 && b == 0;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, H = a.H, OR = H / LAY_C, WS = H + LAY_PAD;
  const int MTO = (OR + 15) / 16;
  extern __shared__ __align__(16) unsigned char dyn[];
  bf16 *wq = reinterpret_cast<bf16 *>(dyn);
  bf16 *wo = wq + (size_t)MTQ * 16 * WS;
  bf16 *ks = wo + (size_t)MTO * 16 * OS, *vs = ks + CH * RS;
  bf16 *xs = vs + CH * RS, *gs = xs + H, *aob = gs + H, *qb = aob + REP * HD;
  float *kn = reinterpret_cast<float *>(qb + REP * HD), *vn = kn + HD;
  float *part = vn + HD;
  float *wml = part + LAY_NW * PARTN;
  float *rcv = wml + ((LAY_NW * REP * 2 + 3) & ~3);
  float *rml = rcv + LAY_C * REP * HD;
  LAY_T(0);
  pdl_launch();
  const int len = a.pos[b] + 1, p = len - 1;
  const unsigned blk = a.table[(size_t)b * a.maxb + p / KV_BLOCK];
  // This block's positions (contiguous, the new one in the last non-empty
  // range), or all of them (`whole`: each block still stages only its own
  // range, olo..ohi, and pushes it into the others' shared memory).
  const bool whole = len <= min(a.whole, CH);
  const int R = (len + LAY_C - 1) / LAY_C, olo = min(j * R, len), ohi = min(olo + R, len);
  const int lo = whole ? 0 : olo, hi = whole ? len : ohi;
  const size_t row = (size_t)a.kv * HD;
  auto stage = [&](int c0, int p0, int p1) {
    for (int i = tid; i < (p1 - p0) * PIECES; i += NT) {
      const int q = p0 + i / PIECES, c = i % PIECES;
      const unsigned bq = a.table[(size_t)b * a.maxb + q / KV_BLOCK];
      const size_t off = (size_t)(bq * KV_BLOCK + q % KV_BLOCK) * row + (size_t)g * HD + c * 8;
      cp16(ks + (q - c0) * RS + c * 8, a.kc + off, true);
      cp16(vs + (q - c0) * RS + c * 8, a.vc + off, true);
    }
    cp_commit();
  };
  // Weights (no kernel writes them; rows past the block's, zeros) and the
  // first chunk's older keys and values (written by earlier steps) before
  // waiting for the kernel before.
  const int u0 = j * UPB, H8 = H / 8;
  for (int i = tid; i < MTQ * 16 * H8; i += NT) {
    const int r = i / H8, c = i % H8, u = u0 + r / 2;
    const bool ok = r < 2 * UPB && u < U;
    const bf16 *src = a.w0;
    if (ok) {
      const int kind = u / HALF, e = u % HALF + (r % 2) * HALF;
      src = kind < REP ? a.w0 + (size_t)((g * REP + kind) * HD + e) * H
                       : (kind == REP ? a.w1 : a.w2) + (size_t)(g * HD + e) * H;
    }
    cp16(wq + (size_t)r * WS + c * 8, ok ? src + c * 8 : src, ok);
  }
  LAY_T(14);
  for (int i = tid; i < MTO * 16 * (OC / 8); i += NT) {
    const int r = i / (OC / 8), c = i % (OC / 8);
    const bool ok = r < OR;
    cp16(wo + (size_t)r * OS + c * 8, a.w3 + (size_t)(j * OR + (ok ? r : 0)) * a.nh * HD + g * OC + c * 8, ok);
  }
  lay_copy_norm(a, gs);
  cp_commit();
  LAY_T(15);
  stage(lo, olo, min(min(lo + CH, ohi), p));
  LAY_T(24);
  // The q/k/v epilogue's threads: unit tid / LAY_C (+ NT / LAY_C ...), its
  // rotation at position p, pushed to cluster rank tid % LAY_C.
  float rsn[EU], rcs[EU];
#pragma unroll
  for (int k = 0; k < EU; k++) {
    const int u = u0 + (tid + k * NT) / LAY_C;
    rsn[k] = 0.f;
    rcs[k] = 1.f;
    if (tid + k * NT < UPB * LAY_C && u < U && u / HALF <= REP) sincosf((float)p * a.inv_freq[u % HALF], &rsn[k], &rcs[k]);
  }
  LAY_T(30);
  // Every block of the cluster has started (its shared memory may be
  // written) before any writes another's.
  cl.sync();
  LAY_T(1);
  wait();
  LAY_T(2);
  cp_wait<0>();
  __syncthreads();
#pragma unroll 1
  for (int it = 0; it <= a.rep; it++) {
    lay_norm_row(a, b, gs, xs, j == 0 && g == 0);
    LAY_T(it ? 25 : 3);
  }
  __syncthreads();
  LAY_T(4);
  // The block's q/k/v rows on tensor cores: warp w takes the k-chunks w,
  // w + LAY_NW, ... of every tile; the warps' sums meet in `part`.
#pragma unroll 1
  for (int it = 0; it <= a.rep; it++) {
    {
      const int gq = lane / 4, t = lane % 4;
      float acc[MTQ][4];
#pragma unroll
      for (int m = 0; m < MTQ; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
#pragma unroll 1
      for (int c = warp; c < H / 32; c += LAY_NW) {
        const uint4 x = *reinterpret_cast<const uint4 *>(xs + c * 32 + t * 8);
#pragma unroll
        for (int m = 0; m < MTQ; m++) lay_mma_chunk(acc[m], acc[m], wq, WS, m * 16, c * 32, x);
      }
      if (t == 0)
#pragma unroll
        for (int m = 0; m < MTQ; m++) {
          part[warp * PARTN + m * 16 + gq] = acc[m][0];
          part[warp * PARTN + m * 16 + gq + 8] = acc[m][2];
        }
    }
    __syncthreads();
    // Each unit's pair summed over the warps and rotated (q, k); k and v
    // into the pool (rank 0's thread); pushed into the cluster's blocks' q,
    // k, v (a thread per rank).
#pragma unroll
    for (int k = 0; k < EU; k++) {
      const int e = tid + k * NT, lu = e / LAY_C, q = e % LAY_C, u = u0 + lu;
      if (e < UPB * LAY_C && u < U) {
        const int kind = u / HALF, i = u % HALF;
        float y0 = 0.f, y1 = 0.f;
#pragma unroll
        for (int w = 0; w < LAY_NW; w++) {
          const float2 v = *reinterpret_cast<const float2 *>(part + w * PARTN + 2 * lu);
          y0 += v.x;
          y1 += v.y;
        }
        if (kind <= REP) {
          const float r0 = y0 * rcs[k] - y1 * rsn[k], r1 = y1 * rcs[k] + y0 * rsn[k];
          y0 = r0;
          y1 = r1;
        }
        if (kind >= REP) {
          if (q == 0) {
            bf16 *c = (kind == REP ? a.kc : a.vc) + ((size_t)(blk * KV_BLOCK + p % KV_BLOCK) * a.kv + g) * HD;
            c[i] = __float2bfloat16(y0);
            c[i + HALF] = __float2bfloat16(y1);
          }
          y0 = __bfloat162float(__float2bfloat16(y0));
          y1 = __bfloat162float(__float2bfloat16(y1));
        }
        if (kind < REP) {
          bf16 *d = cl.map_shared_rank(qb + kind * HD, q);
          d[i] = __float2bfloat16(y0 * a.scale);
          d[i + HALF] = __float2bfloat16(y1 * a.scale);
        } else {
          float *d = cl.map_shared_rank(kind == REP ? kn : vn, q);
          d[i] = y0;
          d[i + HALF] = y1;
        }
      }
    }
    LAY_T(it ? 26 : 5);
  }
  if (whole) {
    // The keys and values this block staged (landed before the norm), into
    // every other block of the cluster: the barrier below publishes them.
    const int n = max(0, min(ohi, p) - olo) * PIECES;
    for (int i = tid; i < 2 * n; i += NT) {
      const int kv = i / n, q = olo + (i % n) / PIECES, c = i % PIECES;
      bf16 *base = kv ? vs : ks;
      const uint4 v = *reinterpret_cast<const uint4 *>(base + q * RS + c * 8);
#pragma unroll 1
      for (int t = 1; t < LAY_C; t++)
        *reinterpret_cast<uint4 *>(cl.map_shared_rank(base, (j + t) % LAY_C) + q * RS + c * 8) = v;
    }
  }
  cl.sync();
  LAY_T(6);
  LAY_T(7);
  float m[REP], l[REP], acc[REP][DL];
#pragma unroll
  for (int r = 0; r < REP; r++) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int d = 0; d < DL; d++) acc[r][d] = 0.f;
  }
  for (int c0 = lo; c0 < hi; c0 += CH) {
    const int c1 = min(c0 + CH, hi);
    if (c0 != lo) {
      __syncthreads();  // every warp is done with the chunk before
      stage(c0, c0, min(c1, p));
    }
    __syncthreads();  // kn, vn
    if (c1 == len)
      for (int d = tid; d < HD; d += NT) {
        ks[(p - c0) * RS + d] = __float2bfloat16(kn[d]);
        vs[(p - c0) * RS + d] = __float2bfloat16(vn[d]);
      }
    cp_wait<0>();
    __syncthreads();
    // The chunk's positions spread over the warps (PW each, at most 16).
    const int PW = (c1 - c0 + LAY_NW - 1) / LAY_NW;
    attend16_tc<HD, REP>(ks + warp * PW * RS, vs + warp * PW * RS, qb, part + warp * PARTN,
                         min(PW, c1 - (c0 + warp * PW)), m, l, acc);
  }
  LAY_T(8);
  // The attention output of head r, dimension d, into aob (bf16).
  auto to_aob = [&](int r, int d, float o, float sum, float) {
    aob[r * HD + d] = __float2bfloat16(sum > 0.f ? o / sum : 0.f);
  };
  if (whole) {
    merge_warps<HD, LAY_NW, REP, PARTN>(part, wml, m, l, acc, to_aob);
    LAY_T(9);
    LAY_T(10);
  } else {
    // The block's softmax state, pushed into every block's rcv / rml (its
    // slot j) so that no block reads another's shared memory after the
    // barrier below (and none waits for the others before it leaves).
    // (A warp's state goes where its scores went: no warp writes into
    // another's scores.)
    merge_warps<HD, LAY_NW, REP, PARTN>(part, wml, m, l, acc, [&](int r, int d, float o, float sum, float mx) {
#pragma unroll 1
      for (int q = 0; q < LAY_C; q++) {
        cl.map_shared_rank(rcv, q)[(j * REP + r) * HD + d] = o;
        if (d == 0) {
          float *ml = cl.map_shared_rank(rml, q) + (j * REP + r) * 2;
          ml[0] = mx;
          ml[1] = sum;
        }
      }
    });
    LAY_T(9);
    cl.sync();
    LAY_T(10);
    // The cluster's ranges combined (each block all of them: its output rows need every column).
    fold_states<HD, LAY_C, REP, REP * HD, NT>(rcv, rml, to_aob);
  }
  LAY_T(11);
  __syncthreads();
  LAY_T(12);
  // The block's output rows over g's columns (kv head g's partial row) on
  // tensor cores: a warp per tile of 16 rows, over all OC columns (two
  // sums, the chunk's halves, to halve the chain of dependent MMAs).
#pragma unroll 1
  for (int it = 0; it <= a.rep; it++) {
    const int gq = lane / 4, t = lane % 4;
#pragma unroll 1
    for (int mt = warp; mt < MTO; mt += LAY_NW) {
      float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
      for (int c = 0; c < OC / 32; c++)
        lay_mma_chunk(s0, s1, wo, OS, mt * 16, c * 32, *reinterpret_cast<const uint4 *>(aob + c * 32 + t * 8));
      const int r = mt * 16 + gq;
      float *out = a.pout + ((size_t)g * a.B + b) * H + j * OR;
      if (t == 0 && r < OR) out[r] = s0[0] + s1[0];
      if (t == 1 && r + 8 < OR) out[r + 8] = s0[2] + s1[2];
    }
    LAY_T(it ? 27 : 13);
  }
  done();
}

// dec_lb: block x takes units x * 16 .. x * 16 + 15 of the MLP (N of them)
// for all BT rows: gate and up rows (32, H + LAY_PAD) and the down
// projection's columns (H, 16) copied to shared memory before the wait;
// gate and up on tensor cores (warp w: k-chunks w, w + LAY_NW, ... of both
// tiles; the warps' sums meet in `red`, (LAY_NW, 32, BT)), SwiGLU values
// (BT, 16) bf16, the block's share of the down projection on tensor cores
// (a tile of 16 of the H rows an MMA, k = the 16 units), pushed to the
// cluster's blocks by slices of H / LAY_C and summed there (ps, (LAY_C,
// BT, H / LAY_C)): cluster x / LAY_C's partial rows.
// x: the block's index among the MLP's; wait, done: as lay_attn's.
template <int BT, class Wait, class Done> __device__ void lay_mlp(const Lay &a, int x, Wait wait, Done done) {
  constexpr int NT = 32 * LAY_NW;
  cg::cluster_group cl = cg::this_cluster();
  const int j = cl.block_rank(), tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const bool t0 = x == 0;
  const int gq = lane / 4, t = lane % 4;
  const int H = a.H, H8 = H / 8, u0 = x * LAY_UB, HS = H / LAY_C, WS = H + LAY_PAD;
  extern __shared__ __align__(16) unsigned char dyn[];
  bf16 *wg = reinterpret_cast<bf16 *>(dyn);  // gate rows, then up rows
  bf16 *wd = wg + 2 * LAY_UB * WS;           // (H, 16)
  bf16 *xs = wd + H * LAY_UB;                // (BT, H)
  bf16 *gs = xs + BT * H;                    // the norm's weights (H)
  bf16 *act = gs + H;                        // (BT, 16)
  float *red = reinterpret_cast<float *>(act + BT * LAY_UB);
  float *ps = red + LAY_NW * 2 * LAY_UB * BT;
  LAY_T(16);
  pdl_launch();
  for (int i = tid; i < 2 * LAY_UB * H8; i += NT) {
    const int r = i / H8, c = i % H8, u = u0 + r % LAY_UB;
    const bool ok = u < a.N;
    cp16(wg + (size_t)r * WS + c * 8, ok ? (r < LAY_UB ? a.w0 : a.w1) + (size_t)u * H + c * 8 : a.w0, ok);
  }
  for (int i = tid; i < H * (LAY_UB / 8); i += NT) {
    const int h = i / (LAY_UB / 8), c = i % (LAY_UB / 8);
    const bool ok = u0 + c * 8 + 8 <= a.N;
    cp16(wd + (size_t)h * LAY_UB + c * 8, ok ? a.w2 + (size_t)h * a.N + u0 + c * 8 : a.w2, ok);
  }
  lay_copy_norm(a, gs);
  cp_commit();
  cl.sync();  // every block of the cluster has started before any writes another's shared memory
  LAY_T(17);
  wait();
  LAY_T(18);
  cp_wait<0>();
  __syncthreads();
#pragma unroll 1
  for (int it = 0; it <= a.rep; it++) {
  for (int b = 0; b < BT; b++) {
    if (b < a.B) {
      lay_norm_row(a, b, gs, xs + (size_t)b * H, x == 0);
    } else {
      for (int i = tid; i < H8; i += NT) reinterpret_cast<uint4 *>(xs + (size_t)b * H)[i] = make_uint4(0, 0, 0, 0);
    }
  }
  LAY_T(it ? 28 : 19);
  }
  __syncthreads();
  LAY_T(20);
#pragma unroll 1
  for (int it = 0; it <= a.rep; it++) {
    {
      float acc[2][4];
#pragma unroll
      for (int m = 0; m < 2; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
      const bf16 *xr = xs + (size_t)min(gq & 1, BT - 1) * H;
#pragma unroll 1
      for (int c = warp; c < H / 32; c += LAY_NW) {
        const uint4 xv = *reinterpret_cast<const uint4 *>(xr + c * 32 + t * 8);
#pragma unroll
        for (int m = 0; m < 2; m++) lay_mma_chunk(acc[m], acc[m], wg, WS, m * 16, c * 32, xv);
      }
      // Thread t holds columns 2t and 2t + 1 (rows b = 0, 1) of tile rows
      // gq (acc[m][0, 1]) and gq + 8 (acc[m][2, 3]): t == 0 stores the
      // first, t == 1 the second.
      if (t < 2)
#pragma unroll
        for (int m = 0; m < 2; m++)
#pragma unroll
          for (int b = 0; b < BT; b++)
            red[(warp * 2 * LAY_UB + m * 16 + gq + 8 * t) * BT + b] = t ? acc[m][2 + b] : acc[m][b];
    }
    __syncthreads();
    if (tid < BT * LAY_UB) {
      const int b = tid / LAY_UB, u = tid % LAY_UB;
      float gt = 0.f, up = 0.f;
#pragma unroll
      for (int w = 0; w < LAY_NW; w++) {
        gt += red[(w * 2 * LAY_UB + u) * BT + b];
        up += red[(w * 2 * LAY_UB + LAY_UB + u) * BT + b];
      }
      act[b * LAY_UB + u] = __float2bfloat16(u0 + u < a.N ? __fdividef(gt, 1.f + __expf(-gt)) * up : 0.f);
    }
    __syncthreads();
    {
      // B: the 16 units' values of row min(column % 2, BT - 1), in the k
      // order of the A fragments below (a thread's 4 consecutive units).
      const unsigned *ar = reinterpret_cast<const unsigned *>(act + min(gq & 1, BT - 1) * LAY_UB + t * 4);
      const unsigned b0 = ar[0], b1 = ar[1];
      const float rhs = 1.f / HS;
#pragma unroll 1
      for (int mt = warp; mt < H / 16; mt += LAY_NW) {
        const int h = mt * 16 + gq;
        const uint2 ra = *reinterpret_cast<const uint2 *>(wd + (size_t)h * LAY_UB + t * 4);
        const uint2 rb = *reinterpret_cast<const uint2 *>(wd + (size_t)(h + 8) * LAY_UB + t * 4);
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        mma16816(d, ra.x, rb.x, ra.y, rb.y, b0, b1);
        // Pushed to the block that sums slice h / HS (its slot j), so that
        // no block reads another's shared memory after the barrier below.
        if (t < 2) {
          // hh / HS by a float product: (hh + 0.5) / HS is at least 0.5 / HS
          // from a whole number, far more than the product's error.
          const int hh = h + 8 * t, q = __float2int_rz(((float)hh + 0.5f) * rhs);
          float *dst = cl.map_shared_rank(ps, q) + j * BT * HS + (hh - q * HS);
#pragma unroll
          for (int b = 0; b < BT; b++) dst[b * HS] = t ? d[2 + b] : d[b];
        }
      }
    }
    LAY_T(it ? 29 : 21);
  }
  cl.sync();
  LAY_T(22);
  for (int i = tid; i < a.B * HS; i += NT) {
    const int b = i / HS, hs = i % HS;
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < LAY_C; q++) s += ps[(q * BT + b) * HS + hs];
    if (a.acc)
      atomicAdd(a.acc + (size_t)b * H + j * HS + hs, s);
    else
      a.pout[((size_t)(x / LAY_C) * a.B + b) * H + j * HS + hs] = s;
  }
  LAY_T(23);
  done();
}

// ---- The persistent step of one row: both kernels' blocks, all layers ----
//
// dec_lp_<hd>_<rep>: one launch for the layers of a batch-1 step. Its
// first kv clusters are dec_la's blocks and the rest dec_lb's, each
// taking its part of every layer in turn; instead of a kernel boundary a
// layer's attention waits on a counter the MLP blocks of the layer before
// count up (ctr[2L - 1]), and its MLP on the attention blocks' (ctr[2L]):
// a block's writes, then __syncthreads, then its thread 0's fence and add;
// the waiting block's thread 0 polls with acquire loads. A block loads its
// next layer's weights while the other kind works, as the kernels do.
// Same code and results as the two kernels a layer; the grid must be
// co-resident (a cooperative launch) and ctr zero at its start.
struct LayP {
  Lay a;  // pos, table, inv_freq, B, H, N, nh, kv, maxb, eps, scale; tm, rep (layer 3)
  const MegaLayer *layers;
  float *x, *x2, *pa, *pb;
  unsigned *ctr;
  int nl, nmlp;  // layers; MLP blocks (N / LAY_UB)
  int sleep;     // ns between a waiting block's polls (0: none)
  // dec_lph: the LM head (tc_headp_8's Gemv), run by every block of the
  // step after its last layer, once the last MLP blocks have arrived
  // (two groups of 4 warps a block, each with a tile in flight).
  Gemv head;
  // dec_lph: `steps` greedy steps of the row in one launch (1: one). Step
  // s feeds position pos[s] (the positions follow each other), counts on
  // ctr + s cstride (2 nl counters, then the one the step's last head
  // block adds to once it has fed the argmax's embedding row into x) and
  // writes its key to hbest + s.
  const bf16 *embed;
  int steps, cstride;
  // Null, or (nl, H) rows, zero at the first step (PIPE_DECODE_LP_ACC,
  // nl >= 2): layer L's MLP clusters add their partial rows into row L
  // (f32 atomics: the sums' order, and so the logits' last bits, vary
  // from run to run), so that the next layer's attention and the LM head
  // read the residual as x plus one row instead of plus nmlp / LAY_C. The
  // first MLP block of layer L zeroes row L - 1 (the one before, cyclic:
  // the last layer's is read by the head, and zeroed by the next step's
  // first layer) once every attention block of L has read it.
  float *acc;
};

// Profiling: block blk's global timer into tm[LAY_TM + slot] (slot 0: the
// kernel's start, 1: past its wait for the kernel before, 2: its end).
__device__ __forceinline__ void lp_mark(const LayP &P, int blk, int slot) {
  if (P.a.tm && blockIdx.x == blk && threadIdx.x == 0) P.a.tm[LAY_TM + slot] = global_ns();
}

// A step of dec_lph's launch of several, in the block that published the
// step's key (every thread): the argmax (clamped to the vocabulary) as
// the next step's token, its embedding row into x, the key reset for the
// next step's head, then `fed` counted (the next step's attention blocks
// wait for it before their first layer). Every block has staged x for the
// head before it counted itself done, so none still reads it.
__device__ void lp_feed(const LayP &P, unsigned *fed) {
  feed_argmax(P.head.best, (unsigned)P.head.N, P.embed, P.a.H, P.x);
  block_arrive(fed);
}

// HEAD: the LM head in the same launch (dec_lph_*): each block loads its
// first tiles of the head's rows as soon as its last layer is done (a
// tile for each of its two groups of warps), and takes tiles 2x + group,
// then every 2 grid-th, once the last layer's MLP blocks have all arrived
// (ctr[2 nl - 1]); the last block to finish publishes the keys. With
// P.steps > 1, that block then feeds the argmax to the next step
// (lp_feed), whose first layer's attention blocks wait for it.
template <int HD, int REP, bool HEAD> __device__ void lay_persist(const LayP &P) {
  const int c = blockIdx.x / LAY_C, na = P.a.kv, np = P.nmlp / LAY_C;
  const int steps = HEAD ? max(P.steps, 1) : 1;
  pdl_launch();
  lp_mark(P, 0, 0);
  pdl_wait();
  lp_mark(P, 0, 1);
#pragma unroll 1
  for (int s = 0; s < steps; s++) {
    unsigned *ctr = P.ctr + (size_t)s * P.cstride;
    // (Step s > 0: its token fed by the step before.)
    const unsigned *fed = s ? ctr - P.cstride + 2 * P.nl : nullptr;
#pragma unroll 1
    for (int L = 0; L < P.nl; L++) {
      const MegaLayer w = P.layers[L];
      Lay a = P.a;
      a.pos = P.a.pos + s;
      if (L != 3) a.tm = nullptr;
      if (c < na) {
        a.xin = P.x;
        // (The MLP before: its row with acc, else its clusters' rows.)
        a.pin = P.acc ? P.acc + (size_t)(L ? L - 1 : 0) * P.a.H : P.pb;
        a.xout = P.x2;
        a.pout = P.pa;
        a.norm = w.ln1;
        a.w0 = w.q;
        a.w1 = w.k;
        a.w2 = w.v;
        a.w3 = w.o;
        a.kc = w.kc;
        a.vc = w.vc;
        a.np_in = L ? (P.acc ? 1 : np) : 0;
        lay_attn<HD, REP>(
            a, c, 0,
            [&] {
              if (L)
                block_await(ctr + 2 * L - 1, P.nmlp, P.sleep);
              else if (fed)
                block_await(fed, 1u, P.sleep);
            },
            [&] { block_arrive(ctr + 2 * L); });
      } else {
        a.xin = P.x2;
        a.pin = P.pa;
        a.xout = P.x;
        a.pout = P.pb;
        a.norm = w.ln2;
        a.w0 = w.gate;
        a.w1 = w.up;
        a.w2 = w.down;
        a.np_in = na;
        a.acc = P.acc ? P.acc + (size_t)L * P.a.H : nullptr;
        const int x = blockIdx.x - na * LAY_C;
        lay_mlp<1>(
            a, x, [&] { block_await(ctr + 2 * L, na * LAY_C, P.sleep); },
            [&] {
              if (P.acc && x == 0) {
                float *z = P.acc + (size_t)(L ? L - 1 : P.nl - 1) * P.a.H;
                for (int i = threadIdx.x; i < P.a.H; i += blockDim.x) z[i] = 0.f;
              }
              block_arrive(ctr + 2 * L + 1);
            });
      }
    }
    lp_mark(P, gridDim.x - 1, 2);
    if constexpr (HEAD) {
      Gemv h = P.head;
      if (h.hbest) h.hbest += s;
      mma_proj<IN_PARTS, OUT_LOGITS, 8, 2>(
          h, blockIdx.x, gridDim.x, 0, [&] { block_await(ctr + 2 * P.nl - 1, P.nmlp, P.sleep); },
          [&] {
            if (s + 1 < steps) lp_feed(P, ctr + 2 * P.nl);
          });
    }
  }
}

#define LAY_A(HD, REP)                                                                                    \
  extern "C" __global__ void __cluster_dims__(LAY_C, 1, 1) __launch_bounds__(32 * LAY_NW, 1)               \
      dec_la_##HD##_##REP(Lay a) {                                                                        \
    lay_attn<HD, REP>(a, blockIdx.y, blockIdx.z, [] { pdl_wait(); }, [] {});                             \
  }                                                                                                       \
  extern "C" __global__ void __cluster_dims__(LAY_C, 1, 1) __launch_bounds__(32 * LAY_NW, 1)               \
      dec_lp_##HD##_##REP(LayP p) {                                                                       \
    lay_persist<HD, REP, false>(p);                                                                       \
  }                                                                                                       \
  extern "C" __global__ void __cluster_dims__(LAY_C, 1, 1) __launch_bounds__(32 * LAY_NW, 1)               \
      dec_lph_##HD##_##REP(LayP p) {                                                                      \
    lay_persist<HD, REP, true>(p);                                                                        \
  }
#define LAY_A_REPS(HD) LAY_A(HD, 1) LAY_A(HD, 2) LAY_A(HD, 3) LAY_A(HD, 4) LAY_A(HD, 5) LAY_A(HD, 6) LAY_A(HD, 7) LAY_A(HD, 8)
LAY_A_REPS(64)
LAY_A_REPS(128)
extern "C" __global__ void __cluster_dims__(LAY_C, 1, 1) __launch_bounds__(32 * LAY_NW, 1) dec_lb_1(Lay a) {
  lay_mlp<1>(a, blockIdx.x, [] { pdl_wait(); }, [] {});
}
extern "C" __global__ void __cluster_dims__(LAY_C, 1, 1) __launch_bounds__(32 * LAY_NW, 1) dec_lb_2(Lay a) {
  lay_mlp<2>(a, blockIdx.x, [] { pdl_wait(); }, [] {});
}
