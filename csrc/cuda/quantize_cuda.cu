// CUDA kernels for the exactq ops, registered for the CUDA dispatch key of the schemas in
// exactq/_ops.py. They share every scalar step with the CPU kernels (csrc/common.h) and must produce
// the same bytes as the reference (exactq/reference.py); build with --fmad=false.
//
// Quantize: one thread block per group of consecutive quantization blocks whose packed codes end on
// a byte boundary (csrc/common.h: blocks_per_byte_group), so each output byte has a single writer.
// For each quantization block of the group: min/max by warp shuffles + shared memory, statistics by
// thread 0; then the threads round and pack whole bytes, re-reading the (cached) inputs. Any block
// size works (threads stride over the block), indices are 64-bit, launches use the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../checks.h"
#include "../common.h"

namespace exactq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;
constexpr int kMaxGroup = 8;  // blocks_per_byte_group(...) <= 8

__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_down_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_down_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Block-wide min/max/any-non-finite over x[begin, end); the result is valid in thread 0.
template <typename T>
__device__ void block_minmax(const T* __restrict__ x, int64_t begin, int64_t end, float* mn_out,
                             float* mx_out, bool* bad_out) {
  __shared__ float s_mn[kThreads / 32], s_mx[kThreads / 32];
  __shared__ int s_bad[kThreads / 32];
  float mn = INFINITY, mx = -INFINITY;
  int bad = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = static_cast<float>(x[i]);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    bad |= static_cast<int>((float_bits(v) & 0x7F800000u) == 0x7F800000u);
  }
  mn = warp_min(mn);
  mx = warp_max(mx);
  bad = __any_sync(0xffffffffu, bad);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_mn[warp] = mn;
    s_mx[warp] = mx;
    s_bad[warp] = bad;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
      mn = s_mn[w] < mn ? s_mn[w] : mn;
      mx = s_mx[w] > mx ? s_mx[w] : mx;
      bad |= s_bad[w];
    }
    *mn_out = mn;
    *mx_out = mx;
    *bad_out = bad != 0;
  }
  __syncthreads();  // s_* are reused by the next call
}

template <typename T, bool NU>
__global__ void __launch_bounds__(kThreads) quantize_kernel(
    const T* __restrict__ x, int64_t numel, int64_t block_size, int64_t group, int bits,
    RoundParams rp, RngKeys keys, uint8_t* __restrict__ packed, uint16_t* __restrict__ stats) {
  __shared__ float s_lo[kMaxGroup], s_range[kMaxGroup];
  __shared__ bool s_zero[kMaxGroup];
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  const int64_t ngroups = (nblocks + group - 1) / group;
  const int cpb = 8 / bits;
  for (int64_t grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
    const int64_t b0 = grp * group;
    const int64_t b1 = min(nblocks, b0 + group);
    for (int64_t b = b0; b < b1; ++b) {
      float mn, mx;
      bool bad;
      block_minmax(x, b * block_size, min(numel, (b + 1) * block_size), &mn, &mx, &bad);
      if (threadIdx.x == 0) {
        uint16_t lo, rg;
        block_stats(mn, mx, !bad, &lo, &rg);
        stats[2 * b] = lo;
        stats[2 * b + 1] = rg;
        s_lo[b - b0] = bf16_to_float(lo);
        s_range[b - b0] = bf16_to_float(rg);
        s_zero[b - b0] = bad || bf16_to_float(rg) == 0.0f;  // all-zero codes, as on CPU
      }
    }
    __syncthreads();
    const int64_t e0 = b0 * block_size, e1 = min(numel, b1 * block_size);
    const int64_t k0 = e0 / cpb, k1 = (e1 + cpb - 1) / cpb;  // e0 is byte-aligned by construction
    for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) {
      uint32_t byte = 0;
      for (int c = 0; c < cpb; ++c) {
        const int64_t i = k * cpb + c;
        if (i >= e1) break;
        const int64_t slot = i / block_size - b0;
        if (s_zero[slot]) continue;
        const uint64_t ui = static_cast<uint64_t>(i);
        const float u = uniform_lo(keys, span_key(keys, ui >> 32), static_cast<uint32_t>(ui));
        const uint32_t code = round_code<NU>(rp, static_cast<float>(x[i]), s_lo[slot], s_range[slot], u);
        byte |= code << (c * bits);
      }
      packed[k] = static_cast<uint8_t>(byte);
    }
    __syncthreads();  // s_lo/s_range are rewritten for the next group
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(
    const uint8_t* __restrict__ packed, const uint16_t* __restrict__ stats, int64_t numel,
    int64_t block_size, Grid g, T* __restrict__ out) {
  const int cpb = 8 / g.bits;
  const uint32_t mask = (1u << g.bits) - 1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / block_size;
    const float lo = bf16_to_float(stats[2 * b]);
    const float range = bf16_to_float(stats[2 * b + 1]);
    const uint32_t code = (packed[i / cpb] >> ((i % cpb) * g.bits)) & mask;
    out[i] = static_cast<T>(lo + range * g.levels[code]);
  }
}

