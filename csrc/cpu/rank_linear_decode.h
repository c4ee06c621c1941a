// Factor storage and decoding for the CPU kernel of adaptwin::rank_linear (included by rank_linear.cpp only):
// the Factor view of a packed or plain factor, float32 views of tensors, NF4 / int8 decoding of a run of
// elements into floats (scalar and AVX-512), and float32 dot / axpy. Layouts: adaptwin/ops/rank_linear.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu_features.h"

namespace adaptwin {
namespace {


constexpr int64_t kGemvRows = 8;   // rows of x up to which the decode path runs
constexpr int64_t kChunk = 512;    // floats decoded at a time (2 KiB, stays in L1)
// Factor elements per parallel task. One thread decodes and FMAs ~20 G NF4 elements/s in the fused
// batch-1 path (768x192 factor: 7.3 us), so a task of 64k elements is ~3 us, about what waking a second
// (spinning) OpenMP thread costs; below that one thread runs alone. 16k-element tasks were tried: timed
// the same way (benchmarks/rank_linear_speed.py --cpp-loop, two runs each) they made no difference beyond
// the noise (d = 768: 9.93 / 9.70 us a call with 64k, 9.96 / 10.74 with 16k). On a loaded machine a
// 2-thread region can wait 12-16 ms for a core (measured at load 8): run with torch.set_num_threads(1) there.
constexpr int64_t kGrainElems = 1 << 16;

enum class Format { kFp, kNf4, kInt8 };  // the op's "fp" / "nf4" / "int8", parsed once per call

struct Factor {
  const void* data = nullptr;  // nf4: uint8 codes; int8: int8 codes (fp factors: `keep` only)
  const float* scale = nullptr;
  Format format = Format::kFp;
  int64_t blocksize = 0;
  int64_t k = 0, n = 0;
  at::Tensor keep;  // owns converted storage
  at::Tensor keep_scale;
};

// --- float32 views of tensors -------------------------------------------------------------------------

// t as a contiguous float32 tensor: t itself when it already is one.
at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// float32 values of a contiguous float32 / bf16 / fp16 tensor: its own data, or converted into buf (a loop, not
// an ATen cast: a batch-1 call is a few microseconds, and each ATen call costs about one).
const float* float_values(const at::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  buf.resize(static_cast<size_t>(t.numel()));
  if (t.scalar_type() == at::kBFloat16) {
    const at::BFloat16* src = t.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < t.numel(); ++i) buf[i] = static_cast<float>(src[i]);
  } else {
    TORCH_CHECK(t.scalar_type() == at::kHalf, "rank_linear: float32, bf16 or fp16 expected, got ", t.scalar_type());
    const at::Half* src = t.data_ptr<at::Half>();
    for (int64_t i = 0; i < t.numel(); ++i) buf[i] = static_cast<float>(src[i]);
  }
  return buf.data();
}

// --- decoding of elements [e0, e0 + len) of the flat (k, n) factor into out -----------------------

// The runs of elements [e0, e0 + len) that share one scale (groups of `group` elements, so no division per
// element): `for (ScaleRuns r(e0, len, group); r.next();)` visits each with its offset i from e0, its first
// element e, its length seg and its group g.
struct ScaleRuns {
  ScaleRuns(int64_t e0, int64_t len, int64_t group) : e0_(e0), len_(len), group_(group) {}
  bool next() {
    i += seg;
    if (i >= len_) return false;
    e = e0_ + i;
    g = e / group_;
    seg = std::min(len_ - i, (g + 1) * group_ - e);
    return true;
  }
  int64_t i = 0, e = 0, seg = 0, g = 0;

