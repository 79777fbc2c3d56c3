"""INT8 compute (exactq.compress(compute="int8")): kernels, epoch time, memory and a profile, each
measured side by side in one process.

    python experiments/bench_compute.py [--quick] [--epochs 5] [--models sage gcn] [--hidden 256]

* kernels: int8 CSR SpMM (``exactq::int8_spmm``, sums of codes in int32; with edge weights, float32)
  vs fp32 ``torch.sparse.mm`` on the same CSR; the int8 SDDMM (``exactq::int8_sddmm``, GAT's attention
  gradient) vs fp32 gather + multiply + sum; the fused int8 quantize vs ``clone``; a stored INT2 tensor
  decoded straight to int8 rows (``exactq::dequantize_int8``) vs dequantize + quantize; seeded dropout vs
  torch's; dense GEMM fp32 vs bf16 vs int8 (``torch._int_mm``, and ``exactq::int8_mm``: it with its epilogue, with and
  without the input's quantize).
* epochs: each model (GraphSAGE and GCN by default; GIN, GAT) 3 x hidden with batch norm and dropout 0.5
  on an ogbn-arxiv-shaped graph, configurations interleaved one epoch (forward + backward + Adam) at a
  time, median after warm-up: PyG fp32 with ``edge_index``, fp32 with a CSR adjacency (PyG's fastest fp32
  path), bf16 autocast (with ``edge_index``: torch.sparse.mm has no bf16 CSR kernel), exactq INT2
  storage, and compute="int8" with INT2 and INT8 storage on the CSR and INT2 on the ``edge_index``.
* memory: live bytes after one training forward minus its output (exactq.LiveTensorMemory), fp32 vs
  compute="int8" + INT2, on the CSR and on the ``edge_index``, after a warm-up forward built the
  graph's cached CSR and transpose (graph memory); the first model.
* profile: torch.profiler self CPU time per op of one compute="int8" + INT2 epoch of the first model.

Results go to results/bench_compute_{kernels,epochs,memory,profile}.md, with the models in the name
when they are not the default pair.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import exactq
from exactq import _ops
from exactq.data import with_sparse_adjacency
from exactq.train import build_model

from common import Timer, apply_threads, command_line, paper_graph, parser, write_results


def _best_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def kernel_rows(data, widths, repeat):
    n = data.num_nodes
    adj = data.adj_t
    crow, col = adj.crow_indices(), adj.col_indices()
    weights = torch.rand(col.numel()) + 0.5
    weighted = torch.sparse_csr_tensor(crow, col, weights, adj.shape)
    rows = []
    for c in widths:
        x = torch.randn(n, c)
        q, s = _ops.int8_quantize(x, 0)
        fp32 = _best_ms(lambda: torch.sparse.mm(adj, x), repeat)
        fp32_w = _best_ms(lambda: torch.sparse.mm(weighted, x), repeat)
        int8 = _best_ms(lambda: _ops.int8_spmm(crow, col, None, q, s, None), repeat)
        int8_w = _best_ms(lambda: _ops.int8_spmm(crow, col, weights, q, s, None), repeat)
        quant = _best_ms(lambda: _ops.int8_quantize(x, 0), repeat)
        rows += [
            {"kernel": f"SpMM sum, {c} features", "baseline": "fp32 torch.sparse.mm", "baseline_ms": fp32,
             "exactq_ms": int8, "speedup": fp32 / int8},
            {"kernel": f"SpMM weighted, {c} features", "baseline": "fp32 torch.sparse.mm", "baseline_ms": fp32_w,
             "exactq_ms": int8_w, "speedup": fp32_w / int8_w},
            {"kernel": f"SpMM sum + quantize, {c} features", "baseline": "fp32 torch.sparse.mm", "baseline_ms": fp32,
             "exactq_ms": int8 + quant, "speedup": fp32 / (int8 + quant)},
            {"kernel": f"int8 quantize (per column), {n}x{c}", "baseline": "clone", "baseline_ms":
             _best_ms(lambda: x.clone(), repeat), "exactq_ms": quant, "speedup": float("nan")},
        ]
        rows[-1]["speedup"] = rows[-1]["baseline_ms"] / quant
        # A stored INT2 activation made into the weight gradient's int8 operand: decoded straight to codes,
        # vs decoding to float32 first and quantizing that.
        stored = exactq.quantize(x, 2, 256, nonuniform=True, seed=1)
        fused = _best_ms(lambda: exactq.functional.dequantize_int8(stored, 3), repeat)
        two_step = _best_ms(lambda: _ops.int8_quantize(exactq.dequantize(stored), 1, 3), repeat)
        rows.append({"kernel": f"INT2 -> int8 rows, {n}x{c}", "baseline": "dequantize + int8 quantize",
                     "baseline_ms": two_step, "exactq_ms": fused, "speedup": two_step / fused})
        torch_drop = _best_ms(lambda: F.dropout(x, 0.5, True), repeat)
        seeded = _best_ms(lambda: _ops.seeded_dropout(x, 0.5, 1), repeat)
        rows.append({"kernel": f"dropout p=0.5, {n}x{c}", "baseline": "torch F.dropout", "baseline_ms": torch_drop,
                     "exactq_ms": seeded, "speedup": torch_drop / seeded})
        heads = 2  # GAT's attention gradient: <g_i, x_j> per edge and head
        g = torch.randn(n, c)
        rows_of = torch.repeat_interleave(torch.arange(n), crow.diff())
        qg, sg = _ops.int8_quantize(g.view(n * heads, -1), 1)
        qx, sx = _ops.int8_quantize(x.view(n * heads, -1), 1)
        qg, sg, qx, sx = qg.view(n, c), sg.view(n, heads), qx.view(n, c), sx.view(n, heads)
        fp32_sddmm = _best_ms(lambda: (g[rows_of] * x[col]).view(-1, heads, c // heads).sum(-1), repeat)
        int8_sddmm = _best_ms(lambda: _ops.int8_sddmm(crow, col, qg, sg, qx, sx), repeat)
        rows.append({"kernel": f"SDDMM {heads} heads x {c // heads}", "baseline": "fp32 gather + multiply + sum",
                     "baseline_ms": fp32_sddmm, "exactq_ms": int8_sddmm, "speedup": fp32_sddmm / int8_sddmm})
        w = torch.randn(c, c)
        xb, wb = x.bfloat16(), w.bfloat16()
        qx, sx = _ops.int8_quantize(x, 1)
        qw, sw = _ops.int8_quantize(w, 1)
        mm32 = _best_ms(lambda: x @ w.t(), repeat)
        for name, fn in (("bf16 mm (operands already bf16)", lambda: xb @ wb.t()),
                         ("bf16 mm with casts in and out", lambda: (x.bfloat16() @ w.bfloat16().t()).float()),
                         ("torch._int_mm (operands already int8)", lambda: torch._int_mm(qx, qw.t())),
                         ("exactq::int8_mm (torch._int_mm + epilogue, operands int8)",
                          lambda: _ops.int8_mm(qx, qw.t(), sx, sw)),
                         ("int8: quantize + exactq::int8_mm",
                          lambda: _ops.int8_mm(_ops.int8_quantize(x, 1)[0], qw.t(), sx, sw))):
            t = _best_ms(fn, repeat)
            rows.append({"kernel": f"GEMM {n}x{c} @ {c}x{c}: {name}", "baseline": "fp32 mm", "baseline_ms": mm32,
                         "exactq_ms": t, "speedup": mm32 / t})
    return rows


def _configs():
    return {
        "fp32 edge_index": ("edge_index", None, None),
        "fp32 CSR": ("adj_t", None, None),
        # torch.sparse.mm has no bf16 CSR kernel (nor a bf16 x with a float CSR): bf16 runs edge_index.
        "bf16 autocast edge_index": ("edge_index", None, torch.bfloat16),
        "INT2 storage CSR": ("adj_t", exactq.Config(bits=2), None),
        "int8 compute + INT2 CSR": ("adj_t", exactq.Config(bits=2, compute="int8"), None),
        "int8 compute + INT8 CSR": ("adj_t", exactq.Config(bits=8, compute="int8"), None),
        # the unchanged model on its edge_index: exactq aggregates on the graph's cached CSR
        "int8 compute + INT2 edge_index": ("edge_index", exactq.Config(bits=2, compute="int8"), None),
    }


def _epoch(model, opt, data, graph, cfg, autocast) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    amp = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with amp, exactq.compress(cfg) if cfg is not None else contextlib.nullcontext():
        out = model(data.x, data[graph])
    F.cross_entropy(out[data.train_mask].float(), data.y[data.train_mask]).backward()
    opt.step()
    return time.perf_counter() - t0


def epoch_rows(data, models, hidden, epochs, warmup):
    rows = []
    configs = _configs()
    for name in models:
        torch.manual_seed(0)
        nets = {k: build_model(name, data.num_features, hidden, 40, 3) for k in configs}
        for m in nets.values():
            m.load_state_dict(nets["fp32 CSR"].state_dict())
        opts = {k: torch.optim.Adam(m.parameters(), lr=0.01) for k, m in nets.items()}
        times = {k: [] for k in configs}
        for i in range(warmup + epochs):
            for k, (graph, cfg, amp) in configs.items():
                t = _epoch(nets[k], opts[k], data, graph, cfg, amp)
                if i >= warmup:
                    times[k].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in configs:
            rows.append({"model": f"{name} 3x{hidden}", "config": k, "median_epoch_s": med[k],
                         "vs fp32 edge_index": med[k] / med["fp32 edge_index"],
                         "vs fp32 CSR": med[k] / med["fp32 CSR"],
                         "vs bf16 autocast": med[k] / med["bf16 autocast edge_index"],
                         "epochs_timed": len(times[k])})
            print(rows[-1])
    return rows


def memory_rows(data, name, hidden):
    """Per graph form: live bytes after one training forward, fp32 vs compute="int8" + INT2."""
    torch.manual_seed(0)
    model = build_model(name, data.num_features, hidden, 40, 3)
    rows = []
    for graph in ("adj_t", "edge_index"):
        with exactq.compress(compute="int8"):
            model(data.x, data[graph])  # the graph's cached CSR and transpose: made once per graph
        out_bytes = {}
        for label, cfg in (("fp32", None), ("int8 + INT2", exactq.Config(bits=2, compute="int8"))):
            torch.manual_seed(1)
            with exactq.LiveTensorMemory() as mem:
                with exactq.compress(cfg) if cfg is not None else contextlib.nullcontext():
                    out = model(data.x, data[graph])
                out_bytes[label] = mem.live_bytes() - out.untyped_storage().nbytes()
            del out
        rows.append({"model": f"{name} 3x{hidden}", "graph": "CSR" if graph == "adj_t" else graph,
                     "fp32 MB": out_bytes["fp32"] / 2**20, "int8 + INT2 MB": out_bytes["int8 + INT2"] / 2**20,
                     "x smaller": out_bytes["fp32"] / out_bytes["int8 + INT2"]})
    return rows


def profile_text(data, name, hidden, top=18) -> str:
    torch.manual_seed(0)
    model = build_model(name, data.num_features, hidden, 40, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    cfg = exactq.Config(bits=2, compute="int8")
    _epoch(model, opt, data, "adj_t", cfg, None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _epoch(model, opt, data, "adj_t", cfg, None)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    lines = [f"{'op':<52} {'self ms':>9} {'share':>6} {'calls':>6}"]
    for e in events[:top]:
        lines.append(f"{e.key[:52]:<52} {e.self_cpu_time_total / 1e3:9.1f} {e.self_cpu_time_total / 1e3 / total:6.1%} "
                     f"{e.count:6d}")
    lines.append(f"{'total self CPU':<52} {total:9.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--models", nargs="+", default=["sage", "gcn"], choices=["sage", "gcn", "gin", "gat"])
    args = p.parse_args(argv)
    apply_threads(args)
    scale = 0.05 if args.quick else 1.0
    data = with_sparse_adjacency(paper_graph("ogbn-arxiv", scale=scale, signal=0.2))
    suffix = ("_quick" if args.quick else "") + ("" if args.models == ["sage", "gcn"] else "_" + "_".join(args.models))
    with Timer() as timer:
        kernels = kernel_rows(data, [128] if args.quick else [128, 256], 2 if args.quick else 5)
        epochs = epoch_rows(data, args.models, args.hidden, 2 if args.quick else args.epochs,
                            1 if args.quick else args.warmup)
        memory = memory_rows(data, args.models[0], args.hidden)
        profile = profile_text(data, args.models[0], args.hidden)
    cmd = command_line()
    for stem, rows, note in (
            (f"bench_compute_kernels{suffix}", kernels, "Best of repeats (ms); speedup = baseline / exactq."),
            (f"bench_compute_epochs{suffix}", epochs,
             "Median epoch time (s) after warm-up, configurations interleaved epoch by epoch in one process; "
             "ratios to each baseline (lower is faster)."),
            (f"bench_compute_memory{suffix}", memory,
             "Live bytes after one training forward minus its output (MB), after a warm-up forward.")):
        print(write_results(args.out, stem, rows, note, cmd, timer.seconds).read_text())
    text = f"# bench_compute_profile{suffix}\n\nOne compute=\"int8\" + INT2 epoch of {args.models[0]} 3x{args.hidden}; " \
           f"torch.profiler self CPU time. Command: `{cmd}`\n\n```\n{profile}\n```\n"
    (Path(args.out) / f"bench_compute_profile{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
