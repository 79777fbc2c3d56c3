"""Aggregations over an ``edge_index`` run as sparse products on the graph's cached CSR.

A PyG layer whose message is its source row, or that row times a per-edge weight, sums the same terms
whether PyG gathers and scatters over ``edge_index`` or runs the layer's fused ``message_and_aggregate``,
``spmm(adj_t, x)``, on the CSR of ``A^T`` whose values are those weights. :data:`SUM_OF_MESSAGES`
lists the layers for which both hold; inside a compute session, a propagate pre-hook hands such a layer
its ``edge_index``'s CSR (built once per graph by :data:`~.structure.EDGE_INDEX_CSRS`) so PyG takes its
fused path, whose ``torch.sparse.mm`` the session runs in int8. Other layers, and layers whose weights
need a gradient, keep PyG's path; each propagate is counted in the report either way.

Attention layers (:data:`ATTENTION_MESSAGES`: message ``alpha.unsqueeze(-1) * x_j`` with per-head weights
that need a gradient) have no fused path in PyG, so the routing stands in for their ``propagate`` while the
session lasts: the same CSR, and :func:`~.functional.attention_spmm` (int8 aggregation, SDDMM for the
weights' gradient) instead of PyG's gathered ``[E, heads, C]`` messages.
"""
from __future__ import annotations

import functools
import threading
import warnings
import weakref
from typing import Any, Dict, Optional, Tuple

import torch

from .functional import Hooks, attention_spmm
from .structure import EDGE_INDEX_CSRS, structure_of

# Layer class -> the propagate argument that weights each message (None: the message is x_j). Each has
# ``message`` = ``x_j`` or ``weight.view(-1, 1) * x_j`` and ``message_and_aggregate`` =
# ``spmm(adj_t, x or x[0], reduce=self.aggr)``; tests/test_compute.py checks every entry against PyG's
# edge_index path. A subclass that overrides either method is not covered.
SUM_OF_MESSAGES: Dict[str, Optional[str]] = {
    "GCNConv": "edge_weight", "GraphConv": "edge_weight", "SAGEConv": None, "GINConv": None,
    "SGConv": "edge_weight", "SSGConv": "edge_weight", "TAGConv": "edge_weight", "APPNP": "edge_weight",
    "LGConv": "edge_weight", "GCN2Conv": "edge_weight", "GatedGraphConv": "edge_weight",
    "ClusterGCNConv": "edge_weight", "MFConv": None, "SimpleConv": "edge_weight", "MixHopConv": "edge_weight",
}
# Layer class -> the propagate argument holding the per-edge, per-head weights (``[E, heads]``) of a
# message ``alpha.unsqueeze(-1) * x_j`` (``x_j``: ``[E, heads, C]``), summed over each target.
ATTENTION_MESSAGES: Dict[str, str] = {"GATConv": "alpha", "GATv2Conv": "alpha"}
_FUSED_REDUCE = ("add", "sum", "mean")  # what the int8 product serves


def _covered(layer: Any, table: Dict[str, Any] = SUM_OF_MESSAGES,
             methods: Tuple[str, ...] = ("message", "message_and_aggregate", "aggregate")) -> Tuple[bool, Any]:
    """Whether ``layer``'s class is in ``table`` with the methods it was checked with, and its entry."""
    import torch_geometric.nn.conv as conv

    for cls in type(layer).__mro__:
        name = cls.__name__
        if name in table and getattr(conv, name, None) is cls:
            return all(getattr(type(layer), m) is getattr(cls, m) for m in methods), table[name]
    return False, None


def _attention_layer(layer: Any) -> bool:
    return _covered(layer, ATTENTION_MESSAGES, ("message", "aggregate", "update", "propagate"))[0]


def _hooked(layer: Any) -> bool:
    """Whether the user registered hooks that PyG's own propagate would run and a fused path would not."""
    return any(len(h) for h in (layer._message_forward_pre_hooks, layer._message_forward_hooks,
                                layer._aggregate_forward_pre_hooks, layer._aggregate_forward_hooks))


