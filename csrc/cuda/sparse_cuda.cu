// CUDA kernel of exactq::spmm_columns (schema in exactq/_ops.py, reference in exactq/reference.py): a CSR
// matrix's product restricted to a range of its columns, added into out, without copying the matrix.
// Forward: one warp per row, each lane owning columns lane, lane + 32, ...; a row's in-range entries are
// added into it one at a time in CSR order, as the reference does (bit for bit; build with --fmad=false). Transposed:
// one warp per row of the matrix, adding (value * row_scale) * x[row] into each in-range entry's output
// row with atomicAdd: equal to the reference up to the order of float additions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"

namespace exactq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535 * 32;

template <typename T>
__global__ void spmm_columns_kernel(const int64_t* __restrict__ crow, const int64_t* __restrict__ col,
                                    const T* __restrict__ values, const T* __restrict__ rs, int64_t lo, int64_t hi,
                                    bool transpose, const T* __restrict__ x, int64_t M, int64_t C, int64_t nnz,
                                    T* __restrict__ out, int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; i < M; i += warps) {
    const int64_t e0 = crow[i], e1 = crow[i + 1];
    if (e0 < 0 || e0 > e1 || e1 > nnz) {
      if (lane == 0) atomicExch(bad, 1);
      continue;
    }
    if (transpose) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t j = col[e];
        if (j < lo || j >= hi) continue;
        const T w = rs != nullptr ? values[e] * rs[i] : values[e];
        for (int64_t c = lane; c < C; c += 32) atomicAdd(out + (j - lo) * C + c, w * x[i * C + c]);
      }
      continue;
    }
    for (int64_t c = lane; c < C; c += 32) {
      T o = out[i * C + c];
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t j = col[e];
        if (j >= lo && j < hi) o = o + (rs != nullptr ? values[e] * rs[i] : values[e]) * x[(j - lo) * C + c];
      }
      out[i * C + c] = o;
    }
  }
}

void spmm_columns_cuda(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                       const std::optional<at::Tensor>& row_scale, int64_t col_start, int64_t col_end, bool transpose,
                       const at::Tensor& x, const at::Tensor& out) {
  check_spmm_columns_inputs(crow, col, values, row_scale, col_start, col_end, transpose, x, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = crow.numel() - 1, C = x.size(1), nnz = col.numel();
  at::Tensor bad = at::zeros({1}, x.options().dtype(at::kInt));
  if (M > 0 && C > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>((M + kThreads / 32 - 1) / (kThreads / 32), kMaxGrid));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_columns_cuda", [&] {
      spmm_columns_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), values.const_data_ptr<scalar_t>(),
          row_scale.has_value() ? row_scale->const_data_ptr<scalar_t>() : nullptr, col_start, col_end, transpose,
          x.const_data_ptr<scalar_t>(), M, C, nnz, out.data_ptr<scalar_t>(), bad.data_ptr<int>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  TORCH_CHECK(crow[0].item<int64_t>() == 0 && crow[M].item<int64_t>() == nnz && bad.item<int>() == 0,
              "exactq: spmm_columns: malformed CSR: crow must be non-decreasing from 0 to col.numel() = ", nnz);
}

}  // namespace

TORCH_LIBRARY_IMPL(exactq, CUDA, m) { m.impl("spmm_columns", &spmm_columns_cuda); }

}  // namespace cuda
}  // namespace exactq
