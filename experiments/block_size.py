"""Block size and non-uniform levels on real activations (ICASSP variance claim; default block size).

    python experiments/block_size.py [--quick]

Trains a 3 x 128 GraphSAGE (batch norm, dropout 0.5) on a learnable arxiv-shaped graph, captures the
float tensors autograd saves in one training step, and quantizes them to INT2 with each block size,
uniform and non-uniform levels. Prints the measured mean squared error (relative to the tensors'
variance), the reduction the non-uniform levels give (measured vs the model's prediction) and the
storage per element. Writes experiments/results/block_size.{md,csv,png}.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

import exactq
from exactq.engine import OpTracker, _op_name
from exactq.levels import predicted_variance_reduction
from exactq.train import build_model, train

from common import apply_threads, Timer, command_line, paper_graph, parser, write_results


def capture_activations(model, data, rp_ratio=0.125):
    """The float activations one training forward saves for the ops exactq quantizes, by category:
    batch-norm inputs, linear inputs, and linear inputs after exactq's random projection (D/R = 8)."""
    tracker = OpTracker()
    captured = {"batch_norm input": [], "linear input": [], "linear input, projected D/R=8": []}

    def pack(t):
        name = _op_name(tracker.current)
        if t.dtype == torch.float32 and t.numel() >= 4096 and t.dim() == 2 and not isinstance(t, torch.nn.Parameter):
            if name == "batch_norm":
                captured["batch_norm input"].append(t.detach().clone())
            elif name == "linear" and t.grad_fn is not None:
                captured["linear input"].append(t.detach().clone())
                r = exactq.functional.projected_width(t.shape[1], rp_ratio)
                seed = len(captured["linear input"])
                captured["linear input, projected D/R=8"].append(exactq.random_project(t, r, seed))
        return t

    model.train()
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(data.x, data.adj_t)
    return captured


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args(argv)
    apply_threads(args)
    scale = 0.05 if args.quick else 1.0
    sizes = [64, 128, 256, 1024] if args.quick else [16, 64, 128, 256, 512, 1024, 4096]
    with Timer() as timer:
        data = paper_graph("ogbn-arxiv", scale=scale, signal=0.2)
        torch.manual_seed(0)
        model = build_model("sage", data.num_features, 128, 40, 3)
        train(model, data, exactq.Config(), epochs=5 if args.quick else args.epochs, measure_memory=False)
        captured = capture_activations(model, data)
        rows = []
        for category, acts in captured.items():
            total_var = sum(float(a.var() * a.numel()) for a in acts)
            for bs in tqdm(sizes, desc=category):
                mse = {}
                for nonuniform in (False, True):
                    err = 0.0
                    for seed, a in enumerate(acts):
                        q = exactq.quantize(a, bits=2, block_size=bs, nonuniform=nonuniform, seed=seed)
                        err += float((exactq.dequantize(q) - a).pow(2).sum())
                    mse[nonuniform] = err / total_var
                bytes_per_elem = 2 / 8 + 4 / bs
                rows.append({
                    "activations": f"{category} ({len(acts)})",
                    "block_size": bs,
                    "rel_mse_uniform": mse[False],
                    "rel_mse_nonuniform": mse[True],
                    "measured_reduction_%": 100 * (1 - mse[True] / mse[False]),
                    "predicted_reduction_%": 100 * predicted_variance_reduction(bs),
                    "bytes_per_element": bytes_per_elem,
                    "x_smaller_than_fp32": 4 / bytes_per_elem,
                })
        n_elems = sum(a.numel() for acts in captured.values() for a in acts)
    note = (f"Activations ({n_elems / 1e6:.1f} M elements) saved in one training step of a 3 x 128 "
            f"GraphSAGE on an arxiv-shaped learnable graph (scale {scale}); INT2; rel_mse = sum of squared "
            "errors / sum of squared deviations from each tensor's mean.")
    path = write_results(args.out, "block_size" + ("_quick" if args.quick else ""), rows, note, command_line(),
                         timer.seconds)
    print(path.read_text())
    if not args.quick:
        _plot(rows, args.out)


def _plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(dict.fromkeys(r["activations"] for r in rows))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for c in cats:
        rs = [r for r in rows if r["activations"] == c]
        bs = [r["block_size"] for r in rs]
        line, = ax[0].plot(bs, [r["rel_mse_uniform"] for r in rs], "o-", label=f"{c}, uniform")
        ax[0].plot(bs, [r["rel_mse_nonuniform"] for r in rs], "s--", color=line.get_color(), label=f"{c}, non-uniform")
        ax[1].plot(bs, [r["measured_reduction_%"] for r in rs], "o-", color=line.get_color(), label=c)
    bs = sorted({r["block_size"] for r in rows})
    ax[1].plot(bs, [100 * predicted_variance_reduction(b) for b in bs], "k:", label="predicted (normal model)")
    ax[1].axhline(0, color="grey", lw=0.5)
    ax[0].set(xscale="log", xlabel="block size (elements)", ylabel="relative MSE", title="INT2 error on real activations")
    ax[1].set(xscale="log", xlabel="block size (elements)", ylabel="MSE reduction, non-uniform vs uniform (%)")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/block_size.png", dpi=120)


if __name__ == "__main__":
    main()
