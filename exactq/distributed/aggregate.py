"""Sum and mean aggregation over a CSR adjacency whose sources are a rank's owned rows and its halo rows,
without ever holding the owned + halo rows in one tensor.

A layer that aggregates raw source rows by sparse matmul (GraphSAGE, GIN, GraphConv on
``shard.sparse_adjacency()``) would read a (num_local + num_halo, width) input: on a graph whose
partition leaves more halo rows than owned ones, that tensor, and its gradient in backward, are the
largest a rank makes. Here the adjacency is cut by source column into the owned block and one block per
peer, ``A = [A_own | A_1 | ... | A_q]``, so that ``A @ [x; h] = A_own @ x + sum_q A_q @ h_q``: each
peer's halo rows are decoded (or viewed, when exact), multiplied in and dropped before the next peer's;
in backward each peer's halo gradients ``A_q^T @ g`` are made, encoded and dropped in turn.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

PeerRows = Callable[[], Iterable[Tuple[int, torch.Tensor]]]  # yields (peer, its halo rows) one peer at a time


class ColumnBlocks:
    """A CSR adjacency (rows = targets) cut by source column: ``owned`` (the owned columns) and ``peers``
    (each peer's halo columns; ``None`` for a peer that sends no rows), with 32-bit indices. For a mean,
    each row's values are divided by its stored entries (at least 1), as PyG's mean over a CSR adjacency
    divides. The blocks' transposes, which backward multiplies by, are made on first use and kept
    (transposing a CSR block on every backward takes ~9x its product)."""

    def __init__(self, owned: torch.Tensor, peers: Tuple[Optional[torch.Tensor], ...]):
        self.owned, self.peers = owned, peers
        self._transposed: Optional[Tuple[torch.Tensor, Tuple[Optional[torch.Tensor], ...]]] = None

    def transposed(self) -> Tuple[torch.Tensor, Tuple[Optional[torch.Tensor], ...]]:
        if self._transposed is None:
            t = lambda a: a.t().to_sparse_csr()  # noqa: E731
            self._transposed = t(self.owned), tuple(None if a is None else t(a) for a in self.peers)
        return self._transposed


def column_blocks(adj: torch.Tensor, num_local: int, recv_counts: Sequence[int], mean: bool) -> ColumnBlocks:
    """Cuts a CSR adjacency of shape (rows, num_local + sum(recv_counts)) into :class:`ColumnBlocks`."""
    crow, col, values = adj.crow_indices(), adj.col_indices(), adj.values()
    rows = adj.shape[0]
    per_row = crow.diff()
    row = torch.repeat_interleave(torch.arange(rows, device=col.device), per_row)
    if mean:
        values = values / per_row.clamp(min=1).to(values.dtype)[row]
    bounds = list(itertools.accumulate(recv_counts, initial=num_local))
    index = torch.int32 if max(adj.shape[1], values.numel()) < 2**31 else torch.int64

    def block(lo: int, hi: int) -> torch.Tensor:
        sel = (col >= lo) & (col < hi)  # a row's entries stay in column order
        counts = torch.bincount(row[sel], minlength=rows)
        block_crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(index)
        return torch.sparse_csr_tensor(block_crow, (col[sel] - lo).to(index), values[sel], (rows, hi - lo))

    return ColumnBlocks(block(0, num_local),
                        tuple(block(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])))


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for CSR ``a`` into one new tensor (``torch.sparse.mm`` makes a zero tensor beside it)."""
    return b.new_zeros((a.shape[0], b.shape[1])).addmm_(a, b)


class HaloAggregate(torch.autograd.Function):
    """``A @ cat([x, halo])`` for ``A`` cut into :class:`ColumnBlocks`, the halo rows coming one peer at a
    time from ``peer_rows`` (which waits for them, if they are still travelling, after the owned block's
    product: overlap). Backward returns ``x``'s gradient; when ``reverse`` is given, ``(exchanger,
    send_bits, recv_bits)``, it also sends each peer its halo rows' gradients and, once the owned block's
    product is made, adds those this rank's sent rows receive (the halo exchange's backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, peer_rows: PeerRows, blocks: ColumnBlocks,  # type: ignore[override]
                reverse) -> torch.Tensor:
        # new_zeros and addmm_, which a compute session does not reroute; a compression session sees the
        # output made here (so it counts as an activation, not an input).
        out = _product(blocks.owned, x)
        for q, rows in peer_rows():
            if blocks.peers[q] is not None:
                out.addmm_(blocks.peers[q], rows)
            del rows  # this peer's decoded rows go before the next peer's are made
        ctx.blocks, ctx.reverse = blocks, reverse
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        owned_t, peers_t = ctx.blocks.transposed()
        pending = None
        if ctx.reverse is not None:
            exchanger, send_bits, recv_bits = ctx.reverse
            width = grad.shape[1]

            def grad_rows(q: int) -> torch.Tensor:
                return grad.new_empty((0, width)) if peers_t[q] is None else _product(peers_t[q], grad)

            pending = exchanger.start_reverse(grad_rows, width, grad.dtype, send_bits, recv_bits)
        grad_x = _product(owned_t, grad)  # while the halo gradients travel
        if pending is not None:
            exchanger.add_reversed(pending, grad_x)
        return grad_x, None, None, None
