"""What a compression session stored: per saved tensor records and their summary."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

# How a saved tensor was stored.
QUANTIZED = "quantized"  # block-wise low-bit
PROJECTED = "projected"  # random projection, then block-wise low-bit
MASK = "mask"  # bool tensor, 1 bit per element
SPARSE = "sparse"  # mostly zeros: its nonzeros and their positions, exact (smaller than quantized)
SIGN = "sign"  # output of ReLU-like op, only its sign kept (1 bit)
COMPARISON = "comparison"  # only the comparison backward reads (max/min winners, clamp's range): 1 bit
UNCOMPRESSED = "uncompressed"  # an activation kept as is (small, integer, sparse, or unsafe to round)
EXTERNAL = "external"  # parameter or input that stays alive anyway: referenced, not copied
GATHERED = "gathered"  # rows copied from another tensor by an index: its source and the index (held anyway)
DEDUPLICATED = "deduplicated"  # saved before by another op in the same form: shared
UNNEEDED = "unneeded"  # never read by backward (A @ X's X for a constant A; max's result): nothing stored
KINDS = (QUANTIZED, PROJECTED, SPARSE, GATHERED, MASK, SIGN, COMPARISON, UNCOMPRESSED, EXTERNAL, DEDUPLICATED,
         UNNEEDED)


@dataclass(frozen=True)
class Record:
    """One saved tensor. ``original_bytes`` is what autograd would hold for it without exactq (zero
    when the same tensor was already counted, or when it stays alive anyway). ``saved`` names the
    autograd node and field that hold it (e.g. ``AddmmBackward0.mat1``), ``reason`` why it was kept."""

    kind: str
    op: str
    original_bytes: int
    stored_bytes: int
    saved: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Totals:
    count: int = 0
    original_bytes: int = 0
    stored_bytes: int = 0

    def add(self, r: Record) -> "Totals":
        return Totals(self.count + 1, self.original_bytes + r.original_bytes, self.stored_bytes + r.stored_bytes)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


@dataclass(frozen=True)
class MemoryReport:
    """Summary of the activations saved inside a compression session.

    Attributes:
        original_bytes: bytes the saved activations would take without exactq (each tensor once;
            parameters and inputs that stay alive anyway excluded).
        stored_bytes: bytes exactq actually stores for them.
        external_bytes: bytes of parameters/inputs referenced as they are (alive anyway, not counted).
        by_kind: totals per storage kind (see ``exactq.report.KINDS``).
        by_op: totals per op that saved the tensor.
        kept: totals of the activations kept exactly, per reason (see :mod:`exactq.rules`).
        compute: with ``compute="int8"``, how many products ran each path, keyed ``"op: path"`` (``int8``,
            or ``fp32: <reason>`` for a fallback; see :mod:`exactq.compute.functional`).
        graph_cache_bytes: with ``compute="int8"``, bytes of the graph structures (a graph's CSR and its
            transpose) built during the session and still cached: graph memory made once per graph and
            reused by later forwards and sessions, not activations, so not in the totals above.
    """

    original_bytes: int
    stored_bytes: int
    external_bytes: int
    by_kind: Dict[str, Totals] = field(default_factory=dict)
    by_op: Dict[str, Totals] = field(default_factory=dict)
    kept: Dict[str, Totals] = field(default_factory=dict)
    compute: Dict[str, int] = field(default_factory=dict)
    graph_cache_bytes: int = 0

    @property
    def ratio(self) -> float:
        """original_bytes / stored_bytes (how many times smaller the saved activations are)."""
        return self.original_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    @classmethod
    def from_records(cls, records: Iterable[Record], compute: Optional[Dict[str, int]] = None) -> "MemoryReport":
        by_kind: Dict[str, Totals] = {}
        by_op: Dict[str, Totals] = {}
        kept: Dict[str, Totals] = {}
        original = stored = external = 0
        for r in records:
            by_kind[r.kind] = by_kind.get(r.kind, Totals()).add(r)
            if r.kind == EXTERNAL:
                external += r.stored_bytes
                continue
            by_op[r.op] = by_op.get(r.op, Totals()).add(r)
            if r.kind == UNCOMPRESSED:
                kept[r.reason] = kept.get(r.reason, Totals()).add(r)
            original += r.original_bytes
            stored += r.stored_bytes
        return cls(original, stored, external, by_kind, by_op, kept, dict(compute or {}))

    def _rows(self, title: str, items: Iterable[Tuple[str, Totals]], width: int = 24) -> list[str]:
        rows = [f"{title:<{width}} {'saved':>6} {'original MB':>12} {'stored MB':>10} {'ratio':>7}"]
        for name, t in sorted(items, key=lambda kv: -kv[1].original_bytes):
            ratio = f"{t.original_bytes / t.stored_bytes:.1f}x" if t.stored_bytes else "-"
            rows.append(f"{name:<{width}} {t.count:>6} {_mb(t.original_bytes):>12} {_mb(t.stored_bytes):>10} {ratio:>7}")
        return rows

    def __str__(self) -> str:
        lines = [
            f"saved activations: {_mb(self.original_bytes)} MB without exactq, {_mb(self.stored_bytes)} MB stored "
            f"({self.ratio:.1f}x smaller); {_mb(self.external_bytes)} MB of parameters/inputs referenced",
            "",
        ]
        lines += self._rows("by kind", self.by_kind.items())
        lines.append("")
        lines += self._rows("by op", self.by_op.items())
        if self.kept:
            lines.append("")
            lines += self._rows("kept exactly, because", self.kept.items(), width=60)
        if self.graph_cache_bytes:
            lines += ["", f"graph structures built for int8 compute and cached (graph memory, reused by later "
                          f"forwards): {_mb(self.graph_cache_bytes)} MB"]
        if self.compute:
            lines += ["", f"{'compute (products so far, by path)':<60} {'count':>6}"]
            lines += [f"{k:<60} {v:>6}" for k, v in sorted(self.compute.items())]
        return "\n".join(lines)
