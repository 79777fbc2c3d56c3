"""Immutable compression settings, carried by each compression session."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

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
        nonuniform: variance-minimising INT2 levels; ``None`` means on for ``bits=2``.
        rp_ratio: random projection before quantizing tensors that a linear op consumes, keeping this
            fraction of the last dimension (one of 1/8, 1/4, 1/2, 1); ``None`` means off.
        min_numel: saved tensors with fewer elements are kept as they are.
        seed: base seed of the stochastic rounding and projections; ``None`` draws from torch's
            default generator, so ``torch.manual_seed`` makes runs reproducible.
    """

    bits: int = 2
    block_size: int = DEFAULT_BLOCK_SIZE
    nonuniform: Optional[bool] = None
    rp_ratio: Optional[float] = None
    min_numel: int = DEFAULT_MIN_NUMEL
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_block_size(self.block_size)
        resolve_nonuniform(self.nonuniform, self.bits)  # validates
        if self.rp_ratio is not None and (
            isinstance(self.rp_ratio, bool) or not isinstance(self.rp_ratio, (int, float))
            or float(self.rp_ratio) not in RP_RATIOS
        ):
            raise ValueError(f"rp_ratio must be None or one of {RP_RATIOS}, got {self.rp_ratio!r}")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel must be an int >= 0, got {self.min_numel!r}")
        check_seed(self.seed)

    @property
    def uses_nonuniform(self) -> bool:
        """Whether the non-uniform INT2 levels apply (``nonuniform=None`` means: when bits == 2)."""
        return resolve_nonuniform(self.nonuniform, self.bits)

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
