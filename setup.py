"""Build exactq and its C++ (and, where available, CUDA) kernels as the extension ``exactq._C``.

CPU kernels always build. CUDA kernels in ``csrc/cuda/`` build when torch was built with CUDA and
nvcc is found (or ``EXACTQ_CUDA=1`` forces them on, ``EXACTQ_CUDA=0`` off).
"""
import glob
import os

import runpy

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
_FLAGS = runpy.run_path(os.path.join(ROOT, "exactq", "_build.py"))
CXX_FLAGS, NVCC_FLAGS = _FLAGS["CXX_FLAGS"], _FLAGS["NVCC_FLAGS"]


def _want_cuda() -> bool:
    forced = os.environ.get("EXACTQ_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return cpp_extension.CUDAExtension(
            "exactq._C",
            sources,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "exactq._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"]
    )


setup(
    name="exactq",
    version="0.1.0",
    description="Block-wise low-bit activation compression for memory-efficient full-batch GNN training",
    license="MIT",
    packages=find_packages(include=["exactq", "exactq.*"]),
    python_requires=">=3.10",
    install_requires=["torch==2.13.0", "torch_geometric>=2.5", "numpy", "tqdm",
                      "pymetis", "scipy"],  # exactq.distributed: METIS partitions, auto-bits program
    extras_require={"test": ["pytest", "matplotlib", "expecttest"], "scatter": ["torch_scatter"],
                    "sampling": ["torch_sparse"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
