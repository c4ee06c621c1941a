// The codes of a rank_linear factor and their decoding, free of torch so that tests/simd_decode.cpp can build
// them for other CPUs (an AArch64 cross build run under qemu): the Codes view of a packed or plain factor,
// NF4 / int8 decoding of a run of elements into floats (scalar, AVX-512, AVX2 + FMA and NEON), and which
// factors the register-decode kernels take. Layouts: adaptwin/ops/rank_linear.py.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

enum class Format { kFp, kNf4, kInt8 };  // the op's "fp" / "nf4" / "int8", parsed once per call

// A factor's codes: the (k, n) direction-major matrix, packed NF4 / int8 with its scales, or float32 values.
struct Codes {
  const void* data = nullptr;  // nf4: uint8 codes; int8: int8 codes; fp: float32 values (where set)
  const float* scale = nullptr;
  Format format = Format::kFp;
  bool bf16 = false;  // fp only: data holds bfloat16 values (widened in registers by fp_gemv.h, else by row_chunk)
  int64_t blocksize = 0;
  int64_t k = 0, n = 0;
};

// Whether the register-decode kernels take the factor (rank_linear_fused.h, rank_linear_avx2.h,
// rank_linear_neon.h): NF4 whose rows start on whole scale blocks of whole 32-code steps, or int8 whose
// scale groups (a row, or a flat block) are too.
inline bool fused_ok(const Codes& f) {
  if (f.format == Format::kNf4) return f.blocksize % 32 == 0 && f.n % f.blocksize == 0;
  if (f.format != Format::kInt8) return false;
  const int64_t group = f.blocksize == 0 ? f.n : f.blocksize;
  return group > 0 && group % 32 == 0 && f.n % group == 0;
}

// Elements per scale: NF4 blocks; int8 flat blocks, or whole rows (blocksize 0). fused_ok makes every row
// hold whole groups.
inline int64_t scale_group(const Codes& f) { return f.blocksize == 0 ? f.n : f.blocksize; }

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

// AVX2 NF4, 32 codes at a time. The 16-entry float table is held as four byte planes (plane j: byte j of
// each float, in both 128-bit lanes). 32 codes (16 bytes) become 32 indices, the high nibbles (elements 0, 2, ..., 30) in the low lane
// and the low nibbles (1, 3, ..., 31) in the high lane; each plane is looked up with one vpshufb and the
// planes are unpacked back into floats. Vector j then holds elements 8j, 8j + 2, 8j + 4, 8j + 6 in its low
// half and 8j + 1, ..., 8j + 7 in its high half ("split order"). The register kernels of
// rank_linear_avx2.h permute x and y to match (one vpermps per 8 floats, x once for all the rows that use
// it, y once per column pass); nf4_avx2 below merges each vector back into element order. 17 instructions
// per 32 codes against 28 for four nf4_8. nf4_avx2 decoded 1 M codes in 512-code calls in 87.5 us against
// 103 with nf4_8 alone (one thread, medians of 50). The register kernels, one thread, NF4 blocksize 64, rank d / 4, medians of 200
// in a standalone loop on this Zen 4: x·Aᵀ 3.27 -> 2.77 us and h·B 3.31 -> 2.48 us at d = 384, 206 -> 167
// and 215 -> 185 us at 3072 (2 rows at a time in x·Aᵀ: 2.94 us at 384; 1 column pass of 32 in h·B: the
// same at 384, 195 us at 3072). Nearly all of its 17 are shuffles, which Zen 2-4 and Intel from Ice Lake
// issue on two ports; Skylake-class cores have one, for these and for nf4_8's alike.
struct Nf4Planes {
  __m256i p[4];
};

// The byte planes, built once per process (a call loads them: a decode call can be 512 codes).
struct Nf4PlaneBytes {
  alignas(32) uint8_t bytes[4][32];
  Nf4PlaneBytes() {
    const uint8_t* table = reinterpret_cast<const uint8_t*>(kNF4);
    for (int j = 0; j < 4; ++j)
      for (int v = 0; v < 32; ++v) bytes[j][v] = table[4 * (v % 16) + j];
  }
};

ADAPTWIN_AVX2 inline Nf4Planes nf4_planes_avx2() {
  static const Nf4PlaneBytes planes_bytes;
  Nf4Planes planes;
  for (int j = 0; j < 4; ++j) planes.p[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(planes_bytes.bytes[j]));
  return planes;
}

ADAPTWIN_AVX2 inline void nf4_32_avx2_split(const uint8_t* p, const Nf4Planes& planes, __m256 out[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256i idx = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(_mm_srli_epi16(b, 4), low4)),
                                              _mm_and_si128(b, low4), 1);
  const __m256i b0 = _mm256_shuffle_epi8(planes.p[0], idx), b1 = _mm256_shuffle_epi8(planes.p[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(planes.p[2], idx), b3 = _mm256_shuffle_epi8(planes.p[3], idx);
  const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

// 8 floats into split order (elements 0, 2, 4, 6, 1, 3, 5, 7), and back.
ADAPTWIN_AVX2 inline __m256 split_8(__m256 v) { return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)); }
ADAPTWIN_AVX2 inline __m256 merge_8(__m256 v) { return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); }

