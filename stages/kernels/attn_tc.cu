// Causal attention over packed variable-length sequences on tensor cores
// (bf16 storage, f32 accumulation): the same contract as attn.cu (layouts,
// tiles, log2-domain log-sum-exp, GQA), with the matrix products done by
// `mma.sync.m16n8k16` (FlashAttention-2's scheme). attn.cu keeps f32.
//
// A block has 4 warps and takes a tile of 64 rows (queries for the forward
// and dQ kernels, keys for dK/dV) of one head; each warp owns 16 of them.
// The backward pass is one kernel by default (attn_tc_bwd_*, FlashAttention-2's
// scheme): 8 warps take 128 keys of one query head, walk its queries, and
// compute the scores, P, dP and dS once for all three gradients; dQ (from
// every key tile), dK and dV (from every query head of a group) are summed
// in f32 with 16-byte reductions and turned to bf16 by attn_tc_finish. The
// split pair (dQ; dK and dV, each recomputing the scores and dP) stays for
// comparison (PIPE_ATTN_BWD=split).
// Tiles of K, V, Q, dO are staged in shared memory as bf16 rows of D
// values padded to D + 8 (16-byte aligned rows, conflict-free ldmatrix).
// The tiles a loop walks through are double-buffered: `cp.async` copies
// the next while the warps compute on the current one. Every operand
// fragment comes through `ldmatrix` (`.trans` for tiles indexed [k][n]).
// The causal mask is applied only to the tiles that cross a warp's
// diagonal; rows past a sequence's end are staged as zeros, which the mask
// (keys) or zero gradients (queries) make harmless.
//
// Fragments of m16n8k16 (lane = 4 * gr + tg): A (16 x 16, row-major) holds
// (gr, 2tg..2tg+1), (gr + 8, 2tg..), (gr, 8 + 2tg..), (gr + 8, 8 + 2tg..);
// B (16 x 8) holds (k = 2tg..2tg+1, n = gr), (k = 8 + 2tg.., n = gr); C
// (16 x 8, f32) holds (gr, 2tg..2tg+1), (gr + 8, 2tg..). Two neighbouring C
// tiles are, packed to bf16, the A fragment of the next product (P, dS).
//
// The scale (sl2 = scale * log2 e) must be positive: maxima are taken over
// the unscaled scores.

#include "common.cuh"

typedef __nv_bfloat16 bf16;

namespace {

constexpr int BR = 64; // rows per block

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// c += a * b (16 x 8 x 16, bf16 in, f32 accumulate)
__device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 bf16 matrices from shared memory; lane L addresses a row of
// matrix L / 8.
__device__ __forceinline__ void ldm4(uint32_t *r, const bf16 *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr(p)));
}
__device__ __forceinline__ void ldm4t(uint32_t *r, const bf16 *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr(p)));
}

// The A fragment of rows r0..r0+15, columns k0..k0+15 of a row-major tile.
template <int S> __device__ __forceinline__ void frag_a(uint32_t *a, const bf16 *t, int r0, int k0, int lane) {
  ldm4(a, t + (r0 + (lane & 15)) * S + k0 + (lane >> 4) * 8);
}

// B fragments of two neighbouring n-tiles (n0.., n0 + 8..) for k0..k0+15
// of a tile indexed [n][k] (row n holds column n of B): b[0], b[1] for n0,
// b[2], b[3] for n0 + 8.
template <int S> __device__ __forceinline__ void frag_b_nk(uint32_t *b, const bf16 *t, int n0, int k0, int lane) {
  ldm4(b, t + (n0 + (lane & 7) + (lane >> 4) * 8) * S + k0 + ((lane >> 3) & 1) * 8);
}

// The same from a tile indexed [k][n] (ldmatrix.trans).
template <int S> __device__ __forceinline__ void frag_b_kn(uint32_t *b, const bf16 *t, int k0, int n0, int lane) {
  ldm4t(b, t + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + n0 + (lane >> 4) * 8);
}

// The A fragment of C tiles j, j + 1 (columns 8j..8j+15) of a 16-row block.
__device__ __forceinline__ void c_to_a(uint32_t *a, const float (*c)[4], int j) {
  a[0] = pack(c[j][0], c[j][1]);
  a[1] = pack(c[j][2], c[j][3]);
  a[2] = pack(c[j + 1][0], c[j + 1][1]);
  a[3] = pack(c[j + 1][2], c[j + 1][3]);
}

