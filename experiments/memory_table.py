"""Activation memory of one training step: fp32 vs EXACT-style per-row INT2 vs block-wise INT2.

    python experiments/memory_table.py [--quick] [--datasets ogbn-arxiv flickr ...] [--models sage gcn]
                                       [--edge-scale 1.0]

For each dataset (a synthetic graph with the paper dataset's shape, sparse-adjacency aggregation)
and model, measures one full-batch training step for: fp32; INT2 with 1 (EXACT's per-node grouping),
2, 4, 8, 16 and 64 rows per block and exactq's default (256 elements); each without and with random
projection (D/R = 2, 4, 8); uniform and auto non-uniform levels. Memory is measured, not predicted:
live tensor bytes after the forward minus the output (exactq.LiveTensorMemory), checked against the
session's report. Step time is the median of timed steps in the same run, as a ratio to fp32.
--edge-scale thins the edges only: GraphSAGE's activations are node x feature tensors whose bytes do
not depend on the edge count (the sparse products' time does); GCN also keeps each layer's normalised
adjacency, which scales with the edges.
Writes experiments/results/memory_table[_quick][_DATASETS][_MODELS].{md,csv,png}, and
memory_table.png: a figure of every full-run table in the results directory.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import exactq
from exactq.train import build_model

from common import apply_threads, Timer, command_line, paper_graph, parser, write_results

# (dataset, model, layers, hidden) as the EXACT / ICASSP papers configured them.
FULL = [
    ("ogbn-arxiv", "sage", 3, 128), ("ogbn-arxiv", "gcn", 3, 128), ("ogbn-arxiv", "gcnii", 16, 256),
    ("flickr", "sage", 2, 256), ("flickr", "gcn", 2, 256),
    ("reddit", "sage", 2, 256), ("reddit", "gcn", 2, 256),
    ("yelp", "sage", 2, 512),
    ("ogbn-products", "sage", 3, 256),
]
ROWS = (1, 2, 4, 8, 16, 64)
DR = (1, 2, 4, 8)


def configs(reduced: bool):
    """(label, Config or None). The reduced grid keeps the headline comparisons only."""
    out = [("fp32", None)]
    rows = (1, 8, 64) if reduced else ROWS
    for dr in ((1, 8) if reduced else DR):
        rp = None if dr == 1 else 1 / dr
        for nu in ((None,) if reduced else (False, None)):
            lv = "uniform" if nu is False else "auto"
            for r in rows:
                out.append((f"rows={r} D/R={dr} {lv}", exactq.Config(bits=2, block_rows=r, rp_ratio=rp, nonuniform=nu)))
            out.append((f"256 elems D/R={dr} {lv}", exactq.Config(bits=2, rp_ratio=rp, nonuniform=nu)))
    return out


def step(model, data, config, tracker=False):
    """One training step; returns (activation bytes measured or None, report or None, seconds)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    ctx = exactq.compress(config) if config is not None else contextlib.nullcontext()
    mem = exactq.LiveTensorMemory() if tracker else contextlib.nullcontext()
    t0 = time.perf_counter()
    with mem:
        with ctx as session:
            out = model(data.x, data.adj_t)
        act = mem.live_bytes() - out.untyped_storage().nbytes() if tracker else None
    F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
    seconds = time.perf_counter() - t0
    report = session.report() if config is not None else None
    del out
    gc.collect()
    return act, report, seconds


