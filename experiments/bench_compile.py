"""torch.compile with and without exactq, side by side in one run: epoch time and activation bytes.

    python experiments/bench_compile.py [--quick] [--scale 0.25] [--epochs 5] [--threads 2]

GraphSAGE 3 x 128 (batch norm, dropout 0.5) on an ogbn-arxiv-shaped graph (nodes and edges x scale),
edge_index aggregation, full-batch epochs (forward, backward, Adam step), four ways: eager fp32, eager
exactq INT2, compiled fp32, compiled + exactq INT2 (``torch.compile(model)`` called inside the block).
Time: median epoch after one warm-up epoch (which includes compilation; reported apart). Bytes: what
autograd holds after the forward for backward, counted by a saved-tensor hook for fp32 (every saved
tensor once, parameters excluded) and by exactq's report for exactq (stored bytes, kept included).
exactq keeps a compiled region's saved tensors exactly (README, "torch.compile"), so the expected
result is: compiled + exactq stores what compiled fp32 stores.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import exactq
from exactq.train import build_model

from common import Timer, apply_threads, command_line, paper_graph, parser, write_results


class _SavedBytes:
    """A saved-tensor hook pair that counts what autograd saves (each storage once, no parameters)."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        if not isinstance(t, torch.nn.Parameter) and t.layout == torch.strided:
            key = t.untyped_storage()._cdata
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        return t


def _epoch(model, data, opt, compiled, use_exactq):
    opt.zero_grad(set_to_none=True)
    counter = _SavedBytes()
    t0 = time.perf_counter()
    if use_exactq:
        with exactq.compress(bits=2) as session:
            out = compiled(data.x, data.edge_index)
        saved = session.report().stored_bytes
    else:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            out = compiled(data.x, data.edge_index)
        saved = counter.bytes
    F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
    opt.step()
    return time.perf_counter() - t0, saved


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)
    apply_threads(args)
    scale, epochs = (0.01, 2) if args.quick else (args.scale, args.epochs)
    data = paper_graph("ogbn-arxiv", scale=scale)
    rows = []
    with Timer() as timer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("eager", "compiled"):
            for use_exactq in (False, True):
                torch.manual_seed(0)
                model = build_model("sage", data.num_features, 128, 40, 3)
                model.train()
                opt = torch.optim.Adam(model.parameters(), lr=0.01)
                torch._dynamo.reset()
                fn = torch.compile(model) if mode == "compiled" else model
                times, saved = [], 0
                for _ in range(epochs + 1):
                    dt, saved = _epoch(model, data, opt, fn, use_exactq)
                    times.append(dt)
                rows.append({"mode": mode, "exactq": "INT2" if use_exactq else "fp32", "first epoch s": times[0],
                             "epoch s": statistics.median(times[1:]), "saved MB": saved / 2**20})
                print(rows[-1])
    base = {r["mode"]: r for r in rows if r["exactq"] == "fp32"}
    for r in rows:
        r["time vs fp32 same mode"] = r["epoch s"] / base[r["mode"]]["epoch s"]
        r["saved x smaller vs fp32 same mode"] = base[r["mode"]]["saved MB"] / r["saved MB"]
    note = (f"GraphSAGE 3 x 128 on the ogbn-arxiv shape x {scale} ({data.num_nodes} nodes, {data.edge_index.shape[1]} "
            f"edges); median of {epochs} epochs after a warm-up epoch.")
    print(write_results(args.out, "bench_compile_quick" if args.quick else "bench_compile", rows, note, command_line(),
                        timer.seconds))


if __name__ == "__main__":
    main()