template <int NJ> __device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
  for (int j = 0; j < NJ; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// acc (16 x 8*NJ) = A (rows r0.. of `a`, D columns) * B^T where B's rows
// 0.. of `b` hold the columns of the product (both row-major, D wide).
template <int D, int NJ>
__device__ __forceinline__ void mm_abt(float (*acc)[4], const bf16 *a, int r0, const bf16 *b, int lane) {
  constexpr int S = D + 8;
  zero<NJ>(acc);
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    uint32_t fa[4];
    frag_a<S>(fa, a, r0, kk * 16, lane);
#pragma unroll
    for (int j = 0; j < NJ; j += 2) {
      uint32_t fb[4];
      frag_b_nk<S>(fb, b, j * 8, kk * 16, lane);
      mma(acc[j], fa, fb[0], fb[1]);
      mma(acc[j + 1], fa, fb[2], fb[3]);
    }
  }
}

// acc (16 x D) += P (16 x 16*NK, as C tiles) * B, B's rows 0.. of `b`
// (row-major, D wide) indexed by P's columns.
template <int D, int NK>
__device__ __forceinline__ void mm_cb(float (*acc)[4], const float (*p)[4], const bf16 *b, int lane) {
  constexpr int S = D + 8;
#pragma unroll
  for (int kk = 0; kk < NK; kk++) {
    uint32_t fa[4];
    c_to_a(fa, p, 2 * kk);
#pragma unroll
    for (int nt = 0; nt < D / 8; nt += 2) {
      uint32_t fb[4];
      frag_b_kn<S>(fb, b, kk * 16, nt * 8, lane);
      mma(acc[nt], fa, fb[0], fb[1]);
      mma(acc[nt + 1], fa, fb[2], fb[3]);
    }
  }
}

// Rows r0..r0+rows-1 of head `head` of `src` (rows `rs` values apart, heads
// of D values) into a padded tile, zeros from row `end` on: asynchronous
// 16-byte copies when `al` (`src` 16-byte aligned: every row of a head then
// is, rs being a multiple of 8), else one bf16 at a time, synchronously.
template <int D>
__device__ __forceinline__ void stage(bf16 *sh, const bf16 *src, int r0, int rows, int end, int rs, int head,
                                      bool al) {
  constexpr int S = D + 8, V = D / 8;
  if (al) {
    for (int idx = threadIdx.x; idx < rows * V; idx += blockDim.x) {
      const int r = idx / V, c = (idx % V) * 8, row = r0 + r;
      const bool in = row < end;
      cp16(sh + r * S + c, in ? src + (size_t)row * rs + head * D + c : src, in);
    }
    return;
  }
  const bf16 zero = __float2bfloat16(0.f);
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D, row = r0 + r;
    sh[r * S + c] = row < end ? src[(size_t)row * rs + head * D + c] : zero;
  }
}

// A tile of a key loop (keys kb.. of kv head g, zeros from `end` on; rows
// kvs values apart) into the K, V pair `slot` of those at `buf`.
template <int D>
__device__ __forceinline__ void stage_kv(bf16 *buf, const bf16 *k, const bf16 *v, int slot, int kb, int end, int kvs,
                                         int g, bool al) {
  constexpr int T = BR * (D + 8);
  bf16 *b = buf + slot * 2 * T;
  stage<D>(b, k, kb, BR, end, kvs, g, al);
  stage<D>(b + T, v, kb, BR, end, kvs, g, al);
}

// Start copying tile it + 1 of `nb` (if any), then wait for tile it.
template <int D>
__device__ __forceinline__ void next_kv(bf16 *buf, const bf16 *k, const bf16 *v, int it, int nb, int kb, int end,
                                        int kvs, int g, bool al) {
  if (it + 1 < nb) stage_kv<D>(buf, k, v, (it + 1) & 1, kb + BR, end, kvs, g, al);
  cp_commit();
  cp_wait<1>();
  __syncthreads();
}

