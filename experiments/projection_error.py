"""Weight-gradient error of random projection: EXACT's single matrix vs exactq's per-group signs.

    python experiments/projection_error.py [--quick] [--epochs 10] [--draws 8] [--graph arxiv|Cora]

Trains a 3 x 128 GraphSAGE (batch norm) in fp32 on the learnable arxiv-shaped graph (or a 2 x 64
GraphSAGE on Cora, the accuracy experiment's configs), then for one
training step captures each linear layer's input X and output gradient G. A linear layer saves X only
for its weight gradient X^T G, so that is where the stored form's error lands. For each layer and each
way of storing X, prints the relative squared error E||X^^T G - X^T G||^2 / ||X^T G||^2 over --draws
seeds: INT2 without projection, D/R = 8 with one projection matrix for all rows (EXACT), and D/R = 8
with random signs per group of 16 rows (exactq), each projection alone and followed by INT2.
Writes experiments/results/projection_error[_quick][_Cora].{md,csv,png}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import exactq
from exactq.data import load_planetoid, with_sparse_adjacency
from exactq.train import build_model, train

from common import apply_threads, Timer, command_line, paper_graph, parser, write_results

RP_RATIO = 0.125


def capture_linear_inputs_and_grads(model, data):
    """(name, X, G) of every linear layer whose input is an activation (not the raw node features)."""
    from torch_geometric.nn.dense.linear import Linear

    captured = {}

    def hook(name):
        def fwd(module, inputs, output):
            if inputs[0] is not data.x:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                output.register_hook(lambda g: captured.__setitem__(name, (x, g.reshape(-1, g.shape[-1]))))
        return fwd

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (Linear, torch.nn.Linear))]
    model.train()
    try:
        out = model(data.x, data.adj_t)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
    finally:
        for h in handles:
            h.remove()
    return [(n, *captured[n]) for n in sorted(captured)]


def stored_forms(x, seed):
    """How X can be stored and restored: label -> restored estimate of X (one random draw)."""
    d = x.shape[1]
    r = exactq.functional.projected_width(d, RP_RATIO)

    def int2(t, nonuniform):
        return exactq.dequantize(exactq.quantize(t, bits=2, nonuniform=nonuniform, seed=seed + 1))

    out = {"INT2, no projection": int2(x, False)}
    schemes = (("one matrix (EXACT)", x.shape[0]), ("per-group signs (exactq)", exactq.functional.PROJECTION_GROUP_ROWS))
    for label, group_rows in schemes:
        y = exactq.random_project(x, r, seed, group_rows)
        out[f"D/R=8 {label}"] = exactq.random_unproject(y, d, seed, group_rows)
        # exactq's default ("auto") levels are non-uniform on projected values (normal-like).
        out[f"D/R=8 {label} + INT2"] = exactq.random_unproject(int2(y, True), d, seed, group_rows)
    return out


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=10, help="fp32 epochs before capturing (gradients of a model in training)")
    p.add_argument("--draws", type=int, default=8, help="random draws averaged per stored form")
    p.add_argument("--graph", choices=["arxiv", "Cora"], default="arxiv")
    args = p.parse_args(argv)
    apply_threads(args)
    epochs, draws = (2, 3) if args.quick else (args.epochs, args.draws)
    with Timer() as timer:
        if args.graph == "Cora":
            data, layers, hidden, norm = with_sparse_adjacency(load_planetoid("Cora")), 2, 64, None
        else:
            data = paper_graph("ogbn-arxiv", scale=0.05 if args.quick else 1.0, signal=1.0)
            layers, hidden, norm = 3, 128, "batch_norm"
        torch.manual_seed(0)
        model = build_model("sage", data.num_features, hidden, int(data.y.max()) + 1, layers, norm=norm)
        train(model, data, None, epochs=epochs, measure_memory=False)
        rows = []
        for name, x, g in tqdm(capture_linear_inputs_and_grads(model, data), desc="layers"):
            exact = x.t() @ g
            err = {}
            for seed in range(draws):
                for label, x_hat in stored_forms(x, 1000 * seed).items():
                    e = float((x_hat.t() @ g - exact).pow(2).sum() / exact.pow(2).sum())
                    err[label] = err.get(label, 0.0) + e / draws
            rows += [{"layer": name, "input": f"{x.shape[0]} x {x.shape[1]}", "stored_as": k, "rel_sq_error": v}
                     for k, v in err.items()]
    graph = "Cora" if args.graph == "Cora" else "the arxiv-shaped CSBM graph"
    note = (f"Relative squared error of each linear layer's weight gradient X^T G, mean of {draws} draws, GraphSAGE "
            f"{layers} x {hidden} ({norm or 'no norm'}) after {epochs} fp32 epochs on {graph}.")
    stem = "projection_error" + ("_quick" if args.quick else "") + ("_Cora" if args.graph == "Cora" else "")
    path = write_results(args.out, stem, rows, note, command_line(), timer.seconds)
    print(path.read_text())
    plot(rows, path.with_suffix(".png"))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    forms = list(dict.fromkeys(r["stored_as"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(forms)
    for i, f in enumerate(forms):
        vals = [next(r["rel_sq_error"] for r in rows if r["layer"] == l and r["stored_as"] == f) for l in layers]
        ax.bar([j + i * width for j in range(len(layers))], vals, width, label=f)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=20, fontsize=8)
    ax.set(yscale="log", ylabel="relative squared error of X^T G", title="Weight-gradient error by stored form")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
