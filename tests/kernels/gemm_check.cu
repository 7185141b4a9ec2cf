// Host-side check of the tensor-core GEMM's weight path (kernels/csrc/cuda/quant_tile.cuh; runs
// without a GPU). Walks every B fragment the kernel's warps would build for a weight (blocks of
// 128 rows, 4 warps x 4 n8 tiles x 8 lanes' rows; stages of 64 k, 16 k per mma, 4 lanes x 2
// registers of k pairs) with the kernel's own indexing and decoding functions, and writes the
// weight it reconstructs; also the dequantizer kernel's walk (one word per thread). Every element
// must be produced exactly once. Then checks the K split ranges and the split heuristic.
// Driven by test_cuda_sources.py, which compares both weights with the plain dequantization.
//
// usage: gemm_check BITS BF16 N K GROUP WORDS.bin SCALE.bin TILES_OUT.bin DEQUANT_OUT.bin
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "quant_tile.cuh"

using namespace chatglm_quant;

namespace {

template <typename T, int BITS>
int walk(int N, int K, int group, const std::vector<uint32_t>& words,
         const std::vector<float>& scale, std::vector<uint16_t>& tiles,
         std::vector<uint16_t>& deq) {
  using Wd = GemmWords<BITS>;
  const int wpr = K / Wd::kPerWord, groups = K / group;
  std::vector<int> seen(static_cast<size_t>(N) * K, 0);
  for (int n_block = 0; n_block < N; n_block += kGemmBN)
    for (int warp = 0; warp < kGemmWarps; ++warp)
      for (int j = 0; j < kGemmNTiles; ++j)
        for (int g = 0; g < 8; ++g) {
          const int n = n_block + warp * kGemmWarpN + j * 8 + g;
          if (n >= N) continue;  // the kernel clamps the row and never stores it
          for (int tile = 0; tile < K / kGemmBK; ++tile)
            for (int kk = 0; kk < kGemmBK; kk += 16) {
              const int k_tile = tile * kGemmBK;
              const float s = scale[static_cast<size_t>(n) * groups + (k_tile + kk) / group];
              for (int t = 0; t < 4; ++t)
                for (int reg = 0; reg < 2; ++reg) {
                  const int k = b_frag_k(kk, t, reg);
                  const PairAt p = pair_at<BITS>(k);
                  const uint32_t word =
                      words[static_cast<size_t>(n) * wpr + tile * Wd::kPerRow + p.word];
                  const uint32_t v = dequant_pair<T, BITS>(word, p.pair, s);
                  const size_t at = static_cast<size_t>(n) * K + k_tile + k;
                  tiles[at] = static_cast<uint16_t>(v & 0xFFFFu);
                  tiles[at + 1] = static_cast<uint16_t>(v >> 16);
                  ++seen[at], ++seen[at + 1];
                }
            }
        }
  for (size_t i = 0; i < seen.size(); ++i)
    if (seen[i] != 1) {
      std::fprintf(stderr, "fragment walk: element %zu produced %d times\n", i, seen[i]);
      return 1;
    }
  for (size_t idx = 0; idx < static_cast<size_t>(N) * wpr; ++idx) {
    const size_t row = idx / wpr;
    const int k0 = static_cast<int>(idx % wpr) * Wd::kPerWord;
    const float s = scale[row * groups + k0 / group];
    for (int i = 0; i < Wd::kPerWord / 2; ++i) {
      const uint32_t v = dequant_pair<T, BITS>(words[idx], i, s);
      deq[row * K + k0 + 2 * i] = static_cast<uint16_t>(v & 0xFFFFu);
      deq[row * K + k0 + 2 * i + 1] = static_cast<uint16_t>(v >> 16);
    }
  }
  return 0;
}

int check_splits() {
  for (int k_tiles = 1; k_tiles <= 300; ++k_tiles)
    for (int splits = 1; splits <= kGemmMaxSplits; ++splits) {
      int next = 0;
      for (int s = 0; s < splits; ++s) {
        const TileRange r = split_tiles(k_tiles, splits, s);
        if (r.begin != next || r.end < r.begin) return 10;
        next = r.end;
      }
      if (next != k_tiles) return 11;
    }
  // the 6B shapes (K, N) at 9..64 rows, on 108 (A100) and 132 (H100/H200) SMs
  const int shapes[][2] = {{4096, 4608}, {4096, 4096}, {4096, 27392}, {13696, 4096}};
  for (const auto& sh : shapes)
    for (int bits : {4, 8})
      for (int sms : {0, 108, 132})
        for (int M = 1; M <= kGemmMaxRows; ++M) {
          const int s = gemm_splits(M, sh[1], sh[0], bits, sms);
          if (s < 1 || s > kGemmMaxSplits) return 12;
          if (s > 1 && sh[0] / kGemmBK / s < kGemmStages) return 13;  // too short to pipeline
          if (s > 1 && static_cast<int64_t>(s) * M * 64 > static_cast<int64_t>(sh[0]) * bits)
            return 14;  // partials' bytes over the weight's
          std::printf("splits K=%d N=%d bits=%d sms=%d M=%d -> %d\n", sh[0], sh[1], bits, sms, M, s);
        }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s BITS BF16 N K GROUP WORDS SCALE TILES_OUT DEQUANT_OUT\n", argv[0]);
    return 2;
  }
  const int bits = std::atoi(argv[1]), bf16 = std::atoi(argv[2]);
  const int N = std::atoi(argv[3]), K = std::atoi(argv[4]), group = std::atoi(argv[5]);
  std::vector<uint32_t> words(static_cast<size_t>(N) * K / (bits == 4 ? 8 : 4));
  std::vector<float> scale(static_cast<size_t>(N) * (K / group));
  FILE* f = std::fopen(argv[6], "rb");
  if (!f || std::fread(words.data(), 4, words.size(), f) != words.size()) return 3;
  std::fclose(f);
  f = std::fopen(argv[7], "rb");
  if (!f || std::fread(scale.data(), 4, scale.size(), f) != scale.size()) return 3;
  std::fclose(f);
  std::vector<uint16_t> tiles(static_cast<size_t>(N) * K, 0xFFFF), deq(tiles);
  int rc;
  if (bits == 4)
    rc = bf16 ? walk<__nv_bfloat16, 4>(N, K, group, words, scale, tiles, deq)
              : walk<__half, 4>(N, K, group, words, scale, tiles, deq);
  else
    rc = bf16 ? walk<__nv_bfloat16, 8>(N, K, group, words, scale, tiles, deq)
              : walk<__half, 8>(N, K, group, words, scale, tiles, deq);
  if (rc) return rc;
  rc = check_splits();
  if (rc) return rc;
  for (int i : {8, 9}) {
    f = std::fopen(argv[i], "wb");
    if (!f) return 4;
    const auto& v = i == 8 ? tiles : deq;
    std::fwrite(v.data(), 2, v.size(), f);
    std::fclose(f);
  }
  return 0;
}
