"""Epoch time of full-batch training, exactq INT2 vs fp32, measured side by side in one process.

    python experiments/bench_overhead.py [--quick] [--epochs 7] [--profile]

ogbn-arxiv-shaped graph, GraphSAGE and GCN with 3 x 128 and 3 x 256 (batch norm, dropout 0.5), sparse
adjacency. Configurations run round-robin, one training epoch (forward + backward + Adam step) at a time,
so drifts in machine speed hit all alike; the median over epochs after a warm-up is reported as a ratio
to fp32. --profile prints cProfile's top functions of a compressed epoch.
"""
from __future__ import annotations

import cProfile
import contextlib
import io
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import exactq
from exactq.train import build_model

from common import apply_threads, Timer, command_line, paper_graph, parser, write_results

CONFIGS = {"fp32": None, "INT2": exactq.Config(bits=2), "INT2 D/R=8": exactq.Config(bits=2, rp_ratio=0.125)}


def epoch(model, opt, data, cfg) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with exactq.compress(cfg) if cfg is not None else contextlib.nullcontext():
        out = model(data.x, data.adj_t)
    F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
    opt.step()
    return time.perf_counter() - t0


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    apply_threads(args)
    data = paper_graph("ogbn-arxiv", scale=0.05 if args.quick else 1.0, signal=0.2)
    cases = [("sage", 128), ("gcn", 128)] if args.quick else [("sage", 128), ("gcn", 128), ("sage", 256), ("gcn", 256)]
    rows = []
    with Timer() as timer:
        for name, hidden in cases:
            torch.manual_seed(0)
            models = {k: build_model(name, data.num_features, hidden, 40, 3) for k in CONFIGS}
            for m in models.values():
                m.load_state_dict(models["fp32"].state_dict())
            opts = {k: torch.optim.Adam(m.parameters(), lr=0.01) for k, m in models.items()}
            times = {k: [] for k in CONFIGS}
            for i in range(args.warmup + args.epochs):
                for k, cfg in CONFIGS.items():
                    t = epoch(models[k], opts[k], data, cfg)
                    if i >= args.warmup:
                        times[k].append(t)
            base = statistics.median(times["fp32"])
            for k in CONFIGS:
                med = statistics.median(times[k])
                rows.append({"model": f"{name} 3x{hidden}", "config": k, "median_epoch_s": med,
                             "ratio_vs_fp32": med / base, "epochs_timed": len(times[k])})
                print(f"{name} 3x{hidden} {k:>12}: {med:.3f} s/epoch, {med / base:.3f}x fp32")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                epoch(models["INT2"], opts["INT2"], data, CONFIGS["INT2"])
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
                print(s.getvalue())
    stem = "bench_overhead" + ("_quick" if args.quick else "")
    note = "Median epoch time (s) after warm-up, configurations interleaved epoch by epoch in one process."
    print(write_results(args.out, stem, rows, note, command_line(), timer.seconds).read_text())


if __name__ == "__main__":
    main()
