// Argument checks shared by the CPU and CUDA kernels (host code). The Python API validates first
// with friendlier errors; these guard callers of torch.ops.exactq.* directly.
#pragma once

#include <ATen/ATen.h>

namespace exactq {

inline void check_args(int64_t bits, int64_t block_size, bool nonuniform) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8,
              "exactq: bits must be one of 1, 2, 4, 8, got ", bits);
  TORCH_CHECK(block_size >= 1, "exactq: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(!nonuniform || bits == 2, "exactq: non-uniform levels need bits == 2, got ", bits);
}

inline void check_quantize_input(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "exactq: quantize needs a floating-point tensor, got ",
              x.scalar_type());
}

inline void check_dequantize_inputs(const at::Tensor& packed, const at::Tensor& stats, int64_t bits,
                                    int64_t block_size, int64_t numel, at::ScalarType dtype) {
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == (numel * bits + 7) / 8,
              "exactq: packed must be a contiguous uint8 tensor of ", (numel * bits + 7) / 8,
              " bytes for ", numel, " elements at ", bits, " bits");
  TORCH_CHECK(stats.scalar_type() == at::kBFloat16 && stats.is_contiguous() && stats.dim() == 2 &&
                  stats.size(0) == nblocks && stats.size(1) == 2,
              "exactq: stats must be a contiguous bfloat16 tensor of shape [", nblocks, ", 2]");
  TORCH_CHECK(stats.device() == packed.device(), "exactq: stats and packed must be on one device");
  TORCH_CHECK(at::isFloatingType(dtype), "exactq: dtype must be a floating-point type, got ", dtype);
}

inline void check_pack_mask_input(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBool || at::isFloatingType(x.scalar_type()),
              "exactq: pack_mask needs a bool or floating-point tensor, got ", x.scalar_type());
}

inline void check_unpack_mask_inputs(const at::Tensor& packed, int64_t numel,
                                     const std::optional<at::Tensor>& value) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == (numel + 7) / 8,
              "exactq: packed must be a contiguous uint8 tensor of ", (numel + 7) / 8, " bytes for ",
              numel, " mask elements");
  if (value.has_value()) {
    TORCH_CHECK(value->dim() == 0 && at::isFloatingType(value->scalar_type()),
                "exactq: value must be a 0-dim floating-point tensor, got ", value->scalar_type(), " with ",
                value->dim(), " dims");
    TORCH_CHECK(value->device() == packed.device(), "exactq: value must be on packed's device ",
                packed.device(), ", got ", value->device());
  }
}

// The destination of an *_into op: contiguous, of the expected dtype, on the input's device.
inline void check_out(const at::Tensor& out, const at::Tensor& packed, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == dtype && out.numel() == numel,
              "exactq: out must be a contiguous ", dtype, " tensor of ", numel, " elements, got ",
              out.scalar_type(), " with ", out.numel(), out.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(out.device() == packed.device(), "exactq: out must be on packed's device ", packed.device(),
              ", got ", out.device());
}

// INT8 compute ops (exactq.compute).
inline void check_int8_quantize_input(const at::Tensor& x, int64_t dim, const std::optional<at::Tensor>& row_scale) {
  TORCH_CHECK(x.dim() == 2, "exactq: int8_quantize needs a 2-D tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "exactq: int8_quantize needs float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(dim == 0 || dim == 1, "exactq: int8_quantize dim must be 0 (a scale per column) or 1 (per row), got ",
              dim);
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->dim() == 1 && row_scale->numel() == x.size(0) && row_scale->scalar_type() == at::kFloat &&
                    row_scale->is_contiguous(),
                "exactq: int8_quantize's row_scale must be a contiguous float32 tensor of x.size(0) = ", x.size(0),
                " elements, got ", row_scale->sizes(), " ", row_scale->scalar_type());
    TORCH_CHECK(row_scale->device() == x.device(), "exactq: int8_quantize's row_scale must be on x's device");
  }
}

