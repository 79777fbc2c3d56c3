"""Per-op rules: how each saved tensor of each autograd node is stored, in one declarative table.

Autograd saves tensors into the backward node of the op that needs them (``MmBackward0`` keeps
``self`` and ``mat2``, ``ReluBackward0`` its ``result``). The hook engine learns which node and field
each saved tensor belongs to (see :mod:`exactq.engine`) and looks the pair up in :data:`RULES`, the
way ``torch.autocast`` keeps its op lists. A field's form says what is stored:

* :class:`Quantize`: block-wise low-bit (the default for every built-in op not listed): the backward
  formula uses the value smoothly, so unbiased rounding gives a gradient close to fp32's. A tensor of
  rows gathered by an index is stored as its source and the index instead (:mod:`exactq.gather`).
* :class:`Bits`: backward reads only a comparison (ReLU's ``result > 0``, clamp's in-range test): one
  bit per element, restored to values that give the same comparison, so the gradient is exact.
* :class:`Winners`: max/min-type reductions, whose backward finds the winners by ``input == result``:
  one bit per element (winner or not); the result itself needs nothing stored (:class:`Zero`).
* :class:`Zero`: backward reads only the shape (``index_add``'s source) or compares it with winners.
* :class:`Keep`: stored exactly, because the backward uses the value in a way rounding would break
  (a denominator near zero, a sign, an index) or because the op is unknown (custom autograd
  Functions: exactq cannot see how their backward uses what they save). The report counts these.

The ``Keep`` entries for singular or discontinuous formulas were found by sweeping PyTorch's OpInfo
database (``tests/test_opinfo_sweep.py``): every differentiable float op's gradients with and without
exactq at 8 bits, an op being listed when its error exceeded the sweep's bound or it gave a
non-finite value where fp32 was finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class Keep:
    """Stored exactly (counted in the report as kept), with the reason."""

    reason: str


@dataclass(frozen=True)
class Quantize:
    """Block-wise quantized. ``normal_like``: values are normal-like (normalisation inputs), where the
    non-uniform INT2 levels help; ``linear``: the backward uses it linearly (a matrix product's
    operand), so random projection (``rp_ratio``) is unbiased there; ``block_size``: overrides the
    config's (layer norm divides each row by its own spread, so its blocks are its rows: a block must
    not mix a flat row with a wide one)."""

    normal_like: bool = False
    linear: bool = False
    block_size: Optional[int] = None


@dataclass(frozen=True)
class Unneeded:
    """Needed only for the gradient of the node's input ``input_nr``: stored as nothing when that input
    needs no gradient (PyG's constant sparse adjacency in ``A @ X``), else stored as ``otherwise``."""

    input_nr: int
    otherwise: "Form"


@dataclass(frozen=True)
class Bits:
    """One bit per element: ``test(x, node)`` (a bool tensor; ``"nonzero"`` and ``"positive"`` are
    fused kernels), restored as ``true_value`` where set and ``false_value`` elsewhere. The engine
    checks that the two values give the same test result as the bits they stand for (else it keeps
    the tensor), so a wrong pair of values can cost memory but never a gradient."""

    test: Union[str, Callable[[torch.Tensor, Any], torch.Tensor]]
    true_value: Callable[[Any], float]
    false_value: Callable[[Any], float]


@dataclass(frozen=True)
class Winners:
    """Backward compares the field with ``reference(values, node)`` (the result, broadcast or
    gathered to the field's shape) for equality: stored as the "not a winner" bit, restored as 0 for
    winners and NaN for the rest, against a result restored as zeros (``Zero``). ``nan_wins``: the
    formula (``evenly_distribute_backward``) takes NaN inputs as the winners when the result is NaN."""

    reference: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]
    nan_wins: bool = False


@dataclass(frozen=True)
class Zero:
    """Read by backward only for its shape, or through :class:`Winners` comparisons of other fields:
    nothing stored, restored as zeros."""


Form = Union[Keep, Quantize, Unneeded, Bits, Winners, Zero]

