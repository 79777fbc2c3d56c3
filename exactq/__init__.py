"""exactq: block-wise low-bit compression of the activations autograd saves, for memory-efficient
full-batch GNN training.

Layers, bottom up: ``csrc/`` kernels -> :mod:`exactq._ops` (op schemas, fake impls) ->
:mod:`exactq.reference` (plain-PyTorch specification of every op) -> :mod:`exactq.functional`
(quantize / dequantize / pack_mask / random_project) -> hook engine -> user API. Capabilities over the
same kernels, each a subpackage: :mod:`exactq.compute` (int8 products, ``compute="int8"``) and
:mod:`exactq.distributed` (full-graph training on partitions, quantized halo exchange).
"""
from . import _ops  # noqa: F401  (defines the torch.library ops and loads the kernels)
from .functional import (
    DEFAULT_BLOCK_SIZE,
    PackedMask,
    QuantizedTensor,
    dequantize,
    pack_mask,
    quantize,
    random_project,
    random_unproject,
    unpack_mask,
)
from .levels import int2_levels
from .config import Config
from .api import CompressionSession, compress, compressed, unwrap, wrap
from .memory import LiveTensorMemory
from .report import MemoryReport

__version__ = "0.1.0"

__all__ = [
    "CompressionSession",
    "Config",
    "LiveTensorMemory",
    "MemoryReport",
    "compress",
    "compressed",
    "unwrap",
    "wrap",
    "DEFAULT_BLOCK_SIZE",
    "PackedMask",
    "QuantizedTensor",
    "dequantize",
    "int2_levels",
    "pack_mask",
    "quantize",
    "random_project",
    "random_unproject",
    "unpack_mask",
]
