"""Max/min-aggregation models with exactq: accuracy (INT2 vs fp32) and the activation memory of a
max-aggregation GraphSAGE on an ogbn-arxiv-shaped graph.

    python experiments/max_aggregation.py [--quick] [--seeds 10] [--epochs 100] [--planetoid Cora CiteSeer]
                                          [--tasks planetoid ego synthetic] [--ego-epochs 50] [--bits 2]

Their backwards find the winners of each max by ``input == result``; exactq stores one bit per element
for that (exactq.rules: Winners) and nothing for the result, so those ops' gradients are exact.
Accuracy (PyG models, unchanged, edge_index aggregation, dropout 0.5, test accuracy at the best
validation epoch): GraphSAGE(aggr="max") 2 x 64 on the real Planetoid graphs, and GIN 2 x 64 +
global_max_pool on a graph-level task made from them (every node's 1-hop ego graph, labelled and split
as its centre node); EdgeCNN and PNA (mean/min/max/std) 2 x 64 on the Planetoid graphs with their
features reduced to 128 SVD columns (``reduced_features``: both transform every edge's concatenated
endpoint features); GraphSAGE(aggr="max"), EdgeCNN and PNA on a learnable synthetic graph (3,000 nodes,
32 features, 30,000 edges, 5 classes). Memory: GraphSAGE(aggr="max") 3 x 128 with batch norm, one
training forward, live tensor bytes after it minus the output (exactq.LiveTensorMemory), and exactq's report.
"""
from __future__ import annotations

import contextlib
import statistics

import torch
from torch_geometric.data import Data
from torch_geometric.nn import GIN, PNA, EdgeCNN, GraphSAGE, global_max_pool
from torch_geometric.utils import degree, k_hop_subgraph
from tqdm import tqdm

import exactq
from exactq.data import load_planetoid, synthetic_graph
from exactq.train import train

from common import Timer, apply_threads, command_line, paper_graph, parser, write_results


def _models(data):
    deg = torch.bincount(degree(data.edge_index[1], data.num_nodes, dtype=torch.long))
    f, c = data.num_features, int(data.y.max()) + 1
    return {
        "GraphSAGE max 2x64": lambda: GraphSAGE(f, 64, 2, c, aggr="max", dropout=0.5),
        # Without batch norm EdgeCNN stays near the majority class on Cora/CiteSeer in fp32 (35% / 29%).
        "EdgeCNN 2x64": lambda: EdgeCNN(f, 64, 2, c, dropout=0.5, norm="batch_norm"),
        "PNA 2x64": lambda: PNA(f, 64, 2, c, aggregators=["mean", "min", "max", "std"],
                                scalers=["identity", "amplification", "attenuation"], deg=deg, dropout=0.5),
    }


TASKS = ("planetoid", "ego", "synthetic")


class GINMaxPool(torch.nn.Module):
    """GIN 2 x 64, then global_max_pool over each graph of a batch (PyG modules, unchanged)."""

    def __init__(self, in_channels: int, classes: int, batch: torch.Tensor):
        super().__init__()
        self.gin = GIN(in_channels, 64, 2, dropout=0.5)
        self.lin = torch.nn.Linear(64, classes)
        self.register_buffer("batch", batch)

    def forward(self, x, edge_index):
        return self.lin(global_max_pool(self.gin(x, edge_index), self.batch))


def ego_graphs(data):
    """A graph-level task from a node-level graph: the disjoint union of every node's 1-hop ego graph,
    labelled (and split) as its centre node. Returns the union as a Data and its batch vector."""
    xs, eis, batch, offset = [], [], [], 0
    for i in range(data.num_nodes):
        subset, ei, _, _ = k_hop_subgraph(i, 1, data.edge_index, relabel_nodes=True, num_nodes=data.num_nodes)
        xs.append(data.x[subset])
        eis.append(ei + offset)
        batch.append(torch.full((subset.numel(),), i))
        offset += subset.numel()
    union = Data(x=torch.cat(xs), edge_index=torch.cat(eis, 1), y=data.y, train_mask=data.train_mask,
                 val_mask=data.val_mask, test_mask=data.test_mask)
    return union, torch.cat(batch)


def reduced_features(data, width: int = 128):
    """``data`` with its bag-of-words replaced by the top ``width`` components of a truncated SVD of the
    row-normalised, centred features (scaled to unit standard deviation), for the models that transform
    every edge's concatenated endpoint features (EdgeCNN, PNA): on Cora's 1,433 or CiteSeer's 3,703
    columns those take 0.4-16 s per epoch here, on 128 columns 0.03-0.13 s."""
    torch.manual_seed(0)
    x = data.x / data.x.sum(1, keepdim=True).clamp_min(1)
    u, s, _ = torch.svd_lowrank(x - x.mean(0), q=width, niter=4)
    out = data.clone()
    out.x = u * s
    out.x = out.x / out.x.std()
    return out