inline void check_int8_spmm_inputs(const at::Tensor& crow, const at::Tensor& col, const std::optional<at::Tensor>& weight,
                                   const at::Tensor& q, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& row_scale) {
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && crow.scalar_type() == at::kLong && crow.is_contiguous(),
              "exactq: crow must be a contiguous 1-D int64 tensor of rows + 1 offsets");
  TORCH_CHECK(col.dim() == 1 && col.scalar_type() == at::kLong && col.is_contiguous(),
              "exactq: col must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "exactq: q must be a contiguous 2-D int8 tensor, got ", q.scalar_type(), " with ", q.dim(), " dims");
  TORCH_CHECK(scale.dim() == 1 && scale.numel() == q.size(1) && scale.scalar_type() == at::kFloat &&
                  scale.is_contiguous(),
              "exactq: scale must be a contiguous float32 tensor of q.size(1) = ", q.size(1), " elements");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == col.numel() && weight->scalar_type() == at::kFloat &&
                    weight->is_contiguous(),
                "exactq: weight must be a contiguous float32 tensor with one value per column index (",
                col.numel(), ")");
    TORCH_CHECK(weight->device() == q.device(), "exactq: weight must be on q's device");
  }
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->dim() == 1 && row_scale->numel() == crow.numel() - 1 &&
                    row_scale->scalar_type() == at::kFloat && row_scale->is_contiguous(),
                "exactq: row_scale must be a contiguous float32 tensor of crow.numel() - 1 = ", crow.numel() - 1,
                " elements");
    TORCH_CHECK(row_scale->device() == q.device(), "exactq: row_scale must be on q's device");
  }
  TORCH_CHECK(crow.device() == q.device() && col.device() == q.device() && scale.device() == q.device(),
              "exactq: crow, col, q and scale must be on one device");
}

inline void check_int8_sddmm_inputs(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& a,
                                    const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale) {
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && crow.scalar_type() == at::kLong && crow.is_contiguous(),
              "exactq: crow must be a contiguous 1-D int64 tensor of rows + 1 offsets");
  TORCH_CHECK(col.dim() == 1 && col.scalar_type() == at::kLong && col.is_contiguous(),
              "exactq: col must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kChar && a.is_contiguous() && a.size(0) == crow.numel() - 1,
              "exactq: a must be a contiguous 2-D int8 tensor with crow.numel() - 1 = ", crow.numel() - 1, " rows");
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kChar && b.is_contiguous() && b.size(1) == a.size(1),
              "exactq: b must be a contiguous 2-D int8 tensor with a's ", a.size(1), " columns");
  TORCH_CHECK(a_scale.dim() == 2 && a_scale.size(0) == a.size(0) && a_scale.size(1) >= 1 &&
                  a.size(1) % a_scale.size(1) == 0 && a_scale.scalar_type() == at::kFloat && a_scale.is_contiguous(),
              "exactq: a_scale must be a contiguous float32 [a.size(0), heads] tensor, heads dividing a.size(1) = ",
              a.size(1));
  TORCH_CHECK(b_scale.dim() == 2 && b_scale.size(0) == b.size(0) && b_scale.size(1) == a_scale.size(1) &&
                  b_scale.scalar_type() == at::kFloat && b_scale.is_contiguous(),
              "exactq: b_scale must be a contiguous float32 [b.size(0), heads] tensor");
  TORCH_CHECK(crow.device() == a.device() && col.device() == a.device() && b.device() == a.device() &&
                  a_scale.device() == a.device() && b_scale.device() == a.device(),
              "exactq: crow, col, a, b and their scales must be on one device");
}

