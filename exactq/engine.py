"""The hook engine: what happens to each tensor autograd saves inside a compression session.

Two pieces work together while a session is active:

* ``OpTracker``, a ``TorchFunctionMode``, records which op is running (at pack time
  ``tensor.grad_fn`` names the producer, not the op saving it) and which storages the forward
  produced without autograd history (e.g. dropout of the input features), so they count as
  activations rather than inputs.
* ``HookEngine.pack`` / ``unpack``, installed with ``torch.autograd.graph.saved_tensors_hooks``,
  apply the policy (see ``HookEngine.pack``) and keep a :class:`~exactq.report.Record` per tensor.
  On CPU, large restores are written into buffers reused within the backward pass (``_RestoreBuffers``).

Pitfalls handled (REFERENCE.md section 5): with hooks PyTorch no longer checks in-place changes
of saved tensors, so unpack checks the version itself; unpack may run many times, so nothing is
freed on unpack; hooks disable autograd's de-duplication, so identical saves share one packed copy
(keyed on storage, offset, shape, stride, dtype and version, valid only while that storage lives).
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

from . import functional as EF
from . import report as R
from .config import Config
from .memory import arg_storages as _arg_storages
from .memory import arg_tensors as _arg_tensors
from .memory import sparse_parts as _sparse_parts
from .memory import storage_id as _storage_id

# Ops whose backward needs only the sign of the saved tensor (ReLU's output, leaky ReLU's input).
_LEAKY_OPS = {F.leaky_relu, F.leaky_relu_}
_SIGN_OPS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_} | _LEAKY_OPS
# Ops whose backward uses their saved operands linearly: random projection is unbiased there.
_LINEAR_OPS = {F.linear, torch.mm, torch.matmul, torch.addmm, torch.bmm, torch.sparse.mm,
               torch.Tensor.mm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
               torch.Tensor.addmm, torch.Tensor.bmm}
_LINEAR_OP_NAMES = ("spmm_sum", "spmm_mean", "spmm")  # torch_sparse's sparse x dense products
# Normalisations: backward uses the saved mean / inverse std nonlinearly (and they are small, one per
# feature or node), so only the saved input is quantized; the statistics are kept exactly.
_NORM_OPS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm}
# Dropout on CPU saves a float noise tensor with values {0, 1 / (1 - p)} (CUDA saves a bool mask).
_DROPOUT_OPS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout}
_FLOATS = set(EF.FLOAT_DTYPES)
_SEED_STEP = 0x9E3779B97F4A7C15


def _op_name(func: Optional[Callable], t: torch.Tensor) -> str:
    if func is None:
        return f"autograd.Function ({type(t.grad_fn).__name__})" if t.grad_fn is not None else "autograd.Function"
    name = getattr(func, "__name__", None) or str(func)
    return str(func) if name in ("default", "__call__") else name


def _is_linear_op(func: Optional[Callable]) -> bool:
    if func is None:
        return False
    try:
        if func in _LINEAR_OPS:
            return True
    except TypeError:  # unhashable callables
        return False
    return str(getattr(func, "__name__", "")).endswith(_LINEAR_OP_NAMES)


def _held_bytes(t: torch.Tensor) -> int:
    """Memory a strided tensor really pins: its dense size, or less for expanded/overlapping views."""
    if t.layout != torch.strided:
        return 0
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class _StorageKeyed:
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


class OpTracker(TorchFunctionMode):
    """Tracks the op being executed and the storages produced without autograd history."""

    def __init__(self) -> None:
        super().__init__()
        self.current: Optional[Callable] = None
        self.current_args: Optional[Tuple[Any, Any]] = None
        self._produced = _StorageKeyed()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        outer = self.current, self.current_args
        self.current, self.current_args = func, (args, kwargs)
        try:
            out = func(*args, **kwargs)
        finally:
            self.current, self.current_args = outer
        outs = (out,) if isinstance(out, torch.Tensor) else out if isinstance(out, (tuple, list)) else ()
        # Outputs with autograd history are activations anyway; only history-less ones need noting.
        fresh = [o for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is None and o.layout == torch.strided
                 and (o.dtype in _FLOATS or o.dtype == torch.bool)]
        if fresh:
            existing = _arg_storages(args, kwargs)  # computed once per op, only when needed
            for o in fresh:
                self._note_output(o, existing)
        return out

    def _note_output(self, out: torch.Tensor, existing: set) -> None:
        sid = _storage_id(out)
        if sid in existing:
            return  # a view or in-place result of an argument: not new memory
        self._produced.put((sid,), out, True)

    def produced(self, t: torch.Tensor) -> bool:
        return bool(self._produced.get((_storage_id(t),)))


class _Packed:
    """What autograd holds for one saved tensor. ``restore`` may be called any number of times."""

    __slots__ = ("payload", "restore_fn", "tensor_ref", "version", "describe", "__weakref__")

    def __init__(self, payload: Any, restore_fn: Callable[[Any], torch.Tensor], t: torch.Tensor) -> None:
        self.payload = payload
        self.restore_fn = restore_fn
        self.tensor_ref = weakref.ref(t)
        self.version = t._version
        self.describe = f"[{t.dtype}, {t.layout}, shape {list(t.shape)}]"

    def check_version(self) -> None:
        t = self.tensor_ref()
        if t is not None and t._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: {self.describe} is at version {t._version}; expected version {self.version} "
                "instead (detected by exactq: saved-tensor hooks switch off PyTorch's own check)."
            )

    def restore(self) -> torch.Tensor:
        self.check_version()
        return self.restore_fn(self.payload)


class _Kept(_Packed):
    """A tensor referenced as it is; holding it strongly lets the version check always run."""

    __slots__ = ("tensor",)

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__(None, None, t)
        self.tensor = t

    def restore(self) -> torch.Tensor:
        self.check_version()
        return self.tensor


class _RestoreBuffers:
    """CPU memory for restored activations, reused within one backward pass.

    A restored tensor lives only while its backward node runs. Fresh memory for it costs a page fault
    per 4 KiB on first touch, as long as the restore itself takes; so restores of ``min_bytes`` to
    ``max_bytes`` are written into buffers kept here. A buffer is free again once no tensor but the pool
    references its storage (its storage's use count is 1), so a restored tensor that autograd keeps
    (e.g. as a gradient) is never overwritten. Free buffers beyond the largest request's size are
    dropped, so the backward's peak grows by at most ``max_bytes`` (larger restores allocate as usual:
    a spare buffer of gigabytes costs more memory than its page faults cost time). The pool is held
    only by the packed tensors, so it is freed with the graph. CUDA has its caching allocator and gets
    ``None`` (the op allocates).
    """

    _use_count = getattr(torch._C, "_storage_Use_Count", None)

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int = 256 << 20) -> None:
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self._bufs: List[torch.UntypedStorage] = []
        self._largest = 0

    def empty(self, numel: int, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        nbytes = numel * dtype.itemsize
        if device.type != "cpu" or not self.min_bytes <= nbytes <= self.max_bytes or self._use_count is None:
            return None
        self._largest = max(self._largest, nbytes)
        free = [b for b in self._bufs if self._use_count(b._cdata) == 1]
        fits = [b for b in free if nbytes <= b.nbytes() <= 2 * nbytes]
        buf = min(fits, key=lambda b: b.nbytes()) if fits else torch.UntypedStorage(nbytes)
        if not fits:
            self._bufs.append(buf)
        spare = sum(b.nbytes() for b in free if b is not buf)
        for b in free:  # oldest first
            if spare <= self._largest:
                break
            if b is not buf:
                self._bufs.remove(b)
                spare -= b.nbytes()
        return torch.empty(0, dtype=dtype).set_(buf, 0, (numel,))


class HookEngine:
    """Packs and unpacks saved tensors for one compression session (see module docstring)."""

    def __init__(self, config: Config, tracker: OpTracker, seed: int) -> None:
        self.config = config
        self.tracker = tracker
        self.records: List[R.Record] = []
        self._seed = seed
        self._calls = 0
        # Keyed on (storage id, offset, shape, stride, dtype, version): tensors already counted, and
        # (plus the storage kind) weak references to packed copies that identical saves can share.
        self._counted = _StorageKeyed()
        self._shared = _StorageKeyed()
        self._buffers_ref: Callable[[], Optional[_RestoreBuffers]] = lambda: None

    def _buffers(self) -> _RestoreBuffers:
        pool = self._buffers_ref()
        if pool is None:
            pool = _RestoreBuffers()
            self._buffers_ref = weakref.ref(pool)
        return pool

    # -- policy ---------------------------------------------------------------------------------
    def _is_external(self, t: torch.Tensor) -> bool:
        """Parameters and inputs that stay alive anyway (or views of them): compressing them adds memory."""
        root = t._base if t._base is not None else t
        if root.grad_fn is not None or self.tracker.produced(t):
            return False
        if self.tracker.current_args is None:
            return True  # saved outside any tracked op (a Python autograd.Function): leave it
        # A history-less tensor that is not an argument of the saving op was made inside it (e.g. a
        # dropout mask); one that is an argument came from outside the session.
        return _storage_id(t) in _arg_storages(*self.tracker.current_args)

    def pack(self, t: torch.Tensor) -> _Packed:
        """Policy, in order: external -> referenced; dense operand of a product with a constant sparse
        matrix -> nothing stored; non-strided, non-float/bool, fewer than
        ``min_numel`` elements or overlapping memory -> kept as is; bool, or dropout's two-valued float
        noise -> 1-bit mask; statistics
        saved by a normalisation -> kept as is; saved by a ReLU-like op -> 1-bit sign; saved by a linear op with ``rp_ratio`` set -> projected and
        quantized; any other float -> block-wise quantized."""
        op = self.tracker.current
        name = _op_name(op, t)
        if t.layout != torch.strided:
            # Sparse tensors are left to autograd as they are. One built inside the session (GCN's
            # normalised adjacency, made in every forward) is an activation: it counts as held memory.
            parts = _sparse_parts(t)
            made_here = t.grad_fn is not None or (bool(parts) and self.tracker.produced(parts[-1]))
            return self._keep(t, name, R.UNCOMPRESSED if made_here else R.EXTERNAL)
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return self._keep(t, name, R.EXTERNAL if t.grad_fn is None else R.UNCOMPRESSED)  # subclasses: as is
        if self._is_external(t):
            return self._keep(t, name, R.EXTERNAL)
        if _is_linear_op(op) and self._is_dense_operand_of_constant_sparse_product(t):
            return self._skip(t, name)
        nbytes = t.numel() * t.element_size()
        overlapping = t.untyped_storage().nbytes() < nbytes
        if t.dtype == torch.bool and not overlapping and t.numel() > 0:
            return self._shared_pack(t, name, R.MASK, lambda: (EF.pack_mask(t), None), self._restore(_unpack_mask))
        if t.dtype not in _FLOATS or t.numel() < self.config.min_numel or overlapping:
            return self._keep(t, name, R.UNCOMPRESSED)
        if op in _NORM_OPS and not self._is_first_argument_sized(t):
            return self._keep(t, name, R.UNCOMPRESSED)
        if op in _DROPOUT_OPS and t.grad_fn is None:
            return self._shared_pack(t, name, R.MASK, lambda: _pack_two_valued(t), self._restore(_unpack_mask))
        if op in _SIGN_OPS:
            # ReLU saves its output and its backward tests `result <= 0`: keeping `!= 0` passes a NaN's
            # gradient as fp32 does. Leaky ReLU saves its input and tests `> 0`.
            positive = op in _LEAKY_OPS
            return self._shared_pack(t, name, R.SIGN, lambda: _pack_two_valued(t, positive, t.new_ones(())),
                                     self._restore(_unpack_mask))
        if self.config.rp_ratio is not None and self.config.rp_ratio < 1 and t.dim() >= 2 and _is_linear_op(op):
            d = t.shape[-1]
            r = EF.projected_width(d, self.config.rp_ratio)
            if r < d:
                return self._shared_pack(t, name, R.PROJECTED, lambda: self._project(t, r), self._restore(_unproject))
        normal_like = op in _NORM_OPS
        return self._shared_pack(t, name, R.QUANTIZED, lambda: self._quantize(t, normal_like),
                                 self._restore(_dequantize))

    def _is_dense_operand_of_constant_sparse_product(self, t: torch.Tensor) -> bool:
        """In A @ X with a sparse A that needs no gradient, X is saved only for A's gradient."""
        args, kwargs = self.tracker.current_args
        tensors = list(_arg_tensors(args, kwargs))
        sparse = [a for a in tensors if a.layout != torch.strided]
        return (bool(sparse) and not any(a.requires_grad for a in sparse)
                and _storage_id(t) in {_storage_id(a) for a in tensors if a.layout == torch.strided})

    def _is_first_argument_sized(self, t: torch.Tensor) -> bool:
        args, _ = self.tracker.current_args
        return bool(args) and isinstance(args[0], torch.Tensor) and args[0].shape == t.shape

    # -- storage forms ----------------------------------------------------------------------------
    def _next_seed(self) -> int:
        self._calls += 1
        return (self._seed + self._calls * _SEED_STEP) % (2**63 - 1)

    def _quantize(self, t: torch.Tensor, normal_like: bool) -> EF.QuantizedTensor:
        block_size = self.config.block_size_for(t.shape)
        nonuniform = self.config.nonuniform_for(normal_like)
        return EF.quantize(t, self.config.bits, block_size, nonuniform, self._next_seed())

    def _project(self, t: torch.Tensor, r: int) -> Tuple[EF.QuantizedTensor, int, torch.Size]:
        seed = self._next_seed()  # the projection is drawn again from it in backward: nothing else stored
        return self._quantize(EF.random_project(t, r, seed), normal_like=True), seed, t.shape

    def _restore(self, fn: Callable[[_RestoreBuffers, Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
        return functools.partial(fn, self._buffers())

    # -- bookkeeping --------------------------------------------------------------------------------
    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (_storage_id(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)

    def _count_original(self, t: torch.Tensor) -> int:
        """Bytes autograd would hold for ``t``: its size the first time the tensor is seen, else 0.
        A sparse tensor is keyed on its values and pins the whole storages of its parts (its column
        indices may be a row of a 2 x nnz COO index tensor)."""
        parts = _sparse_parts(t) if t.layout != torch.strided else (t,)
        if not parts:
            return 0
        key = self._key(parts[-1]) + (t.layout,)
        if self._counted.get(key):
            return 0
        self._counted.put(key, parts[-1], True)
        if t.layout == torch.strided:
            return _held_bytes(t)
        return sum({_storage_id(p): p.untyped_storage().nbytes() for p in parts}.values())

    def _keep(self, t: torch.Tensor, name: str, kind: str) -> _Packed:
        if kind == R.EXTERNAL:
            self.records.append(R.Record(kind, name, 0, _held_bytes(t)))
        else:  # an activation stored as is, once, as autograd would store it
            original = self._count_original(t)
            self.records.append(R.Record(kind, name, original, original))
        return _Kept(t)

    def _skip(self, t: torch.Tensor, name: str) -> _Packed:
        """Store nothing; should autograd still unpack it, a zero-stride tensor of zeros stands in
        (the only consumer, the sparse operand's gradient, is never computed)."""
        shape, dtype, device = t.shape, t.dtype, t.device
        self.records.append(R.Record(R.UNNEEDED, name, self._count_original(t), 0))
        return _Packed(None, lambda _: torch.zeros((), dtype=dtype, device=device).expand(shape), t)

    def _shared_pack(self, t: torch.Tensor, name: str, kind: str, make: Callable[[], Any],
                     restore: Callable[[Any], torch.Tensor]) -> _Packed:
        key = self._key(t) + (kind,)
        original = self._count_original(t)
        ref = self._shared.get(key)
        packed = ref() if ref is not None else None
        if packed is not None:
            self.records.append(R.Record(R.DEDUPLICATED, name, original, 0))
            return packed
        payload = make()
        packed = _Packed(payload, restore, t)
        self._shared.put(key, t, weakref.ref(packed))
        self.records.append(R.Record(kind, name, original, _payload_bytes(payload)))
        return packed

    @staticmethod
    def unpack(packed: _Packed) -> torch.Tensor:
        return packed.restore()

    def report(self) -> R.MemoryReport:
        return R.MemoryReport.from_records(self.records)


def _pack_two_valued(t: torch.Tensor, positive: bool = False,
                     value: Optional[torch.Tensor] = None) -> Tuple[EF.PackedMask, torch.Tensor]:
    """1-bit mask + the value it restores to: exact for dropout's noise (0 or v = its maximum); a 0/1
    stand-in for a ReLU's sign (``value`` = 1)."""
    return EF.pack_mask(t, positive), t.detach().amax() if value is None else value


# Restores: write into the pool's buffers where it has one.
def _unpack_mask(pool: _RestoreBuffers, payload: Tuple[EF.PackedMask, Optional[torch.Tensor]]) -> torch.Tensor:
    mask, value = payload
    dtype = torch.bool if value is None else value.dtype
    return EF.unpack_mask(mask, value, out=pool.empty(math.prod(mask.shape), dtype, mask.packed.device))


def _dequantize(pool: _RestoreBuffers, q: EF.QuantizedTensor) -> torch.Tensor:
    return EF.dequantize(q, out=pool.empty(q.numel, q.dtype, q.packed.device))


def _unproject(pool: _RestoreBuffers, payload: Tuple[EF.QuantizedTensor, int, torch.Size]) -> torch.Tensor:
    q, seed, shape = payload
    y = EF.dequantize(q)  # r columns: small
    d = shape[-1]
    return EF.random_unproject(y, d, seed, out=pool.empty(y.shape[0] * d, y.dtype, y.device)).view(shape)


def _payload_bytes(payload: Any) -> int:
    if isinstance(payload, EF.QuantizedTensor):
        return payload.nbytes
    # projected: (QuantizedTensor, seed, shape); masks: (PackedMask, value or None)
    value = payload[1] if isinstance(payload[0], EF.PackedMask) else None
    return payload[0].nbytes + (value.nbytes if value is not None else 0)
