"""What an INT8 sparse product needs of a graph besides its values, derived once per graph.

A CSR adjacency's backward product runs on its transpose (a CSR of ``A^T``): the permutation that
sorts its entries by column, and the transposed row pointers. PyG rebuilds the adjacency in every
forward (GCN's normalisation adds self-loops to a new tensor), so a derived structure is found again by
*content*: an entry is reused only for index tensors equal to the ones it was built from (checked with
``torch.equal``, a pass over the indices, far cheaper than the sort it saves), never by address alone.
An ``edge_index`` gets its CSR (targets as rows, PyG's ``adj_t``) the same way (:data:`EDGE_INDEX_CSRS`).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class Structure:
    """Index structure of a CSR matrix ``A`` (``rows x cols``) and of its transpose.

    ``perm`` orders ``A``'s entries by column (stable), so ``values[perm]`` are ``A^T``'s values in its
    CSR order; ``t_crow`` / ``t_col`` are ``A^T``'s row pointers and column indices; ``degree`` is the
    number of entries per row of ``A`` (float32, for ``mean``)."""

    crow: torch.Tensor
    col: torch.Tensor
    cols: int
    perm: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor
    degree: torch.Tensor
    derived: Dict[str, torch.Tensor] = field(default_factory=dict, compare=False)  # made on first use

    @property
    def mean_transpose_weight(self) -> torch.Tensor:
        """``A^T``'s entries for a ``mean`` product's backward: ``1 / degree`` of each entry's row of ``A``."""
        if "mean_t" not in self.derived:
            self.derived["mean_t"] = (1.0 / self.degree.clamp(min=1))[self.t_col].contiguous()
        return self.derived["mean_t"]

    @property
    def rows(self) -> int:
        return self.crow.numel() - 1

    def matches(self, crow: torch.Tensor, col: torch.Tensor, cols: int) -> bool:
        if cols != self.cols or crow.shape != self.crow.shape or col.shape != self.col.shape:
            return False
        if crow.device != self.crow.device:
            return False
        crow, col = crow.long(), col.long()
        same = crow.data_ptr() == self.crow.data_ptr() and col.data_ptr() == self.col.data_ptr()
        return same or (torch.equal(crow, self.crow) and torch.equal(col, self.col))


def build(crow: torch.Tensor, col: torch.Tensor, cols: int, owned: bool = False) -> Structure:
    """The :class:`Structure` of the CSR matrix (``crow``, ``col``) with ``cols`` columns; ``owned``: the
    index tensors are the caller's to give away (not copied)."""
    crow, col = crow.long().contiguous(), col.long().contiguous()
    rows = crow.numel() - 1
    counts = crow[1:] - crow[:-1]
    row_of_entry = torch.repeat_interleave(torch.arange(rows, device=col.device), counts)
    perm = torch.argsort(col, stable=True)
    t_counts = torch.bincount(col, minlength=cols)
    t_crow = torch.zeros(cols + 1, dtype=torch.int64, device=col.device)
    torch.cumsum(t_counts, 0, out=t_crow[1:])
    if not owned:  # the cache must not keep a caller's tensors, which the caller may modify in place
        crow, col = crow.clone(memory_format=torch.contiguous_format), col.clone(memory_format=torch.contiguous_format)
    return Structure(crow, col, cols, perm, t_crow, row_of_entry[perm].contiguous(), counts.to(torch.float32))


class _Recent:
    """The last few derived entries, found again by a ``matches`` test (see the module docstring).
    Derived data, like PyG's ``cached=True`` normalisation: it holds no configuration."""

    def __init__(self, size: int = 4) -> None:
        self._entries: "collections.OrderedDict[int, Any]" = collections.OrderedDict()
        self._size = size
        self._next = 0

    def find(self, matches: Callable[[Any], bool], make: Callable[[], Any]) -> Any:
        """The entry that ``matches``, else ``make()``'s (kept unless it is ``None``)."""
        for key, entry in self._entries.items():
            if matches(entry):
                self._entries.move_to_end(key)
                return entry
        entry = make()
        if entry is None:
            return None
        self._entries[self._next] = entry
        self._next += 1
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def mark(self) -> int:
        """A mark of this cache's state: :meth:`since` gives the entries made after it."""
        return self._next

    def since(self, mark: int) -> list:
        """The entries made after ``mark`` that the cache still holds."""
        return [e for k, e in self._entries.items() if k >= mark]


class StructureCache(_Recent):
    """:class:`Structure` s of the last few CSR matrices, found again by content."""

    def get(self, crow: torch.Tensor, col: torch.Tensor, cols: int, owned: bool = False) -> Structure:
        return self.find(lambda s: s.matches(crow, col, cols), lambda: build(crow, col, cols, owned))