// Rows `i0` (C halves 0, 1) and `i1` (halves 2, 3) of a 16 x D accumulator,
// times f0 / f1, into `dst` (N, heads, D) where the row is below `end`.
template <int D>
__device__ __forceinline__ void store_rows(bf16 *dst, const float (*acc)[4], int i0, int i1, int end, int heads,
                                           int head, float f0, float f1, int tg) {
#pragma unroll
  for (int nt = 0; nt < D / 8; nt++) {
    const int c = nt * 8 + 2 * tg;
    if (i0 < end)
      *reinterpret_cast<uint32_t *>(dst + ((size_t)i0 * heads + head) * D + c) = pack(acc[nt][0] * f0, acc[nt][1] * f0);
    if (i1 < end)
      *reinterpret_cast<uint32_t *>(dst + ((size_t)i1 * heads + head) * D + c) = pack(acc[nt][2] * f1, acc[nt][3] * f1);
  }
}

__device__ __forceinline__ float group_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// -inf for the keys (columns) after row i0 (C halves 0, 1) or i1 (2, 3).
template <int NJ> __device__ __forceinline__ void mask_keys(float (*s)[4], int kb, int i0, int i1, int tg) {
#pragma unroll
  for (int j = 0; j < NJ; j++)
#pragma unroll
    for (int e = 0; e < 2; e++) {
      const int kj = kb + j * 8 + 2 * tg + e;
      if (kj > i0) s[j][e] = -INFINITY;
      if (kj > i1) s[j][2 + e] = -INFINITY;
    }
}

// The tile of this block. The grid is (heads, tiles): blockIdx.x is the
// head, and blockIdx.y the rank of the tile in a launch order that
// src/nn/flash.rs's `tiles` appends to the tile table (n = gridDim.y
// tiles of 4 words, then `which` 0: the forward's order, 1: the backward
// pass's), the tiles with the most work first and every head's tile of a
// rank together, so that a launch ends on short tiles instead of waiting
// for a long one started late (causal tiles near a sequence's end have
// up to 16 times the work of its first one, at 1,024 rows).
__device__ __forceinline__ int tile_at(const int *tiles, int which) {
  return tiles[(4 + which) * gridDim.y + blockIdx.y];
}

} // namespace

