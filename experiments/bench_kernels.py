"""Quantize / dequantize time as a ratio to ``x.clone()`` of the same tensor, measured in the same run.

    python experiments/bench_kernels.py [--sizes 1 4 16 64] [--bits 2] [--repeats 7] [--device cpu]

Sizes are in millions of float32 elements. The reference (plain PyTorch) runs up to --reference-max
million elements; it is the specification, not meant to be fast.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import exactq
from exactq import _ops, reference


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="millions of elements")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--block-size", type=int, default=exactq.DEFAULT_BLOCK_SIZE)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--reference-max", type=int, default=4, help="largest size (M) to run the reference at")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    level = exactq.int2_levels(args.block_size)[1] if args.bits == 2 else None
    print(f"device={args.device} threads={torch.get_num_threads()} bits={args.bits} "
          f"block_size={args.block_size} nonuniform={level is not None}; median of {args.repeats}")
    header = ("M elems", "clone ms", "quant/clone", "dequant/clone", "ref quant/clone", "ref dequant/clone",
              "GB/s quant")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for m in args.sizes:
        n = m * 2**20
        x = torch.randn(n, device=args.device)
        t_clone = median_time(lambda: x.clone(), args.repeats, args.device)
        packed, stats = _ops.quantize(x, args.bits, args.block_size, level, 1)
        t_q = median_time(lambda: _ops.quantize(x, args.bits, args.block_size, level, 1), args.repeats, args.device)
        t_d = median_time(
            lambda: _ops.dequantize(packed, stats, args.bits, args.block_size, level, n, torch.float32),
            args.repeats, args.device,
        )
        if m <= args.reference_max:
            r = max(1, args.repeats // 3)
            t_rq = median_time(lambda: reference.quantize(x, args.bits, args.block_size, level, 1), r, args.device)
            t_rd = median_time(
                lambda: reference.dequantize(packed, stats, args.bits, args.block_size, level, n, torch.float32),
                r, args.device,
            )
            ref = (f"{t_rq / t_clone:.1f}", f"{t_rd / t_clone:.1f}")
        else:
            ref = ("-", "-")
        gbs = x.nbytes / t_q / 1e9
        print(f"| {m} | {t_clone * 1e3:.2f} | {t_q / t_clone:.2f} | {t_d / t_clone:.2f} | {ref[0]} | {ref[1]} | {gbs:.1f} |")


if __name__ == "__main__":
    main()
