"""exactq.distributed beyond one machine: projected epoch time on the ogbn-products-shaped graph, and
memory per rank with 4 ranks against one process.

    python experiments/distributed_scale.py [--quick] [--sections projection memory peak] [--scale 1.0]
                                            [--memory-scale 0.5] [--memory-paths column-ranges owned-halo]
                                            [--epochs 2] [--locality 0.9]
                                            [--peak-scale 0.05] [--ranks 4] [--device cpu]

Graph: 2,449,029 nodes, 100 features, 61,859,140 directed edges, 47 classes, 90% of the edges within
communities (real graphs cluster; METIS then cuts ~10% of the edges, as on real products). Model:
GraphSAGE 3 x 256 (layer inputs 100, 256, 256 wide), sparse-matmul aggregation.

* projection: for 4, 8 and 16 METIS parts, the rows every rank sends and receives per layer (from
  the partition), hence the bytes per epoch (forward rows and backward gradients of layers 2 and 3;
  layer 1's input, the features, has its halo rows fetched once and kept) exact, 2-bit and
  auto (which spends at most uniform 4-bit time), and the compute time of the largest part's epoch
  as a wrapped rank computes it (fp32, measured here on 2 cores; :func:`epoch_compute_seconds`) plus
  the 2-bit pack/unpack time (measured). Projected epoch time =
  compute + quantization + per layer and direction the slowest rank's bytes / link bandwidth, for 10
  and 100 Gb/s. Also printed: the compute time per epoch below which 2-bit messages give 3x, and how
  many times faster than the measured device (compute and packing alike) a machine must be for 3x.
  ``--device cuda`` measures compute and packing on a GPU instead (results ``..._cuda``).
* memory: peak resident memory (VmHWM) of each of 4 ranks training on their shards (each loads only
  its own shard from a partition directory) against one process training on the whole graph, both
  with exactq INT2 activations, at ``--memory-scale`` (0.5 by default: four full-size ranks given owned +
  halo rows do not fit together in this machine's 24 GiB; column-range ranks do, ``--memory-scale 1
  --memory-paths column-ranges``), and ``--locality`` of the edges within communities (the rest join
  random nodes: they make the halo). The ranks run once per ``--memory-paths`` entry, side by side:
  ``column-ranges``, GraphSAGE's halo rows aggregated by column ranges (what ``wrap`` does for it on a
  CSR adjacency); ``column-ranges-resent``, the same with the features' halo rows sent at 2 bits every
  epoch instead of their first-layer aggregation kept (``keep_inputs=False``); ``owned-halo``, given
  owned + halo rows in one tensor (the path every other layer takes, and SAGE's before the column
  ranges). Malloc maps every allocation >= 1 MiB (``exactq.memory.map_large_allocations``, the distributed
  launchers' ``--malloc-mmap-threshold 1048576``). Then one process and the ``column-ranges`` ranks again
  with glibc's own mmap threshold, which rises to the largest tensor freed and leaves freed memory in the
  heap.
* peak: where the memory goes, at ``--peak-scale``: the live bytes of the tensors a training epoch
  makes (the second epoch: caches built in the first are not counted), op by op, for one process and
  for each rank of 4 by each of the three paths; the peak, the op it came at, and the largest tensors
  alive then.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch_geometric.nn import SAGEConv

import exactq
import exactq.distributed as xd
from exactq.data import PAPER_GRAPHS, synthetic_graph
from exactq.distributed.exchange import Exchanger, ExchangeStats, decode, encode, message_nbytes
from exactq.memory import arg_storages, map_large_allocations, peak_rss_bytes, sparse_parts
from exactq.train import build_model

from bench_kernels import median_time
from common import Timer, apply_threads, command_line, parser, write_results

WIDTHS = (100, 256, 256)
# Layer inputs whose halo rows travel every epoch, forward (rows) and backward (gradients): layer 1
# reads the features, whose halo rows a rank fetches once and keeps (wrap's keep_inputs).
EXCHANGED = WIDTHS[1:]
ADAQP_SPEEDUP = 3.01


def products(scale: float, locality: float = 0.9):
    n, f, e, c = PAPER_GRAPHS["ogbn-products"]
    return synthetic_graph(max(1000, int(n * scale)), f, int(e * scale), c, signal=0.2, locality=locality, seed=0)


def exchange_rows(edge_index, parts, world):
    """Per rank: rows it sends (its nodes that feed another rank's nodes, per destination) and halo rows
    it receives."""
    src, dst = edge_index
    cross = parts[src] != parts[dst]
    n = parts.numel()
    pairs = torch.unique(parts[dst[cross]] * n + src[cross])  # (receiving rank, node) once each
    recv = torch.bincount(pairs // n, minlength=world)
    send = torch.bincount(parts[pairs % n], minlength=world)
    return send, recv


def compute_for_3x(pack: float, exact_comm: float, comm_2bit: float) -> float:
    """Compute seconds per epoch at which 2-bit messages give 3x, pack time as measured:
    (c + E) / (c + q + B) = 3. Negative: 3x is out of reach at this packing speed."""
    return (exact_comm - 3 * (pack + comm_2bit)) / 2


def speed_for_3x(compute: float, pack: float, exact_comm: float, comm_2bit: float) -> float:
    """How many times faster than the measured device a machine must compute and pack for 2-bit messages to give
    3x at the same links: (k c + E) / (k (c + q) + B) = 3."""
    k = (exact_comm - 3 * comm_2bit) / (2 * compute + 3 * pack)
    return 1 / k if k > 0 else float("inf")


class _StandInExchange(Exchanger):
    """The compute a rank's reverse exchange does, without communicating (no process group): each peer's
    halo gradients are made (``grad_rows``, the transposed products), and stand-ins for the gradients
    peers send back are added into the rows this rank sent, as :meth:`Exchanger.add_reversed` adds them."""

    def __init__(self, shard, widths, device: torch.device) -> None:
        super().__init__(shard.plan, shard.num_local, shard.rank, None, ExchangeStats())
        self.send_index = shard.plan.send_index.to(device)
        self.received = {w: torch.randn(self.send_index.numel(), w, device=device) for w in widths}  # not timed

    def start_reverse(self, grad_rows, width: int, dtype, send_bits, recv_bits) -> int:
        for q in range(len(self.plan.recv_counts)):
            grad_rows(q)
        return width  # what add_reversed is given as its pending exchange

    def add_reversed(self, pending: int, grad_x: torch.Tensor) -> None:
        grad_x.index_add_(0, self.send_index, self.received[pending])


def epoch_compute_seconds(data, parts, rank, device: torch.device, repeats: int = 2) -> float:
    """fp32 training step of SAGE 3 x 256 as a wrapped rank computes it on a CSR adjacency: layer 1's
    aggregation of the features and their halo rows is made once and kept (``keep_inputs``); every later
    layer aggregates its owned rows and, one peer at a time, that peer's halo rows (random stand-ins for
    the received ones) by column ranges, and in backward makes each peer's halo gradients and adds
    stand-ins for those its sent rows get back. Left out: the exchange itself and the packing, which the
    projection adds (bytes / bandwidth, :func:`quantization_seconds`). On ``device``."""
    from torch_geometric.utils import to_torch_csr_tensor

    from exactq.distributed.aggregate import HaloAggregate, column_ranges

    s = xd.shard(data, parts, rank)
    nl, counts = s.num_local, s.plan.recv_counts
    adj = to_torch_csr_tensor(s.edge_index.flip(0), size=(nl, nl + s.num_halo)).to(device)
    x = torch.randn(nl, data.num_features, device=device)
    y = torch.randint(0, 47, (nl,), device=device)
    torch.manual_seed(0)
    model = build_model("sage", data.num_features, 256, 47, 3).to(device)
    convs = [m for m in model.modules() if isinstance(m, SAGEConv)]
    exchange = _StandInExchange(s, {conv.in_channels for conv in convs[1:]}, device)
    for i, conv in enumerate(convs):
        ranges = column_ranges(adj, nl, counts, conv.aggr == "mean", torch.float32)
        # The received rows, one peer's slice at a time.
        rows_of = exchange.per_peer(torch.randn(s.num_halo, conv.in_channels, device=device))

        def peer_rows(rows_of=rows_of):
            return ((q, rows_of(q)) for q in range(len(counts)))

        if i == 0:
            with torch.no_grad():
                kept = HaloAggregate.apply(x, peer_rows, ranges, None)
            conv.message_and_aggregate = lambda adj_t, pair, kept=kept: kept
        else:
            conv.message_and_aggregate = lambda adj_t, pair, ranges=ranges, rows=peer_rows: \
                HaloAggregate.apply(pair[1], rows, ranges, (exchange, None, None))
    return median_time(lambda: F.cross_entropy(model(x, adj), y).backward(), repeats, device.type)


def quantization_seconds(rows: int, device: torch.device) -> float:
    """Pack + unpack at 2 bits of ``rows`` rows, per layer width, both directions, on ``device`` (after a
    warm-up call: a GPU's first call also loads its kernels)."""
    total = 0.0
    for w in EXCHANGED:
        x = torch.randn(rows, w, device=device)
        total += 2 * median_time(lambda: decode(encode(x, 2, 1), rows, w, 2, x.dtype), 1, device.type)
    return total


def projection(scale: float, worlds, device: torch.device):
    data = products(scale)
    rows = []
    for world in worlds:
        t = time.perf_counter()
        parts = xd.partition(data.edge_index, data.num_nodes, world)
        stats = xd.partition_stats(data.edge_index, parts, world)
        part_s = time.perf_counter() - t
        send, recv = exchange_rows(data.edge_index, parts, world)
        busiest = int(torch.maximum(send, recv).max())  # all_to_all: the slowest rank's send or receive
        largest = int(torch.bincount(parts[data.edge_index[1]], minlength=world).argmax())
        compute = epoch_compute_seconds(data, parts, largest, device)
        quant = quantization_seconds(busiest, device)
        nbytes = {b: sum(2 * message_nbytes(busiest, w, b) for w in EXCHANGED) for b in (None, 2, 4)}
        for gbps in (10, 100):
            bw = gbps * 1e9 / 8
            t_exact = compute + nbytes[None] / bw
            t_2 = compute + quant + nbytes[2] / bw
            t_auto = compute + quant + nbytes[4] / bw  # auto's time budget: uniform 4-bit
            c3 = compute_for_3x(quant, nbytes[None] / bw, nbytes[2] / bw)
            k3 = speed_for_3x(compute, quant, nbytes[None] / bw, nbytes[2] / bw)
            rows.append({"machines": world, "Gb/s": gbps, "edge cut %": 100 * stats["cut_fraction"],
                         "busiest rank rows": busiest, "compute s (here)": compute, "2-bit pack s": quant,
                         "exact MB/epoch (busiest)": nbytes[None] / 2**20, "2-bit MB": nbytes[2] / 2**20,
                         "epoch s exact": t_exact, "epoch s 2-bit": t_2, "epoch s auto (<= 4-bit)": t_auto,
                         "2-bit speedup": t_exact / t_2, "auto speedup": t_exact / t_auto,
                         "compute s for 3x (2-bit)": c3, "machine speed for 3x (x here)": k3,
                         "AdaQP best": ADAQP_SPEEDUP, "partition s": part_s})
            print(rows[-1], flush=True)
    return rows


def _figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for gbps, style in ((10, "-o"), (100, "--s")):
        mine = [r for r in rows if r["Gb/s"] == gbps]
        ax.plot([r["machines"] for r in mine], [r["2-bit speedup"] for r in mine], style, label=f"2-bit, {gbps} Gb/s")
        ax.plot([r["machines"] for r in mine], [r["auto speedup"] for r in mine], style, alpha=0.5,
                label=f"auto, {gbps} Gb/s")
    ax.axhline(ADAQP_SPEEDUP, color="grey", lw=0.8, ls=":", label="AdaQP's best (3.01x)")
    ax.set_xlabel("machines")
    ax.set_ylabel("projected speedup over exact messages")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- memory -------------------------------------------------------------------------------------------

def _train(model, x, graph, y, mask, total: int, epochs: int, tracker=None) -> list:
    """Epoch times of full-batch training with exactq INT2 activations (loss: this process's share);
    the last epoch runs under ``tracker`` (a :class:`_PeakTensors`) where given."""
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    times = []
    for epoch in range(epochs):
        track = tracker if epoch == epochs - 1 else None
        with track if track is not None else contextlib.nullcontext():
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if track is not None:
                track.phase = "forward"
            with exactq.compress(bits=2):
                out = model(x, graph)
            loss = F.cross_entropy(out[mask], y[mask], reduction="sum") / total
            del out
            if track is not None:
                track.phase = "backward"
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
    return times


class _OwnedPlusHalo(SAGEConv):
    """SAGEConv aggregating through a ``message_and_aggregate`` of its own: exactq.distributed then gives
    it owned + halo rows in one tensor instead of column ranges (the comparison's other side)."""

    def message_and_aggregate(self, adj_t, x):
        return super().message_and_aggregate(adj_t, x)


def _rank_model(shard, path: str):
    torch.manual_seed(0)
    model = build_model("sage", shard.x.shape[1], 256, 47, 3)
    if path == "owned-halo":
        for m in model.modules():
            if type(m) is SAGEConv:
                m.__class__ = _OwnedPlusHalo
    return xd.wrap(model, shard, message_bits=2, keep_inputs=path != "column-ranges-resent")


def _write_partition(d: str, scale: float, locality: float, world: int) -> str:
    """A partition directory of the products-shaped graph (each rank then loads only its own shard)."""
    parts_dir = os.path.join(d, "parts")
    subprocess.run([sys.executable, "-m", "exactq", "partition", "--dataset", "ogbn-products-shape", "--scale",
                    str(scale), "--signal", "0.2", "--locality", str(locality), "--parts", str(world),
                    "--dir", parts_dir], check=True)
    return parts_dir


# How the ranks' SAGE layers read halo rows (the memory and peak sections' rank runs): by column ranges
# (what wrap does), the same with the features' halo rows sent at 2 bits every epoch instead of their
# aggregation kept (keep_inputs=False), or given owned + halo rows in one tensor.
_PATHS = {"column-ranges": "column ranges", "column-ranges-resent": "column ranges, features sent every epoch",
          "owned-halo": "owned + halo input"}
# The memory section's malloc settings (exactq.memory.map_large_allocations, which the distributed
# launchers apply with --malloc-mmap-threshold): a fixed mmap threshold, and glibc's own (rising) one.
_MALLOC = {2**20: "maps >= 1 MiB", 0: "glibc's own"}


def _malloc(threshold: int) -> None:
    if threshold:
        map_large_allocations(threshold)


def _rank_worker(rank, world, parts_dir, out_dir, path, epochs, peak, threshold):
    """One rank's training on its shard: peak RSS and epoch times, or (``peak``) its tensor peak."""
    _malloc(threshold)
    shard = xd.load_shard(parts_dir, rank)
    run = (_rank_model(shard, path), shard.x, shard.sparse_adjacency(), shard.y, shard.train_mask,
           shard.global_counts["train_mask"])
    if peak:
        result = _peak_epoch(*run)
    else:
        times = _train(*run, epochs)
        result = {"peak_rss_gb": peak_rss_bytes() / 2**30, "epoch_s": times, "num_local": shard.num_local,
                  "num_halo": shard.num_halo}
    with open(os.path.join(out_dir, f"rank{rank}_{path}.json"), "w") as f:
        json.dump(result, f)


def _ranks(parts_dir: str, world: int, paths=("column-ranges", "owned-halo"), epochs: int = 2, peak: bool = False,
           threshold: int = 0):
    """Yields (path label, rank, its :func:`_rank_worker` result) for ``world`` ranks on a partition
    directory, for each of ``paths`` (keys of ``_PATHS``)."""
    with tempfile.TemporaryDirectory() as d:
        for path in paths:
            xd.spawn(_rank_worker, world, args=(parts_dir, d, path, epochs, peak, threshold), timeout=7200,
                     pg_timeout=1800)
            for r in range(world):
                with open(os.path.join(d, f"rank{r}_{path}.json")) as f:
                    yield _PATHS[path], r, json.load(f)


class _PeakTensors(TorchDispatchMode):
    """Live bytes of the tensor storages made while it is active, after every op: the peak, the op it
    came at, and the largest storages alive then (with the op and shape that made each)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict = {}
        self.phase = ""
        self.peak, self.at, self.largest = 0, "", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        existing = arg_storages(args, kwargs)  # a view or in-place result: memory that existed already
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                for t in (o,) if o.layout == torch.strided else sparse_parts(o):
                    st = t.untyped_storage()
                    if st._cdata not in existing and st._cdata not in self._made:
                        self._made[st._cdata] = (StorageWeakRef(st), st.nbytes(), f"{func.__name__} {tuple(t.shape)}")
        self._made = {k: v for k, v in self._made.items() if not v[0].expired()}
        live = sum(n for _, n, _ in self._made.values())
        if live > self.peak:
            self.peak, self.at = live, f"{self.phase}: {func.__name__}"
            self.largest = sorted(((n, what) for _, n, what in self._made.values()), reverse=True)[:5]
        return out


def _peak_epoch(model, x, graph, y, mask, total: int) -> dict:
    """Tensor peak of the second of two training epochs (caches built in the first are not counted)."""
    tracker = _PeakTensors()
    _train(model, x, graph, y, mask, total, 2, tracker)
    return {"peak MB": tracker.peak / 2**20, "at": tracker.at,
            "largest tensors alive then (MB)": "; ".join(f"{what} {n / 2**20:.1f}" for n, what in tracker.largest)}


def peak(scale: float, locality: float, world: int = 4):
    from exactq.data import with_sparse_adjacency

    data = with_sparse_adjacency(products(scale, locality))
    torch.manual_seed(0)
    single = _peak_epoch(build_model("sage", data.num_features, 256, 47, 3), data.x, data.adj_t, data.y,
                         data.train_mask, int(data.train_mask.sum()))
    rows = [{"process": "one process", **single, "x of one process": 1.0}]
    with tempfile.TemporaryDirectory() as d:
        ranks = list(_ranks(_write_partition(d, scale, locality, world), world, tuple(_PATHS), peak=True))
    for path, r, m in ranks:
        rows.append({"process": f"rank {r} of {world}, {path}", **m, "x of one process": m["peak MB"] / single["peak MB"]})
    for r in rows:
        print(r, flush=True)
    return rows


def _single_process(scale: float, epochs: int, locality: float, threshold: int) -> dict:
    from exactq.data import with_sparse_adjacency

    _malloc(threshold)
    data = with_sparse_adjacency(products(scale, locality))
    torch.manual_seed(0)
    model = build_model("sage", data.num_features, 256, 47, 3)
    times = _train(model, data.x, data.adj_t, data.y, data.train_mask, int(data.train_mask.sum()), epochs)
    return {"peak_rss_gb": peak_rss_bytes() / 2**30, "epoch_s": times}


def memory(scale: float, epochs: int, locality: float, paths=("column-ranges", "owned-halo"), world: int = 4):
    """One process, then ``world`` ranks by each of ``paths`` (keys of ``_PATHS``), malloc mapping tensors
    >= 1 MiB; then one process and the "column-ranges" ranks (what ``wrap`` does; if among ``paths``) again
    with glibc's own mmap threshold."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        parts_dir = _write_partition(d, scale, locality, world)
        for threshold, malloc in _MALLOC.items():
            one = subprocess.run([sys.executable, __file__, "--single-process", str(scale), str(epochs), str(locality),
                                  str(threshold)], capture_output=True, text=True)
            line = [l for l in one.stdout.splitlines() if l.startswith("RESULT ")]
            single = json.loads(line[0][7:]) if line else {"peak_rss_gb": float("nan"), "epoch_s": [float("nan")],
                                                           "error": one.stderr[-300:]}
            rows.append({"malloc": malloc, "processes": 1, "halo rows": "-", "rank": "-",
                         "owned nodes": int(PAPER_GRAPHS["ogbn-products"][0] * scale),
                         "halo nodes": 0, "peak RSS GB": single["peak_rss_gb"], "x of one process": 1.0,
                         "median epoch s": statistics.median(single["epoch_s"])})
            print(rows[-1], single.get("error", ""), flush=True)
            for path, r, m in _ranks(parts_dir, world, paths if threshold else tuple(p for p in paths if p == "column-ranges"),
                                     epochs, threshold=threshold):
                rows.append({"malloc": malloc, "processes": world, "halo rows": path, "rank": r,
                             "owned nodes": m["num_local"], "halo nodes": m["num_halo"],
                             "peak RSS GB": m["peak_rss_gb"], "x of one process": m["peak_rss_gb"] / single["peak_rss_gb"],
                             "median epoch s": statistics.median(m["epoch_s"])})
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    if argv is None and len(sys.argv) == 6 and sys.argv[1] == "--single-process":
        print("RESULT " + json.dumps(_single_process(float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                                     int(sys.argv[5]))))
        return
    p = parser(__doc__)
    p.add_argument("--sections", nargs="+", default=["projection", "memory"], choices=["projection", "memory", "peak"])
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--locality", type=float, default=0.9,
                   help="memory section: fraction of edges within communities (the rest join random nodes, and "
                        "make the halo)")
    p.add_argument("--memory-scale", type=float, default=0.5,
                   help="graph scale of the memory section: 4 ranks of the full graph given owned + halo rows do not "
                        "fit together in this machine's 24 GiB (one machine each is the point); by column ranges "
                        "they do")
    p.add_argument("--memory-paths", nargs="+", default=["column-ranges", "owned-halo"], choices=list(_PATHS),
                   help="memory section: how the ranks' SAGE layers read halo rows (by column ranges; the same with the "
                        "features' halo rows sent every epoch, keep_inputs=False; or given owned + halo rows in one "
                        "tensor)")
    p.add_argument("--peak-scale", type=float, default=0.05, help="graph scale of the peak section")
    p.add_argument("--ranks", type=int, default=4, help="memory and peak sections: ranks on this machine")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="projection section: where a rank's compute and packing are measured")
    args = p.parse_args(argv)
    if args.ranks < 2:
        p.error(f"--ranks: at least 2 ranks are compared against one process, got {args.ranks}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to this torch")
    apply_threads(args)
    scale = 0.01 if args.quick else args.scale
    suffix = "_quick" if args.quick else ""
    stem = lambda name: f"{name}{suffix}" + ("" if args.locality == 0.9 else f"_locality{args.locality}")  # noqa: E731
    if "projection" in args.sections:
        with Timer() as timer:
            rows = projection(scale, (2, 4) if args.quick else (4, 8, 16), torch.device(args.device))
        on = "this CPU" if args.device == "cpu" else torch.cuda.get_device_name()
        path = write_results(args.out, f"distributed_projection{suffix}" + ("" if args.device == "cpu" else "_cuda"),
                             rows, "Projected epoch time on the ogbn-products-shaped graph (scale "
                             f"{scale}), GraphSAGE 3 x 256: compute measured on {on}, bytes from the partition, "
                             "links at 10 / 100 Gb/s.", command_line(), timer.seconds)
        _figure(rows, path.with_suffix(".png"))
        print(path.read_text())
    if "memory" in args.sections:
        with Timer() as timer:
            mscale = scale if args.quick else args.memory_scale
            rows = memory(mscale, 1 if args.quick else args.epochs, args.locality, tuple(args.memory_paths), args.ranks)
        print(write_results(args.out, stem("distributed_memory") + ("" if args.quick or mscale == 0.5 else f"_scale{mscale:g}"), rows,
                            f"Peak resident memory per process, ogbn-products-shaped graph (scale {mscale}, "
                            f"{args.locality:.0%} of edges within communities), GraphSAGE 3 x 256, exactq INT2 "
                            f"activations, 2-bit messages; one process vs {args.ranks} ranks on this machine, malloc mapping allocations "
                            ">= 1 MiB, then with glibc's own mmap threshold.",
                            command_line(), timer.seconds).read_text())
    if "peak" in args.sections:
        with Timer() as timer:
            pscale = scale if args.quick else args.peak_scale
            rows = peak(pscale, args.locality, args.ranks)
        print(write_results(args.out, stem("distributed_peak"), rows,
                            f"Live tensor bytes of a training epoch, op by op (its second epoch), ogbn-products-shaped "
                            f"graph (scale {pscale}, {args.locality:.0%} of edges within communities), GraphSAGE 3 x "
                            f"256, exactq INT2 activations, 2-bit messages: one process vs each rank of {args.ranks}.",
                            command_line(), timer.seconds).read_text())


if __name__ == "__main__":
    main()
