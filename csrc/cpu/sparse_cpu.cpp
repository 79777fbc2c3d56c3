// CPU kernel of exactq::spmm_columns: a CSR matrix's product restricted to a range of its columns,
// accumulated into an existing tensor, without copying the matrix. exactq.distributed aggregates a rank's
// halo rows with it, one peer's column range at a time, straight from the user's adjacency (and its
// backward by the same arrays: no transposed copy). The schema lives in exactq/_ops.py; the kernel
// matches exactq/reference.py bit for bit (terms added one at a time in CSR order, no FMA contraction).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../checks.h"

namespace exactq {
namespace cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;
constexpr int64_t kPrefetch = 8;  // entries ahead

// Rows [r0, r1): out[i] += w_e * x[col[e] - lo] over the entries e of row i with lo <= col[e] < hi, one at a
// time in CSR order, w_e = values[e] * rs[i] (values[e] without rs). False on a malformed row.
template <typename T>
__attribute__((always_inline)) inline bool rows_product(const int64_t* crow, const int64_t* col, const T* values,
                                                        const T* rs, int64_t lo, int64_t hi, const T* x, int64_t C,
                                                        int64_t nnz, int64_t r0, int64_t r1, T* out) {
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = crow[i], e1 = crow[i + 1];
    if (e0 < 0 || e0 > e1 || e1 > nnz) return false;
    T* __restrict o = out + i * C;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t j = col[e];
      if (e + kPrefetch < e1) {
        const int64_t jn = col[e + kPrefetch];
        if (jn >= lo && jn < hi) __builtin_prefetch(x + (jn - lo) * C);
      }
      if (j < lo || j >= hi) continue;
      const T w = rs != nullptr ? values[e] * rs[i] : values[e];
      const T* __restrict xr = x + (j - lo) * C;
      for (int64_t c = 0; c < C; ++c) o[c] += w * xr[c];
    }
  }
  return true;
}

// Output rows [t0, t1) (of the range's rows) of out[col[e] - lo] += w_e * g[i] over every entry e = (i, col[e])
// with lo + t0 <= col[e] < lo + t1, in CSR order (each output element's terms are added in the order of e,
// whatever the threads), w_e as above. False on a malformed row.
template <typename T>
__attribute__((always_inline)) inline bool transposed_product(const int64_t* crow, const int64_t* col,
                                                              const T* values, const T* rs, int64_t lo, int64_t t0,
                                                              int64_t t1, const T* g, int64_t M, int64_t C, int64_t nnz,
                                                              T* out) {
  const int64_t a = lo + t0, b = lo + t1;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t e0 = crow[i], e1 = crow[i + 1];
    if (e0 < 0 || e0 > e1 || e1 > nnz) return false;
    const T* __restrict gr = g + i * C;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t j = col[e];
      if (j < a || j >= b) continue;
      const T w = rs != nullptr ? values[e] * rs[i] : values[e];
      T* __restrict o = out + (j - lo) * C;
      for (int64_t c = 0; c < C; ++c) o[c] += w * gr[c];
    }
  }
  return true;
}

// The hot loops once per instruction set (target_clones cannot take a template), and overloads by type.
#define EXACTQ_SPMM_COLUMNS_CLONES(T, suffix)                                                                     \
  __attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) bool rows_product_##suffix(               \
      const int64_t* crow, const int64_t* col, const T* v, const T* rs, int64_t lo, int64_t hi, const T* x,       \
      int64_t C, int64_t nnz, int64_t r0, int64_t r1, T* out) {                                                   \
    return rows_product<T>(crow, col, v, rs, lo, hi, x, C, nnz, r0, r1, out);                                    \
  }                                                                                                                \
  __attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) bool transposed_product_##suffix(         \
      const int64_t* crow, const int64_t* col, const T* v, const T* rs, int64_t lo, int64_t t0, int64_t t1,       \
      const T* g, int64_t M, int64_t C, int64_t nnz, T* out) {                                                    \
    return transposed_product<T>(crow, col, v, rs, lo, t0, t1, g, M, C, nnz, out);                               \
  }                                                                                                                \
  inline bool run_rows(const int64_t* crow, const int64_t* col, const T* v, const T* rs, int64_t lo, int64_t hi,  \
                       const T* x, int64_t C, int64_t nnz, int64_t r0, int64_t r1, T* out) {                      \
    return rows_product_##suffix(crow, col, v, rs, lo, hi, x, C, nnz, r0, r1, out);                              \
  }                                                                                                                \
  inline bool run_transposed(const int64_t* crow, const int64_t* col, const T* v, const T* rs, int64_t lo,        \
                             int64_t t0, int64_t t1, const T* g, int64_t M, int64_t C, int64_t nnz, T* out) {     \
    return transposed_product_##suffix(crow, col, v, rs, lo, t0, t1, g, M, C, nnz, out);                         \
  }
EXACTQ_SPMM_COLUMNS_CLONES(float, f32)
EXACTQ_SPMM_COLUMNS_CLONES(double, f64)
#undef EXACTQ_SPMM_COLUMNS_CLONES

void spmm_columns_cpu(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const std::optional<at::Tensor>& row_scale, int64_t col_start, int64_t col_end, bool transpose,
                      const at::Tensor& x, const at::Tensor& out) {
  check_spmm_columns_inputs(crow, col, values, row_scale, col_start, col_end, transpose, x, out);
  const int64_t M = crow.numel() - 1, C = x.size(1), nnz = col.numel();
  const int64_t* cp = crow.const_data_ptr<int64_t>();
  TORCH_CHECK(cp[0] == 0 && cp[M] == nnz, "exactq: spmm_columns: crow must start at 0 and end at col.numel() = ", nnz);
  const int64_t* colp = col.const_data_ptr<int64_t>();
  std::atomic<bool> ok{true};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_columns", [&] {
    const scalar_t* vp = values.const_data_ptr<scalar_t>();
    const scalar_t* rsp = row_scale.has_value() ? row_scale->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (M == 0 || C == 0) return;
    if (!transpose) {
      const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, C * std::max<int64_t>(1, nnz / M)));
      at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
        if (!run_rows(cp, colp, vp, rsp, col_start, col_end, xp, C, nnz, r0, r1, op)) ok = false;
      });
    } else {
      // Threads split the output rows, each reading every entry and keeping those of its rows: no two write
      // one element, and each element's sum keeps CSR order.
      at::parallel_for(0, col_end - col_start, 1, [&](int64_t t0, int64_t t1) {
        if (!run_transposed(cp, colp, vp, rsp, col_start, t0, t1, xp, M, C, nnz, op)) ok = false;
      });
    }
  });
  TORCH_CHECK(ok.load(), "exactq: spmm_columns: malformed CSR: crow must be non-decreasing within [0, col.numel()]");
}

}  // namespace

TORCH_LIBRARY_IMPL(exactq, CPU, m) { m.impl("spmm_columns", &spmm_columns_cpu); }

}  // namespace cpu
}  // namespace exactq
