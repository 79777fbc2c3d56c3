// CPU kernels of the INT8 compute ops (exactq.compute): symmetric int8 quantization with one float32
// scale per column or per row, a CSR sparse x dense product over int8 features, and its dual, the
// per-edge dot products of two int8 row sets (SDDMM, an attention weight's gradient), and a dense int8 GEMM
// (oneDNN through at::_int_mm) with its float32 epilogue. Schemas live in
// exactq/_ops.py; exactq/reference.py specifies them, and these kernels match it bit for bit.
//
// Hot loops are plain C++ compiled once per instruction set (target_clones) and auto-vectorised across
// feature columns. The sparse product reads a quarter of the bytes fp32 does for every gathered
// neighbour row, which is where an aggregation's time goes; sums of int8 codes accumulate exactly in
// int32, edge weights in float32 in CSR order (the reference uses the same order, so results are
// identical, not merely close).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "int8_rows.h"

namespace exactq {
namespace cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;
constexpr int64_t kPrefetch = 8;  // edges ahead

// ---- quantize (float32 input; bfloat16 is widened once by the caller) ----------------------------

// ``rs``: an optional multiplier per row; the values quantized are then the float32 products x * rs[i]
// (x * 1.0f == x bit for bit, so one code path serves both).
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void column_absmax(const float* x, const float* rs,
                                                                                  int64_t r0, int64_t r1, int64_t C,
                                                                                  uint32_t* m) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* xr = x + i * C;
    const float r = rs != nullptr ? rs[i] : 1.0f;
    for (int64_t c = 0; c < C; ++c) {
      const uint32_t b = abs_bits(xr[c] * r);
      m[c] = b > m[c] ? b : m[c];
    }
  }
}

// ``x`` points at row r0 (rows [r0, r1) are x[0 .. (r1 - r0) * C)); rs and scale are indexed by the row.
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void row_scales(const float* x, const float* rs,
                                                                               int64_t r0, int64_t r1, int64_t C,
                                                                               float* scale) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* xr = x + (i - r0) * C;
    const float r = rs != nullptr ? rs[i] : 1.0f;
    uint32_t m = 0;
    for (int64_t c = 0; c < C; ++c) {
      const uint32_t b = abs_bits(xr[c] * r);
      m = b > m ? b : m;
    }
    scale[i] = int8_scale(m);
  }
}

#if defined(__x86_64__)
bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

// Stochastic codes of one float32 row, 16 columns at a time: int8_code (csrc/common.h) in AVX-512 (GCC
// leaves its selects as branches). Same operations in the same order, so the same codes. Returns the
// number of columns done; the scalar loop does the rest.
__attribute__((target("avx512f,avx512bw,avx512vl"))) int64_t stochastic_codes_avx512(
    const float* xr, const float* scale_col, float scale_row, const float* u, int64_t C, int8_t* qr) {
  const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f), one = _mm512_set1_ps(1.0f);
  const __m512 zero = _mm512_setzero_ps(), fmax = _mm512_set1_ps(3.4028234663852886e38f);
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    const __m512 s = scale_col != nullptr ? _mm512_loadu_ps(scale_col + c) : _mm512_set1_ps(scale_row);
    const __mmask16 valid = _mm512_cmp_ps_mask(s, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(s, fmax, _CMP_LE_OQ);
    __m512 t = _mm512_div_ps(_mm512_loadu_ps(xr + c), _mm512_mask_blend_ps(valid, one, s));
    t = _mm512_maskz_mov_ps(valid, t);
    t = _mm512_min_ps(t, lim);   // t > 127 ? 127 : t (t is never NaN here)
    t = _mm512_max_ps(t, nlim);  // t < -127 ? -127 : t
    const __m512 tr = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(t));
    const __m512 f = _mm512_mask_sub_ps(tr, _mm512_cmp_ps_mask(tr, t, _CMP_GT_OQ), tr, one);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_loadu_ps(u + c), _mm512_sub_ps(t, f), _CMP_LT_OQ);
    const __m512 r = _mm512_mask_add_ps(f, up, f, one);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + c), _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(r)));
  }
  return c;
}
#endif

