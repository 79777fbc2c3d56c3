"""A rank's halo aggregation by column ranges (``exactq::spmm_columns`` on the adjacency's own arrays) as a
ratio to torch's CSR product over owned + halo rows in one tensor, measured side by side in one run.

    python experiments/bench_halo_products.py [--rows 42000] [--peers 3] [--halo-per-peer 15000]
                                              [--nnz 600000] [--width 128] [--repeats 7]

The matrix is a rank's shard of a SAGE layer's mean adjacency: ``rows`` owned targets, whose sources are
the owned rows then ``peers`` ranges of halo rows (``--local`` of the entries among the owned columns).
Forward: ``A @ [x; h_1; ...; h_q]``, by ranges (the owned columns' product, then one per peer, added in
place) against ``torch.sparse.mm`` on the concatenated rows. Transposed (backward): ``A^T @ g`` by ranges
(one output per range) against ``torch.sparse.mm`` of the transposed CSR (built once, outside the
timing, which favours torch). Both results are checked against each other.
"""
from __future__ import annotations

import torch

from exactq.distributed.aggregate import column_ranges

from bench_kernels import median_time
from common import Timer, apply_threads, command_line, parser, write_results


def shard_adjacency(rows: int, peers: int, halo: int, nnz: int, local: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = rows + peers * halo
    r = torch.randint(0, rows, (nnz,), generator=g)
    c = torch.where(torch.rand(nnz, generator=g) < local, torch.randint(0, rows, (nnz,), generator=g),
                    torch.randint(rows, cols, (nnz,), generator=g))
    key = torch.unique(r * cols + c)  # sorted and without duplicates, as a coalesced adjacency
    index = torch.stack([key // cols, key % cols])
    return torch.sparse_coo_tensor(index, torch.ones(key.numel()), (rows, cols)).coalesce().to_sparse_csr()


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=42_000, help="owned target rows")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--halo-per-peer", type=int, default=15_000)
    p.add_argument("--nnz", type=int, default=600_000, help="entries drawn (duplicates dropped)")
    p.add_argument("--local", type=float, default=0.6, help="share of entries among the owned columns")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    apply_threads(args)
    if args.quick:
        args.rows, args.halo_per_peer, args.nnz, args.repeats = 4_000, 1_500, 60_000, 3
    n, q, h, w = args.rows, args.peers, args.halo_per_peer, args.width
    with Timer() as timer:
        adj = shard_adjacency(n, q, h, args.nnz, args.local)
        torch.manual_seed(0)
        x, halos, g = torch.randn(n, w), [torch.randn(h, w) for _ in range(q)], torch.randn(n, w)
        scale = column_ranges(adj, n, [h] * q, True, torch.float32).row_scale  # the mean's 1 / degree per row
        mean_adj = torch.sparse_csr_tensor(adj.crow_indices(), adj.col_indices(),
                                           adj.values() * scale.repeat_interleave(adj.crow_indices().diff()),
                                           adj.shape)
        mean_t = mean_adj.t().to_sparse_csr()  # torch's transposed product, made once

        def ranges_forward():
            rg = column_ranges(adj, n, [h] * q, True, torch.float32)  # per call, as each layer call makes it
            out = rg.product(0, x, x.new_zeros(n, w))
            for p_, rows in enumerate(halos):
                rg.product(p_ + 1, rows, out)
            return out

        def ranges_transposed():
            rg = column_ranges(adj, n, [h] * q, True, torch.float32)
            return [rg.product(0, g, g.new_zeros(n, w), transpose=True)] + \
                [rg.product(p_ + 1, g, g.new_zeros(h, w), transpose=True) for p_ in range(q)]

        torch_forward = lambda: torch.sparse.mm(mean_adj, torch.cat([x] + halos))  # noqa: E731
        torch_transposed = lambda: torch.sparse.mm(mean_t, g)  # noqa: E731
        fwd_diff = float((ranges_forward() - torch_forward()).abs().max())
        bwd_diff = float((torch.cat(ranges_transposed()) - torch_transposed()).abs().max())
        rows = []
        for name, ours, theirs, diff in (("forward A @ [x; h]", ranges_forward, torch_forward, fwd_diff),
                                         ("transposed A^T @ g", ranges_transposed, torch_transposed, bwd_diff)):
            t_ours, t_theirs = median_time(ours, args.repeats, "cpu"), median_time(theirs, args.repeats, "cpu")
            rows.append({"product": name, "entries": adj.values().numel(), "width": w, "ranges": q + 1,
                         "column ranges s": t_ours, "torch.sparse.mm on owned + halo s": t_theirs,
                         "ranges / torch": t_ours / t_theirs, "max abs diff": diff})
            print(rows[-1], flush=True)
    note = (f"One rank's mean aggregation, {n} owned rows, {q} peers x {h} halo rows, median of {args.repeats}; "
            "column ranges: exactq::spmm_columns on the adjacency's own arrays (no owned + halo tensor, no "
            "transposed copy); torch: torch.sparse.mm on the concatenated rows, and on a transposed CSR made once.")
    print(write_results(args.out, "bench_halo_products" + ("_quick" if args.quick else ""), rows, note,
                        command_line(), timer.seconds))


if __name__ == "__main__":
    main()
