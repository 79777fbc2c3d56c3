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

}  // namespace exactq
