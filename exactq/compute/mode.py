"""Routes an unchanged model's products to the INT8 primitives inside a compression session.

PyG's layers reach what this serves through plain torch functions: every ``torch_geometric.nn.Linear``
/ ``torch.nn.Linear`` calls ``F.linear``, every aggregation over a ``torch.sparse`` CSR adjacency
(``utils.spmm``: GCN, GraphSAGE, GIN, GraphConv and others) calls ``torch.sparse.mm``, and dropout
(module or functional) calls ``F.dropout``. A ``TorchFunctionMode`` sees them without touching the model.
Aggregations over an ``edge_index`` (gather + scatter) are not products: :mod:`.aggregation` turns those
of the layers it covers into products on the graph's cached CSR, which the mode then serves.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from . import functional as CF
from .aggregation import EdgeIndexRouting

_SPARSE_MM = (torch.sparse.mm,)  # the builtin torch._C._sparse._sparse_mm
_MATMUL = (torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__)


class ComputeMode(TorchFunctionMode):
    """Inside it, ``F.linear``, CSR x dense products and ``F.dropout`` run
    :func:`exactq.compute.functional.linear`, :func:`~exactq.compute.functional.spmm` and
    :func:`~exactq.compute.functional.dropout`; everything else runs as it is."""

    def __init__(self, hooks: CF.Hooks) -> None:
        super().__init__()
        self.hooks = hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _routes():
            return func(*args, **kwargs)  # autocast picks its own dtypes; compiled graphs are not rerouted
        if func is torch.nn.functional.dropout:
            x = args[0] if args else kwargs["input"]
            names = ("p", "training", "inplace")
            opts = dict(zip(names, args[1:]), **{k: v for k, v in kwargs.items() if k in names})
            return CF.dropout(x, **opts, hooks=self.hooks)
        if func is torch.nn.functional.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return CF.linear(x, weight, bias, hooks=self.hooks)
        if (func in _SPARSE_MM or func in _MATMUL) and len(args) >= 2:
            a, b = args[0], args[1]
            if isinstance(a, torch.Tensor) and a.layout == torch.sparse_csr and isinstance(b, torch.Tensor) \
                    and b.layout == torch.strided and not kwargs:
                reduce = args[2] if func in _SPARSE_MM and len(args) > 2 else "sum"
                return CF.spmm(a, b, reduce, hooks=self.hooks)
        return func(*args, **kwargs)


def _routes() -> bool:
    """Whether products are rerouted now: not while Dynamo traces, not under autocast."""
    return not (torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or torch.is_autocast_enabled("cuda"))


@contextlib.contextmanager
def routed(hooks: CF.Hooks) -> Iterator[None]:
    """A session's compute routing: :class:`~.aggregation.EdgeIndexRouting` around a :class:`ComputeMode`
    (kept a plain mode, with TorchFunctionMode's own ``__enter__`` / ``__exit__``, as Dynamo needs to
    handle graph breaks under it)."""
    with EdgeIndexRouting(hooks, _routes), ComputeMode(hooks):
        yield


def session_hooks(engine: Any) -> CF.Hooks:
    """The :class:`~exactq.compute.functional.Hooks` of a compression session's engine."""
    return CF.Hooks(stash=engine.stash, stash_codes=engine.stash_codes, restore_rows=engine.restore_rows,
                    keep=engine.keep, seed=engine.next_seed, note=engine.note_compute)
