// Scalar building blocks shared by every exactq kernel (CPU and CUDA).
//
// Everything here is integer or exactly-rounded IEEE float32 arithmetic, so the CPU kernel, the CUDA
// kernel and the plain-PyTorch reference (exactq/reference.py) compute bit-identical codes and
// statistics. Build with FMA contraction off (-ffp-contract=off, nvcc --fmad=false): a fused
// multiply-add rounds once instead of twice and would break that equality.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define EXACTQ_HD __host__ __device__ __forceinline__
#else
#define EXACTQ_HD inline __attribute__((always_inline))
#endif

namespace exactq {

// 2^-24: turns the top 24 bits of a hash into a uniform float in [0, 1), exactly.
constexpr float kInv2p24 = 1.0f / 16777216.0f;
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint16_t kBf16NaN = 0x7FC0u;

// Chris Wellons' "lowbias32" integer hash: a bijection on 32 bits with good avalanche.
EXACTQ_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Per-call keys derived from the 63-bit seed.
struct RngKeys {
  uint32_t k0, k1;
};

EXACTQ_HD RngKeys make_keys(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  RngKeys k;
  k.k0 = lowbias32(static_cast<uint32_t>(s) ^ 0x243F6A88u);
  k.k1 = lowbias32(static_cast<uint32_t>(s >> 32) ^ k.k0 ^ 0x85A308D3u);
  return k;
}

// Key for the span of element indices whose upper 32 bits equal `hi`.
EXACTQ_HD uint32_t span_key(RngKeys k, uint64_t hi) {
  return k.k1 ^ (static_cast<uint32_t>(hi) * kGolden);
}

// Counter-based uniform in [0, 1): a pure function of (seed, element index).
EXACTQ_HD float uniform_lo(RngKeys k, uint32_t key_hi, uint32_t index_lo) {
  uint32_t h = lowbias32(index_lo ^ k.k0);
  h = lowbias32(h ^ key_hi);
  return static_cast<float>(h >> 8) * kInv2p24;
}

EXACTQ_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
#endif
}

EXACTQ_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
#endif
}

// bfloat16 is the top half of a float32; these round toward -inf / +inf instead of to nearest, so
// that the stored [min, min + range] still contains every value of the block.
EXACTQ_HD uint16_t bf16_round_down(float v) {
  const uint32_t b = float_bits(v);
  uint32_t hi = b >> 16;
  if ((b & 0xFFFFu) && (b >> 31)) hi += 1;  // negative and inexact: one step away from zero
  return static_cast<uint16_t>(hi);
}

EXACTQ_HD uint16_t bf16_round_up(float v) {
  const uint32_t b = float_bits(v);
  uint32_t hi = b >> 16;
  if ((b & 0xFFFFu) && !(b >> 31)) hi += 1;
  return static_cast<uint16_t>(hi);
}