// Codes of rows [r0, r1) (``x`` points at row r0), with one scale per column (scale[c]) or per row (scale[i]). The uniform draw of
// element i * C + c needs the upper 32 index bits only once per row (unless the row straddles a multiple
// of 2^32), so the inner loop is 32-bit integer and float work that vectorises.
template <bool STOCHASTIC>
__attribute__((always_inline)) inline void codes_body(const float* x, const float* rs, int64_t r0, int64_t r1,
                                                      int64_t C, const float* scale, bool per_row, RngKeys keys,
                                                      int8_t* q) {
  std::vector<float> draws(STOCHASTIC ? C : 0);
  float* __restrict u = draws.data();
  std::vector<float> scaled(rs != nullptr ? C : 0);  // the row's products x * rs[i], made in cache
  for (int64_t i = r0; i < r1; ++i) {
    const float* __restrict xr = x + (i - r0) * C;
    if (rs != nullptr) {
      const float r = rs[i];
      for (int64_t c = 0; c < C; ++c) scaled[c] = xr[c] * r;
      xr = scaled.data();
    }
    int8_t* __restrict qr = q + i * C;
    const uint64_t base = static_cast<uint64_t>(i) * static_cast<uint64_t>(C);
    const bool straddles = C > 0 && (base >> 32) != ((base + static_cast<uint64_t>(C) - 1) >> 32);
    if (STOCHASTIC && straddles) {
      for (int64_t c = 0; c < C; ++c)
        qr[c] = int8_code(xr[c], per_row ? scale[i] : scale[c], true, uniform_at(keys, base + c));
      continue;
    }
    const uint32_t key_hi = span_key(keys, base >> 32);
    const uint32_t lo = static_cast<uint32_t>(base);
    if (STOCHASTIC) {  // the draws first, in a loop of 32-bit integer work only
      for (int64_t c = 0; c < C; ++c) {
        uint32_t h = lowbias32((lo + static_cast<uint32_t>(c)) ^ keys.k0);
        h = lowbias32(h ^ key_hi);
        u[c] = static_cast<float>(static_cast<int32_t>(h >> 8)) * kInv2p24;  // = uniform_lo, exactly
      }
    }
    int64_t c0 = 0;
#if defined(__x86_64__)
    if constexpr (STOCHASTIC) {
      if (C >= 16 && has_avx512()) c0 = stochastic_codes_avx512(xr, per_row ? nullptr : scale, scale[per_row ? i : 0], u, C, qr);
    }
#endif
    if (per_row) {
      const float s = scale[i];
      for (int64_t c = c0; c < C; ++c) qr[c] = int8_code(xr[c], s, STOCHASTIC, STOCHASTIC ? u[c] : 0.0f);
    } else {
      for (int64_t c = c0; c < C; ++c)
        qr[c] = int8_code(xr[c], scale[c], STOCHASTIC, STOCHASTIC ? u[c] : 0.0f);
    }
  }
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void codes_nearest(
    const float* x, const float* rs, int64_t r0, int64_t r1, int64_t C, const float* scale, bool per_row, RngKeys keys,
    int8_t* q) {
  codes_body<false>(x, rs, r0, r1, C, scale, per_row, keys, q);
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void codes_stochastic(
    const float* x, const float* rs, int64_t r0, int64_t r1, int64_t C, const float* scale, bool per_row, RngKeys keys,
    int8_t* q) {
  codes_body<true>(x, rs, r0, r1, C, scale, per_row, keys, q);
}

void int8_quantize_impl(const float* xp, const float* rs, int64_t N, int64_t C, int64_t dim, bool stoch, RngKeys keys,
                        float* sp, int8_t* qp) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
  if (dim == 1) {
    // A row's scale needs only the row: scales and codes of each grain of rows in turn, while it is in cache
    // (one pass over x instead of two).
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t b0 = r0; b0 < r1; b0 += grain) {
        const int64_t b1 = std::min(r1, b0 + grain);
        row_scales(xp + b0 * C, rs, b0, b1, C, sp);
        (stoch ? codes_stochastic : codes_nearest)(xp + b0 * C, rs, b0, b1, C, sp, true, keys, qp);
      }
    });
    return;
  }
  // Column maxima: one partial row of maxima per task, combined in task order (a max is exact).
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, N / grain));
  std::vector<uint32_t> partial(static_cast<size_t>(tasks * C), 0u);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      column_absmax(xp, rs, N * t / tasks, N * (t + 1) / tasks, C, partial.data() + t * C);
  });
  for (int64_t c = 0; c < C; ++c) {
    uint32_t m = 0;
    for (int64_t t = 0; t < tasks; ++t) m = std::max(m, partial[t * C + c]);
    sp[c] = int8_scale(m);
  }
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    (stoch ? codes_stochastic : codes_nearest)(xp + r0 * C, rs, r0, r1, C, sp, false, keys, qp);
  });
}

}  // namespace