 private:
  int64_t e0_, len_, group_;
};

// A run of elements one scale block at a time, a byte's two codes per step.
void nf4_scalar(const uint8_t* p, const float* absmax, int64_t bs, int64_t e0, int64_t len, float* out) {
  for (ScaleRuns r(e0, len, bs); r.next();) {
    const float s = absmax[r.g];
    float* o = out + r.i;
    int64_t j = 0;
    if (r.e & 1) o[j++] = kNF4[p[r.e >> 1] & 0xF] * s;  // odd start: the low nibble of its byte
    const uint8_t* q = p + ((r.e + j) >> 1);
    for (; j + 2 <= r.seg; j += 2, ++q) {
      o[j] = kNF4[*q >> 4] * s;
      o[j + 1] = kNF4[*q & 0xF] * s;
    }
    if (j < r.seg) o[j] = kNF4[*q >> 4] * s;
  }
}

#if ADAPTWIN_X86
// 32 codes (16 bytes) -> 32 floats in element order (high nibble first), times s.
ADAPTWIN_AVX512 inline void nf4_32(const uint8_t* p, __m512 lut, __m512 s, float* out) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
  const __m128i lo = _mm_and_si128(v, low4);
  const __m512 a = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), lut);
  const __m512 b = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), lut);
  _mm512_storeu_ps(out, _mm512_mul_ps(a, s));
  _mm512_storeu_ps(out + 16, _mm512_mul_ps(b, s));
}

ADAPTWIN_AVX512 void nf4_avx512(const uint8_t* p, const float* absmax, int64_t bs, int64_t e0, int64_t len,
                                float* out) {
  const __m512 lut = _mm512_loadu_ps(kNF4);
  const int64_t skip = (e0 & 1) && len > 0;  // odd start: one low nibble, then byte-aligned
  if (skip) nf4_scalar(p, absmax, bs, e0, 1, out);
  for (ScaleRuns r(e0 + skip, len - skip, bs); r.next();) {
    const __m512 s = _mm512_set1_ps(absmax[r.g]);
    float* o = out + skip + r.i;
    int64_t j = 0;
    for (; j + 32 <= r.seg; j += 32) nf4_32(p + ((r.e + j) >> 1), lut, s, o + j);
    if (j < r.seg) nf4_scalar(p, absmax, bs, r.e + j, r.seg - j, o + j);
  }
}
#endif

// A run of elements one scale group (a row, or a flat block) at a time.
void int8_scalar(const int8_t* q, const float* scale, int64_t bs, int64_t n, int64_t e0, int64_t len, float* out) {
  for (ScaleRuns r(e0, len, bs == 0 ? n : bs); r.next();)  // groups: a row, or a flat block
    for (int64_t j = 0; j < r.seg; ++j) out[r.i + j] = static_cast<float>(q[r.e + j]) * scale[r.g];
}

#if ADAPTWIN_X86
ADAPTWIN_AVX512 void int8_avx512(const int8_t* q, const float* scale, int64_t bs, int64_t n, int64_t e0,
                                 int64_t len, float* out) {
  for (ScaleRuns r(e0, len, bs == 0 ? n : bs); r.next();) {
    const __m512 s = _mm512_set1_ps(scale[r.g]);
    int64_t j = 0;
    for (; j + 16 <= r.seg; j += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r.e + j));
      _mm512_storeu_ps(out + r.i + j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), s));
    }
    for (; j < r.seg; ++j) out[r.i + j] = static_cast<float>(q[r.e + j]) * scale[r.g];
  }
}
#endif

