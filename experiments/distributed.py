"""Distributed full-graph training with quantized halo exchange (exactq.distributed, AdaQP-style).

    python experiments/distributed.py [--quick] [--sections gradients accuracy timing malloc]
                                      [--seeds 5] [--epochs 100] [--arxiv-scale 1.0] [--arxiv-epochs 30]

Every multi-process section spawns gloo ranks on 127.0.0.1 (this machine's 2 cores are shared by all
ranks, so epoch times here measure the method's overheads, not a cluster's speed).

* gradients: one training step on Cora, GCN/GraphSAGE/GIN/GAT 2 x 64 with batch norm, 2 and 4 ranks:
  loss and parameter gradients against one process on the whole graph, with exact messages (the
  exactness claim) and at 8/4/2 bits and auto (relative error, cosine).
* accuracy: test accuracy at the best validation epoch, GCN 2 x 64, 2 and 4 METIS parts, exact
  messages vs 2-bit, 4-bit and auto, per seed; bytes per epoch against fp32 messages (stats
  included). Cora, CiteSeer (no normalisation, as usual there) and the arxiv-shaped synthetic graph
  (169k nodes, 2.3M edges, 90% of the edges within communities so that METIS finds a cut, GCN 2 x 128
  with batch norm).
* timing: median epoch time on the arxiv-shaped graph, GraphSAGE 3 x 128 (sparse-matmul aggregation),
  1/2/4 ranks: exact vs 8/4/2-bit and auto messages, without and with overlap; the share of the epoch
  spent blocked on the exchange, and the bytes per epoch (stats included) against fp32 messages.
* malloc: epoch time with malloc mapping every allocation >= 1 MiB (``--malloc-mmap-threshold``) against
  glibc's own threshold, 4 ranks on the arxiv-shaped graph, interleaved repeats.
* projection: see experiments/distributed_projection.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
import torch.nn.functional as F

import exactq.distributed as xd
from exactq.data import load_planetoid
from exactq.distributed.train import add_arguments, load_rank_shard, run
from exactq.train import build_model

from common import Timer, apply_threads, command_line, parser, write_results

BITS = ("none", "2", "4", "auto")


def train_args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    args.quiet = True
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# -- gradients ----------------------------------------------------------------------------------------

def _grad_worker(rank, world, models, bits_list, out):
    data = load_planetoid("Cora")
    shard = xd.shard(data, xd.partition(data.edge_index, data.num_nodes, world), rank)
    total = shard.global_counts["train_mask"]
    res = {}
    for name in models:
        for bits in bits_list:
            torch.manual_seed(0)
            model = build_model(name, data.num_features, 64, 7, 2, norm="batch_norm", dropout=0.0)
            model = xd.wrap(model, shard, message_bits=bits, auto_every=2)
            for _ in range(3 if bits == "auto" else 1):  # auto: initial 8 bits, then solved bits
                model.zero_grad()
                loss = F.cross_entropy(model(shard.x, shard.edge_index)[shard.train_mask],
                                       shard.y[shard.train_mask], reduction="sum") / total
                loss.backward()
            summed = loss.detach().clone()
            torch.distributed.all_reduce(summed)
            res[name, bits] = (float(summed), torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    if rank == 0:
        torch.save(res, out)


def gradients(quick: bool):
    data = load_planetoid("Cora")
    models = ("gcn", "sage") if quick else ("gcn", "sage", "gin", "gat")
    bits_list = (None, 8, 4, 2, "auto")
    rows = []
    for world in (2,) if quick else (2, 4):
        with tempfile.TemporaryDirectory() as d:
            xd.spawn(_grad_worker, world, args=(models, bits_list, os.path.join(d, "g.pt")), timeout=900)
            res = torch.load(os.path.join(d, "g.pt"))
        for name in models:
            torch.manual_seed(0)
            ref = build_model(name, data.num_features, 64, 7, 2, norm="batch_norm", dropout=0.0)
            loss = F.cross_entropy(ref(data.x, data.edge_index)[data.train_mask], data.y[data.train_mask],
                                   reduction="sum") / int(data.train_mask.sum())
            loss.backward()
            g = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
            for bits in bits_list:
                l, gd = res[name, bits]
                rows.append({"ranks": world, "model": name, "message bits": bits or "exact",
                             "loss rel err": abs(l - loss.item()) / loss.item(),
                             "grad rel err": float((gd - g).norm() / g.norm()),
                             "grad cosine": float(F.cosine_similarity(gd, g, 0))})
                print(rows[-1])
    return rows


# -- accuracy -----------------------------------------------------------------------------------------

def _run_worker(rank, world, base: dict, configs: list, out: str):
    args = train_args(**base)
    shard = load_rank_shard(rank, world, args)
    results = []
    for cfg in configs:
        for k, v in cfg.items():
            setattr(args, k, v)
        summary = run(rank, world, args, shard)
        if rank == 0:
            results.append(dict(cfg, **summary))
            print({k: summary[k] for k in ("dataset", "world", "message_bits", "overlap", "test_at_best_val",
                                          "median_epoch_seconds", "bytes_per_epoch")}, flush=True)
    if rank == 0:
        torch.save(results, out)


def spawn_runs(world: int, base: dict, configs: list, timeout: float = 7200) -> list:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "runs.pt")
        xd.spawn(_run_worker, world, args=(base, configs, out), timeout=timeout)
        return torch.load(out)


def accuracy(quick: bool, seeds: int, epochs: int, arxiv_scale: float, arxiv_epochs: int, datasets):
    rows = []
    settings = {
        "Cora": dict(dataset="Cora", model="gcn", hidden=64, layers=2, norm="none", epochs=epochs),
        "CiteSeer": dict(dataset="CiteSeer", model="gcn", hidden=64, layers=2, norm="none", epochs=epochs),
        "arxiv": dict(dataset="ogbn-arxiv-shape", scale=arxiv_scale, locality=0.9, model="gcn", hidden=128,
                      layers=2, norm="batch_norm", epochs=arxiv_epochs, dropout=0.5, sparse=True),
    }
    for key in datasets:
        base = settings[key]
        for world in (2, 4):
            configs = [dict(message_bits=b, seed=s) for s in range(seeds) for b in BITS]
            runs = spawn_runs(world, base, configs)
            exact = {r["seed"]: r for r in runs if r["message_bits"] == "none"}
            for b in BITS:
                mine = [r for r in runs if r["message_bits"] == b]
                gaps = [100 * (r["test_at_best_val"] - exact[r["seed"]]["test_at_best_val"]) for r in mine]
                rows.append({"graph": base["dataset"], "ranks": world, "message bits": b if b != "none" else "exact",
                             "test acc": 100 * statistics.mean(r["test_at_best_val"] for r in mine),
                             "gap vs exact": statistics.mean(gaps),
                             "gap std err": statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else 0.0,
                             "MB sent / epoch": statistics.mean(r["bytes_per_epoch"] for r in mine) / 2**20,
                             "fp32 MB / epoch": statistics.mean(r["fp32_bytes_per_epoch"] for r in mine) / 2**20,
                             "x fewer bytes": statistics.mean(r["fp32_bytes_per_epoch"] / max(1, r["bytes_per_epoch"])
                                                              for r in mine),
                             "auto bits per link": mine[-1]["auto_bits"] or "",
                             "seeds": seeds, "epochs": base["epochs"]})
                print(rows[-1], flush=True)
    return rows


# -- timing -------------------------------------------------------------------------------------------

def timing(quick: bool, scale: float, epochs: int):
    base = dict(dataset="ogbn-arxiv-shape", scale=scale, locality=0.9, model="sage", hidden=128, layers=3,
                norm="batch_norm", epochs=epochs, dropout=0.5, sparse=True, auto_every=2)
    modes = [dict(message_bits=b, no_overlap=True) for b in ("none", "8", "4", "2", "auto")]
    modes += [dict(message_bits=b, no_overlap=False) for b in ("none", "2")]
    rows = []
    one = spawn_runs(1, base, [dict(message_bits="none", no_overlap=True)])[0]
    rows.append({"ranks": 1, "messages": "-", "overlap": False, "median epoch s": one["median_epoch_seconds"],
                 "vs exact, same ranks": 1.0, "blocked on exchange": 0.0, "MB sent / epoch": 0.0,
                 "x fewer bytes than fp32": float("nan"), "auto bits per link": ""})
    for world in (2,) if quick else (2, 4):
        runs = spawn_runs(world, base, modes)
        ref = runs[0]["median_epoch_seconds"]
        for r in runs:
            rows.append({"ranks": world, "messages": "exact" if r["message_bits"] == "none" else r["message_bits"],
                         "overlap": r["overlap"], "median epoch s": r["median_epoch_seconds"],
                         "vs exact, same ranks": r["median_epoch_seconds"] / ref,
                         "blocked on exchange": r["comm_share"], "MB sent / epoch": r["bytes_per_epoch"] / 2**20,
                         "x fewer bytes than fp32": r["fp32_bytes_per_epoch"] / max(1, r["bytes_per_epoch"]),
                         "auto bits per link": r["auto_bits"] or ""})
            print(rows[-1], flush=True)
    return rows


def malloc(quick: bool, scale: float, epochs: int, repeats: int):
    """4 ranks, exact messages with overlap, glibc's own mmap threshold against mapping every allocation
    >= 1 MiB (--malloc-mmap-threshold), interleaved so that a slow spell of the machine hits both."""
    base = dict(dataset="ogbn-arxiv-shape", scale=scale, locality=0.9, model="sage", hidden=128, layers=3,
                norm="batch_norm", epochs=epochs, dropout=0.5, sparse=True, message_bits="none", no_overlap=False)
    rows = []
    for rep in range(repeats):
        times = {}
        for threshold in (0, 2**20):
            run_ = spawn_runs(2 if quick else 4, base, [dict(malloc_mmap_threshold=threshold)])[0]
            times[threshold] = run_["median_epoch_seconds"]
            rows.append({"repeat": rep, "malloc": "glibc's own" if threshold == 0 else "maps >= 1 MiB",
                         "median epoch s": times[threshold], "vs glibc's own, same repeat": times[threshold] / times[0],
                         "peak RSS GB (rank 0)": run_["peak_rss_bytes"] / 1e9})
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--sections", nargs="+", default=["gradients", "accuracy", "timing"],
                   choices=["gradients", "accuracy", "timing", "malloc"])
    p.add_argument("--datasets", nargs="+", default=["Cora", "CiteSeer", "arxiv"], choices=["Cora", "CiteSeer", "arxiv"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--arxiv-scale", type=float, default=1.0)
    p.add_argument("--arxiv-epochs", type=int, default=30)
    p.add_argument("--timing-epochs", type=int, default=6)
    p.add_argument("--malloc-repeats", type=int, default=2)
    args = p.parse_args(argv)
    apply_threads(args)
    q = args.quick
    suffix = "_quick" if q else ""
    for section in args.sections:
        with Timer() as timer:
            if section == "gradients":
                rows = gradients(q)
                note = ("One training step (Cora, 2 x 64 + batch norm, summed loss of the ranks) against one process "
                        "on the whole graph; auto: after its first solve.")
            elif section == "accuracy":
                rows = accuracy(q, 2 if q else args.seeds, 5 if q else args.epochs, 0.05 if q else args.arxiv_scale,
                                3 if q else args.arxiv_epochs, ["Cora"] if q else args.datasets)
                note = ("Test accuracy (%) at the best validation epoch, mean over seeds; gap: mean per-seed "
                        "difference to exact messages (same seed, same partition), with its standard error.")
            elif section == "malloc":
                rows = malloc(q, 0.05 if q else args.arxiv_scale, 3 if q else args.timing_epochs - 1,
                              1 if q else args.malloc_repeats)
                note = ("Median epoch time (slowest rank) and rank 0's peak RSS on the arxiv-shaped graph, GraphSAGE "
                        "3 x 128, exact messages with overlap, by malloc's mmap threshold; all ranks share this "
                        "machine's 2 cores.")
            else:
                rows = timing(q, 0.05 if q else args.arxiv_scale, 3 if q else args.timing_epochs)
                note = ("Median epoch time (training step; slowest rank) on the arxiv-shaped graph, GraphSAGE 3 x 128; "
                        "all ranks share this machine's 2 cores.")
        stem = f"distributed_{section}" + ("" if section != "accuracy" or q or set(args.datasets) == {"Cora", "CiteSeer", "arxiv"}
                                           else "_" + "_".join(args.datasets)) + suffix
        print(write_results(args.out, stem, rows, note, command_line(), timer.seconds))


if __name__ == "__main__":
    main()
