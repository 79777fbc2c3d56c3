"""Max/min-aggregation models with exactq: accuracy on Cora / CiteSeer (INT2 vs fp32) and the
activation memory of a max-aggregation GraphSAGE on an ogbn-arxiv-shaped graph.

    python experiments/max_aggregation.py [--quick] [--seeds 3] [--epochs 100] [--planetoid Cora CiteSeer]

Their backwards find the winners of each max by ``input == result``; exactq stores one bit per element
for that (exactq.rules: Winners) and nothing for the result, so gradients are exact for those ops.
Models (PyG, unchanged, edge_index aggregation): GraphSAGE(aggr="max") 2 x 64, EdgeCNN 2 x 64,
PNA 2 x 64 (mean/min/max/std), dropout 0.5. Memory: GraphSAGE(aggr="max") 3 x 128 with batch norm,
one training forward, live tensor bytes after it minus the output (exactq.LiveTensorMemory).
"""
from __future__ import annotations

import statistics

import torch
from torch_geometric.nn import PNA, EdgeCNN, GraphSAGE
from torch_geometric.utils import degree
from tqdm import tqdm

import exactq
from exactq.data import load_planetoid
from exactq.train import train

from common import Timer, apply_threads, command_line, paper_graph, parser, write_results


def _models(data):
    deg = torch.bincount(degree(data.edge_index[1], data.num_nodes, dtype=torch.long))
    f, c = data.num_features, int(data.y.max()) + 1
    return {
        "GraphSAGE max 2x64": lambda: GraphSAGE(f, 64, 2, c, aggr="max", dropout=0.5),
        "EdgeCNN 2x64": lambda: EdgeCNN(f, 64, 2, c, dropout=0.5),
        "PNA 2x64": lambda: PNA(f, 64, 2, c, aggregators=["mean", "min", "max", "std"],
                                scalers=["identity", "amplification", "attenuation"], deg=deg, dropout=0.5),
    }


def memory_rows(scale: float):
    data = paper_graph("ogbn-arxiv", scale=scale)
    torch.manual_seed(0)
    model = GraphSAGE(data.num_features, 128, 3, 40, aggr="max", norm="batch_norm", dropout=0.5)
    model.train()
    out = {}
    for label, ctx in (("fp32", None), ("INT2", exactq.Config(bits=2))):
        torch.manual_seed(1)
        with exactq.LiveTensorMemory() as mem:
            with (exactq.compress(ctx) if ctx else torch.enable_grad()) as session:
                y = model(data.x, data.edge_index)
            out[label] = mem.live_bytes() - y.untyped_storage().nbytes()
        if ctx:
            report = session.report()
        del y
    return [{"graph": f"ogbn-arxiv shape x {scale}", "nodes": data.num_nodes, "edges": data.edge_index.shape[1],
             "fp32 MB": out["fp32"] / 2**20, "INT2 MB": out["INT2"] / 2**20, "x smaller": out["fp32"] / out["INT2"],
             "report fp32 MB": report.original_bytes / 2**20, "report stored MB": report.stored_bytes / 2**20}], report


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--planetoid", nargs="+", default=["Cora", "CiteSeer"])
    args = p.parse_args(argv)
    apply_threads(args)
    seeds, epochs = (1, 3) if args.quick else (args.seeds, args.epochs)
    with Timer() as timer:
        mem, report = memory_rows(0.02 if args.quick else 1.0)
        print(report)
        rows = []
        for graph in args.planetoid[:1] if args.quick else args.planetoid:
            data = load_planetoid(graph)
            for name, make in _models(data).items():
                acc = {}
                for label, cfg in (("fp32", None), ("INT2", exactq.Config(bits=2))):
                    runs = []
                    for seed in tqdm(range(seeds), desc=f"{graph} {name} {label}", leave=False):
                        torch.manual_seed(seed)
                        runs.append(100 * train(make(), data, cfg, epochs=epochs, measure_memory=False).test_at_best_val)
                    acc[label] = runs
                rows.append({"graph": graph, "model": name, "fp32 acc": statistics.mean(acc["fp32"]),
                             "INT2 acc": statistics.mean(acc["INT2"]),
                             "gap": statistics.mean(acc["INT2"]) - statistics.mean(acc["fp32"]),
                             "fp32 std": statistics.pstdev(acc["fp32"]), "seeds": seeds, "epochs": epochs})
                print(rows[-1])
    suffix = "_quick" if args.quick else ""
    write_results(args.out, f"max_aggregation_memory{suffix}", mem,
                  "GraphSAGE(aggr='max') 3 x 128, batch norm, one training forward; MB measured.", command_line(),
                  timer.seconds)
    print(write_results(args.out, f"max_aggregation_accuracy{suffix}", rows,
                        f"Test accuracy (%) at the best validation epoch, mean over {seeds} seeds.", command_line(),
                        timer.seconds))


if __name__ == "__main__":
    main()
