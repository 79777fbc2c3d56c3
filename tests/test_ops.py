"""The quantization ops: native kernels against the reference, error bounds, unbiasedness, levels."""
import math

import pytest
import torch

import exactq
from exactq import _ops, reference
from exactq.levels import predicted_variance_reduction

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BITS = [1, 2, 4, 8]
BLOCK_SIZES = [1, 3, 64, 256, 1000]
SHAPES = [(0,), (1,), (7,), (33, 5), (64, 130)]


def _data(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0 + 0.5
    return x.to(dtype=dtype, device=device)


def _ids(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(map(str, v)) or "scalar"
    return None


def _level(bits, block_size, nonuniform):
    return exactq.int2_levels(block_size)[1] if nonuniform and bits == 2 else None


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=lambda b: f"G{b}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_kernel_equals_reference(device, dtype, bits, block_size, shape):
    x = _data(shape, dtype, device)
    for nonuniform in ([False, True] if bits == 2 else [False]):
        level = _level(bits, block_size, nonuniform)
        packed, stats = _ops.quantize(x, bits, block_size, level, 1234)
        rpacked, rstats = reference.quantize(x, bits, block_size, level, 1234)
        assert packed.device == x.device and stats.device == x.device
        assert torch.equal(packed.cpu(), rpacked.cpu()), "packed codes differ from the reference"
        assert torch.equal(stats.cpu().view(torch.int16), rstats.cpu().view(torch.int16)), "stats differ"
        out = _ops.dequantize(packed, stats, bits, block_size, level, x.numel(), dtype)
        rout = reference.dequantize(rpacked, rstats, bits, block_size, level, x.numel(), dtype)
        assert out.dtype == dtype and out.device == x.device
        assert torch.equal(out.cpu(), rout.cpu()), "dequantized values differ from the reference"


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_noncontiguous_input_is_flattened_row_major(device, dtype, bits):
    x = _data((40, 70), dtype, device).t()[::2]  # strided view
    assert not x.is_contiguous()
    q = exactq.quantize(x, bits=bits, block_size=48, seed=7)
    qc = exactq.quantize(x.contiguous(), bits=bits, block_size=48, seed=7)
    assert torch.equal(q.packed, qc.packed) and torch.equal(q.stats.view(torch.int16), qc.stats.view(torch.int16))
    y = exactq.dequantize(q)
    assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("block_size", [1, 5, 128, 4096, 10_000], ids=lambda b: f"G{b}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_error_within_one_level_gap(device, dtype, bits, block_size):
    x = _data((3001,), dtype, device, seed=3)
    q = exactq.quantize(x, bits=bits, block_size=block_size)
    y = exactq.dequantize(q)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    nblocks = -(-x.numel() // block_size)
    stats = q.stats.float().cpu()
    lo = stats[:, 0].repeat_interleave(block_size)[: x.numel()]
    rng = stats[:, 1].repeat_interleave(block_size)[: x.numel()]
    xf, yf = x.double().cpu(), y.double().cpu()
    # The stored interval contains every value of its block.
    assert stats.shape == (nblocks, 2)
    assert bool((xf >= lo.double()).all()) and bool((xf <= (lo + rng).double()).all())
    widest = max(q.level, 1 - 2 * q.level) if q.level is not None else 1 / (2**bits - 1)
    # One gap, plus the output dtype's own rounding of the dequantized value.
    out_eps = torch.finfo(dtype).eps * yf.abs() + 1e-6 * rng.double()
    assert bool(((yf - xf).abs() <= rng.double() * widest + out_eps).all())


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_constant_blocks_and_extremes_come_back_exactly(device, dtype, bits):
    # Values on a coarse binary grid are exact in every dtype, and so are their min and range.
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(-64, 65, (50, 64), generator=g).float() / 8).to(dtype=dtype, device=device)
    x[3] = 1.25  # constant blocks (block = one row)
    x[7] = -3.0
    q = exactq.quantize(x, bits=bits, block_size=64)
    y = exactq.dequantize(q)
    assert torch.equal(y[3], x[3]) and torch.equal(y[7], x[7])
    rows_min, rows_max = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    assert torch.equal(y[x == rows_min], x[x == rows_min])
    assert torch.equal(y[x == rows_max], x[x == rows_max])


# Blocks of 40: positions 5 and 13 fall in the two vector halves of the CPU min/max, 37 in its scalar tail.
@pytest.mark.parametrize("pos", [5, 13, 37])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_nonfinite_block_dequantizes_nonfinite(device, dtype, bad, pos):
    x = _data((4, 40), dtype, device)
    x[1, pos] = bad
    y = exactq.dequantize(exactq.quantize(x, bits=2, block_size=40))
    assert not torch.isfinite(y[1]).any(), "a block holding a non-finite value must not come back finite"
    assert torch.isfinite(y[[0, 2, 3]]).all(), "other blocks are unaffected"


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_empty_tensor_round_trips(device, dtype):
    for shape in [(0,), (0, 16), (3, 0, 2)]:
        x = torch.empty(shape, dtype=dtype, device=device)
        q = exactq.quantize(x)
        assert q.nbytes == 0
        y = exactq.dequantize(q)
        assert y.shape == x.shape and y.dtype == dtype
        m = torch.empty(shape, dtype=torch.bool, device=device)
        assert exactq.unpack_mask(exactq.pack_mask(m)).shape == m.shape


def _predicted_variance(x, q):
    """Per-element variance (x - l)(u - x) of stochastic rounding between the bracketing levels."""
    stats = q.stats.float().cpu()
    lo = stats[:, 0].repeat_interleave(q.block_size)[: q.numel].double()
    rng = stats[:, 1].repeat_interleave(q.block_size)[: q.numel].double()
    levels = reference.grid(q.bits, q.level).double()
    t = (x.double().cpu().reshape(-1) - lo) / rng
    j = torch.clamp(torch.searchsorted(levels, t, right=True) - 1, 0, len(levels) - 2)
    lo_l, up_l = levels[j], levels[j + 1]
    return (rng**2 * (t - lo_l) * (up_l - t)).clamp_min(0)


@pytest.mark.parametrize("nonuniform", [False, True], ids=["uniform", "nonuniform"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_unbiased_and_variance_matches_formula(device, bits, nonuniform):
    if nonuniform and bits != 2:
        pytest.skip("non-uniform levels exist for INT2 only")
    x = _data((512,), torch.float32, device, seed=11)
    draws = 2000
    ys = torch.stack(
        [exactq.dequantize(exactq.quantize(x, bits=bits, block_size=64, nonuniform=nonuniform, seed=s))
         for s in range(draws)]
    ).double().cpu()
    q = exactq.quantize(x, bits=bits, block_size=64, nonuniform=nonuniform, seed=0)
    var = _predicted_variance(x, q)
    mean_err = ys.mean(dim=0) - x.double().cpu()
    # The mean of `draws` independent draws has std sqrt(var / draws); 6 sigma over 512 elements,
    # plus float32 rounding of the dequantized values.
    bound = 6 * (var / draws).sqrt() + 1e-6 * x.abs().double().cpu().max()
    assert bool((mean_err.abs() <= bound).all()), f"biased: max z {(mean_err.abs() / bound).max():.2f}"
    measured = ys.var(dim=0).sum()
    predicted = var.sum()
    assert abs(measured / predicted - 1) < 0.05, f"variance {measured:.4g} vs formula {predicted:.4g}"


@pytest.mark.parametrize("block_size", [16, 128, 1024], ids=lambda b: f"G{b}")
def test_nonuniform_levels_reduce_error_on_normal_data(device, block_size):
    """The ICASSP claim, measured: lower MSE by about the reduction the objective predicts."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(block_size * max(64, 2**16 // block_size), generator=g).to(device)
    mse = {}
    for nonuniform in (False, True):
        errs = [
            (exactq.dequantize(exactq.quantize(x, bits=2, block_size=block_size, nonuniform=nonuniform, seed=s))
             - x).pow(2).mean().item()
            for s in range(8)
        ]
        mse[nonuniform] = sum(errs) / len(errs)
    measured = 1 - mse[True] / mse[False]
    predicted = predicted_variance_reduction(block_size)
    assert measured > 0, "non-uniform levels must not be worse on normal data"
    assert abs(measured - predicted) < 0.35 * predicted + 0.01, (
        f"measured reduction {measured:.3f} vs predicted {predicted:.3f}"
    )


def test_int2_levels_match_paper_and_are_symmetric():
    for block_size, alpha in [(16, 1.05), (128, 1.10), (1024, 1.14)]:
        levels = exactq.int2_levels(block_size)
        assert levels[0] == 0.0 and levels[3] == 1.0
        assert math.isclose(levels[1] + levels[2], 1.0)
        assert abs(3 * levels[1] - alpha) < 0.006
    assert exactq.int2_levels(2) == pytest.approx((0.0, 1 / 3, 2 / 3, 1.0))
    with pytest.raises(ValueError, match="block_size"):
        exactq.int2_levels(0)


def test_seed_none_follows_torch_manual_seed():
    x = _data((1000,), torch.float32, "cpu")
    torch.manual_seed(3)
    a = exactq.quantize(x)
    torch.manual_seed(3)
    b = exactq.quantize(x)
    c = exactq.quantize(x)
    assert a.seed == b.seed and torch.equal(a.packed, b.packed)
    assert c.seed != b.seed and not torch.equal(c.packed, b.packed)


def test_nbytes_counts_storage():
    x = torch.randn(1000, 128)
    q = exactq.quantize(x, bits=2, block_size=256)
    assert q.nbytes == 1000 * 128 // 4 + 500 * 2 * 2
    assert 4 * x.numel() / q.nbytes > 15


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (33, 17), (3, 0)], ids=_ids)
def test_mask_round_trip(device, shape):
    m = torch.rand(shape, device=device) > 0.5
    p = exactq.pack_mask(m)
    assert p.nbytes == (m.numel() + 7) // 8
    assert torch.equal(p.packed.cpu(), reference.pack_mask(m.cpu()))
    assert torch.equal(exactq.unpack_mask(p), m)
    nc = m.t() if m.dim() == 2 else m
    assert torch.equal(exactq.unpack_mask(exactq.pack_mask(nc)), nc)


@pytest.mark.parametrize("positive", [False, True], ids=["nonzero", "positive"])
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (33, 17), (3, 0), (1000, 37)], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_mask_of_floats_and_unpack_to_value(device, dtype, shape, positive):
    """A floating tensor packs to the bits of x != 0 (x > 0 with positive), NaN and -0.0 included, and
    unpacks in one pass to value-or-zero: the kernels against the reference and against the formula."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    x[torch.rand(shape, generator=g) < 0.3] = 0.0
    flat = x.view(-1)
    specials = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf"), 1e-40], dtype=torch.float64)
    flat[: min(5, flat.numel())] = specials[: min(5, flat.numel())].to(dtype)
    x = x.to(device)
    p = exactq.pack_mask(x, positive=positive)
    expect = x > 0 if positive else x != 0
    assert torch.equal(p.packed.cpu(), reference.pack_mask(x.cpu(), positive))
    assert torch.equal(exactq.unpack_mask(p), expect)
    for v in (2.0, float("nan"), -1.5):
        value = torch.tensor(v, dtype=dtype, device=device)
        out = exactq.unpack_mask(p, value)
        assert out.dtype == dtype and out.shape == x.shape
        want = torch.where(expect, value, torch.zeros((), dtype=dtype, device=device))
        assert torch.equal(out.cpu().view(-1).view(torch.uint8), want.cpu().view(-1).view(torch.uint8))
        ref = reference.unpack_mask(p.packed.cpu(), x.numel(), value.cpu())
        assert torch.equal(out.cpu().view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8))


def test_restore_into_given_tensor(device):
    x = _data((37, 21), torch.float32, device)
    q = exactq.quantize(x, bits=2, block_size=64, seed=1)
    out = torch.full((x.numel(),), float("nan"), device=device)
    y = exactq.dequantize(q, out=out)
    assert y.shape == x.shape and y.data_ptr() == out.data_ptr()
    assert torch.equal(y, exactq.dequantize(q))
    p = exactq.pack_mask(x)
    for value, dtype in ((None, torch.bool), (torch.tensor(3.0, device=device), torch.float32)):
        out = torch.empty(x.numel(), dtype=dtype, device=device)
        m = exactq.unpack_mask(p, value, out=out)
        assert m.data_ptr() == out.data_ptr() and torch.equal(m, exactq.unpack_mask(p, value))
    for bad in (torch.empty(x.numel(), dtype=torch.float16, device=device), torch.empty(5, device=device),
                torch.empty(x.numel() * 2, device=device)[::2], "buffer"):
        with pytest.raises(ValueError, match="out must be None or a contiguous torch.float32 tensor of 777"):
            exactq.dequantize(q, out=bad)
    with pytest.raises(ValueError, match="out must be None or a contiguous torch.bool tensor"):
        exactq.unpack_mask(p, out=torch.empty(x.numel(), device=device))
    with pytest.raises(RuntimeError, match="out must be a contiguous Float tensor of 777 elements"):
        _ops.dequantize_into(q.packed, q.stats, 2, 64, q.level, torch.empty(2 * 777, device=device)[::2])


def test_opcheck(device):
    x = _data((37, 21), torch.float32, device)
    level = exactq.int2_levels(64)[1]
    packed, stats = _ops.quantize(x, 2, 64, level, 5)
    m = x > 0
    pm = _ops.pack_mask(m)
    cases = [
        (_ops.quantize, (x, 2, 64, level, 5)),
        (_ops.quantize, (x.half(), 4, 10, None, 5)),
        (_ops.dequantize, (packed, stats, 2, 64, level, x.numel(), torch.float32)),
        (_ops.pack_mask, (m,)),
        (_ops.pack_mask, (x, True)),
        (_ops.unpack_mask, (pm, m.numel())),
        (_ops.unpack_mask, (pm, m.numel(), torch.tensor(2.0, device=device))),
        (_ops.dequantize_into, (packed, stats, 2, 64, level, torch.empty(x.numel(), device=device))),
        (_ops.unpack_mask_into, (pm, None, torch.empty(m.numel(), dtype=torch.bool, device=device))),
        (_ops.unpack_mask_into, (pm, torch.tensor(2.0, device=device), torch.empty(m.numel(), device=device))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"bits": 3}, ValueError, "bits must be one of"),
        ({"bits": 2.0}, ValueError, "bits must be one of"),
        ({"block_size": 0}, ValueError, "block_size must be an int >= 1"),
        ({"block_size": 2.5}, ValueError, "block_size must be an int >= 1"),
        ({"bits": 4, "nonuniform": True}, ValueError, "nonuniform=True needs bits=2"),
        ({"nonuniform": "yes"}, TypeError, "nonuniform must be a bool"),
        ({"seed": -1}, ValueError, "seed must be None or an int"),
        ({"seed": 2**63}, ValueError, "seed must be None or an int"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        exactq.quantize(torch.randn(10), **kwargs)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        exactq.quantize(torch.arange(10))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        exactq.quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="x must be a bool or floating-point tensor, got torch.int64"):
        exactq.pack_mask(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="q must be an exactq.QuantizedTensor"):
        exactq.dequantize(torch.ones(3))
    q = exactq.quantize(torch.randn(100), block_size=10)
    import dataclasses

    with pytest.raises(ValueError, match="q.packed must be uint8 with 25 bytes"):
        exactq.dequantize(dataclasses.replace(q, packed=q.packed[:-1]))
    with pytest.raises(ValueError, match=r"q.stats must be bfloat16 of shape \(10, 2\)"):
        exactq.dequantize(dataclasses.replace(q, stats=q.stats[:-1]))
    with pytest.raises(ValueError, match=r"q.stats must be bfloat16"):
        exactq.dequantize(dataclasses.replace(q, stats=q.stats.float()))
    p = exactq.pack_mask(torch.ones(20, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed.packed must be uint8 with 3 bytes"):
        exactq.unpack_mask(dataclasses.replace(p, packed=p.packed[:2]))
    for bad in (torch.ones(2), torch.ones((), dtype=torch.long), 1.0):
        with pytest.raises(TypeError, match="value must be None or a 0-dim floating-point tensor"):
            exactq.unpack_mask(p, bad)
    with pytest.raises(RuntimeError, match="value must be a 0-dim floating-point tensor"):
        _ops.unpack_mask(p.packed, 20, torch.ones(2))
    # The kernels check too, for callers of torch.ops.exactq directly.
    with pytest.raises(RuntimeError, match="bits must be one of 1, 2, 4, 8"):
        _ops.quantize(torch.randn(4), 3, 4, None, 0)


def test_signed_zero_extremes_give_identical_stats(device):
    """-0.0 and +0.0 tie in min/max; every implementation must store the same statistics."""
    x = torch.tensor([0.0, -0.0, 1.0, 2.0] * 64, device=device)
    x[::7] = -0.0
    packed, stats = _ops.quantize(x, 2, 64, None, 3)
    rpacked, rstats = reference.quantize(x, 2, 64, None, 3)
    assert torch.equal(stats.cpu().view(torch.int16), rstats.view(torch.int16))
    assert torch.equal(packed.cpu(), rpacked)
    assert (stats[:, 0].float() == 0).all() and not torch.signbit(stats[:, 0].float()).any()


# -- spmm_columns: a CSR product over a range of its columns, added in place (exactq.distributed's halo rows) --

def _csr_with_unsorted_columns(m, n, density, dtype, device, seed):
    """A CSR matrix (crow, col, values) and its dense form; each row's columns shuffled (the op does not need
    them sorted), some rows empty."""
    g = torch.Generator().manual_seed(seed)
    dense = (torch.rand(m, n, generator=g) < density) * torch.randn(m, n, generator=g)
    dense[::5] = 0
    crow, cols = [0], []
    for row in dense:
        nz = row.nonzero().squeeze(1)
        cols.append(nz[torch.randperm(nz.numel(), generator=g)])
        crow.append(crow[-1] + nz.numel())
    col = torch.cat(cols) if cols else torch.empty(0, dtype=torch.long)
    values = dense[torch.repeat_interleave(torch.arange(m), torch.tensor(crow).diff()), col]
    to = dict(device=device)
    return (torch.tensor(crow, **to), col.to(**to), values.to(dtype=dtype, **to)), dense.to(dtype=dtype, **to)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_ids)
@pytest.mark.parametrize("width", [1, 7, 64, 257])
def test_spmm_columns_equals_reference_and_the_dense_product(device, dtype, width):
    (crow, col, values), dense = _csr_with_unsorted_columns(41, 70, 0.2, dtype, device, width)
    m, n = dense.shape
    g = torch.Generator().manual_seed(1)
    row_scale = torch.rand(m, generator=g).to(dtype=dtype, device=device)
    for start, end in ((0, 30), (30, n), (12, 12), (0, n), (65, n + 5)):
        for scale in (None, row_scale):
            for transpose in (False, True):
                x = torch.randn(m if transpose else end - start, width, generator=g).to(dtype=dtype, device=device)
                if x.numel():
                    x[0, 0] = float("nan")  # propagates to every output element it meets, as in fp32
                out = torch.randn(end - start if transpose else m, width, generator=g).to(dtype=dtype, device=device)
                got, ref = out.clone(), out.clone()
                _ops.spmm_columns(crow, col, values, scale, start, end, transpose, x, got)
                reference.spmm_columns(crow, col, values, scale, start, end, transpose, x, ref)
                b = (dense * (scale[:, None] if scale is not None else 1))[:, start:end]
                b = torch.cat([b, b.new_zeros(m, end - start - b.shape[1])], 1)  # columns past the matrix's: none
                expected = out + (b.t() @ x.nan_to_num(0.0) if transpose else b @ x.nan_to_num(0.0))
                nan_rows = (b.t() if transpose else b)[:, 0] != 0 if x.numel() else None
                if nan_rows is not None:  # where the NaN was read
                    expected[nan_rows, 0] = float("nan")
                # CPU: bit for bit (same summation order); CUDA's transposed product adds atomically
                exact = device == "cpu" or not transpose
                torch.testing.assert_close(got, ref, rtol=0 if exact else None, atol=0 if exact else None,
                                           equal_nan=True)
                torch.testing.assert_close(got, expected, equal_nan=True)


def test_spmm_columns_opcheck_and_bad_input(device):
    (crow, col, values), dense = _csr_with_unsorted_columns(9, 12, 0.4, torch.float32, device, 0)
    x, out = torch.randn(5, 3, device=device), torch.zeros(9, 3, device=device)
    torch.library.opcheck(_ops.spmm_columns, (crow, col, values, None, 4, 9, False, x, out))
    torch.library.opcheck(_ops.spmm_columns, (crow, col, values, torch.rand(9, device=device), 4, 9, True,
                                              torch.randn(9, 3, device=device), torch.zeros(5, 3, device=device)))
    bad = [
        (dict(crow=crow.int()), "crow must be a contiguous 1-D int64"),
        (dict(values=values.double()), "values must be a contiguous 1-D tensor of x's dtype"),
        (dict(x=x[:4]), "x must be a contiguous 2-D tensor of 5 rows"),
        (dict(out=out[:, :2]), "out must be a contiguous \\[9, 3\\]"),
        (dict(start=6, end=4), "0 <= col_start <= col_end"),
        (dict(row_scale=torch.ones(8, device=device)), "row_scale must be a contiguous tensor of x's dtype"),
        (dict(x=x.half(), out=out.half(), values=values.half()), "x must be float32 or float64"),
        (dict(crow=crow.flip(0)), "crow must start at 0|malformed CSR"),
    ]
    for change, match in bad:
        a = dict(crow=crow, col=col, values=values, row_scale=None, start=4, end=9, x=x, out=out) | change
        with pytest.raises(RuntimeError, match=match):
            _ops.spmm_columns(a["crow"], a["col"], a["values"], a["row_scale"], a["start"], a["end"], False, a["x"],
                              a["out"])
    mid = crow.clone()
    mid[3] = int(mid[4]) + 1  # decreasing inside, right ends
    with pytest.raises(RuntimeError, match="malformed CSR"):
        _ops.spmm_columns(mid, col, values, None, 4, 9, False, x, out.clone())
