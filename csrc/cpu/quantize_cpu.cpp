// CPU kernels for the exactq ops. Schemas live in exactq/_ops.py; the specification of every op is
// the plain-PyTorch reference in exactq/reference.py, which these kernels match bit for bit.
//
// Layout: the input is flattened row-major and cut into blocks of `block_size` elements (the last may
// be partial). Each block is processed by one thread in two passes over data that is hot in cache:
// min/max, then round + pack. Threads own groups of whole blocks that end on a byte boundary of the
// packed output, so no byte is written by two threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>
#include <limits>

#include "../checks.h"
#include "../common.h"
#include "int8_rows.h"

namespace exactq {
namespace cpu {
namespace {

// Elements per inner span: bounds the per-thread code buffer, and spans never straddle a multiple of
// 2^32 in the element index, so the hash key for the upper index bits is constant inside a span.
constexpr int64_t kSpan = 4096;
// Elements per parallel task, so small blocks are batched and thread start-up is amortised.
constexpr int64_t kGrainElements = 1 << 16;

struct MinMax {
  float mn, mx;
  bool finite;
};

inline bool non_finite(float v) { return (float_bits(v) & 0x7F800000u) == 0x7F800000u; }

#if defined(__x86_64__)
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

// float min/max: GCC keeps the lanes of the generic loop below in scalar registers (it was a fifth of
// quantize's time), so this spells out AVX2. _mm256_min_ps(v, m) is `v < m ? v : m`, the same
// selection as the scalar code; the order of lanes cannot change the result (-0/+0 are unified later,
// a NaN or Inf makes the block non-finite).
__attribute__((target("avx2"))) MinMax block_minmax_float_avx2(const float* x, int64_t n) {
  const __m256i expo = _mm256_set1_epi32(0x7F800000);
  __m256 mn0 = _mm256_set1_ps(std::numeric_limits<float>::infinity()), mn1 = mn0;
  __m256 mx0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), mx1 = mx0;
  __m256i bad = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + j), v1 = _mm256_loadu_ps(x + j + 8);
    mn0 = _mm256_min_ps(v0, mn0);
    mx0 = _mm256_max_ps(v0, mx0);
    mn1 = _mm256_min_ps(v1, mn1);
    mx1 = _mm256_max_ps(v1, mx1);
    const __m256i e = _mm256_or_si256(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v0), expo), expo),
                                      _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v1), expo), expo));
    bad = _mm256_or_si256(bad, e);
  }
  alignas(32) float mn[8], mx[8];
  _mm256_store_ps(mn, _mm256_min_ps(mn0, mn1));
  _mm256_store_ps(mx, _mm256_max_ps(mx0, mx1));
  MinMax r{mn[0], mx[0], _mm256_testz_si256(bad, bad) != 0};
  for (int k = 1; k < 8; ++k) {
    r.mn = mn[k] < r.mn ? mn[k] : r.mn;
    r.mx = mx[k] > r.mx ? mx[k] : r.mx;
  }
  for (; j < n; ++j) {
    r.mn = x[j] < r.mn ? x[j] : r.mn;
    r.mx = x[j] > r.mx ? x[j] : r.mx;
    r.finite = r.finite && !non_finite(x[j]);
  }
  return r;
}
#endif

// Other dtypes, or no AVX2: the same selections on independent lanes, no -ffast-math needed.
template <typename T>
__attribute__((target_clones("avx2", "default"))) MinMax block_minmax_generic(const T* x, int64_t n) {
  constexpr int W = 16;
  std::array<float, W> mn, mx;
  std::array<uint32_t, W> bad;
  mn.fill(std::numeric_limits<float>::infinity());
  mx.fill(-std::numeric_limits<float>::infinity());
  bad.fill(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    for (int k = 0; k < W; ++k) {
      const float v = static_cast<float>(x[j + k]);
      mn[k] = v < mn[k] ? v : mn[k];
      mx[k] = v > mx[k] ? v : mx[k];
      bad[k] |= static_cast<uint32_t>(non_finite(v));
    }
  }
  for (; j < n; ++j) {
    const float v = static_cast<float>(x[j]);
    mn[0] = v < mn[0] ? v : mn[0];
    mx[0] = v > mx[0] ? v : mx[0];
    bad[0] |= static_cast<uint32_t>(non_finite(v));
  }
  MinMax r{mn[0], mx[0], bad[0] == 0};
  for (int k = 1; k < W; ++k) {
    r.mn = mn[k] < r.mn ? mn[k] : r.mn;
    r.mx = mx[k] > r.mx ? mx[k] : r.mx;
    r.finite = r.finite && bad[k] == 0;
  }
  return r;
}

