"""The CUDA kernels compile, also on machines without a GPU (where they cannot run)."""
import glob
import os
import shutil
import subprocess

import pytest

from exactq._build import nvcc_check_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/ holds the CUDA kernels"


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Every source's nvcc run, started together: each is one front end on one core (~40 s), so side by
    side they take the time of the slowest rather than of all of them. Yields source -> (command, process, object file)."""
    out = tmp_path_factory.mktemp("nvcc")
    runs = {}
    for i, source in enumerate(SOURCES):
        obj = out / f"{i}.o"
        cmd = nvcc_check_command(source, str(obj))
        runs[source] = (cmd, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), obj)
    yield runs
    for _, proc, _ in runs.values():
        proc.kill()
        proc.communicate()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, compiles):
    cmd, proc, obj = compiles[source]
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{stderr[-5000:]}"
    assert obj.stat().st_size > 0