void int8_rows(const float* x, int64_t r0, int64_t r1, int64_t C, bool stochastic, RngKeys keys, float* scale,
               int8_t* q) {
  row_scales(x, nullptr, r0, r1, C, scale);
  (stochastic ? codes_stochastic : codes_nearest)(x, nullptr, r0, r1, C, scale, true, keys, q);
}

namespace {

std::tuple<at::Tensor, at::Tensor> int8_quantize_cpu(const at::Tensor& x_in, int64_t dim,
                                                     std::optional<int64_t> seed,
                                                     const std::optional<at::Tensor>& row_scale) {
  check_int8_quantize_input(x_in, dim, row_scale);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor q = at::empty({N, C}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({dim == 0 ? C : N}, x.options().dtype(at::kFloat));
  const RngKeys keys = make_keys(seed.value_or(0));
  float* sp = scale.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  // bfloat16 widens to float32 exactly; one conversion pass keeps a single (vectorised) code path.
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const float* rs = row_scale.has_value() ? row_scale->const_data_ptr<float>() : nullptr;
  int8_quantize_impl(xf.const_data_ptr<float>(), rs, N, C, dim, seed.has_value(), keys, sp, qp);
  return {q, scale};
}

// ---- sparse x dense ------------------------------------------------------------------------------

// The two checks of a CSR around a row-parallel kernel: its ends before (crow[0] == 0, crow[M] == nnz), and
// after, whether every row was well formed (offsets in order, column indices below n).
inline void check_csr_ends(const int64_t* cp, int64_t M, int64_t nnz) {
  TORCH_CHECK(cp[0] == 0 && cp[M] == nnz, "exactq: crow must start at 0 and end at col.numel() = ", nnz);
}

inline void check_rows_ok(bool ok, int64_t n, const char* rows_of) {
  TORCH_CHECK(ok, "exactq: malformed CSR: crow must be non-decreasing and every col index in [0, ", n, ") (",
              rows_of, ")");
}

// Rows [r0, r1) of out = row_scale * (A @ (q * scale)); A given by crow/col (and weight, if W).
// Returns false on a malformed row (offsets out of order or a column index out of range).
template <bool W>
__attribute__((always_inline)) inline bool spmm_rows_body(const int64_t* crow, const int64_t* col, const float* w,
                                                          const int8_t* q, int64_t n, int64_t C,
                                                          const float* scale, const float* rs, int64_t nnz,
                                                          int64_t r0, int64_t r1, float* out) {
  std::vector<int32_t> iacc(W ? 0 : C);
  std::vector<float> facc(W ? C : 0);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = crow[i], e1 = crow[i + 1];
    if (e0 < 0 || e0 > e1 || e1 > nnz) return false;
    if constexpr (W) {
      std::fill(facc.begin(), facc.end(), 0.0f);
    } else {
      std::fill(iacc.begin(), iacc.end(), 0);
    }
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t j = col[e];
      if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(n)) return false;
      if (e + kPrefetch < nnz) {  // neighbour rows are random reads: ask for one a few edges ahead
        const uint64_t jn = static_cast<uint64_t>(col[e + kPrefetch]);
        if (jn < static_cast<uint64_t>(n)) {
          for (int64_t b = 0; b < C; b += 64) __builtin_prefetch(q + jn * C + b);
        }
      }
      const int8_t* __restrict qr = q + j * C;
      if constexpr (W) {
        const float we = w[e];
        float* __restrict a = facc.data();
        for (int64_t c = 0; c < C; ++c) a[c] = a[c] + we * static_cast<float>(qr[c]);
      } else {
        int32_t* __restrict a = iacc.data();
        for (int64_t c = 0; c < C; ++c) a[c] += qr[c];
      }
    }
    const float r = rs != nullptr ? rs[i] : 1.0f;
    float* __restrict o = out + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const float acc = W ? facc[c] : static_cast<float>(iacc[c]);
      o[c] = (acc * scale[c]) * r;
    }
  }
  return true;
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) bool spmm_rows_plain(
    const int64_t* crow, const int64_t* col, const float* w, const int8_t* q, int64_t n, int64_t C,
    const float* scale, const float* rs, int64_t nnz, int64_t r0, int64_t r1, float* out) {
  return spmm_rows_body<false>(crow, col, w, q, n, C, scale, rs, nnz, r0, r1, out);
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) bool spmm_rows_weighted(
    const int64_t* crow, const int64_t* col, const float* w, const int8_t* q, int64_t n, int64_t C,
    const float* scale, const float* rs, int64_t nnz, int64_t r0, int64_t r1, float* out) {
  return spmm_rows_body<true>(crow, col, w, q, n, C, scale, rs, nnz, r0, r1, out);
}

