"""Sum and mean aggregation over a CSR adjacency whose sources are a rank's owned rows and its halo rows,
without ever holding the owned + halo rows in one tensor, and without copying the adjacency.

A layer that aggregates raw source rows by sparse matmul (GraphSAGE, GIN, GraphConv on
``shard.sparse_adjacency()``) would read a (num_local + num_halo, width) input: on a graph whose
partition leaves more halo rows than owned ones, that tensor, and its gradient in backward, are the
largest a rank makes. Here the adjacency's columns are taken as ranges, the owned ones and one range per
peer, ``A = [A_own | A_1 | ... | A_q]``, so that ``A @ [x; h] = A_own @ x + sum_q A_q @ h_q``: each peer's
halo rows are decoded (or viewed, when exact), multiplied in and dropped before the next peer's; in
backward each peer's halo gradients ``A_q^T @ g`` are made, encoded and dropped in turn. Every product is
``exactq::spmm_columns`` on the adjacency's own arrays (no column blocks, no transposed copy).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from .. import _ops

PeerRows = Callable[[], Iterable[Tuple[int, torch.Tensor]]]  # yields (peer, its halo rows) one peer at a time


@dataclass(frozen=True)
class ColumnRanges:
    """A CSR adjacency (rows = targets) read by column ranges: ``bounds[0]:bounds[1]`` the owned columns,
    ``bounds[q + 1]:bounds[q + 2]`` peer q's halo columns. ``row_scale`` is a mean's 1 / (stored entries,
    at least 1) per row, as PyG's mean over a CSR adjacency divides; ``None`` for a sum. Products run in
    ``dtype`` (float32 or float64; a lower-precision model's rows are widened to float32 for them)."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    row_scale: Optional[torch.Tensor]
    bounds: Tuple[int, ...]
    dtype: torch.dtype

    def versions(self) -> Tuple[int, ...]:
        return tuple(t._version for t in (self.crow, self.col, self.values))

    def product(self, part: int, x: torch.Tensor, out: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``out += A_part @ x`` (``A_part^T @ x`` with ``transpose``); ``part`` 0 is the owned columns, q + 1
        peer q's."""
        _ops.spmm_columns(self.crow, self.col, self.values, self.row_scale, self.bounds[part],
                          self.bounds[part + 1], transpose, x.to(self.dtype).contiguous(), out)
        return out

    def width(self, part: int) -> int:
        return self.bounds[part + 1] - self.bounds[part]


def column_ranges(adj: torch.Tensor, num_local: int, recv_counts: Sequence[int], mean: bool,
                  dtype: torch.dtype) -> ColumnRanges:
    """:class:`ColumnRanges` of a CSR adjacency of shape (rows, num_local + sum(recv_counts)), for rows of
    ``dtype``. Its index and value arrays are used as they are (converted only if their dtypes differ)."""
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    crow, col = adj.crow_indices().long().contiguous(), adj.col_indices().long().contiguous()
    row_scale = None
    if mean:
        row_scale = 1.0 / crow.diff().clamp(min=1).to(compute)
    bounds = tuple(itertools.accumulate(recv_counts, initial=num_local))
    return ColumnRanges(crow, col, adj.values().detach().to(compute).contiguous(), row_scale, (0,) + bounds,
                        compute)


class HaloAggregate(torch.autograd.Function):
    """``A @ cat([x, halo])`` for ``A`` read by :class:`ColumnRanges`, the halo rows coming one peer at a
    time from ``peer_rows`` (which waits for them, if they are still travelling, after the owned columns'
    product: overlap). Backward returns ``x``'s gradient; when ``reverse`` is given, ``(exchanger,
    send_bits, recv_bits)``, it also sends each peer its halo rows' gradients and, once the owned columns'
    product is made, adds those this rank's sent rows receive (the halo exchange's backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, peer_rows: PeerRows, ranges: ColumnRanges,  # type: ignore[override]
                reverse) -> torch.Tensor:
        # new_zeros and an exactq op, which a compute session does not reroute; a compression session sees
        # the output made here (so it counts as an activation, not an input).
        out = ranges.product(0, x, x.new_zeros((ranges.crow.numel() - 1, x.shape[1]), dtype=ranges.dtype))
        for q, rows in peer_rows():
            if ranges.width(q + 1):
                ranges.product(q + 1, rows, out)
            del rows  # this peer's decoded rows go before the next peer's are made
        ctx.ranges, ctx.reverse, ctx.versions, ctx.dtype = ranges, reverse, ranges.versions(), x.dtype
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ranges: ColumnRanges = ctx.ranges
        if ranges.versions() != ctx.versions:  # the adjacency is read, not copied: as autograd checks saved tensors
            raise RuntimeError("exactq.distributed: the sparse adjacency of a layer aggregated by column ranges was "
                               "modified in place between its forward and backward")
        grad = grad.to(ranges.dtype).contiguous()
        pending = None
        if ctx.reverse is not None:
            exchanger, send_bits, recv_bits = ctx.reverse
            width = grad.shape[1]

            def grad_rows(q: int) -> torch.Tensor:
                rows = grad.new_zeros((ranges.width(q + 1), width))
                if rows.shape[0]:
                    ranges.product(q + 1, grad, rows, transpose=True)
                return rows.to(ctx.dtype)

            pending = exchanger.start_reverse(grad_rows, width, ctx.dtype, send_bits, recv_bits)
        grad_x = ranges.product(0, grad, grad.new_zeros((ranges.width(0), grad.shape[1])), transpose=True)
        grad_x = grad_x.to(ctx.dtype)  # while the halo gradients travel
        if pending is not None:
            exchanger.add_reversed(pending, grad_x)
        return grad_x, None, None, None
