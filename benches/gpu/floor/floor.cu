// How short can one dependent step of a decode step be on this GPU? (issue 7,
// batch-1 decode.) Chains of N dependent kernels in a CUDA graph, and a
// persistent kernel with N grid barriers, each step reading what the one
// before wrote, with and without a GEMV of fresh (HBM-cold) weights per step.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o floor floor.cu -lcuda   (benches/gpu/floor/run.sh)
//   ./floor   -> one line per case: microseconds per dependent step
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

#define CK(x)                                                                   \
  do {                                                                          \
    cudaError_t e = (x);                                                        \
    if (e != cudaSuccess) {                                                     \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      exit(1);                                                                  \
    }                                                                           \
  } while (0)

__device__ __forceinline__ void pdl_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

constexpr int K = 576;

// One step: every block reads the K-vector x_in (written by the step
// before), each of its warps takes rows of W (rows_per_block rows, K bf16
// each, the weights loaded before the wait), dots them with x_in, writes
// out. GEMV=false: no weights, block 0 copies x_in to x_out (a plain
// dependency).
template <bool GEMV>
__global__ void step_kernel(const float *x_in, float *x_out, const __nv_bfloat16 *w, int rows_per_block, int n) {
  pdl_launch();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  // Prefetch: each warp's rows, 8 bf16 a lane a chunk of 256.
  uint4 wr[4][3];
  const int r0 = blockIdx.x * rows_per_block;
  if (GEMV) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int r = r0 + warp + i * nw;
#pragma unroll
      for (int c = 0; c < 3; c++) {
        const int k = c * 256 + lane * 8;
        wr[i][c] = (r < n && r < r0 + rows_per_block && k < K) ? __ldg(reinterpret_cast<const uint4 *>(w + (size_t)r * K + k))
                                                                : make_uint4(0, 0, 0, 0);
      }
    }
  }
  pdl_wait();
  if (!GEMV) {
    if (blockIdx.x == 0)
      for (int k = threadIdx.x; k < K; k += blockDim.x) x_out[k] = __ldcg(x_in + k) + 1.f;
    return;
  }
  __shared__ float xs[K];
  for (int k = threadIdx.x; k < K; k += blockDim.x) xs[k] = __ldcg(x_in + k);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int r = r0 + warp + i * nw;
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < 3; c++) {
      const int k = c * 256 + lane * 8;
      if (k < K) {
        const __nv_bfloat16 *p = reinterpret_cast<const __nv_bfloat16 *>(&wr[i][c]);
#pragma unroll
        for (int j = 0; j < 8; j++) s += __bfloat162float(p[j]) * xs[k + j];
      }
    }
#pragma unroll
    for (int o = 16; o; o /= 2) s += __shfl_xor_sync(~0u, s, o);
    if (lane == 0 && r < n && r < r0 + rows_per_block) x_out[r % K] = s * 1e-3f;
  }
}

// Persistent: `steps` phases, a grid barrier (release add on one counter,
// acquire poll) between them; each phase the GEMV above with the next
// phase's weights loaded before the barrier.
__device__ __forceinline__ void grid_sync(unsigned *ctr, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(ctr) : "memory");
    unsigned v;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ctr) : "memory");
    } while (v < target);
  }
  __syncthreads();
}

template <bool GEMV>
__global__ void persistent(float *xs_all, const __nv_bfloat16 *w, size_t wstride, int rows_per_block, int n, int steps,
                           unsigned *ctr) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  __shared__ float xs[K];
  const int r0 = blockIdx.x * rows_per_block;
  uint4 wr[4][3];
  auto load = [&](int s) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int r = r0 + warp + i * nw;
#pragma unroll
      for (int c = 0; c < 3; c++) {
        const int k = c * 256 + lane * 8;
        wr[i][c] = (GEMV && r < n && r < r0 + rows_per_block && k < K)
                       ? __ldg(reinterpret_cast<const uint4 *>(w + s * wstride + (size_t)r * K + k))
                       : make_uint4(0, 0, 0, 0);
      }
    }
  };
  load(0);
  for (int s = 0; s < steps; s++) {
    const float *x_in = xs_all + (size_t)s * K;
    float *x_out = xs_all + (size_t)(s + 1) * K;
    if (!GEMV) {
      if (blockIdx.x == 0)
        for (int k = threadIdx.x; k < K; k += blockDim.x) x_out[k] = __ldcg(x_in + k) + 1.f;
    } else {
      for (int k = threadIdx.x; k < K; k += blockDim.x) xs[k] = __ldcg(x_in + k);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const int r = r0 + warp + i * nw;
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < 3; c++) {
          const int k = c * 256 + lane * 8;
          if (k < K) {
            const __nv_bfloat16 *p = reinterpret_cast<const __nv_bfloat16 *>(&wr[i][c]);
#pragma unroll
            for (int j = 0; j < 8; j++) sum += __bfloat162float(p[j]) * xs[k + j];
          }
        }
#pragma unroll
        for (int o = 16; o; o /= 2) sum += __shfl_xor_sync(~0u, sum, o);
        if (lane == 0 && r < n && r < r0 + rows_per_block) __stcg(x_out + r % K, sum * 1e-3f);
      }
      if (s + 1 < steps) load(s + 1);
    }
    grid_sync(ctr, (unsigned)(s + 1) * gridDim.x);
  }
}

