"""Random projection time as a ratio to the bare matrix product of the same shapes, measured in the same run.

    python experiments/bench_projection.py [--repeats 7] [--device cpu]

``exactq.random_project`` is (x * per-group signs) @ P and ``random_unproject`` is (y @ P^T) * signs,
with P and the signs drawn again from the seed each call; the ratios show what the signs and draws add
to the product itself (``x @ P`` into fresh memory; ``y @ P^T`` into a reused buffer, as the engine's
restore does). Shapes: an arxiv-sized graph's hidden activations (169,343 rows, 128 or 256 columns) and
CiteSeer's aggregated input features (3,327 x 3,703), each at D/R = 8.
"""
from __future__ import annotations

import argparse

import torch

import exactq
from bench_kernels import median_time

SHAPES = ((169_343, 128), (169_343, 256), (3_327, 3_703))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    print(f"device={args.device} threads={torch.get_num_threads()} D/R=8; median of {args.repeats}")
    header = ("rows x d -> r", "x @ P ms", "project/product", "y @ P^T ms", "unproject/product")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for rows, d in SHAPES:
        r = exactq.functional.projected_width(d, 0.125)
        x = torch.randn(rows, d, device=args.device)
        pm = torch.randn(d, r, device=args.device)
        y = exactq.random_project(x, r, seed=1)
        out = torch.empty(rows * d, device=args.device)
        t_mm = median_time(lambda: x @ pm, args.repeats, args.device)
        t_p = median_time(lambda: exactq.random_project(x, r, seed=1), args.repeats, args.device)
        t_mmt = median_time(lambda: torch.mm(y, pm.t(), out=out.view(rows, d)), args.repeats, args.device)
        t_u = median_time(lambda: exactq.random_unproject(y, d, seed=1, out=out), args.repeats, args.device)
        print(f"| {rows} x {d} -> {r} | {t_mm * 1e3:.1f} | {t_p / t_mm:.2f} | {t_mmt * 1e3:.1f} | {t_u / t_mmt:.2f} |")


if __name__ == "__main__":
    main()
