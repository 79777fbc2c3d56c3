"""Accuracy with compute="int8" (int8 products, INT2 storage) vs fp32, at equal epochs.

    python experiments/accuracy_compute.py [--quick] [--seeds 10] [--arxiv-seeds 5] [--graphs planetoid arxiv]
                                           [--models gcn sage gin]

Cora and CiteSeer (../shared/datasets): GCN, GraphSAGE and GIN (or the --models given; also GAT) 2 x 64,
dropout 0.5, 100 epochs. The arxiv-scale learnable synthetic graph (169,343 nodes, 128 features, 2.3 M
edges, 40 classes, signal 1.0): the same models 3 x 128 with batch norm, 12 epochs. Every run aggregates
over a torch.sparse CSR adjacency (the path int8 serves); fp32 and int8 runs of a seed start from the same weights. Test accuracy at the best
validation epoch; gap = mean of the per-seed differences +- its standard error. Writes
results/accuracy_compute{,_quick}.{md,csv,png}.
"""
from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

import exactq
from exactq.data import load_planetoid, with_sparse_adjacency
from exactq.train import build_model, train

from common import Timer, apply_threads, command_line, paper_graph, parser, write_results

MODELS = ("gcn", "sage", "gin")
INT8 = exactq.Config(bits=2, compute="int8")


def rows_for(graph, data, models, layers, hidden, norm, seeds, epochs):
    rows = []
    classes = int(data.y.max()) + 1
    for name in models:
        acc = {}
        for label, cfg in (("fp32", None), ("int8 + INT2", INT8)):
            runs = []
            for seed in tqdm(range(seeds), desc=f"{graph} {name} {label}", leave=False):
                torch.manual_seed(seed)
                model = build_model(name, data.num_features, hidden, classes, layers, norm=norm)
                runs.append(100 * train(model, data, cfg, epochs=epochs, measure_memory=False).test_at_best_val)
            acc[label] = runs
        gap = [b - a for a, b in zip(acc["fp32"], acc["int8 + INT2"])]
        rows.append({"graph": graph, "model": f"{name} {layers}x{hidden}", "fp32 acc": statistics.mean(acc["fp32"]),
                     "int8 + INT2 acc": statistics.mean(acc["int8 + INT2"]), "gap": statistics.mean(gap),
                     "gap std err": statistics.stdev(gap) / len(gap) ** 0.5 if len(gap) > 1 else float("nan"),
                     "seeds": seeds, "epochs": epochs})
        print(rows[-1])
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['graph'].replace(' ', chr(10))}\n{r['model']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.6))
    ax.bar(range(len(rows)), [float(r["gap"]) for r in rows], yerr=[float(r["gap std err"]) for r in rows],
           color="tab:blue",
           capsize=3)
    for y in (-0.3, 0.3):
        ax.axhline(y, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("accuracy gap (points)\nint8 + INT2 minus fp32")
    ax.set_title('compute="int8" with INT2 storage vs fp32 (mean +- std. error over seeds)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--arxiv-seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--arxiv-epochs", type=int, default=12)
    p.add_argument("--graphs", nargs="+", choices=["planetoid", "arxiv"], default=["planetoid", "arxiv"])
    p.add_argument("--models", nargs="+", choices=list(MODELS) + ["gat"], default=list(MODELS))
    args = p.parse_args(argv)
    apply_threads(args)
    rows = []
    with Timer() as timer:
        if "planetoid" in args.graphs:
            for graph in ("Cora",) if args.quick else ("Cora", "CiteSeer"):
                data = with_sparse_adjacency(load_planetoid(graph))
                rows += rows_for(graph, data, args.models, 2, 64, None, 2 if args.quick else args.seeds,
                                 5 if args.quick else args.epochs)
        if "arxiv" in args.graphs:
            data = with_sparse_adjacency(paper_graph("ogbn-arxiv", scale=0.02 if args.quick else 1.0, signal=1.0))
            rows += rows_for("arxiv-shaped synthetic", data, args.models, 3, 128, "batch_norm",
                             2 if args.quick else args.arxiv_seeds, 3 if args.quick else args.arxiv_epochs)
    stem = "accuracy_compute" + ("_quick" if args.quick else "") + (
        "" if set(args.graphs) == {"planetoid", "arxiv"} else "_" + "_".join(args.graphs)) + (
        "" if args.models == list(MODELS) else "_" + "_".join(args.models))
    md = write_results(args.out, stem, rows, "Test accuracy (%) at the best validation epoch, mean over seeds; gap = "
                       "mean per-seed difference (int8 + INT2 minus fp32) with its standard error.", command_line(),
                       timer.seconds)
    plot(rows, md.with_suffix(".png"))
    print(md.read_text())


if __name__ == "__main__":
    main()
