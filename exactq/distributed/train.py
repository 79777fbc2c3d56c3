"""Distributed full-graph training, one process per rank.

    torchrun --nproc-per-node 4 -m exactq.distributed.train --dataset Cora --message-bits 2
    python3 -m exactq distributed --nprocs 4 --dataset Cora --message-bits 2     # spawns on 127.0.0.1

Every rank reads its shard (from ``--parts-dir``, written once by ``python3 -m exactq partition``, or
cut in place with METIS when the whole graph fits every rank), wraps the model with
:func:`exactq.distributed.wrap`, and trains it full-graph. Rank 0 prints per-epoch loss and accuracy,
the epoch time, and the bytes the exchange sent against what fp32 messages would take.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..api import compress
from ..data import PAPER_GRAPHS, load_planetoid, synthetic_graph
from ..memory import MAX_MMAP_THRESHOLD, map_large_allocations, peak_rss_bytes
from ..train import MODELS, build_model
from .model import exchange_stats, wrap
from .partition import METHODS, partition
from .shard import load_shard, shard

DATASETS = ("Cora", "CiteSeer", "PubMed", "synthetic") + tuple(f"{k}-shape" for k in PAPER_GRAPHS)


def add_graph_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="Cora", choices=DATASETS,
                   help="a Planetoid graph, a learnable synthetic graph, or a synthetic graph shaped like a paper's")
    p.add_argument("--root", default=None, help="writable directory for Planetoid data")
    p.add_argument("--nodes", type=int, default=20_000, help="nodes of --dataset synthetic")
    p.add_argument("--scale", type=float, default=1.0, help="nodes and edges x scale for the *-shape graphs")
    p.add_argument("--signal", type=float, default=1.0, help="class signal of the synthetic graphs")
    p.add_argument("--locality", type=float, default=0.9,
                   help="fraction of the synthetic graphs' edges within communities (real graphs cluster; a graph "
                        "without it has no good cut)")


def _mmap_threshold(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else -1
    if not 0 <= value <= MAX_MMAP_THRESHOLD:
        raise argparse.ArgumentTypeError(f"must be 0 (malloc's own) or bytes up to {MAX_MMAP_THRESHOLD}, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_graph_arguments(p)
    p.add_argument("--parts-dir", default=None, help="partition directory (python3 -m exactq partition); "
                   "default: every rank cuts the graph itself with --partition")
    p.add_argument("--partition", default="metis", choices=METHODS)
    p.add_argument("--model", default="gcn", choices=[m for m in MODELS if m != "gcnii"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--norm", default="batch_norm", choices=["batch_norm", "none"])
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--message-bits", default="2", choices=["none", "1", "2", "4", "8", "auto"])
    p.add_argument("--eval-message-bits", default="none", choices=["none", "1", "2", "4", "8"],
                   help="messages of the evaluation forwards (default exact, as AdaQP validates and tests)")
    p.add_argument("--no-overlap", action="store_true", help="exchange, then aggregate (no central/marginal split)")
    p.add_argument("--no-keep-inputs", action="store_true",
                   help="send the features' halo rows every epoch instead of fetching them once (keep_inputs)")
    p.add_argument("--sparse", action="store_true",
                   help="aggregate with the shard's torch.sparse adjacency (GCN, GraphSAGE, GIN) instead of edge_index")
    p.add_argument("--auto-every", type=int, default=10)
    p.add_argument("--compress-bits", type=int, default=None, choices=[1, 2, 4, 8],
                   help="also compress each rank's saved activations with exactq.compress")
    p.add_argument("--malloc-mmap-threshold", type=_mmap_threshold, default=0,
                   help="bytes from which glibc's malloc maps each allocation, so that freed tensors go back to the "
                        "system (exactq.memory.map_large_allocations, e.g. 1048576: a rank's peak memory 4-7%% lower "
                        "at the products size, but every such allocation then faults its pages in anew: epochs "
                        "1.5-1.6x as long at the arxiv size); 0 (default): malloc's own threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write rank 0's summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def load_graph(args: argparse.Namespace):
    if args.dataset in ("Cora", "CiteSeer", "PubMed"):
        return load_planetoid(args.dataset, args.root)
    if args.dataset == "synthetic":
        return synthetic_graph(args.nodes, 128, args.nodes * 20, 10, signal=args.signal, locality=args.locality, seed=0)
    n, f, e, c = PAPER_GRAPHS[args.dataset[:-len("-shape")]]
    return synthetic_graph(max(100, int(n * args.scale)), f, int(e * args.scale), c, signal=args.signal,
                           locality=args.locality, seed=0)


def _message_bits(text: str):
    return None if text == "none" else "auto" if text == "auto" else int(text)


def _sum(values, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu()


def load_rank_shard(rank: int, world: int, args: argparse.Namespace):
    """This rank's shard: from ``--parts-dir``, or cut in place (every rank cuts the same way)."""
    if args.parts_dir:
        return load_shard(args.parts_dir, rank)
    data = load_graph(args)
    return shard(data, partition(data.edge_index, data.num_nodes, world, args.partition, args.seed), rank)


