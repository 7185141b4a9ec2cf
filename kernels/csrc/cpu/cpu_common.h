// Small pieces shared by the CPU kernels: a vectorizable e^x and the AMX permission request.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

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

}  // namespace chatglm_cpu