ADAPTWIN_AVX2 void nf4_avx2(const uint8_t* p, const float* absmax, int64_t bs, int64_t e0, int64_t len, float* out) {
  const __m256 lut_lo = _mm256_loadu_ps(kNF4), lut_hi = _mm256_loadu_ps(kNF4 + 8);
  const Nf4Planes planes = nf4_planes_avx2();
  const int64_t skip = (e0 & 1) && len > 0;  // odd start: one low nibble, then byte-aligned
  if (skip) nf4_scalar(p, absmax, bs, e0, 1, out);
  for (ScaleRuns r(e0 + skip, len - skip, bs); r.next();) {
    const __m256 s = _mm256_set1_ps(absmax[r.g]);
    float* o = out + skip + r.i;
    int64_t j = 0;
    for (; j + 32 <= r.seg; j += 32) {  // 32 from the byte planes, merged back into element order
      __m256 w[4];
      nf4_32_avx2_split(p + ((r.e + j) >> 1), planes, w);
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(o + j + 8 * q, _mm256_mul_ps(merge_8(w[q]), s));
    }
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

#if ADAPTWIN_NEON
// ARM (AArch64, where NEON is part of the base ISA): 16 NF4 codes (8 bytes) -> 16 values in element order, in
// four float32x4. The table is held as four byte planes (plane j: byte j of each of the 16 floats, as vld4q
// loads them); the nibbles are split and interleaved into element order (high nibble first), each plane
// looked up with one vqtbl1q, and the planes zipped back into floats, bit-exact. Against one vqtbl4q per four
// values on the float table (byte offsets 4·code + 0..3), this takes 18 instructions per 16 codes instead
// of 20, with single-register lookups (a vqtbl4q is several).
inline uint8x16x4_t nf4_table_neon() { return vld4q_u8(reinterpret_cast<const uint8_t*>(kNF4)); }

inline void nf4_16_neon(const uint8_t* p, const uint8x16x4_t& planes, float32x4_t out[4]) {
  const uint8x8_t b = vld1_u8(p);
  const uint8x8_t hi = vshr_n_u8(b, 4), lo = vand_u8(b, vdup_n_u8(0x0F));
  const uint8x16_t idx = vcombine_u8(vzip1_u8(hi, lo), vzip2_u8(hi, lo));
  const uint8x16x2_t b01 = vzipq_u8(vqtbl1q_u8(planes.val[0], idx), vqtbl1q_u8(planes.val[1], idx));
  const uint8x16x2_t b23 = vzipq_u8(vqtbl1q_u8(planes.val[2], idx), vqtbl1q_u8(planes.val[3], idx));
  const uint16x8x2_t lo8 = vzipq_u16(vreinterpretq_u16_u8(b01.val[0]), vreinterpretq_u16_u8(b23.val[0]));
  const uint16x8x2_t hi8 = vzipq_u16(vreinterpretq_u16_u8(b01.val[1]), vreinterpretq_u16_u8(b23.val[1]));
  out[0] = vreinterpretq_f32_u16(lo8.val[0]);
  out[1] = vreinterpretq_f32_u16(lo8.val[1]);
  out[2] = vreinterpretq_f32_u16(hi8.val[0]);
  out[3] = vreinterpretq_f32_u16(hi8.val[1]);
}

// 32 NF4 codes (16 bytes) -> 32 values in split order: out[0..3] the high nibbles' values (elements 0, 2, ..., 30,
// four per vector), out[4..7] the low nibbles' (1, 3, ..., 31). No interleave: 27 instructions per 32 codes
// against nf4_16_neon's 36; the register-decode kernels (rank_linear_neon.h) split x or y to match
// (vuzp1q / vuzp2q: element 2i of a pair of vectors, and 2i + 1), once for all the codes they meet.
inline void nf4_32_neon_split(const uint8_t* p, const uint8x16x4_t& planes, float32x4_t out[8]) {
  const uint8x16_t b = vld1q_u8(p);
  const uint8x16_t halves[2] = {vshrq_n_u8(b, 4), vandq_u8(b, vdupq_n_u8(0x0F))};
  for (int h = 0; h < 2; ++h) {
    const uint8x16_t idx = halves[h];
    const uint8x16x2_t b01 = vzipq_u8(vqtbl1q_u8(planes.val[0], idx), vqtbl1q_u8(planes.val[1], idx));
    const uint8x16x2_t b23 = vzipq_u8(vqtbl1q_u8(planes.val[2], idx), vqtbl1q_u8(planes.val[3], idx));
    const uint16x8x2_t lo8 = vzipq_u16(vreinterpretq_u16_u8(b01.val[0]), vreinterpretq_u16_u8(b23.val[0]));
    const uint16x8x2_t hi8 = vzipq_u16(vreinterpretq_u16_u8(b01.val[1]), vreinterpretq_u16_u8(b23.val[1]));
    out[4 * h] = vreinterpretq_f32_u16(lo8.val[0]);
    out[4 * h + 1] = vreinterpretq_f32_u16(lo8.val[1]);
    out[4 * h + 2] = vreinterpretq_f32_u16(hi8.val[0]);
    out[4 * h + 3] = vreinterpretq_f32_u16(hi8.val[1]);
  }
}

// 16 int8 codes widened to float32 in four float32x4.
inline void int8_16_neon(const int8_t* p, float32x4_t out[4]) {
  const int8x16_t v = vld1q_s8(p);
  const int16x8_t a = vmovl_s8(vget_low_s8(v)), b = vmovl_high_s8(v);
  out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(a)));
  out[1] = vcvtq_f32_s32(vmovl_high_s16(a));
  out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(b)));
  out[3] = vcvtq_f32_s32(vmovl_high_s16(b));
}

