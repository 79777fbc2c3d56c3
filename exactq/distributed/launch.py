"""Local multi-process launch: ``spawn`` runs a function on ``nprocs`` processes on 127.0.0.1 with an
initialised process group (gloo, or NCCL where every rank has a GPU), and never hangs: a rank that
raises or dies stops the others, and a run past ``timeout`` is killed with a clear error."""
from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(nprocs: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "gloo"


def _entry(rank: int, fn: Callable, nprocs: int, port: int, backend: str, pg_timeout: float, threads: int,
           args: Sequence) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=nprocs,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        fn(rank, nprocs, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, nprocs: int, args: Sequence = (), timeout: float = 300.0, backend: Optional[str] = None,
          pg_timeout: float = 60.0, threads: Optional[int] = None) -> None:
    """Runs ``fn(rank, nprocs, *args)`` on ``nprocs`` local processes with a process group set up.

    Args:
        fn: a module-level (picklable) function.
        nprocs: processes (ranks), >= 1.
        timeout: seconds for the whole run; past it every process is killed and ``TimeoutError`` raised.
        backend: ``"gloo"`` or ``"nccl"`` (default: NCCL if there is a GPU per rank, else gloo).
        pg_timeout: the process group's timeout: a collective waiting longer on a rank that stopped
            fails on the others instead of hanging.
        threads: torch threads per process (default: the CPU cores shared out).

    Raises:
        torch.multiprocessing.ProcessRaisedException / ProcessExitedException: a rank failed (the
        others are terminated); TimeoutError: the run took longer than ``timeout``.
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    backend = backend or default_backend(nprocs)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    threads = threads or max(1, (os.cpu_count() or 1) // nprocs)
    ctx = mp.start_processes(_entry, args=(fn, nprocs, free_port(), backend, pg_timeout, threads, tuple(args)),
                             nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=min(1.0, max(0.01, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"exactq.distributed.spawn: {nprocs} processes still running after {timeout:.0f} s; "
                               f"killed")
