// Runtime CPU-feature dispatch shared by the CPU kernels.
//
// The extension is compiled for a portable x86-64 baseline (no -march=native: a wheel built on an
// AVX-512 machine must still load on an AVX2 one). The hot loops exist in an AVX-512 version compiled with
// `__attribute__((target("avx512f")))` and a plain C++ version, the NF4 / int8 decoding and the float32
// dot / axpy of rank_linear also in an AVX2 + FMA one (x86 CPUs without AVX-512); `has_avx512()` /
// `has_avx2()` pick one once per process (cpuid bits, via GCC/Clang's __builtin_cpu_supports). On AArch64
// those loops, and rank_linear's batch-1 register decode, exist in a NEON version instead (`has_neon()`).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// ADAPTWIN_PORTABLE (a -D flag) builds only the portable loops, as on a CPU that is neither x86-64 nor AArch64;
// tests/test_kernels_portable.py builds and checks that variant here.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ADAPTWIN_PORTABLE)
#define ADAPTWIN_X86 1
#include <immintrin.h>
#define ADAPTWIN_AVX512 __attribute__((target("avx512f")))
#define ADAPTWIN_AVX2 __attribute__((target("avx2,fma")))
// AVX512-BF16 (vdpbf16ps: two bf16 products summed into each float32 lane) with the BW permutes
#define ADAPTWIN_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#else
#define ADAPTWIN_X86 0
#endif

// AArch64 (phones, Raspberry Pi 3 and later, Apple silicon, Graviton): NEON is part of the base ISA, so its
// loops need no run-time check beyond the cap.
#if defined(__aarch64__) && !defined(ADAPTWIN_PORTABLE)
#define ADAPTWIN_NEON 1
#include <arm_neon.h>
#else
#define ADAPTWIN_NEON 0
#endif

namespace adaptwin {

// ADAPTWIN_CPU_CAP (environment, read once per process) caps what the dispatch below may use, so that the
// paths of other CPUs can be run and tested on this one: "portable" (no SIMD path: what other CPUs run),
// "avx2" (AVX2 + FMA, no AVX-512: most x86 laptops and desktops), "avx512" (AVX-512 without AVX512-BF16,
// as on Skylake-X), unset or "native" (what the CPU has). adaptwin.ops.backends rejects any other value
// before a kernel runs; here it counts as "native".
inline int cpu_cap() {
  static const int cap = [] {
    const char* s = std::getenv("ADAPTWIN_CPU_CAP");
    if (s != nullptr && std::strcmp(s, "portable") == 0) return 0;
    if (s != nullptr && std::strcmp(s, "avx2") == 0) return 1;
    if (s != nullptr && std::strcmp(s, "avx512") == 0) return 2;
    return 3;
  }();
  return cap;
}

inline bool has_avx2() {
#if ADAPTWIN_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_cap() >= 1;
  return yes;
#else
  return false;
#endif
}

// NEON on AArch64 unless ADAPTWIN_CPU_CAP=portable (the caps above AVX2 and below native mean nothing there).
inline bool has_neon() {
#if ADAPTWIN_NEON
  static const bool yes = cpu_cap() >= 1;
  return yes;
#else
  return false;
#endif
}

inline bool has_avx512() {
#if ADAPTWIN_X86
  static const bool yes = __builtin_cpu_supports("avx512f") && cpu_cap() >= 2;
  return yes;
#else
  return false;
#endif
}

// AVX-512 with the byte/word and 256-bit forms (the decoding row path of attention_rows.h)
inline bool has_avx512_rows() {
#if ADAPTWIN_X86
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

inline bool has_avx512_bf16() {
#if ADAPTWIN_X86
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16") && cpu_cap() >= 3;
  return yes;
#else
  return false;
#endif
}

// Cephes exp2f's degree-6 polynomial for 2^f, f in [-0.5, 0.5], highest power first (the exp2 loops below and
// gelu.h's NEON one).
constexpr float kExp2Poly[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

// bitsandbytes' NF4 code book (adaptwin.quant.nf4.NF4_CODE): quantiles of N(0, 1) scaled to [-1, 1].
constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

#if ADAPTWIN_X86
// exp(x) for 16 floats: 2^n · p(r) with x = n·ln2 + r, |r| <= ln2/2, degree-6 polynomial (Cephes
// expf coefficients), scaled with vscalefps. Max relative error ~2 ulp over [-87, 88]; inputs below
// -87.3 give 0 (softmax scores minus their row max are <= 0, and -inf must give exactly 0).
ADAPTWIN_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3365f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(lo, x);  // (max / min return their second operand where one is NaN: NaN stays NaN)
  x = _mm512_min_ps(_mm512_set1_ps(88.3762f), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 out = _mm512_scalef_ps(p, n);
  return _mm512_mask_mov_ps(out, under, _mm512_setzero_ps());
}

// log2(e): the query-vectorised attention paths keep scores in log2 units (queries pre-multiplied by
// scale·log2e, additive masks by log2e), so the softmax needs 2^x, which is cheaper than e^x.
constexpr float kLog2e = 1.44269504088896341f;

// 2^x for 16 floats x <= 0 (softmax scores minus their running max; -inf must give exactly 0):
// 2^n · p(f), n = round(x), f = x - n in [-0.5, 0.5], Cephes exp2f's degree-6 polynomial (peak relative
// error 1.7e-7), scaled with vscalefps. Clamped at -150: 2^-150 rounds to 0, so -inf gives 0; NaN gives NaN
// (a NaN or +inf score makes its row NaN, as in SDPA, instead of dropping out of the softmax). Ten
// instructions against sixteen for exp512 (no ln2 range split, no upper clamp, no underflow mask).
ADAPTWIN_AVX512 inline __m512 exp2_512_nonpos(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);  // NaN stays NaN (max returns its second operand there)
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(p, n);
}

// 2^x for 8 floats x <= 0 (-inf gives 0): 2^n · p(f), n = round(x), f = x - n, the polynomial of
// exp2_512_nonpos; 2^n assembled in the exponent bits. x is clamped at -127, whose n gives exponent bits 0:
// a zero factor, so x below -126.5 (2^x < 1.2e-38, beside the row maximum's 1 in every softmax sum) gives
// exactly 0 without a compare and mask.
ADAPTWIN_AVX2 inline __m256 exp2_256_nonpos(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // NaN stays NaN (max returns its second operand there)
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

ADAPTWIN_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// Sums across lanes of many vectors at once by shuffle trees (the attention row paths' scores of 16 / 8 keys,
// fp_gemv.h's 16 / 8 rows of a factor): no horizontal sum per vector.
// Lane r of the result = the sum of the 16 lanes of v[r].
ADAPTWIN_AVX512 inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [v2i(0+2), v2i+1(0+2), v2i(1+3), v2i+1(1+3)]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit block: the block sums of v4i .. v4i+3
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Lane r of the result = the sum of the 8 lanes of v[r].
ADAPTWIN_AVX2 inline __m256 hsum8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

ADAPTWIN_AVX2 inline float sum_lanes8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#endif

}  // namespace adaptwin
