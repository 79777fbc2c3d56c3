"""Graphs for the demo, tests and experiments: real Planetoid data and seeded synthetic graphs."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch_geometric.data import Data

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "planetoid"


def load_planetoid(name: str, root: Optional[str] = None) -> Data:
    """Cora, CiteSeer or PubMed with the standard public split, via ``torch_geometric``.

    ``root`` is a writable directory (default: ``$EXACTQ_DATA`` or a temp dir). Where it lacks the raw
    files and a local copy exists (``$EXACTQ_PLANETOID_RAW`` or the project's ``../shared/datasets``),
    they are copied there, so no download is needed; otherwise PyG downloads them.
    """
    from torch_geometric.datasets import Planetoid

    if name not in ("Cora", "CiteSeer", "PubMed"):
        raise ValueError(f"name must be one of 'Cora', 'CiteSeer', 'PubMed', got {name!r}")
    root = Path(root or os.environ.get("EXACTQ_DATA") or Path(tempfile.gettempdir()) / "exactq_data")
    raw = root / name / "raw"
    local = Path(os.environ.get("EXACTQ_PLANETOID_RAW", _SHARED)) / name / "raw"
    raw.parent.mkdir(parents=True, exist_ok=True)
    # Ranks of a distributed run load together: one at a time copies and processes, the others then read.
    with open(raw.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not raw.exists() and local.exists():
            shutil.copytree(local, raw)
        return Planetoid(str(root), name)[0]


def synthetic_graph(
    num_nodes: int,
    num_features: int,
    num_edges: int,
    num_classes: int,
    *,
    signal: float = 0.2,
    homophily: float = 0.4,
    locality: float = 0.0,
    communities: int = 1000,
    seed: int = 0,
    train_frac: float = 0.5,
    val_frac: float = 0.25,
) -> Data:
    """A contextual stochastic block model: a learnable graph of a chosen shape.

    Labels are uniform over ``num_classes``; a node's features are its class centroid (a random
    direction scaled by ``signal``) plus standard normal noise; each undirected edge joins two nodes of
    the same class with probability ``homophily``, else two random nodes. ``num_edges`` counts directed
    edges (each undirected edge is stored both ways), as PyG datasets report them. ``signal=0`` gives a
    graph with the same shape and no signal, enough for memory and speed tables. ``locality`` > 0: that
    fraction of the edges instead joins two nodes of the same community (``communities`` blocks of
    consecutive ids), as real graphs cluster; a partitioner then finds cuts far below a random graph's.
    """
    if min(num_nodes, num_features, num_classes) < 1 or num_edges < 0:
        raise ValueError("num_nodes, num_features, num_classes must be >= 1 and num_edges >= 0")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (num_nodes,), generator=g)
    centroids = torch.randn(num_classes, num_features, generator=g)
    centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12) * signal * num_features**0.5 / 4
    x = centroids[y] + torch.randn(num_nodes, num_features, generator=g)

    half = num_edges // 2
    src = torch.randint(0, num_nodes, (half,), generator=g)
    # Same-class partner: a random node of src's class, found through nodes sorted by class.
    order = torch.argsort(y)
    counts = torch.bincount(y, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    cls = y[src]
    offset = (torch.rand(half, generator=g) * counts[cls]).long().clamp_max(counts[cls] - 1)
    same = order[starts[cls] + offset]
    rand = torch.randint(0, num_nodes, (half,), generator=g)
    dst = torch.where(torch.rand(half, generator=g) < homophily, same, rand)
    if locality > 0:
        size = max(1, num_nodes // max(1, communities))
        start = torch.div(src, size, rounding_mode="floor") * size
        near = (start + (torch.rand(half, generator=g) * size).long()).clamp_max(num_nodes - 1)
        dst = torch.where(torch.rand(half, generator=g) < locality, near, dst)
    edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    del src, dst, same, rand, offset, cls

    perm = torch.randperm(num_nodes, generator=g)
    n_train, n_val = int(train_frac * num_nodes), int(val_frac * num_nodes)
    masks = []
    for lo, hi in ((0, n_train), (n_train, n_train + n_val), (n_train + n_val, num_nodes)):
        m = torch.zeros(num_nodes, dtype=torch.bool)
        m[perm[lo:hi]] = True
        masks.append(m)
    return Data(x=x, edge_index=edge_index, y=y, train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])


def with_sparse_adjacency(data: Data) -> Data:
    """Add ``data.adj_t``, the transposed adjacency as a ``torch.sparse`` CSR tensor (PyG's convention
    for sparse aggregation: row = target node), so convolutions aggregate with a sparse matmul instead
    of materialising one message per edge. Values: ``data.edge_weight`` if it has one, else ones (as a
    shard's ``sparse_adjacency()``)."""
    from torch_geometric.utils import to_torch_csr_tensor

    n = data.num_nodes
    data.adj_t = to_torch_csr_tensor(data.edge_index.flip(0), data.get("edge_weight"), size=(n, n))
    return data


# Shapes (nodes, features, directed edges, classes) of the graphs in the EXACT and ICASSP papers.
PAPER_GRAPHS = {
    "ogbn-arxiv": (169_343, 128, 2 * 1_166_243, 40),
    "flickr": (89_250, 500, 899_756, 7),
    "reddit": (232_965, 602, 114_615_892, 41),
    "yelp": (716_847, 300, 13_954_819, 100),
    "ogbn-products": (2_449_029, 100, 61_859_140, 47),
}
