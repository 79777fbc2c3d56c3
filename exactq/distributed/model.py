"""``exactq.distributed.wrap``: an unchanged PyG model trains on one shard of a partitioned graph.

Each supported message-passing layer is given the halo rows of its input before it aggregates and
returns rows for owned nodes only; batch norm uses statistics over all ranks; GCN's symmetric
normalisation uses global degrees; parameter gradients are summed over ranks at the end of each
backward. Layers whose output for a node depends on more than that node's in-edges and in-neighbours
(multi-hop propagation, graph-level normalisation or pooling) cannot be distributed this way and are
refused when wrapping.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch_geometric.nn import (AGNNConv, CGConv, ClusterGCNConv, EdgeConv, FeaStConv, FiLMConv, GATConv, GATv2Conv,
                                GCNConv, GENConv, GeneralConv, GINConv, GINEConv, GMMConv, GraphConv, LEConv,
                                MessagePassing, MFConv, NNConv, PNAConv, ResGatedGraphConv, RGCNConv, SAGEConv,
                                SimpleConv, TransformerConv, WLConvContinuous)
from torch_geometric.nn import aggr as pyg_aggr
from torch_geometric.nn import norm as pyg_norm
from torch_geometric.nn.aggr.fused import FusedAggregation  # MultiAggregation's fused basic reductions

from .aggregate import HaloAggregate, column_ranges
from .exchange import ExchangeStats, Exchanger, check_message_bits, exchange_halo
from .shard import GraphShard

log = logging.getLogger(__name__)

# Layers whose output row for node v depends only on v's in-edges, in-neighbours and v itself (one
# propagation): exact once the halo rows are there.
SUPPORTED_LAYERS = (GCNConv, SAGEConv, GraphConv, GINConv, GINEConv, GATConv, GATv2Conv, TransformerConv, EdgeConv,
                    PNAConv, ResGatedGraphConv, GENConv, GeneralConv, LEConv, CGConv, NNConv, FiLMConv, MFConv,
                    SimpleConv, FeaStConv, GMMConv, AGNNConv, ClusterGCNConv, RGCNConv, WLConvContinuous)
# Layers that take no (x_src, x_dst) pair, or add self-loops only without one (SimpleConv): called on the
# rows their edges read, targets first, their output sliced to the targets (none has a batch norm over
# its output rows, which would see the extra rows).
_UNIPARTITE_LAYERS = (GCNConv, PNAConv, SimpleConv, AGNNConv, ClusterGCNConv)
# Bipartite layers that add self-loops (source row i to target i): their calls put the targets first.
_LOOPED_LAYERS = (GATConv, GATv2Conv, FeaStConv)
# Modules that mix rows across the whole graph (or a graph of a batch).
_GLOBAL_MODULES = (pyg_norm.GraphNorm, pyg_norm.InstanceNorm, pyg_norm.PairNorm, pyg_norm.MeanSubtractionNorm,
                   pyg_norm.GraphSizeNorm, pyg_norm.DiffGroupNorm)
# Aggregations whose result for a node reads only that node's messages, in any order: a shard computes
# them exactly. The others read the order of a node's neighbours (LSTM, GRU, LCM, MLP, patches), pad
# them to the largest neighbourhood in the call (LSTM, GRU, set transformer) or solve over all the
# call's nodes at once (equilibrium), so a shard's call differs from the whole graph's. Exact types: a
# subclass may aggregate differently. (Quantile's interpolation positions are float32 offsets into all
# the call's messages in PyG, so its one-process result carries ~1e-5 rounding that a shard's lacks.)
SUPPORTED_AGGREGATIONS = (
    pyg_aggr.SumAggregation, pyg_aggr.MeanAggregation, pyg_aggr.MaxAggregation, pyg_aggr.MinAggregation,
    pyg_aggr.MulAggregation, pyg_aggr.VarAggregation, pyg_aggr.StdAggregation, pyg_aggr.SoftmaxAggregation,
    pyg_aggr.PowerMeanAggregation, pyg_aggr.MedianAggregation, pyg_aggr.QuantileAggregation,
    pyg_aggr.AttentionalAggregation, pyg_aggr.DeepSetsAggregation, pyg_aggr.VariancePreservingAggregation,
    pyg_aggr.DegreeScalerAggregation, pyg_aggr.MultiAggregation, FusedAggregation)
# Layers that aggregate a torch.sparse adjacency by sparse matmul (message_and_aggregate).
_SPARSE_LAYERS = (GCNConv, SAGEConv, GraphConv, GINConv)
# Layers whose fused aggregation is a sum or mean of raw source rows by sparse matmul: on a CSR
# adjacency they read the halo rows one peer at a time (:mod:`.aggregate`), never owned + halo rows.
_RANGE_LAYERS = (SAGEConv, GraphConv, GINConv)
_RANGE_AGGRS = ("add", "sum", "mean")
_MP_HOOKS = ("_propagate_forward_pre_hooks", "_propagate_forward_hooks", "_message_and_aggregate_forward_pre_hooks",
             "_message_and_aggregate_forward_hooks")
_EDGE_ARGS = ("edge_weight", "edge_attr", "edge_type")  # the supported layers' per-edge arguments
_ATTR = "_exactq_distributed"
_CACHE = 8


@dataclass(frozen=True)
class _Split:
    """An edge list cut by target: central targets (rows [0, num_central)) need no halo row.

    Compact (layers that transform every source row before aggregating): each call's input rows are
    gathered to its targets and the sources its edges read (``c_nodes`` / ``m_nodes``), so no row is
    transformed that no edge reads. Otherwise ``c_nodes`` and ``m_nodes`` are ``None``: the central call
    reads the owned rows and the marginal one the owned + halo rows as they are, without a copy of either
    (sources keep their local numbers; marginal targets count from ``num_central``)."""

    c_nodes: Optional[torch.Tensor]  # input rows of the central call: central nodes first, then extra sources
    c_edges: torch.Tensor  # edge positions
    c_edge_index: torch.Tensor
    m_nodes: Optional[torch.Tensor]  # marginal nodes first, then extra sources (owned or halo)
    m_edges: torch.Tensor
    m_edge_index: torch.Tensor


@dataclass(frozen=True)
class _Aggregate:
    """A kept aggregation ``A @ [x; halo]`` of an unchanging input, with what it was made from: the
    adjacency (its identity and its arrays' versions) and the reduction. Its own version is checked too,
    so a layer that changed it in place has it made anew."""

    adjacency: "weakref.ref[torch.Tensor]"
    versions: Tuple[int, ...]
    aggr: str
    out: torch.Tensor
    version: int

    def matches(self, adjacency: torch.Tensor, aggr: str) -> bool:
        return self.adjacency() is adjacency and self.versions == _array_versions(adjacency) and \
            self.aggr == aggr and self.out._version == self.version


def _array_versions(adjacency: torch.Tensor) -> Tuple[int, ...]:
    """Version counters of a CSR adjacency's own arrays (shared with it: an in-place change bumps them)."""
    return tuple(t._version for t in (adjacency.crow_indices(), adjacency.col_indices(), adjacency.values()))


@dataclass
class _Input:
    """A layer's last input without gradient and, once kept for it, its halo rows or, for a layer
    aggregated by column ranges, its aggregation (which needs the halo rows no more)."""

    ref: "weakref.ref[torch.Tensor]"
    version: int
    halo: Optional[torch.Tensor] = None
    aggregate: Optional[_Aggregate] = None


class DistributedState:
    """What a wrapped model carries: the shard, the exchange, its counters and the bits in use."""

    def __init__(self, shard: GraphShard, group, message_bits, overlap: bool, eval_message_bits=None,
                 keep_inputs: bool = True):
        self.shard, self.group, self.message_bits, self.overlap = shard, group, message_bits, overlap
        self.eval_message_bits, self.keep_inputs = eval_message_bits, keep_inputs
        self._inputs: Dict[int, _Input] = {}
        self.stats = ExchangeStats()
        self.exchanger = Exchanger(shard.plan, shard.num_local, shard.rank, group, self.stats)
        self.layers: List[str] = []
        self.adaptive = None  # exactq.distributed.adaptive.AdaptiveBits for message_bits="auto"
        self._checked: List[Tuple[tuple, object]] = []
        self._splits: List[Tuple[tuple, object]] = []
        self._gcn: List[Tuple[tuple, object]] = []
        self._sparse: List[Tuple[tuple, object]] = []
        self._csrs: List[Tuple[tuple, object]] = []
        self._rows: List[Tuple[tuple, object]] = []
        self.hooks: list = []

    # -- bits -------------------------------------------------------------------------------------
    def bits_for(self, layer: int, training: bool):
        """(send_bits, recv_bits) per peer rank for a layer's exchange in a training or an eval forward."""
        if not training:
            b = self.eval_message_bits
        elif self.adaptive is not None:
            return self.adaptive.bits_for(layer)
        else:
            b = self.message_bits
        return (b,) * self.shard.world_size, (b,) * self.shard.world_size

    # -- layer inputs that do not change between calls -----------------------------------------------
    def kept_halo(self, layer: int, x: torch.Tensor, adjacency: Optional[torch.Tensor] = None,
                  aggr: str = "") -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], bool]:
        """Halo rows of a layer input that does not change between calls (the features: the same tensor,
        unchanged, without gradient) are fetched once, exactly, and kept; for a layer aggregated by column
        ranges (``adjacency`` and ``aggr`` given), its aggregation over them is kept instead. Returns the
        kept halo rows (or None), the kept aggregation if it still matches this call (or None), and
        whether this call is to fetch the halo rows exactly and keep them (:meth:`keep_halo`).

        One all-reduce per call makes the ranks agree, so that no rank waits in an exchange another
        skips: kept rows are used only when every rank has what it needs for its input. Rows are fetched
        to keep on an input's second call, so an input made anew each call (dropout on the features) is
        exchanged as any other, at the message bits."""
        if not self.keep_inputs:
            return None, None, False
        entry = self._inputs.get(layer)
        # An inference tensor has no version counter: a change to it could not be seen.
        keepable = not (x.requires_grad or x.is_inference())
        same = keepable and entry is not None and entry.ref() is x and entry.version == x._version
        aggregate = entry.aggregate.out if same and entry.aggregate is not None and adjacency is not None and \
            entry.aggregate.matches(adjacency, aggr) else None
        have = same and (entry.halo is not None or aggregate is not None)
        mine = 0 if not keepable else 3 if have else 2 if same else 1
        flag = torch.tensor([mine], device=x.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        agreed = int(flag)
        if agreed >= 2 and self.adaptive is not None:
            self.adaptive.forget(layer)  # no messages: its links leave the bit-width program
        if agreed == 3:
            self.stats.kept += 1
            return entry.halo, aggregate, False
        if mine:
            self._inputs[layer] = _Input(weakref.ref(x), x._version)
        else:
            self._inputs.pop(layer, None)
        return None, None, agreed == 2

    def keep_halo(self, layer: int, halo: torch.Tensor) -> None:
        # Not a view of owned + halo rows: the owned rows beside it are freed.
        self._inputs[layer].halo = halo.clone() if halo._is_view() else halo

    def keep_aggregate(self, layer: int, adjacency: torch.Tensor, aggr: str, out: torch.Tensor) -> None:
        """Keeps a layer's aggregation of its kept input in place of its halo rows, which it needs no more
        while the adjacency stays the same (owned rows x width, against halo rows x width)."""
        entry = self._inputs[layer]
        entry.aggregate = _Aggregate(weakref.ref(adjacency), _array_versions(adjacency), aggr, out, out._version)
        entry.halo = None

    # -- graph checks and splits, cached per edge_index object ---------------------------------------
    @staticmethod
    def _cached(cache: list, key: tuple, make):
        """make() memoised on the identity of the objects in ``key`` (they are kept alive by the cache)."""
        for k, v in cache:
            if all(a is b for a, b in zip(k, key)):
                return v
        v = make()
        cache.insert(0, (key, v))
        del cache[_CACHE:]
        return v

    def split(self, edge_index: torch.Tensor, compact: bool) -> _Split:
        return self._cached(self._splits, (edge_index, compact), lambda: self._make_split(edge_index, compact))

    def check_edge_index(self, edge_index: object, layer: str) -> None:
        if not isinstance(edge_index, torch.Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2 \
                or edge_index.dtype != torch.long:
            raise ValueError(f"{layer}: exactq.distributed needs edge_index as a LongTensor (2, num_edges) in the "
                             f"shard's local numbering (shard.edge_index) or shard.sparse_adjacency(); "
                             f"got {type(edge_index).__name__}")
        self._cached(self._checked, (edge_index,), lambda: self._check_range(edge_index, layer))

    def _check_range(self, edge_index: torch.Tensor, layer: str) -> bool:
        s = self.shard
        if edge_index.numel() and (int(edge_index[1].max()) >= s.num_local or int(edge_index.min()) < 0
                                   or int(edge_index[0].max()) >= s.num_local + s.num_halo):
            raise ValueError(f"{layer}: edge_index is not in the shard's local numbering: targets must be < "
                             f"num_local={s.num_local} and sources < num_local + num_halo="
                             f"{s.num_local + s.num_halo} (use shard.edge_index)")
        return True

    def _make_split(self, edge_index: torch.Tensor, compact: bool) -> _Split:
        nc, nl = self.shard.num_central, self.shard.num_local
        src, dst = edge_index
        dev = edge_index.device
        central = dst < nc
        c_edges, m_edges = central.nonzero().view(-1), (~central).nonzero().view(-1)
        c_src, m_src = src[c_edges], src[m_edges]
        if c_src.numel() and int(c_src.max()) >= nl:  # a central node with a halo source: broken shard
            raise RuntimeError("shard ordering broken: a central node has a halo in-neighbour")
        if not compact:
            return _Split(None, c_edges, torch.stack([c_src, dst[c_edges]]),
                          None, m_edges, torch.stack([m_src, dst[m_edges] - nc]))
        c_nodes = torch.cat([torch.arange(nc, device=dev), torch.unique(c_src[c_src >= nc])])
        m_nodes = torch.cat([torch.arange(nc, nl, device=dev), torch.unique(m_src[(m_src < nc) | (m_src >= nl)])])
        remap = torch.full((nl + self.shard.num_halo,), -1, dtype=torch.long, device=dev)
        remap[c_nodes] = torch.arange(c_nodes.numel(), device=dev)
        c_ei = torch.stack([remap[c_src], dst[c_edges]])
        remap[m_nodes] = torch.arange(m_nodes.numel(), device=dev)
        m_ei = torch.stack([remap[m_src], remap[dst[m_edges]]])
        return _Split(c_nodes, c_edges, c_ei, m_nodes, m_edges, m_ei)

    # -- sparse adjacencies ------------------------------------------------------------------------------
    def check_adjacency(self, adj: torch.Tensor, layer: str) -> None:
        s = self.shard
        if tuple(adj.shape) != (s.num_local, s.num_local + s.num_halo):
            raise ValueError(f"{layer}: the sparse adjacency must be (num_local, num_local + num_halo) = "
                             f"({s.num_local}, {s.num_local + s.num_halo}) with rows = targets "
                             f"(shard.sparse_adjacency()), got {tuple(adj.shape)}")

    def csr_rows(self, adj: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A CSR adjacency's central rows over the owned columns, and its marginal rows over all columns:
        slices of its arrays (central nodes have no halo source, and come first)."""
        def make():
            nc, nl = self.shard.num_central, self.shard.num_local
            crow, col, values = adj.crow_indices(), adj.col_indices(), adj.values()
            k = int(crow[nc])
            if k and int(col[:k].max()) >= nl:
                raise RuntimeError("shard ordering broken: a central node has a halo in-neighbour")
            central = torch.sparse_csr_tensor(crow[:nc + 1], col[:k], values[:k], (nc, nl))
            marginal = torch.sparse_csr_tensor(crow[nc:] - k, col[k:], values[k:], (nl - nc, adj.shape[1]))
            return central, marginal
        return self._cached(self._rows, (adj,), make)

    def edges_of(self, adj: torch.Tensor, layer: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The local edge list (sources, targets) and values of a sparse adjacency (rows = targets)."""
        self.check_adjacency(adj, layer)

        def make():
            coo = adj.to_sparse_coo().coalesce() if adj.layout == torch.sparse_csr else adj.coalesce()
            dst, src = coo.indices()
            return torch.stack([src, dst]), coo.values()
        return self._cached(self._sparse, (adj,), make)

    def csr(self, edge_index: torch.Tensor, weights: Optional[torch.Tensor], n_dst: int, n_src: int,
            positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """CSR adjacency (rows = targets) of an edge list (``weights[positions]`` as values)."""
        from torch_geometric.utils import to_torch_csr_tensor

        def make():
            w = weights if weights is None or positions is None else weights[positions]
            return to_torch_csr_tensor(edge_index.flip(0), w, size=(n_dst, n_src))
        return self._cached(self._csrs, (edge_index, weights, positions), make)

    # -- GCN normalisation with global degrees ------------------------------------------------------
    def gcn_edges(self, conv: GCNConv, edge_index: torch.Tensor, edge_weight: Optional[torch.Tensor],
                  dtype: torch.dtype, sparse: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """GCN's normalised edge list, as ``gcn_norm`` would give on the whole graph: every owned node's
        in-edges (and self-loop) are local, so its degree is exact here; halo nodes' degrees come from
        their owners, exactly."""
        if edge_weight is not None and edge_weight.requires_grad:
            raise NotImplementedError("exactq.distributed: GCNConv with an edge_weight that requires grad is not "
                                      "supported (halo degrees are exchanged without gradient)")
        key = (edge_index, edge_weight, conv.improved, conv.add_self_loops, dtype, sparse)
        return self._cached(self._gcn, key, lambda: self._gcn_norm(conv, edge_index, edge_weight, dtype, sparse))

    def _gcn_norm(self, conv, edge_index, edge_weight, dtype, sparse):
        n = self.shard.num_local
        src, dst = edge_index
        dev = edge_index.device
        w = edge_weight.to(dtype) if edge_weight is not None else torch.ones(src.numel(), dtype=dtype, device=dev)
        if conv.add_self_loops:
            loop = src == dst
            # PyG's gcn_norm gives added self-loops improved's weight 2 only with edge weights (a sparse
            # adjacency has them): add_remaining_self_loops ignores its fill value without. As it does.
            fill = 2.0 if conv.improved and edge_weight is not None else 1.0
            loop_w = torch.full((n,), fill, dtype=dtype, device=dev)
            if sparse:  # PyG adds the self-loop to a sparse adjacency's diagonal
                loop_w.index_add_(0, dst[loop], w[loop])
            else:  # add_remaining_self_loops: an existing self-loop keeps its weight
                loop_w[dst[loop]] = w[loop]
            ar = torch.arange(n, device=dev)
            src, dst, w = torch.cat([src[~loop], ar]), torch.cat([dst[~loop], ar]), torch.cat([w[~loop], loop_w])
        deg = torch.zeros(n, dtype=dtype, device=dev).index_add_(0, dst, w)
        exact = (None,) * self.shard.world_size
        halo_deg = self.exchanger.finish(self.exchanger.start(deg[:, None], exact, exact, async_op=False))[:, 0]
        dinv = torch.cat([deg, halo_deg]).pow(-0.5)
        dinv.masked_fill_(torch.isinf(dinv), 0.0)
        return torch.stack([src, dst]), dinv[src] * w * dinv[dst]


class _DistributedLayer:
    """A supported message-passing layer's forward on a shard (installed as the instance's forward)."""

    def __init__(self, state: DistributedState, conv: MessagePassing, index: int):
        self.state, self.index, self.name = state, index, f"{type(conv).__name__} (layer {index})"
        self.conv = weakref.ref(conv)  # the module holds this object: no reference cycle
        self.signature = inspect.signature(type(conv).forward)
        # Bipartite call (x_src, x_dst): the layer computes rows for the targets only, so modules it
        # applies to its output rows (GIN's MLP) see exactly the owned rows.
        self.bipartite = not isinstance(conv, _UNIPARTITE_LAYERS)
        # Compact calls (the call's targets first, then only the sources its edges read): layers with
        # self-loops need them; layers that transform every source row before they aggregate gain by
        # them. The others read the owned / owned + halo rows as they are (no copies of them).
        self.compact = not self.bipartite or isinstance(conv, _LOOPED_LAYERS + (TransformerConv,)) \
            or (isinstance(conv, SAGEConv) and conv.project)
        # A batch norm inside the layer must see all its rows in one call: no central/marginal split.
        self.overlap = state.overlap and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                 for m in conv.modules())
        # Aggregates by column ranges where the class's own fused aggregation is what runs (a subclass that
        # changes it aggregates its own way, on owned + halo rows).
        base = next((c for c in _RANGE_LAYERS if isinstance(conv, c)), None)
        self.range_layer = base is not None and not self.compact and \
            type(conv).message_and_aggregate is base.message_and_aggregate

    def _by_ranges(self, conv: MessagePassing) -> bool:
        """Whether this call's aggregation is PyG's fused sum / mean, run as nothing else sees it (no
        explainer, no propagate or aggregation hooks)."""
        return self.range_layer and conv.fuse and not conv.explain and conv.aggr in _RANGE_AGGRS and \
            not any(getattr(conv, h) for h in _MP_HOOKS)

    def _halo_source(self, kept: Optional[torch.Tensor], pending, keep: bool, send_bits, recv_bits):
        """(peer_rows, reverse) of :class:`~.aggregate.HaloAggregate`: kept halo rows (nothing to send
        back: the input has no gradient), or those of a started exchange, fetched whole when kept."""
        ex = self.state.exchanger
        if keep:
            kept = ex.finish(pending)
            self.state.keep_halo(self.index, kept)
        if kept is not None:
            rows = ex.per_peer(kept)
            return (lambda: ((q, rows(q)) for q in range(self.state.shard.world_size))), None
        return (lambda: ex.peer_rows(pending)), (ex, send_bits, recv_bits)

    def _ranges_call(self, forward, conv, x, adj, arguments, source=None, keep_aggregate: bool = False,
                     aggregate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's call with its fused aggregation replaced, for this call only, by
        :class:`~.aggregate.HaloAggregate` over ``x`` (owned rows) and the halo rows of ``source``, or by the
        kept ``aggregate``. ``keep_aggregate``: the input and its halo rows are kept, so the aggregation
        made is kept too (:meth:`DistributedState.keep_aggregate`)."""
        if aggregate is None:
            peer_rows, reverse = source
            ranges = column_ranges(adj, self.state.shard.num_local, self.state.shard.plan.recv_counts,
                                   conv.aggr == "mean", x.dtype)
        # Stands for the owned + halo rows the layer would read: never read (NaN everywhere if it were).
        stand_in = x.new_full((), float("nan")).expand(adj.shape[1], x.shape[1])

        def message_and_aggregate(edge_index, *args, **kwargs):  # x (the pair), and GraphConv's edge_weight
            pair = args[0] if args else kwargs.get("x")
            if edge_index is not adj or pair is None or pair[0] is not stand_in:
                raise RuntimeError(f"{self.name}: the layer's aggregation was called with other inputs than the "
                                   f"layer's (exactq.distributed aggregates its halo rows by column ranges)")
            if aggregate is not None:
                return aggregate
            out = HaloAggregate.apply(x, peer_rows, ranges, reverse)
            if keep_aggregate:
                self.state.keep_aggregate(self.index, adj, conv.aggr, out)
            return out

        conv.message_and_aggregate = message_and_aggregate
        try:
            return self._call(forward, conv, stand_in, x, adj, arguments)
        finally:
            del conv.message_and_aggregate

    def _call(self, forward, conv, x_src, x_dst, edge_index, arguments) -> torch.Tensor:
        out = forward(conv, (x_src, x_dst) if self.bipartite else x_src, edge_index, **arguments)
        if not isinstance(out, torch.Tensor):
            raise NotImplementedError(f"{self.name}: exactq.distributed supports layers that return one tensor, "
                                      f"got {type(out).__name__}")
        # A slice's backward allocates a gradient of its whole input: none where nothing is cut off.
        return out if out.shape[0] == x_dst.shape[0] else out[:x_dst.shape[0]]

    def _arrived(self, halo: torch.Tensor, edge_index, observe: bool, keep: bool) -> None:
        """The received halo rows: auto bits measure them (``observe``), an unchanging input keeps them."""
        if observe:
            self.state.adaptive.observe(self.index, halo, edge_index)
        if keep:
            self.state.keep_halo(self.index, halo)

    def __call__(self, *args, **kwargs):
        conv, state = self.conv(), self.state
        shard = state.shard
        arguments = dict(self.signature.bind(conv, *args, **kwargs).arguments)
        del arguments["self"]
        x, edge_index = arguments.pop("x"), arguments.pop("edge_index")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != shard.num_local:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: x must be this rank's owned rows, a 2-D tensor with shard.num_local="
                             f"{shard.num_local} rows, got {got}")
        if arguments.get("size") is not None:
            raise NotImplementedError(f"{self.name}: an explicit size is not supported distributed")
        if arguments.get("return_attention_weights"):
            raise NotImplementedError(f"{self.name}: return_attention_weights is not supported distributed")
        # A torch.sparse adjacency (shard.sparse_adjacency()) aggregates by sparse matmul. A CSR read by a
        # layer that aggregates raw source rows is used as it is (overlap: its central and marginal rows are
        # slices of its arrays); otherwise the edge list behind it is cut and normalised as edge_index
        # would be, then turned back into CSR (cached).
        sparse = isinstance(edge_index, torch.Tensor) and edge_index.layout in (torch.sparse_csr, torch.sparse_coo)
        weights = None
        if sparse and not isinstance(conv, _SPARSE_LAYERS):
            raise NotImplementedError(f"{self.name}: a sparse adjacency is supported for "
                                      f"{', '.join(c.__name__ for c in _SPARSE_LAYERS)}; pass shard.edge_index")
        as_is = sparse and edge_index.layout == torch.sparse_csr and not self.compact and state.adaptive is None
        if as_is:
            state.check_adjacency(edge_index, self.name)
        elif sparse:
            edge_index, weights = state.edges_of(edge_index, self.name)
        else:
            state.check_edge_index(edge_index, self.name)
        forward = type(conv).forward
        if isinstance(conv, GCNConv) and conv.normalize:
            edge_index, weights = state.gcn_edges(conv, edge_index, weights if sparse else arguments.get("edge_weight"),
                                                  x.dtype, sparse)
            forward = _without_normalize(forward)
            arguments["edge_weight"] = None if sparse else weights
        # Every rank's model is in the same mode (train / eval), so every rank picks the same bits.
        send_bits, recv_bits = state.bits_for(self.index, conv.training)
        observe = state.adaptive is not None and conv.training
        # Not for an adjacency whose values require grad: the products are outside autograd.
        by_ranges = as_is and not edge_index.requires_grad and self._by_ranges(conv)
        kept, aggregate, keep = state.kept_halo(self.index, x, *((edge_index, conv.aggr) if by_ranges else ()))
        if keep:  # fetched once, exactly, for every later call with this input
            send_bits = recv_bits = (None,) * shard.world_size
            observe = False
        nc, nl, nh = shard.num_central, shard.num_local, shard.num_halo
        graph = (lambda ei, n_dst, n_src, at=None: state.csr(ei, weights, n_dst, n_src, at)) if sparse else \
            (lambda ei, n_dst, n_src, at=None: ei)
        if by_ranges:  # one call for all rows; overlap: the owned columns' product while the halo rows travel
            if aggregate is not None:
                return self._ranges_call(forward, conv, x, edge_index, arguments, aggregate=aggregate)
            pending = None if kept is not None else \
                state.exchanger.start(x, send_bits, recv_bits, async_op=state.overlap)
            return self._ranges_call(forward, conv, x, edge_index, arguments,
                                     self._halo_source(kept, pending, keep, send_bits, recv_bits),
                                     keep_aggregate=keep or kept is not None)
        if kept is not None or not self.overlap:  # nothing to overlap when the halo rows are here already
            x_full = torch.cat([x, kept]) if kept is not None else \
                exchange_halo(x, state.exchanger, send_bits, recv_bits)
            self._arrived(x_full[nl:], edge_index, observe, keep)
            return self._call(forward, conv, x_full, x, edge_index if as_is else graph(edge_index, nl, nl + nh),
                              arguments)
        # Overlap: start the exchange, aggregate the central nodes (no halo source) while it travels,
        # then the marginal ones.
        pending = state.exchanger.start(x, send_bits, recv_bits, async_op=True)
        if as_is:
            c_nodes = m_nodes = None
            c_graph, m_graph = state.csr_rows(edge_index)
            c_args = m_args = arguments
        else:
            split = state.split(edge_index, self.compact)
            c_nodes, m_nodes = split.c_nodes, split.m_nodes
            c_graph = graph(split.c_edge_index, nc, nl if c_nodes is None else c_nodes.numel(), split.c_edges)
            m_graph = graph(split.m_edge_index, nl - nc, nl + nh if m_nodes is None else m_nodes.numel(), split.m_edges)
            c_args, m_args = _edges(arguments, split.c_edges), _edges(arguments, split.m_edges)
        # One split, not two slices: its backward writes both parts' gradients into one tensor.
        x_central, x_marginal = torch.split(x, [nc, nl - nc])
        out_c = self._call(forward, conv, x if c_nodes is None else x[c_nodes], x_central, c_graph, c_args)
        x_full = exchange_halo(x, state.exchanger, send_bits, recv_bits, pending)
        self._arrived(x_full[nl:], edge_index, observe, keep)
        out_m = self._call(forward, conv, x_full if m_nodes is None else x_full[m_nodes], x_marginal, m_graph, m_args)
        return torch.cat([out_c, out_m])


def _edges(arguments: dict, positions: torch.Tensor) -> dict:
    return {k: (v[positions] if k in _EDGE_ARGS and isinstance(v, torch.Tensor) else v) for k, v in arguments.items()}


def _without_normalize(forward):
    def call(conv, *args, **kwargs):
        conv.normalize = False  # the edge weights passed are normalised already (global degrees)
        try:
            return forward(conv, *args, **kwargs)
        finally:
            conv.normalize = True
    return call


class _SyncBatchNorm(torch.autograd.Function):
    """Training batch norm with statistics over every rank's rows, differentiated as a whole, as torch's
    native batch norm: it saves only its input and the per-column statistics (a compression session
    keeps them exactly, as it keeps whatever a custom autograd Function saves), and its backward sums
    the two column sums it needs over the ranks in one all-reduce. Returns (y, mean, biased variance,
    row count over ranks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):  # type: ignore[override]
        sums = torch.cat([x.new_full((1,), float(x.shape[0])), x.sum(0)])
        dist.all_reduce(sums, group=group)
        count, mean = sums[0], sums[1:] / sums[0]
        # Two passes (mean, then centred squares) as a single-process batch norm: no cancellation. In
        # place where it can be: a row-sized temporary is as large as the layer's output.
        y = x - mean
        var = y.square().sum(0)
        dist.all_reduce(var, group=group)
        var /= count
        invstd = torch.rsqrt(var + eps)
        y.mul_(invstd)
        if weight is not None:
            y.mul_(weight).add_(bias)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = float(count), group
        count = count.clone()
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar, _gcount):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        xhat = (x - mean).mul_(invstd)
        local = torch.cat([gy.sum(0), (gy * xhat).sum(0)])  # d bias, d weight over this rank's rows
        c = mean.numel()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            total = local.clone()
            dist.all_reduce(total, group=ctx.group)
            scale = invstd if weight is None else invstd * weight
            # (gy - mean(gy) - xhat * mean(gy * xhat)) * scale, in xhat's memory.
            gx = xhat.mul_(-total[c:] / ctx.count).add_(gy).sub_(total[:c] / ctx.count).mul_(scale)
        # Parameter gradients stay this rank's share: the wrapper sums every parameter's over ranks.
        if weight is not None:
            gw, gb = local[c:], local[:c]
        return gx, gw, gb, None, None


class _GlobalBatchNorm:
    """Batch norm whose training statistics are over all ranks' rows (installed as the forward)."""

    def __init__(self, state: DistributedState, bn: torch.nn.modules.batchnorm._BatchNorm):
        self.group = state.group
        self.bn = weakref.ref(bn)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn()
        if x.dim() != 2:
            raise ValueError(f"exactq.distributed: batch norm over node rows needs a 2-D input, got {tuple(x.shape)}")
        if not (bn.training or not bn.track_running_stats):
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        y, mean, var, count = _SyncBatchNorm.apply(x, bn.weight if bn.affine else None,
                                                   bn.bias if bn.affine else None, bn.eps, self.group)
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked += 1
                f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                n = float(count)
                bn.running_mean.mul_(1 - f).add_(mean, alpha=f)
                bn.running_var.mul_(1 - f).add_(var * (n / max(n - 1, 1.0)), alpha=f)
        return y


class _GradientSync:
    """Sums every parameter's gradient over ranks at the end of each backward (what this backward
    added, so gradient accumulation over several backwards stays right)."""

    def __init__(self, params: List[torch.nn.Parameter], group):
        self.params, self.group = params, group
        self.before: Optional[List[Optional[torch.Tensor]]] = None
        self.handles = [p.register_hook(self._hook) for p in params]

    def _hook(self, grad):
        if self.before is None:  # first parameter of this backward: nothing accumulated yet
            self.before = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
            torch.autograd.Variable._execution_engine.queue_callback(self._sync)
        return grad

    def _sync(self) -> None:
        before, self.before = self.before, None
        new = [torch.zeros_like(p) if p.grad is None else (p.grad if b is None else p.grad - b)
               for p, b in zip(self.params, before)]
        has = torch.tensor([float(p.grad is not None) for p in self.params], dtype=new[0].dtype,
                           device=new[0].device)
        flat = torch.cat([t.reshape(-1) for t in new] + [has])
        dist.all_reduce(flat, group=self.group)
        offsets = [0]
        for t in new:
            offsets.append(offsets[-1] + t.numel())
        for i, (p, b) in enumerate(zip(self.params, before)):
            if float(flat[offsets[-1] + i]) == 0:
                continue  # no rank has a gradient for it: left None, as on one process
            total = flat[offsets[i]:offsets[i + 1]].view_as(p)
            p.grad = total.clone() if b is None else b + total

    def forward_started(self, module, args) -> None:
        self.before = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check_module(name: str, module: torch.nn.Module, inside_layer: bool) -> None:
    if isinstance(module, MessagePassing) and not isinstance(module, SUPPORTED_LAYERS):
        raise NotImplementedError(
            f"exactq.distributed cannot distribute {name} ({type(module).__name__}): supported message-passing "
            f"layers are {', '.join(c.__name__ for c in SUPPORTED_LAYERS)} (one propagation whose output for a "
            f"node reads only its in-edges and in-neighbours)")
    if isinstance(module, SUPPORTED_LAYERS):
        base = next(c for c in type(module).__mro__ if c in SUPPORTED_LAYERS)
        if type(module).forward is not base.forward:  # it could propagate twice, or read other nodes' rows
            raise NotImplementedError(
                f"exactq.distributed cannot distribute {name} ({type(module).__name__}): it overrides "
                f"{base.__name__}.forward, which the distributed call replaces; keep a {base.__name__} as a "
                f"submodule instead")
        if module.flow != "source_to_target":
            raise NotImplementedError(
                f"exactq.distributed cannot distribute {name} ({type(module).__name__}) with flow={module.flow!r}: a "
                f"shard holds its nodes' in-edges; flip the graph's edge_index before partitioning instead")
    if isinstance(module, pyg_aggr.Aggregation) and inside_layer and type(module) not in SUPPORTED_AGGREGATIONS:
        raise NotImplementedError(
            f"exactq.distributed cannot distribute {name} ({type(module).__name__}): its result for a node depends "
            f"on more than that node's messages as a set (their order, or the other nodes aggregated in the same "
            f"call); supported aggregations are {', '.join(c.__name__ for c in SUPPORTED_AGGREGATIONS[:-1])}")
    if isinstance(module, _GLOBAL_MODULES) or (isinstance(module, pyg_norm.LayerNorm) and module.mode == "graph"):
        raise NotImplementedError(f"exactq.distributed cannot distribute {name} ({type(module).__name__}): it mixes "
                                  f"rows across the whole graph")
    if isinstance(module, pyg_aggr.Aggregation) and not inside_layer:
        raise NotImplementedError(f"exactq.distributed cannot distribute {name} ({type(module).__name__}) outside a "
                                  f"message-passing layer: graph-level pooling over a sharded graph is not supported")
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, torch.nn.BatchNorm1d):
        raise NotImplementedError(f"exactq.distributed: {name} ({type(module).__name__}) is not supported; batch "
                                  f"norm over node rows is BatchNorm1d")


def wrap(model: torch.nn.Module, shard: GraphShard, message_bits=2, overlap: bool = True, group=None,
         auto_every: int = 10, eval_message_bits=None, keep_inputs: bool = True) -> torch.nn.Module:
    """Makes an unchanged PyG model train on one rank's shard of a partitioned graph.

    After wrapping, ``model(shard.x, shard.edge_index)`` (the model's usual call on the shard) returns
    rows for the owned nodes; every supported message-passing layer first receives its input's halo
    rows from the ranks that own them. Write each rank's loss as its share of the full-graph loss
    (e.g. ``F.cross_entropy(out[m], y[m], reduction="sum") / shard.global_counts["train_mask"]``):
    the ranks' losses then sum to the full-graph loss, and after ``backward`` every rank holds the
    summed (full-graph) parameter gradients.

    Args:
        model: a PyG model whose message-passing layers are among ``SUPPORTED_LAYERS`` (their own
            classes, or subclasses that keep their ``forward``), aggregating over in-edges with one of
            ``SUPPORTED_AGGREGATIONS``; batch norm (``BatchNorm1d``, PyG's ``BatchNorm``) uses global
            statistics. Anything else that would not equal one process is refused (NotImplementedError).
        shard: this rank's :class:`GraphShard` (``shard.rank`` must be the process group rank).
        message_bits: ``None`` (exact float messages), 1, 2, 4 or 8 (quantized, unbiased), or
            ``"auto"`` (2/4/8 chosen per layer and link, see :mod:`exactq.distributed.adaptive`).
        overlap: aggregate nodes without remote in-neighbours while the halo rows travel (a layer that
            aggregates by column ranges: every row's owned-source part while they travel, and in backward
            the owned rows' gradient while the halo gradients travel back).
        group: the process group (default: the world).
        auto_every: with ``"auto"``, re-solve the bit assignment every this many training forwards.
        eval_message_bits: the messages of forwards in eval mode (``model.eval()``): ``None`` (exact, the
            default: validation and test see no rounding noise, as AdaQP evaluates), 1, 2, 4 or 8. Training
            forwards use ``message_bits``.
        keep_inputs: a layer input that does not change between calls (the features: the same tensor,
            not modified, without gradient, on every rank) has its halo rows fetched once, exactly (at
            its second call), and kept, instead of sent every call: its messages and their rounding
            noise are gone, for the memory of its halo rows (of its aggregation instead, owned rows x
            width, for a layer aggregated by column ranges, which then skips that product too). Costs
            one small all-reduce per layer call.

    Returns:
        ``model`` itself; :func:`exchange_stats` reads its counters, :func:`unwrap` undoes it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(shard, GraphShard):
        raise TypeError(f"shard must be an exactq.distributed.GraphShard, got {type(shard).__name__}")
    check_message_bits(message_bits)
    check_message_bits(eval_message_bits, allow_auto=False, name="eval_message_bits")
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool, got {overlap!r}")
    if not isinstance(keep_inputs, bool):
        raise TypeError(f"keep_inputs must be a bool, got {keep_inputs!r}")
    if isinstance(auto_every, bool) or not isinstance(auto_every, int) or auto_every < 1:
        raise ValueError(f"auto_every must be an int >= 1, got {auto_every!r}")
    if hasattr(model, _ATTR):
        raise ValueError("model is already wrapped by exactq.distributed.wrap")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("exactq.distributed.wrap needs an initialised process group: call "
                           "torch.distributed.init_process_group first (or launch with torchrun / "
                           "`python -m exactq distributed`)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if shard.world_size != world:
        raise ValueError(f"shard is part {shard.rank} of a {shard.world_size}-part partition, but the process "
                         f"group has {world} ranks")
    if shard.rank != rank:
        raise ValueError(f"shard is part {shard.rank}, but this process is rank {rank} of the group")
    layer_modules = {id(m) for layer in model.modules() if isinstance(layer, MessagePassing)
                     for m in layer.modules() if m is not layer}
    for name, module in model.named_modules():
        _check_module(name or type(model).__name__, module, id(module) in layer_modules)
    ids = [None] * world
    dist.all_gather_object(ids, (shard.partition_id, keep_inputs), group=group)
    if len({i for i, _ in ids}) != 1:
        raise ValueError(f"the ranks' shards come from different partitions ({[i for i, _ in ids]}): every rank "
                         f"must load its shard from the same partition")
    if len({k for _, k in ids}) != 1:  # the ranks agree on kept inputs by a collective that all must make
        raise ValueError(f"keep_inputs differs between ranks ({[k for _, k in ids]}): pass the same on every rank")
    state = DistributedState(shard, group, message_bits, overlap, eval_message_bits, keep_inputs)
    for module in model.modules():
        if isinstance(module, MessagePassing):
            state.layers.append(type(module).__name__)
            module.forward = _DistributedLayer(state, module, len(state.layers) - 1)
        elif isinstance(module, torch.nn.BatchNorm1d):
            module.forward = _GlobalBatchNorm(state, module)
    if message_bits == "auto":
        from .adaptive import AdaptiveBits
        state.adaptive = AdaptiveBits(state, every=auto_every)
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        sync = _GradientSync(params, group)
        state.hooks.append(sync)
        # A backward that raised never ran its callback: a new forward starts the next backward afresh.
        state.hooks.append(model.register_forward_pre_hook(sync.forward_started))
    setattr(model, _ATTR, state)
    log.info("exactq.distributed: rank %d/%d wraps %d message-passing layers (%s), message_bits=%s "
             "(eval: %s), overlap=%s", rank, world, len(state.layers), ", ".join(state.layers), message_bits,
             eval_message_bits, overlap)
    return model


def state_of(model: torch.nn.Module) -> DistributedState:
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ValueError("model is not wrapped by exactq.distributed.wrap")
    return state


def exchange_stats(model: torch.nn.Module) -> ExchangeStats:
    """The exchange counters (bytes sent, fp32 bytes, blocked seconds) of a wrapped model; ``reset()``
    them at the start of what you measure."""
    return state_of(model).stats


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes :func:`wrap`: original forwards back, gradient hooks removed."""
    state = state_of(model)
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), (_DistributedLayer, _GlobalBatchNorm)):
            del module.forward
    for h in state.hooks:
        h.remove()
    delattr(model, _ATTR)
    return model
