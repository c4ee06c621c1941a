// The SIMD decoding of rank_linear's factors against its scalar loops, outside torch, so that it can be built for a
// CPU this machine is not: tests/test_kernels_neon.py builds it natively (the AVX-512 and AVX2 paths, where the
// CPU has them) and with an AArch64 cross compiler, run under qemu-aarch64 (the NEON paths, which the
// extension takes on ARM). Checked, on random codes and scales:
// * decoding a run of elements (any start, any length, NF4 / int8 with per-row or flat scales): the same bits
//   as the scalar loop;
// * float32 dot / axpy: within 4 n ulp of the float64 sum of |terms|;
// * the batch-1 register-decode kernels (x·Aᵀ over rank rows, h·B over column ranges): the same bound against
//   float64 products of the decoded factor;
// * the in-place GELU of gelu.h (float32 and bfloat16, every length up to 40 and a few longer, special values):
//   within 5e-7·|x| of the float64 GELU (bfloat16: plus its rounding), lines "gelu_PATH ok CASES".
// Prints one "PATH ok CASES" line per SIMD path run and exits 0, or prints the first mismatch and exits 1.
// `simd_decode run ...` (see main) runs a workload instead, for benchmarks/simd_instructions.py to count.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../csrc/cpu/codes.h"
#include "../csrc/cpu/dot_axpy.h"
#include "../csrc/cpu/gelu.h"
#include "../csrc/cpu/rank_linear_avx2.h"
#include "../csrc/cpu/rank_linear_neon.h"

using namespace adaptwin;

