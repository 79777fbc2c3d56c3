"""Stateless functional API over the exactq ops: validate, call the op, wrap the result."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from . import _ops
from .levels import int2_levels

SUPPORTED_BITS = (1, 2, 4, 8)
# Chosen by measurement (experiments/block_size.py; results in experiments/results/): see the
# README's "Choosing the block size".
DEFAULT_BLOCK_SIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_SEED = 2**63 - 1


def check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def check_int_at_least_one(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_block_size(block_size: object) -> int:
    return check_int_at_least_one("block_size", block_size)


def resolve_nonuniform(nonuniform: Optional[bool], bits: int) -> bool:
    """``None`` means on for 2 bits and off otherwise; non-uniform levels exist only for 2 bits."""
    if nonuniform is None:
        return bits == 2
    if not isinstance(nonuniform, bool):
        raise TypeError(f"nonuniform must be a bool or None, got {nonuniform!r}")
    if nonuniform and bits != 2:
        raise ValueError(f"nonuniform=True needs bits=2 (the INT2 grid), got bits={bits}")
    return nonuniform


def check_seed(seed: Optional[int], required: bool = False) -> Optional[int]:
    """``seed`` validated; ``None`` passes unless ``required``."""
    if seed is None and not required:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        allowed = "an int" if required else "None or an int"
        raise ValueError(f"seed must be {allowed} in [0, 2**63 - 1], got {seed!r}")
    return seed


def draw_seed() -> int:
    """A seed from torch's default generator, so ``torch.manual_seed`` makes runs reproducible."""
    return int(torch.randint(0, _MAX_SEED, (), dtype=torch.int64))


@dataclass(frozen=True)
class QuantizedTensor:
    """A block-wise quantized tensor: packed codes, per-block bfloat16 (min, range) and metadata.

    Restore it with :func:`exactq.dequantize`. ``nbytes`` counts the bytes really stored.
    """

    packed: torch.Tensor
    stats: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    block_size: int
    level: Optional[float]  # interior level a of the non-uniform INT2 grid {0, a, 1 - a, 1}; None = uniform
    seed: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.stats.nbytes

    @property
    def nonuniform(self) -> bool:
        return self.level is not None


