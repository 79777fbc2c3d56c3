"""Plain-PyTorch reference of every exactq op: the readable specification.

The C++ and CUDA kernels must produce the same bytes as these functions for the same arguments
(tests/test_ops.py checks it). Every step is integer arithmetic or an exactly rounded float32 operation,
so that equality is exact, not approximate. Unsigned 32-bit arithmetic is emulated in int64 tensors.

Format (shared by all implementations):

* ``x`` is flattened row-major and cut into blocks of ``block_size`` elements; the last may be partial.
* ``stats[b] = (lo, range)`` as bfloat16: ``lo`` is the block minimum rounded toward -inf, ``range``
  is ``max - lo`` rounded toward +inf (and bumped one bfloat16 step if float32 ``lo + range`` still
  falls below the maximum). A block holding NaN or +-Inf stores NaN for both.
* codes: ``t = (x - lo) / range`` is rounded stochastically onto the grid ``levels`` (``k / L`` or
  the non-uniform ``{0, a, 1 - a, 1}``), with probability of rounding up ``(t - l) / (u - l)``.
  Element ``i``'s code occupies bits ``(i % cpb) * bits`` of byte ``i // cpb``, ``cpb = 8 // bits``.
* the uniform draw of element ``i`` is a counter-based hash of ``(seed, i)`` (see ``uniform``).
* dequantized value: ``lo + range * levels[code]`` in float32, cast to the requested dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_BF16_NAN = 0x7FC0


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32, without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' 32-bit integer hash on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _lowbias32_int(x: int) -> int:
    return int(lowbias32(torch.tensor([x & _M32], dtype=torch.int64)).item())


def rng_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys derived from a seed in [0, 2^63)."""
    k0 = _lowbias32_int((seed & _M32) ^ 0x243F6A88)
    k1 = _lowbias32_int(((seed >> 32) & _M32) ^ k0 ^ 0x85A308D3)
    return k0, k1


def uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) for each int64 element index: a pure function of (seed, index)."""
    k0, k1 = rng_keys(seed)
    key_hi = (k1 ^ (((index >> 32) * _GOLDEN) & _M32)) & _M32
    h = lowbias32((index & _M32) ^ k0)
    h = lowbias32(h ^ key_hi)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def _float_bits(v: torch.Tensor) -> torch.Tensor:
    return v.contiguous().view(torch.int32).to(torch.int64) & _M32


def _bits_float(b: torch.Tensor) -> torch.Tensor:
    signed = torch.where(b >= 2**31, b - 2**32, b)
    return signed.to(torch.int32).view(torch.float32)


def bf16_round_down(v: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 bits (int64), rounded toward -inf."""
    b = _float_bits(v)
    inexact = (b & 0xFFFF) != 0
    negative = (b >> 31) == 1
    return (b >> 16) + (inexact & negative).to(torch.int64)