// Shared memory: NS buffers of K and V tiles (the Q tile goes through the
// last K). With NS = 2 a tile's copy starts while the tile before is in use,
// and each tile costs two block barriers; with NS = 3 the copies run two
// tiles ahead and one barrier a tile suffices (the buffer refilled is the
// one every warp finished before that barrier).
template <int D, int NS>
__device__ void fwd(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                    bf16 *__restrict__ o, float *__restrict__ lse, const int *__restrict__ tiles, int n, int hq, int hkv,
                    float sl2, int qs, int kvs) {
  constexpr int S = D + 8, NT = D / 8, T = BR * S;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16 *buf = reinterpret_cast<bf16 *>(smem); // K0, V0, K1, V1[, K2, V2]
  const int h = blockIdx.x, t = tile_at(tiles, 0), g = h / (hq / hkv);
  const int q0 = tiles[4 * t], q1 = tiles[4 * t + 1], s0 = tiles[4 * t + 2];
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane >> 2, tg = lane & 3;
  const int i0 = q0 + w * 16 + gr, i1 = i0 + 8;
  const bool al = aligned16(q) && aligned16(k) && aligned16(v);
  const int nb = (q1 - s0 + BR - 1) / BR;
  bf16 *qsh = buf + (NS - 1) * 2 * T;
  stage<D>(qsh, q, q0, BR, q1, qs, h, al);
  cp_commit();
  stage_kv<D>(buf, k, v, 0, s0, q1, kvs, g, al);
  cp_commit();
  if (NS == 3) {
    if (nb > 1) stage_kv<D>(buf, k, v, 1, s0 + BR, q1, kvs, g, al);
    cp_commit();
    cp_wait<2>();
  } else {
    cp_wait<1>();
  }
  __syncthreads();
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) frag_a<S>(qa[kk], qsh, w * 16, kk * 16, lane);
  __syncthreads(); // Q is read before its buffer is refilled
  float oacc[NT][4];
  zero<NT>(oacc);
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  for (int it = 0; it < nb; it++) {
    const int kb = s0 + it * BR;
    const bf16 *ks = buf + (it % NS) * 2 * T, *vs = ks + T;
    if (NS == 3) {
      // Tile it has landed (only it + 1 may still be in flight); past the
      // barrier every warp is done with tile it - 1, whose buffer takes it + 2.
      cp_wait<1>();
      __syncthreads();
      if (it + 2 < nb) stage_kv<D>(buf, k, v, (it + 2) % 3, kb + 2 * BR, q1, kvs, g, al);
      cp_commit();
    } else {
      next_kv<D>(buf, k, v, it, nb, kb, q1, kvs, g, al);
    }
    float sc[8][4];
    zero<8>(sc);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        uint32_t fb[4];
        frag_b_nk<S>(fb, ks, j * 8, kk * 16, lane);
        mma(sc[j], qa[kk], fb[0], fb[1]);
        mma(sc[j + 1], qa[kk], fb[2], fb[3]);
      }
    if (kb + BR - 1 > q0 + w * 16) mask_keys<8>(sc, kb, i0, i1, tg);
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; j++) {
      mx0 = fmaxf(mx0, fmaxf(sc[j][0], sc[j][1]));
      mx1 = fmaxf(mx1, fmaxf(sc[j][2], sc[j][3]));
    }
    mx0 = fmaxf(m0, group_max(mx0) * sl2);
    mx1 = fmaxf(m1, group_max(mx1) * sl2);
    const float b0 = mx0 == -INFINITY ? 0.f : mx0, b1 = mx1 == -INFINITY ? 0.f : mx1;
    const float c0 = ex2(m0 - b0), c1 = ex2(m1 - b1);
    float r0 = 0.f, r1 = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        sc[j][e] = ex2(fmaf(sc[j][e], sl2, -b0));
        sc[j][2 + e] = ex2(fmaf(sc[j][2 + e], sl2, -b1));
        r0 += sc[j][e];
        r1 += sc[j][2 + e];
      }
    l0 = l0 * c0 + r0; // per-thread partial sums: the group's are added at the end
    l1 = l1 * c1 + r1;
    m0 = mx0;
    m1 = mx1;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      oacc[nt][0] *= c0;
      oacc[nt][1] *= c0;
      oacc[nt][2] *= c1;
      oacc[nt][3] *= c1;
    }
    mm_cb<D, 4>(oacc, sc, vs, lane);
    if (NS == 2) __syncthreads(); // this buffer is consumed before the next iteration refills it
  }
  l0 = group_sum(l0);
  l1 = group_sum(l1);
  store_rows<D>(o, oacc, i0, i1, q1, hq, h, 1.f / l0, 1.f / l1, tg);
  if (tg == 0) {
    if (i0 < q1) lse[(size_t)h * n + i0] = m0 + __log2f(l0);
    if (i1 < q1) lse[(size_t)h * n + i1] = m1 + __log2f(l1);
  }
}

// dQ = scale * sum_j dS_ij K_j, dS = P * (dP - delta), dP = dO V^T.
// Shared memory: Q, dO tiles, then two buffers of K and V tiles.
template <int D>
__device__ void bwd_dq(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                       const bf16 *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ delta,
                       bf16 *__restrict__ dq, const int *__restrict__ tiles, int n, int hq, int hkv, float sl2,
                       float scale, int qs, int kvs) {
  constexpr int S = D + 8, NT = D / 8, T = BR * S;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16 *qsh = reinterpret_cast<bf16 *>(smem), *dos = qsh + T, *buf = dos + T;
  const int h = blockIdx.x, t = tile_at(tiles, 0), g = h / (hq / hkv);
  const int q0 = tiles[4 * t], q1 = tiles[4 * t + 1], s0 = tiles[4 * t + 2];
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane >> 2, tg = lane & 3;
  const int i0 = q0 + w * 16 + gr, i1 = i0 + 8;
  const int c0 = min(i0, q1 - 1), c1 = min(i1, q1 - 1);
  const bool al = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);
  stage<D>(qsh, q, q0, BR, q1, qs, h, al);
  stage<D>(dos, dout, q0, BR, q1, hq * D, h, al);
  stage_kv<D>(buf, k, v, 0, s0, q1, kvs, g, al);
  cp_commit();
  const float lse0 = lse[(size_t)h * n + c0], lse1 = lse[(size_t)h * n + c1];
  const float dl0 = delta[(size_t)c0 * hq + h], dl1 = delta[(size_t)c1 * hq + h];
  float acc[NT][4];
  zero<NT>(acc);
  const int nb = (q1 - s0 + BR - 1) / BR;
  for (int it = 0; it < nb; it++) {
    const int kb = s0 + it * BR;
    const bf16 *ks = buf + (it & 1) * 2 * T, *vs = ks + T;
    next_kv<D>(buf, k, v, it, nb, kb, q1, kvs, g, al);
    float sc[8][4], dp[8][4];
    mm_abt<D, 8>(sc, qsh, w * 16, ks, lane);
    mm_abt<D, 8>(dp, dos, w * 16, vs, lane);
    if (kb + BR - 1 > q0 + w * 16) mask_keys<8>(sc, kb, i0, i1, tg);
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        sc[j][e] = ex2(fmaf(sc[j][e], sl2, -lse0)) * (dp[j][e] - dl0);
        sc[j][2 + e] = ex2(fmaf(sc[j][2 + e], sl2, -lse1)) * (dp[j][2 + e] - dl1);
      }
    mm_cb<D, 4>(acc, sc, ks, lane);
    __syncthreads();
  }
  store_rows<D>(dq, acc, i0, i1, q1, hq, h, scale, scale, tg);
}