QUANTIZE = Quantize()
NORMAL = Quantize(normal_like=True)
LINEAR = Quantize(linear=True)
STATS = Keep("normalisation statistics (backward divides by them; one per feature or row)")
SINGULAR = Keep("backward divides by it or takes its log/root: rounding near zero is unbounded")
SIGN = Keep("backward uses its sign or compares it: rounding near zero flips it")
INDEX = Keep("backward selects or compares with it")
LINALG = Keep("matrix factorisation: backward solves with the factors, so rounding is amplified")
CUSTOM = Keep("custom autograd Function: exactq cannot see how its backward uses what it saves")
SQUARE = Keep("operand of a square: a variance E[x^2] - E[x]^2 cancels its gradient against the mean's")
UNKNOWN = Keep("its node was not found from the op's outputs (e.g. an in-place op on a view)")


def _one(node: Any) -> float:
    return 1.0


def _zero(node: Any) -> float:
    return 0.0


def _attr(name: str) -> Callable[[Any], float]:
    return lambda node: float(getattr(node, "_saved_" + name))


def _mid(lo: str, hi: str) -> Callable[[Any], float]:
    return lambda node: 0.5 * (float(getattr(node, "_saved_" + lo)) + float(getattr(node, "_saved_" + hi)))


def _clamp_test(x: torch.Tensor, node: Any) -> torch.Tensor:
    lo, hi = node._saved_min, node._saved_max
    inside = torch.ones_like(x, dtype=torch.bool) if lo is None else x >= float(lo)
    return inside if hi is None else inside & (x <= float(hi))


def _clamp_inside(node: Any) -> float:
    lo, hi = node._saved_min, node._saved_max
    return float(lo) if lo is not None else float(hi)


def _clamp_outside(node: Any) -> float:
    lo = node._saved_min
    return -math.inf if lo is not None and float(lo) > -math.inf else math.inf


def _shrink_test(x: torch.Tensor, node: Any) -> torch.Tensor:
    lambd = float(node._saved_lambd)
    return ~((x >= -lambd) & (x <= lambd))  # backward passes the gradient outside [-lambd, lambd]


# Sign-like ops: ReLU's backward is `where(result <= 0, 0, grad)`, threshold's `where(self <= t, 0, grad)`
# (NaN passes), leaky ReLU's scales where `x > 0` is false, hardtanh's passes inside the open interval,
# clamp's inside the closed one (NaN never does). Stand-ins are finite or infinite, never NaN: fused
# kernels treat NaN differently in their vectorised body and their scalar tail (hardshrink does).
RELU = Bits("nonzero", _one, _zero)  # result >= 0, so != 0 is > 0, NaN included
POSITIVE = Bits("positive", _one, _zero)
THRESHOLD = Bits(lambda x, n: ~(x <= float(n._saved_threshold)), lambda n: math.inf, lambda n: -math.inf)
HARDTANH = Bits(lambda x, n: (x > float(n._saved_min_val)) & (x < float(n._saved_max_val)),
                _mid("min_val", "max_val"), _attr("min_val"))
CLAMP = Bits(_clamp_test, _clamp_inside, _clamp_outside)
SHRINK = Bits(_shrink_test, lambda n: math.inf, _zero)


def _reduced_result(values: Mapping[str, torch.Tensor], node: Any) -> torch.Tensor:
    """``amax``/``amin``'s result with its reduced dims restored (keepdim=False drops them)."""
    result = values["result"]
    if not node._saved_keepdim:
        ndim = values["self"].dim()
        for d in sorted(int(d) % max(ndim, 1) for d in node._saved_dim):
            result = result.unsqueeze(d)
    return result


def _scatter_value(values: Mapping[str, torch.Tensor], node: Any) -> torch.Tensor:
    return values["result"].gather(node._saved_dim, values["index"])


def _index_reduce_value(values: Mapping[str, torch.Tensor], node: Any) -> torch.Tensor:
    return values["result"].index_select(node._saved_dim, values["index"])


def _layer_norm_rule(node: Any, values: Mapping[str, Any]) -> Dict[str, Form]:
    row = math.prod(node._saved_normalized_shape)
    if row < 16:  # a row this short can be flat next to its mean's bf16 precision: divided by ~sqrt(eps)
        return {"input": Keep("layer norm over fewer than 16 elements"), "result1": STATS, "result2": STATS}
    return {"input": Quantize(normal_like=True, block_size=row), "result1": STATS, "result2": STATS}