@dataclass(frozen=True)
class PackedMask:
    """A bool tensor stored at 1 bit per element; restore it with :func:`exactq.unpack_mask`."""

    packed: torch.Tensor
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def row_blocks_pay(x: torch.Tensor, bits: int, block_size: int, sample_groups: int = 4096) -> bool:
    """Whether one block per row of ``x`` (its last dimension ``d``) gives a smaller rounding error than
    blocks of ``block_size`` elements (``block_size // d`` rows each), for the bytes the extra block
    statistics cost.

    The expected squared rounding error of an element is proportional to its block's range squared, so
    the mean squared range of single rows is compared with that of groups of rows, measured on a strided
    sample of at most ``sample_groups`` groups. The 32 extra bits per row, spent instead on finer levels,
    would cut the error by ``((2 ** (bits + extra) - 1) / (2 ** bits - 1)) ** 2``; per-row blocks pay
    only when they cut it by more. Rows of very different scale in one block (pooled per-graph
    representations, where a hub's row sets the range of its small neighbours) make them pay; rows alike
    (a hidden layer's activations) do not.
    """
    if x.dim() < 2 or not x.is_contiguous() or not x.dtype.is_floating_point:
        return False
    d = x.shape[-1]
    k = block_size // d if d > 0 else 0
    if d < 16 or k < 2:
        return False
    groups = x.numel() // (d * k)
    if groups < 2:
        return False
    sample = x.reshape(-1)[: groups * k * d].view(groups, k, d)[:: max(1, groups // sample_groups)]
    lo, hi = sample.detach().float().aminmax(dim=-1)
    e_row = float(((hi - lo) ** 2).mean())
    e_group = float(((hi.amax(1) - lo.amin(1)) ** 2).mean())
    if not (math.isfinite(e_row) and math.isfinite(e_group)):
        return False
    extra = 32.0 / d - 32.0 / block_size
    levels = 2.0**bits - 1
    return e_group > ((2.0 ** (bits + extra) - 1) / levels) ** 2 * e_row


def quantize(
    x: torch.Tensor,
    bits: int = 2,
    block_size: int = DEFAULT_BLOCK_SIZE,
    nonuniform: Optional[bool] = None,
    seed: Optional[int] = None,
) -> QuantizedTensor:
    """Quantize ``x`` block-wise to ``bits`` bits with unbiased stochastic rounding.

    Args:
        x: a floating-point tensor (float32, float16, bfloat16 or float64) of any shape and strides.
        bits: 1, 2, 4 or 8.
        block_size: elements per block (>= 1) of the row-major flattened tensor; the last block may be
            partial. Each block stores one bfloat16 minimum and range.
        nonuniform: use the variance-minimising INT2 levels of :func:`exactq.int2_levels`; ``None``
            means on for ``bits=2``.
        seed: seed of the counter-based random numbers, in [0, 2**63 - 1]; ``None`` draws one from
            torch's default generator.

    Returns:
        A :class:`QuantizedTensor`; ``dequantize`` of it is an unbiased estimate of ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {x.dtype}")
    bits = check_bits(bits)
    block_size = check_block_size(block_size)
    level = int2_levels(block_size)[1] if resolve_nonuniform(nonuniform, bits) else None
    seed = check_seed(seed)
    if seed is None:
        seed = draw_seed()
    packed, stats = _ops.quantize(x.detach(), bits, block_size, level, seed)
    return QuantizedTensor(packed, stats, x.shape, x.dtype, bits, block_size, level, seed)


def _check_out(out: Optional[torch.Tensor], numel: int, dtype: torch.dtype, device: torch.device) -> None:
    if out is not None and (
        not isinstance(out, torch.Tensor) or not out.is_contiguous() or out.numel() != numel
        or out.dtype != dtype or out.device != device
    ):
        got = (f"{out.dtype} with {out.numel()} elements on {out.device}"
               + ("" if out.is_contiguous() else ", not contiguous")) if isinstance(out, torch.Tensor) \
            else type(out).__name__
        raise ValueError(f"out must be None or a contiguous {dtype} tensor of {numel} elements on {device}, got {got}")


def _check_quantized(q: QuantizedTensor) -> None:
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be an exactq.QuantizedTensor, got {type(q).__name__}")
    n = q.numel
    nblocks = -(-n // q.block_size)
    if q.packed.dtype != torch.uint8 or q.packed.numel() != (n * q.bits + 7) // 8:
        raise ValueError(
            f"q.packed must be uint8 with {(n * q.bits + 7) // 8} bytes for shape {tuple(q.shape)} at "
            f"{q.bits} bits, got {q.packed.dtype} with {q.packed.numel()}"
        )
    if q.stats.dtype != torch.bfloat16 or tuple(q.stats.shape) != (nblocks, 2):
        raise ValueError(
            f"q.stats must be bfloat16 of shape ({nblocks}, 2), got {q.stats.dtype} {tuple(q.stats.shape)}"
        )
    if q.stats.device != q.packed.device:
        raise ValueError(f"q.stats is on {q.stats.device} but q.packed on {q.packed.device}")


def dequantize(q: QuantizedTensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Restore a :class:`QuantizedTensor` to a tensor of its original shape, dtype and device; with
    ``out`` (contiguous, of that dtype, device and number of elements), written into it."""
    _check_quantized(q)
    n = q.numel
    if out is None:
        out = _ops.dequantize(q.packed, q.stats, q.bits, q.block_size, q.level, n, q.dtype)
    else:
        _check_out(out, n, q.dtype, q.packed.device)
        _ops.dequantize_into(q.packed, q.stats, q.bits, q.block_size, q.level, out)
    return out.view(q.shape)


def dequantize_int8(q: QuantizedTensor, seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 2-D :class:`QuantizedTensor` restored straight to symmetric int8 codes with one float32 scale per
    row (``absmax / 127``), the operands of :mod:`exactq.compute`'s products: the values :func:`dequantize`
    restores (taken in float32, before any cast to ``q.dtype``) int8-quantized row by row, without
    materialising them. Nearest rounding, or unbiased stochastic rounding with ``seed``."""
    _check_quantized(q)
    if len(q.shape) != 2:
        raise ValueError(f"dequantize_int8 needs a 2-D QuantizedTensor, got shape {tuple(q.shape)}")
    seed = check_seed(seed)
    return _ops.dequantize_int8(q.packed, q.stats, q.bits, q.block_size, q.level, q.shape[0], q.shape[1], seed)


# Rows that share one random sign vector in ``random_project``: enough independent groups that the
# projection error of a weight gradient (a sum over rows) averages out, few enough that drawing the
# signs costs little next to the product (a draw per group, not per element).
PROJECTION_GROUP_ROWS = 16


def projected_width(d: int, rp_ratio: float) -> int:
    """Columns kept when a last dimension of ``d`` is projected at ``rp_ratio`` (rounded up, at least 1)."""
    return max(1, math.ceil(d * rp_ratio))


def _describe(t: object) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _projection_parts(seed: int, rows: int, d: int, r: int, group_rows: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The d x r Rademacher matrix (entries +-1/sqrt(r)) and the per-group signs (groups x d) of ``seed``."""
    g = torch.Generator(device=device).manual_seed(seed)
    p = torch.randint(0, 2, (d, r), generator=g, device=device, dtype=torch.int8)
    signs = torch.randint(0, 2, (-(-rows // group_rows), d), generator=g, device=device, dtype=torch.int8)
    return (p * 2 - 1).to(dtype).div_(math.sqrt(r)), (signs * 2 - 1).to(dtype)


def _mul_group_signs(x: torch.Tensor, signs: torch.Tensor, group_rows: int, out: torch.Tensor) -> torch.Tensor:
    """out = each row of the 2-D ``x`` times its group's row of ``signs`` (x's first row starts a
    group); ``out`` is contiguous and may be ``x``. Broadcast views: no per-row copy of the signs."""
    rows, d = x.shape
    whole = rows // group_rows * group_rows
    if whole:
        torch.mul(x[:whole].reshape(-1, group_rows, d), signs[: whole // group_rows, None, :],
                  out=out[:whole].view(-1, group_rows, d))
    if whole < rows:
        torch.mul(x[whole:], signs[whole // group_rows], out=out[whole:])
    return out


def _chunk_rows(d: int, group_rows: int) -> int:
    """Rows per piece of a projection: whole groups of about 1 M elements (4 MiB in fp32) but at least
    1024 rows, so the signed rows are still in cache for the matrix product and the signed copy stays
    small. Measured on CPU (experiments/bench_projection.py): random_project up to 2x faster at d = 128-256
    than with 8 M-element pieces (whose fresh memory also costs page faults); pieces of a few hundred
    rows slow the product down."""
    return max(1, max(1024, (1 << 20) // d) // group_rows) * group_rows


def random_project(x: torch.Tensor, r: int, seed: int, group_rows: int = PROJECTION_GROUP_ROWS) -> torch.Tensor:
    """Project the rows of ``x`` (.., d) to ``r`` columns: row i becomes (x_i * s_g) @ P.

    P is a d x r Rademacher matrix (entries +-1/sqrt(r)) and s_g a random sign vector shared by the
    ``group_rows`` rows of group g = i // group_rows, both drawn from ``seed``. Every row of P has unit
    norm, so E_s[diag(s) P P^T diag(s)] = I exactly and :func:`random_unproject` is unbiased. With
    independent groups the error of X^T G (a weight gradient) is a sum of independent per-group errors
    that averages out over the rows; ``group_rows >= rows`` is EXACT's single matrix for all rows, whose
    error does not.

    Returns the (rows, r) projection, rows = x.numel() // d (outside autograd: a storage form).
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        raise TypeError(f"x must be a floating-point tensor with at least one dimension, got {_describe(x)}")
    d = x.shape[-1]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d:
        raise ValueError(f"r must be an int in [1, {d}] (the last dimension of x), got {r!r}")
    check_seed(seed, required=True)  # random_unproject draws the same projection from it
    check_int_at_least_one("group_rows", group_rows)
    x2 = x.detach().reshape(-1, d)
    p, signs = _projection_parts(seed, x2.shape[0], d, r, group_rows, x.dtype, x.device)
    out = x.new_empty(x2.shape[0], r)
    step = _chunk_rows(d, group_rows)
    signed = x.new_empty(min(step, x2.shape[0]), d)
    for start in range(0, x2.shape[0], step):
        part = x2[start:start + step]
        _mul_group_signs(part, signs[start // group_rows:], group_rows, signed[: part.shape[0]])
        torch.mm(signed[: part.shape[0]], p, out=out[start:start + step])
    return out


def random_unproject(y: torch.Tensor, d: int, seed: int, group_rows: int = PROJECTION_GROUP_ROWS,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Undo :func:`random_project` (same ``seed`` and ``group_rows``) in expectation: (y_i @ P^T) * s_g,
    an unbiased estimate of x_i, as a (rows, d) tensor; with ``out`` (contiguous, y's dtype and device,
    rows * d elements), written into it."""
    if not isinstance(y, torch.Tensor) or y.dtype not in FLOAT_DTYPES or y.dim() != 2:
        raise TypeError(f"y must be a 2-D floating-point tensor (rows, r), got {_describe(y)}")
    rows, r = y.shape
    if isinstance(d, bool) or not isinstance(d, int) or d < r:
        raise ValueError(f"d must be an int >= r = {r}, got {d!r}")
    check_seed(seed, required=True)  # the seed random_project drew the projection from
    check_int_at_least_one("group_rows", group_rows)
    _check_out(out, rows * d, y.dtype, y.device)
    p, signs = _projection_parts(seed, rows, d, r, group_rows, y.dtype, y.device)
    x = y.new_empty(rows, d) if out is None else out.view(rows, d)
    step = _chunk_rows(d, group_rows)
    for start in range(0, rows, step):
        part = x[start:start + step]
        torch.mm(y[start:start + step], p.t(), out=part)
        _mul_group_signs(part, signs[start // group_rows:], group_rows, out=part)
    return x


def pack_mask(x: torch.Tensor, positive: bool = False) -> PackedMask:
    """Store a mask losslessly at 1 bit per element.

    Args:
        x: a bool tensor (stored as is) or a floating-point tensor, whose bit is ``x != 0`` (NaN counts
            as non-zero) or, with ``positive=True``, ``x > 0``; any shape and strides.
        positive: for a floating ``x``, keep ``x > 0`` instead of ``x != 0``.
    """
    if not isinstance(x, torch.Tensor) or not (x.dtype == torch.bool or x.dtype in FLOAT_DTYPES):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a bool or floating-point tensor, got {got}")
    if not isinstance(positive, bool):
        raise TypeError(f"positive must be a bool, got {type(positive).__name__}")
    return PackedMask(_ops.pack_mask(x.detach(), positive), x.shape)


def unpack_mask(packed: PackedMask, value: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Restore the mask stored by :func:`pack_mask`: a bool tensor, or with ``value`` (a 0-dim
    floating-point tensor on the mask's device) a tensor of ``value.dtype`` holding ``value`` where the
    mask is set and 0 elsewhere, written in one pass; with ``out`` (contiguous, of that dtype, device
    and number of elements), written into it."""
    if not isinstance(packed, PackedMask):
        raise TypeError(f"packed must be an exactq.PackedMask, got {type(packed).__name__}")
    n = math.prod(packed.shape)
    if packed.packed.dtype != torch.uint8 or packed.packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed.packed must be uint8 with {(n + 7) // 8} bytes for shape {tuple(packed.shape)}")
    if value is not None and (
        not isinstance(value, torch.Tensor) or value.dim() != 0 or value.dtype not in FLOAT_DTYPES
        or value.device != packed.packed.device
    ):
        got = f"{value.dtype} of shape {tuple(value.shape)} on {value.device}" if isinstance(value, torch.Tensor) \
            else type(value).__name__
        raise TypeError(f"value must be None or a 0-dim floating-point tensor on {packed.packed.device}, got {got}")
    if out is None:
        out = _ops.unpack_mask(packed.packed, n, value)
    else:
        _check_out(out, n, torch.bool if value is None else value.dtype, packed.packed.device)
        _ops.unpack_mask_into(packed.packed, value, out)
    return out.view(packed.shape)


__all__: Sequence[str] = (
    "QuantizedTensor",
    "PackedMask",
    "quantize",
    "dequantize",
    "pack_mask",
    "unpack_mask",
    "random_project",
    "random_unproject",
    "DEFAULT_BLOCK_SIZE",
    "row_blocks_pay",
)