int main() {
  int dev = 0, sms = 0;
  CK(cudaSetDevice(dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  printf("# %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  const int N = 150;  // steps a chain (a SmolLM2 step has ~152 launches)
  const int n = 576;  // rows a step (an o projection)
  // Weights: N steps x n rows x K, all distinct (~100 MB: past L2, as a
  // decode step's 269 MB).
  const size_t wstride = (size_t)n * K;
  __nv_bfloat16 *w;
  CK(cudaMalloc(&w, N * wstride * 2 * 2));
  CK(cudaMemset(w, 0, N * wstride * 2 * 2));
  float *xs;
  CK(cudaMalloc(&xs, (N + 1) * K * sizeof(float)));
  CK(cudaMemset(xs, 0, (N + 1) * K * sizeof(float)));
  unsigned *ctr;
  CK(cudaMalloc(&ctr, 4));
  // A buffer to flush L2 between replays.
  char *flush;
  const size_t fl = 256u << 20;
  CK(cudaMalloc(&flush, fl));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  auto chain = [&](bool gemv, bool pdl, int blocks, int threads, bool cold) {
    const int rpb = (n + blocks - 1) / blocks;
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < N; i++) {
      cudaLaunchConfig_t c = {};
      c.gridDim = dim3(blocks);
      c.blockDim = dim3(threads);
      c.stream = st;
      cudaLaunchAttribute at[1];
      at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      at[0].val.programmaticStreamSerializationAllowed = 1;
      c.attrs = at;
      c.numAttrs = pdl ? 1 : 0;
      const __nv_bfloat16 *wi = w + (size_t)i * wstride;
      if (gemv)
        CK(cudaLaunchKernelEx(&c, step_kernel<true>, (const float *)(xs + i * K), xs + (i + 1) * K, wi, rpb, n));
      else
        CK(cudaLaunchKernelEx(&c, step_kernel<false>, (const float *)(xs + i * K), xs + (i + 1) * K, wi, rpb, n));
    }
    CK(cudaStreamEndCapture(st, &g));
    cudaGraphExec_t ge;
    CK(cudaGraphInstantiate(&ge, g, 0));
    std::vector<float> t;
    for (int r = 0; r < 23; r++) {
      if (cold) CK(cudaMemsetAsync(flush, r, fl, st));
      CK(cudaEventRecord(e0, st));
      CK(cudaGraphLaunch(ge, st));
      CK(cudaEventRecord(e1, st));
      CK(cudaStreamSynchronize(st));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r >= 3) t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    printf("launch chain  gemv=%d pdl=%d blocks=%3d threads=%3d cold=%d: %6.2f us/step (graph %7.1f us)\n", gemv, pdl,
           blocks, threads, cold, t[t.size() / 2] * 1e3 / N, t[t.size() / 2] * 1e3);
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
  };
  auto pers = [&](bool gemv, int blocks, int threads, bool cold) {
    const int rpb = (n + blocks - 1) / blocks;
    std::vector<float> t;
    for (int r = 0; r < 23; r++) {
      if (cold) CK(cudaMemsetAsync(flush, r, fl, st));
      CK(cudaMemsetAsync(ctr, 0, 4, st));
      CK(cudaEventRecord(e0, st));
      int steps = N;
      void *args[] = {&xs, &w, (void *)&wstride, (void *)&rpb, (void *)&n, &steps, &ctr};
      if (gemv)
        CK(cudaLaunchCooperativeKernel((void *)persistent<true>, blocks, threads, args, 0, st));
      else
        CK(cudaLaunchCooperativeKernel((void *)persistent<false>, blocks, threads, args, 0, st));
      CK(cudaEventRecord(e1, st));
      CK(cudaStreamSynchronize(st));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r >= 3) t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    printf("persistent    gemv=%d       blocks=%3d threads=%3d cold=%d: %6.2f us/step (kernel %7.1f us)\n", gemv, blocks,
           threads, cold, t[t.size() / 2] * 1e3 / N, t[t.size() / 2] * 1e3);
  };
  for (int blocks : {36, 72, sms}) {
    chain(false, false, blocks, 128, false);
    chain(false, true, blocks, 128, false);
    chain(true, false, blocks, 128, true);
    chain(true, true, blocks, 128, true);
    chain(true, true, blocks, 256, true);
    pers(false, blocks, 128, false);
    pers(true, blocks, 128, true);
    pers(true, blocks, 256, true);
  }
  chain(false, true, 1, 32, false);
  pers(false, 1, 32, false);
  pers(false, 8, 32, false);
  pers(false, 32, 32, false);
  return 0;
}
