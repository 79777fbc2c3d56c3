"""Gathered activations: tensors whose rows are copies of another tensor's rows, picked by an index.

Message passing copies each node's row once per edge (``x.index_select(0, edge_index[0])``, PyG's
``x_j``), and some layers combine such copies (PNA's ``cat([x_i, x_j], -1)``, EdgeConv's
``cat([x_i, x_j - x_i], -1)``). Quantized as they
are, the copies of one row round independently, so a gradient term that cancels over a node's edges in
fp32 (a std aggregator's ``sum_e (h_e - mean)``) keeps the rounding noise of every copy. Stored as
their source and the index instead (autograd holds the index anyway), all copies of a row restore to
one value, as in fp32; the copies cost nothing beyond the source, and a source that is an input or a
parameter restores exactly.

:class:`GatherLog` records each gather, and each concatenation, sum or difference of recorded outputs,
as its op returns; when a saved tensor is such an output or a view of one, :meth:`GatherLog.recipe`
gives its :class:`Recipe`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from .memory import StorageKeyed, storage_id

_CATS = frozenset({"cat", "concat", "concatenate"})
_SIGNS = {"add": 1, "__add__": 1, "sub": -1, "__sub__": -1, "subtract": -1}  # a + sign * b
_OPS = frozenset({"index_select", "__getitem__", *_CATS, *_SIGNS})


@dataclass(frozen=True)
class Select:
    """``sources[source].index_select(dim, index)``."""

    source: int
    dim: int
    index: torch.Tensor


@dataclass(frozen=True)
class Cat:
    parts: Tuple["Node", ...]
    dim: int


@dataclass(frozen=True)
class Sum:
    """``a + sign * b`` (EdgeConv's ``x_j - x_i``)."""

    a: "Node"
    b: "Node"
    sign: int


Node = Union[Select, Cat, Sum]


@dataclass(frozen=True)
class Recipe:
    """How to rebuild a saved tensor from its sources: ``tree`` rebuilds the contiguous output the
    log recorded (shape ``shape``); the saved tensor is its view at ``offset`` with ``size`` and
    ``stride``. Sources are referred to by position, so the recipe holds none of them."""

    tree: Node
    shape: torch.Size
    offset: int
    size: torch.Size
    stride: Tuple[int, ...]

    def indices(self) -> List[torch.Tensor]:
        return _indices(self.tree)

    def build(self, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        out = _build(self.tree, sources)
        if out.shape == self.size and out.stride() == self.stride and self.offset == 0:
            return out
        return out.as_strided(self.size, self.stride, self.offset)


def _children(node: Node) -> Tuple[Node, ...]:
    return () if isinstance(node, Select) else node.parts if isinstance(node, Cat) else (node.a, node.b)


def _indices(node: Node) -> List[torch.Tensor]:
    return [node.index] if isinstance(node, Select) else [i for p in _children(node) for i in _indices(p)]


def _build(node: Node, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(node, Select):
        return sources[node.source].index_select(node.dim, node.index)
    if isinstance(node, Cat):
        return torch.cat([_build(p, sources) for p in node.parts], node.dim)
    a, b = _build(node.a, sources), _build(node.b, sources)
    return a.add_(b) if node.sign == 1 else a.sub_(b)


# What the log holds: the same tree with weak references (it must not keep any tensor alive).
@dataclass(frozen=True)
class _WeakSelect:
    source: "_WeakView"
    dim: int
    index: "_WeakView"


@dataclass(frozen=True)
class _WeakView:
    """A tensor by its base and view, valid while the base is alive and unchanged: ``edge_index[0]``
    or ``x.view(-1, heads, channels)`` is a view made for one call and freed after it, while its base
    lives on."""

    base: Callable[[], Optional[torch.Tensor]]
    version: int
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]

    @staticmethod
    def of(t: torch.Tensor) -> "_WeakView":
        base = t._base if t._base is not None else t
        return _WeakView(weakref.ref(base), t._version, t.storage_offset(), tuple(t.shape), t.stride())

    def __call__(self) -> Optional[torch.Tensor]:
        base = self.base()
        if base is None or base._version != self.version:
            return None
        return base.as_strided(self.size, self.stride, self.offset)


@dataclass(frozen=True)
class _WeakCat:
    parts: Tuple[Any, ...]
    dim: int


@dataclass(frozen=True)
class _WeakSum:
    a: Any
    b: Any
    sign: int


class GatherLog:
    """Gathers, and concatenations, sums and differences of them, made in a session, keyed on their
    outputs' storage."""

    def __init__(self) -> None:
        self._log = StorageKeyed()

    def note(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        """Record ``out`` if ``func(*args, **kwargs)`` gathered rows of one tensor along a dim, or
        concatenated, added or subtracted outputs recorded before; anything else is ignored."""
        name = getattr(func, "__name__", "")
        if name not in _OPS or "out" in kwargs or not _plain(out) or not out.is_contiguous():
            return
        if not torch.is_grad_enabled() or torch.jit.is_tracing():
            return  # under jit tracing, reading the output's geometry here would change the traced graph
        if name == "index_select":
            part = _weak_select(_arg(args, kwargs, 0, "input", "self"), _arg(args, kwargs, 1, "dim"),
                                _arg(args, kwargs, 2, "index"), out)
        elif name == "__getitem__":  # x[index] with a 1-D integer tensor: index_select on dim 0
            part = _weak_select(args[0], 0, args[1], out) if len(args) == 2 else None
        elif name in _CATS:
            part = self._weak_cat(_arg(args, kwargs, 0, "tensors"), _arg(args, kwargs, 1, "dim", default=0), out)
        else:
            part = self._weak_sum(args, kwargs, _SIGNS[name], out)
        if part is not None:
            self._log.put((storage_id(out),), out, (out.storage_offset(), out.shape, out._version, part))

    def _weak_cat(self, tensors: Any, dim: Any, out: torch.Tensor) -> Optional[_WeakCat]:
        if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(dim, int):
            return None
        parts = [self._whole(t, out) for t in tensors]
        return None if any(p is None for p in parts) else _WeakCat(tuple(parts), dim % out.dim())

    def _weak_sum(self, args: tuple, kwargs: dict, sign: int, out: torch.Tensor) -> Optional[_WeakSum]:
        if len(args) != 2 or set(kwargs) - {"alpha"} or kwargs.get("alpha", 1) != 1:
            return None
        a, b = self._whole(args[0], out), self._whole(args[1], out)
        if a is None or b is None or args[0].shape != out.shape or args[1].shape != out.shape:
            return None  # broadcasting, or an operand that is not a recorded gather
        return _WeakSum(a, b, sign)

    def _whole(self, t: Any, out: torch.Tensor) -> Any:
        """The log's entry for ``t`` if ``t`` is a whole recorded output of ``out``'s dtype, else None."""
        entry = self._entry(t) if _plain(t) and t.dtype == out.dtype else None
        if entry is None or entry[0] != t.storage_offset() or entry[1] != t.shape or not t.is_contiguous():
            return None
        return entry[3]

    def _entry(self, t: torch.Tensor) -> Optional[tuple]:
        entry = self._log.get((storage_id(t),))
        return entry if entry is not None and entry[2] == t._version else None  # else changed in place

    def recipe(self, t: torch.Tensor) -> Optional[Tuple[Recipe, List[torch.Tensor]]]:
        """The recipe of ``t`` and its sources, if ``t`` is (a view of) a recorded output whose sources
        are alive and unchanged since; else ``None``."""
        entry = self._entry(t) if _plain(t) else None
        if entry is None:
            return None
        offset, shape, _, weak = entry
        start = t.storage_offset() - offset
        last = start + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        if start < 0 or t.numel() == 0 or last >= shape.numel():
            return None
        sources: List[torch.Tensor] = []
        tree = _strong(weak, sources)
        if tree is None or any(s.dtype != t.dtype or s.device != t.device for s in sources):
            return None
        return Recipe(tree, shape, start, t.shape, t.stride()), sources


def _plain(t: Any, parameter: bool = False) -> bool:
    return ((type(t) is torch.Tensor or parameter and type(t) is torch.nn.Parameter) and t.layout == torch.strided
            and t.is_floating_point())


def _arg(args: tuple, kwargs: dict, i: int, *names: str, default: Any = None) -> Any:
    if i < len(args):
        return args[i]
    return next((kwargs[n] for n in names if n in kwargs), default)


def _weak_select(src: Any, dim: Any, index: Any, out: torch.Tensor) -> Optional[_WeakSelect]:
    if not (_plain(src, parameter=True) and isinstance(dim, int) and isinstance(index, torch.Tensor) and index.dim() == 1
            and index.dtype in (torch.int64, torch.int32) and src.dtype == out.dtype and src.dim() == out.dim()):
        return None
    return _WeakSelect(_WeakView.of(src), dim % src.dim(), _WeakView.of(index))


def _strong(weak: Any, sources: List[torch.Tensor]) -> Optional[Node]:
    """The tree with live tensors (sources appended to ``sources``, each once), or ``None`` where a
    tensor was freed or a source changed in place since the gather."""
    if isinstance(weak, _WeakCat):
        parts = [_strong(p, sources) for p in weak.parts]
        return None if any(p is None for p in parts) else Cat(tuple(parts), weak.dim)
    if isinstance(weak, _WeakSum):
        a, b = _strong(weak.a, sources), _strong(weak.b, sources)
        return None if a is None or b is None else Sum(a, b, weak.sign)
    src, index = weak.source(), weak.index()
    if src is None or index is None:
        return None
    view = (storage_id(src), src.storage_offset(), src.shape, src.stride())
    slot = next((i for i, s in enumerate(sources)
                 if (storage_id(s), s.storage_offset(), s.shape, s.stride()) == view), None)
    if slot is None:
        sources.append(src)
        slot = len(sources) - 1
    return Select(slot, weak.dim, index)