template <typename T>
__global__ void pack_mask_kernel(const T* __restrict__ x, int64_t numel, bool positive, uint8_t* __restrict__ out) {
  const int64_t nbytes = (numel + 7) / 8;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < nbytes;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t b = 0;
    for (int c = 0; c < 8 && k * 8 + c < numel; ++c) b |= static_cast<uint32_t>(mask_bit(x[k * 8 + c], positive)) << c;
    out[k] = static_cast<uint8_t>(b);
  }
}

// value: a device pointer to one element (read on the device, so no host synchronisation), or
// nullptr for a bool output.
template <typename T>
__global__ void unpack_mask_kernel(const uint8_t* __restrict__ packed, int64_t numel, const T* __restrict__ value,
                                   T* __restrict__ out) {
  const T v = value != nullptr ? *value : T(1);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = ((packed[i >> 3] >> (i & 7)) & 1) ? v : T(0);
  }
}

int grid_for(int64_t work) { return static_cast<int>(std::max<int64_t>(1, std::min(work, kMaxGrid))); }

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& input, int64_t bits,
                                                  int64_t block_size, std::optional<double> level,
                                                  int64_t seed) {
  check_args(bits, block_size, level.has_value());
  check_quantize_input(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const int64_t numel = x.numel();
  const int64_t nblocks = (numel + block_size - 1) / block_size;
  at::Tensor packed = at::empty({(numel * bits + 7) / 8}, x.options().dtype(at::kByte));
  at::Tensor stats = at::empty({nblocks, 2}, x.options().dtype(at::kBFloat16));
  if (numel == 0) return {packed, stats};
  Grid g;
  make_grid(&g, static_cast<int>(bits), level.has_value(), level.value_or(0.0));
  const RoundParams rp = make_round_params(g);
  const RngKeys keys = make_keys(seed);
  const int64_t group = blocks_per_byte_group(block_size, static_cast<int>(bits));
  const int64_t ngroups = (nblocks + group - 1) / group;
  auto stream = c10::cuda::getCurrentCUDAStream();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(stats.data_ptr<at::BFloat16>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "exactq_quantize_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (level.has_value()) {
      quantize_kernel<scalar_t, true><<<grid_for(ngroups), kThreads, 0, stream>>>(
          xp, numel, block_size, group, static_cast<int>(bits), rp, keys, pp, sp);
    } else {
      quantize_kernel<scalar_t, false><<<grid_for(ngroups), kThreads, 0, stream>>>(
          xp, numel, block_size, group, static_cast<int>(bits), rp, keys, pp, sp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, stats};
}

void dequantize_into_cuda(const at::Tensor& packed, const at::Tensor& stats, int64_t bits, int64_t block_size,
                          std::optional<double> level, const at::Tensor& out) {
  check_args(bits, block_size, level.has_value());
  const int64_t numel = out.numel();
  check_dequantize_inputs(packed, stats, bits, block_size, numel, out.scalar_type());
  check_out(out, packed, numel, out.scalar_type());
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(packed.device());
  Grid g;
  make_grid(&g, static_cast<int>(bits), level.has_value(), level.value_or(0.0));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(stats.const_data_ptr<at::BFloat16>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "exactq_dequantize_cuda", [&] {
    dequantize_kernel<scalar_t><<<grid_for((numel + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        pp, sp, numel, block_size, g, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& stats, int64_t bits,
                           int64_t block_size, std::optional<double> level, c10::SymInt numel_s,
                           at::ScalarType dtype) {
  at::Tensor out = at::empty({numel_s.expect_int()}, packed.options().dtype(dtype));
  dequantize_into_cuda(packed, stats, bits, block_size, level, out);
  return out;
}

at::Tensor pack_mask_cuda(const at::Tensor& input, bool positive) {
  check_pack_mask_input(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const int64_t numel = x.numel();
  const int64_t nbytes = (numel + 7) / 8;
  at::Tensor out = at::empty({nbytes}, x.options().dtype(at::kByte));
  if (nbytes == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "exactq_pack_mask_cuda", [&] {
    pack_mask_kernel<scalar_t><<<grid_for((nbytes + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), numel, positive, out.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void unpack_mask_into_cuda(const at::Tensor& packed, const std::optional<at::Tensor>& value, const at::Tensor& out) {
  const int64_t numel = out.numel();
  check_unpack_mask_inputs(packed, numel, value);
  check_out(out, packed, numel, value.has_value() ? value->scalar_type() : at::kBool);
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(packed.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, out.scalar_type(), "exactq_unpack_mask_cuda", [&] {
    const scalar_t* vp = value.has_value() ? value->const_data_ptr<scalar_t>() : nullptr;
    unpack_mask_kernel<scalar_t><<<grid_for((numel + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        packed.const_data_ptr<uint8_t>(), numel, vp, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed, c10::SymInt numel_s, const std::optional<at::Tensor>& value) {
  const at::ScalarType dtype = value.has_value() ? value->scalar_type() : at::kBool;
  at::Tensor out = at::empty({numel_s.expect_int()}, packed.options().dtype(dtype));
  unpack_mask_into_cuda(packed, value, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(exactq, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("dequantize_into", &dequantize_into_cuda);
  m.impl("pack_mask", &pack_mask_cuda);
  m.impl("unpack_mask", &unpack_mask_cuda);
  m.impl("unpack_mask_into", &unpack_mask_into_cuda);
}

}  // namespace cuda
}  // namespace exactq