def _why_not(layer: Any, edge_index: Any, kwargs: Dict[str, Any]) -> Optional[str]:
    if type(edge_index) is not torch.Tensor or edge_index.dim() != 2 or edge_index.shape[0] != 2 \
            or edge_index.dtype not in (torch.int32, torch.int64):
        return None  # already sparse (or not a plain edge_index): PyG's own dispatch is right
    covered, weight_name = _covered(layer)
    if not covered:
        return f"{type(layer).__name__}: messages are not a weighted sum of source rows"
    if layer.explain or layer.decomposed_layers != 1 or layer.flow != "source_to_target":
        return "explain, decomposed layers or target_to_source flow"
    if not (isinstance(layer.aggr, str) and layer.aggr in _FUSED_REDUCE and layer.fuse):
        return f"aggr={layer.aggr!r}"
    if _hooked(layer):
        return "message or aggregate hooks registered"
    weight = kwargs.get(weight_name) if weight_name else None
    if weight is not None and (weight.requires_grad or weight.dim() != 1 or not weight.is_floating_point()):
        return "edge weights require a gradient or are not one float per edge"
    return ""


def _sizes(layer: Any, size: Any, x: Any, dims: int = 2) -> Optional[Tuple[int, int]]:
    """(sources, targets) as PyG's collect would set them for ``dims``-dimensional node features with nodes
    first, or ``None`` where it cannot be told here."""
    src, dst = (x[0], x[1]) if isinstance(x, (tuple, list)) and len(x) == 2 else (x, None)
    if not isinstance(src, torch.Tensor) or src.dim() != dims or layer.node_dim not in (0, -dims):
        return None
    sizes = [src.shape[0], dst.shape[0] if isinstance(dst, torch.Tensor) else None]
    for i, given in enumerate(size if size is not None else (None, None)):
        if given is not None:
            if sizes[i] is not None and sizes[i] != given:
                return None  # PyG raises its own error about the mismatch
            sizes[i] = given
    return sizes[0], sizes[1] if sizes[1] is not None else sizes[0]


def as_sparse(layer: Any, edge_index: Any, size: Any, kwargs: Dict[str, Any],
              hooks: Hooks) -> Optional[Tuple[torch.Tensor, None, Dict[str, Any]]]:
    """A propagate pre-hook's result for ``layer``: its ``edge_index`` replaced by the cached CSR of
    ``A^T`` (values: the message weights in CSR order), or ``None`` to keep PyG's path."""
    reason = _why_not(layer, edge_index, kwargs)
    if reason is None:
        return None
    if reason == "":
        sizes = _sizes(layer, size, kwargs.get("x"))
        csr = EDGE_INDEX_CSRS.get(edge_index, *sizes) if sizes is not None else None
        if csr is None:
            reason = "node counts not known or indices out of range"
    if reason:
        hooks.note("edge_index aggregation", f"fp32 gather/scatter: {reason}")
        return None
    _, weight_name = _covered(layer)
    weight = kwargs.get(weight_name) if weight_name else None
    s = csr.structure
    values = csr.values(weight.detach().float() if weight is not None else None)
    hooks.note("edge_index aggregation", "sparse product on the cached CSR")
    with warnings.catch_warnings():  # torch's "CSR support is in beta" notice, about exactq's own tensor
        warnings.simplefilter("ignore", UserWarning)
        adj_t = torch.sparse_csr_tensor(s.crow, s.col, values, (s.rows, s.cols), check_invariants=False)
    return adj_t, None, kwargs


