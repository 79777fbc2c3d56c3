"""Halo exchange: owned boundary rows to the ranks that need them (forward), halo gradients back to
their owners (backward), as exact or quantized messages over ``all_to_all_single``.

A quantized message is a rank's rows for one peer, each row a block of exactq's quantizer (one
bfloat16 min and range per row, unbiased stochastic rounding at 1/2/4/8 bits): codes then stats, as
bytes. A constant row has range 0 and arrives exactly; a row holding NaN or Inf arrives as NaN (its
stats are NaN), so a non-finite value still makes the loss non-finite, as in fp32.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .. import _ops
from ..functional import draw_seed
from .shard import ExchangePlan

MESSAGE_BITS = (1, 2, 4, 8)
_MAX_SEED = 2**63 - 1  # seeds of the quantize op lie in [0, 2**63 - 1)
Bits = Optional[int]  # None: exact


def check_message_bits(bits: object, allow_auto: bool = True, name: str = "message_bits") -> object:
    if bits is None or (allow_auto and bits == "auto") or (
            not isinstance(bits, bool) and isinstance(bits, int) and bits in MESSAGE_BITS):
        return bits
    accepted = f"None (exact), {', '.join(map(str, MESSAGE_BITS))}" + (" or 'auto'" if allow_auto else "")
    raise ValueError(f"{name} must be {accepted}, got {bits!r}")


def message_nbytes(rows: int, width: int, bits: Bits, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a message of ``rows`` rows of ``width`` values: per-row stats and codes, padded to a
    multiple of 4 so that every message of a concatenated buffer can be viewed in place."""
    if bits is None:
        n = rows * width * torch.empty((), dtype=dtype).element_size()
    else:
        n = rows * 4 + (rows * width * bits + 7) // 8
    return -(-n // 4) * 4


def encode(rows: torch.Tensor, bits: Bits, seed: int) -> torch.Tensor:
    """A (rows, width) tensor as message bytes (uint8, 1-D): exact values, or bfloat16 (min, range)
    per row followed by the codes."""
    if rows.shape[0] == 0:
        return rows.new_empty((0,), dtype=torch.uint8)
    if bits is None:
        parts = [rows.contiguous().view(-1).view(torch.uint8)]
    else:
        packed, stats = _ops.quantize(rows.detach(), bits, rows.shape[1], None, seed)
        parts = [stats.view(-1).view(torch.uint8), packed]
    pad = message_nbytes(rows.shape[0], rows.shape[1], bits, rows.dtype) - sum(p.numel() for p in parts)
    return torch.cat(parts + [rows.new_zeros((pad,), dtype=torch.uint8)])


def decode(buf: torch.Tensor, rows: int, width: int, bits: Bits, dtype: torch.dtype,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of :func:`encode` (up to the stochastic rounding); ``buf`` starts 4-byte aligned. With
    ``out`` (a contiguous (rows, width) tensor of ``dtype``), written into it."""
    if rows == 0:
        return buf.new_empty((0, width), dtype=dtype) if out is None else out
    if bits is None:
        n = rows * width * torch.empty((), dtype=dtype).element_size()
        values = buf[:n].view(dtype).view(rows, width)
        return values if out is None else out.copy_(values)
    stats = buf[:rows * 4].view(torch.bfloat16).view(rows, 2)
    codes = buf[rows * 4:rows * 4 + (rows * width * bits + 7) // 8]
    if out is None:
        return _ops.dequantize(codes, stats, bits, width, None, rows * width, dtype).view(rows, width)
    _ops.dequantize_into(codes, stats, bits, width, None, out)
    return out


@dataclass
class ExchangeStats:
    """Counters of one wrapped model's exchanges since the last :meth:`reset` (this rank's view)."""

    bytes_sent: int = 0
    fp32_bytes: int = 0  # what the same rows would take as float32
    exchanges: int = 0
    comm_seconds: float = 0.0  # time spent blocked on the exchange (not hidden by overlap)
    kept: int = 0  # layer calls whose halo rows were kept from an earlier call (nothing sent)

    def reset(self) -> None:
        self.bytes_sent = self.fp32_bytes = self.exchanges = self.kept = 0
        self.comm_seconds = 0.0


def _splits(counts: Sequence[int], width: int, bits: Sequence[Bits], dtype) -> list:
    return [message_nbytes(c, width, b, dtype) for c, b in zip(counts, bits)]


class _Pending:
    """An exchange in flight: wait() gives the received bytes. An asynchronous one holds the sent bytes
    until it is waited for, so that they outlive the transfer whatever the backend keeps of them."""

    def __init__(self, work, send: Optional[torch.Tensor], out: torch.Tensor, width: int, dtype, recv_bits):
        self.work, self.send, self.out = work, send, out
        self.width, self.dtype, self.recv_bits = width, dtype, recv_bits


class Exchanger:
    """Sends and receives one shard's halo rows on a process group.

    ``send_bits[q]`` / ``recv_bits[q]``: the bits of the messages to / from rank ``q`` (``None``:
    exact); every rank must agree on them (rank q's ``send_bits[r]`` is rank r's ``recv_bits[q]``).
    """

    def __init__(self, plan: ExchangePlan, num_local: int, rank: int, group, stats: ExchangeStats):
        self.plan, self.num_local, self.rank, self.group, self.stats = plan, num_local, rank, group, stats
        self._send_offsets = list(itertools.accumulate(plan.send_counts, initial=0))
        self._recv_offsets = list(itertools.accumulate(plan.recv_counts, initial=0))

    def _seed(self) -> int:
        return (draw_seed() ^ (self.rank * 0x9E3779B97F4A7C15)) % _MAX_SEED

    def _exchange(self, rows_for, width: int, dtype, counts_send, counts_recv, bits_recv, bits_send, async_op):
        """``rows_for(q)``: the rows to send to peer q, made one peer at a time (so at most one peer's float
        rows exist besides the encoded bytes)."""
        seed = self._seed()
        bufs = [encode(rows_for(q), bits_send[q], (seed + q) % _MAX_SEED) for q in range(len(counts_send))]
        send = torch.cat(bufs)  # one message per rank of the group, so never empty
        out_splits = _splits(counts_recv, width, bits_recv, dtype)
        out = torch.empty(sum(out_splits), dtype=torch.uint8, device=send.device)
        self.stats.bytes_sent += send.numel()
        self.stats.fp32_bytes += sum(counts_send) * width * 4
        self.stats.exchanges += 1
        started = time.perf_counter()
        work = dist.all_to_all_single(out, send, out_splits, [b.numel() for b in bufs], group=self.group,
                                      async_op=async_op)
        if not async_op:
            self.stats.comm_seconds += time.perf_counter() - started
        return _Pending(work, send if async_op else None, out, width, dtype, bits_recv)

    def _received(self, pending: _Pending, counts):
        """Waits for an exchange; yields (peer, its message bytes, rows, bits) one peer at a time."""
        if pending.work is not None:
            t = time.perf_counter()
            pending.work.wait()
            self.stats.comm_seconds += time.perf_counter() - t
            pending.work = pending.send = None  # the sent bytes go now, not when the pending exchange does
        offset = 0
        for q, (c, b) in enumerate(zip(counts, pending.recv_bits)):
            size = message_nbytes(c, pending.width, b, pending.dtype)
            yield q, pending.out[offset:offset + size], c, b
            offset += size

    def start(self, x: torch.Tensor, send_bits, recv_bits, async_op: bool = True) -> _Pending:
        """Starts sending this rank's boundary rows of ``x`` (owned rows, 2-D)."""
        index, off = self.plan.send_index, self._send_offsets
        with torch.no_grad():
            return self._exchange(lambda q: x.detach()[index[off[q]:off[q + 1]]], x.shape[1], x.dtype,
                                  self.plan.send_counts, self.plan.recv_counts, recv_bits, send_bits, async_op)

    def peer_rows(self, pending: _Pending):
        """Waits for a started exchange; yields (peer, its halo rows) decoded one peer at a time, so that
        no more than one peer's float rows exist at once (exact rows are views of the received bytes)."""
        for q, buf, c, b in self._received(pending, self.plan.recv_counts):
            yield q, decode(buf, c, pending.width, b, pending.dtype)

    def finish(self, pending: _Pending, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The halo rows (in local halo order) of a started exchange, decoded into ``out`` (contiguous, one
        row per halo row) where given."""
        if out is None:
            out = torch.empty((sum(self.plan.recv_counts), pending.width), dtype=pending.dtype,
                              device=pending.out.device)
        for q, buf, c, b in self._received(pending, self.plan.recv_counts):
            o = self._recv_offsets[q]
            decode(buf, c, pending.width, b, pending.dtype, out[o:o + c])
        return out

    def start_reverse(self, grad_rows, width: int, dtype, send_bits, recv_bits) -> _Pending:
        """Backward: starts sending halo-row gradients back to their owners. ``grad_rows(q)``: the
        gradients of the halo rows that came from peer q, (recv_counts[q], width), made when needed (one
        peer's at a time)."""
        with torch.no_grad():
            # Directions swap: what came from q goes back to q at the bits q used for it.
            return self._exchange(grad_rows, width, dtype, self.plan.recv_counts, self.plan.send_counts,
                                  send_bits, recv_bits, async_op=True)

    def add_reversed(self, pending: _Pending, grad_x: torch.Tensor) -> None:
        """Waits for a :meth:`start_reverse` exchange and adds the gradients this rank's sent rows received
        into ``grad_x`` (owned rows), one peer's message at a time."""
        soff, index = self._send_offsets, self.plan.send_index
        with torch.no_grad():
            for q, buf, c, b in self._received(pending, self.plan.send_counts):
                if c:
                    grad_x.index_add_(0, index[soff[q]:soff[q] + c], decode(buf, c, pending.width, b, pending.dtype))

    def per_peer(self, halo: torch.Tensor):
        """``q -> `` the rows of peer q in a tensor of one row per halo row (halo rows, or their gradients)."""
        off = self._recv_offsets
        return lambda q: halo[off[q]:off[q + 1]]


class HaloExchange(torch.autograd.Function):
    """``cat([x, halo])`` where halo arrives by a started exchange; backward returns the halo rows'
    gradients to their owners and adds what this rank's sent rows received."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: _Pending, exchanger: Exchanger, send_bits, recv_bits):
        ctx.exchanger, ctx.bits = exchanger, (send_bits, recv_bits)
        n = x.shape[0]
        full = x.new_empty((n + sum(exchanger.plan.recv_counts), x.shape[1]))
        full[:n] = x
        exchanger.finish(pending, full[n:])  # decoded in place: no separate halo tensor
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ex = ctx.exchanger
        n = ex.num_local
        pending = ex.start_reverse(ex.per_peer(grad[n:]), grad.shape[1], grad.dtype, *ctx.bits)
        grad_x = grad[:n].clone()  # while the halo gradients travel
        ex.add_reversed(pending, grad_x)
        return grad_x, None, None, None, None


def exchange_halo(x: torch.Tensor, exchanger: Exchanger, send_bits, recv_bits,
                  pending: Optional[_Pending] = None) -> torch.Tensor:
    """``x`` (owned rows) extended by its halo rows, differentiable; ``pending``: an exchange of the same
    ``x`` already started with :meth:`Exchanger.start` (to overlap it with other work)."""
    if pending is None:
        pending = exchanger.start(x, send_bits, recv_bits, async_op=False)
    return HaloExchange.apply(x, pending, exchanger, send_bits, recv_bits)
