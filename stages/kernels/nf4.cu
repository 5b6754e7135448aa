// NF4 dequantisation on the GPU for QLoRA (stages/src/nn/nf4.rs has the
// layout): value = NF4[code] * (DYNAMIC[qabsmax[block]] * scale[block / 256]
// + offset), each product and sum rounded in f32 (no FMA), as the host's
// `Nf4Tensor::dequantize` computes it, so both give the same bits.
// Compiled to PTX by stages/build.rs.

#include "common.cuh"

// One thread per code byte (two values); `tables` holds the 16 NF4 values,
// then the 256 dynamic-map values.
template <typename T>
__device__ void nf4_dequant(const uint8_t *codes, const uint8_t *qabsmax, const float *scale, const float *tables,
                            float offset, T *out, size_t nbytes) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < nbytes; i += (size_t)gridDim.x * blockDim.x) {
    const size_t b = i / 32; // 64 values a block, 32 bytes
    const float absmax = __fadd_rn(__fmul_rn(tables[16 + qabsmax[b]], scale[b / 256]), offset);
    const uint8_t byte = codes[i];
    st(out, 2 * i, __fmul_rn(tables[byte >> 4], absmax));
    st(out, 2 * i + 1, __fmul_rn(tables[byte & 15], absmax));
  }
}

#define INSTANTIATE(T, TN)                                                                                          \
  extern "C" __global__ void nf4_dequant_##TN(const uint8_t *codes, const uint8_t *qabsmax, const float *scale,     \
                                              const float *tables, float offset, T *out, size_t nbytes) {           \
    nf4_dequant<T>(codes, qabsmax, scale, tables, offset, out, nbytes);                                             \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
