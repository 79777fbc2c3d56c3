"""The op contract: ``torch.library`` schemas of the ``exactq`` namespace, declared once, with fake
(meta) implementations so shapes are known without running a kernel.

Kernels register against these schemas: C++ for CPU and CUDA from ``exactq._C`` (csrc/), and the
plain-PyTorch reference (exactq/reference.py) as the device-generic fallback for any other device, or
for every device when the extension is not built.
"""
from __future__ import annotations

import logging

import torch

from . import reference

log = logging.getLogger(__name__)

_LIB = torch.library.Library("exactq", "DEF")

_SCHEMAS = {
    "quantize": "quantize(Tensor x, int bits, int block_size, float? level, int seed) -> (Tensor, Tensor)",
    "dequantize": (
        "dequantize(Tensor packed, Tensor stats, int bits, int block_size, float? level, SymInt numel, "
        "ScalarType dtype) -> Tensor"
    ),
    # Writes into a given contiguous tensor (the hook engine reuses its memory on CPU).
    "dequantize_into": (
        "dequantize_into(Tensor packed, Tensor stats, int bits, int block_size, float? level, Tensor(a!) out) -> ()"
    ),
    "pack_mask": "pack_mask(Tensor x, bool positive=False) -> Tensor",
    "unpack_mask": "unpack_mask(Tensor packed, SymInt numel, Tensor? value=None) -> Tensor",
    "unpack_mask_into": "unpack_mask_into(Tensor packed, Tensor? value, Tensor(a!) out) -> ()",
    # INT8 compute (exactq.compute): symmetric codes with a float32 scale per column (dim=0) or row (dim=1);
    # nearest rounding without a seed, stochastic with one; with row_scale, the codes of x * row_scale[:, None].
    "int8_quantize": "int8_quantize(Tensor x, int dim, int? seed=None, Tensor? row_scale=None) -> (Tensor, Tensor)",
    # int8_quantize(dequantize(...).view(rows, cols), dim=1, seed) without the float32 tensor: a stored
    # activation decoded straight into the int8 operand of a backward product.
    "dequantize_int8": (
        "dequantize_int8(Tensor packed, Tensor stats, int bits, int block_size, float? level, SymInt rows, "
        "SymInt cols, int? seed=None) -> (Tensor, Tensor)"
    ),
    # out = row_scale * (A @ (q * scale)) for the CSR matrix A = (crow, col, weight or ones).
    "int8_spmm": "int8_spmm(Tensor crow, Tensor col, Tensor? weight, Tensor q, Tensor scale, Tensor? row_scale) -> Tensor",
    # out[e, h] = a_scale[i, h] * b_scale[j, h] * (a[i, head h] . b[j, head h]) for each entry e = (i, j) of the
    # CSR pattern (crow, col), heads = a_scale.size(1) equal column groups; dot products exact in int32.
    "int8_sddmm": "int8_sddmm(Tensor crow, Tensor col, Tensor a, Tensor a_scale, Tensor b, Tensor b_scale) -> Tensor",
    # An int8 GEMM and its epilogue: float(a @ b, exact in int32) * a_scale[i] * b_scale[j] + bias[j], in float32.
    "int8_mm": "int8_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias=None) -> Tensor",
    # Dropout whose mask is a function of (seed, element index): x * (u >= p ? 1 / (1 - p) : 0). Its
    # backward is the same op on the gradient with the same seed, so the mask is never stored.
    "seeded_dropout": "seeded_dropout(Tensor x, float p, int seed) -> Tensor",
    # The product of a CSR matrix A = (crow, col, values) restricted to its columns [col_start, col_end),
    # B = (diag(row_scale) A)[:, col_start:col_end], added into out: out += B @ x, or out += B^T @ x with
    # transpose; in CSR order, without copying A (exactq.distributed's halo rows, one peer at a time).
    "spmm_columns": (
        "spmm_columns(Tensor crow, Tensor col, Tensor values, Tensor? row_scale, int col_start, int col_end, "
        "bool transpose, Tensor x, Tensor(a!) out) -> ()"
    ),
}
for _schema in _SCHEMAS.values():
    _LIB.define(_schema)


