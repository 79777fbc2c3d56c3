"""Independent measurement of tensor memory: every storage allocated while a tracker is active,
counted while it stays alive. Used to check :class:`exactq.MemoryReport` against reality and to
measure activation memory as "memory held after forward minus memory held before it". Also the
storage helpers the hook engine shares (storage identity, an op's argument storages, a dict keyed on
live storages). And :func:`map_large_allocations`, which has freed tensor memory go back to the
operating system at once.
"""
from __future__ import annotations

import ctypes
import logging
import platform
import resource
from typing import Any, Dict, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.parameter import UninitializedTensorMixin
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses a larger one (HEAP_MAX_SIZE / 2 on 64-bit)


def storage_id(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (its StorageImpl address): equal for views of one storage."""
    return t.untyped_storage()._cdata


def has_storage(t: object) -> bool:
    # Lazy modules' uninitialised parameters have no storage yet (touching it raises); nested
    # tensors have no single one.
    return isinstance(t, torch.Tensor) and not isinstance(t, UninitializedTensorMixin) and not t.is_nested


def arg_tensors(args, kwargs):
    """The tensors among an op's arguments, directly or in a list/tuple, that have a storage (what op
    signatures allow; a shallow scan, much cheaper than a pytree flatten on this hot path)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from (b for b in a if has_storage(b))
        elif has_storage(a):
            yield a


def sparse_parts(t: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The dense tensors a sparse tensor is made of, values last (empty for other layouts)."""
    if t.layout == torch.sparse_coo:
        return t._indices(), t._values()
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return t.crow_indices(), t.col_indices(), t.values()
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return t.ccol_indices(), t.row_indices(), t.values()
    return ()


def arg_storages(args, kwargs) -> set:
    """Storage ids of the tensors among an op's arguments (for a sparse one, of its parts)."""
    out = set()
    for a in arg_tensors(args, kwargs):
        if a.layout == torch.strided:
            out.add(storage_id(a))
        else:
            out.update(storage_id(p) for p in sparse_parts(a))
    return out


class StorageKeyed:
    """A dict whose entries are valid only while the storage they were made for is alive (an address
    can be reused by a new storage once the old one is freed). Expired entries are pruned as it grows."""

    def __init__(self) -> None:
        self._d: Dict[tuple, Tuple[StorageWeakRef, Any]] = {}
        self._prune_at = 1024

    def get(self, key: tuple) -> Any:
        hit = self._d.get(key)
        return hit[1] if hit is not None and not hit[0].expired() else None

    def put(self, key: tuple, t: torch.Tensor, value: Any) -> None:
        self._d[key] = (StorageWeakRef(t.untyped_storage()), value)
        if len(self._d) >= self._prune_at:
            self._d = {k: v for k, v in self._d.items() if not v[0].expired()}
            self._prune_at = max(1024, 2 * len(self._d))


class LiveTensorMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the ``with`` block that are still alive.

    Works on every device (it sees each ATen op's outputs), unlike allocator statistics, which CPU
    tensors lack. Views and in-place results share a storage and are counted once.

    >>> with LiveTensorMemory() as mem:
    ...     y = torch.ones(1000)
    >>> mem.live_bytes()
    4000
    """

    def __init__(self) -> None:
        super().__init__()
        self._storages: Dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # A view or in-place result shares an argument's storage: that memory existed already.
        existing = arg_storages(args, kwargs)
        for o in tree_flatten(out)[0]:
            if not isinstance(o, torch.Tensor):
                continue
            for t in (o,) if o.layout == torch.strided else sparse_parts(o):
                s = t.untyped_storage()
                if s._cdata in existing:
                    continue
                ref = StorageWeakRef(s)
                if ref.cdata not in self._storages or self._storages[ref.cdata][0].expired():
                    self._storages[ref.cdata] = (ref, s.nbytes())
        return out

    def live_bytes(self) -> int:
        """Bytes of storages created under this tracker that are alive now."""
        return sum(n for ref, n in self._storages.values() if not ref.expired())


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, as the operating system measures it.

    Linux's ``VmHWM`` where available: ``getrusage``'s ``ru_maxrss`` survives ``execve``, so a process
    started by a larger one (a spawned rank, a subprocess) would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def map_large_allocations(threshold_bytes: int = 2**20) -> bool:
    """Has glibc's malloc give every allocation of at least ``threshold_bytes`` a mapping of its own,
    returned to the operating system as soon as it is freed.

    PyTorch's CPU tensors come from malloc. glibc raises its mmap threshold to the size of each mapped
    block that is freed (up to 32 MiB); after that, tensors of up to that size come from the heap,
    where freed memory stays with the process, fragmented, and adds to its peak. A training epoch that
    makes and frees many tensors of a few MiB (a distributed rank's messages and per-peer rows) then
    holds hundreds of MB it does not use. A fixed threshold turns the raising off: on the products-sized
    graph a rank's peak resident memory (4 ranks) went from 4.09-4.15 to 3.92 GB, one process's from
    13.82 to 13.67 GB (``experiments/distributed_scale.py --sections memory``). The cost: tensors below
    32 MiB that the heap would have reused are mapped and faulted in anew each time; where a rank's
    tensors are that small (the arxiv-shaped graph on 4 ranks) epochs took 1.5-1.6x as long
    (``experiments/distributed.py --sections malloc``).

    Args:
        threshold_bytes: allocations of at least this many bytes are mapped, 1 .. 32 MiB.

    Returns:
        Whether it took effect for this process (False where the C library is not glibc).
    """
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) \
            or not 0 < threshold_bytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"threshold_bytes must be an int in 1 .. {MAX_MMAP_THRESHOLD} (32 MiB), got "
                         f"{threshold_bytes!r}")
    if platform.libc_ver()[0] != "glibc":
        log.info("map_large_allocations: the C library is not glibc; malloc left as it is")
        return False
    done = ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
    log.debug("malloc maps allocations of >= %d bytes: %s", threshold_bytes, done)
    return done