namespace {

std::mt19937 rng(1234);

int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

std::vector<float> randn(int64_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

// Cheap random bits (xorshift64): the run mode fills megabytes, which std::mt19937 per byte makes slow under qemu.
uint64_t bits() {
  static uint64_t state = 0x9E3779B97F4A7C15ull;
  state ^= state << 13, state ^= state >> 7, state ^= state << 17;
  return state;
}

// n floats in [-1, 1).
std::vector<float> uniform_floats(int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(static_cast<int64_t>(bits() >> 40) - (1 << 23)) * (1.0f / (1 << 23));
  return v;
}

// A random factor: codes (random bytes), positive scales, as rank_linear stores them.
struct Made {
  std::vector<uint8_t> bytes;
  std::vector<float> scale;
  Codes codes;
};

Made make(Format format, int64_t k, int64_t n, int64_t bs) {
  Made m;
  const int64_t numel = k * n;
  m.bytes.resize(static_cast<size_t>(format == Format::kNf4 ? (numel + 1) / 2 : numel) + 64);  // slack: no reads past
  for (size_t i = 0; i < m.bytes.size(); i += 8) {
    const uint64_t word = bits();
    std::memcpy(m.bytes.data() + i, &word, std::min<size_t>(8, m.bytes.size() - i));
  }
  const int64_t groups = format == Format::kNf4 ? (numel + bs - 1) / bs : bs == 0 ? k : (numel + bs - 1) / bs;
  m.scale.resize(static_cast<size_t>(groups));
  for (auto& s : m.scale) s = std::ldexp(1.0f + static_cast<float>(uniform(0, 1000)) / 1000.0f, static_cast<int>(uniform(-8, 2)));
  m.codes.data = m.bytes.data();
  m.codes.scale = m.scale.data();
  m.codes.format = format;
  m.codes.blocksize = bs;
  m.codes.k = k;
  m.codes.n = n;
  return m;
}

constexpr auto scalar_decode = decode_run<nf4_scalar, int8_scalar>;

std::vector<float> dense(const Codes& f) {
  std::vector<float> w(static_cast<size_t>(f.k * f.n));
  scalar_decode(f, 0, f.k * f.n, w.data());
  return w;
}

[[noreturn]] void fail(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  std::exit(1);
}

// |got - exact| <= 4 n eps sum|terms| (+ a denormal floor)
void check_sum(double got, double exact, double abs_sum, int64_t n, const std::string& what) {
  const double bound = 4.0 * static_cast<double>(n + 1) * 5.96e-8 * abs_sum + 1e-30;
  if (!(std::fabs(got - exact) <= bound))
    fail(what + ": got " + std::to_string(got) + ", want " + std::to_string(exact) + " (bound " + std::to_string(bound) + ")");
}

using DecodeFn = void (*)(const Codes&, int64_t, int64_t, float*);
using DotFn = float (*)(const float*, const float*, int64_t);
using AxpyFn = void (*)(float*, float, const float*, int64_t);
using GemvFn = void (*)(const Codes&, const float*, float*, int64_t, int64_t);

struct Path {
  const char* name;
  DecodeFn decode;
  DotFn dot;
  AxpyFn axpy;
  GemvFn gemv_in, gemv_out;
};

// The factor shapes: scale groups that do and do not divide a row, odd sizes, and those the register kernels take.
struct Shape {
  Format format;
  int64_t k, n, bs;
};

const Shape kShapes[] = {
    {Format::kNf4, 7, 384, 64},   {Format::kNf4, 96, 384, 64},  {Format::kNf4, 5, 431, 64},  {Format::kNf4, 3, 70, 6},
    {Format::kNf4, 9, 33, 2},     {Format::kNf4, 13, 768, 128}, {Format::kNf4, 6, 96, 32},   {Format::kNf4, 40, 64, 64},
    {Format::kInt8, 7, 384, 0},   {Format::kInt8, 9, 431, 0},   {Format::kInt8, 11, 768, 32}, {Format::kInt8, 5, 100, 7},
    {Format::kInt8, 33, 96, 96},  {Format::kInt8, 3, 17, 0},    {Format::kInt8, 24, 800, 32},
};

int64_t run(const Path& p) {
  int64_t cases = 0;
  for (const Shape& s : kShapes) {
    const Made m = make(s.format, s.k, s.n, s.bs);
    const Codes& f = m.codes;
    const std::string tag = std::string(p.name) + (s.format == Format::kNf4 ? " nf4 " : " int8 ") +
                            std::to_string(s.k) + "x" + std::to_string(s.n) + " bs " + std::to_string(s.bs);
    // decoding: random runs, and whole rows
    const int64_t numel = s.k * s.n;
    std::vector<float> want(static_cast<size_t>(numel)), got(static_cast<size_t>(numel));
    for (int t = 0; t < 60; ++t) {
      const int64_t e0 = t < s.k ? t * s.n : uniform(0, numel - 1);
      const int64_t len = t < s.k ? s.n : uniform(0, std::min<int64_t>(numel - e0, 700));
      scalar_decode(f, e0, len, want.data());
      std::fill(got.begin(), got.end(), -7.0f);
      p.decode(f, e0, len, got.data());
      for (int64_t i = 0; i < len; ++i)
        if (std::memcmp(&want[i], &got[i], sizeof(float)) != 0)
          fail(tag + " decode from " + std::to_string(e0) + " len " + std::to_string(len) + " at " + std::to_string(i));
      if (len < numel && got[len] != -7.0f) fail(tag + " decode wrote past its run");
      ++cases;
    }
    // dot / axpy on rows of the decoded factor
    const std::vector<float> w = dense(f);
    const std::vector<float> x = randn(std::max(s.n, s.k));
    for (int64_t n = 0; n <= s.n; n += (n < 40 ? 1 : 37)) {
      double exact = 0, abs_sum = 0;
      for (int64_t i = 0; i < n; ++i) exact += double(w[i]) * x[i], abs_sum += std::fabs(double(w[i]) * x[i]);
      check_sum(p.dot(w.data(), x.data(), n), exact, abs_sum, n, tag + " dot n " + std::to_string(n));
      std::vector<float> y(x.begin(), x.begin() + n);
      p.axpy(y.data(), 0.75f, w.data(), n);
      for (int64_t i = 0; i < n; ++i)
        check_sum(y[i], double(x[i]) + 0.75 * w[i], std::fabs(x[i]) + std::fabs(0.75 * w[i]), 1, tag + " axpy");
      ++cases;
    }
    if (p.gemv_in == nullptr || !fused_ok(f)) continue;
    // h[r] = A[r]·x over rank ranges, y[c0:c1] += h·B[:, c0:c1] over column ranges (multiples of 32)
    for (int t = 0; t < 6; ++t) {
      const int64_t r0 = t == 0 ? 0 : uniform(0, s.k - 1), r1 = t == 0 ? s.k : uniform(r0, s.k);
      std::vector<float> h(static_cast<size_t>(s.k), -7.0f);
      p.gemv_in(f, x.data(), h.data(), r0, r1);
      for (int64_t r = 0; r < s.k; ++r) {
        if (r < r0 || r >= r1) {
          if (h[r] != -7.0f) fail(tag + " gemv_in wrote outside its rows");
          continue;
        }
        double exact = 0, abs_sum = 0;
        for (int64_t c = 0; c < s.n; ++c) exact += double(w[r * s.n + c]) * x[c], abs_sum += std::fabs(double(w[r * s.n + c]) * x[c]);
        check_sum(h[r], exact, abs_sum, s.n, tag + " gemv_in row " + std::to_string(r));
      }
      const int64_t groups = s.n / 32, g0 = t == 0 ? 0 : uniform(0, groups), g1 = t == 0 ? groups : uniform(g0, groups);
      const std::vector<float> hk = randn(s.k), y0 = randn(s.n);
      std::vector<float> y = y0;
      p.gemv_out(f, hk.data(), y.data(), 32 * g0, 32 * g1);
      for (int64_t c = 0; c < s.n; ++c) {
        if (c < 32 * g0 || c >= 32 * g1) {
          if (y[c] != y0[c]) fail(tag + " gemv_out wrote outside its columns");
          continue;
        }
        double exact = y0[c], abs_sum = std::fabs(y0[c]);
        for (int64_t r = 0; r < s.k; ++r) exact += double(hk[r]) * w[r * s.n + c], abs_sum += std::fabs(double(hk[r]) * w[r * s.n + c]);
        check_sum(y[c], exact, abs_sum, s.k + 1, tag + " gemv_out column " + std::to_string(c));
      }
      cases += 2;
    }
  }
  return cases;
}

// row_chunk as the extension dispatches it (whatever this CPU and ADAPTWIN_CPU_CAP pick), over a run in one row.
void decode_dispatched(const Codes& f, int64_t e0, int64_t len, float* out) {
  while (len > 0) {
    const int64_t r = e0 / f.n, c = e0 % f.n, seg = std::min(len, f.n - c);
    const float* w = row_chunk(f, r, c, seg, out);
    if (w != out) std::copy(w, w + seg, out);
    e0 += seg, len -= seg, out += seg;
  }
}

// y = (x·Aᵀ)·B for one row of x, A and B (k, n) factors: the rank_linear decode path's two products as the
// extension runs them on a CPU without AVX-512 (rank_linear_products.h), "buffered" (chunks decoded by `decode`,
// then dot / axpy) or "register" (the batch-1 register-decode kernels).
void product(const Path& p, bool registers, const Codes& a, const Codes& b, const float* x, float* h, float* y) {
  if (registers) {
    p.gemv_in(a, x, h, 0, a.k);
    p.gemv_out(b, h, y, 0, b.n);
    return;
  }
  constexpr int64_t kChunk = 512;  // as rank_linear_decode.h
  float buf[kChunk];
  for (int64_t r = 0; r < a.k; ++r) {
    float acc = 0;
    for (int64_t c = 0; c < a.n; c += kChunk) {
      const int64_t len = std::min(kChunk, a.n - c);
      p.decode(a, r * a.n + c, len, buf);
      acc += p.dot(buf, x + c, len);
    }
    h[r] = acc;
  }
  for (int64_t c = 0; c < b.n; c += kChunk) {
    const int64_t len = std::min(kChunk, b.n - c);
    for (int64_t r = 0; r < b.k; ++r) {
      p.decode(b, r * b.n + c, len, buf);
      p.axpy(y + c, h[r], buf, len);
    }
  }
}

// A dense float32 GEMV y = W·x (W (n, n)) with this path's dot: the dense layer's arithmetic, for counting.
void dense_gemv(const Path& p, const float* w, const float* x, float* y, int64_t n) {
  for (int64_t r = 0; r < n; ++r) y[r] = p.dot(w + r * n, x, n);
}

// --- GELU ------------------------------------------------------------------------------------------------

using GeluFn = void (*)(float*, int64_t);
using GeluBf16Fn = void (*)(uint16_t*, int64_t);

double gelu64(double x) { return 0.5 * x * std::erfc(-x / std::sqrt(2.0)); }

// One value's check: NaN for NaN and -inf, +inf for +inf, the sign of zero kept, else within 5e-7·|x| (+ the
// rounding to bfloat16, 2^-8 of the value, where bf16) of the float64 GELU.
void check_gelu(float x, float got, bool bf16, const std::string& what) {
  bool ok;
  if (std::isnan(x) || (std::isinf(x) && x < 0)) {
    ok = std::isnan(got);
  } else if (std::isinf(x)) {
    ok = std::isinf(got) && got > 0;
  } else if (x == 0.0f) {
    ok = got == 0.0f && std::signbit(got) == std::signbit(x);
  } else {
    const double want = gelu64(x);
    ok = std::fabs(got - want) <= 5e-7 * std::fabs(x) + (bf16 ? std::ldexp(std::fabs(want), -8) : 0.0) + 1e-38;
  }
  if (!ok)
    fail(what + ": gelu(" + std::to_string(x) + ") gave " + std::to_string(got) + ", want " + std::to_string(gelu64(x)));
}

std::vector<float> gelu_inputs(int64_t n) {
  std::vector<float> v = randn(n);
  for (size_t i = 0; i < v.size(); ++i) v[i] *= (i % 3 == 0) ? 6.0f : 1.5f;
  const float specials[] = {0.0f, -0.0f, NAN, INFINITY, -INFINITY, -12.0f, 12.0f, -5.3f, 1e-30f, -1e-30f, -87.0f, 200.0f};
  for (size_t i = 0; i < v.size() && i < 12; ++i) v[(i * 7) % v.size()] = specials[i];
  return v;
}

int64_t run_gelu(GeluFn f32, GeluBf16Fn bf16, const std::string& name) {
  int64_t cases = 0;
  std::vector<int64_t> lengths;
  for (int64_t n = 0; n <= 40; ++n) lengths.push_back(n);
  for (int64_t n : {63, 64, 65, 1000, 1536}) lengths.push_back(n);
  for (int64_t n : lengths) {
    const std::vector<float> x = gelu_inputs(n);
    std::vector<float> y = x;
    y.push_back(123.0f);  // a guard past the end
    f32(y.data(), n);
    if (y[n] != 123.0f) fail(name + " float32 wrote past its end");
    for (int64_t i = 0; i < n; ++i) check_gelu(x[i], y[i], false, name + " float32 n " + std::to_string(n));
    std::vector<uint16_t> b(static_cast<size_t>(n + 1), 0x4321);
    for (int64_t i = 0; i < n; ++i) b[i] = float_to_bf16(x[i]);
    bf16(b.data(), n);
    if (b[n] != 0x4321) fail(name + " bfloat16 wrote past its end");
    for (int64_t i = 0; i < n; ++i)
      check_gelu(bf16_to_float(float_to_bf16(x[i])), bf16_to_float(b[i]), true, name + " bfloat16 n " + std::to_string(n));
    cases += 2;
  }
  return cases;
}

void gelu_scalar_f32(float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_scalar(y[i]);
}

void gelu_scalar_bf16(uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(gelu_scalar(bf16_to_float(y[i])));
}

// gelu_inplace as the extension dispatches it; where this process has no SIMD path (the portable cap) it
// writes nothing, and the extension leaves the call to ATen: the scalar formula stands in, so that the check runs.
void gelu_dispatched_f32(float* y, int64_t n) {
  if (!gelu_inplace(y, n, false)) gelu_scalar_f32(y, n);
}

void gelu_dispatched_bf16(uint16_t* y, int64_t n) {
  if (!gelu_inplace(y, n, true)) gelu_scalar_bf16(y, n);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Path> paths = {{"scalar", scalar_decode, dot_scalar, axpy_scalar, nullptr, nullptr},
                             {"dispatched", decode_dispatched, dot, axpy, nullptr, nullptr}};
#if ADAPTWIN_X86
  if (__builtin_cpu_supports("avx512f")) paths.push_back({"avx512", decode_run<nf4_avx512, int8_avx512>, dot_avx512, axpy_avx512, nullptr, nullptr});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    paths.push_back({"avx2", decode_run<nf4_avx2, int8_avx2>, dot_avx2, axpy_avx2, gemv_in_avx2, gemv_out_avx2});
#endif
#if ADAPTWIN_NEON
  paths.push_back({"neon", decode_run<nf4_neon, int8_neon>, dot_neon, axpy_neon, gemv_in_neon, gemv_out_neon});
#endif
  if (argc == 8 && std::string(argv[1]) == "run") {
    // run PATH KIND FORMAT N K CALLS: CALLS products at width N, rank K, for counting what one costs (the
    // instructions of CALLS = 2 minus those of CALLS = 1, under `qemu -singlestep -d exec`: see
    // benchmarks/simd_instructions.py). KIND: buffered, register or dense (FORMAT then ignored).
    const std::string name = argv[2], kind = argv[3], format = argv[4];
    const int64_t n = std::atoll(argv[5]), k = std::atoll(argv[6]), calls = std::atoll(argv[7]);
    const Path* p = nullptr;
    for (const Path& q : paths)
      if (name == q.name) p = &q;
    if (p == nullptr || (kind == "register" && p->gemv_in == nullptr)) fail("no path " + name + " " + kind + " here");
    const Made a = make(format == "nf4" ? Format::kNf4 : Format::kInt8, k, n, format == "nf4" ? 64 : 0);
    const Made b = make(format == "nf4" ? Format::kNf4 : Format::kInt8, k, n, format == "nf4" ? 64 : 0);
    const std::vector<float> x = randn(n), w = kind == "dense" ? uniform_floats(n * n) : std::vector<float>();
    std::vector<float> h(static_cast<size_t>(k)), y(static_cast<size_t>(n));
    for (int64_t i = 0; i < calls; ++i) {
      if (kind == "dense")
        dense_gemv(*p, w.data(), x.data(), y.data(), n);
      else
        product(*p, kind == "register", a.codes, b.codes, x.data(), h.data(), y.data());
    }
    std::printf("y[0] %g\n", static_cast<double>(y[0]));
    return 0;
  }
  for (const Path& p : paths) std::printf("%s ok %lld\n", p.name, static_cast<long long>(run(p)));
  std::printf("gelu_scalar ok %lld\n", static_cast<long long>(run_gelu(gelu_scalar_f32, gelu_scalar_bf16, "gelu_scalar")));
  std::printf("gelu_dispatched ok %lld\n",
              static_cast<long long>(run_gelu(gelu_dispatched_f32, gelu_dispatched_bf16, "gelu_dispatched")));
#if ADAPTWIN_X86
  if (__builtin_cpu_supports("avx512f"))
    std::printf("gelu_avx512 ok %lld\n", static_cast<long long>(run_gelu(gelu_f32_avx512, gelu_bf16_avx512, "gelu_avx512")));
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    std::printf("gelu_avx2 ok %lld\n", static_cast<long long>(run_gelu(gelu_f32_avx2, gelu_bf16_avx2, "gelu_avx2")));
#endif
#if ADAPTWIN_NEON
  std::printf("gelu_neon ok %lld\n", static_cast<long long>(run_gelu(gelu_f32_neon, gelu_bf16_neon, "gelu_neon")));
#endif
  return 0;
}
