"""The hook engine: what happens to each tensor autograd saves inside a compression session.

Three pieces work together while a session is active:

* ``HookEngine.pack`` / ``unpack``, installed with ``torch.autograd.graph.saved_tensors_hooks``. At
  pack time only the tensor is known, not which op saves it or how its backward will use it
  (``tensor.grad_fn`` is the producer). So pack settles only what needs no op (parameters and
  inputs that stay alive anyway, sparse and nested tensors) and otherwise hands autograd a pending
  handle holding the tensor.
* ``OpTracker``, a ``TorchFunctionMode``, calls back when each op returns. The op's backward nodes
  exist by then: the engine walks from the op's outputs to the nodes holding pending handles,
  reading each node's saved fields (an unpack of a pending handle names its node and field), and
  stores every field as :data:`exactq.rules.RULES` says. The tracker also records which storages the
  forward produced without autograd history (e.g. dropout of the input features), so they count as
  activations rather than inputs, and the engine logs gathers of rows (:mod:`exactq.gather`), so a
  saved gather is stored as its source and index.
* ``_RestoreBuffers``: on CPU, large restores are written into buffers reused within backward.

Pitfalls handled (REFERENCE.md section 5): with hooks PyTorch no longer checks in-place changes
of saved tensors, so unpack checks the version itself; unpack may run many times, so nothing is
freed on unpack; hooks disable autograd's de-duplication, so identical saves share one packed copy
(keyed on storage, offset, shape, stride, dtype and version, valid only while that storage lives).
Under ``torch.compile`` the tracker does nothing while Dynamo traces (reading ``grad_fn`` there
would break the user's graph); a compiled region's saved tensors reach pack as those of one
custom autograd Function and are kept exactly (see the README's "torch.compile").
"""
from __future__ import annotations

import collections
import functools
import math
import sys
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from . import functional as EF
from . import report as R
from . import rules
from .compute.functional import quantize_rows
from .config import Config
from .gather import GatherLog, Recipe
from .memory import arg_storages as _arg_storages
from .memory import arg_tensors as _arg_tensors
from .memory import has_storage as _has_storage
from .memory import sparse_parts as _sparse_parts
from .memory import StorageKeyed
from .memory import storage_id as _storage_id

_FLOATS = set(EF.FLOAT_DTYPES)
# Python-level names of the dropout ops: on CPU they save a float noise tensor {0, 1 / (1 - p)}.
_DROPOUT_OPS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout"})
_SEED_STEP = 0x9E3779B97F4A7C15
# Nodes the engine walks from an op's outputs to find the nodes holding its pending handles: the op's
# own nodes come first; a composite op makes a handful.
_MAX_PROBED_NODES = 64
# Autograd nodes that only view or cast: a parameter reached through them (autocast's bf16 copy of a
# weight, its transpose) is kept, not quantized.
_CAST_NODES = frozenset({
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ExpandBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "AliasBackward0", "ReshapeAliasBackward0",
})


def _op_name(func: Optional[Callable]) -> str:
    if func is None:
        return "autograd.Function"
    name = getattr(func, "__name__", None) or str(func)
    return str(func) if name in ("default", "__call__") else name


def _held_bytes(t: torch.Tensor) -> int:
    """Memory a strided tensor really pins: its dense size, or less for expanded/overlapping views."""
    if t.layout != torch.strided:
        return 0
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _is_parameter_cast(t: torch.Tensor) -> bool:
    """``t`` is a leaf tensor (a parameter) seen through casts and views only."""
    node = t.grad_fn
    for _ in range(8):
        if node is None:
            return False
        name = type(node).__name__
        if name == "AccumulateGrad":
            return True
        nexts = [f for f, _ in node.next_functions if f is not None]
        if name not in _CAST_NODES or len(nexts) != 1:
            return False
        node = nexts[0]
    return False


@functools.lru_cache(maxsize=None)
def _saved_fields(node_type: type) -> Tuple[str, ...]:
    """Names of the tensor fields a node type saves (``_raw_saved_<name>`` exists for each), or
    ``saved_tensors`` for a custom autograd Function."""
    if issubclass(node_type, torch.autograd.function.BackwardCFunction):
        return ("saved_tensors",)
    return tuple(a[len("_raw_saved_"):] for a in dir(node_type) if a.startswith("_raw_saved_"))


