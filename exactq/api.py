"""User API: compress everything autograd saves inside a block, a function or a module's forward."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional, Tuple, TypeVar

import torch

from . import functional as EF
from .compute.mode import routed, session_hooks
from .compute.structure import cache_mark, cached_bytes_since
from .config import Config, make_config
from .engine import HookEngine, OpTracker
from .report import MemoryReport

F = TypeVar("F", bound=Callable[..., Any])


class CompressionSession(contextlib.ContextDecorator):
    """A compression block: everything autograd saves inside is stored per the policy of
    :meth:`exactq.engine.HookEngine.pack`, and restored when backward needs it (backward may run
    after the block ends, any number of times with ``retain_graph=True``).

    Use :func:`compress` to make one. As a decorator, each call of the decorated function runs in a
    fresh session; the latest is ``session.last``.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.last: Optional["CompressionSession"] = None
        self._engine: Optional[HookEngine] = None
        self._stack: Optional[contextlib.ExitStack] = None
        self._cache_mark: Optional[Tuple[int, int]] = None

    def __enter__(self) -> "CompressionSession":
        if self._engine is not None:
            raise RuntimeError("a compression session is entered once; call exactq.compress(...) again")
        seed = self.config.seed if self.config.seed is not None else EF.draw_seed()
        tracker = OpTracker()
        self._engine = HookEngine(self.config, tracker, seed)
        with contextlib.ExitStack() as stack:
            stack.enter_context(tracker)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._engine.pack, self._engine.unpack))
            if self.config.compute is not None:  # innermost: it sees the model's ops first
                self._cache_mark = cache_mark()
                stack.enter_context(routed(session_hooks(self._engine)))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            try:
                self._engine.finish()
            finally:
                stack.close()

    def _recreate_cm(self) -> "CompressionSession":  # used by ContextDecorator for each call
        self.last = CompressionSession(self.config)
        return self.last

    def report(self) -> MemoryReport:
        """What the session saved so far: bytes without exactq, bytes stored, breakdowns."""
        if self._engine is None:
            if self.last is not None:
                return self.last.report()
            raise RuntimeError("the session has not run yet: use it as `with exactq.compress(...) as s:`")
        report = self._engine.report()
        if self._cache_mark is None:
            return report
        return dataclasses.replace(report, graph_cache_bytes=cached_bytes_since(self._cache_mark))


def compress(config: Optional[Config] = None, **options: Any) -> CompressionSession:
    """Compress the activations autograd saves inside a ``with`` block (or a decorated function).

    Args:
        config: an :class:`exactq.Config`; keyword ``options`` (its field names) override it.

    Example::

        with exactq.compress(bits=2) as session:
            loss = F.cross_entropy(model(x, edge_index)[mask], y[mask])
        loss.backward()
        print(session.report())

    Nested blocks: the innermost applies. Hooks and modes are removed on exit, exceptions included.
    """
    return CompressionSession(make_config(config, **options))


def compressed(config: Optional[Config] = None, **options: Any) -> Callable[[F], F]:
    """Decorator form of :func:`compress`: ``@exactq.compressed(bits=2)`` on a training-step
    function or a module's ``forward`` runs each call in a fresh compression session."""
    session = compress(config, **options)

    def decorate(fn: F) -> F:
        wrapped = session(fn)
        wrapped.exactq_session = session  # type: ignore[attr-defined]  # .last is the latest call's
        return wrapped  # type: ignore[return-value]

    return decorate


class _CompressedForward:
    """``model.forward`` after :func:`wrap`: the class's ``forward`` run in a fresh compression session
    per call. A plain object holding the module and the config, not a closure over the bound method,
    so ``copy.deepcopy`` and pickling (``torch.save``) of the module carry it over to the copy."""

    def __init__(self, module: torch.nn.Module, config: Config) -> None:
        self.module = module
        self.config = config
        self.exactq_session = CompressionSession(config)  # .last: the latest call's session

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.exactq_session._recreate_cm():
            return type(self.module).forward(self.module, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {"module": self.module, "config": self.config}  # not the latest session (its graph)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["module"], state["config"])


def wrap(model: torch.nn.Module, config: Optional[Config] = None, **options: Any) -> torch.nn.Module:
    """Make ``model.forward`` run compressed; returns the same module (unchanged otherwise).

    The latest call's session is ``model.forward.exactq_session.last``; ``unwrap`` undoes it. A
    wrapped model survives ``copy.deepcopy`` (the copy is wrapped and runs its own parameters),
    ``torch.save`` / ``torch.load`` of the module (``weights_only=False``, as for any pickled module)
    and ``state_dict`` round trips.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if "forward" in model.__dict__:
        if isinstance(model.__dict__["forward"], _CompressedForward):
            raise ValueError("model is already wrapped by exactq.wrap; call exactq.unwrap(model) first")
        raise ValueError("model.forward is an instance attribute; exactq.wrap wraps the class's forward only")
    model.forward = _CompressedForward(model, make_config(config, **options))
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`wrap`."""
    if isinstance(model.__dict__.get("forward"), _CompressedForward):
        del model.forward
    return model
