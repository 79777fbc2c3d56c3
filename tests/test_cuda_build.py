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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    cmd = nvcc_check_command(source, str(tmp_path / "out.o"))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stderr[-5000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0