STRUCTURES = StructureCache()


def structure_of(adj: torch.Tensor) -> Optional[Structure]:
    """The cached structure of a 2-D ``torch.sparse_csr`` tensor (``None`` for any other layout)."""
    if adj.layout != torch.sparse_csr or adj.dim() != 2:
        return None
    return STRUCTURES.get(adj.crow_indices(), adj.col_indices(), adj.shape[1])


@dataclass(frozen=True)
class EdgeCSR:
    """The CSR of ``A^T`` (rows = targets, PyG's ``adj_t``) for an ``edge_index`` of source -> target edges:
    ``structure`` its (cached) :class:`Structure`, ``order`` the edge positions in CSR order (``None``
    when ``edge_index`` is already sorted by target), ``key`` the ``edge_index`` it was built from."""

    key: torch.Tensor
    structure: Structure
    order: Optional[torch.Tensor]

    def matches(self, edge_index: torch.Tensor, sources: int, targets: int) -> bool:
        s = self.structure
        return (s.cols == sources and s.rows == targets and edge_index.shape == self.key.shape
                and edge_index.device == self.key.device and torch.equal(edge_index, self.key))

    def values(self, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-edge ``weight`` in CSR order, or the structure's unit values (see :func:`unit_values`)."""
        if weight is None:
            return unit_values(self.structure)
        return weight if self.order is None else weight[self.order]


def unit_values(s: Structure) -> torch.Tensor:
    """A ones vector, one per entry of ``s``, made once; a product whose values are this tensor is known
    to be unweighted without a pass over them."""
    if "ones" not in s.derived:
        s.derived["ones"] = torch.ones(s.col.numel(), device=s.col.device)
    return s.derived["ones"]


def is_unit(s: Structure, values: torch.Tensor) -> bool:
    """Whether ``values`` are :func:`unit_values` of ``s`` (the same memory, not merely equal)."""
    unit = s.derived.get("ones")
    return unit is not None and values.data_ptr() == unit.data_ptr() and values.numel() == unit.numel()


class EdgeIndexCache(_Recent):
    """:class:`EdgeCSR` s of the last few ``edge_index`` tensors, found again by content."""

    def get(self, edge_index: torch.Tensor, sources: int, targets: int) -> Optional[EdgeCSR]:
        """The CSR of ``edge_index`` (``[2, E]``, sources in row 0) with ``sources`` columns and ``targets``
        rows; ``None`` if an index is out of that range (the caller keeps PyG's path, which reports it)."""
        return self.find(lambda e: e.matches(edge_index, sources, targets),
                         lambda: _edge_csr(edge_index, sources, targets))


def _edge_csr(edge_index: torch.Tensor, sources: int, targets: int) -> Optional[EdgeCSR]:
    src, dst = edge_index[0].long(), edge_index[1].long()
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(src.max()) >= sources or int(dst.max()) >= targets):
        return None
    order = None if bool((dst[1:] >= dst[:-1]).all()) else torch.argsort(dst, stable=True)
    col = src.clone(memory_format=torch.contiguous_format) if order is None else src[order]  # never the caller's
    crow = torch.zeros(targets + 1, dtype=torch.int64, device=edge_index.device)
    torch.cumsum(torch.bincount(dst, minlength=targets), 0, out=crow[1:])
    return EdgeCSR(edge_index.clone(memory_format=torch.contiguous_format), STRUCTURES.get(crow, col, sources, True),
                   order)


EDGE_INDEX_CSRS = EdgeIndexCache()


def cache_mark() -> Tuple[int, int]:
    """Where the graph-structure caches stand now (for :func:`cached_bytes_since`)."""
    return STRUCTURES.mark(), EDGE_INDEX_CSRS.mark()


def cached_bytes_since(mark: Tuple[int, int]) -> int:
    """Bytes of the graph structures built since ``mark`` that the caches still hold: graph memory, made
    once per graph and reused by later forwards and sessions (not activations)."""
    def nbytes(*ts: Optional[torch.Tensor]) -> int:
        return sum(t.untyped_storage().nbytes() for t in ts if t is not None)
    structures, edge_csrs = STRUCTURES.since(mark[0]), EDGE_INDEX_CSRS.since(mark[1])
    return (sum(nbytes(s.crow, s.col, s.perm, s.t_crow, s.t_col, s.degree, *s.derived.values()) for s in structures)
            + sum(nbytes(e.key, e.order) for e in edge_csrs))
