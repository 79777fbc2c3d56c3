"""Epoch time of full-batch training, exactq INT2 vs fp32, measured side by side in one process.

    python experiments/bench_overhead.py [--quick] [--epochs 7] [--profile]

ogbn-arxiv-shaped graph, GraphSAGE and GCN with 3 x 128 and 3 x 256 (batch norm, dropout 0.5), sparse
adjacency. Configurations run round-robin, one training epoch (forward + backward + Adam step) at a time,
so drifts in machine speed hit all alike; the median over epochs after a warm-up is reported as a ratio
to fp32. --profile also profiles one fp32 and one INT2 epoch of each model with torch.profiler and writes
the ops whose self CPU time grows most (INT2 minus fp32) to results/bench_overhead_profile[_quick].txt.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

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


def profile_diff(models, opts, data, top: int = 15) -> str:
    """Self CPU time per op of one fp32 and one INT2 epoch, largest INT2 - fp32 differences first."""
    times = {}
    for k in ("fp32", "INT2"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            epoch(models[k], opts[k], data, CONFIGS[k])
        times[k] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    keys = sorted(set(times["fp32"]) | set(times["INT2"]),
                  key=lambda op: times["fp32"].get(op, (0, 0))[0] - times["INT2"].get(op, (0, 0))[0])
    lines = [f"{'op':<46} {'fp32 ms':>9} {'INT2 ms':>9} {'diff ms':>9}  calls fp32/INT2"]
    for op in keys[:top]:
        (a, na), (b, nb) = times["fp32"].get(op, (0.0, 0)), times["INT2"].get(op, (0.0, 0))
        lines.append(f"{op[:46]:<46} {a:9.1f} {b:9.1f} {b - a:9.1f}  {na}/{nb}")
    total = {k: sum(v[0] for v in t.values()) for k, t in times.items()}
    lines.append(f"{'total self CPU':<46} {total['fp32']:9.1f} {total['INT2']:9.1f} {total['INT2'] - total['fp32']:9.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    apply_threads(args)
    data = paper_graph("ogbn-arxiv", scale=0.05 if args.quick else 1.0, signal=0.2)
    cases = [("sage", 128), ("gcn", 128)] if args.quick else [("sage", 128), ("gcn", 128), ("sage", 256), ("gcn", 256)]
    rows, profiles = [], []
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
                profiles.append(f"## {name} 3x{hidden}\n{profile_diff(models, opts, data)}\n")
                print(profiles[-1])
    stem = "bench_overhead" + ("_quick" if args.quick else "")
    if profiles:
        header = f"One epoch per config, torch.profiler self CPU time per op; command: `{command_line()}`\n\n"
        (Path(args.out) / f"{stem}_profile.txt").write_text(header + "\n".join(profiles))
    note = "Median epoch time (s) after warm-up, configurations interleaved epoch by epoch in one process."
    print(write_results(args.out, stem, rows, note, command_line(), timer.seconds).read_text())


if __name__ == "__main__":
    main()
