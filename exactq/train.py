"""Full-batch training with or without compression: the loop the demo and experiments share."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch_geometric.data import Data
from torch_geometric.nn import GCN2Conv
from torch_geometric.nn.models import GAT, GCN, GIN, GraphSAGE
from tqdm.auto import tqdm

from .api import compress
from .compute.structure import structure_of
from .config import Config
from .functional import draw_seed
from .memory import LiveTensorMemory
from .report import MemoryReport


class GCNII(torch.nn.Module):
    """GCNII (Chen et al. 2020) from PyG's ``GCN2Conv``: input/output linears, ``layers`` convolutions."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, layers: int,
                 dropout: float = 0.5, alpha: float = 0.1, theta: float = 0.5) -> None:
        super().__init__()
        self.lin_in = torch.nn.Linear(in_channels, hidden)
        self.convs = torch.nn.ModuleList(
            GCN2Conv(hidden, alpha, theta, layer + 1, normalize=True) for layer in range(layers)
        )
        self.lin_out = torch.nn.Linear(hidden, out_channels)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training)
        x = x0 = F.relu(self.lin_in(x))
        for conv in self.convs:
            x = F.dropout(x, self.dropout, self.training)
            x = F.relu(conv(x, x0, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.lin_out(x)


MODELS = ("gcn", "sage", "gat", "gatv2", "gin", "gcnii")


def build_model(name: str, in_channels: int, hidden: int, out_channels: int, layers: int,
                norm: Optional[str] = "batch_norm", dropout: float = 0.5, act: str = "relu") -> torch.nn.Module:
    """A PyG model by name (one of ``MODELS``), unchanged from ``torch_geometric.nn``."""
    kw = dict(dropout=dropout, norm=norm, act=act)
    if name == "gcn":
        return GCN(in_channels, hidden, layers, out_channels, **kw)
    if name == "sage":
        return GraphSAGE(in_channels, hidden, layers, out_channels, **kw)
    if name in ("gat", "gatv2"):
        return GAT(in_channels, hidden, layers, out_channels, v2=name == "gatv2", heads=2, **kw)
    if name == "gin":
        return GIN(in_channels, hidden, layers, out_channels, **kw)
    if name == "gcnii":
        return GCNII(in_channels, hidden, out_channels, layers, dropout=dropout)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


@dataclass
class RunResult:
    """Outcome of :func:`train`."""

    best_val: float
    test_at_best_val: float
    epoch_times: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    test_curve: List[float] = field(default_factory=list)  # test_at_best_val after each epoch
    report: Optional[MemoryReport] = None
    activation_bytes: Optional[int] = None  # measured: live bytes after forward minus the output

    @property
    def median_epoch_time(self) -> float:
        ts = sorted(self.epoch_times[1:] or self.epoch_times)  # the first epoch includes warm-up
        return ts[len(ts) // 2]


def _accuracy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    return float((logits[mask].argmax(-1) == y[mask]).float().mean())


def train(model: torch.nn.Module, data: Data, config: Optional[Config], *, epochs: int = 200,
          lr: float = 0.01, weight_decay: float = 5e-4, progress: bool = False, desc: str = "",
          measure_memory: bool = True) -> RunResult:
    """Full-batch training; ``config=None`` trains in fp32. Memory is measured on the first epoch.

    Aggregates with ``data.adj_t`` when present (see ``exactq.data.with_sparse_adjacency``), else with
    ``data.edge_index``. Every epoch takes one seed from torch's generator whatever the config, so under
    one ``torch.manual_seed`` an fp32 run and a compressed one see the same dropout masks.
    """
    graph = data.adj_t if "adj_t" in data else data.edge_index
    if config is not None and config.compute is not None and isinstance(graph, torch.Tensor):
        structure_of(graph)  # the adjacency's transpose for int8 backward: graph memory, built before measuring
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    result = RunResult(0.0, 0.0)
    for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        model.train()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if config is None or config.seed is not None:
            draw_seed()  # the draw a session with seed=None makes itself: the same stream for every config
        session = compress(config) if config is not None else contextlib.nullcontext()
        tracker = LiveTensorMemory() if measure_memory and epoch == 0 else contextlib.nullcontext()
        with tracker:
            with session:
                out = model(data.x, graph)
            if isinstance(tracker, LiveTensorMemory):
                result.activation_bytes = tracker.live_bytes() - out.untyped_storage().nbytes()
        loss = F.cross_entropy(out[data.train_mask], data.y[data.train_mask])
        loss.backward()
        opt.step()
        result.epoch_times.append(time.perf_counter() - t0)
        result.losses.append(loss.item())
        if epoch == 0 and config is not None:
            result.report = session.report()
        model.eval()
        with torch.no_grad():
            logits = model(data.x, graph)
        val = _accuracy(logits, data.y, data.val_mask)
        if val >= result.best_val:
            result.best_val, result.test_at_best_val = val, _accuracy(logits, data.y, data.test_mask)
        result.test_curve.append(result.test_at_best_val)
    return result
