// CUDA kernels of the INT8 compute ops (exactq.compute), registered for the CUDA dispatch key of the
// schemas in exactq/_ops.py. Scalar steps are shared with the CPU kernels (csrc/common.h), so codes,
// scales and products equal the reference (exactq/reference.py) bit for bit; build with --fmad=false.
//
// int8_quantize: absolute maxima as unsigned float bits (atomicMax per column, or a warp reduction per
// row; csrc/common.h explains why the unsigned order propagates NaN), then one thread per element.
// int8_spmm: one warp per output row, each lane owning columns lane, lane + 32, ...; neighbours are
// visited in CSR order, so sums of codes are exact int32 sums and weighted sums are the reference's
// sequential float32 sums. int8_sddmm: one warp per row, lanes splitting each head's dot product (int32,
// exact). int8_mm: cuBLASLt through at::_int_mm, then the epilogue, one thread per element.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../common.h"

namespace exactq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535 * 32;

inline int64_t blocks_for(int64_t n, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, kMaxGrid));
}

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Element i of the values quantized: x[i], or the float32 product x[i] * rs[row] with a row multiplier.
template <typename T>
__device__ __forceinline__ float load_scaled(const T* x, const float* rs, int64_t i, int64_t C) {
  return rs != nullptr ? __fmul_rn(load_float(x, i), rs[i / C]) : load_float(x, i);
}

// Element i of a row-major [n, C] tensor, read through a loader: Scaled (x, or x * rs[row]) or Decoded
// (a quantized tensor's value, as dequantize_kernel computes it).
template <typename T>
struct Scaled {
  const T* x;
  const float* rs;
  int64_t C;
  __device__ __forceinline__ float operator()(int64_t i) const { return load_scaled(x, rs, i, C); }
};

struct Decoded {
  const uint8_t* packed;
  const uint16_t* stats;
  int64_t block_size;
  Grid g;
  __device__ __forceinline__ float operator()(int64_t i) const {
    const int cpb = 8 / g.bits;
    const int64_t b = i / block_size;
    const uint32_t code = (packed[i / cpb] >> ((i % cpb) * g.bits)) & ((1u << g.bits) - 1);
    return bf16_to_float(stats[2 * b]) + bf16_to_float(stats[2 * b + 1]) * g.levels[code];
  }
};

template <typename L>
__global__ void column_absmax_kernel(L load, int64_t n, int64_t C, unsigned int* __restrict__ m) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n * C;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    atomicMax(m + (i % C), abs_bits(load(i)));
  }
}

template <typename L>
__global__ void row_absmax_kernel(L load, int64_t n, int64_t C, unsigned int* __restrict__ m) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; r < n; r += warps) {
    unsigned int v = 0;
    for (int64_t c = lane; c < C; c += 32) v = max(v, abs_bits(load(r * C + c)));
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, o));
    if (lane == 0) m[r] = v;
  }
}

__global__ void scales_kernel(const unsigned int* __restrict__ m, int64_t k, float* __restrict__ scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    scale[i] = int8_scale(m[i]);
}

template <typename L>
__global__ void codes_kernel(L load, int64_t n, int64_t C, const float* __restrict__ scale, bool per_row,
                             bool stochastic, RngKeys keys, int8_t* __restrict__ q) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n * C;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = per_row ? scale[i / C] : scale[i % C];
    const float u = stochastic ? uniform_at(keys, static_cast<uint64_t>(i)) : 0.0f;
    q[i] = int8_code(load(i), s, stochastic, u);
  }
}

