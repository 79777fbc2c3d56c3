"""``message_bits="auto"``: 2, 4 or 8 bits per layer and link, chosen as AdaQP does, by a small
mixed-integer program (``scipy.optimize.milp``).

Stochastic rounding of a row with range R at b bits adds variance at most ``R^2 / (4 (2^b - 1)^2)``
per value; a receiver's aggregation weights it by the squared weight of each edge the row feeds
(``1 / in-degree`` of the target, as a mean or GCN aggregation). For each link (layer, sender ->
receiver) the receiver measures ``V = sum_rows w_row * R_row^2 * width / 4`` on the rows it gets, so
the link's variance at b bits is ``V / (2^b - 1)^2``. Its time is the bytes of its messages (forward
and backward) times the link's measured seconds per byte. The program minimises the total variance
subject to a time budget: the sum over layers of the slowest rank's send or receive time may not
exceed what uniform ``budget_bits`` messages would take. It is re-solved every ``every`` forwards from
the latest measurements, on rank 0, and the assignment is broadcast.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .exchange import message_nbytes

log = logging.getLogger(__name__)

CHOICES = (2, 4, 8)


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def measure_links(group, world: int, rank: int, device: torch.device, nbytes: int = 1 << 20,
                  repeats: int = 3) -> np.ndarray:
    """Seconds per byte of every link, measured pair by pair with isend/irecv (both directions at
    once); every rank gets the same (world, world) matrix."""
    cost = torch.zeros(world, world, dtype=torch.float64, device=device)
    buf_out = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    buf_in = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for i in range(world):
        for j in range(i + 1, world):
            if rank in (i, j):
                peer = _global_rank(group, j if rank == i else i)
                best = float("inf")
                for _ in range(repeats):
                    t = time.perf_counter()
                    reqs = [dist.isend(buf_out, peer, group=group), dist.irecv(buf_in, peer, group=group)]
                    for r in reqs:
                        r.wait()
                    best = min(best, time.perf_counter() - t)
                cost[i, j] = cost[j, i] = best / nbytes
            dist.barrier(group=group)
    dist.all_reduce(cost, op=dist.ReduceOp.MAX, group=group)
    return cost.cpu().numpy()


def solve(links: Dict[Tuple[int, int, int], Tuple[float, int, int]], cost: np.ndarray, world: int,
          budget_bits: int = 4) -> Dict[Tuple[int, int, int], int]:
    """Bits per link. ``links[(layer, src, dst)] = (V, rows, width)``; ``cost[src, dst]``: seconds per
    byte. Returns ``{(layer, src, dst): bits}``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    keys = sorted(k for k, (_, rows, _) in links.items() if rows > 0)
    if not keys:
        return {}
    layers = sorted({k[0] for k in keys})
    nb, nl = len(CHOICES), len(keys)
    nvar = nl * nb + len(layers)
    scale = max(v for v, _, _ in links.values()) or 1.0
    c = np.zeros(nvar)
    t = np.zeros((nl, nb))
    for i, k in enumerate(keys):
        v, rows, width = links[k]
        for j, b in enumerate(CHOICES):
            c[i * nb + j] = v / scale / (2**b - 1) ** 2
            t[i, j] = 2 * message_nbytes(rows, width, b) * cost[k[1], k[2]]  # forward rows + backward grads
    ref = CHOICES.index(budget_bits)
    groups, budget = [], 0.0  # each rank's send and receive time bound its layer's time
    for li, layer in enumerate(layers):
        worst = 0.0
        for side in (1, 2):
            for p in range(world):
                mine = [i for i, k in enumerate(keys) if k[0] == layer and k[side] == p]
                groups.append((li, mine))
                worst = max(worst, sum(t[i, ref] for i in mine))
        budget += worst
    uniform = {k: budget_bits for k in keys}
    if not budget > 0:
        return uniform
    # Times in units of the budget: HiGHS's tolerances are absolute and a link's time is ~1e-5 s, at
    # which a budget met exactly by uniform bits was at times judged infeasible.
    t = t / budget
    rows_a, lo, hi = [], [], []
    for i in range(nl):  # one choice per link
        a = np.zeros(nvar)
        a[i * nb:(i + 1) * nb] = 1
        rows_a.append(a), lo.append(1), hi.append(1)
    for li, mine in groups:
        a = np.zeros(nvar)
        for i in mine:
            a[i * nb:(i + 1) * nb] = t[i]
        a[nl * nb + li] = -1
        rows_a.append(a), lo.append(-np.inf), hi.append(0)
    a = np.zeros(nvar)
    a[nl * nb:] = 1
    rows_a.append(a), lo.append(-np.inf), hi.append(1 + 1e-6)
    integrality = np.r_[np.ones(nl * nb), np.zeros(len(layers))]
    bounds_hi = np.r_[np.ones(nl * nb), np.full(len(layers), np.inf)]
    res = milp(c, constraints=LinearConstraint(np.array(rows_a), lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nvar), bounds_hi))
    if not res.success:  # uniform bits meet the budget by construction: training goes on with them
        log.warning("exactq.distributed: the bit-width program failed (%s); using %d bits on every link",
                    res.message, budget_bits)
        return uniform
    x = res.x[:nl * nb].reshape(nl, nb)
    return {k: CHOICES[int(np.argmax(x[i]))] for i, k in enumerate(keys)}