at::Tensor int8_spmm_cpu(const at::Tensor& crow, const at::Tensor& col, const std::optional<at::Tensor>& weight,
                         const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& row_scale) {
  check_int8_spmm_inputs(crow, col, weight, q, scale, row_scale);
  const int64_t M = crow.numel() - 1, n = q.size(0), C = q.size(1), nnz = col.numel();
  at::Tensor out = at::empty({M, C}, q.options().dtype(at::kFloat));
  const int64_t* cp = crow.const_data_ptr<int64_t>();
  check_csr_ends(cp, M, nnz);
  const int64_t* colp = col.const_data_ptr<int64_t>();
  const float* wp = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const float* rsp = row_scale.has_value() ? row_scale->const_data_ptr<float>() : nullptr;
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = scale.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<bool> ok{true};
  // Rows cost their degree: a grain of rows about kGrainElements gathered bytes apart.
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, C * std::max<int64_t>(1, nnz / std::max<int64_t>(M, 1))));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    const bool good = wp != nullptr ? spmm_rows_weighted(cp, colp, wp, qp, n, C, sp, rsp, nnz, r0, r1, op)
                                    : spmm_rows_plain(cp, colp, wp, qp, n, C, sp, rsp, nnz, r0, r1, op);
    if (!good) ok = false;
  });
  check_rows_ok(ok.load(), n, "q.size(0)");
  return out;
}

// ---- sampled dense x dense (SDDMM) ------------------------------------------------------------------

// Rows [r0, r1): out[e, h] = (float(a[i, h] . b[col[e], h]) * a_scale[i, h]) * b_scale[col[e], h], the dot
// product over one head's Ch columns summed exactly in int32.
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) bool sddmm_rows(
    const int64_t* crow, const int64_t* col, const int8_t* a, const float* as, const int8_t* b, const float* bs,
    int64_t n, int64_t H, int64_t Ch, int64_t nnz, int64_t r0, int64_t r1, float* out) {
  const int64_t C = H * Ch;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = crow[i], e1 = crow[i + 1];
    if (e0 < 0 || e0 > e1 || e1 > nnz) return false;
    const int8_t* __restrict ar = a + i * C;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t j = col[e];
      if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(n)) return false;
      if (e + kPrefetch < nnz) {
        const uint64_t jn = static_cast<uint64_t>(col[e + kPrefetch]);
        if (jn < static_cast<uint64_t>(n)) {
          for (int64_t c = 0; c < C; c += 64) __builtin_prefetch(b + jn * C + c);
        }
      }
      const int8_t* __restrict br = b + j * C;
      for (int64_t h = 0; h < H; ++h) {
        int32_t acc = 0;
        for (int64_t c = h * Ch; c < (h + 1) * Ch; ++c) acc += static_cast<int32_t>(ar[c]) * br[c];
        out[e * H + h] = (static_cast<float>(acc) * as[i * H + h]) * bs[j * H + h];
      }
    }
  }
  return true;
}

at::Tensor int8_sddmm_cpu(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& a,
                          const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale) {
  check_int8_sddmm_inputs(crow, col, a, a_scale, b, b_scale);
  const int64_t M = crow.numel() - 1, n = b.size(0), H = a_scale.size(1), Ch = a.size(1) / H, nnz = col.numel();
  at::Tensor out = at::empty({nnz, H}, a.options().dtype(at::kFloat));
  const int64_t* cp = crow.const_data_ptr<int64_t>();
  check_csr_ends(cp, M, nnz);
  const int64_t* colp = col.const_data_ptr<int64_t>();
  const int8_t* ap = a.const_data_ptr<int8_t>();
  const int8_t* bp = b.const_data_ptr<int8_t>();
  const float* asp = a_scale.const_data_ptr<float>();
  const float* bsp = b_scale.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<bool> ok{true};
  const int64_t grain = std::max<int64_t>(
      1, kGrainElements / std::max<int64_t>(1, H * Ch * std::max<int64_t>(1, nnz / std::max<int64_t>(M, 1))));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    if (!sddmm_rows(cp, colp, ap, asp, bp, bsp, n, H, Ch, nnz, r0, r1, op)) ok = false;
  });
  check_rows_ok(ok.load(), n, "b.size(0)");
  return out;
}