template <typename T>
MinMax block_minmax(const T* x, int64_t n) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx2()) return block_minmax_float_avx2(x, n);
  }
#endif
  return block_minmax_generic(x, n);
}

template <typename T, bool NU>
__attribute__((target_clones("avx2", "default"))) void round_span(
    const T* __restrict x, int64_t n, const RoundParams p, float lo, float range, RngKeys keys,
    uint32_t key_hi, uint32_t index_lo, uint8_t* __restrict codes) {
  // A 32-bit counter (n <= kSpan) keeps the index arithmetic in 32-bit lanes when vectorised.
  const uint32_t n32 = static_cast<uint32_t>(n);
  for (uint32_t j = 0; j < n32; ++j) {
    const float u = uniform_lo(keys, key_hi, index_lo + j);
    codes[j] = static_cast<uint8_t>(round_code<NU>(p, static_cast<float>(x[j]), lo, range, u));
  }
}

// The 8 / B codes (one per byte, little-endian) of `w` packed into one byte, code c at bit c * B, by
// one multiply: each code is copied to bit offsets that do not overlap (so nothing carries) and the
// wanted copies line up in one byte.
template <int B>
inline uint8_t pack_word(uint64_t w) {
  if constexpr (B == 1) return static_cast<uint8_t>((w * 0x0102040810204080ull) >> 56);
  if constexpr (B == 2) return static_cast<uint8_t>((static_cast<uint32_t>(w) * 0x41041u) >> 18);
  if constexpr (B == 4) return static_cast<uint8_t>((w | (w >> 4)) & 0xFFu);
  return static_cast<uint8_t>(w);
}

template <int B>
__attribute__((target_clones("avx2", "default"))) void pack_whole_bytes(const uint8_t* __restrict codes,
                                                                         int64_t nbytes, uint8_t* __restrict dst) {
  constexpr int cpb = 8 / B;
  for (int64_t k = 0; k < nbytes; ++k) {
    uint64_t w = 0;
    std::memcpy(&w, codes + k * cpb, cpb);
    dst[k] = pack_word<B>(w);
  }
}

// Writes codes of elements [i0, i0 + n) into the packed buffer (zero-initialised): whole bytes are
// stored, the partial bytes at either end (shared with a neighbouring span) are OR-ed.
void pack_span(const uint8_t* codes, int64_t n, int64_t i0, int bits, uint8_t* out) {
  const int cpb = 8 / bits;
  int64_t j = 0;
  for (; j < n && (i0 + j) % cpb != 0; ++j) {
    out[(i0 + j) / cpb] |= static_cast<uint8_t>(codes[j] << (((i0 + j) % cpb) * bits));
  }
  uint8_t* dst = out + (i0 + j) / cpb;
  const int64_t whole = (n - j) / cpb;
  switch (bits) {
    case 1: pack_whole_bytes<1>(codes + j, whole, dst); break;
    case 2: pack_whole_bytes<2>(codes + j, whole, dst); break;
    case 4: pack_whole_bytes<4>(codes + j, whole, dst); break;
    default: std::copy(codes + j, codes + j + whole, dst);
  }
  j += whole * cpb;
  for (; j < n; ++j) {
    out[(i0 + j) / cpb] |= static_cast<uint8_t>(codes[j] << (((i0 + j) % cpb) * bits));
  }
}

// Calls f(begin, end) for each block owned by parallel task range [g0, g1) of byte-aligned groups.
template <typename F>
void for_each_block_parallel(int64_t numel, int64_t block_size, int bits, const F& f) {
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  const int64_t m = blocks_per_byte_group(block_size, bits);
  const int64_t ngroups = (nblocks + m - 1) / m;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (m * block_size));
  at::parallel_for(0, ngroups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t b1 = std::min(nblocks, g1 * m);
    for (int64_t b = g0 * m; b < b1; ++b) {
      f(b, b * block_size, std::min(numel, (b + 1) * block_size));
    }
  });
}

// Splits [begin, end) at multiples of kSpan and calls f(span_begin, span_end).
template <typename F>
void for_each_span(int64_t begin, int64_t end, const F& f) {
  for (int64_t s = begin; s < end;) {
    const int64_t e = std::min(end, (s / kSpan + 1) * kSpan);
    f(s, e);
    s = e;
  }
}

