"""Sweep PyTorch's OpInfo database with exactq: every differentiable float32 op's sample inputs,
gradients with and without ``exactq.compress(bits, min_numel=0)`` (exactq.testing.opinfo).

Writes opinfo_sweep.{md,csv}: per op the worst relative gradient error over its samples, non-finite
entries where fp32 was finite, how many saved tensors exactq kept exactly, and failures; the header
gives the totals the README quotes.
"""
from __future__ import annotations

from collections import defaultdict

from tqdm import tqdm

from common import Timer, apply_threads, command_line, parser, write_results
from exactq.testing.opinfo import differentiable_ops, sweep_op


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--samples", type=int, default=3, help="sample inputs per op")
    args = p.parse_args(argv)
    apply_threads(args)
    ops = differentiable_ops()
    if args.quick:
        ops = ops[:: max(1, len(ops) // 40)]
    with Timer() as timer:
        per_op = defaultdict(list)
        for op in tqdm(ops, desc="ops", mininterval=5):
            for r in sweep_op(op, args.bits, args.samples):
                per_op[r.op].append(r)
    rows = []
    for name, rs in sorted(per_op.items()):
        rows.append({"op": name, "samples": len(rs), "worst error": max(r.error for r in rs),
                     "nonfinite": sum(r.nonfinite for r in rs), "saved": sum(r.saved for r in rs),
                     "kept": sum(r.kept for r in rs), "failure": next((r.failure for r in rs if r.failure), "")})
    finite = [r["worst error"] for r in rows if r["failure"] == ""]
    kept_ops = sum(1 for r in rows if r["kept"] > 0)
    note = (f"{len(rows)} ops swept ({sum(r['samples'] for r in rows)} samples) at {args.bits} bits; "
            f"{sum(r['saved'] for r in rows)} saved tensors, {sum(r['kept'] for r in rows)} kept exactly "
            f"(in {kept_ops} ops); worst relative gradient error {max(finite):.4g} (median "
            f"{sorted(finite)[len(finite) // 2]:.3g}); {sum(r['nonfinite'] for r in rows)} non-finite entries "
            f"where fp32 was finite; {sum(1 for r in rows if r['failure'])} ops failing with exactq only.")
    print(note)
    stem = "opinfo_sweep_quick" if args.quick else "opinfo_sweep"
    print(write_results(args.out, stem, rows, note, command_line(), timer.seconds))


if __name__ == "__main__":
    main()