def bf16_round_up(v: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 bits (int64), rounded toward +inf."""
    b = _float_bits(v)
    inexact = (b & 0xFFFF) != 0
    negative = (b >> 31) == 1
    return (b >> 16) + (inexact & ~negative).to(torch.int64)


def bf16_bits_to_float(h: torch.Tensor) -> torch.Tensor:
    return _bits_float(h << 16)


def _bits_to_bf16(h: torch.Tensor) -> torch.Tensor:
    return torch.where(h >= 2**15, h - 2**16, h).to(torch.int16).view(torch.bfloat16)


def grid(bits: int, level: Optional[float]) -> torch.Tensor:
    """The float32 levels in units of the block range (L + 1 values, 0 to 1)."""
    top = 2**bits - 1
    levels = torch.arange(top + 1, dtype=torch.float32) / torch.tensor(float(top), dtype=torch.float32)
    if level is not None:
        a = torch.tensor(level, dtype=torch.float32)
        levels = torch.stack([levels[0], a, torch.tensor(1.0) - a, levels[3]])
    return levels


def block_stats(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo_bits, range_bits) int64 per block, as described in the module docstring."""
    n = flat.numel()
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    padded = torch.nn.functional.pad(flat, (0, pad))
    valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, pad)).view(nblocks, block_size)
    blocks = padded.view(nblocks, block_size)
    finite = (torch.isfinite(blocks) | ~valid).all(dim=1)
    inf = torch.tensor(float("inf"))
    # + 0.0 turns -0.0 into +0.0: reductions may return either, so all implementations canonicalise.
    mn = torch.where(valid, blocks, inf).amin(dim=1) + 0.0
    mx = torch.where(valid, blocks, -inf).amax(dim=1) + 0.0
    lo = bf16_round_down(mn)
    lo_f = bf16_bits_to_float(lo)
    rg = bf16_round_up(mx - lo_f)
    rg = rg + (lo_f + bf16_bits_to_float(rg) < mx).to(torch.int64)
    nan = torch.full_like(lo, _BF16_NAN)
    return torch.where(finite, lo, nan), torch.where(finite, rg, nan)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes in [0, 2^bits) -> uint8 bytes, ``8 // bits`` codes per byte, low bits first."""
    cpb = 8 // bits
    pad = -codes.numel() % cpb
    c = torch.nn.functional.pad(codes, (0, pad)).view(-1, cpb)
    shifts = torch.arange(cpb, dtype=torch.int64) * bits
    return (c << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    cpb = 8 // bits
    shifts = torch.arange(cpb, dtype=torch.int64) * bits
    codes = (packed.to(torch.int64).unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel]


def quantize(
    x: torch.Tensor, bits: int, block_size: int, level: Optional[float], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``exactq::quantize``: returns (packed uint8 codes, bfloat16 stats [nblocks, 2])."""
    device = x.device
    flat = x.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    n = flat.numel()
    nblocks = -(-n // block_size)
    lo_bits, rg_bits = block_stats(flat, block_size)
    lo = bf16_bits_to_float(lo_bits).repeat_interleave(block_size)[:n]
    rg = bf16_bits_to_float(rg_bits).repeat_interleave(block_size)[:n]
    levels = grid(bits, level)
    top = 2**bits - 1
    t = (flat - lo) / rg
    if level is None:
        y = t * torch.tensor(float(top))
        j = torch.clamp(y.trunc(), max=float(top - 1))
        frac = y - j
        j = j.to(torch.int64)
    else:
        j = (t >= levels[1]).to(torch.int64) + (t >= levels[2]).to(torch.int64)
        inv_gap = torch.ones(3, dtype=torch.float32) / (levels[1:] - levels[:-1])
        frac = (t - levels[j]) * inv_gap[j]
    u = uniform(seed, torch.arange(n, dtype=torch.int64))
    codes = torch.clamp(j + (u < frac).to(torch.int64), max=top)
    # Constant and non-finite blocks store code 0 (their t is NaN or meaningless).
    keep = (rg > 0) & torch.isfinite(rg)
    codes = torch.where(keep, codes, torch.zeros_like(codes))
    stats = _bits_to_bf16(torch.stack([lo_bits, rg_bits], dim=1)).reshape(nblocks, 2)
    return pack_codes(codes, bits).to(device), stats.to(device)


def dequantize(
    packed: torch.Tensor,
    stats: torch.Tensor,
    bits: int,
    block_size: int,
    level: Optional[float],
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference of ``exactq::dequantize``: a flat tensor of ``numel`` elements of ``dtype``."""
    device = packed.device
    codes = unpack_codes(packed.cpu(), bits, numel)
    st = stats.cpu().to(torch.float32)
    lo = st[:, 0].repeat_interleave(block_size)[:numel]
    rg = st[:, 1].repeat_interleave(block_size)[:numel]
    out = lo + rg * grid(bits, level)[codes]
    return out.to(device=device, dtype=dtype)


def dequantize_into(
    packed: torch.Tensor, stats: torch.Tensor, bits: int, block_size: int, level: Optional[float], out: torch.Tensor
) -> None:
    """Reference of ``exactq::dequantize_into``: :func:`dequantize` written into ``out`` (its numel and dtype)."""
    out.view(-1).copy_(dequantize(packed, stats, bits, block_size, level, out.numel(), out.dtype))


def pack_mask(x: torch.Tensor, positive: bool = False) -> torch.Tensor:
    """Reference of ``exactq::pack_mask``: uint8, 8 elements per byte, low bit first. The bit of an element
    is the element itself for a bool tensor; for a floating one ``x != 0`` (NaN is non-zero), or
    ``x > 0`` with ``positive``."""
    m = x if x.dtype == torch.bool else (x > 0 if positive else x != 0)
    return pack_codes(m.reshape(-1).cpu().to(torch.int64), 1).to(x.device)


def unpack_mask(packed: torch.Tensor, numel: int, value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of ``exactq::unpack_mask``: a flat tensor of ``numel`` elements; bool, or with a 0-dim
    ``value`` that value where the bit is set and +0 elsewhere, in ``value.dtype``."""
    bits = unpack_codes(packed.cpu(), 1, numel).to(device=packed.device, dtype=torch.bool)
    if value is None:
        return bits
    return torch.where(bits, value, torch.zeros((), dtype=value.dtype, device=value.device))


def unpack_mask_into(packed: torch.Tensor, value: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """Reference of ``exactq::unpack_mask_into``: :func:`unpack_mask` written into ``out``."""
    out.view(-1).copy_(unpack_mask(packed, out.numel(), value))


# ---- INT8 compute operands (exactq.compute) ----------------------------------------------------------
# Symmetric codes in [-127, 127], one float32 scale = absmax / 127 per column (dim=0) or row (dim=1).
# Nearest rounding (ties to even) without a seed; with one, stochastic: floor(t) + (u < t - floor(t)),
# u the same counter-based draw as above for element index i * C + c. A slice whose scale is 0 or not
# finite (it holds NaN/Inf) gets codes 0.


def int8_quantize(x: torch.Tensor, dim: int, seed: Optional[int] = None,
                  row_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``exactq::int8_quantize``: returns (int8 codes shaped like ``x``, float32 scales) of
    ``x``, or of ``x * row_scale[:, None]`` (float32 products) when ``row_scale`` is given."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16) or dim not in (0, 1):
        raise ValueError(f"int8_quantize needs a 2-D float32/bfloat16 tensor and dim 0 or 1, got "
                         f"{x.dim()}-D {x.dtype}, dim={dim}")
    if row_scale is not None and (row_scale.shape != (x.shape[0],) or row_scale.dtype != torch.float32):
        raise ValueError(f"int8_quantize's row_scale must be float32 of x.size(0) = {x.shape[0]} elements")
    xf = x.detach().float()
    if row_scale is not None:
        xf = xf * row_scale.unsqueeze(1)
    scale = xf.abs().amax(dim) / torch.tensor(127.0)
    s = scale.unsqueeze(dim)
    t = torch.clamp(xf / s, -127.0, 127.0)
    if seed is None:
        r = torch.round(t)
    else:
        f = torch.floor(t)
        u = uniform(seed, torch.arange(x.numel(), dtype=torch.int64)).view(x.shape).to(x.device)
        r = f + (u < t - f).float()
    valid = (s > 0) & torch.isfinite(s)
    codes = torch.where(valid, r, torch.zeros_like(r)).to(torch.int8)
    return codes, scale


def dequantize_int8(packed: torch.Tensor, stats: torch.Tensor, bits: int, block_size: int, level: Optional[float],
                    rows: int, cols: int, seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``exactq::dequantize_int8``: the int8 codes and per-row scales of the ``[rows, cols]``
    float32 tensor :func:`dequantize` restores (:func:`int8_quantize` with ``dim=1``)."""
    if rows < 0 or cols < 0:
        raise ValueError(f"dequantize_int8 needs rows >= 0 and cols >= 0, got {rows} and {cols}")
    x = dequantize(packed, stats, bits, block_size, level, rows * cols, torch.float32).view(rows, cols)
    return int8_quantize(x, 1, seed)


def int8_spmm(crow: torch.Tensor, col: torch.Tensor, weight: Optional[torch.Tensor], q: torch.Tensor,
              scale: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference of ``exactq::int8_spmm``: ``row_scale * (A @ (q * scale))`` in float32 for the CSR matrix
    ``A`` (rows ``crow.numel() - 1``; entries ``weight`` or ones). Unweighted sums of codes are exact int32
    sums; weighted ones accumulate ``acc + w * code`` in float32 in CSR order, row by row."""
    m, n, c = crow.numel() - 1, q.shape[0], q.shape[1]
    deg = crow[1:] - crow[:-1]
    if (crow[0] != 0 or crow[-1] != col.numel() or bool((deg < 0).any())
            or bool(((col < 0) | (col >= n)).any())):
        raise ValueError(f"malformed CSR: crow must be non-decreasing from 0 to col.numel() and every col index in "
                         f"[0, {n}) (q.size(0))")
    if weight is None:
        rows = torch.repeat_interleave(torch.arange(m, device=q.device), deg)
        acc = torch.zeros(m, c, dtype=torch.int32, device=q.device).index_add_(0, rows, q[col].to(torch.int32))
        acc = acc.float()
    else:
        acc = torch.zeros(m, c, dtype=torch.float32, device=q.device)
        for k in range(int(deg.max()) if m > 0 else 0):  # the k-th entry of every row that has one
            rows = (deg > k).nonzero().squeeze(1)
            e = crow[rows] + k
            acc[rows] = acc[rows] + weight[e].unsqueeze(1) * q[col[e]].float()
    out = acc * scale
    return out * row_scale.unsqueeze(1) if row_scale is not None else out * torch.tensor(1.0)


def int8_sddmm(crow: torch.Tensor, col: torch.Tensor, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
               b_scale: torch.Tensor) -> torch.Tensor:
    """Reference of ``exactq::int8_sddmm``: for each entry ``e = (i, j)`` of the CSR pattern and head ``h``
    (``a_scale.size(1)`` equal groups of columns), ``(float(a[i, h] . b[j, h]) * a_scale[i, h]) * b_scale[j, h]``
    with the dot product of int8 codes summed exactly in int32; ``[nnz, heads]`` float32."""
    m, n, heads = crow.numel() - 1, b.shape[0], a_scale.shape[1]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.shape[0] != m or a.shape[1] % heads \
            or a_scale.shape != (m, heads) or b_scale.shape != (n, heads):
        raise ValueError("int8_sddmm needs a [rows, C], b [n, C], a_scale [rows, heads], b_scale [n, heads], "
                         "heads dividing C")
    deg = crow[1:] - crow[:-1]
    if (crow[0] != 0 or crow[-1] != col.numel() or bool((deg < 0).any())
            or bool(((col < 0) | (col >= n)).any())):
        raise ValueError(f"malformed CSR: crow must be non-decreasing from 0 to col.numel() and every col index in "
                         f"[0, {n}) (b.size(0))")
    rows = torch.repeat_interleave(torch.arange(m, device=a.device), deg)
    prod = a[rows].to(torch.int32) * b[col].to(torch.int32)
    acc = prod.view(col.numel(), heads, -1).sum(-1, dtype=torch.int32).float()
    return (acc * a_scale[rows]) * b_scale[col]


INT8_MAX_TERMS = (2**31 - 1) // (128 * 128)  # longest int8 x int8 sum that cannot overflow int32


def int8_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of ``exactq::int8_mm``: the exact integer product of int8 ``a`` [M, K] and ``b`` [K, N]
    (K <= :data:`INT8_MAX_TERMS`, so int32 holds it), then ``(float(acc) * a_scale[i]) * b_scale[j]``
    (+ ``bias[j]``) in float32."""
    if a.dim() != 2 or b.dim() != 2 or a.dtype != torch.int8 or b.dtype != torch.int8 or a.shape[1] != b.shape[0] \
            or a.shape[1] > INT8_MAX_TERMS or a_scale.shape != (a.shape[0],) or b_scale.shape != (b.shape[1],) \
            or (bias is not None and bias.shape != (b.shape[1],)):
        raise ValueError(f"int8_mm needs int8 a [M, K], b [K, N] with K <= {INT8_MAX_TERMS}, a_scale [M], "
                         "b_scale [N], bias [N] or None")
    acc = (a.cpu().to(torch.int64) @ b.cpu().to(torch.int64)).to(a.device)  # exact: |acc| < 2^31
    out = (acc.float() * a_scale.float().unsqueeze(1)) * b_scale.float()
    return out + bias.float() if bias is not None else out


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Reference of ``exactq::seeded_dropout``: element ``i`` (row-major) is kept where
    ``uniform(seed, i) >= p`` (as float32) and multiplied by ``1 / (1 - p)`` (float32), else by 0 (so NaN
    stays NaN, as in torch's dropout). float32 only."""
    if x.dtype != torch.float32 or not 0.0 <= p < 1.0:
        raise ValueError(f"seeded_dropout needs float32 and 0 <= p < 1, got {x.dtype}, p={p}")
    pf = torch.tensor(p, dtype=torch.float32)
    scale = torch.tensor(1.0, dtype=torch.float32) / (torch.tensor(1.0, dtype=torch.float32) - pf)
    keep = uniform(seed, torch.arange(x.numel(), dtype=torch.int64)).view(x.shape).to(x.device) >= pf.to(x.device)
    return x * torch.where(keep, scale.to(x.device), torch.zeros((), device=x.device))


def _kth_of_group(group: torch.Tensor) -> torch.Tensor:
    """For a sorted (non-decreasing) 1-D ``group``, each element's position within its run of equal values."""
    n = group.numel()
    start = torch.ones(n, dtype=torch.bool, device=group.device)
    if n:
        start[1:] = group[1:] != group[:-1]
    first = torch.cummax(torch.where(start, torch.arange(n, device=group.device), 0), 0).values
    return torch.arange(n, device=group.device) - first


def spmm_columns(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, row_scale: Optional[torch.Tensor],
                 col_start: int, col_end: int, transpose: bool, x: torch.Tensor, out: torch.Tensor) -> None:
    """Reference of ``exactq::spmm_columns``: with ``B = (diag(row_scale) A)[:, col_start:col_end]`` for the
    CSR matrix ``A = (crow, col, values)``, ``out += B @ x`` (``out += B^T @ x`` with ``transpose``), in place,
    one entry at a time in CSR order: ``out[i] += w * x[col[e] - col_start]`` (transposed: ``out[col[e] -
    col_start] += w * x[i]``) for each entry ``e`` of row ``i`` in the range, ``w = values[e] * row_scale[i]``
    (``values[e]`` without ``row_scale``). float32 / float64; entries outside the range are skipped."""
    m = crow.numel() - 1
    if crow.dim() != 1 or m < 0 or crow.dtype != torch.int64 or col.dim() != 1 or col.dtype != torch.int64:
        raise ValueError("spmm_columns needs 1-D int64 crow (rows + 1 offsets) and col")
    if not 0 <= col_start <= col_end:
        raise ValueError(f"spmm_columns needs 0 <= col_start <= col_end, got {col_start}, {col_end}")
    if x.dtype not in (torch.float32, torch.float64) or values.dtype != x.dtype or values.shape != col.shape:
        raise ValueError("spmm_columns needs float32/float64 x and values of x's dtype, one per column index")
    width = col_end - col_start
    x_rows, out_rows = (m, width) if transpose else (width, m)
    if x.dim() != 2 or x.shape[0] != x_rows or out.shape != (out_rows, x.shape[1]) or out.dtype != x.dtype:
        raise ValueError(f"spmm_columns needs x [{x_rows}, C] and out [{out_rows}, C] of x's dtype")
    if row_scale is not None and (row_scale.shape != (m,) or row_scale.dtype != x.dtype):
        raise ValueError(f"spmm_columns needs row_scale of x's dtype with {m} elements")
    deg = crow[1:] - crow[:-1]
    if crow[0] != 0 or crow[-1] != col.numel() or bool((deg < 0).any()):
        raise ValueError("spmm_columns: malformed CSR: crow must be non-decreasing from 0 to col.numel()")
    rows = torch.repeat_interleave(torch.arange(m, device=col.device), deg)
    sel = ((col >= col_start) & (col < col_end)).nonzero().squeeze(1)  # CSR order
    r, j, w = rows[sel], col[sel] - col_start, values[sel]
    if row_scale is not None:
        w = w * row_scale[r]
    src, dst = (j, r) if not transpose else (r, j)
    order = torch.sort(dst, stable=True).indices  # each output row's terms in CSR order
    src, dst, w = src[order], dst[order], w[order]
    k_of = _kth_of_group(dst)
    for k in range(int(k_of.max()) + 1 if k_of.numel() else 0):  # the k-th term of every output row
        idx = (k_of == k).nonzero().squeeze(1)
        out[dst[idx]] = out[dst[idx]] + w[idx].unsqueeze(1) * x[src[idx]]