// dst (f32, (N, heads, D)), head `head` += a warp's 16 x 8 NC tile of C
// fragments (this lane's rows r0 (halves 0, 1) and r0 + 8 (2, 3), columns
// c0 + 8 nt + 2 tg..), rows below `end`: lanes 2u and 2u + 1 swap halves,
// the even one then holding 4 columns of row r0, the odd one the same 4 of
// r0 + 8, one 16-byte reduction each.
template <int D, int NC>
__device__ __forceinline__ void red_tile(float *__restrict__ dst, const float (*acc)[4], int r0, int c0, int end,
                                         int heads, int head, int tg) {
  const bool odd = tg & 1;
  const int row = r0 + (odd ? 8 : 0);
#pragma unroll
  for (int nt = 0; nt < NC; nt++) {
    const float x = __shfl_xor_sync(0xffffffffu, odd ? acc[nt][0] : acc[nt][2], 1);
    const float y = __shfl_xor_sync(0xffffffffu, odd ? acc[nt][1] : acc[nt][3], 1);
    float *p = dst + ((size_t)row * heads + head) * D + c0 + nt * 8 + 4 * (tg >> 1);
    if (row < end) {
      if (odd)
        red_add4(p, x, y, acc[nt][2], acc[nt][3]);
      else
        red_add4(p, acc[nt][0], acc[nt][1], x, y);
    }
  }
}

// dQ_acc (BQ rows from qb of head h, f32, (N, heads, D)) += dS K over the
// KB keys of this block, dS^T (keys x queries, bf16, BQ + 8 a row) in
// shared memory: each of the KB / 16 warps takes 16 query rows and a share
// of the columns, summed into global memory with vector reductions.
template <int D, int BQ, int KB>
__device__ __forceinline__ void dq_from_ds(float *__restrict__ dq_acc, const bf16 *dss, const bf16 *kss, int qb,
                                           int e, int hq, int h, int w, int lane) {
  constexpr int S = D + 8, SQ = BQ + 8, RG = BQ / 16, NC = D / (KB / 16 / RG) / 8;
  const int m0 = (w % RG) * 16, n0 = (w / RG) * NC * 8, gr = lane >> 2, tg = lane & 3;
  float acc[NC][4];
  zero<NC>(acc);
#pragma unroll
  for (int kk = 0; kk < KB / 16; kk++) {
    // dS rows m0.. (queries), columns 16kk.. (keys) from the [key][query]
    // tile: ldmatrix.trans of matrices (keys +0/+8) x (queries +0/+8).
    uint32_t fa[4];
    const int mi = lane >> 3, r = lane & 7;
    ldm4t(fa, dss + (kk * 16 + r + (mi >> 1) * 8) * SQ + m0 + (mi & 1) * 8);
#pragma unroll
    for (int nt = 0; nt < NC; nt += 2) {
      uint32_t fb[4];
      frag_b_kn<S>(fb, kss, kk * 16, n0 + nt * 8, lane);
      mma(acc[nt], fa, fb[0], fb[1]);
      mma(acc[nt + 1], fa, fb[2], fb[3]);
    }
  }
  red_tile<D, NC>(dq_acc, acc, qb + m0 + gr, n0, e, hq, h, tg);
}