// Per-row (dim=1) or per-column (dim=0) scales and codes of the [n, C] values `load` reads.
template <typename L>
void int8_codes(L load, int64_t n, int64_t C, int64_t dim, std::optional<int64_t> seed, const at::Tensor& q,
                const at::Tensor& scale) {
  const int64_t k = dim == 0 ? C : n;
  at::Tensor m = at::zeros({k}, q.options().dtype(at::kInt));
  auto* mp = reinterpret_cast<unsigned int*>(m.data_ptr<int32_t>());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n * C > 0) {
    if (dim == 0) {
      column_absmax_kernel<<<blocks_for(n * C, kThreads), kThreads, 0, stream>>>(load, n, C, mp);
    } else {
      row_absmax_kernel<<<blocks_for(n, kThreads / 32), kThreads, 0, stream>>>(load, n, C, mp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (k > 0) {
    scales_kernel<<<blocks_for(k, kThreads), kThreads, 0, stream>>>(mp, k, scale.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (n * C > 0) {
    codes_kernel<<<blocks_for(n * C, kThreads), kThreads, 0, stream>>>(
        load, n, C, scale.data_ptr<float>(), dim == 1, seed.has_value(), make_keys(seed.value_or(0)),
        q.data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> int8_quantize_cuda(const at::Tensor& x_in, int64_t dim,
                                                      std::optional<int64_t> seed,
                                                      const std::optional<at::Tensor>& row_scale) {
  check_int8_quantize_input(x_in, dim, row_scale);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), C = x.size(1);
  at::Tensor q = at::empty({n, C}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({dim == 0 ? C : n}, x.options().dtype(at::kFloat));
  const float* rs = row_scale.has_value() ? row_scale->const_data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    int8_codes(Scaled<float>{x.const_data_ptr<float>(), rs, C}, n, C, dim, seed, q, scale);
  } else {
    int8_codes(Scaled<c10::BFloat16>{x.const_data_ptr<c10::BFloat16>(), rs, C}, n, C, dim, seed, q, scale);
  }
  return {q, scale};
}

// dequantize viewed as [rows, cols], then int8_quantize(dim=1), reading the codes twice (row maxima, then
// codes) instead of writing and reading a float32 tensor.
std::tuple<at::Tensor, at::Tensor> dequantize_int8_cuda(const at::Tensor& packed, const at::Tensor& stats,
                                                        int64_t bits, int64_t block_size,
                                                        std::optional<double> level, c10::SymInt rows_s,
                                                        c10::SymInt cols_s, std::optional<int64_t> seed) {
  check_args(bits, block_size, level.has_value());
  const int64_t R = rows_s.expect_int(), C = cols_s.expect_int();
  TORCH_CHECK(R >= 0 && C >= 0, "exactq: dequantize_int8 needs rows >= 0 and cols >= 0, got ", R, " and ", C);
  check_dequantize_inputs(packed, stats, bits, block_size, R * C, at::kFloat);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor q = at::empty({R, C}, packed.options().dtype(at::kChar));
  at::Tensor scale = at::empty({R}, packed.options().dtype(at::kFloat));
  Decoded load{packed.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(stats.const_data_ptr<at::BFloat16>()),
               block_size, Grid{}};
  make_grid(&load.g, static_cast<int>(bits), level.has_value(), level.value_or(0.0));
  int8_codes(load, R, C, 1, seed, q, scale);
  return {q, scale};
}

// On the host, after a warp-per-row kernel: the CSR's ends, and the rows the kernel flagged in *bad.
void check_csr_after_launch(const at::Tensor& crow, int64_t M, int64_t nnz, const at::Tensor& bad, int64_t n,
                            const char* rows_of) {
  TORCH_CHECK(crow[0].item<int64_t>() == 0 && crow[M].item<int64_t>() == nnz && bad.item<int>() == 0,
              "exactq: malformed CSR: crow must be non-decreasing from 0 to col.numel() and every col index in "
              "[0, ", n, ") (", rows_of, ")");
}

// Row i's entries [e0, e1) of a CSR; false, with *bad set, for a malformed row (checked on the host after
// the launch).
__device__ __forceinline__ bool row_entries(const int64_t* __restrict__ crow, int64_t i, int64_t nnz, int lane,
                                            int* __restrict__ bad, int64_t* e0, int64_t* e1) {
  *e0 = crow[i];
  *e1 = crow[i + 1];
  if (*e0 < 0 || *e0 > *e1 || *e1 > nnz) {
    if (lane == 0) atomicExch(bad, 1);
    return false;
  }
  return true;
}

// One warp per row; *bad is set for a malformed row (checked on the host after the launch).
template <bool W>
__global__ void spmm_kernel(const int64_t* __restrict__ crow, const int64_t* __restrict__ col,
                            const float* __restrict__ w, const int8_t* __restrict__ q, int64_t n, int64_t C,
                            const float* __restrict__ scale, const float* __restrict__ rs, int64_t M, int64_t nnz,
                            float* __restrict__ out, int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; i < M; i += warps) {
    int64_t e0, e1;
    if (!row_entries(crow, i, nnz, lane, bad, &e0, &e1)) continue;
    const float r = rs != nullptr ? rs[i] : 1.0f;
    for (int64_t c0 = 0; c0 < C; c0 += 32 * 8) {  // up to 8 columns per lane in registers
      int32_t iacc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      float facc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t j = col[e];
        if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(n)) {
          if (lane == 0) atomicExch(bad, 1);
          continue;
        }
        const int8_t* qr = q + j * C;
        const float we = W ? w[e] : 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int64_t c = c0 + lane + 32 * k;
          if (c < C) {
            if (W) {
              facc[k] = facc[k] + we * static_cast<float>(qr[c]);
            } else {
              iacc[k] += qr[c];
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int64_t c = c0 + lane + 32 * k;
        if (c < C) out[i * C + c] = ((W ? facc[k] : static_cast<float>(iacc[k])) * scale[c]) * r;
      }
    }
  }
}

at::Tensor int8_spmm_cuda(const at::Tensor& crow, const at::Tensor& col, const std::optional<at::Tensor>& weight,
                          const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& row_scale) {
  check_int8_spmm_inputs(crow, col, weight, q, scale, row_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t M = crow.numel() - 1, n = q.size(0), C = q.size(1), nnz = col.numel();
  at::Tensor out = at::empty({M, C}, q.options().dtype(at::kFloat));
  at::Tensor bad = at::zeros({1}, q.options().dtype(at::kInt));
  if (M > 0 && C > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const float* wp = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
    const float* rsp = row_scale.has_value() ? row_scale->const_data_ptr<float>() : nullptr;
    const int64_t grid = blocks_for(M, kThreads / 32);
    if (wp != nullptr) {
      spmm_kernel<true><<<grid, kThreads, 0, stream>>>(crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
                                                       wp, q.const_data_ptr<int8_t>(), n, C,
                                                       scale.const_data_ptr<float>(), rsp, M, nnz,
                                                       out.data_ptr<float>(), bad.data_ptr<int>());
    } else {
      spmm_kernel<false><<<grid, kThreads, 0, stream>>>(crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
                                                        wp, q.const_data_ptr<int8_t>(), n, C,
                                                        scale.const_data_ptr<float>(), rsp, M, nnz,
                                                        out.data_ptr<float>(), bad.data_ptr<int>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  check_csr_after_launch(crow, M, nnz, bad, n, "q.size(0)");
  return out;
}

// One warp per row i; for each entry and head the lanes split the head's columns and add their int32
// partial dot products with shuffles (integer sums: exact in any order).
__global__ void sddmm_kernel(const int64_t* __restrict__ crow, const int64_t* __restrict__ col,
                             const int8_t* __restrict__ a, const float* __restrict__ as,
                             const int8_t* __restrict__ b, const float* __restrict__ bs, int64_t n, int64_t H,
                             int64_t Ch, int64_t M, int64_t nnz, float* __restrict__ out, int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const int64_t C = H * Ch;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; i < M; i += warps) {
    int64_t e0, e1;
    if (!row_entries(crow, i, nnz, lane, bad, &e0, &e1)) continue;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t j = col[e];
      if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(n)) {
        if (lane == 0) atomicExch(bad, 1);
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        int32_t acc = 0;
        for (int64_t c = h * Ch + lane; c < (h + 1) * Ch; c += 32) {
          acc += static_cast<int32_t>(a[i * C + c]) * static_cast<int32_t>(b[j * C + c]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) out[e * H + h] = (static_cast<float>(acc) * as[i * H + h]) * bs[j * H + h];
      }
    }
  }
}

at::Tensor int8_sddmm_cuda(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& a,
                           const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale) {
  check_int8_sddmm_inputs(crow, col, a, a_scale, b, b_scale);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = crow.numel() - 1, n = b.size(0), H = a_scale.size(1), Ch = a.size(1) / H, nnz = col.numel();
  at::Tensor out = at::empty({nnz, H}, a.options().dtype(at::kFloat));
  at::Tensor bad = at::zeros({1}, a.options().dtype(at::kInt));
  if (M > 0 && nnz > 0) {
    sddmm_kernel<<<blocks_for(M, kThreads / 32), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), a.const_data_ptr<int8_t>(),
        a_scale.const_data_ptr<float>(), b.const_data_ptr<int8_t>(), b_scale.const_data_ptr<float>(), n, H, Ch, M,
        nnz, out.data_ptr<float>(), bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  check_csr_after_launch(crow, M, nnz, bad, n, "b.size(0)");
  return out;
}

__global__ void epilogue_kernel(const int32_t* __restrict__ acc, const float* __restrict__ rs,
                                const float* __restrict__ cs, const float* __restrict__ bias, int64_t M, int64_t N,
                                float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < M * N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % N;
    const float v = (static_cast<float>(acc[i]) * rs[i / N]) * cs[j];
    out[i] = bias != nullptr ? v + bias[j] : v;
  }
}

at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& rs_in, const at::Tensor& cs_in,
                        const std::optional<at::Tensor>& bias_in) {
  check_int8_mm_inputs(a, b, rs_in, cs_in, bias_in);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor acc;
  if (K == 0) {
    acc = at::zeros({M, N}, a.options().dtype(at::kInt));
  } else {
    // cuBLASLt's int8 GEMM (at::_int_mm) takes M > 16 and K, N multiples of 8: other shapes (a weight
    // gradient summed over a node count) get zero rows and columns, which add nothing to the sums.
    const auto up8 = [](int64_t v) { return (v + 7) / 8 * 8; };
    const int64_t Mp = std::max<int64_t>(M, 17), Kp = up8(K), Np = up8(N);
    const at::Tensor ap = (Mp != M || Kp != K) ? at::constant_pad_nd(a, {0, Kp - K, 0, Mp - M}) : a;
    const at::Tensor bp = (Kp != K || Np != N) ? at::constant_pad_nd(b, {0, Np - N, 0, Kp - K}) : b;
    acc = at::_int_mm(ap, bp).narrow(0, 0, M).narrow(1, 0, N).contiguous();
  }
  const at::Tensor rs = rs_in.contiguous(), cs = cs_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, rs.options());
  if (M * N > 0) {
    epilogue_kernel<<<blocks_for(M * N, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        acc.const_data_ptr<int32_t>(), rs.const_data_ptr<float>(), cs.const_data_ptr<float>(),
        bias.defined() ? bias.const_data_ptr<float>() : nullptr, M, N, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

__global__ void dropout_kernel(const float* __restrict__ x, int64_t n, RngKeys keys, float p, float scale,
                               float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t idx = static_cast<uint64_t>(i);
    out[i] = x[i] * dropout_factor(keys, span_key(keys, idx >> 32), static_cast<uint32_t>(idx), p, scale);
  }
}

at::Tensor seeded_dropout_cuda(const at::Tensor& x_in, double p_d, int64_t seed) {
  check_seeded_dropout_input(x_in, p_d);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float p = static_cast<float>(p_d);
  const int64_t n = x.numel();
  if (n > 0) {
    dropout_kernel<<<blocks_for(n, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<float>(), n, make_keys(seed), p, 1.0f / (1.0f - p), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(exactq, CUDA, m) {
  m.impl("seeded_dropout", &seeded_dropout_cuda);
  m.impl("int8_quantize", &int8_quantize_cuda);
  m.impl("dequantize_int8", &dequantize_int8_cuda);
  m.impl("int8_spmm", &int8_spmm_cuda);
  m.impl("int8_sddmm", &int8_sddmm_cuda);
  m.impl("int8_mm", &int8_mm_cuda);
}

}  // namespace cuda
}  // namespace exactq