def run_model(dataset, model_name, layers, hidden, scale, reduced, repeats, skip_fp32_measure, edge_scale):
    data = paper_graph(dataset, scale=scale, edge_scale=edge_scale)
    edges = data.adj_t._nnz()
    classes = int(data.y.max()) + 1
    torch.manual_seed(0)
    model = build_model(model_name, data.num_features, hidden, classes, layers)
    model.train()
    rows, fp32_bytes, fp32_time = [], None, None
    for label, cfg in tqdm(configs(reduced), desc=f"{dataset} {model_name}", leave=False):
        if cfg is None and skip_fp32_measure:
            continue  # not run: fp32 bytes come from the reports' original_bytes
        act, report, t = step(model, data, cfg, tracker=True)
        # Without an fp32 step there is no time ratio to report: skip the extra timed steps.
        times = [step(model, data, cfg)[2] for _ in range(0 if skip_fp32_measure else repeats)]
        t = statistics.median(times) if times else t
        if cfg is None:
            fp32_bytes, fp32_time = act, t
        if fp32_bytes is None and report is not None:
            fp32_bytes = report.original_bytes
        rows.append({
            "dataset": dataset, "nodes": data.num_nodes, "edges": edges, "model": f"{model_name} {layers}x{hidden}",
            "config": label, "MB": act / 2**20,
            "report_MB": (report.stored_bytes / 2**20) if report else act / 2**20,
            "x_smaller_than_fp32": fp32_bytes / act,
            "step_time_s": t,
            "time_vs_fp32": (t / fp32_time) if fp32_time else float("nan"),
        })
    def variant(label):  # "rows=8 D/R=4 auto" -> "D/R=4 auto": the per-row row to compare with
        return label[label.index("D/R="):]

    per_row = {variant(r["config"]): r["MB"] for r in rows if r["config"].startswith("rows=1 ")}
    for r in rows:
        r["reduction_vs_per_row_%"] = (100 * (1 - r["MB"] / per_row[variant(r["config"])])
                                       if "D/R=" in r["config"] else float("nan"))
    if skip_fp32_measure:
        rows.insert(0, {"dataset": dataset, "nodes": data.num_nodes, "edges": edges,
                        "model": f"{model_name} {layers}x{hidden}",
                        "config": "fp32 (from report; not run)", "MB": fp32_bytes / 2**20,
                        "report_MB": fp32_bytes / 2**20, "x_smaller_than_fp32": 1.0, "step_time_s": float("nan"),
                        "time_vs_fp32": float("nan"), "reduction_vs_per_row_%": float("nan")})
    del data, model
    gc.collect()
    return rows


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--datasets", nargs="*", default=None, help="subset of the datasets to run")
    p.add_argument("--models", nargs="*", default=None, help="subset of the models to run (sage, gcn, gcnii)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per config (median)")
    p.add_argument("--edge-scale", type=float, default=1.0, help="keep this fraction of the edges (see above)")
    p.add_argument("--reduced", action="store_true", help="the reduced grid for every model (default: full grid "
                   "for arxiv GCN/GraphSAGE, reduced for the rest)")
    args = p.parse_args(argv)
    apply_threads(args)
    if args.quick:
        plan = [("ogbn-arxiv", "sage", 3, 128, 0.02, True)]
    else:
        plan = [(d, m, l, h, 1.0, args.reduced or not (d == "ogbn-arxiv" and m != "gcnii")) for d, m, l, h in FULL]
    if args.datasets:
        plan = [x for x in plan if x[0] in args.datasets]
    if args.models:
        plan = [x for x in plan if x[1] in args.models]
    stem = "_".join(["memory_table"] + (["quick"] if args.quick else []) + (args.datasets or []) + (args.models or []))
    rows = []
    with Timer() as timer:
        for dataset, model, layers, hidden, scale, reduced in plan:
            # fp32 steps of 9-24 GB activations: not run (products' fails: scale_products.py shows it).
            big = dataset == "ogbn-products" or model == "gcnii"
            rows += run_model(dataset, model, layers, hidden, scale, reduced, args.repeats, big and not args.quick,
                              args.edge_scale)
            path = write_results(args.out, stem, rows, NOTE, command_line(), timer.elapsed())  # after each model
    print(path.read_text())
    headline(rows)
    plot(rows, f"{args.out}/{stem}.png")
    if not args.quick:
        plot(saved_rows(args.out), f"{args.out}/memory_table.png")


def saved_rows(out):
    """The rows of every full-run memory table in `out` (each file is one command's output)."""
    rows = []
    for path in sorted(Path(out).glob("memory_table_*.csv")):
        if not path.stem.startswith("memory_table_quick"):
            with open(path) as f:
                rows += [dict(r, MB=float(r["MB"])) for r in csv.DictReader(f)]
    return rows


NOTE = ("Activation memory of one training step (MB = live tensor bytes after forward minus the output, "
        "measured; report_MB = exactq's own report). Synthetic graphs with the papers' shapes; "
        "rows=k: blocks of k whole rows (rows=1 is EXACT's per-node grouping); D/R: random projection; "
        "auto: non-uniform levels for normalisation inputs and projected tensors.")


def headline(rows):
    sel = [r for r in rows if r["dataset"] == "ogbn-arxiv" and r["model"].startswith("sage")]
    if not sel:
        return
    by = {r["config"]: r for r in sel}
    fp32 = by.get("fp32")
    per_row = by.get("rows=1 D/R=8 auto")
    for k in ("rows=8 D/R=8 auto", "rows=64 D/R=8 auto"):
        if per_row and k in by:
            print(f"arxiv SAGE INT2 D/R=8: {k.split()[0]} stores {by[k]['MB']:.1f} MB vs per-row "
                  f"{per_row['MB']:.1f} MB: {100 * (1 - by[k]['MB'] / per_row['MB']):.1f}% less")
    for k in ("rows=8 D/R=1 auto", "256 elems D/R=1 auto"):
        if fp32 and k in by:
            print(f"arxiv SAGE INT2 no projection, {k.split(' D/R')[0]}: {fp32['MB'] / by[k]['MB']:.1f}x less than fp32")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["dataset"], r["model"]) for r in rows))
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.2 * len(groups)), squeeze=False)
    for ax, (d, m) in zip(axes[:, 0], groups):
        rs = [r for r in rows if (r["dataset"], r["model"]) == (d, m) and "uniform" not in r["config"]]
        ax.bar(range(len(rs)), [r["MB"] for r in rs], color=["grey" if r["config"].startswith("fp32") else "C0" for r in rs])
        ax.set_xticks(range(len(rs)), [r["config"].replace(" auto", "") for r in rs], rotation=70, fontsize=7)
        ax.set(yscale="log", ylabel="activation MB", title=f"{d}, {m}: one training step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
