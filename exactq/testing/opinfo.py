"""Sweep PyTorch's OpInfo database: every differentiable op's gradients with and without exactq.

For each op in ``torch.testing._internal.common_methods_invocations.op_db`` that supports autograd at
float32 on CPU, the first few of its own sample inputs are run twice, plainly and inside
``exactq.compress(bits=bits, min_numel=0)``, with the same random-op seed and the same random output
weights, and the gradients of every input that requires one are compared. This is how the ``Keep``
entries of :mod:`exactq.rules` were found, and ``tests/test_opinfo_sweep.py`` holds exactq to it.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map

import exactq


@dataclass(frozen=True)
class SampleResult:
    """One sample of one op. ``error``: ||g - g32|| / max(||g32||, 1e-3 sqrt(n)) over the n gradient
    entries where fp32 is finite; ``nonfinite``: entries where fp32's gradient is
    finite and exactq's is not; ``kept``: saved tensors exactq stored exactly (report count)."""

    op: str
    sample: int
    error: float
    nonfinite: int
    kept: int
    saved: int
    failure: Optional[str] = None  # exactq raised where fp32 did not


def differentiable_ops(dtype: torch.dtype = torch.float32) -> List:
    """The OpInfos that support autograd for ``dtype`` on CPU."""
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if op.supports_autograd and dtype in op.supported_dtypes("cpu")]


def _grad_inputs(sample) -> List[torch.Tensor]:
    leaves, _ = tree_flatten((sample.input, sample.args, sample.kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def _loss(out, seed: int) -> Optional[torch.Tensor]:
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad
            and t.dtype.is_floating_point]
    if not outs:
        return None
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)


def _gradients(op, sample, inputs, ctx, seed: int) -> Optional[List[torch.Tensor]]:
    torch.manual_seed(seed)  # random ops (dropout, rrelu...) draw the same numbers both times
    with ctx:
        # Clones (which save nothing) make the op's inputs activations, as inside a model: saved
        # leaves would be referenced as they are and tell nothing.
        inp, args, kwargs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.requires_grad else t,
                                     (sample.input, sample.args, sample.kwargs))
        out = op(inp, *args, **kwargs)
    loss = _loss(out, seed)
    if loss is None:
        return None
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(inputs, grads)]


def _compare(ref: List[torch.Tensor], got: List[torch.Tensor]) -> tuple:
    num = den = 0.0
    nonfinite = numel = 0
    for r, g in zip(ref, got):
        r, g = (t.to_dense() if t.layout != torch.strided else t for t in (r, g))
        r, g = r.double(), g.double()
        finite = r.isfinite()
        nonfinite += int((finite & ~g.isfinite()).sum())
        diff = torch.where(finite & g.isfinite(), g - r, 0.0)
        num += float(diff.pow(2).sum())
        den += float(torch.where(finite, r, 0.0).pow(2).sum())
        numel += r.numel()
    # A floor of 1e-3 per element: where fp32's gradient is zero up to its own rounding (corrcoef of
    # two values), a relative error would only compare two roundings.
    return math.sqrt(num / max(den, 1e-6 * numel)) if num else 0.0, nonfinite


def sweep_op(op, bits: int = 8, samples: int = 3, seed: int = 0) -> Iterator[SampleResult]:
    """Compare exactq's gradients with fp32's on the first ``samples`` sample inputs of ``op``."""
    name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = iter(op.sample_inputs("cpu", torch.float32, requires_grad=True))
        for k in range(samples):
            try:
                sample = next(it)
            except StopIteration:
                return
            inputs = _grad_inputs(sample)
            if not inputs:
                continue
            try:
                ref = _gradients(op, sample, inputs, contextlib.nullcontext(), seed + k)
            except Exception:  # the op or its backward fails in fp32 too: not exactq's to judge
                continue
            if ref is None:
                continue
            session = exactq.compress(bits=bits, min_numel=0, seed=seed + k)
            try:
                got = _gradients(op, sample, inputs, session, seed + k)
            except Exception as exc:  # fails only with exactq: a bug
                yield SampleResult(name, k, math.inf, 0, 0, 0, f"{type(exc).__name__}: {exc}"[:300])
                continue
            error, nonfinite = _compare(ref, got)
            report = session.report()
            kept = report.by_kind.get(exactq.report.UNCOMPRESSED)
            saved = sum(t.count for k_, t in report.by_kind.items() if k_ != exactq.report.EXTERNAL)
            yield SampleResult(name, k, error, nonfinite, kept.count if kept else 0, saved)
