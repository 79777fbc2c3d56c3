"""INT8 compute primitives with autograd (Tango's recipe on exactq's kernels).

Rules, stated once (tests/test_compute.py checks each):

* Operands are quantized symmetrically to int8 with one float32 scale per row or column (whichever
  factors out of the product's sum), and products accumulate exactly in int32
  (``exactq::int8_spmm``, ``exactq::int8_mm``); results are float32.
* Forward operands (activations, weights) round to nearest. Every operand of a backward product
  (gradients, and the weights and activations they meet) rounds stochastically, seeded by the session:
  given the forward, each gradient is an unbiased estimate of fp32's, so its error averages out over
  steps as exactq's storage does.
* A sparse product needs no saved activation at all (its backward reads only the adjacency). A linear
  layer's input: with ``bits`` = 8 the int8 codes its forward product ran on are what is stored (Tango's
  cached copies: nothing quantized again); with ``bits`` < 8 it is handed to the session's storage
  (``stash``), kept at ``bits`` and decoded in backward straight into int8 codes with a scale per row
  (``exactq::dequantize_int8``: no float32 copy, stochastic rounding). Either way the weights' gradient
  runs on per-row codes, whose row scales move onto the gradient (multiplied in by the gradient's own
  quantize kernel), so it is, in expectation, exactly that of the operand stored.
* An attention aggregation (GAT: per-head weights that need a gradient) keeps its weights exactly and
  hands its features to ``stash``; its weights' gradient is an int8 SDDMM (``exactq::int8_sddmm``), so
  no per-edge message is ever materialised or saved.
* Dropout stays float32 arithmetic, but its mask comes from exactq's counter-based generator
  (``exactq::seeded_dropout``, 8-12x faster than torch's CPU dropout here) and is never stored: its
  backward regenerates it from the seed.
* What stays in float32: everything else (softmax, normalisation, bias addition inside the epilogue,
  activation), products with an operand that needs no int8 (``max``/``min`` aggregation,
  adjacency values that require a gradient), and any product whose operand holds NaN/Inf: it falls back
  to the float32 op, so non-finite values propagate exactly as in fp32. Each fallback is counted with
  its reason in the session's report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from .. import _ops, reference
from .structure import Structure, is_unit, structure_of

COMPUTE_MODES = ("int8",)
# int32 accumulation bound of exactq::int8_mm (131,071 * 128 * 128 < 2^31); longer sums (a weight gradient
# over all nodes) run in chunks.
_MAX_TERMS = reference.INT8_MAX_TERMS


def check_compute(compute: Optional[str]) -> Optional[str]:
    """Validates a ``compute`` mode: ``None`` (float32 compute) or one of :data:`COMPUTE_MODES`."""
    if compute is not None and compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be None or one of {COMPUTE_MODES}, got {compute!r}")
    return compute


@dataclass(frozen=True)
class Hooks:
    """What a compute op takes from its session: ``stash(t, name)`` stores a linear operand for backward
    (by the session's storage rules), ``stash_codes(t, (codes, scales), name)`` may store the int8 codes
    the forward made of it instead (``restore()`` then gives that pair), and ``keep(t, name, reason)``
    keeps one exactly, each returning a handle whose ``restore()`` gives it back;
    ``restore_rows(handle, seed)`` gives a stashed 2-D operand as int8 codes with a scale per row;
    ``seed()`` draws a stochastic-rounding seed; ``note(op, path)`` counts a product by the path it ran
    (``"int8"`` or ``"fp32: <reason>"``)."""

    stash: Callable[[torch.Tensor, str], Any]
    stash_codes: Callable[[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], str], Any]
    restore_rows: Callable[[Any, int], Tuple[torch.Tensor, torch.Tensor]]
    keep: Callable[[torch.Tensor, str, str], Any]
    seed: Callable[[], int]
    note: Callable[[str, str], None]


class _Kept:
    """A handle that keeps its tensor as it is (no session storage)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def restore(self) -> torch.Tensor:
        return self.t


def quantize_rows(handle: Any, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``restore_rows`` of a handle without block codes to decode: the int8 codes it holds (a
    ``stash_codes`` pair) as they are, else its tensor's, with a scale per row."""
    saved = handle.restore()
    return saved if isinstance(saved, tuple) else _quantize(saved.float(), 1, seed)


def _plain_hooks() -> Hooks:
    """Hooks outside a session: tensors kept as they are, seeds from torch's generator, nothing counted."""
    keep = lambda t, *_: _Kept(t)  # noqa: E731
    return Hooks(stash=keep, stash_codes=keep, restore_rows=quantize_rows, keep=keep,
                 seed=lambda: int(torch.randint(0, 2**62, ()).item()), note=lambda op, path: None)


def _finite(scale: torch.Tensor) -> bool:
    return bool(torch.isfinite(scale).all())


def _quantize(x: torch.Tensor, dim: int, seed: Optional[int] = None,
              row_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    return _ops.int8_quantize(x.contiguous(), dim, seed, row_scale)


# ---- sparse x dense ------------------------------------------------------------------------------------

def _transpose_csr(s: Structure, t_values: Optional[torch.Tensor]) -> torch.Tensor:
    """``A^T`` as a torch.sparse CSR tensor, with ``t_values`` in its order (ones if ``None``)."""
    v = t_values if t_values is not None else torch.ones(s.t_col.numel(), device=s.t_col.device)
    return torch.sparse_csr_tensor(s.t_crow, s.t_col, v, (s.cols, s.rows))


class _Int8SpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, s: Structure, weight, row_scale, hooks: Hooks):  # type: ignore[override]
        ctx.s, ctx.row_scale, ctx.hooks, ctx.dtype = s, row_scale, hooks, x.dtype
        ctx.weight = hooks.keep(weight, "spmm", "edge weights of a sparse product") if weight is not None else None
        return _ops.int8_spmm(s.crow, s.col, weight, q, scale, row_scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s, hooks = ctx.s, ctx.hooks
        weight = ctx.weight.restore() if ctx.weight is not None else None
        # A^T (row_scale * grad): the row scale (mean's 1 / degree) goes into A^T's entries, not over grad.
        t_weight = weight[s.perm] if weight is not None else None
        if ctx.row_scale is not None:
            t_weight = s.mean_transpose_weight if t_weight is None else t_weight * s.mean_transpose_weight
        g = grad.float()
        gq, gscale = _quantize(g, 0, hooks.seed())
        if _finite(gscale):
            hooks.note("spmm backward", "int8")
            gx = _ops.int8_spmm(s.t_crow, s.t_col, t_weight, gq, gscale, None)
        else:
            hooks.note("spmm backward", "fp32: gradient holds NaN/Inf")
            gx = torch.sparse.mm(_transpose_csr(s, t_weight), g)
        return gx.to(ctx.dtype), None, None, None, None, None, None


def spmm(adj: torch.Tensor, x: torch.Tensor, reduce: str = "sum", hooks: Optional[Hooks] = None) -> torch.Tensor:
    """``torch.sparse.mm(adj, x, reduce)`` with int8 features and int32 (or, with edge weights, float32)
    accumulation: ``adj`` a 2-D ``torch.sparse_csr`` tensor (rows = targets, PyG's ``adj_t``), ``x``
    a 2-D float32 or bfloat16 tensor, ``reduce`` ``"sum"`` or ``"mean"``. Differentiable in ``x``. Falls
    back to ``torch.sparse.mm`` (counted by ``hooks.note``) where int8 cannot serve: see the module
    docstring."""
    hooks = hooks or _plain_hooks()
    reason = _spmm_unsupported(adj, x, reduce)
    q = scale = None
    if reason is None:
        q, scale = _quantize(x.detach(), 0)
        if not _finite(scale):
            reason = "operand holds NaN/Inf"
    if reason is not None:
        hooks.note("spmm", f"fp32: {reason}")
        return torch.sparse.mm(adj, x, reduce) if reduce != "sum" else torch.sparse.mm(adj, x)
    s = structure_of(adj)
    values = adj.values().detach()
    weight = None if is_unit(s, values) or bool((values == 1).all()) else values.float().contiguous()
    row_scale = 1.0 / s.degree.clamp(min=1) if reduce == "mean" else None  # forward's; backward folds it into A^T
    hooks.note("spmm", "int8")
    return _Int8SpMM.apply(x, q, scale, s, weight, row_scale, hooks)


def _spmm_unsupported(adj: torch.Tensor, x: torch.Tensor, reduce: str) -> Optional[str]:
    if adj.layout != torch.sparse_csr or adj.dim() != 2 or adj.is_cuda != x.is_cuda:
        return f"adjacency layout {adj.layout} (int8 needs a 2-D sparse CSR on x's device)"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16):
        return f"dense operand {getattr(x, 'dtype', type(x))} with {getattr(x, 'dim', lambda: '?')()} dims " \
               "(int8 takes 2-D float32/bfloat16)"
    if x.layout != torch.strided:
        return "dense operand is not strided"
    if reduce not in ("sum", "mean"):
        return f"reduce={reduce!r} (int8 serves sum and mean)"
    if adj.values().requires_grad:
        return "adjacency values require a gradient"
    if not adj.values().dtype.is_floating_point:
        return f"adjacency values of dtype {adj.values().dtype}"
    return None


# ---- attention-weighted sparse x dense (GAT) -------------------------------------------------------------

def _heads(t: torch.Tensor, dim: int, seed: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``t`` [rows, heads, C] as [rows, heads * C] with a scale per column (``dim=0``, [heads *
    C]) or per (row, head) (``dim=1``, [rows, heads])."""
    rows, heads, c = t.shape
    if dim == 0:
        return _quantize(t.reshape(rows, heads * c), 0, seed)
    q, scale = _quantize(t.reshape(rows * heads, c), 1, seed)
    return q.view(rows, heads * c), scale.view(rows, heads)


def _per_head_spmm(crow, col, values, q, scale, heads: int) -> torch.Tensor:
    """``[rows, heads, C]``: head h's columns of ``q`` summed with head h's column of ``values``."""
    c = q.shape[1] // heads
    outs = [_ops.int8_spmm(crow, col, values[:, h].contiguous(), q[:, h * c:(h + 1) * c].contiguous(),
                           scale[h * c:(h + 1) * c].contiguous(), None) for h in range(heads)]
    return torch.stack(outs, 1)


class _Int8AttentionSpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, q, scale, s: Structure, hooks: Hooks):  # type: ignore[override]
        heads = x.shape[1]
        ctx.s, ctx.hooks, ctx.dtype = s, hooks, x.dtype
        ctx.x = hooks.stash(x, "attention spmm") if values.requires_grad else None
        ctx.values = hooks.keep(values, "attention spmm", "attention weights of a sparse product") \
            if x.requires_grad else None
        return _per_head_spmm(s.crow, s.col, values.detach().float(), q, scale, heads).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s, hooks = ctx.s, ctx.hooks
        g = grad.float().contiguous()
        heads = g.shape[1]
        gx = gv = None
        if ctx.values is not None:  # A_h^T g_h per head
            t_values = ctx.values.restore().detach().float()[s.perm]
            gq, gscale = _heads(g, 0, hooks.seed())
            if _finite(gscale):
                hooks.note("attention spmm backward (features)", "int8")
                gx = _per_head_spmm(s.t_crow, s.t_col, t_values, gq, gscale, heads)
            else:
                hooks.note("attention spmm backward (features)", "fp32: gradient holds NaN/Inf")
                gx = torch.stack([torch.sparse.mm(_transpose_csr(s, t_values[:, h].contiguous()), g[:, h])
                                  for h in range(heads)], 1)
            gx = gx.to(ctx.dtype)
        if ctx.x is not None:  # the attention weights' gradient: <g_i, x_j> per entry and head (SDDMM)
            x = ctx.x.restore().float().contiguous()
            gq, gscale = _heads(g, 1, hooks.seed())
            xq, xscale = _heads(x, 1, hooks.seed())
            if _finite(gscale) and _finite(xscale):
                hooks.note("attention spmm backward (weights)", "int8 SDDMM")
                gv = _ops.int8_sddmm(s.crow, s.col, gq, gscale, xq, xscale)
            else:
                hooks.note("attention spmm backward (weights)", "fp32: operand holds NaN/Inf")
                rows = torch.repeat_interleave(torch.arange(s.rows, device=g.device), s.crow[1:] - s.crow[:-1])
                gv = (g[rows] * x[s.col]).sum(-1)
        return gx, gv, None, None, None, None


def attention_spmm(s: Structure, values: torch.Tensor, x: torch.Tensor,
                   hooks: Optional[Hooks] = None) -> Optional[torch.Tensor]:
    """Multi-head attention aggregation on int8 features: ``out[i, h] = sum_e values[e, h] * x[j, h]`` over
    the entries ``e = (i, j)`` of the CSR structure ``s`` (rows = targets), ``values`` [nnz, heads] float32
    in CSR order (may require a gradient), ``x`` [sources, heads, C] float32 or bfloat16. Forward: ``x``
    per-column int8 (nearest), weighted float32 sums per head. Backward: ``A_h^T g_h`` the same way on the
    transpose, and the weights' gradient ``<g_i, x_j>`` per entry and head by ``exactq::int8_sddmm`` (int32
    dot products of per-(row, head) int8 codes, stochastic rounding); ``x`` is stored by the session at
    ``bits`` instead of PyG's gathered ``[E, heads, C]`` messages. Returns ``None`` where int8 cannot serve
    (counted by ``hooks.note``): the caller runs its own float32 path."""
    hooks = hooks or _plain_hooks()
    if x.dim() != 3 or x.dtype not in (torch.float32, torch.bfloat16) or x.layout != torch.strided \
            or values.shape != (s.col.numel(), x.shape[1]) or not values.is_floating_point() or x.shape[0] != s.cols:
        hooks.note("attention spmm", "fp32: shapes or dtypes (int8 takes x [sources, heads, C], values [nnz, heads])")
        return None
    q, scale = _heads(x.detach(), 0, None)
    if not _finite(scale):
        hooks.note("attention spmm", "fp32: operand holds NaN/Inf")
        return None
    hooks.note("attention spmm", "int8")
    return _Int8AttentionSpMM.apply(x, values, q, scale, s, hooks)


# ---- dropout -------------------------------------------------------------------------------------------

class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):  # type: ignore[override]
        ctx.p, ctx.seed = p, seed
        return _ops.seeded_dropout(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # The mask is a function of (seed, element index): the same op on the gradient applies it again.
        return _ops.seeded_dropout(grad.contiguous(), ctx.p, ctx.seed), None, None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False,
            hooks: Optional[Hooks] = None) -> torch.Tensor:
    """``torch.nn.functional.dropout`` with the mask drawn from exactq's counter-based generator
    (``exactq::seeded_dropout``): float32 arithmetic as torch's (kept elements times ``1 / (1 - p)``, the
    rest times 0, so NaN stays NaN), a mask of the same law but not torch's random stream, and nothing
    stored for backward (the seed regenerates the mask). Other dtypes, ``inplace`` and ``p`` outside
    ``[0, 1)`` run torch's dropout (counted)."""
    hooks = hooks or _plain_hooks()
    if not training or p == 0.0:
        return torch.nn.functional.dropout(x, p, training, inplace)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or inplace or not 0.0 < p < 1.0 \
            or x.layout != torch.strided:
        hooks.note("dropout", "torch: float32 strided tensors, 0 < p < 1, not in place")
        return torch.nn.functional.dropout(x, p, training, inplace)
    hooks.note("dropout", "seeded mask (nothing stored)")
    return _SeededDropout.apply(x, float(p), hooks.seed())


# ---- linear --------------------------------------------------------------------------------------------

def _int8_mm_chunked(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """``(a.T @ b)`` of int8 ``a`` [K, M], ``b`` [K, N] with per-column scales, summed in float32 over
    chunks of K short enough for int32 accumulation."""
    out = None
    for k0 in range(0, a.shape[0], _MAX_TERMS):
        part = _ops.int8_mm(a[k0:k0 + _MAX_TERMS].t(), b[k0:k0 + _MAX_TERMS], a_scale, b_scale)  # a view: no copy
        out = part if out is None else out + part
    return out


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, qx, x_scale, hooks: Hooks):  # type: ignore[override]
        qw, w_scale = _quantize(weight.detach(), 1)
        out = _ops.int8_mm(qx, qw.t(), x_scale, w_scale, bias.detach().float() if bias is not None else None)
        ctx.x = hooks.stash_codes(x, (qx, x_scale), "linear") if weight.requires_grad else None
        ctx.hooks, ctx.has_bias, ctx.dtype = hooks, bias is not None, x.dtype
        ctx.save_for_backward(weight)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        hooks = ctx.hooks
        g = grad.float().contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gq, gscale = _quantize(g, 1, hooks.seed())
            wq, wscale = _quantize(weight.detach(), 0, hooks.seed())
            if _finite(gscale) and _finite(wscale):
                hooks.note("linear backward (input)", "int8")
                gx = _ops.int8_mm(gq, wq, gscale, wscale)
            else:
                hooks.note("linear backward (input)", "fp32: operand holds NaN/Inf")
                gx = g @ weight.detach().float()
            gx = gx.to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            # x's per-row codes; its row scales move onto the gradient (codes of g * row_scale, in one pass).
            xq, row_scale = hooks.restore_rows(ctx.x, hooks.seed())
            gq, gscale = _quantize(g, 0, hooks.seed(), row_scale)
            if _finite(gscale) and _finite(row_scale):
                hooks.note("linear backward (weight)", "int8")
                gw = _int8_mm_chunked(gq, xq, gscale, torch.ones(xq.shape[1], device=xq.device))
            else:
                hooks.note("linear backward (weight)", "fp32: operand holds NaN/Inf")
                saved = ctx.x.restore()
                x = saved[0].float() * saved[1].unsqueeze(1) if isinstance(saved, tuple) else saved.float()
                gw = g.t() @ x
            gw = gw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           hooks: Optional[Hooks] = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` on int8 operands with int32 accumulation (``exactq::int8_mm``), forward
    and backward; ``x`` float32 or bfloat16 of any leading shape, ``weight`` a 2-D float32 parameter.
    Falls back to ``F.linear`` (counted by ``hooks.note``) where int8 cannot serve."""
    hooks = hooks or _plain_hooks()
    reason = _linear_unsupported(x, weight, bias)
    x2 = qx = xscale = None
    if reason is None:
        x2 = x.reshape(-1, x.shape[-1])
        qx, xscale = _quantize(x2.detach(), 1)
        if not (_finite(xscale) and bool(torch.isfinite(weight).all())):
            reason = "operand holds NaN/Inf"
    if reason is not None:
        hooks.note("linear", f"fp32: {reason}")
        return torch.nn.functional.linear(x, weight, bias)
    hooks.note("linear", "int8")
    out = _Int8Linear.apply(x2, weight, bias, qx, xscale, hooks)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _linear_unsupported(x: Any, weight: Any, bias: Any) -> Optional[str]:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return "operands are not tensors"
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != torch.float32:
        return f"dtypes {x.dtype} x {weight.dtype} (int8 takes float32/bfloat16 inputs, float32 weights)"
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return "shapes (int8 takes [..., K] x [N, K], non-empty)"
    if x.layout != torch.strided or weight.layout != torch.strided or x.device != weight.device:
        return "layouts or devices"
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32):
        return "bias dtype"
    return None
