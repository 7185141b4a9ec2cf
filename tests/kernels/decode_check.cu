// Host-side check of kernels/csrc/cuda/quant_decode.cuh (runs without a GPU): reads packed
// words (int32, the layout kernels/ops.py `pack_cuda` writes) and writes every decoded value
// as float32, for the int4/int8 x half2/float2 decoders. Driven by test_cuda_sources.py.
#include <cstdio>
#include <vector>

#include "quant_decode.cuh"

using namespace chatglm_quant;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s BITS IN.bin OUT.bin\n", argv[0]);
    return 2;
  }
  const int bits = std::atoi(argv[1]);
  FILE* in = std::fopen(argv[2], "rb");
  if (!in) return 3;
  std::vector<uint32_t> words;
  uint32_t w;
  while (std::fread(&w, 4, 1, in) == 1) words.push_back(w);
  std::fclose(in);
  // Per word: per pair i: half2 path (x, y) then float2 path (x, y).
  std::vector<float> out;
  const int pairs = bits == 4 ? 4 : 2;
  for (uint32_t word : words) {
    for (int i = 0; i < pairs; ++i) {
      const __half2 h = bits == 4 ? int4_pair_half2(word, i) : int8_pair_half2(word, i);
      const float2 hf = __half22float2(h);
      const float2 f = bits == 4 ? int4_pair_float2(word, i) : int8_pair_float2(word, i);
      out.push_back(hf.x);
      out.push_back(hf.y);
      out.push_back(f.x);
      out.push_back(f.y);
    }
  }
  FILE* o = std::fopen(argv[3], "wb");
  if (!o) return 4;
  std::fwrite(out.data(), sizeof(float), out.size(), o);
  std::fclose(o);
  return 0;
}