EXACTQ_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Block statistics, stored as bfloat16 bits: lo (rounded down) and range (rounded up, then bumped
// once more if float32 evaluation of lo + range still falls short of the maximum).
// A block with NaN or +-Inf gets NaN statistics, so it dequantizes to NaN, never to finite values.
EXACTQ_HD void block_stats(float mn, float mx, bool finite, uint16_t* lo_bits, uint16_t* range_bits) {
  if (!finite) {
    *lo_bits = kBf16NaN;
    *range_bits = kBf16NaN;
    return;
  }
  // -0.0 and +0.0 compare equal, so which one a min/max reduction returns depends on its order;
  // adding +0.0 maps both to +0.0 and keeps every implementation's statistics identical.
  mn = mn + 0.0f;
  mx = mx + 0.0f;
  const uint16_t lo = bf16_round_down(mn);
  const float lo_f = bf16_to_float(lo);
  uint16_t rg = bf16_round_up(mx - lo_f);
  if (lo_f + bf16_to_float(rg) < mx) rg += 1;
  *lo_bits = lo;
  *range_bits = rg;
}

// The quantization grid, in units of the block range: levels[0..L] with levels[0] = 0, levels[L] = 1.
// Uniform grids use levels[k] = k / L; the non-uniform INT2 grid is {0, a, 1 - a, 1}.
struct Grid {
  int bits;
  int top;          // L = 2^bits - 1
  bool nonuniform;  // only for bits == 2
  float a;          // interior level of the non-uniform INT2 grid
  float levels[256];
  float inv_gap[3];  // non-uniform only: 1 / (levels[j+1] - levels[j])
};

EXACTQ_HD void make_grid(Grid* g, int bits, bool nonuniform, double level) {
  g->bits = bits;
  g->top = (1 << bits) - 1;
  g->nonuniform = nonuniform;
  const float L = static_cast<float>(g->top);
  for (int k = 0; k <= g->top; ++k) g->levels[k] = static_cast<float>(k) / L;
  g->a = 0.0f;
  if (nonuniform) {
    const float a = static_cast<float>(level);
    g->a = a;
    g->levels[1] = a;
    g->levels[2] = 1.0f - a;
    g->inv_gap[0] = 1.0f / a;
    g->inv_gap[1] = 1.0f / (g->levels[2] - g->levels[1]);
    g->inv_gap[2] = 1.0f / (1.0f - g->levels[2]);
  }
}

// The few scalars stochastic rounding needs, copied out of the Grid so hot loops keep them in
// registers (a uint8_t output may alias anything, so fields read through a pointer are reloaded).
struct RoundParams {
  float l1, l2;           // interior levels (non-uniform INT2)
  float inv0, inv1, inv2;  // 1 / gap of each interval (non-uniform INT2)
  float top_f, jmax_f;     // L and L - 1 (uniform)
  uint32_t top;
};

EXACTQ_HD RoundParams make_round_params(const Grid& g) {
  RoundParams p;
  p.l1 = g.levels[1];
  p.l2 = g.nonuniform ? g.levels[2] : 0.0f;
  p.inv0 = g.nonuniform ? g.inv_gap[0] : 0.0f;
  p.inv1 = g.nonuniform ? g.inv_gap[1] : 0.0f;
  p.inv2 = g.nonuniform ? g.inv_gap[2] : 0.0f;
  p.top_f = static_cast<float>(g.top);
  p.jmax_f = static_cast<float>(g.top - 1);
  p.top = static_cast<uint32_t>(g.top);
  return p;
}

// Stochastic rounding of one value onto the grid: t = (x - lo) / range in [0, 1] (range > 0),
// P(round up) = (t - l) / (u - l), so E[levels[code]] = t. Clamped to [0, L]. NU selects the
// non-uniform INT2 grid at compile time so the hot loops carry no branch on it.
template <bool NU>
EXACTQ_HD uint32_t round_code(const RoundParams p, float x, float lo, float range, float u) {
  const float t = (x - lo) / range;
  uint32_t j;
  float frac;
  if (NU) {
    // Flat selects, not nested ones, so the compiler if-converts and vectorises them.
    const bool ge1 = t >= p.l1, ge2 = t >= p.l2;
    j = static_cast<uint32_t>(ge1) + static_cast<uint32_t>(ge2);
    float base = 0.0f, inv = p.inv0;
    base = ge1 ? p.l1 : base;
    inv = ge1 ? p.inv1 : inv;
    base = ge2 ? p.l2 : base;
    inv = ge2 ? p.inv2 : inv;
    frac = (t - base) * inv;
  } else {
    const float y = t * p.top_f;
    // t >= 0 always (x >= lo), so truncation is the floor; the last interval is closed at 1.
    float jf = static_cast<float>(static_cast<int32_t>(y));
    jf = jf > p.jmax_f ? p.jmax_f : jf;
    j = static_cast<uint32_t>(jf);
    frac = y - jf;
  }
  const uint32_t code = j + static_cast<uint32_t>(u < frac);
  return code > p.top ? p.top : code;
}

// The bit pack_mask stores for one element: a bool as is; a floating value x != 0 (NaN counts as
// non-zero) or, with `positive`, x > 0. Compared in the value's own precision (a tiny double must not
// round to zero on the way; half and bfloat16 widen to float exactly).
template <typename T>
EXACTQ_HD bool mask_bit(T v, bool positive) {
  if constexpr (std::is_same_v<T, bool>) {
    return v;
  } else {
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const Acc a = static_cast<Acc>(v);
    return positive ? a > Acc(0) : a != Acc(0);
  }
}

// Number of consecutive blocks that together end on a byte boundary of the packed codes, so that
// groups of them can be packed by different threads without sharing a byte.
inline int64_t blocks_per_byte_group(int64_t block_size, int bits) {
  int64_t m = 1;
  while ((m * block_size * bits) % 8 != 0) m *= 2;
  return m;
}

// ---- INT8 compute operands (exactq.compute) -------------------------------------------------------
// Symmetric codes in [-127, 127] with one float32 scale per slice: scale = absmax / 127. A slice whose
// absmax is 0 has scale 0 and codes 0; a slice holding NaN or +-Inf has a non-finite scale (callers
// fall back to float for that product so non-finite values propagate as in fp32) and codes 0.

// |v| as the bits of a float: for non-negative floats the unsigned order of the bits is the float
// order, with +Inf above every finite value and NaN above +Inf, so an unsigned max propagates NaN.
EXACTQ_HD uint32_t abs_bits(float v) { return float_bits(v) & 0x7FFFFFFFu; }

EXACTQ_HD float int8_scale(uint32_t absmax_bits) { return bits_float(absmax_bits) / 127.0f; }

// Code of x for a scale: nearest (ties to even, via the 1.5 * 2^23 trick, exact for |t| <= 127) or
// stochastic: floor(t) + (u < t - floor(t)), unbiased; t - floor(t) is exact in float32.
EXACTQ_HD int8_t int8_code(float x, float scale, bool stochastic, float u) {
  // Selects only, no branches, so CPU loops over columns vectorise. An invalid scale (0, NaN, Inf) gives
  // code 0: its input is replaced by 0 before anything is computed from it.
  const bool valid = (scale > 0.0f) & (scale <= 3.4028234663852886e38f);
  float t = (valid ? x : 0.0f) / (valid ? scale : 1.0f);
  t = t > 127.0f ? 127.0f : t;
  t = t < -127.0f ? -127.0f : t;
  float r;
  if (stochastic) {
    // floor(t) for |t| <= 127 without a libcall; comparisons as 0/1 arithmetic, not branches.
    const float tr = static_cast<float>(static_cast<int32_t>(t));
    const float f = tr - static_cast<float>(tr > t);
    r = f + static_cast<float>(u < t - f);
  } else {
    r = (t + 12582912.0f) - 12582912.0f;
  }
  return static_cast<int8_t>(static_cast<int32_t>(r));
}

// Seeded dropout's multiplier of element `index`: 1 / (1 - p) where kept (u >= p), else 0.
EXACTQ_HD float dropout_factor(RngKeys k, uint32_t key_hi, uint32_t index_lo, float p, float scale) {
  return uniform_lo(k, key_hi, index_lo) >= p ? scale : 0.0f;
}

// The uniform draw of element `index` (the same counter-based stream as the block quantizer).
EXACTQ_HD float uniform_at(RngKeys k, uint64_t index) {
  return uniform_lo(k, span_key(k, index >> 32), static_cast<uint32_t>(index));
}

}  // namespace exactq