def _square_rule(node: Any, values: Mapping[str, Any]) -> Dict[str, Form]:
    """``x * x`` (one tensor saved as both operands): kept. In a variance ``E[x^2] - E[x]^2`` (PyG's
    std/var aggregations, PNA) the gradient ``2 x g`` cancels against the mean's ``2 mean g`` down to
    ``2 (x - mean) g``, which the std's ``1 / (2 std)`` then scales up: independent rounding of ``x``
    and of the mean leaves the full rounding error where the true term is near zero."""
    a, b = values.get("self"), values.get("other")
    same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.layout == b.layout == torch.strided
            and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())
    return {"self": SQUARE, "other": SQUARE} if same else {}


_AMAX = {"self": Winners(_reduced_result), "result": Zero()}
_EVEN = {"self": Winners(lambda v, n: v["result"], nan_wins=True), "result": Zero()}


def _reduce_rule(source: str, value: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]):
    """``scatter_reduce`` / ``index_reduce``: amax/amin compare ``self`` with the result and ``source``
    with ``value`` (the result gathered back to it); prod divides by them."""

    def rule(node: Any, values: Mapping[str, Any]) -> Dict[str, Form]:
        if node._saved_reduce in ("amax", "amin"):
            return {"self": Winners(lambda v, n: v["result"]), source: Winners(value), "result": Zero()}
        if node._saved_reduce == "prod":
            return {"self": SINGULAR, source: SINGULAR, "result": SINGULAR}
        return {}

    return rule


# node name -> {field: form}, or a function of the node and its saved values giving that dict. Fields
# not listed are quantized; built-in nodes not listed too. Entries are grouped by why.
RULES: Dict[str, Union[Dict[str, Form], Callable[[Any, Mapping[str, Any]], Dict[str, Form]]]] = {
    # Matrix products: operands used linearly (projection allowed). A constant sparse A in A @ X needs
    # X only for A's gradient.
    "MmBackward0": {"self": LINEAR, "mat2": Unneeded(0, LINEAR)},
    "AddmmBackward0": {"mat1": LINEAR, "mat2": LINEAR},
    "BmmBackward0": {"self": LINEAR, "mat2": LINEAR},
    "BaddbmmBackward0": {"batch1": LINEAR, "batch2": LINEAR},
    "SparseMmReduceImplBackward0": {"other": Unneeded(0, LINEAR)},
    "SparseAddmmBackward0": {"mat2": Unneeded(1, LINEAR)},
    # Normalisation: the input is normal-like; the statistics are kept.
    "NativeBatchNormBackward0": {"input": NORMAL, "result1": STATS, "result2": STATS},
    "NativeBatchNormLegitBackward0": {"input": NORMAL, "result1": STATS, "result2": STATS},
    "NativeLayerNormBackward0": _layer_norm_rule,
    "NativeGroupNormBackward0": {"input": NORMAL, "result1": STATS, "result2": STATS},
    "CudnnBatchNormBackward0": {"input": NORMAL, "result1": STATS, "result2": STATS, "result3": STATS},
    "RmsNormBackward0": {"input": NORMAL, "rstd": STATS},
    "FusedRmsNormBackward0": {"input": NORMAL, "rstd": STATS},
    # Comparisons: only the bits the backward reads.
    "ReluBackward0": {"result": RELU},
    "ThresholdBackward0": {"self": THRESHOLD},
    "LeakyReluBackward0": {"self": POSITIVE},
    "LeakyReluBackward1": {"result": POSITIVE},
    "HardtanhBackward0": {"self": HARDTANH},
    "ClampBackward1": {"self": CLAMP},
    "ClampMinBackward0": {"self": Bits(lambda x, n: x >= float(n._saved_min), _attr("min"), lambda n: -math.inf)},
    "ClampMaxBackward0": {"self": Bits(lambda x, n: x <= float(n._saved_max), _attr("max"), lambda n: math.inf)},
    "HardshrinkBackward0": {"self": SHRINK},
    "SoftshrinkBackward0": {"self": SHRINK},
    # Max/min reductions: winners found by equality with the result.
    "AmaxBackward0": _AMAX,
    "AminBackward0": _AMAX,
    "MaxBackward1": _EVEN,
    "MinBackward1": _EVEN,
    "MedianBackward0": _EVEN,
    "NanmedianBackward0": _EVEN,
    "ScatterReduceBackward0": _reduce_rule("src", _scatter_value),
    # Only the shape is read (the gradient is expanded to it).
    "IndexAddBackward0": {"source": Zero()},
    "IndexReduceBackward0": _reduce_rule("source", _index_reduce_value),
    # Squares, as variances use them (found on PNA, not by the sweep: each op alone is smooth).
    "MulBackward0": _square_rule,
    "PowBackward0": lambda node, values: {"self": SQUARE} if float(node._saved_exponent) == 2.0 else {},
    # Found by the OpInfo sweep (relative gradient error above 0.05 at 8 bits, or non-finite where
    # fp32 is finite): backwards that compare, select or divide.
    "ClampBackward0": {"self": SIGN, "min": SIGN, "max": SIGN},
    "AminmaxBackward0": {"self": INDEX, "min": INDEX, "max": INDEX},
    "LinalgVectorNormBackward0": {"self": SIGN, "result": SINGULAR},
    "GridSampler2DBackward0": {"grid": INDEX},
    "GridSampler3DBackward0": {"grid": INDEX},
    "DivBackward0": {"self": SINGULAR, "other": SINGULAR},  # self / other^2 when other needs a gradient
    "AddcdivBackward0": {"tensor2": SINGULAR},
    "CumprodBackward0": {"self": SINGULAR, "result": SINGULAR},
    "LogcumsumexpBackward0": {"self": SINGULAR, "result": SINGULAR},
    "LogaddexpBackward0": {"self": SINGULAR, "other": SINGULAR},
    "SoftmaxBackward0": {"result": SINGULAR},
    "SafeSoftmaxBackward0": {"result": SINGULAR},
    "SpecialLogNdtrBackward0": {"self": SINGULAR, "result": SINGULAR},
    "CtcLossBackward0": {"log_probs": SINGULAR, "result0": SINGULAR, "result1": SINGULAR},
    "SqrtBackward0": {"result": SINGULAR},
    **{name: {"self": SINGULAR} for name in (
        "AsinBackward0", "AtanhBackward0", "ErfinvBackward0", "Log1PBackward0", "LogitBackward0",
        "DigammaBackward0", "LgammaBackward0", "PolygammaBackward0")},
    **{name: {f: LINALG for f in fields} for name, fields in (
        ("LinalgSolveExBackward0", ("A", "LU", "result")), ("LinalgLuFactorExBackward0", ("LU",)),
        ("LinalgLuBackward0", ("L", "P", "U")), ("LinalgDetBackward0", ("A", "LU", "result")),
        ("LinalgSlogdetBackward0", ("A", "LU", "sign")))},
}