def memory_rows(scale: float):
    data = paper_graph("ogbn-arxiv", scale=scale)
    torch.manual_seed(0)
    model = GraphSAGE(data.num_features, 128, 3, 40, aggr="max", norm="batch_norm", dropout=0.5)
    model.train()
    out = {}
    for label, ctx in (("fp32", None), ("INT2", exactq.Config(bits=2))):
        torch.manual_seed(1)
        with exactq.LiveTensorMemory() as mem:
            with exactq.compress(ctx) if ctx else contextlib.nullcontext() as session:
                y = model(data.x, data.edge_index)
            out[label] = mem.live_bytes() - y.untyped_storage().nbytes()
        if ctx:
            report = session.report()
        del y
    return [{"graph": f"ogbn-arxiv shape x {scale}", "nodes": data.num_nodes, "edges": data.edge_index.shape[1],
             "fp32 MB": out["fp32"] / 2**20, "INT2 MB": out["INT2"] / 2**20, "x smaller": out["fp32"] / out["INT2"],
             "report fp32 MB": report.original_bytes / 2**20, "report stored MB": report.stored_bytes / 2**20}], report


def _accuracy_row(graph, name, make, data, seeds, epochs, bits=2):
    acc = {}
    q = f"INT{bits}"
    for label, cfg in (("fp32", None), (q, exactq.Config(bits=bits))):
        runs = []
        for seed in tqdm(range(seeds), desc=f"{graph} {name} {label}", leave=False):
            torch.manual_seed(seed)
            runs.append(100 * train(make(), data, cfg, epochs=epochs, measure_memory=False).test_at_best_val)
        acc[label] = runs
    gap = [b - a for a, b in zip(acc["fp32"], acc[q])]
    row = {"graph": graph, "model": name, "fp32 acc": statistics.mean(acc["fp32"]),
           f"{q} acc": statistics.mean(acc[q]), "gap": statistics.mean(gap),
           "gap std err": statistics.stdev(gap) / len(gap) ** 0.5 if len(gap) > 1 else float("nan"),
           "fp32 std": statistics.pstdev(acc["fp32"]), "seeds": seeds, "epochs": epochs}
    print(row)
    return row


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--planetoid", nargs="+", default=["Cora", "CiteSeer"])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS,
                   help="planetoid: GraphSAGE max, EdgeCNN and PNA (the last two on SVD features); "
                        "ego: GIN + global_max_pool on ego graphs; synthetic: all three")
    p.add_argument("--ego-epochs", type=int, default=50)
    p.add_argument("--bits", type=int, default=2, choices=[1, 2, 4, 8], help="the compressed runs' bits")
    args = p.parse_args(argv)
    apply_threads(args)
    seeds, epochs = (2, 3) if args.quick else (args.seeds, args.epochs)
    with Timer() as timer:
        mem, report = memory_rows(0.02 if args.quick else 1.0)
        print(report)
        rows = []
        for graph in [] if args.quick else args.planetoid:
            data = load_planetoid(graph)
            if "planetoid" in args.tasks:
                rows.append(_accuracy_row(graph, "GraphSAGE max 2x64", _models(data)["GraphSAGE max 2x64"], data,
                                          seeds, epochs, args.bits))
                reduced = reduced_features(data)
                for name in ("EdgeCNN 2x64", "PNA 2x64"):
                    rows.append(_accuracy_row(f"{graph}, features: 128-column SVD", name, _models(reduced)[name],
                                              reduced, seeds, epochs, args.bits))
            if "ego" in args.tasks:  # 13,264 nodes for Cora's 2,708 ego graphs: fewer epochs
                egos, batch = ego_graphs(data)
                rows.append(_accuracy_row(f"{graph} 1-hop ego graphs", "GIN 2x64 + global_max_pool",
                                          lambda: GINMaxPool(data.num_features, int(data.y.max()) + 1, batch), egos,
                                          seeds, args.ego_epochs, args.bits))
        if "synthetic" in args.tasks:
            synthetic = synthetic_graph(600 if args.quick else 3000, 32, 6000 if args.quick else 30000, 5,
                                        signal=0.5, seed=0)
            for name, make in _models(synthetic).items():
                rows.append(_accuracy_row("synthetic", name, make, synthetic, seeds, epochs, args.bits))
    suffix = ("_quick" if args.quick else "") + ("" if set(args.tasks) == set(TASKS) else "_" + "_".join(args.tasks)) \
        + ("" if args.bits == 2 else f"_int{args.bits}")
    write_results(args.out, f"max_aggregation_memory{suffix}", mem,
                  "GraphSAGE(aggr='max') 3 x 128, batch norm, one training forward; MB measured.", command_line(),
                  timer.seconds)
    print(write_results(args.out, f"max_aggregation_accuracy{suffix}", rows,
                        f"Test accuracy (%) at the best validation epoch, mean over {seeds} seeds (gap: mean of the "
                        f"per-seed differences, with its standard error). The fp32 and compressed runs of a seed see the "
                        f"same dropout masks (exactq.train draws one seed per epoch in both).", command_line(),
                        timer.seconds))


if __name__ == "__main__":
    main()
