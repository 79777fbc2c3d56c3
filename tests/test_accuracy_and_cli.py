"""Accuracy on real data stays where fp32 puts it; the main job runs end to end."""
import statistics

import pytest
import torch

import exactq
from exactq.__main__ import main
from exactq.data import load_planetoid, with_sparse_adjacency
from exactq.train import build_model, train


@pytest.fixture(scope="module")
def cora(tmp_path_factory):
    try:
        data = load_planetoid("Cora", str(tmp_path_factory.mktemp("planetoid")))
    except Exception as exc:  # pragma: no cover - depends on ../shared or internet
        pytest.skip(f"Cora is not available here ({exc})")
    return with_sparse_adjacency(data)


@pytest.mark.parametrize("model", ["gcn", "sage"])
def test_int2_accuracy_within_one_point_of_fp32_on_cora(cora, model):
    acc = {None: [], 2: []}
    for bits in acc:
        config = exactq.Config(bits=bits, min_numel=0) if bits else None
        for seed in range(5):
            torch.manual_seed(seed)
            net = build_model(model, cora.num_features, 64, 7, 2, norm=None, dropout=0.5)
            acc[bits].append(train(net, cora, config, epochs=100, measure_memory=False).test_at_best_val)
    fp32, int2 = statistics.mean(acc[None]), statistics.mean(acc[2])
    assert fp32 > 0.75, f"fp32 baseline is off: {fp32:.3f}"
    assert abs(int2 - fp32) <= 0.01, f"{model}: int2 {int2:.4f} vs fp32 {fp32:.4f} (5 seeds)"


def test_fp32_and_a_session_keeping_everything_train_identically(cora):
    """Under one torch.manual_seed, fp32 and a session that keeps every tensor exactly draw the same
    dropout masks: their runs are equal, so an accuracy gap measures only what compression changes."""
    losses = []
    for config in (None, exactq.Config(min_numel=2**62), exactq.Config(min_numel=2**62, seed=3)):
        torch.manual_seed(0)
        net = build_model("sage", cora.num_features, 32, 7, 2, norm=None, dropout=0.5)
        losses.append(train(net, cora, config, epochs=5, measure_memory=False).losses)
    assert losses[0] == losses[1] == losses[2]


def test_test_curve_tracks_the_best_validation_epoch(cora):
    torch.manual_seed(0)
    net = build_model("gcn", cora.num_features, 16, 7, 2, norm=None)
    result = train(net, cora, exactq.Config(), epochs=6, measure_memory=False)
    assert len(result.test_curve) == 6 and result.test_curve[-1] == result.test_at_best_val
    assert all(0 <= a <= 1 for a in result.test_curve)


def test_demo_runs_and_prints_the_comparison(capsys):
    assert main(["demo", "--nodes", "3000", "--epochs", "3", "--hidden", "32"]) == 0
    out = capsys.readouterr().out
    for needle in ("test accuracy", "median epoch time", "activation memory, measured", "x smaller",
                   "saved activations:", "by op"):
        assert needle in out