// ---- int8 GEMM with its epilogue ------------------------------------------------------------------

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void epilogue_rows(
    const int32_t* acc, const float* rs, const float* cs, const float* bias, int64_t r0, int64_t r1, int64_t N,
    float* out) {
  for (int64_t i = r0; i < r1; ++i) {
    const int32_t* __restrict a = acc + i * N;
    float* __restrict o = out + i * N;
    const float r = rs[i];
    if (bias != nullptr) {
      for (int64_t j = 0; j < N; ++j) o[j] = (static_cast<float>(a[j]) * r) * cs[j] + bias[j];
    } else {
      for (int64_t j = 0; j < N; ++j) o[j] = (static_cast<float>(a[j]) * r) * cs[j];
    }
  }
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_in,
                       const at::Tensor& b_scale_in, const std::optional<at::Tensor>& bias_in) {
  check_int8_mm_inputs(a, b, a_scale_in, b_scale_in, bias_in);
  const at::Tensor rs = a_scale_in.contiguous(), cs = b_scale_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous())
                                                             : std::nullopt;
  const int64_t M = a.size(0), N = b.size(1);
  at::Tensor out = at::empty({M, N}, rs.options());
  const float* cp = cs.const_data_ptr<float>();
  const float* bp = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  // torch._int_mm (oneDNN) on a band of rows whose int32 result (~4 MB) is still in cache when the
  // epilogue reads it: the whole [M, N] int32 result written out and read back cost as much as the product.
  const int64_t band = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(N, 1));
  for (int64_t r0 = 0; r0 < M; r0 += band) {
    const int64_t rows = std::min(band, M - r0);
    const at::Tensor acc = at::_int_mm(a.narrow(0, r0, rows), b).contiguous();
    const int32_t* ap = acc.const_data_ptr<int32_t>();
    const float* rp = rs.const_data_ptr<float>() + r0;
    float* op = out.data_ptr<float>() + r0 * N;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(N, 1)),
                     [&](int64_t s0, int64_t s1) { epilogue_rows(ap, rp, cp, bp, s0, s1, N, op); });
  }
  return out;
}

// ---- seeded dropout -------------------------------------------------------------------------------

// Elements [i0, i1) of one span that does not straddle a multiple of 2^32 in the element index.
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void dropout_span(
    const float* x, int64_t i0, int64_t i1, RngKeys keys, float p, float scale, float* out) {
  const uint32_t key_hi = span_key(keys, static_cast<uint64_t>(i0) >> 32);
  const uint32_t lo = static_cast<uint32_t>(i0);
  const int64_t n = i1 - i0;
  const float* __restrict xs = x + i0;
  float* __restrict os = out + i0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t h = lowbias32((lo + static_cast<uint32_t>(k)) ^ keys.k0);
    h = lowbias32(h ^ key_hi);
    const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * kInv2p24;  // = uniform_lo
    os[k] = xs[k] * (u >= p ? scale : 0.0f);
  }
}

at::Tensor seeded_dropout_cpu(const at::Tensor& x_in, double p_d, int64_t seed) {
  check_seeded_dropout_input(x_in, p_d);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float p = static_cast<float>(p_d);
  const float scale = 1.0f / (1.0f - p);
  const RngKeys keys = make_keys(seed);
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kChunk = 1 << 16;  // divides 2^32: a chunk never straddles a multiple of 2^32
  const int64_t n = x.numel();
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) dropout_span(xp, c * kChunk, std::min(n, (c + 1) * kChunk), keys, p, scale, op);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(exactq, CPU, m) {
  m.impl("seeded_dropout", &seeded_dropout_cpu);
  m.impl("int8_mm", &int8_mm_cpu);
  m.impl("int8_quantize", &int8_quantize_cpu);
  m.impl("int8_spmm", &int8_spmm_cpu);
  m.impl("int8_sddmm", &int8_sddmm_cpu);
}

}  // namespace cpu
}  // namespace exactq