class OpTracker(TorchFunctionMode):
    """Tracks the op being executed and the storages produced without autograd history, and calls
    ``on_op_end(func, args, kwargs, outputs, nodes_before)`` as each op returns (``nodes_before``: its
    arguments' ``grad_fn`` before it ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: Optional[Callable] = None
        self.current_args: Optional[Tuple[Any, Any]] = None
        self.on_op_end: Optional[Callable[[Callable, tuple, dict, tuple, list], None]] = None
        self._produced = StorageKeyed()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():
            # Dynamo traces this method into the user's graph: any tracking here (reading grad_fn,
            # storages) would break that graph at every op, so compiled code runs untracked.
            return func(*args, **kwargs)
        outer = self.current, self.current_args
        self.current, self.current_args = func, (args, kwargs)
        # The nodes that exist before the op: the walk for its saved tensors stops there (those
        # nodes may hold tensors packed by other hooks, whose unpack must not run now).
        before = [t.grad_fn for t in _arg_tensors(args, kwargs) if t.grad_fn is not None] if self.on_op_end else ()
        try:
            out = func(*args, **kwargs)
        finally:
            self.current, self.current_args = outer
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out) if isinstance(out, (tuple, list)) else ()
        # Outputs with autograd history are activations anyway; only history-less ones need noting
        # (integer ones too: a sparse tensor built in the forward is made of them).
        fresh = [o for o in outs if _has_storage(o) and o.grad_fn is None]
        if fresh:
            existing = _arg_storages(args, kwargs)  # computed once per op, only when needed
            for o in fresh:
                self._note_output(o, existing)
        if self.on_op_end is not None:
            self.on_op_end(func, args, kwargs, outs, before)
        return out

    def _note_output(self, out: torch.Tensor, existing: set) -> None:
        # A sparse output is new memory only in its new parts (a CSR made from a COO adjacency may
        # share its values and make only new row pointers).
        for part in (_sparse_parts(out) if out.layout != torch.strided else (out,)):
            sid = _storage_id(part)
            if sid not in existing:  # else a view or in-place result of an argument: not new memory
                self._produced.put((sid,), part, True)

    def produced(self, t: torch.Tensor) -> bool:
        return bool(self._produced.get((_storage_id(t),)))


def _codes(buffers: Any, codes: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return codes


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class _Packed:
    """What autograd holds for one saved tensor. While ``pending`` holds the tensor (until the engine
    learns which node saved it), restores return it as it is; once settled, ``restore`` rebuilds it
    from ``payload`` and may be called any number of times."""

    __slots__ = ("payload", "restore_fn", "tensor_ref", "version", "describe", "pending", "op", "site",
                 "__weakref__")

    def __init__(self, t: torch.Tensor, payload: Any = None, restore_fn: Optional[Callable[[Any], torch.Tensor]] = None,
                 op: str = "") -> None:
        self.payload = payload
        self.restore_fn = restore_fn
        self.tensor_ref = weakref.ref(t)
        self.version = t._version
        self.describe = f"[{t.dtype}, {t.layout}, shape {list(t.shape) if not t.is_nested else 'nested'}]"
        self.pending: Optional[torch.Tensor] = t if restore_fn is None else None
        self.op = op
        # The field a probe found it in. Never the node itself: the node holds this handle, and a
        # reference back would keep every graph alive that is dropped without a backward.
        self.site: Optional[str] = None

    def settle(self, payload: Any, restore_fn: Callable[[Any], torch.Tensor]) -> None:
        self.payload, self.restore_fn, self.pending = payload, restore_fn, None

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
        if self.pending is not None:
            return self.pending
        return self.restore_fn(self.payload)


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
        self.compute_counts: Dict[str, int] = {}
        self._seed = seed
        self._calls = 0
        self._pending: List[_Packed] = []
        # Saved by a custom autograd Function (outside any op): settled at the end of the next op that
        # reads a tensor with history, by the Function's declared rule if it is one of exactq's own
        # (rules.FUNCTION_RULES) and that op reads its output, else kept as they are.
        self._saved_by_function: List[_Packed] = []
        self._probe: Optional[List[_Packed]] = None  # handles unpacked while a node's field is read
        # Bytes already counted per storage id: of every saved tensor (original) and of those kept as
        # they are (stored). Then, keyed on (storage id, offset, shape, stride, dtype, version) plus the
        # storage form: weak references to packed copies that identical saves can share.
        self._counted = StorageKeyed()
        self._kept = StorageKeyed()
        self._shared = StorageKeyed()
        self.gathers = GatherLog()
        self._sources = StorageKeyed()  # stored sources of gathered tensors, shared by all their gathers
        self._buffers_ref: Callable[[], Optional[_RestoreBuffers]] = lambda: None
        tracker.on_op_end = self._op_end

    def _buffers(self) -> _RestoreBuffers:
        pool = self._buffers_ref()
        if pool is None:
            pool = _RestoreBuffers()
            self._buffers_ref = weakref.ref(pool)
        return pool

    # -- pack: what needs no op -------------------------------------------------------------------
    def _is_external(self, t: torch.Tensor) -> bool:
        """Parameters and inputs that stay alive anyway (or views of them): compressing them adds memory."""
        if not self._outlives_session(t):
            return False
        if self.tracker.current_args is None:
            return True  # saved outside any tracked op (a Python autograd.Function): leave it
        # A history-less tensor that is not an argument of the saving op was made inside it (e.g. a
        # dropout mask); one that is an argument came from outside the session.
        return _storage_id(t) in _arg_storages(*self.tracker.current_args)

    def pack(self, t: torch.Tensor) -> _Packed:
        """Settled here: nested tensors and tensor subclasses (kept as they are), sparse tensors (kept;
        counted when built inside the session), parameters and inputs (referenced) and casts of
        parameters (kept). Everything else waits, as a pending handle, for its node's rule."""
        name = _op_name(self.tracker.current)
        if t.is_nested:
            return self._keep_now(t, name, R.UNCOMPRESSED, "nested tensor (a layout exactq does not pack)")
        if t.layout != torch.strided:
            # Sparse tensors are left to autograd as they are. One built inside the session (GCN's
            # normalised adjacency, made in every forward) is an activation: its new parts count.
            parts = _sparse_parts(t)
            made_here = t.grad_fn is not None or any(self.tracker.produced(p) for p in parts)
            if made_here:
                return self._keep_now(t, name, R.UNCOMPRESSED, "sparse tensor (indices cannot be rounded)")
            return self._keep_now(t, name, R.EXTERNAL)
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            if t.grad_fn is None:
                return self._keep_now(t, name, R.EXTERNAL)
            return self._keep_now(t, name, R.UNCOMPRESSED, f"tensor subclass {type(t).__name__}")
        if self.tracker.current is None and not isinstance(t, torch.nn.Parameter) and _called_from_compiled_region():
            # A compiled graph's intermediates have no autograd history (they look like inputs): all it
            # saves but parameters counts as kept activations (its inputs too, an overcount).
            _warn_compiled()
            return self._keep_now(t, name, R.UNCOMPRESSED, _COMPILED_REASON)
        if self._is_external(t):
            return self._keep_now(t, name, R.EXTERNAL)
        if _is_parameter_cast(t):
            return self._keep_now(t, name, R.UNCOMPRESSED, "cast or view of a parameter (e.g. autocast's copy)")
        if self.tracker.current is None:
            # Saved outside any op: by a custom autograd Function (its ctx.save_for_backward runs after
            # its forward's ops), checkpoint's saved inputs among them, or by a backward with create_graph.
            handle = _Packed(t, op=name)
            self._saved_by_function.append(handle)
            return handle
        handle = _Packed(t, op=name)
        self._pending.append(handle)
        return handle

    def unpack(self, packed: _Packed) -> torch.Tensor:
        if self._probe is not None:  # a node's field is being read to learn which handles it holds
            if packed.pending is not None:
                self._probe.append(packed)
                return packed.pending
            return packed.payload if isinstance(packed.payload, torch.Tensor) else _PLACEHOLDER
        return packed.restore()

    # -- learning each pending tensor's node ------------------------------------------------------
    def _op_end(self, func: Callable, args: tuple, kwargs: dict, outs: tuple, before: list) -> None:
        if len(outs) == 1:
            self.gathers.note(func, args, kwargs, outs[0])
        if not (self._pending or self._saved_by_function) or not self._innermost():
            return  # nothing saved, or saved into other hooks (e.g. a checkpointed region's)
        if self._saved_by_function and before and torch.is_grad_enabled():
            # A Function's saves are packed as its apply returns; the next op that extends the graph is
            # the one that reads its output, if any, and sees its node among the nodes before it.
            self._settle_functions([n for n in before if rules.declared_function(n)])
        if self._pending:
            # The op's new nodes hang off its outputs, down to the nodes that existed before it.
            roots = [t.grad_fn for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            self._resolve(roots, set(before))

    def _innermost(self) -> bool:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        return top is not None and top[0] == self.pack

    def finish(self) -> None:
        """Settle what is still pending when the session ends (saved outside any traceable op)."""
        self._settle_functions([])
        self._resolve([], set())

    def _settle_functions(self, nodes: List[Any]) -> None:
        """Settle the saves of custom autograd Functions: by their rule those of ``nodes`` (exactq's own
        Functions) hold, the rest kept as they are."""
        waiting, self._saved_by_function = self._saved_by_function, []
        with torch.no_grad():
            for node in dict.fromkeys(nodes):  # once each, in order
                values, handles = self._probe_node(node, ("saved_tensors",))
                if handles:
                    self._settle_node(node, values, handles)
            for h in waiting:
                if h.pending is not None:
                    self._settle(h, rules.CUSTOM, None, "", {})

    def _resolve(self, roots: List[Any], seen: set) -> None:
        waiting = len(self._pending)
        found: Dict[Any, Tuple[Dict[str, Any], Dict[str, List[_Packed]]]] = {}
        queue = collections.deque(roots)
        probed = 0
        while queue and waiting and probed < _MAX_PROBED_NODES:
            node = queue.popleft()
            if node in seen:
                continue
            seen.add(node)
            probed += 1
            fields = _saved_fields(type(node))
            if fields:
                values, handles = self._probe_node(node, fields)
                if handles:
                    found[node] = (values, handles)
                    waiting -= sum(len(h) for h in handles.values())
            queue.extend(f for f, _ in node.next_functions if f is not None)
        pending, self._pending = self._pending, []
        with torch.no_grad():  # packing computes (comparisons, gathers): nothing of it is recorded
            for node, (values, handles) in found.items():
                self._settle_node(node, values, handles)
            for h in pending:
                if h.pending is not None:
                    self._settle(h, rules.UNKNOWN, None, "", {})

    def _probe_node(self, node: Any, fields: Tuple[str, ...]) -> Tuple[Dict[str, Any], Dict[str, List[_Packed]]]:
        values: Dict[str, Any] = {}
        handles: Dict[str, List[_Packed]] = {}
        for field in fields:
            self._probe = []
            try:
                values[field] = node.saved_tensors if field == "saved_tensors" else getattr(node, "_saved_" + field)
            except Exception:  # released, undefined, or a field exactq cannot read: left pending
                values[field] = None
            finally:
                hits, self._probe = self._probe, None
            for h in hits:
                if h.site is None and h.pending is not None:
                    h.site = field
                    handles.setdefault(field, []).append(h)
        return values, handles

    def _settle_node(self, node: Any, values: Dict[str, Any], handles: Dict[str, List[_Packed]]) -> None:
        node_name = type(node).__name__
        rule = rules.node_rule(node, values)
        if rule is not None and any(isinstance(f, rules.Zero) for f in rule.values()):
            # Winners are restored against a result restored as zeros: all of them or none.
            if not all(k in handles for k, f in rule.items() if isinstance(f, rules.Zero)):
                rule = {k: rules.INDEX if isinstance(f, (rules.Zero, rules.Winners)) else f for k, f in rule.items()}
        for field, hs in handles.items():
            form = rules.CUSTOM if rule is None else rule.get(field, rules.QUANTIZE)
            for h in hs:
                self._settle(h, _form_of(form, values[field], h), node, f"{node_name}.{field}", values)

    # -- storage forms ----------------------------------------------------------------------------
    def _settle(self, h: _Packed, form: rules.Form, node: Any, saved: str, values: Dict[str, Any]) -> None:
        t = h.pending
        if isinstance(form, rules.Unneeded):
            needs_grad = form.input_nr < len(node.next_functions) and node.next_functions[form.input_nr][0] is not None
            if not needs_grad:
                return self._store_nothing(h, t, saved)
            form = form.otherwise
        if isinstance(form, rules.Zero):
            return self._store_nothing(h, t, saved)
        if isinstance(form, rules.Keep):
            return self._store_kept(h, t, saved, form.reason)
        if t.dtype == torch.bool:  # lossless whatever the rule
            return self._share(h, t, saved, R.MASK, (), lambda: (EF.pack_mask(t), None), _unpack_mask)
        if t.dtype not in _FLOATS:
            return self._store_kept(h, t, saved, "integer tensor (indices or counts)")
        if isinstance(form, rules.Bits):
            return self._store_bits(h, t, form, node, saved)
        if isinstance(form, rules.Winners):
            return self._store_winners(h, t, form.reference(values, node), form.nan_wins, saved)
        return self._store_quantized(h, t, form, saved)

    def _store_quantized(self, h: _Packed, t: torch.Tensor, form: rules.Quantize, saved: str) -> None:
        if t.numel() < self.config.min_numel:
            return self._store_kept(h, t, saved, f"small (fewer than min_numel={self.config.min_numel} elements)")
        if t.untyped_storage().nbytes() < t.numel() * t.element_size():
            return self._store_kept(h, t, saved, "overlapping memory (an expanded view)")
        if self._store_gathered(h, t, form, saved):
            return
        if t.grad_fn is None and (h.op in _DROPOUT_OPS or _is_zero_or_one_value(t)):
            # Made inside the op without history, taking values 0 and v only: dropout's noise on CPU
            # (bernoulli(1 - p) / (1 - p), two-valued by construction), or checked to be so.
            return self._share(h, t, saved, R.MASK, (), lambda: _pack_two_valued(t), _unpack_mask)
        block = self._block_size(t, form)
        sparse = _sparse_if_smaller(t, self.config.bits, block)
        if sparse is not None:  # mostly zeros (bag-of-words sums): its nonzeros take less, and are exact
            return self._share(h, t, saved, R.SPARSE, (), lambda: sparse, _unpack_sparse)
        if self.config.rp_ratio is not None and self.config.rp_ratio < 1 and t.dim() >= 2 and form.linear:
            d = t.shape[-1]
            r = EF.projected_width(d, self.config.rp_ratio)
            if r < d:
                return self._share(h, t, saved, R.PROJECTED, (r,), lambda: self._project(t, r), _unproject)
        return self._share(h, t, saved, R.QUANTIZED, (form.normal_like, block),
                           lambda: self._quantize(t, form.normal_like, block), _dequantize)

    def _store_gathered(self, h: _Packed, t: torch.Tensor, form: rules.Quantize, saved: str) -> bool:
        """Store ``t`` as its sources and index if it is (a view of) a gather of rows, or of a
        concatenation, sum or difference of gathers (:mod:`exactq.gather`), and that stores no more
        elements than ``t``: sources that stay alive anyway are referenced, the others stored once for
        all their gathers, with the most bits (up to 8) whose codes take no more than ``t``'s copies
        would at ``bits``."""
        found = self.gathers.recipe(t)
        if found is None:
            return False
        recipe, sources = found
        inside = [not self._outlives_session(s) for s in sources]
        elements = sum(s.numel() for s, i in zip(sources, inside) if i)
        if elements > t.numel():
            return False  # a few rows of a larger tensor: its copies take less
        bits = max(b for b in EF.SUPPORTED_BITS if b * elements <= self.config.bits * t.numel())
        key = self._key(t) + (R.GATHERED, form.normal_like)
        if self._share_twin(h, t, saved, key):
            return True
        stored, new_bytes = [], 0
        for s, i in zip(sources, inside):
            if not i:
                stored.append(_Referenced(s))
                continue
            source = self._store_source(s, form, bits)
            if source is None:  # non-finite values: t is stored (or kept) as it is
                return False
            stored.append(source[0])
            new_bytes += source[1]
        # An index made in the forward is now held until backward (autograd holds it anyway where the
        # gather itself needs a gradient; counted once either way).
        new_bytes += sum(self._count_kept(i) for i in recipe.indices() if self.tracker.produced(i))
        self.records.append(R.Record(R.GATHERED, h.op, self._count_original(t), new_bytes, saved))
        h.settle((recipe, stored), functools.partial(_rebuild, self._buffers()))
        self._shared.put(key, t, weakref.ref(h))
        return True

    def _outlives_session(self, t: torch.Tensor) -> bool:
        """Neither made in the session nor derived with autograd history: a parameter or input (or a
        view of one), alive anyway, so referencing it costs nothing."""
        root = t._base if t._base is not None else t
        return root.grad_fn is None and not self.tracker.produced(t)

    def _store_source(self, s: torch.Tensor, form: rules.Quantize, bits: int) -> Optional[Tuple["_Source", int]]:
        """``s`` stored as sparse or quantized at ``bits``, once per form: ``(source, bytes newly stored)``."""
        key = self._key(s) + (form.normal_like, bits)
        ref = self._sources.get(key)
        shared = ref() if ref is not None else None
        if shared is not None:
            return shared, 0
        block = self._block_size(s, form, bits)
        payload = _sparse_if_smaller(s, bits, block)
        if payload is not None:
            source = _Source(payload, _unpack_sparse)
        else:
            payload = self._quantize(s, form.normal_like, block, bits)
            if not bool(payload.stats.isfinite().all()):
                return None
            source = _Source(payload, _dequantize)
        self._sources.put(key, s, weakref.ref(source))
        return source, _payload_bytes(payload)

    def _store_bits(self, h: _Packed, t: torch.Tensor, form: rules.Bits, node: Any, saved: str) -> None:
        tv, fv = form.true_value(node), form.false_value(node)
        fused = form.test if isinstance(form.test, str) else None
        test = _FUSED_TESTS[fused] if fused is not None else form.test
        if test(torch.tensor([tv, fv], dtype=t.dtype), node).tolist() != [True, False]:
            return self._store_kept(h, t, saved, "no stand-in values for its comparison")  # would not reproduce it
        if fused is not None and fv == 0:  # pack_mask computes the test itself, unpack_mask writes tv-or-0
            return self._share(h, t, saved, R.SIGN, (fused, tv),
                               lambda: _pack_two_valued(t, fused == "positive", t.new_full((), tv)), _unpack_mask)
        bits = test(t, node)
        if fv == 0 or tv == 0:  # restored in one pass: value where the stored bit is set, else 0
            stored, value = (bits, tv) if fv == 0 else (~bits, fv)
            return self._store_once(h, t, saved, R.COMPARISON, (EF.pack_mask(stored), t.new_full((), value)),
                                    _unpack_mask)
        payload = (EF.pack_mask(bits), t.new_full((), tv), t.new_full((), fv))
        return self._store_once(h, t, saved, R.COMPARISON, payload, _unpack_where)

    def _store_winners(self, h: _Packed, t: torch.Tensor, ref: torch.Tensor, nan_wins: bool, saved: str) -> None:
        win = t == ref
        if nan_wins:
            win |= t.isnan() & ref.isnan()
        # Winners restore as 0 (the result restores as zeros), the rest as NaN, which equals nothing.
        payload = (EF.pack_mask(~win), t.new_full((), math.nan))
        return self._store_once(h, t, saved, R.COMPARISON, payload, _unpack_mask)

    def _block_size(self, t: torch.Tensor, form: rules.Quantize, bits: Optional[int] = None) -> int:
        """The rule's block size, else the configured one, or one block per row where that pays for its
        statistics (:func:`exactq.functional.row_blocks_pay`)."""
        if form.block_size is not None or self.config.block_rows is not None:
            return form.block_size or self.config.block_size_for(t.shape)
        if EF.row_blocks_pay(t, bits or self.config.bits, self.config.block_size):
            return t.shape[-1]
        return self.config.block_size

    # -- exactq's own compute ops (exactq.compute) ---------------------------------------------------
    def stash(self, t: torch.Tensor, op: str) -> _Packed:
        """Store a linear operand that one of exactq's compute ops keeps for its backward (its autograd
        Function saves nothing through the hooks), by the same rules as a matrix product's input."""
        if self._is_external(t):
            return self._keep_now(t, op, R.EXTERNAL)
        h = _Packed(t, op=op)
        with torch.no_grad():
            self._settle(h, rules.LINEAR, None, f"{op}.input", {})
        return h

    def stash_codes(self, t: torch.Tensor, codes: Tuple[torch.Tensor, torch.Tensor], op: str) -> _Packed:
        """Store a linear operand as the int8 codes and per-row scales its forward product ran on, where
        the session stores 8 bits: nothing is quantized again, and backward reads the codes as they are
        (``restore()`` gives the ``(codes, scales)`` pair). Below 8 bits, or for a small or external
        tensor, as :meth:`stash` (``restore()`` gives a float tensor)."""
        if self.config.bits != 8 or t.numel() < self.config.min_numel or self._is_external(t):
            return self.stash(t, op)
        h = _Packed(t, op=op)
        self._share(h, t, f"{op}.input", R.QUANTIZED, ("int8 rows",), lambda: codes, _codes)
        return h

    def restore_rows(self, h: _Packed, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The int8 codes and per-row scales of a 2-D linear operand stored by :meth:`stash` or
        :meth:`stash_codes`: the forward's own codes where those were stored; decoded straight from its
        block codes where it was stored quantized (no float32 copy is made); else the restored tensor
        quantized row by row. Stochastic rounding with ``seed`` where anything is rounded."""
        h.check_version()
        q = h.payload if h.pending is None else None
        if isinstance(q, EF.QuantizedTensor) and len(q.shape) == 2:
            return EF.dequantize_int8(q, seed)
        return quantize_rows(h, seed)

    def keep(self, t: torch.Tensor, op: str, reason: str) -> _Packed:
        """Keep a tensor one of exactq's compute ops needs exactly in its backward (e.g. edge weights),
        counted in the report like any activation kept exactly."""
        if self._is_external(t):
            return self._keep_now(t, op, R.EXTERNAL)
        return self._keep_now(t, op, R.UNCOMPRESSED, reason)

    def next_seed(self) -> int:
        """A fresh seed of this session's stream (stochastic rounding of exactq's compute ops)."""
        return self._next_seed()

    def note_compute(self, op: str, path: str) -> None:
        """Count a product of exactq's compute ops by the path it ran (``int8`` or ``fp32: reason``)."""
        key = f"{op}: {path}"
        self.compute_counts[key] = self.compute_counts.get(key, 0) + 1

    def _next_seed(self) -> int:
        self._calls += 1
        return (self._seed + self._calls * _SEED_STEP) % (2**63 - 1)

    def _quantize(self, t: torch.Tensor, normal_like: bool, block_size: Optional[int] = None,
                  bits: Optional[int] = None) -> EF.QuantizedTensor:
        bits = bits or self.config.bits
        block_size = block_size or self.config.block_size_for(t.shape)
        nonuniform = self.config.nonuniform_for(normal_like) and bits == 2
        return EF.quantize(t, bits, block_size, nonuniform, self._next_seed())

    def _project(self, t: torch.Tensor, r: int) -> Tuple[EF.QuantizedTensor, int, torch.Size]:
        seed = self._next_seed()  # the projection is drawn again from it in backward: nothing else stored
        return self._quantize(EF.random_project(t, r, seed), normal_like=True), seed, t.shape

    # -- bookkeeping --------------------------------------------------------------------------------
    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (_storage_id(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)

    def _count_original(self, t: torch.Tensor, seen: Optional[StorageKeyed] = None) -> int:
        """Bytes autograd would hold for ``t`` beyond what the tensors saved before it (in ``seen``, by
        default every saved tensor) hold: per storage, the most any of its views pins, so views of one
        storage (an index and its rows, expanded) count once. A sparse tensor pins the storages of
        its parts made in the session (a CSR made from a COO adjacency may reuse the COO's values)."""
        if t.is_nested:  # no single strided storage to key on: counted each time it is saved
            return t.values().nbytes
        seen = self._counted if seen is None else seen
        if t.layout == torch.strided:
            return _grow(seen, t, _held_bytes(t))
        new = [p for p in _sparse_parts(t) if t.grad_fn is not None or self.tracker.produced(p)]
        return sum(_grow(seen, p, p.untyped_storage().nbytes()) for p in new)

    def _keep_now(self, t: torch.Tensor, name: str, kind: str, reason: str = "") -> _Packed:
        packed = _Packed(t, t, _identity, op=name)
        if kind == R.EXTERNAL:
            self.records.append(R.Record(kind, name, 0, _held_bytes(t)))
        else:  # an activation stored as is, once, as autograd would store it
            self.records.append(R.Record(kind, name, self._count_original(t), self._count_kept(t), reason=reason))
        return packed

    def _count_kept(self, t: torch.Tensor) -> int:
        """Bytes ``t`` pins once kept as it is: all of them the first time it is kept, even where it
        was saved before in another form (a square's operand, quantized for another op), else 0."""
        return self._count_original(t, self._kept)

    def _store_kept(self, h: _Packed, t: torch.Tensor, saved: str, reason: str) -> None:
        self.records.append(R.Record(R.UNCOMPRESSED, h.op, self._count_original(t), self._count_kept(t), saved, reason))
        h.settle(t, _identity)

    def _store_nothing(self, h: _Packed, t: torch.Tensor, saved: str) -> None:
        """Store nothing: zeros stand in (a zero-stride tensor). Used where backward never reads it (the
        dense operand of a constant sparse product) or reads it only against winners' bits."""
        shape, dtype, device = t.shape, t.dtype, t.device
        self.records.append(R.Record(R.UNNEEDED, h.op, self._count_original(t), 0, saved))
        h.settle(None, lambda _: torch.zeros((), dtype=dtype, device=device).expand(shape))

    def _store_once(self, h: _Packed, t: torch.Tensor, saved: str, kind: str, payload: Any,
                    restore: Callable[[_RestoreBuffers, Any], torch.Tensor]) -> None:
        q = payload if isinstance(payload, EF.QuantizedTensor) else payload[0]
        if isinstance(q, EF.QuantizedTensor) and not bool(q.stats.isfinite().all()):
            # A block with NaN or Inf would restore as NaN throughout; kept, they propagate as in fp32
            # (masked log-softmax's -inf has a finite gradient). The block statistics tell at no cost.
            return self._store_kept(h, t, saved, "holds NaN or Inf (kept so they propagate as in fp32)")
        self.records.append(R.Record(kind, h.op, self._count_original(t), _payload_bytes(payload), saved))
        h.settle(payload, functools.partial(restore, self._buffers()))

    def _share(self, h: _Packed, t: torch.Tensor, saved: str, kind: str, form_key: tuple, make: Callable[[], Any],
               restore: Callable[[_RestoreBuffers, Any], torch.Tensor]) -> None:
        """Store ``make()``, or share the payload of an identical save in the same form."""
        key = self._key(t) + (kind,) + form_key
        if self._share_twin(h, t, saved, key):
            return
        self._store_once(h, t, saved, kind, make(), restore)
        self._shared.put(key, t, weakref.ref(h))

    def _share_twin(self, h: _Packed, t: torch.Tensor, saved: str, key: tuple) -> bool:
        """Settle ``h`` with the payload of an identical save stored under ``key``, if there is one."""
        ref = self._shared.get(key)
        twin = ref() if ref is not None else None
        if twin is None or twin.pending is not None:
            return False
        self.records.append(R.Record(R.DEDUPLICATED, h.op, self._count_original(t), 0, saved))
        h.settle(twin.payload, twin.restore_fn)
        return True

    def report(self) -> R.MemoryReport:
        return R.MemoryReport.from_records(self.records, self.compute_counts)


def _form_of(form: Any, saved: Any, h: _Packed) -> rules.Form:
    """A field's form; for forms by position (:data:`rules.FUNCTION_RULES`), the form at the position of
    ``h``'s tensor in ``saved`` (kept where it is not found)."""
    if not isinstance(form, tuple):
        return form
    t = h.pending
    # A Function's saved input comes back as a new tensor object over the same memory.
    at = next((i for i, v in enumerate(saved or ()) if isinstance(v, torch.Tensor) and v.data_ptr() == t.data_ptr()
               and v.shape == t.shape and v.stride() == t.stride() and v.dtype == t.dtype), None)
    return form[at] if at is not None and at < len(form) else rules.CUSTOM


def _grow(seen: StorageKeyed, t: torch.Tensor, nbytes: int) -> int:
    """Raise ``t``'s storage's entry in ``seen`` to ``nbytes``; the bytes it grew by."""
    key = (_storage_id(t),)
    before = seen.get(key) or 0
    if nbytes <= before:
        return 0
    seen.put(key, t, nbytes)
    return nbytes - before


_PLACEHOLDER = torch.empty(0)
# The tests exactq.pack_mask computes itself (rules.Bits names them).
_FUSED_TESTS: Dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "nonzero": lambda x, node: x != 0, "positive": lambda x, node: x > 0}
_COMPILED_REASON = "saved by a torch.compile'd region (its compiled backward may read it in any way)"


def _called_from_compiled_region() -> bool:
    """Whether this save comes from the autograd Function that runs a compiled graph (AOTAutograd's
    runtime wrappers call it): a few frames up, only checked for saves made outside any op."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        if "_aot_autograd" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _warn_compiled() -> None:
    warnings.warn(
        "exactq: the tensors a torch.compile'd region saves for backward are kept exactly (its compiled backward "
        "may read them in any way); exactq compresses what eager code saves. Run the model eagerly inside "
        "exactq.compress for the memory saving (README, 'torch.compile').", stacklevel=3)


def _is_zero_or_one_value(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is 0 or its maximum. Only for history-less saved tensors other
    than dropout's noise (rare); a sample of the first elements rules most of them out cheaply."""
    if t.numel() == 0:
        return False
    flat, top = t.reshape(-1), t.amax()
    for part in (flat[:4096], flat):
        if not bool(torch.logical_or(part == 0, part == top).all()):
            return False
    return True


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


def _unpack_where(pool: _RestoreBuffers, payload: Tuple[EF.PackedMask, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mask, true_value, false_value = payload
    return torch.where(EF.unpack_mask(mask), true_value, false_value)


# Density of a strided sample above which a tensor is not tried as sparse (the exact count costs a pass).
_SPARSE_SAMPLE = 4096


def _sparse_if_smaller(t: torch.Tensor, bits: int, block_size: int):
    """``(crow, col, values, shape)`` of ``t`` seen as rows of its last dimension (CSR, int32 row
    pointers, int16 columns where they fit), if that takes fewer bytes than quantizing it at ``bits`` in
    blocks of ``block_size`` (codes and two bfloat16 statistics per block); else None."""
    quantized_nbytes = (t.numel() * bits + 7) // 8 + -(-t.numel() // block_size) * 4
    if t.dim() < 2 or not t.is_floating_point() or t.numel() >= 2**31 or t.layout != torch.strided:
        return None
    d = t.shape[-1]
    rows = t.numel() // max(d, 1)
    col_bytes = 2 if d <= 32767 else 4
    per_nonzero = col_bytes + t.element_size()
    budget = quantized_nbytes - (rows + 1) * 4
    flat = t.reshape(-1)
    sample = flat[::max(1, flat.numel() // _SPARSE_SAMPLE)]
    if budget <= 0 or int(torch.count_nonzero(sample)) * per_nonzero > 2 * budget * sample.numel() / flat.numel():
        return None
    if int(torch.count_nonzero(flat)) * per_nonzero >= budget:
        return None
    x = flat.view(rows, d)
    nonzero = x != 0
    crow = torch.zeros(rows + 1, dtype=torch.int32, device=t.device)
    torch.cumsum(nonzero.sum(1), 0, out=crow[1:])
    col = nonzero.nonzero()[:, 1].to(torch.int16 if col_bytes == 2 else torch.int32)
    return crow, col, x[nonzero], t.shape


def _unpack_sparse(pool: _RestoreBuffers, payload) -> torch.Tensor:
    crow, col, values, shape = payload
    d = shape[-1]
    out = pool.empty(math.prod(shape), values.dtype, values.device)
    out = (torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device) if out is None
           else out.zero_()).view(-1, d)
    rows = torch.repeat_interleave(torch.arange(out.shape[0], device=crow.device), crow.diff().long())
    out[rows, col.long()] = values
    return out.view(shape)


def _dequantize(pool: _RestoreBuffers, q: EF.QuantizedTensor) -> torch.Tensor:
    return EF.dequantize(q, out=pool.empty(q.numel, q.dtype, q.packed.device))


def _unproject(pool: _RestoreBuffers, payload: Tuple[EF.QuantizedTensor, int, torch.Size]) -> torch.Tensor:
    q, seed, shape = payload
    y = EF.dequantize(q)  # r columns: small
    d = shape[-1]
    return EF.random_unproject(y, d, seed, out=pool.empty(y.shape[0] * d, y.dtype, y.device)).view(shape)


class _Source:
    """A gathered tensor's source as stored (sparse or quantized), shared by all its gathers."""

    __slots__ = ("payload", "restore_fn", "__weakref__")

    def __init__(self, payload: Any, restore_fn: Callable[[_RestoreBuffers, Any], torch.Tensor]) -> None:
        self.payload, self.restore_fn = payload, restore_fn

    def restore(self, pool: _RestoreBuffers) -> torch.Tensor:
        return self.restore_fn(pool, self.payload)


class _Referenced:
    """A gathered tensor's source that stays alive anyway (an input or a parameter)."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor, self.version = t, t._version

    def restore(self, pool: _RestoreBuffers) -> torch.Tensor:
        if self.tensor._version != self.version:  # the gathered rows would differ from those saved
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: the tensor rows were gathered from is at version {self.tensor._version}; "
                f"expected version {self.version} instead (detected by exactq).")
        return self.tensor


def _rebuild(pool: _RestoreBuffers, payload: Tuple[Recipe, List[Any]]) -> torch.Tensor:
    recipe, sources = payload
    return recipe.build([s.restore(pool) for s in sources])


def _payload_bytes(payload: Any) -> int:
    if isinstance(payload, EF.QuantizedTensor):
        return payload.nbytes
    # projected: (QuantizedTensor, seed, shape); masks: (PackedMask, values...); sparse: (crow, col, values, shape)
    if isinstance(payload[0], EF.QuantizedTensor):
        return payload[0].nbytes
    if isinstance(payload[0], torch.Tensor):
        return sum(v.nbytes for v in payload[:3])
    return payload[0].nbytes + sum(v.nbytes for v in payload[1:] if isinstance(v, torch.Tensor))