// dV_j = sum_i P_ij dO_i, dK_j = scale * sum_i dS_ij Q_i over the query
// heads of this key/value head and the queries i >= j of its sequence, BQ
// at a time, for KB keys (KB / 16 warps, 16 keys each). Shared memory: K,
// V tiles (KB rows), then two buffers of Q, dO tiles (BQ rows) and their
// BQ log-sum-exps and deltas. Blocks follow the 64-row tiles; with KB =
// 128 a block takes its tile and the next of the sequence, and the block
// of that next tile has nothing to do.
//
// With DQ (the fused backward pass) a block takes one query head (grid y),
// not a key/value head's group, and sums into f32 buffers zeroed by the
// caller, unscaled: dQ_acc += dS K (see dq_from_ds, through a dS^T tile
// after the buffers), dK_acc, dV_acc += this head's share. The scores and
// dP are computed once for the three gradients, and the grid has a block
// per query head (more blocks for grouped-query attention).
template <int D, int BQ, int KB, bool DQ>
__device__ void bwd_dkv(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
                        const bf16 *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ delta,
                        bf16 *__restrict__ dk, bf16 *__restrict__ dv, float *__restrict__ dq_acc,
                        float *__restrict__ dk_acc, float *__restrict__ dv_acc, const int *__restrict__ tiles, int n,
                        int hq, int hkv, float sl2, float scale, int qrs, int kvs) {
  constexpr int S = D + 8, NT = D / 8, NJ = BQ / 8, TQ = BQ * S, SQ = BQ + 8;
  // One buffer: Q, dO tiles, BQ log-sum-exps, BQ deltas.
  constexpr int QB = 2 * TQ * 2 + 2 * BQ * 4;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16 *kss = reinterpret_cast<bf16 *>(smem), *vss = kss + KB * S;
  unsigned char *qbuf = reinterpret_cast<unsigned char *>(vss + KB * S);
  bf16 *dss = reinterpret_cast<bf16 *>(qbuf + 2 * QB);
  const int t = tile_at(tiles, 1), rep = hq / hkv, g = DQ ? blockIdx.x / rep : blockIdx.x;
  const int h0 = DQ ? blockIdx.x : g * rep; // the first query head of the loop
  const int j0 = tiles[4 * t], e = tiles[4 * t + 3];
  if ((j0 - tiles[4 * t + 2]) % KB) return; // (KB > 64) the block before takes these keys
  const int j1 = min(j0 + KB, e);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane >> 2, tg = lane & 3;
  const int r0 = j0 + w * 16 + gr, r1 = r0 + 8; // this thread's key rows
  const bool al = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);
  // Query tiles per query head; iteration `it` is head h0 + it / per, tile it % per.
  const int per = (e - j0 + BQ - 1) / BQ, total = (DQ ? 1 : rep) * per;
  auto issue = [&](int it) {
    unsigned char *b = qbuf + (it & 1) * QB;
    bf16 *qs = reinterpret_cast<bf16 *>(b), *dos = qs + TQ;
    float *ls = reinterpret_cast<float *>(dos + TQ), *dd = ls + BQ;
    const int h = h0 + it / per, qb = j0 + (it % per) * BQ;
    stage<D>(qs, q, qb, BQ, e, qrs, h, al);
    stage<D>(dos, dout, qb, BQ, e, hq * D, h, al);
    for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
      const bool in = qb + r < e;
      cp4(ls + r, in ? lse + (size_t)h * n + qb + r : lse, in);
      cp4(dd + r, in ? delta + (size_t)(qb + r) * hq + h : delta, in);
    }
  };
  stage<D>(kss, k, j0, KB, j1, kvs, g, al);
  stage<D>(vss, v, j0, KB, j1, kvs, g, al);
  issue(0);
  cp_commit();
  float dka[NT][4], dva[NT][4];
  zero<NT>(dka);
  zero<NT>(dva);
  for (int it = 0; it < total; it++) {
    if (it + 1 < total) issue(it + 1);
    cp_commit();
    cp_wait<1>();
    __syncthreads();
    const unsigned char *b = qbuf + (it & 1) * QB;
    const bf16 *qs = reinterpret_cast<const bf16 *>(b), *dos = qs + TQ;
    const float *ls = reinterpret_cast<const float *>(dos + TQ), *dd = ls + BQ;
    const int qb = j0 + (it % per) * BQ;
    float st[NJ][4], dpt[NJ][4];
    mm_abt<D, NJ>(st, kss, w * 16, qs, lane); // S^T: keys x queries
    // Queries before a key of this warp: P = 0 there. (Queries past the
    // sequence's end have zero dO and delta: their P and dS add nothing.)
    const bool diag = qb < j0 + w * 16 + 15;
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
      for (int x = 0; x < 2; x++) {
        const int c = j * 8 + 2 * tg + x, qi = qb + c;
        const float p0 = ex2(fmaf(st[j][x], sl2, -ls[c])), p1 = ex2(fmaf(st[j][2 + x], sl2, -ls[c]));
        st[j][x] = diag && qi < r0 ? 0.f : p0;
        st[j][2 + x] = diag && qi < r1 ? 0.f : p1;
      }
    mm_cb<D, NJ / 2>(dva, st, dos, lane);
    mm_abt<D, NJ>(dpt, vss, w * 16, dos, lane); // dP^T
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
      for (int x = 0; x < 2; x++) {
        const int c = j * 8 + 2 * tg + x;
        st[j][x] *= dpt[j][x] - dd[c];
        st[j][2 + x] *= dpt[j][2 + x] - dd[c];
      }
    mm_cb<D, NJ / 2>(dka, st, qs, lane);
    if (DQ) {
#pragma unroll
      for (int j = 0; j < NJ; j++) {
        *reinterpret_cast<uint32_t *>(dss + (w * 16 + gr) * SQ + j * 8 + 2 * tg) = pack(st[j][0], st[j][1]);
        *reinterpret_cast<uint32_t *>(dss + (w * 16 + gr + 8) * SQ + j * 8 + 2 * tg) = pack(st[j][2], st[j][3]);
      }
      __syncthreads();
      dq_from_ds<D, BQ, KB>(dq_acc, dss, kss, qb, e, hq, h0, w, lane);
    }
    __syncthreads(); // this buffer (and dS^T) is consumed before the next iteration refills it
  }
  if (DQ) {
    red_tile<D, NT>(dk_acc, dka, r0, 0, j1, hkv, g, tg);
    red_tile<D, NT>(dv_acc, dva, r0, 0, j1, hkv, g, tg);
    return;
  }
  store_rows<D>(dk, dka, r0, r1, j1, hkv, g, scale, scale, tg);
  store_rows<D>(dv, dva, r0, r1, j1, hkv, g, 1.f, 1.f, tg);
}