def run(rank: int, world: int, args: argparse.Namespace, part=None) -> Optional[dict]:
    """Trains on this rank's shard (``part``, or loaded as ``args`` say); returns the summary on rank 0
    (``None`` elsewhere)."""
    if args.malloc_mmap_threshold:
        map_large_allocations(args.malloc_mmap_threshold)
    t_load = time.perf_counter()
    part = part if part is not None else load_rank_shard(rank, world, args)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    part = part.to(device)
    maxy = torch.tensor([int(part.y.max()) if part.num_local else 0], device=device)
    dist.all_reduce(maxy, op=dist.ReduceOp.MAX)
    classes = int(maxy) + 1
    torch.manual_seed(args.seed)  # the same initial parameters on every rank
    model = build_model(args.model, part.x.shape[1], args.hidden, classes, args.layers,
                        norm=None if args.norm == "none" else args.norm, dropout=args.dropout)
    model = wrap(model.to(device), part, message_bits=_message_bits(args.message_bits), overlap=not args.no_overlap,
                 auto_every=args.auto_every, eval_message_bits=_message_bits(args.eval_message_bits),
                 keep_inputs=not args.no_keep_inputs)
    torch.manual_seed(args.seed * 1000 + rank + 1)  # dropout differs per rank, as it would per node
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=5e-4)
    n_train = part.global_counts["train_mask"]
    graph = part.sparse_adjacency() if args.sparse else part.edge_index
    stats = exchange_stats(model)
    load_seconds = time.perf_counter() - t_load
    rows, best_val, test_at_best = [], -1.0, 0.0
    bar = tqdm(range(args.epochs), desc=f"{args.model} x{world} bits={args.message_bits}",
               disable=rank != 0 or args.quiet, leave=False)
    for epoch in bar:
        model.train()
        dist.barrier()
        stats.reset()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with compress(bits=args.compress_bits) if args.compress_bits else contextlib.nullcontext():
            out = model(part.x, graph)
        loss = F.cross_entropy(out[part.train_mask], part.y[part.train_mask], reduction="sum") / n_train
        loss.backward()
        opt.step()
        seconds = time.perf_counter() - t0
        sent, fp32, comm = stats.bytes_sent, stats.fp32_bytes, stats.comm_seconds
        model.eval()
        with torch.no_grad():
            pred = model(part.x, graph).argmax(1)
        correct = [float(((pred == part.y) & getattr(part, m)).sum()) for m in ("train_mask", "val_mask", "test_mask")]
        totals = _sum([loss.item(), sent, fp32, *correct, seconds, comm], device)
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        acc = [float(totals[3 + i]) / max(1, part.global_counts[m])
               for i, m in enumerate(("train_mask", "val_mask", "test_mask"))]
        if acc[1] >= best_val:
            best_val, test_at_best = acc[1], acc[2]
        rows.append(dict(epoch=epoch, loss=float(totals[0]), train=acc[0], val=acc[1], test=acc[2],
                         seconds=float(slowest), bytes=int(totals[1]), fp32_bytes=int(totals[2]),
                         comm_share=float(totals[7] / max(totals[6], 1e-12))))
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", val=f"{acc[1]:.3f}", s=f"{float(slowest):.2f}")
        if rank == 0 and not args.quiet and epoch % max(1, args.epochs // 10) == 0:
            tqdm.write(f"epoch {epoch:4d}  loss {rows[-1]['loss']:.4f}  train {acc[0]:.3f}  val {acc[1]:.3f}  "
                       f"test {acc[2]:.3f}  {float(slowest):.3f} s  sent {int(totals[1]) / 2**20:.2f} MB "
                       f"(fp32 {int(totals[2]) / 2**20:.2f} MB)")
    if rank != 0:
        return None
    times = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    summary = dict(dataset=args.dataset, model=args.model, world=world, message_bits=args.message_bits,
                   overlap=not args.no_overlap, epochs=args.epochs, loss_per_epoch=[r["loss"] for r in rows],
                   best_val=best_val, test_at_best_val=test_at_best,
                   median_epoch_seconds=statistics.median(times), bytes_per_epoch=rows[-1]["bytes"],
                   fp32_bytes_per_epoch=rows[-1]["fp32_bytes"],
                   comm_share=statistics.median(r["comm_share"] for r in rows), load_seconds=load_seconds,
                   peak_rss_bytes=peak_rss_bytes(),
                   auto_bits=(model._exactq_distributed.adaptive.histogram()
                              if model._exactq_distributed.adaptive else None))
    return summary


def _report(summary: dict, out: Optional[str]) -> None:
    ratio = summary["fp32_bytes_per_epoch"] / max(1, summary["bytes_per_epoch"])
    print(f"{summary['model']} on {summary['dataset']}, {summary['world']} ranks, message_bits="
          f"{summary['message_bits']}, overlap={summary['overlap']}: test accuracy {summary['test_at_best_val']:.4f} "
          f"at best val {summary['best_val']:.4f}; median epoch {summary['median_epoch_seconds']:.3f} s "
          f"(communication {100 * summary['comm_share']:.0f}% of it); sent {summary['bytes_per_epoch'] / 2**20:.2f} MB "
          f"per epoch vs {summary['fp32_bytes_per_epoch'] / 2**20:.2f} MB as fp32 ({ratio:.1f}x less)"
          + (f"; auto bits per link {summary['auto_bits']}" if summary["auto_bits"] else ""))
    if out:
        with open(out, "w") as f:
            json.dump(summary, f, indent=1)


def _spawned(rank: int, world: int, args: argparse.Namespace) -> None:
    summary = run(rank, world, args)
    if summary is not None:
        _report(summary, args.out)


def launch_local(args: argparse.Namespace, nprocs: int, timeout: float) -> None:
    """Spawns ``nprocs`` ranks on 127.0.0.1 and trains (``python3 -m exactq distributed``)."""
    from .launch import spawn

    spawn(_spawned, nprocs, args=(args,), timeout=timeout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point under torchrun (reads RANK / WORLD_SIZE / MASTER_ADDR from the environment)."""
    p = argparse.ArgumentParser(prog="torchrun ... -m exactq.distributed.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"])
    p.add_argument("--pg-timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "RANK" not in os.environ:
        p.error("launch with torchrun (it sets RANK and WORLD_SIZE), or use `python3 -m exactq distributed`")
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.pg_timeout))
    try:
        _spawned(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
