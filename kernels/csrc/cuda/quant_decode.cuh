// Integer -> floating decoding of the GPU weight layout, shared by the kernels and by a
// host-compiled check (tests/kernels) so the bit tricks are verified on a machine without a GPU.
//
// GPU layout (built by kernels/ops.py `pack_cuda`), one row = consecutive 32-bit words:
//   int4: word w covers k = 8w .. 8w+7. Bits 4i..4i+3 hold u(8w+2i), bits 16+4i..16+4i+3 hold
//         u(8w+2i+1), u = q + 8 in 0..15. So (word >> 4i) & 0x000F000F is the pair of k
//         (2i, 2i+1) in the two 16-bit halves: already in the order of x's natural half2 pairs.
//   int8: word w covers k = 4w .. 4w+3 as bytes [u(k0), u(k2), u(k1), u(k3)], u = q + 128, so
//         word & 0x00FF00FF is the pair (k0, k1) and (word >> 8) & 0x00FF00FF the pair (k2, k3).
// Decoding avoids integer->float conversion instructions (a fraction of the FMA rate): OR-ing u
// into the mantissa of a power of two gives exactly 2^m + u, and one subtraction leaves q.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace chatglm_quant {

__host__ __device__ inline float bits_to_float(uint32_t v) {
  float f;
  memcpy(&f, &v, sizeof(f));
  return f;
}

__host__ __device__ inline __half2 bits_to_half2(uint32_t v) {
  __half2_raw r;
  r.x = static_cast<unsigned short>(v & 0xFFFFu);
  r.y = static_cast<unsigned short>(v >> 16);
  return __half2(r);
}

// fp16: 0x6400 is 1024.0 and its spacing is 1 up to 2048, so 0x6400 | u == 1024 + u exactly.
__host__ __device__ inline __half2 int4_pair_half2(uint32_t word, int i) {
  const __half2 h = bits_to_half2(((word >> (4 * i)) & 0x000F000Fu) | 0x64006400u);
  return __hsub2(h, bits_to_half2(0x64086408u));  // 1032 = 1024 + 8
}

__host__ __device__ inline __half2 int8_pair_half2(uint32_t word, int i) {
  const __half2 h = bits_to_half2(((word >> (8 * i)) & 0x00FF00FFu) | 0x64006400u);
  return __hsub2(h, bits_to_half2(0x64806480u));  // 1152 = 1024 + 128
}

// fp32 (for bf16 activations, whose 8-bit mantissa cannot hold the products): 0x4B000000 is
// 2^23, spacing 1, so 0x4B000000 | u == 2^23 + u exactly.
__host__ __device__ inline float2 int4_pair_float2(uint32_t word, int i) {
  const uint32_t v = (word >> (4 * i)) & 0x000F000Fu;
  return make_float2(bits_to_float((v & 0xFFFFu) | 0x4B000000u) - 8388616.f,  // 2^23 + 8
                     bits_to_float((v >> 16) | 0x4B000000u) - 8388616.f);
}

__host__ __device__ inline float2 int8_pair_float2(uint32_t word, int i) {
  const uint32_t v = (word >> (8 * i)) & 0x00FF00FFu;
  return make_float2(bits_to_float((v & 0xFFFFu) | 0x4B000000u) - 8388736.f,  // 2^23 + 128
                     bits_to_float((v >> 16) | 0x4B000000u) - 8388736.f);
}

}  // namespace chatglm_quant