// delta (rows) = the row sums of dO * O, both (rows, D) bf16 and 16-byte
// aligned: D / 8 neighbouring threads a row, 8 values each.
template <int D>
__device__ void delta_rows(const bf16 *__restrict__ o, const bf16 *__restrict__ dout, float *__restrict__ delta,
                           int rows) {
  constexpr int G = D / 8;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x, r = idx / G, c = (idx % G) * 8;
  float s = 0.f;
  if (r < rows) {
    float a[8], b[8];
    ld8(o + (size_t)r * D + c, a);
    ld8(dout + (size_t)r * D + c, b);
#pragma unroll
    for (int i = 0; i < 8; i++) s = fmaf(a[i], b[i], s);
  }
#pragma unroll
  for (int m = G / 2; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  if (r < rows && idx % G == 0) delta[r] = s;
}

#define INSTANTIATE(D, BQ)                                                                                           \
  extern "C" __global__ void __launch_bounds__(128)                                                                  \
      attn_tc_fwd_##D##_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, const int *tiles,     \
                             int n, int hq, int hkv, float sl2, int qs, int kvs) {                                   \
    fwd<D, 2>(q, k, v, o, lse, tiles, n, hq, hkv, sl2, qs, kvs);                                                     \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(128)                                                                  \
      attn_tc_bwd_dq_##D##_bf16(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse,    \
                                const float *delta, bf16 *dq, const int *tiles, int n, int hq, int hkv, float sl2,  \
                                float scale, int qs, int kvs) {                                                      \
    bwd_dq<D>(q, k, v, dout, lse, delta, dq, tiles, n, hq, hkv, sl2, scale, qs, kvs);                                \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(128)                                                                  \
      attn_tc_bwd_dkv_##D##_bf16(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse,   \
                                 const float *delta, bf16 *dk, bf16 *dv, const int *tiles, int n, int hq, int hkv,   \
                                 float sl2, float scale, int qs, int kvs) {                                          \
    bwd_dkv<D, BQ, 64, false>(q, k, v, dout, lse, delta, dk, dv, nullptr, nullptr, nullptr, tiles, n, hq, hkv, sl2,  \
                              scale, qs, kvs);                                                                       \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(256)                                                                  \
      attn_tc_bwd_##D##_bf16(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse,       \
                             const float *delta, float *dq_acc, float *dk_acc, float *dv_acc, const int *tiles,      \
                             int n, int hq, int hkv, float sl2, float scale, int qs, int kvs) {                      \
    bwd_dkv<D, BQ, 128, true>(q, k, v, dout, lse, delta, nullptr, nullptr, dq_acc, dk_acc, dv_acc, tiles, n, hq, hkv, \
                              sl2, scale, qs, kvs);                                                                  \
  }                                                                                                                  \
  extern "C" __global__ void attn_tc_delta_##D##_bf16(const bf16 *o, const bf16 *dout, float *delta, int rows) {     \
    delta_rows<D>(o, dout, delta, rows);                                                                             \
  }

