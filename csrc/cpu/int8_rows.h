// Shared between the CPU kernel files: per-row int8 codes of float32 rows, the dim=1 case of
// exactq::int8_quantize, for kernels that make such rows themselves (exactq::dequantize_int8).
#pragma once

#include <cstdint>

#include "../common.h"

namespace exactq {
namespace cpu {

// Scales (absmax / 127, one per row) and codes of rows [r0, r1) whose float32 values start at ``x``
// (row r0's first element); nearest rounding, or stochastic with ``keys`` drawing element i * C + c's
// uniform as int8_quantize does. scale and q are indexed by the global row.
void int8_rows(const float* x, int64_t r0, int64_t r1, int64_t C, bool stochastic, RngKeys keys, float* scale,
               int8_t* q);

}  // namespace cpu
}  // namespace exactq
