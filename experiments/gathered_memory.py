"""Activation memory of models that save gathered messages (GAT, GATv2, PNA), fp32 vs INT2, measured.

    python experiments/gathered_memory.py [--quick] [--threads 2] [--scale 0.05]

PyG's attention and PNA layers save each edge's gathered copy of its endpoint's row (``x_j``, and PNA's
``cat([x_i, x_j])``). exactq stores such a tensor as its source and the index (kind ``gathered`` in the
report; README, "What each saved tensor becomes"). For each model, on the ogbn-arxiv-shaped graph x
``--scale``, one training forward: live tensor bytes after it minus the output (exactq.LiveTensorMemory),
in fp32 and at INT2, and the report's totals and its ``gathered`` row.
Writes experiments/results/gathered_memory[_quick].{md,csv}.
"""
from __future__ import annotations

import contextlib

import torch
from torch_geometric.nn import PNA
from torch_geometric.utils import degree

import exactq
from exactq.train import build_model

from common import Timer, apply_threads, command_line, paper_graph, parser, write_results


def _models(data):
    f, c = data.num_features, int(data.y.max()) + 1
    deg = torch.bincount(degree(data.edge_index[1], data.num_nodes, dtype=torch.long))
    return {
        "GAT 3x256, 2 heads": lambda: build_model("gat", f, 256, c, 3),
        "GATv2 3x256, 2 heads": lambda: build_model("gatv2", f, 256, c, 3),
        "PNA 3x128 (mean/min/max/std)": lambda: PNA(f, 128, 3, c, aggregators=["mean", "min", "max", "std"],
                                                   scalers=["identity", "amplification", "attenuation"], deg=deg,
                                                   dropout=0.5),
    }


def _forward_bytes(model, data, config):
    torch.manual_seed(1)
    with exactq.LiveTensorMemory() as mem:
        with exactq.compress(config) if config else contextlib.nullcontext() as session:
            y = model(data.x, data.edge_index)
        live = mem.live_bytes() - y.untyped_storage().nbytes()
    return live, session


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--scale", type=float, default=0.05, help="nodes and edges of ogbn-arxiv x this")
    args = p.parse_args(argv)
    apply_threads(args)
    rows = []
    with Timer() as timer:
        data = paper_graph("ogbn-arxiv", scale=0.005 if args.quick else args.scale)
        for name, make in _models(data).items():
            torch.manual_seed(0)
            model = make().train()
            fp32, _ = _forward_bytes(model, data, None)
            int2, session = _forward_bytes(model, data, exactq.Config(bits=2))
            report = session.report()
            gathered = report.by_kind.get("gathered")
            rows.append({"model": name, "nodes": data.num_nodes, "edges": data.edge_index.shape[1],
                         "fp32 MB": fp32 / 2**20, "INT2 MB": int2 / 2**20, "x smaller": fp32 / int2,
                         "report fp32 MB": report.original_bytes / 2**20,
                         "report stored MB": report.stored_bytes / 2**20,
                         "gathered fp32 MB": gathered.original_bytes / 2**20 if gathered else 0.0,
                         "gathered stored MB": gathered.stored_bytes / 2**20 if gathered else 0.0})
            print(rows[-1], flush=True)
    print(write_results(args.out, "gathered_memory" + ("_quick" if args.quick else ""), rows,
                        "One training forward on the ogbn-arxiv-shaped graph; MB measured (live tensors after the "
                        "forward, output excluded); the report's totals and its `gathered` row beside them.",
                        command_line(), timer.seconds))


if __name__ == "__main__":
    main()