INSTANTIATE(64, 64)
// Three K/V buffers (head dim 64; at 128 they would leave fewer blocks an SM).
extern "C" __global__ void __launch_bounds__(128)
    attn_tc_fwd3_64_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, const int *tiles, int n,
                         int hq, int hkv, float sl2, int qs, int kvs) {
  fwd<64, 3>(q, k, v, o, lse, tiles, n, hq, hkv, sl2, qs, kvs);
}
INSTANTIATE(128, 32)

// The fused backward pass's sums to bf16, 8 values a thread: dq = scale *
// dq_acc (nq values), dk = scale * dk_acc and dv = dv_acc (nk values each;
// nk <= nq); nq and nk multiples of 8, every buffer 16-byte aligned.
extern "C" __global__ void attn_tc_finish_bf16(const float *dq_acc, bf16 *dq, size_t nq, const float *dk_acc,
                                               bf16 *dk, const float *dv_acc, bf16 *dv, size_t nk, float scale) {
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  float a[8];
  if (i < nq) {
    ld8(dq_acc + i, a);
#pragma unroll
    for (int j = 0; j < 8; j++) a[j] *= scale;
    st8(dq + i, a);
  }
  if (i < nk) {
    ld8(dk_acc + i, a);
#pragma unroll
    for (int j = 0; j < 8; j++) a[j] *= scale;
    st8(dk + i, a);
    ld8(dv_acc + i, a);
    st8(dv + i, a);
  }
}

// The same into one packed (rows, qw + 2 kw) bf16 tensor: each row's dq
// (qw = Hq D values), then dk and dv (kw = Hkv D each); qw, kw multiples
// of 8, every buffer 16-byte aligned.
extern "C" __global__ void attn_tc_finish_packed_bf16(const float *dq_acc, const float *dk_acc, const float *dv_acc,
                                                      bf16 *out, size_t rows, int qw, int kw, float scale) {
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8, wd = (size_t)qw + 2 * kw;
  if (i >= rows * wd) return;
  const size_t r = i / wd;
  const int c = (int)(i - r * wd);
  float a[8], f = scale;
  if (c < qw) {
    ld8(dq_acc + r * qw + c, a);
  } else if (c < qw + kw) {
    ld8(dk_acc + r * kw + c - qw, a);
  } else {
    ld8(dv_acc + r * kw + c - qw - kw, a);
    f = 1.f;
  }
#pragma unroll
  for (int j = 0; j < 8; j++) a[j] *= f;
  st8(out + i, a);
}
