"""Quantized compute (Tango): a session's products on int8 operands with int32 accumulation.

``exactq.compress(bits=2, compute="int8")`` runs an unchanged model's linear layers and its sum / mean
aggregations (over a ``torch.sparse`` CSR adjacency, or an ``edge_index`` for the layers
:data:`.aggregation.SUM_OF_MESSAGES` lists) on exactq's INT8 kernels, forward and backward, while the
session stores what autograd saves at ``bits``. Layers: kernels (``exactq::int8_quantize``,
``exactq::int8_spmm``, ``exactq::int8_mm`` (over ``torch._int_mm``), ``exactq::seeded_dropout``)
-> :mod:`.structure` (a graph's CSR and transpose, once per graph) -> :mod:`.functional` (autograd
primitives and the rules of what stays float32) -> :mod:`.aggregation` and :mod:`.mode` (routing inside a
session).
"""
from .functional import COMPUTE_MODES, Hooks, attention_spmm, check_compute, dropout, linear, spmm
from .aggregation import ATTENTION_MESSAGES, SUM_OF_MESSAGES
from .mode import ComputeMode
from .structure import EDGE_INDEX_CSRS, STRUCTURES, Structure

__all__ = ["ATTENTION_MESSAGES", "COMPUTE_MODES", "ComputeMode", "EDGE_INDEX_CSRS", "Hooks", "STRUCTURES", "SUM_OF_MESSAGES", "Structure",
           "attention_spmm", "check_compute", "dropout", "linear", "spmm"]