void nf4_neon(const uint8_t* p, const float* absmax, int64_t bs, int64_t e0, int64_t len, float* out) {
  const uint8x16x4_t lut = nf4_table_neon();
  const int64_t skip = (e0 & 1) && len > 0;  // odd start: one low nibble, then byte-aligned
  if (skip) nf4_scalar(p, absmax, bs, e0, 1, out);
  for (ScaleRuns r(e0 + skip, len - skip, bs); r.next();) {
    const float32x4_t s = vdupq_n_f32(absmax[r.g]);
    float* o = out + skip + r.i;
    int64_t j = 0;
    for (; j + 16 <= r.seg; j += 16) {
      float32x4_t v[4];
      nf4_16_neon(p + ((r.e + j) >> 1), lut, v);
      for (int q = 0; q < 4; ++q) vst1q_f32(o + j + 4 * q, vmulq_f32(v[q], s));
    }
    if (j < r.seg) nf4_scalar(p, absmax, bs, r.e + j, r.seg - j, o + j);
  }
}

void int8_neon(const int8_t* q, const float* scale, int64_t bs, int64_t n, int64_t e0, int64_t len, float* out) {
  for (ScaleRuns r(e0, len, bs == 0 ? n : bs); r.next();) {
    const float32x4_t s = vdupq_n_f32(scale[r.g]);
    int64_t j = 0;
    for (; j + 16 <= r.seg; j += 16) {
      float32x4_t v[4];
      int8_16_neon(q + r.e + j, v);
      for (int i = 0; i < 4; ++i) vst1q_f32(out + r.i + j + 4 * i, vmulq_f32(v[i], s));
    }
    for (; j < r.seg; ++j) out[r.i + j] = static_cast<float>(q[r.e + j]) * scale[r.g];
  }
}
#endif

// Elements [e0, e0 + len) of a packed factor decoded into out by one instruction set's pair of decoders.
using Nf4Decoder = void (*)(const uint8_t*, const float*, int64_t, int64_t, int64_t, float*);
using Int8Decoder = void (*)(const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t, float*);

template <Nf4Decoder kNf4Decode, Int8Decoder kInt8Decode>
void decode_run(const Codes& f, int64_t e0, int64_t len, float* out) {
  if (f.format == Format::kNf4)
    kNf4Decode(static_cast<const uint8_t*>(f.data), f.scale, f.blocksize, e0, len, out);
  else
    kInt8Decode(static_cast<const int8_t*>(f.data), f.scale, f.blocksize, f.n, e0, len, out);
}

// decode_run with the decoders this CPU (under ADAPTWIN_CPU_CAP) takes.
void decode_any(const Codes& f, int64_t e0, int64_t len, float* out) {
#if ADAPTWIN_X86
  if (has_avx512()) return decode_run<nf4_avx512, int8_avx512>(f, e0, len, out);
  if (has_avx2()) return decode_run<nf4_avx2, int8_avx2>(f, e0, len, out);
#endif
#if ADAPTWIN_NEON
  if (has_neon()) return decode_run<nf4_neon, int8_neon>(f, e0, len, out);
#endif
  decode_run<nf4_scalar, int8_scalar>(f, e0, len, out);
}

// Row r, columns [c0, c0 + len) of the factor as float32. Returns a pointer to them: into the fp factor
// itself, or into buf after decoding (or widening, for bfloat16 values: exact, the upper half of a float).
const float* row_chunk(const Codes& f, int64_t r, int64_t c0, int64_t len, float* buf) {
  const int64_t e0 = r * f.n + c0;
  if (f.format == Format::kFp) {
    if (!f.bf16) return static_cast<const float*>(f.data) + e0;  // float32 values (gemv_path)
    widen_bf16(static_cast<const uint16_t*>(f.data) + e0, buf, len);
    return buf;
  }
  decode_any(f, e0, len, buf);
  return buf;
}

}  // namespace
}  // namespace adaptwin
