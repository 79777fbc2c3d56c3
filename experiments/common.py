"""Helpers shared by the experiment scripts: graphs, result files, argument parsing."""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from exactq.data import PAPER_GRAPHS, synthetic_graph, with_sparse_adjacency

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run (small graphs, few configs)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the .md/.csv/.png results")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def paper_graph(name: str, scale: float = 1.0, seed: int = 0, signal: float = 0.0, edge_scale: float = 1.0):
    """A synthetic graph with the shape of one of the papers' datasets (nodes and edges x scale; edges
    additionally x edge_scale)."""
    n, f, e, c = PAPER_GRAPHS[name]
    data = synthetic_graph(max(100, int(n * scale)), f, int(e * scale * edge_scale), c, signal=signal, seed=seed)
    return with_sparse_adjacency(data)


def write_results(out: str, stem: str, rows: List[Dict], header_note: str, command: str, seconds: float) -> Path:
    """Writes STEM.csv and STEM.md (a Markdown table with the command and its run time)."""
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0].keys())
    with open(outdir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {stem}", "", header_note, "", f"Command: `{command}` (ran {seconds:.0f} s with "
             f"{torch.get_num_threads()} torch thread(s) on {os.cpu_count()} CPU cores, torch {torch.__version__}).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    (outdir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    write_index(outdir)
    return outdir / f"{stem}.md"


def write_index(outdir: Path) -> None:
    """README.md of a results directory: each table with the command that made it and its run time."""
    lines = ["# Results", "", "Written by the experiment scripts (`experiments/common.py`); each table names its command.", "",
             "| table | command and run time |", "|---|---|"]
    for md in sorted(outdir.glob("*.md")):
        if md.name != "README.md":
            cmd = next((l[len("Command: "):] for l in md.read_text().splitlines() if l.startswith("Command: ")), "")
            lines.append(f"| [{md.stem}]({md.name}) | {cmd} |")
    (outdir / "README.md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __exit__(self, *exc):
        self.seconds = self.elapsed()