// exactq::spmm_columns: out += (diag(row_scale) A)[:, col_start:col_end] @ x (or its transpose's product).
inline void check_spmm_columns_inputs(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                                      const std::optional<at::Tensor>& row_scale, int64_t col_start,
                                      int64_t col_end, bool transpose, const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && crow.scalar_type() == at::kLong && crow.is_contiguous(),
              "exactq: spmm_columns: crow must be a contiguous 1-D int64 tensor of rows + 1 offsets");
  TORCH_CHECK(col.dim() == 1 && col.scalar_type() == at::kLong && col.is_contiguous(),
              "exactq: spmm_columns: col must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(0 <= col_start && col_start <= col_end, "exactq: spmm_columns: need 0 <= col_start <= col_end, got ",
              col_start, ", ", col_end);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "exactq: spmm_columns: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel() && values.scalar_type() == x.scalar_type() &&
                  values.is_contiguous(),
              "exactq: spmm_columns: values must be a contiguous 1-D tensor of x's dtype with one value per column "
              "index (", col.numel(), ")");
  const int64_t rows = crow.numel() - 1, width = col_end - col_start;
  const int64_t x_rows = transpose ? rows : width, out_rows = transpose ? width : rows;
  TORCH_CHECK(x.dim() == 2 && x.size(0) == x_rows && x.is_contiguous(), "exactq: spmm_columns: x must be a "
              "contiguous 2-D tensor of ", x_rows, transpose ? " rows (the matrix's)" : " rows (col_end - col_start)",
              ", got ", x.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == out_rows && out.size(1) == x.size(1) &&
                  out.scalar_type() == x.scalar_type() && out.is_contiguous(),
              "exactq: spmm_columns: out must be a contiguous [", out_rows, ", ", x.size(1), "] tensor of x's dtype, "
              "got ", out.scalar_type(), " ", out.sizes());
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->dim() == 1 && row_scale->numel() == rows && row_scale->scalar_type() == x.scalar_type() &&
                    row_scale->is_contiguous(),
                "exactq: spmm_columns: row_scale must be a contiguous tensor of x's dtype with crow.numel() - 1 = ",
                rows, " elements");
    TORCH_CHECK(row_scale->device() == x.device(), "exactq: spmm_columns: row_scale must be on x's device");
  }
  TORCH_CHECK(crow.device() == x.device() && col.device() == x.device() && values.device() == x.device() &&
                  out.device() == x.device(),
              "exactq: spmm_columns: crow, col, values, x and out must be on one device");
}

// Longest sum of int8 x int8 products that cannot overflow int32, whatever the codes: 131,071 * 128 * 128 < 2^31.
constexpr int64_t kInt8MaxTerms = ((int64_t{1} << 31) - 1) / (128 * 128);

inline void check_int8_mm_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                                 const at::Tensor& b_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kChar && b.dim() == 2 && b.scalar_type() == at::kChar &&
                  a.size(1) == b.size(0),
              "exactq: a and b must be 2-D int8 tensors [M, K] and [K, N], got ", a.scalar_type(), " ", a.sizes(),
              " and ", b.scalar_type(), " ", b.sizes());
  TORCH_CHECK(a.size(1) <= kInt8MaxTerms, "exactq: K = a.size(1) must be at most ", kInt8MaxTerms,
              " (int32 accumulation of int8 products), got ", a.size(1), "; sum longer products in chunks");
  TORCH_CHECK(a_scale.dim() == 1 && a_scale.numel() == a.size(0) && a_scale.scalar_type() == at::kFloat,
              "exactq: a_scale must be a float32 tensor of a.size(0) = ", a.size(0), " elements");
  TORCH_CHECK(b_scale.dim() == 1 && b_scale.numel() == b.size(1) && b_scale.scalar_type() == at::kFloat,
              "exactq: b_scale must be a float32 tensor of b.size(1) = ", b.size(1), " elements");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == b.size(1) && bias->scalar_type() == at::kFloat,
                "exactq: bias must be a float32 tensor of b.size(1) = ", b.size(1), " elements");
  TORCH_CHECK(b.device() == a.device() && a_scale.device() == a.device() && b_scale.device() == a.device() &&
                  (!bias.has_value() || bias->device() == a.device()),
              "exactq: a, b, their scales and bias must be on one device");
}

inline void check_seeded_dropout_input(const at::Tensor& x, double p) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "exactq: seeded_dropout needs a float32 tensor, got ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "exactq: seeded_dropout needs 0 <= p < 1, got ", p);
}

}  // namespace exactq
