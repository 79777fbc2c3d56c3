"""One rank's share of a partitioned graph (:class:`GraphShard`) and the plan of its halo exchange.

Local numbering: the rank's owned nodes first, those with no remote in-neighbour ("central") before
those with one ("marginal"), each group in global-id order; then the halo (remote sources of owned
nodes' in-edges), grouped by owner rank and in global-id order within each. The shard keeps every edge
whose target it owns, so an owned node's aggregation is complete once the halo rows have arrived.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .partition import check_edge_index, partition_stats

log = logging.getLogger(__name__)

_META = "meta.json"


@dataclass(frozen=True)
class ExchangePlan:
    """Which rows travel between ranks each layer.

    ``send_index``: owned local rows to send, grouped by destination rank in ascending order, in the
    order the destination numbers them as halo rows; ``send_counts[q]`` of them go to rank ``q``.
    ``recv_counts[q]``: halo rows that come from rank ``q`` (their local rows follow the owned ones in
    rank order).
    """

    send_index: torch.Tensor
    send_counts: Tuple[int, ...]
    recv_counts: Tuple[int, ...]


@dataclass
class GraphShard:
    """A rank's part of a graph: what full-graph training on that rank reads.

    Attributes:
        rank, world_size: this part and the number of parts.
        num_nodes: nodes of the whole graph.
        num_local: owned nodes (the rows of ``x``, ``y``, the masks and the model's output).
        num_central: owned nodes with no remote in-neighbour (rows ``[0, num_central)``).
        node_ids: global id of every owned row; ``halo_ids``: of every halo row.
        edge_index: every edge whose target this rank owns, in local numbering (targets
            ``< num_local``, sources ``< num_local + num_halo``).
        node_attrs: ``x``, ``y``, masks and every other node-level tensor of the data, owned rows only.
        edge_attrs: edge-level tensors (``edge_weight``, ``edge_attr``) of the kept edges.
        global_counts: for each boolean node attribute (``train_mask``...), its count on the whole
            graph: a rank's loss over its train nodes divided by ``global_counts["train_mask"]`` sums,
            over ranks, to the full-graph mean loss.
        plan: the :class:`ExchangePlan`.
        partition_id: fingerprint of the partition the shard comes from (shards of different
            partitions cannot train together).

    Node and edge attributes read as attributes too: ``shard.x``, ``shard.train_mask``.
    """

    rank: int
    world_size: int
    num_nodes: int
    num_local: int
    num_central: int
    node_ids: torch.Tensor
    halo_ids: torch.Tensor
    edge_index: torch.Tensor
    plan: ExchangePlan
    partition_id: str
    node_attrs: Dict[str, torch.Tensor] = field(default_factory=dict)
    edge_attrs: Dict[str, torch.Tensor] = field(default_factory=dict)
    global_counts: Dict[str, int] = field(default_factory=dict)

    @property
    def num_halo(self) -> int:
        return self.halo_ids.numel()

    def __getattr__(self, name: str):
        if name in ("node_attrs", "edge_attrs"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        for attrs in (self.node_attrs, self.edge_attrs):
            if name in attrs:
                return attrs[name]
        raise AttributeError(f"GraphShard has no attribute {name!r} (node attributes: {sorted(self.node_attrs)}, "
                             f"edge attributes: {sorted(self.edge_attrs)})")

    def sparse_adjacency(self) -> torch.Tensor:
        """The shard's adjacency as a ``torch.sparse`` CSR tensor of shape (num_local, num_local +
        num_halo), rows = targets (PyG's ``adj_t``), values = ``edge_weight`` if the shard has one, else
        ones. Layers that support it (GCN, GraphSAGE, GIN, GraphConv) then aggregate by sparse matmul
        instead of one message per edge. Build it once and pass the same tensor every call."""
        from torch_geometric.utils import to_torch_csr_tensor

        return to_torch_csr_tensor(self.edge_index.flip(0), self.edge_attrs.get("edge_weight"),
                                   size=(self.num_local, self.num_local + self.num_halo))

    def to(self, device: Union[str, torch.device]) -> "GraphShard":
        """A copy with every tensor on ``device`` (NCCL ranks train on their GPU)."""
        move = lambda t: t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, node_ids=move(self.node_ids), halo_ids=move(self.halo_ids), edge_index=move(self.edge_index),
            plan=dataclasses.replace(self.plan, send_index=move(self.plan.send_index)),
            node_attrs={k: move(v) for k, v in self.node_attrs.items()},
            edge_attrs={k: move(v) for k, v in self.edge_attrs.items()})

    def save(self, path: Union[str, Path]) -> None:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state["plan"] = dataclasses.asdict(self.plan)
        torch.save(state, path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "GraphShard":
        state = torch.load(path, weights_only=True)
        plan = state.pop("plan")
        plan = ExchangePlan(plan["send_index"], tuple(plan["send_counts"]), tuple(plan["recv_counts"]))
        return cls(plan=plan, **state)

    def __repr__(self) -> str:
        return (f"GraphShard(rank={self.rank}/{self.world_size}, owned={self.num_local} "
                f"(central {self.num_central}), halo={self.num_halo}, edges={self.edge_index.shape[1]}, "
                f"send={sum(self.plan.send_counts)} rows, attrs={sorted(self.node_attrs) + sorted(self.edge_attrs)})")


def partition_fingerprint(parts: torch.Tensor) -> str:
    return hashlib.sha1(parts.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def check_parts(parts: object, num_nodes: int, world_size: Optional[int] = None) -> int:
    """Validates a part-id vector; returns the number of parts."""
    if not isinstance(parts, torch.Tensor) or parts.dtype != torch.long or parts.dim() != 1:
        got = f"{parts.dtype} of shape {tuple(parts.shape)}" if isinstance(parts, torch.Tensor) \
            else type(parts).__name__
        raise ValueError(f"parts must be a LongTensor of shape (num_nodes,), got {got}")
    if parts.numel() != num_nodes:
        raise ValueError(f"parts must hold one part id per node: {num_nodes} nodes, got {parts.numel()} ids")
    low, high = int(parts.min()), int(parts.max())
    if low < 0:
        raise ValueError(f"parts holds a negative part id ({low})")
    if world_size is None:
        return high + 1
    if high >= world_size:
        raise ValueError(f"parts holds part id {high}, but world_size is {world_size} (ids must be < world_size)")
    return world_size


def shard(data, parts: torch.Tensor, rank: int, world_size: Optional[int] = None) -> GraphShard:
    """The :class:`GraphShard` of ``rank`` for a PyG ``Data`` cut by ``parts``.

    Args:
        data: the whole graph (``edge_index``, node attributes such as ``x``, ``y``, masks; edge
            attributes such as ``edge_weight`` are kept for the shard's edges).
        parts: LongTensor of part ids, one per node (:func:`partition`).
        rank: which part, in ``[0, world_size)``.
        world_size: number of parts (default ``parts.max() + 1``).
    """
    n = int(data.num_nodes)
    world_size = check_parts(parts, n, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    edge_index = check_edge_index(data.edge_index, n, "data.edge_index")
    return _build(data, edge_index, parts, rank, world_size, partition_fingerprint(parts))


def _build(data, edge_index, parts, rank, world_size, partition_id) -> GraphShard:
    n = parts.numel()
    src, dst = edge_index
    psrc, pdst = parts[src], parts[dst]
    kept = pdst == rank
    s, d = src[kept], dst[kept]
    remote = psrc[kept] != rank
    owned = (parts == rank).nonzero().view(-1)
    marginal = torch.zeros(n, dtype=torch.bool)
    marginal[d[remote]] = True
    order = torch.cat([owned[~marginal[owned]], owned[marginal[owned]]])
    num_local = order.numel()
    halo = torch.unique(s[remote])
    halo = halo[torch.argsort(parts[halo] * n + halo)]
    g2l = torch.full((n,), -1, dtype=torch.long)
    g2l[order] = torch.arange(num_local)
    g2l[halo] = num_local + torch.arange(halo.numel())
    # Rows this rank sends: its nodes that are sources of edges into another rank's nodes, per
    # destination in global-id order (the order the destination numbers its halo).
    out = (psrc == rank) & (pdst != rank)
    pairs = torch.unique(pdst[out] * n + src[out])
    plan = ExchangePlan(
        send_index=g2l[pairs % n],
        send_counts=tuple(torch.bincount(pairs // n, minlength=world_size).tolist()),
        recv_counts=tuple(torch.bincount(parts[halo], minlength=world_size).tolist()),
    )
    node_attrs, edge_attrs, counts = {}, {}, {}
    for key, value in data.items():
        if key == "edge_index" or not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            continue
        if data.is_edge_attr(key) and value.dim() and value.shape[0] == edge_index.shape[1]:
            edge_attrs[key] = value[kept]
        elif data.is_node_attr(key) and value.dim() and value.shape[0] == n:
            node_attrs[key] = value[order]
            if value.dtype == torch.bool:
                counts[key] = int(value.sum())
    return GraphShard(rank=rank, world_size=world_size, num_nodes=n, num_local=num_local,
                      num_central=int((~marginal[owned]).sum()), node_ids=order, halo_ids=halo,
                      edge_index=torch.stack([g2l[s], g2l[d]]), plan=plan, partition_id=partition_id,
                      node_attrs=node_attrs, edge_attrs=edge_attrs, global_counts=counts)


def save_partition(data, parts: torch.Tensor, directory: Union[str, Path]) -> Path:
    """Writes one shard file per part (``part_<rank>.pt``) and ``meta.json`` into ``directory``, so
    each rank can load only its own shard with :func:`load_shard`."""
    n = int(data.num_nodes)
    world_size = check_parts(parts, n)
    edge_index = check_edge_index(data.edge_index, n, "data.edge_index")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pid = partition_fingerprint(parts)
    for rank in range(world_size):
        _build(data, edge_index, parts, rank, world_size, pid).save(directory / f"part_{rank}.pt")
    stats = partition_stats(edge_index, parts, world_size)
    meta = {"num_parts": world_size, "num_nodes": n, "num_edges": int(edge_index.shape[1]),
            "partition_id": pid, **stats}
    (directory / _META).write_text(json.dumps(meta, indent=1))
    return directory


def load_shard(directory: Union[str, Path], rank: int) -> GraphShard:
    """The shard of ``rank`` from a directory written by :func:`save_partition`."""
    directory = Path(directory)
    meta_path = directory / _META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a partition directory (no {_META}); write one with "
                                f"`python -m exactq partition`")
    meta = json.loads(meta_path.read_text())
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < meta["num_parts"]:
        raise ValueError(f"rank must be an int in [0, {meta['num_parts']}) for {directory}, got {rank!r}")
    part = GraphShard.load(directory / f"part_{rank}.pt")
    if part.partition_id != meta["partition_id"]:
        raise ValueError(f"{directory / f'part_{rank}.pt'} belongs to partition {part.partition_id}, not to "
                         f"this directory's {meta['partition_id']}")
    return part
