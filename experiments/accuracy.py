"""Test accuracy with compressed activations vs fp32 (mean +- std over seeds).

    python experiments/accuracy.py [--quick] [--seeds 5]

Real graphs: Cora and CiteSeer (../shared/datasets), GCN and GraphSAGE 2 x 64, dropout 0.5, 100 epochs.
Synthetic: a learnable arxiv-scale CSBM graph (169,343 nodes, 128 features, 2.3 M edges, 40 classes,
signal 1.0), GraphSAGE 3 x 128 with batch norm, 12 epochs (seconds each on 2 cores). Variants: fp32;
EXACT-style per-row INT2 (uniform levels); block-wise INT2 (256 elements) with uniform, non-uniform
everywhere, and auto levels; each INT2 variant with and without random projection (D/R = 8; on the
arxiv-scale graph block-wise only). Writes experiments/results/accuracy{,_quick}[_GRAPHS].{md,csv,png}.

Projection makes the weight gradients noisier and so slows convergence; the projected variants also
have a longer run that reports several epoch budgets from the same training runs, and a run of their
own on the real graphs (``--projected-only`` keeps fp32 and the D/R = 8 variants):

    python experiments/accuracy.py --graphs arxiv --projected-only --arxiv-epochs 12 20 30 40
    python experiments/accuracy.py --graphs planetoid --projected-only
"""
from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

import exactq
from exactq.data import load_planetoid, with_sparse_adjacency
from exactq.train import build_model, train

from common import apply_threads, Timer, command_line, paper_graph, parser, write_results


def variants(with_rp: bool):
    out = {"fp32": None}
    for rp in ((None, 0.125) if with_rp else (None,)):
        tag = "" if rp is None else ", D/R=8"
        out[f"per-row INT2 uniform{tag}"] = exactq.Config(bits=2, block_rows=1, nonuniform=False, rp_ratio=rp)
        out[f"block INT2 uniform{tag}"] = exactq.Config(bits=2, nonuniform=False, rp_ratio=rp)
        out[f"block INT2 non-uniform{tag}"] = exactq.Config(bits=2, nonuniform=True, rp_ratio=rp)
        out[f"block INT2 auto{tag}"] = exactq.Config(bits=2, rp_ratio=rp)
    return out


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--arxiv-epochs", type=int, nargs="+", default=[12],
                   help="epochs on the arxiv-scale graph; several values report each from the same runs")
    p.add_argument("--projected-only", action="store_true",
                   help="only fp32 and the D/R=8 variants (results suffix _projected)")
    p.add_argument("--arxiv-signal", type=float, default=1.0,
                   help="class signal of the CSBM features (0.2: barely learnable in a few epochs)")
    p.add_argument("--graphs", choices=["all", "planetoid", "arxiv"], default="all",
                   help="run a part (results get a matching suffix)")
    p.add_argument("--planetoid", nargs="+", choices=["Cora", "CiteSeer"], default=["Cora", "CiteSeer"],
                   help="which real graphs (results suffix names them unless both)")
    args = p.parse_args(argv)
    if min(args.arxiv_epochs) < 1:
        p.error(f"--arxiv-epochs must be positive, got {args.arxiv_epochs}")
    apply_threads(args)
    seeds = range(2 if args.quick else args.seeds)

    def chosen(vs):
        return {k: v for k, v in vs.items() if k == "fp32" or "D/R=8" in k} if args.projected_only else vs

    jobs = []
    if args.graphs in ("all", "planetoid"):
        for name in ("Cora",) if args.quick else args.planetoid:
            data = with_sparse_adjacency(load_planetoid(name))
            for model in ("gcn",) if args.quick else ("gcn", "sage"):
                jobs.append((name, data, model, 2, 64, None, [30 if args.quick else 100],
                             chosen(variants(not args.quick))))
    if args.graphs in ("all", "arxiv"):
        arxiv = paper_graph("ogbn-arxiv", scale=0.02 if args.quick else 1.0, signal=args.arxiv_signal)
        # At arxiv scale an epoch takes seconds on 2 cores: per-row only without projection.
        keep = ("fp32", "per-row INT2 uniform", "block INT2 uniform", "block INT2 non-uniform", "block INT2 auto",
                "block INT2 uniform, D/R=8", "block INT2 non-uniform, D/R=8")
        arxiv_variants = chosen({k: v for k, v in variants(True).items() if k in keep})
        jobs.append(("arxiv-shaped CSBM", arxiv, "sage", 3, 128, "batch_norm",
                     [3, 5] if args.quick else sorted(args.arxiv_epochs), arxiv_variants))
    stem = ("accuracy" + ("_quick" if args.quick else "") + ("" if args.graphs == "all" else f"_{args.graphs}")
            + ("" if len(args.planetoid) == 2 or args.graphs == "arxiv" else f"_{args.planetoid[0]}")
            + ("_projected" if args.projected_only else "") + (f"_{args.seeds}seeds" if args.seeds != 5 else ""))
    note = "Test accuracy (%) at the epoch of best validation accuracy; mean and std over seeds."
    rows = []
    with Timer() as timer:
        for name, data, model, layers, hidden, norm, checkpoints, vs in jobs:
            classes = int(data.y.max()) + 1
            fp32_mean = {}
            for label, cfg in tqdm(vs.items(), desc=f"{name} {model}", leave=False):
                curves = []
                for seed in seeds:
                    torch.manual_seed(seed)
                    net = build_model(model, data.num_features, hidden, classes, layers, norm=norm)
                    curves.append(train(net, data, cfg, epochs=checkpoints[-1], measure_memory=False).test_curve)
                for epochs in checkpoints:  # test accuracy at the best validation epoch among the first `epochs`
                    accs = [100 * c[epochs - 1] for c in curves]
                    mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
                    if cfg is None:  # fp32 comes first in every variant list
                        fp32_mean[epochs] = mean
                    rows.append({"graph": name, "model": f"{model} {layers}x{hidden}", "variant": label,
                                 "test_acc_mean": mean, "test_acc_std": std,
                                 "delta_vs_fp32": mean - fp32_mean[epochs], "seeds": len(accs), "epochs": epochs})
            # Saved after every graph/model, so an interrupted run keeps what it finished.
            path = write_results(args.out, stem, rows, note, command_line(), timer.elapsed())
    print(path.read_text())
    plot(rows, f"{args.out}/{stem}.png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["graph"], r["model"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.5), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rs = [r for r in rows if (r["graph"], r["model"]) == g]
        checkpoints = sorted({r["epochs"] for r in rs})
        if len(checkpoints) > 1:  # accuracy against the epoch budget, one line per variant
            for v in dict.fromkeys(r["variant"] for r in rs):
                vr = [r for r in rs if r["variant"] == v]
                ax.errorbar([r["epochs"] for r in vr], [r["test_acc_mean"] for r in vr],
                            yerr=[r["test_acc_std"] for r in vr], marker="o", capsize=3, label=v)
            ax.set(xlabel="epochs", xticks=checkpoints)
            ax.legend(fontsize=7)
        else:
            ax.errorbar(range(len(rs)), [r["test_acc_mean"] for r in rs], yerr=[r["test_acc_std"] for r in rs], fmt="o")
            ax.axhline(rs[0]["test_acc_mean"], color="grey", ls=":")
            ax.set_xticks(range(len(rs)), [r["variant"] for r in rs], rotation=80, fontsize=7)
        ax.set(title=f"{g[0]}, {g[1]}", ylabel="test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