template <typename T>
void quantize_impl(const at::Tensor& x, const Grid& g, int64_t block_size, int64_t seed,
                   uint8_t* packed, uint16_t* stats) {
  const T* xp = x.const_data_ptr<T>();
  const RngKeys keys = make_keys(seed);
  const RoundParams rp = make_round_params(g);
  for_each_block_parallel(x.numel(), block_size, g.bits, [&](int64_t b, int64_t begin, int64_t end) {
    const MinMax r = block_minmax(xp + begin, end - begin);
    block_stats(r.mn, r.mx, r.finite, &stats[2 * b], &stats[2 * b + 1]);
    const float lo = bf16_to_float(stats[2 * b]);
    const float range = bf16_to_float(stats[2 * b + 1]);
    // Non-finite and constant blocks keep the all-zero codes of the zero-initialised output.
    if (!r.finite || range == 0.0f) return;
    uint8_t codes[kSpan];
    for_each_span(begin, end, [&](int64_t s, int64_t e) {
      const uint32_t key_hi = span_key(keys, static_cast<uint64_t>(s) >> 32);
      const uint32_t index_lo = static_cast<uint32_t>(s);
      if (g.nonuniform) {
        round_span<T, true>(xp + s, e - s, rp, lo, range, keys, key_hi, index_lo, codes);
      } else {
        round_span<T, false>(xp + s, e - s, rp, lo, range, keys, key_hi, index_lo, codes);
      }
      pack_span(codes, e - s, s, g.bits, packed);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& input, int64_t bits,
                                                 int64_t block_size, std::optional<double> level,
                                                 int64_t seed) {
  check_args(bits, block_size, level.has_value());
  check_quantize_input(input);
  const at::Tensor x = input.contiguous();
  const int64_t numel = x.numel();
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  at::Tensor packed = at::zeros({(numel * bits + 7) / 8}, x.options().dtype(at::kByte));
  at::Tensor stats = at::empty({nblocks, 2}, x.options().dtype(at::kBFloat16));
  Grid g;
  make_grid(&g, static_cast<int>(bits), level.has_value(), level.value_or(0.0));
  uint8_t* pp = packed.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(stats.data_ptr<at::BFloat16>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "exactq_quantize", [&] {
    quantize_impl<scalar_t>(x, g, block_size, seed, pp, sp);
  });
  return {packed, stats};
}

#if defined(__x86_64__)
// float output, bits <= 4: eight codes per step, looked up in a table held in two registers (vpermps),
// so there is no per-element gather. The values are the same floats as the scalar path's table.
template <int B>
__attribute__((target("avx2"))) int64_t unpack_float_avx2(const uint8_t* src, int64_t nbytes, const float* lut,
                                                         float* dst) {
  using Word = std::conditional_t<B == 1, uint8_t, std::conditional_t<B == 2, uint16_t, uint32_t>>;
  const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  const __m256 lo = _mm256_loadu_ps(lut);
  const __m256 hi = _mm256_loadu_ps(lut + 8);
  const int64_t groups = nbytes / B;  // eight codes occupy B bytes
  for (int64_t k = 0; k < groups; ++k) {
    Word w;
    std::memcpy(&w, src + k * B, B);  // little-endian: code c sits at bit c * B
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shifts), mask);
    __m256 v = _mm256_permutevar8x32_ps(lo, idx);
    if constexpr (B == 4) {  // 16 levels: take the upper half where bit 3 of the code is set
      v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
    _mm256_storeu_ps(dst + 8 * k, v);
  }
  return groups * 8;
}
#endif

// lut must hold at least 16 initialised entries (the AVX2 path loads lut[0..15]).
template <typename T>
__attribute__((target_clones("avx2", "default"))) void unpack_span(
    const uint8_t* packed, int64_t n, int64_t i0, int bits, const float* lut, T* out) {
  const int cpb = 8 / bits;
  const uint32_t mask = (1u << bits) - 1;
  int64_t j = 0;
  auto one = [&](int64_t i) { return lut[(packed[i / cpb] >> ((i % cpb) * bits)) & mask]; };
  for (; j < n && (i0 + j) % cpb != 0; ++j) out[j] = static_cast<T>(one(i0 + j));
  const uint8_t* src = packed + (i0 + j) / cpb;
  int64_t whole = (n - j) / cpb;
  T* dst = out + j;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (bits <= 4 && has_avx2()) {
      const int64_t done = bits == 1   ? unpack_float_avx2<1>(src, whole, lut, dst)
                           : bits == 2 ? unpack_float_avx2<2>(src, whole, lut, dst)
                                       : unpack_float_avx2<4>(src, whole, lut, dst);
      j += done;
      src += done / cpb;
      dst += done;
      whole -= done / cpb;
    }
  }
#endif
  for (int64_t k = 0; k < whole; ++k) {
    const uint32_t b = src[k];
    for (int c = 0; c < cpb; ++c) dst[k * cpb + c] = static_cast<T>(lut[(b >> (c * bits)) & mask]);
  }
  j += whole * cpb;
  for (; j < n; ++j) out[j] = static_cast<T>(one(i0 + j));
}

// Elements [begin, end) of a quantized tensor decoded into out[0 .. end - begin): each block's levels
// in a table (lo + range * level, in float32), codes unpacked through it.
template <typename T>
void decode_range(const uint8_t* pp, const uint16_t* sp, const Grid& g, int64_t block_size, int64_t begin,
                  int64_t end, T* out) {
  float lut[256];
  for (int64_t b = begin / block_size; b * block_size < end; ++b) {
    const float lo = bf16_to_float(sp[2 * b]);
    const float range = bf16_to_float(sp[2 * b + 1]);
    for (int k = 0; k <= g.top; ++k) lut[k] = lo + range * g.levels[k];
    for (int k = g.top + 1; k < 16; ++k) lut[k] = 0.0f;
    const int64_t s = std::max(begin, b * block_size), e = std::min(end, (b + 1) * block_size);
    for_each_span(s, e, [&](int64_t s2, int64_t e2) { unpack_span<T>(pp, e2 - s2, s2, g.bits, lut, out + (s2 - begin)); });
  }
}

void dequantize_into_cpu(const at::Tensor& packed, const at::Tensor& stats, int64_t bits, int64_t block_size,
                         std::optional<double> level, const at::Tensor& out) {
  check_args(bits, block_size, level.has_value());
  const int64_t numel = out.numel();
  check_dequantize_inputs(packed, stats, bits, block_size, numel, out.scalar_type());
  check_out(out, packed, numel, out.scalar_type());
  Grid g;
  make_grid(&g, static_cast<int>(bits), level.has_value(), level.value_or(0.0));
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(stats.const_data_ptr<at::BFloat16>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "exactq_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_block_parallel(numel, block_size, g.bits, [&](int64_t b, int64_t begin, int64_t end) {
      decode_range<scalar_t>(pp, sp, g, block_size, begin, end, op + begin);
    });
  });
}