def attention_propagate(layer: Any, hooks: Hooks, edge_index: Any, size: Any = None, **kwargs: Any) -> Any:
    """An attention layer's ``propagate`` on int8 (see the module docstring), or PyG's own where it cannot
    serve (counted with the reason)."""
    x, alpha = kwargs.get("x"), kwargs.get(ATTENTION_MESSAGES[type(layer).__name__])
    reason = None
    csr_adj = isinstance(edge_index, torch.Tensor) and edge_index.layout == torch.sparse_csr  # entries in CSR order
    if not csr_adj and (type(edge_index) is not torch.Tensor or edge_index.dim() != 2 or edge_index.shape[0] != 2):
        reason = "neither an edge_index nor a torch.sparse CSR adjacency"
    elif layer.explain or layer.decomposed_layers != 1 or layer.flow != "source_to_target" \
            or layer.aggr not in ("add", "sum") or _hooked(layer) or len(layer._propagate_forward_pre_hooks) \
            or len(layer._propagate_forward_hooks):
        reason = "explain, decomposed layers, flow, aggr or hooks"
    elif not (isinstance(x, (tuple, list)) and isinstance(x[0], torch.Tensor) and x[0].dim() == 3
              and isinstance(alpha, torch.Tensor) and alpha.dim() == 2):
        reason = "inputs other than x [N, heads, C], alpha [E, heads]"
    out = None
    if reason is None and csr_adj:
        out = attention_spmm(structure_of(edge_index), alpha, x[0], hooks)  # None: counted by attention_spmm
    elif reason is None:
        sizes = _sizes(layer, size, x, dims=3)
        csr = EDGE_INDEX_CSRS.get(edge_index, *sizes) if sizes is not None else None
        if csr is None:
            reason = "node counts not known or indices out of range"
        else:
            values = alpha if csr.order is None else alpha[csr.order]
            out = attention_spmm(csr.structure, values, x[0], hooks)
    if out is None:
        if reason is not None:
            hooks.note("edge_index aggregation", f"fp32 gather/scatter: {reason}")
        return type(layer).propagate(layer, edge_index, size=size, **kwargs)
    hooks.note("sparse aggregation" if csr_adj else "edge_index aggregation", "attention product on the cached CSR")
    return out


class EdgeIndexRouting:
    """While entered, every covered PyG layer called in this thread aggregates through :func:`as_sparse`
    or :func:`attention_propagate`: a global module pre-hook gives each ``MessagePassing`` layer it meets a
    propagate pre-hook, or an attention layer a stand-in ``propagate``, both removed when the routing exits."""

    def __init__(self, hooks: Hooks, active: Any) -> None:
        self.hooks = hooks
        self.active = active  # () -> bool: whether the session routes now (not compiling, no autocast)
        self._thread = threading.get_ident()
        self._layers: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()
        self._global: Optional[Any] = None

    def __enter__(self) -> "EdgeIndexRouting":
        self._global = torch.nn.modules.module.register_module_forward_pre_hook(self._on_module)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._global.remove()
        for handle in list(self._layers.values()):
            handle.remove()
        self._layers.clear()

    def _on_module(self, module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or module in self._layers or threading.get_ident() != self._thread:
            return
        from torch_geometric.nn.conv import MessagePassing

        if not isinstance(module, MessagePassing):
            return
        if _attention_layer(module):
            module.__dict__["propagate"] = functools.partial(self._on_attention, module)
            self._layers[module] = _StandIn(module)
        else:
            self._layers[module] = module.register_propagate_forward_pre_hook(self._on_propagate)

    def _on_propagate(self, layer: Any, inputs: Tuple[Any, Any, Dict[str, Any]]) -> Any:
        if threading.get_ident() != self._thread or not self.active():
            return None
        return as_sparse(layer, *inputs, self.hooks)

    def _on_attention(self, layer: Any, edge_index: Any, size: Any = None, **kwargs: Any) -> Any:
        if not self.active() or threading.get_ident() != self._thread:  # active() first: Dynamo traces it
            return type(layer).propagate(layer, edge_index, size=size, **kwargs)
        return attention_propagate(layer, self.hooks, edge_index, size, **kwargs)


class _StandIn:
    """Removes an attention layer's stand-in ``propagate`` (its class's method shows through again)."""

    def __init__(self, layer: Any) -> None:
        self.layer = weakref.ref(layer)

    def remove(self) -> None:
        layer = self.layer()
        if layer is not None:
            layer.__dict__.pop("propagate", None)
