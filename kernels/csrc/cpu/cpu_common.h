// Small pieces shared by the CPU kernels: a vectorizable e^x, the AMX permission request, and
// the instruction-set ladder every kernel dispatches on at run time.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace chatglm_cpu {

// e^v for v <= 0 (scores minus their maximum, sigmoid's e^-|a|), to ~2 ulp: 2^n * p(r) with
// v = n ln2 + r, |r| <= ln2/2. Plain C++ without libm calls (std::exp, std::nearbyint), so loops
// calling it vectorize; the rounding to nearest uses the 1.5 * 2^23 trick.
inline float exp_nonpositive(float v) {
  v = std::max(v, -87.f);  // below that, e^v is 0 in fp32 anyway
  const float k = (v * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = v - k * 0.693359375f + k * 2.12194440e-4f;  // Cody-Waite split of ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Linux hands out the AMX tile state only on request (once per process): true once granted.
inline bool request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// The instruction sets the kernels have paths for, lowest first. The extension is compiled for
// the baseline x86-64 ISA; each fast path carries its own target attribute and runs only where
// isa_allowed() says so, so one binary serves AMX, AVX-512-without-AMX and AVX2-only servers.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAvx512Bf16 = 4, kAmx = 5 };

// CHATGLM_SERVE_CPU_ISA=scalar|avx2|avx512|avx512_vnni|avx512_bf16|amx caps the ladder (read once
// per process): CI forces the lower paths on any host, and a user can rule out a path that
// misbehaves on their machine. Unset or unknown: no cap.
inline Isa isa_cap() {
  static const Isa cap = [] {
    const char* v = std::getenv("CHATGLM_SERVE_CPU_ISA");
    if (v == nullptr) return Isa::kAmx;
    const char* names[] = {"scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"};
    for (int i = 0; i < 6; ++i)
      if (std::strcmp(v, names[i]) == 0) return static_cast<Isa>(i);
    return Isa::kAmx;
  }();
  return cap;
}

// Whether this CPU has `isa` (the AMX bits only: the OS permission is the caller's check) and
// the cap allows it. avx512 means F+BW+VL+DQ; the higher rungs add their extension to it.
inline bool isa_allowed(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(isa_cap())) return false;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512: return avx512;
    case Isa::kAvx512Vnni: return avx512 && __builtin_cpu_supports("avx512vnni");
    case Isa::kAvx512Bf16: return avx512 && __builtin_cpu_supports("avx512bf16");
    case Isa::kAmx: return avx512 && __builtin_cpu_supports("amx-tile");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
// 16 fp32 or bf16 values as one fp32 vector (bf16 -> fp32 is a 16-bit shift, exact), for the
// AVX-512 paths that read activations or caches of either dtype.
template <typename T>
__attribute__((target("avx512f,avx512bw"))) inline __m512 load16_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    static_assert(sizeof(T) == 2, "fp32 or bf16");
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}

// the AVX2 twin: 8 fp32 or bf16 values as one fp32 vector
template <typename T>
__attribute__((target("avx2"))) inline __m256 load8_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    static_assert(sizeof(T) == 2, "fp32 or bf16");
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}
#endif

// fn(begin, end) over [0, n) in chunks of `grain`, each thread taking the next chunk when done
// with its last. at::parallel_for splits the range evenly up front, so a thread the OS preempts
// (the server's event loop shares these 2 cores) holds up the whole step; here the other thread
// takes over its remaining chunks.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& fn) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
#if defined(_OPENMP)
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
  if (threads > 1 && !omp_in_parallel()) {
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
    for (int64_t b = next.fetch_add(grain); b < n; b = next.fetch_add(grain))
      fn(b, std::min(n, b + grain));
    return;
  }
#endif
  if (n > 0) fn(0, n);
}

// fn(begin, end) over [0, n): each thread gets an even, contiguous share up front and runs it
// front to back in chunks of `grain`; a thread done with its own takes chunks off the back end
// of the others' shares. Why not parallel_chunks: at batch 1 a linear's weights stream once, and
// chunks dealt out in turn break each core's stream into pieces (its hardware prefetcher runs
// on into the other core's chunk). The batch-1 decode call (bench/step_scaling_bench.py's
// inputs, A/B in one process, Zen 4 EPYC, 2 threads): bf16 7.95 -> 7.41 ms, fp32 14.14 -> 13.78
// with shares instead of chunks of the same size. Why not a plain even split: a thread the OS
// preempts (the server's event loop shares these cores) would hold up the whole linear; here the
// other takes over the back of its share.
template <typename F>
void parallel_shares(int64_t n, int64_t grain, const F& fn) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
#if defined(_OPENMP)
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
  if (threads > 1 && !omp_in_parallel() && chunks < (int64_t{1} << 31)) {
    // a share's [front, back) in chunks, both in one word so that its owner (taking the front)
    // and a thief (taking the back) agree with one compare-and-swap; one cache line each
    struct alignas(64) Share {
      std::atomic<uint64_t> range;
    };
    std::unique_ptr<Share[]> shares(new Share[threads]);
    for (int s = 0; s < threads; ++s) {
      const uint64_t lo = s * chunks / threads, hi = (s + 1) * chunks / threads;
      shares[s].range.store(lo | hi << 32, std::memory_order_relaxed);
    }
    // take one chunk from share s, from its front or its back; -1 when the share is empty
    auto take = [&](int s, bool front) -> int64_t {
      uint64_t v = shares[s].range.load(std::memory_order_relaxed);
      for (;;) {
        const uint64_t lo = v & 0xFFFFFFFFu, hi = v >> 32;
        if (lo >= hi) return -1;
        const uint64_t next = front ? (lo + 1) | hi << 32 : lo | (hi - 1) << 32;
        if (shares[s].range.compare_exchange_weak(v, next, std::memory_order_relaxed))
          return static_cast<int64_t>(front ? lo : hi - 1);
      }
    };
    auto run = [&](int64_t c) { fn(c * grain, std::min(n, (c + 1) * grain)); };
#pragma omp parallel num_threads(threads)
    {
      const int me = omp_get_thread_num();
      for (int64_t c = take(me, true); c >= 0; c = take(me, true)) run(c);
      for (int k = 1; k < threads; ++k)
        for (int64_t c = take((me + k) % threads, false); c >= 0; c = take((me + k) % threads, false))
          run(c);
    }
    return;
  }
#endif
  if (n > 0) fn(0, n);
}

}  // namespace chatglm_cpu
