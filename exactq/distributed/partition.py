"""Cutting a graph into parts: METIS (through ``pymetis``) or random, with the cut and balance logged."""
from __future__ import annotations

import logging
from typing import Dict

import torch

log = logging.getLogger(__name__)

METHODS = ("metis", "random")


def check_edge_index(edge_index: object, num_nodes: int, name: str = "edge_index") -> torch.Tensor:
    if not isinstance(edge_index, torch.Tensor) or edge_index.dtype != torch.long or edge_index.dim() != 2 \
            or edge_index.shape[0] != 2:
        got = f"{edge_index.dtype} of shape {tuple(edge_index.shape)}" if isinstance(edge_index, torch.Tensor) \
            else type(edge_index).__name__
        raise ValueError(f"{name} must be a LongTensor of shape (2, num_edges), got {got}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"{name} holds node ids outside [0, num_nodes={num_nodes})")
    return edge_index


def _check_count(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def partition_stats(edge_index: torch.Tensor, parts: torch.Tensor, num_parts: int) -> Dict[str, float]:
    """Edge cut (edges whose endpoints lie in different parts, and their fraction) and balance (largest
    part over the mean part size)."""
    cut = int((parts[edge_index[0]] != parts[edge_index[1]]).sum())
    sizes = torch.bincount(parts, minlength=num_parts)
    return {"edge_cut": cut, "cut_fraction": cut / max(1, edge_index.shape[1]),
            "balance": float(sizes.max()) / (parts.numel() / num_parts), "sizes": sizes.tolist()}


def partition(edge_index: torch.Tensor, num_nodes: int, num_parts: int, method: str = "metis",
              seed: int = 0) -> torch.Tensor:
    """Assigns every node to one of ``num_parts`` parts.

    Args:
        edge_index: LongTensor (2, num_edges); read as undirected, self-loops and duplicates ignored.
        num_nodes: number of nodes (isolated ones included).
        num_parts: parts wanted, 1 <= num_parts <= num_nodes.
        method: ``"metis"`` (a min-cut balanced partition by METIS, through ``pymetis``) or
            ``"random"`` (balanced, uniformly at random: the baseline METIS is measured against).
        seed: seed of METIS or of the random assignment.

    Returns:
        LongTensor (num_nodes,) of part ids in [0, num_parts). Edge cut and balance are logged.
    """
    num_nodes = _check_count("num_nodes", num_nodes)
    num_parts = _check_count("num_parts", num_parts)
    if num_parts > num_nodes:
        raise ValueError(f"num_parts must be <= num_nodes ({num_nodes}), got {num_parts}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    seed = _check_count("seed", seed, 0)
    edge_index = check_edge_index(edge_index, num_nodes)
    if num_parts == 1:
        parts = torch.zeros(num_nodes, dtype=torch.long)
    elif method == "random":
        perm = torch.randperm(num_nodes, generator=torch.Generator().manual_seed(seed))
        parts = torch.empty(num_nodes, dtype=torch.long)
        parts[perm] = torch.arange(num_nodes) % num_parts
    else:
        parts = _metis(edge_index, num_nodes, num_parts, seed)
    stats = partition_stats(edge_index, parts, num_parts)
    log.info("%s partition into %d parts: edge cut %d (%.1f%% of edges), balance %.3f", method, num_parts,
             stats["edge_cut"], 100 * stats["cut_fraction"], stats["balance"])
    return parts


def _metis(edge_index: torch.Tensor, num_nodes: int, num_parts: int, seed: int) -> torch.Tensor:
    try:
        import pymetis
    except ImportError as exc:  # pragma: no cover - pymetis is a dependency
        raise ImportError("method='metis' needs pymetis (pip install pymetis)") from exc
    # METIS wants a symmetric adjacency without self-loops or duplicates, in CSR form.
    row, col = torch.cat([edge_index, edge_index.flip(0)], 1)
    keep = row != col
    key = torch.unique(row[keep] * num_nodes + col[keep])
    row, col = key // num_nodes, key % num_nodes
    xadj = torch.zeros(num_nodes + 1, dtype=torch.long)
    xadj[1:] = torch.cumsum(torch.bincount(row, minlength=num_nodes), 0)
    _, membership = pymetis.part_graph(num_parts, adjacency=pymetis.CSRAdjacency(xadj.numpy(), col.numpy()),
                                       options=pymetis.Options(seed=seed))
    return torch.as_tensor(membership, dtype=torch.long)