at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& stats, int64_t bits,
                          int64_t block_size, std::optional<double> level, c10::SymInt numel_s,
                          at::ScalarType dtype) {
  at::Tensor out = at::empty({numel_s.expect_int()}, packed.options().dtype(dtype));
  dequantize_into_cpu(packed, stats, bits, block_size, level, out);
  return out;
}

// dequantize, viewed as [rows, cols], then int8_quantize(dim=1) of it, without the float32 tensor: each
// task decodes a few rows into a buffer that stays in cache and makes their scales and codes from it.
std::tuple<at::Tensor, at::Tensor> dequantize_int8_cpu(const at::Tensor& packed, const at::Tensor& stats, int64_t bits,
                                                       int64_t block_size, std::optional<double> level,
                                                       c10::SymInt rows_s, c10::SymInt cols_s,
                                                       std::optional<int64_t> seed) {
  check_args(bits, block_size, level.has_value());
  const int64_t R = rows_s.expect_int(), C = cols_s.expect_int();
  TORCH_CHECK(R >= 0 && C >= 0, "exactq: dequantize_int8 needs rows >= 0 and cols >= 0, got ", R, " and ", C);
  check_dequantize_inputs(packed, stats, bits, block_size, R * C, at::kFloat);
  at::Tensor q = at::empty({R, C}, packed.options().dtype(at::kChar));
  at::Tensor scale = at::empty({R}, packed.options().dtype(at::kFloat));
  Grid g;
  make_grid(&g, static_cast<int>(bits), level.has_value(), level.value_or(0.0));
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(stats.const_data_ptr<at::BFloat16>());
  const RngKeys keys = make_keys(seed.value_or(0));
  float* scp = scale.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  const int64_t grain = std::max<int64_t>(1, kSpan / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(std::min(grain, r1 - r0) * C));
    for (int64_t b0 = r0; b0 < r1; b0 += grain) {
      const int64_t b1 = std::min(r1, b0 + grain);
      decode_range(pp, sp, g, block_size, b0 * C, b1 * C, buf.data());
      int8_rows(buf.data(), b0, b1, C, seed.has_value(), keys, scp, qp);
    }
  });
  return {q, scale};
}

