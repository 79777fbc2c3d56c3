import pytest
import torch

import exactq


def _devices():
    out = [pytest.param("cpu", id="cpu")]
    out.append(
        pytest.param(
            "cuda",
            id="cuda",
            marks=pytest.mark.skipif(
                not (torch.cuda.is_available() and exactq._ops.has_native_kernel("cuda")),
                reason="needs a CUDA GPU and exactq built with its CUDA kernels",
            ),
        )
    )
    return out


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    if exactq._ops.has_native_kernel("cpu"):
        return
    # Comparing a kernel with the reference means nothing if the kernel *is* the reference.
    raise pytest.UsageError("exactq._C is not built: run `pip install --no-build-isolation -e .` first")
