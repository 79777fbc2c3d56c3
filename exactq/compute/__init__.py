"""Quantized compute (Tango): a session's products on int8 operands with int32 accumulation.

``exactq.compress(bits=2, compute="int8")`` runs an unchanged model's linear layers and its
aggregations over a ``torch.sparse`` CSR adjacency on exactq's INT8 kernels, forward and backward, while
the session stores what autograd saves at ``bits``. Layers: kernels (``exactq::int8_quantize``,
``exactq::int8_spmm``, ``exactq::int8_gemm_epilogue``, ``exactq::seeded_dropout``, and ``torch._int_mm``) -> :mod:`.functional`
(autograd primitives and the rules of what stays float32) -> :mod:`.mode` (routing inside a session).
"""
from .functional import COMPUTE_MODES, Hooks, check_compute, dropout, linear, spmm
from .mode import ComputeMode
from .structure import STRUCTURES, Structure

__all__ = ["COMPUTE_MODES", "ComputeMode", "Hooks", "STRUCTURES", "Structure", "check_compute", "dropout", "linear", "spmm"]
