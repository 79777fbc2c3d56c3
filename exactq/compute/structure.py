"""What an INT8 sparse product needs of a graph besides its values, derived once per graph.

A CSR adjacency's backward product runs on its transpose (a CSR of ``A^T``): the permutation that
sorts its entries by column, and the transposed row pointers. PyG rebuilds the adjacency in every
forward (GCN's normalisation adds self-loops to a new tensor), so a derived structure is found again by
*content*: an entry is reused only for index tensors equal to the ones it was built from (checked with
``torch.equal``, a pass over the indices, far cheaper than the sort it saves), never by address alone.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Dict, Optional

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


def build(crow: torch.Tensor, col: torch.Tensor, cols: int) -> Structure:
    """The :class:`Structure` of the CSR matrix (``crow``, ``col``) with ``cols`` columns."""
    crow, col = crow.long().contiguous(), col.long().contiguous()
    rows = crow.numel() - 1
    counts = crow[1:] - crow[:-1]
    row_of_entry = torch.repeat_interleave(torch.arange(rows, device=col.device), counts)
    perm = torch.argsort(col, stable=True)
    t_counts = torch.bincount(col, minlength=cols)
    t_crow = torch.zeros(cols + 1, dtype=torch.int64, device=col.device)
    torch.cumsum(t_counts, 0, out=t_crow[1:])
    # Cloned: the cache must not keep views of a caller's tensors that the caller may modify in place.
    return Structure(crow.clone(memory_format=torch.contiguous_format), col.clone(memory_format=torch.contiguous_format), cols, perm, t_crow, row_of_entry[perm].contiguous(),
                     counts.to(torch.float32))


class StructureCache:
    """The last few :class:`Structure` s built, found again by content (see the module docstring).
    Derived data, like PyG's ``cached=True`` normalisation: it holds no configuration."""

    def __init__(self, size: int = 4) -> None:
        self._entries: "collections.OrderedDict[int, Structure]" = collections.OrderedDict()
        self._size = size
        self._next = 0

    def get(self, crow: torch.Tensor, col: torch.Tensor, cols: int) -> Structure:
        for key, s in self._entries.items():
            if s.matches(crow, col, cols):
                self._entries.move_to_end(key)
                return s
        s = build(crow, col, cols)
        self._entries[self._next] = s
        self._next += 1
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return s

    def clear(self) -> None:
        self._entries.clear()


STRUCTURES = StructureCache()


def structure_of(adj: torch.Tensor) -> Optional[Structure]:
    """The cached structure of a 2-D ``torch.sparse_csr`` tensor (``None`` for any other layout)."""
    if adj.layout != torch.sparse_csr or adj.dim() != 2:
        return None
    return STRUCTURES.get(adj.crow_indices(), adj.col_indices(), adj.shape[1])
