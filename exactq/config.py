"""Immutable compression settings, carried by each compression session."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .compute.functional import check_compute
from .functional import DEFAULT_BLOCK_SIZE, check_bits, check_block_size, check_seed, resolve_nonuniform

DEFAULT_MIN_NUMEL = 4096
RP_RATIOS = (0.125, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Config:
    """How saved activations are compressed.

    Attributes:
        bits: bits per quantized element: 1, 2, 4 or 8.
        block_size: elements per block of the flattened tensor; one bfloat16 min and range per block.
            256 by default: see ``DEFAULT_BLOCK_SIZE`` for the measurement behind it.
        block_rows: if set, blocks are this many whole rows of each tensor instead (block_size =
            block_rows x its last dimension), as the ICASSP paper defines them; ``block_rows=1`` is
            EXACT's per-node grouping.
        nonuniform: variance-minimising INT2 levels. ``None`` (auto, INT2 only): on for tensors whose
            values are normal-like, the inputs of normalisation layers and randomly projected tensors,
            and off elsewhere. Measured on real activations (experiments/results/block_size.md): the
            levels cut the rounding error by 15-25% on those, but raise it by 5-18% on post-ReLU /
            dropout tensors, whose values pile up at the block minimum.
        rp_ratio: random projection before quantizing tensors that a linear op consumes, keeping this
            fraction of the last dimension (one of 1/8, 1/4, 1/2, 1); ``None`` means off. Rows get
            independent random signs in groups (:func:`exactq.random_project`), so the projection error
            of a weight gradient averages out over rows; only a seed is stored besides the codes.
        min_numel: saved tensors with fewer elements are kept as they are.
        seed: base seed of the stochastic rounding and projections; ``None`` draws from torch's
            default generator, so ``torch.manual_seed`` makes runs reproducible.
        compute: ``None`` computes in the model's own precision; ``"int8"`` runs linear layers and
            aggregations over a ``torch.sparse`` CSR adjacency on int8 operands with int32
            accumulation, forward and backward (:mod:`exactq.compute`, which states what stays float32).
    """

    bits: int = 2
    block_size: int = DEFAULT_BLOCK_SIZE
    block_rows: Optional[int] = None
    nonuniform: Optional[bool] = None
    rp_ratio: Optional[float] = None
    min_numel: int = DEFAULT_MIN_NUMEL
    seed: Optional[int] = None
    compute: Optional[str] = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_block_size(self.block_size)
        if self.block_rows is not None and (
            isinstance(self.block_rows, bool) or not isinstance(self.block_rows, int) or self.block_rows < 1
        ):
            raise ValueError(f"block_rows must be None or an int >= 1, got {self.block_rows!r}")
        resolve_nonuniform(self.nonuniform, self.bits)  # validates
        if self.rp_ratio is not None and (
            isinstance(self.rp_ratio, bool) or not isinstance(self.rp_ratio, (int, float))
            or float(self.rp_ratio) not in RP_RATIOS
        ):
            raise ValueError(f"rp_ratio must be None or one of {RP_RATIOS}, got {self.rp_ratio!r}")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel must be an int >= 0, got {self.min_numel!r}")
        check_seed(self.seed)
        check_compute(self.compute)

    def nonuniform_for(self, normal_like: bool) -> bool:
        """Whether the non-uniform INT2 levels apply to a tensor (see ``nonuniform``)."""
        if self.nonuniform is None:
            return self.bits == 2 and normal_like
        return self.nonuniform

    def block_size_for(self, t_shape) -> int:
        """Elements per block for a tensor of this shape."""
        if self.block_rows is None or len(t_shape) == 0:
            return self.block_size
        return max(1, self.block_rows * int(t_shape[-1]))

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def make_config(config: Optional[Config] = None, **overrides: Any) -> Config:
    """``Config`` from either a Config, keyword overrides, or both (overrides win)."""
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an exactq.Config, got {type(config).__name__}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise TypeError(f"unknown compression option(s) {sorted(unknown)}; accepted: "
                        f"{[f.name for f in dataclasses.fields(Config)]}")
    base = config if config is not None else Config()
    return base.replace(**overrides) if overrides else base
