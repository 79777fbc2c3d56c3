"""exactq's pytest plugin, and testing helpers (:mod:`exactq.testing.opinfo`, the OpInfo sweep).

Run any test suite with every test inside an exactq block, to learn in one command whether the
models it exercises are safe to compress::

    pytest -p exactq.testing --exactq-bits 8 tests/

Fixtures and collection run outside the block; each test's call runs inside a fresh
``exactq.compress(bits=..., min_numel=...)`` session. Without ``--exactq-bits`` the plugin does nothing.
"""
from __future__ import annotations

from typing import Any, Generator

import pytest

import exactq

_STATS_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("exactq", "run every test inside exactq.compress")
    group.addoption("--exactq-bits", type=int, default=None, choices=(1, 2, 4, 8),
                    help="compress what autograd saves in every test at this many bits")
    group.addoption("--exactq-min-numel", type=int, default=0,
                    help="smaller saved tensors are kept as they are (default 0: compress all)")


def pytest_configure(config: Any) -> None:
    config.stash[_STATS_KEY] = {"tests": 0, "original": 0, "stored": 0}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: Any) -> Generator[None, None, None]:
    bits = item.config.getoption("exactq_bits")
    if bits is None:
        yield
        return
    session = exactq.compress(bits=bits, min_numel=item.config.getoption("exactq_min_numel"))
    with session:
        yield  # the test's outcome (pass, fail, error) is pytest's; the block always closes
    stats = item.config.stash[_STATS_KEY]
    report = session.report()
    stats["tests"] += 1
    stats["original"] += report.original_bytes
    stats["stored"] += report.stored_bytes


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    bits = config.getoption("exactq_bits")
    if bits is None:
        return
    s = config.stash[_STATS_KEY]
    terminalreporter.write_line(
        f"exactq: {s['tests']} test calls ran inside exactq.compress(bits={bits}); saved activations "
        f"{s['original'] / 2**20:.1f} MB without exactq, {s['stored'] / 2**20:.1f} MB stored")
