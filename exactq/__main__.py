"""Command line.

    python3 -m exactq demo                       train with and without compression, compare
    python3 -m exactq partition --parts 4 --dir parts/     cut a graph once, one shard file per rank
    python3 -m exactq distributed --nprocs 4 ...  full-graph training on 4 local processes
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import torch

from .config import Config
from .data import load_planetoid, synthetic_graph, with_sparse_adjacency
from .train import MODELS, build_model, train


def _demo(args: argparse.Namespace) -> None:
    if args.dataset == "synthetic":
        data = synthetic_graph(args.nodes, 128, args.nodes * 20, 10, seed=0)
        desc = f"synthetic CSBM graph ({args.nodes:,} nodes, 128 features, {data.num_edges:,} edges, 10 classes)"
    else:
        data = load_planetoid(args.dataset, args.root)
        desc = f"{args.dataset} ({data.num_nodes:,} nodes, {data.num_features} features, {data.num_edges:,} edges)"
    classes = int(data.y.max()) + 1
    data = with_sparse_adjacency(data)
    config = Config(bits=args.bits, rp_ratio=args.rp_ratio, compute=args.compute)
    print(f"exactq demo: {args.model} {args.layers} x {args.hidden}, batch norm, dropout 0.5, on {desc}")
    print(f"compression: {config}")
    results = {}
    for label, cfg in (("fp32", None), (f"exactq int{args.bits}", config)):
        torch.manual_seed(args.seed)
        model = build_model(args.model, data.num_features, args.hidden, classes, args.layers)
        results[label] = train(model, data, cfg, epochs=args.epochs, progress=True, desc=label)
    fp32, ex = results.values()
    rows = [
        ("test accuracy (at best val)", f"{fp32.test_at_best_val:.4f}", f"{ex.test_at_best_val:.4f}", ""),
        ("final training loss", f"{fp32.losses[-1]:.4f}", f"{ex.losses[-1]:.4f}", ""),
        ("median epoch time (s)", f"{fp32.median_epoch_time:.3f}", f"{ex.median_epoch_time:.3f}",
         f"{ex.median_epoch_time / fp32.median_epoch_time:.2f}x"),
        ("activation memory, measured (MB)", f"{fp32.activation_bytes / 2**20:.2f}",
         f"{ex.activation_bytes / 2**20:.2f}", f"{fp32.activation_bytes / ex.activation_bytes:.1f}x smaller"),
    ]
    print()
    print(f"| {'':<34} | {'fp32':>10} | {'exactq':>10} | {'ratio':>14} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|{'-' * 16}|")
    for name, a, b, r in rows:
        print(f"| {name:<34} | {a:>10} | {b:>10} | {r:>14} |")
    print()
    print("exactq memory report (first training step):")
    print(ex.report)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exactq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train with and without compression; compare accuracy, time, memory")
    demo.add_argument("--dataset", default="synthetic", choices=["synthetic", "Cora", "CiteSeer", "PubMed"])
    demo.add_argument("--root", default=None, help="writable directory for Planetoid data")
    demo.add_argument("--nodes", type=int, default=20_000, help="nodes of the synthetic graph")
    demo.add_argument("--model", default="sage", choices=MODELS)
    demo.add_argument("--hidden", type=int, default=128)
    demo.add_argument("--layers", type=int, default=3)
    demo.add_argument("--epochs", type=int, default=60)
    demo.add_argument("--bits", type=int, default=2, choices=[1, 2, 4, 8])
    demo.add_argument("--rp-ratio", type=float, default=None, help="random projection kept fraction")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--compute", default=None, choices=["int8"],
                      help="run linear layers and sparse aggregations on int8 operands (exactq.compute)")
    from .distributed import train as dtrain  # imports torch.distributed only when used

    part = sub.add_parser("partition", help="cut a graph into parts and write one shard file per part")
    dtrain.add_graph_arguments(part)
    part.add_argument("--parts", type=int, required=True)
    part.add_argument("--dir", required=True, help="output directory")
    part.add_argument("--method", default="metis", choices=["metis", "random"])
    part.add_argument("--seed", type=int, default=0)
    dist = sub.add_parser("distributed", help="distributed full-graph training on local processes")
    dtrain.add_arguments(dist)
    dist.add_argument("--nprocs", type=int, default=2, help="processes (ranks) on 127.0.0.1")
    dist.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is killed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command == "partition" else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        _demo(args)
    elif args.command == "partition":
        from .distributed import partition, save_partition

        data = dtrain.load_graph(args)
        out = save_partition(data, partition(data.edge_index, data.num_nodes, args.parts, args.method, args.seed),
                             args.dir)
        print(f"wrote {args.parts} shards of {args.dataset} ({data.num_nodes:,} nodes) to {out}")
    else:
        dtrain.launch_local(args, args.nprocs, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