# exactq's own autograd Functions, whose backward is known, by module-qualified class name: the form of
# each tensor they save, by its position in ``ctx.save_for_backward`` (the saves of any other custom
# Function are kept as they are).
FUNCTION_RULES: Dict[str, Tuple[Form, ...]] = {
    # exactq.distributed's global batch norm saves (input, weight, mean, invstd) and reads them as
    # torch's native batch norm reads its own.
    "exactq.distributed.model._SyncBatchNorm": (NORMAL, STATS, STATS, STATS),
}


def _function_forms(node: Any) -> Optional[Tuple[Form, ...]]:
    cls = getattr(node, "_forward_cls", None)
    return None if cls is None else FUNCTION_RULES.get(f"{cls.__module__}.{cls.__qualname__}")


def declared_function(node: Any) -> bool:
    """Whether ``node`` is the backward of a custom autograd Function listed in :data:`FUNCTION_RULES`."""
    return _is_custom(node) and _function_forms(node) is not None


def node_rule(node: Any, values: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The forms for ``node``'s saved fields (missing fields: quantized), or ``None`` for a custom
    autograd Function, whose backward exactq cannot read (all its saved tensors are kept), unless it is
    in :data:`FUNCTION_RULES` (then ``{"saved_tensors": forms by position}``). ``values``: the fields'
    tensors as saved (a rule may depend on them, e.g. a square's two operands being one)."""
    if _is_custom(node):
        forms = _function_forms(node)
        return None if forms is None else {"saved_tensors": forms}
    rule = RULES.get(type(node).__name__, {})
    return rule(node, values or {}) if callable(rule) else rule


def _is_custom(node: Any) -> bool:
    return isinstance(node, torch.autograd.function.BackwardCFunction) or "CppNode" in type(node).__name__
