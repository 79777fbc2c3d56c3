"""Compiler flags of the extension, shared by setup.py (loaded by path, before exactq is installed)
and the CUDA compile check in tests/test_cuda_build.py.

No FMA contraction anywhere: the kernels must round exactly like the plain-PyTorch reference
(csrc/common.h explains why).
"""
import os
import sysconfig

CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++20"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++20", "--expt-relaxed-constexpr"]
# Lets torch's CUDA headers compile without the CUDA build of torch (whose generated
# cuda_cmake_macros.h the CPU wheel lacks); only used by the compile check.
NVCC_CHECK_FLAGS = ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-arch=sm_80"]


def nvcc_check_command(source: str, output: str) -> list:
    """nvcc command that compiles one .cu file to an object against the installed torch's headers."""
    import torch.utils.cpp_extension as ext

    includes = ext.include_paths() + [sysconfig.get_paths()["include"], os.path.dirname(source)]
    return (["nvcc", "-c", source, "-o", output] + NVCC_FLAGS + NVCC_CHECK_FLAGS
            + [f"-I{p}" for p in includes])