#if defined(__x86_64__)
// float32 input: eight compares and one movemask per output byte.
__attribute__((target("avx2"))) int64_t pack_mask_float_avx2(const float* x, int64_t b0, int64_t b1,
                                                             bool positive, uint8_t* out) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t k = b0; k < b1; ++k) {
    const __m256 v = _mm256_loadu_ps(x + 8 * k);
    const __m256 m = positive ? _mm256_cmp_ps(v, zero, _CMP_GT_OQ) : _mm256_cmp_ps(v, zero, _CMP_NEQ_UQ);
    out[k] = static_cast<uint8_t>(_mm256_movemask_ps(m));
  }
  return b1;
}
#endif

// Packs bytes [b0, b1) of the output.
template <typename T>
__attribute__((target_clones("avx2", "default"))) void pack_mask_range(const T* x, int64_t b0, int64_t b1,
                                                                        int64_t numel, bool positive,
                                                                        uint8_t* out) {
  const int64_t whole = std::min(b1, numel / 8);  // bytes with all eight elements present
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx2() && b0 < whole) b0 = pack_mask_float_avx2(x, b0, whole, positive, out);
  }
#endif
  for (int64_t k = b0; k < b1; ++k) {
    uint32_t b = 0;
    const int64_t base = k * 8;
    const int c_end = static_cast<int>(std::min<int64_t>(8, numel - base));
    for (int c = 0; c < c_end; ++c) b |= static_cast<uint32_t>(mask_bit(x[base + c], positive)) << c;
    out[k] = static_cast<uint8_t>(b);
  }
}

at::Tensor pack_mask_cpu(const at::Tensor& input, bool positive) {
  check_pack_mask_input(input);
  const at::Tensor x = input.contiguous();
  const int64_t numel = x.numel();
  const int64_t nbytes = (numel + 7) / 8;
  at::Tensor out = at::empty({nbytes}, x.options().dtype(at::kByte));
  uint8_t* op = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "exactq_pack_mask", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, nbytes, kGrainElements / 8, [&](int64_t b0, int64_t b1) {
      pack_mask_range<scalar_t>(xp, b0, b1, numel, positive, op);
    });
  });
  return out;
}

#if defined(__x86_64__)
// float32 output: each byte becomes eight lanes, all-ones where the bit is set, AND-ed with the value.
__attribute__((target("avx2"))) int64_t unpack_mask_float_avx2(const uint8_t* p, int64_t b0, int64_t b1,
                                                               float value, float* out) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 v = _mm256_set1_ps(value);
  for (int64_t k = b0; k < b1; ++k) {
    const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(p[k]), bit), bit);
    _mm256_storeu_ps(out + 8 * k, _mm256_and_ps(_mm256_castsi256_ps(m), v));
  }
  return b1;
}
#endif

// Unpacks the elements of bytes [b0, b1): bit set -> value, else 0 (for bool, the bit itself).
template <typename T>
__attribute__((target_clones("avx2", "default"))) void unpack_mask_range(const uint8_t* p, int64_t b0,
                                                                          int64_t b1, int64_t numel,
                                                                          T value, T* out) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    const int64_t whole = std::min(b1, numel / 8);
    if (has_avx2() && b0 < whole) b0 = unpack_mask_float_avx2(p, b0, whole, value, out);
  }
#endif
  for (int64_t k = b0; k < b1; ++k) {
    const uint32_t b = p[k];
    const int c_end = static_cast<int>(std::min<int64_t>(8, numel - k * 8));
    for (int c = 0; c < c_end; ++c) out[k * 8 + c] = ((b >> c) & 1u) ? value : T(0);
  }
}

void unpack_mask_into_cpu(const at::Tensor& packed, const std::optional<at::Tensor>& value, const at::Tensor& out) {
  const int64_t numel = out.numel();
  check_unpack_mask_inputs(packed, numel, value);
  check_out(out, packed, numel, value.has_value() ? value->scalar_type() : at::kBool);
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, out.scalar_type(), "exactq_unpack_mask", [&] {
    const scalar_t v = value.has_value() ? value->item<scalar_t>() : scalar_t(1);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, (numel + 7) / 8, kGrainElements / 8, [&](int64_t b0, int64_t b1) {
      unpack_mask_range<scalar_t>(pp, b0, b1, numel, v, op);
    });
  });
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, c10::SymInt numel_s, const std::optional<at::Tensor>& value) {
  const at::ScalarType dtype = value.has_value() ? value->scalar_type() : at::kBool;
  at::Tensor out = at::empty({numel_s.expect_int()}, packed.options().dtype(dtype));
  unpack_mask_into_cpu(packed, value, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(exactq, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("dequantize_into", &dequantize_into_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask", &unpack_mask_cpu);
  m.impl("unpack_mask_into", &unpack_mask_into_cpu);
}

}  // namespace cpu
}  // namespace exactq