@torch.library.register_fake("exactq::quantize", lib=_LIB)
def _quantize_fake(x, bits, block_size, level, seed):
    n = x.numel()
    packed = x.new_empty(((n * bits + 7) // 8,), dtype=torch.uint8)
    stats = x.new_empty(((n + block_size - 1) // block_size, 2), dtype=torch.bfloat16)
    return packed, stats


@torch.library.register_fake("exactq::dequantize", lib=_LIB)
def _dequantize_fake(packed, stats, bits, block_size, level, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.register_fake("exactq::dequantize_into", lib=_LIB)
def _dequantize_into_fake(packed, stats, bits, block_size, level, out):
    return None


@torch.library.register_fake("exactq::pack_mask", lib=_LIB)
def _pack_mask_fake(x, positive=False):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("exactq::unpack_mask", lib=_LIB)
def _unpack_mask_fake(packed, numel, value=None):
    return packed.new_empty((numel,), dtype=torch.bool if value is None else value.dtype)


@torch.library.register_fake("exactq::unpack_mask_into", lib=_LIB)
def _unpack_mask_into_fake(packed, value, out):
    return None


@torch.library.register_fake("exactq::int8_quantize", lib=_LIB)
def _int8_quantize_fake(x, dim, seed=None, row_scale=None):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[1 - dim],), dtype=torch.float32)


@torch.library.register_fake("exactq::dequantize_int8", lib=_LIB)
def _dequantize_int8_fake(packed, stats, bits, block_size, level, rows, cols, seed=None):
    return packed.new_empty((rows, cols), dtype=torch.int8), packed.new_empty((rows,), dtype=torch.float32)


@torch.library.register_fake("exactq::int8_spmm", lib=_LIB)
def _int8_spmm_fake(crow, col, weight, q, scale, row_scale):
    return q.new_empty((crow.shape[0] - 1, q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("exactq::int8_sddmm", lib=_LIB)
def _int8_sddmm_fake(crow, col, a, a_scale, b, b_scale):
    return a.new_empty((col.shape[0], a_scale.shape[1]), dtype=torch.float32)


@torch.library.register_fake("exactq::int8_mm", lib=_LIB)
def _int8_mm_fake(a, b, a_scale, b_scale, bias=None):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


@torch.library.register_fake("exactq::spmm_columns", lib=_LIB)
def _spmm_columns_fake(crow, col, values, row_scale, col_start, col_end, transpose, x, out):
    return None


@torch.library.register_fake("exactq::seeded_dropout", lib=_LIB)
def _seeded_dropout_fake(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# Device-generic fallback (CompositeExplicitAutograd): used where no native kernel is registered.
for _name in _SCHEMAS:
    torch.library.register_kernel(f"exactq::{_name}", None, getattr(reference, _name), lib=_LIB)

try:
    from . import _C  # noqa: F401  (loading registers the native kernels)

    HAS_NATIVE = True
except ImportError as exc:  # pragma: no cover - depends on the build
    HAS_NATIVE = False
    log.warning("exactq._C is not built (%s); every op runs the slow plain-PyTorch reference", exc)


def has_native_kernel(device_type: str) -> bool:
    """Whether a compiled kernel (not the reference fallback) serves ``device_type``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("exactq::quantize", key)


quantize = torch.ops.exactq.quantize.default
dequantize = torch.ops.exactq.dequantize.default
dequantize_into = torch.ops.exactq.dequantize_into.default
pack_mask = torch.ops.exactq.pack_mask.default
unpack_mask = torch.ops.exactq.unpack_mask.default
unpack_mask_into = torch.ops.exactq.unpack_mask_into.default
int8_quantize = torch.ops.exactq.int8_quantize.default
dequantize_int8 = torch.ops.exactq.dequantize_int8.default
int8_spmm = torch.ops.exactq.int8_spmm.default
int8_sddmm = torch.ops.exactq.int8_sddmm.default
int8_mm = torch.ops.exactq.int8_mm.default
seeded_dropout = torch.ops.exactq.seeded_dropout.default
spmm_columns = torch.ops.exactq.spmm_columns.default
