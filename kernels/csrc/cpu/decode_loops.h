// The one-call decode step's element-wise loops (norms, rotary, SwiGLU, residuals): plain C++
// the compiler vectorizes. decode_stack.cpp includes this file once per instruction set, inside
// a namespace of that name and with DS_TARGET set to its target attribute, so the same loops run
// as AVX-512, AVX2 or baseline code, picked at run time like the matmul kernels. No include
// guard, on purpose; the includer provides <cmath>, <type_traits> and cpu_common.h.
//
// Numerics follow model/chatglm.py step by step, including where bf16 rounds: RMSNorm in fp32,
// rounded, then scaled by the weight in bf16; rotary in fp32; silu rounded before the product;
// residual sums rounded.

struct Loops {
  template <typename T>
  static float f(T v) {
    return static_cast<float>(v);
  }

  // sum of x^2 in 16 partial sums, so the loop vectorizes without reassociation flags
  template <typename T>
  DS_TARGET static float sum_squares(const T* x, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      for (int l = 0; l < 16; ++l) acc[l] += f(x[i + l]) * f(x[i + l]);
    float s = 0.f;
    for (; i < n; ++i) s += f(x[i]) * f(x[i]);
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
  }

  // out[m] = rmsnorm(x[m]) * weight, as model/chatglm.py's RMSNorm for the dtype
  template <typename T>
  DS_TARGET static void rms_norm(const T* x, const T* weight, T* out, int64_t M, int64_t H,
                                 float eps) {
    for (int64_t m = 0; m < M; ++m) {
      const T* xm = x + m * H;
      T* om = out + m * H;
      const float ss = sum_squares(xm, H);
      const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      for (int64_t i = 0; i < H; ++i) {
        if constexpr (std::is_same_v<T, float>) {
          om[i] = xm[i] * r * weight[i];
        } else {  // half precision: normalise in fp32, round, then scale in the dtype
          om[i] = T(f(weight[i]) * f(T(f(xm[i]) * r)));
        }
      }
    }
  }

  // rotate q and k heads (the first nheads of each row) on channels [0, rot) as pairs (2i, 2i+1)
  template <typename T>
  DS_TARGET static void rotary(T* qkv, int64_t ld, const float* rotation, int64_t M,
                               int64_t nheads, int64_t D, int64_t rot) {
    for (int64_t m = 0; m < M; ++m) {
      const float* cs = rotation + m * rot;  // [rot/2, 2]
      for (int64_t h = 0; h < nheads; ++h) {
        T* p = qkv + m * ld + h * D;
        for (int64_t i = 0; i < rot / 2; ++i) {
          const float x0 = f(p[2 * i]), x1 = f(p[2 * i + 1]), c = cs[2 * i], s = cs[2 * i + 1];
          p[2 * i] = T(x0 * c - x1 * s);
          p[2 * i + 1] = T(x1 * c + x0 * s);
        }
      }
    }
  }

  // out[m, j] = silu(g[m, j]) * g[m, F + j]; half precision rounds silu first, as F.silu does
  // (sigmoid from e^-|a|, so the exponent is never positive)
  template <typename T>
  DS_TARGET static void silu_mul(const T* g, T* out, int64_t M, int64_t F) {
    for (int64_t m = 0; m < M; ++m) silu_mul_cols(g + m * 2 * F, out + m * F, F, 0, F);
  }

  // columns [j0, j1) of one row
  template <typename T>
  DS_TARGET static void silu_mul_cols(const T* g, T* out, int64_t F, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float a = f(g[j]);
      const float e = chatglm_cpu::exp_nonpositive(-std::fabs(a));
      const float sig = (a >= 0.f ? 1.f : e) / (1.f + e);
      const T s = T(a * sig);
      out[j] = T(f(s) * f(g[F + j]));
    }
  }

  template <typename T>
  DS_TARGET static void add_(T* y, const T* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = T(f(y[i]) + f(x[i]));
  }
};