class AdaptiveBits:
    """Per-layer, per-link bits for a wrapped model (``message_bits="auto"``)."""

    def __init__(self, state, every: int = 10, budget_bits: int = 4, initial_bits: int = 8):
        self.state, self.every, self.budget_bits = state, every, budget_bits
        self.world, self.rank = state.shard.world_size, state.shard.rank
        self.initial_bits = initial_bits
        self.assignment: Dict[Tuple[int, int, int], int] = {}
        self.observed: Dict[Tuple[int, int], Tuple[float, int, int]] = {}  # (layer, src) -> (V, rows, width)
        self.forwards = 0
        self.solves = 0
        self.cost = None
        self._weights = []  # [(edge_index, per-halo-row weight)]

    def bits_for(self, layer: int):
        if layer == 0:
            self.forwards += 1
            if self.observed and (self.forwards - 1) % self.every == 0:
                self._solve()
        get = self.assignment.get
        send = tuple(get((layer, self.rank, q), self.initial_bits) for q in range(self.world))
        recv = tuple(get((layer, q, self.rank), self.initial_bits) for q in range(self.world))
        return send, recv

    def _row_weights(self, edge_index: torch.Tensor) -> torch.Tensor:
        for e, w in self._weights:
            if e is edge_index:
                return w
        s = self.state.shard
        src, dst = edge_index
        indeg = torch.bincount(dst, minlength=s.num_local).clamp_min(1).to(torch.float64)
        w = torch.zeros(s.num_local + s.num_halo, dtype=torch.float64, device=src.device).index_add_(
            0, src, indeg[dst].pow(-2))
        self._weights = [(edge_index, w[s.num_local:])]
        return self._weights[0][1]

    @torch.no_grad()
    def observe(self, layer: int, halo: torch.Tensor, edge_index: torch.Tensor) -> None:
        """Records the variance coefficient of every incoming link of a layer from its halo rows."""
        w = self._row_weights(edge_index)
        if w.numel() != halo.shape[0]:
            return
        span = (halo.amax(1) - halo.amin(1)).to(torch.float64) if halo.numel() else halo.new_zeros(0)
        v = w * span.pow(2) * halo.shape[1] / 4
        offset = 0
        for q, rows in enumerate(self.state.shard.plan.recv_counts):
            if rows:
                self.observed[layer, q] = (float(v[offset:offset + rows].sum()), rows, halo.shape[1])
            offset += rows

    def forget(self, layer: int) -> None:
        """Drops a layer's observations: its halo rows are kept, not sent (see ``keep_inputs``)."""
        for key in [k for k in self.observed if k[0] == layer]:
            del self.observed[key]

    def _solve(self) -> None:
        group = self.state.group
        if self.cost is None:
            self.cost = measure_links(group, self.world, self.rank, self.state.shard.edge_index.device)
        gathered = [None] * self.world
        mine = {(layer, q, self.rank): val for (layer, q), val in self.observed.items()}
        dist.all_gather_object(gathered, mine, group=group)
        out = [None]
        if self.rank == 0:
            links = {k: v for part in gathered for k, v in part.items()}
            out[0] = solve(links, self.cost, self.world, self.budget_bits)
        dist.broadcast_object_list(out, src=_global_rank(group, 0), group=group)
        self.assignment = out[0]
        self.solves += 1
        log.info("exactq.distributed auto bits (solve %d): %s", self.solves, self.histogram())

    def histogram(self) -> Dict[int, int]:
        """How many links use each bit width."""
        counts = {b: 0 for b in CHOICES}
        for b in self.assignment.values():
            counts[b] += 1
        return counts
