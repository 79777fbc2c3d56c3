"""Random projection (exactq.random_project / random_unproject): layout, unbiasedness, variance, and
the property that makes it usable for weight gradients (errors average out over rows)."""
import pytest
import torch

import exactq
from exactq import functional as EF

G = EF.PROJECTION_GROUP_ROWS


def _formula(x, r, seed):
    """(x_i * s_{i // G}) @ P, with the same draw of P and signs, written without chunks or groups."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    p, signs = EF._projection_parts(seed, x2.shape[0], d, r, G, x.dtype, x.device)
    row_signs = signs.repeat_interleave(G, 0)[: x2.shape[0]]
    return (x2 * row_signs) @ p, p, row_signs


@pytest.mark.parametrize("shape", [(1, 8), (G, 8), (G + 3, 8), (3 * 2**17 + 5, 8), (5, 7, 12)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_project_and_unproject_follow_the_formula(device, dtype, shape):
    # (3 * 2**17 + 5) rows of 8 span four pieces of random_project/unproject, the last ending mid-group.
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device)
    r = max(1, shape[-1] // 4)
    y = exactq.random_project(x, r, seed=7)
    want, p, row_signs = _formula(x, r, 7)
    torch.testing.assert_close(y, want)
    back = exactq.random_unproject(y, shape[-1], seed=7)
    torch.testing.assert_close(back, (y @ p.t()) * row_signs)


def test_noncontiguous_input_projects_like_its_contiguous_copy(device):
    x = torch.randn(40, 64, device=device).t()  # 64 rows of 40, column-major
    torch.testing.assert_close(exactq.random_project(x, 10, seed=3), exactq.random_project(x.contiguous(), 10, seed=3))


def test_unbiased_with_the_predicted_variance(device):
    # E[unproject(project(x))] = x, and per row E||x_hat - x||^2 = (d - 1) / r * ||x||^2 (P has
    # Rademacher entries and each row's signs are independent of it).
    torch.manual_seed(0)
    d, r, draws = 32, 8, 400
    x = torch.randn(64, d, device=device, dtype=torch.float64)
    total = torch.zeros_like(x)
    sq_err = 0.0
    for seed in range(draws):
        x_hat = exactq.random_unproject(exactq.random_project(x, r, seed), d, seed)
        total += x_hat
        sq_err += float((x_hat - x).pow(2).sum() / x.pow(2).sum()) / draws
    predicted = (d - 1) / r
    assert sq_err == pytest.approx(predicted, rel=0.05)
    # The mean of `draws` independent estimates: its error is predicted / draws, here about 0.01.
    assert float((total / draws - x).pow(2).sum() / x.pow(2).sum()) < 3 * predicted / draws


def test_weight_gradient_error_averages_out_over_rows(device):
    # A weight gradient X^T G sums every row's contribution. With one projection matrix for all rows
    # (EXACT) its relative squared error stays near d / r however many rows there are; with independent
    # signs per group of rows it falls with the number of groups. Rows here are strongly alike, the case
    # where one shared matrix hurts most.
    torch.manual_seed(0)
    n, d, r = 4096, 64, 8
    x = 1 + 0.1 * torch.randn(n, d, device=device, dtype=torch.float64)
    grad_out = 1 + 0.1 * torch.randn(n, 4, device=device, dtype=torch.float64)
    exact = x.t() @ grad_out

    def mean_error(group_rows):
        errs = []
        for seed in range(10):
            y = exactq.random_project(x, r, seed, group_rows)
            x_hat = exactq.random_unproject(y, d, seed, group_rows)
            errs.append(float((x_hat.t() @ grad_out - exact).pow(2).sum() / exact.pow(2).sum()))
        return sum(errs) / len(errs)

    assert mean_error(G) < 3 * ((d - 1) / r) / (n // G)  # about 0.06
    assert mean_error(n) > 0.5 * d / r  # one matrix for all rows (EXACT): about d / r = 8


def test_same_seed_same_projection_and_out_is_written(device):
    x = torch.randn(50, 16, device=device)
    y = exactq.random_project(x, 4, seed=11)
    assert torch.equal(y, exactq.random_project(x, 4, seed=11))
    assert not torch.equal(y, exactq.random_project(x, 4, seed=12))
    out = torch.empty(50 * 16, device=device)
    back = exactq.random_unproject(y, 16, seed=11, out=out)
    assert back.data_ptr() == out.data_ptr() and torch.equal(back, exactq.random_unproject(y, 16, seed=11))
    # One group for all rows is EXACT's single projection matrix: x_i @ P with P = diag(s) P0.
    shared = exactq.random_project(x, 4, seed=11, group_rows=50)
    torch.testing.assert_close(shared, x @ (exactq.random_project(torch.eye(16, device=device), 4, seed=11, group_rows=50)))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x: exactq.random_project(x, 0, seed=1), ValueError, r"r must be an int in \[1, 16\]"),
        (lambda x: exactq.random_project(x, 17, seed=1), ValueError, r"r must be an int in \[1, 16\]"),
        (lambda x: exactq.random_project(x, True, seed=1), ValueError, "r must be an int"),
        (lambda x: exactq.random_project(x, 4, seed=None), ValueError, "seed must be an int"),
        (lambda x: exactq.random_project(x, 4, seed=-1), ValueError, "seed must be an int"),
        (lambda x: exactq.random_project(x.long(), 4, seed=1), TypeError, "x must be a floating-point tensor.*int64"),
        (lambda x: exactq.random_project(x.tolist(), 4, seed=1), TypeError, "x must be a floating-point tensor.*list"),
        (lambda x: exactq.random_unproject(x[0], 16, seed=1), TypeError, "y must be a 2-D floating-point tensor"),
        (lambda x: exactq.random_unproject(x, 8, seed=1), ValueError, "d must be an int >= r = 16"),
        (lambda x: exactq.random_unproject(x, 16, seed=None), ValueError, "seed must be an int"),
        (lambda x: exactq.random_unproject(x, 32, seed=1, out=torch.empty(3)), ValueError, "out must be None or"),
        (lambda x: exactq.random_project(x, 4, seed=1, group_rows=0), ValueError, "group_rows must be an int >= 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(10, 16))