#if ADAPTWIN_X86
// AVX2 + FMA (x86 CPUs without AVX-512): 8 codes (4 bytes) -> 8 NF4 values in element order. The word is
// broadcast and lane e shifted right to its nibble (high nibble of each byte first); vpermps reads the
// low 3 bits of an index, so the two halves of the 16-entry table are looked up and bit 3 picks one.
ADAPTWIN_AVX2 inline __m256 nf4_8(const uint8_t* p, __m256 lut_lo, __m256 lut_hi) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(15));
  const __m256 lo = _mm256_permutevar8x32_ps(lut_lo, idx), hi = _mm256_permutevar8x32_ps(lut_hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

ADAPTWIN_AVX2 void nf4_avx2(const uint8_t* p, const float* absmax, int64_t bs, int64_t e0, int64_t len, float* out) {
  const __m256 lut_lo = _mm256_loadu_ps(kNF4), lut_hi = _mm256_loadu_ps(kNF4 + 8);
  const int64_t skip = (e0 & 1) && len > 0;  // odd start: one low nibble, then byte-aligned
  if (skip) nf4_scalar(p, absmax, bs, e0, 1, out);
  for (ScaleRuns r(e0 + skip, len - skip, bs); r.next();) {
    const __m256 s = _mm256_set1_ps(absmax[r.g]);
    float* o = out + skip + r.i;
    int64_t j = 0;
    for (; j + 8 <= r.seg; j += 8) _mm256_storeu_ps(o + j, _mm256_mul_ps(nf4_8(p + ((r.e + j) >> 1), lut_lo, lut_hi), s));
    if (j < r.seg) nf4_scalar(p, absmax, bs, r.e + j, r.seg - j, o + j);
  }
}

ADAPTWIN_AVX2 void int8_avx2(const int8_t* q, const float* scale, int64_t bs, int64_t n, int64_t e0, int64_t len,
                             float* out) {
  for (ScaleRuns r(e0, len, bs == 0 ? n : bs); r.next();) {
    const __m256 s = _mm256_set1_ps(scale[r.g]);
    int64_t j = 0;
    for (; j + 8 <= r.seg; j += 8) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + r.e + j));
      _mm256_storeu_ps(out + r.i + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s));
    }
    for (; j < r.seg; ++j) out[r.i + j] = static_cast<float>(q[r.e + j]) * scale[r.g];
  }
}
#endif

// Row r, columns [c0, c0 + len) of the factor as float32. Returns a pointer to them: into the fp factor
// itself, or into buf after decoding.
const float* row_chunk(const Factor& f, int64_t r, int64_t c0, int64_t len, float* buf) {
  const int64_t e0 = r * f.n + c0;
  if (f.format == Format::kFp) return static_cast<const float*>(f.data) + e0;  // float32 values (gemv_path)
  if (f.format == Format::kNf4) {
#if ADAPTWIN_X86
    if (has_avx512()) {
      nf4_avx512(static_cast<const uint8_t*>(f.data), f.scale, f.blocksize, e0, len, buf);
      return buf;
    }
#endif
#if ADAPTWIN_X86
    if (has_avx2()) {
      nf4_avx2(static_cast<const uint8_t*>(f.data), f.scale, f.blocksize, e0, len, buf);
      return buf;
    }
#endif
    nf4_scalar(static_cast<const uint8_t*>(f.data), f.scale, f.blocksize, e0, len, buf);
    return buf;
  }
#if ADAPTWIN_X86
  if (has_avx512()) {
    int8_avx512(static_cast<const int8_t*>(f.data), f.scale, f.blocksize, f.n, e0, len, buf);
    return buf;
  }
  if (has_avx2()) {
    int8_avx2(static_cast<const int8_t*>(f.data), f.scale, f.blocksize, f.n, e0, len, buf);
    return buf;
  }
#endif
  int8_scalar(static_cast<const int8_t*>(f.data), f.scale, f.blocksize, f.n, e0, len, buf);
  return buf;
}

// --- dot and axpy over float32 ----------------------------------------------------------------------

float dot_scalar(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: vectorisable without -ffast-math
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

void axpy_scalar(float* y, float alpha, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

#if ADAPTWIN_X86
ADAPTWIN_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

ADAPTWIN_AVX512 void axpy_avx512(float* y, float alpha, const float* x, int64_t n) {
  const __m512 a = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m, x + i),
                                                    _mm512_maskz_loadu_ps(m, y + i)));
  }
}

ADAPTWIN_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 8; ++j) s += lanes[j];
  return s;
}

ADAPTWIN_AVX2 void axpy_avx2(float* y, float alpha, const float* x, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
#if ADAPTWIN_X86
  if (has_avx512()) return dot_avx512(a, b, n);
  if (has_avx2()) return dot_avx2(a, b, n);
#endif
  return dot_scalar(a, b, n);
}

inline void axpy(float* y, float alpha, const float* x, int64_t n) {
#if ADAPTWIN_X86
  if (has_avx512()) return axpy_avx512(y, alpha, x, n);
  if (has_avx2()) return axpy_avx2(y, alpha, x, n);
#endif
  axpy_scalar(y, alpha, x, n);
}

}  // namespace
}  // namespace adaptwin
