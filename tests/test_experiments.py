"""Each experiment's --quick run works end to end and shows its headline property at small scale."""
import csv
import os
import subprocess
import sys

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def _run(script, tmp_path, *extra):
    proc = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, script), "--quick", "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, cwd=EXPERIMENTS, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_memory_table_quick(tmp_path):
    out = _run("memory_table.py", tmp_path)
    rows = {r["config"]: r for r in _rows(tmp_path / "memory_table_quick.csv")}
    assert (tmp_path / "memory_table_quick.md").exists() and (tmp_path / "memory_table_quick.png").exists()
    mb = {k: float(r["MB"]) for k, r in rows.items()}
    # Blocks of rows store less than per-row groups, most of all after projection (few columns per row).
    assert mb["rows=8 D/R=8 auto"] < 0.9 * mb["rows=1 D/R=8 auto"]
    assert mb["rows=8 D/R=1 auto"] < mb["rows=1 D/R=1 auto"]
    assert mb["fp32"] / mb["256 elems D/R=1 auto"] >= 12
    # The measured bytes agree with exactq's own report.
    for r in rows.values():
        assert float(r["report_MB"]) == pytest.approx(float(r["MB"]), rel=0.03)
    assert "less than fp32" in out


def test_block_size_quick(tmp_path):
    _run("block_size.py", tmp_path)
    rows = _rows(tmp_path / "block_size_quick.csv")
    for r in rows:
        measured = float(r["measured_reduction_%"])
        if r["activations"].startswith(("batch_norm", "linear input, projected")) and int(r["block_size"]) >= 128:
            assert measured > 5, r  # normal-like activations: the ICASSP levels help
        if r["activations"].startswith("linear input (") and int(r["block_size"]) >= 128:
            assert measured < 0, r  # post-ReLU/dropout: they do not, hence exactq's auto policy


def test_projection_error_quick(tmp_path):
    _run("projection_error.py", tmp_path)
    rows = _rows(tmp_path / "projection_error_quick.csv")
    assert (tmp_path / "projection_error_quick.png").stat().st_size > 0
    err = {(r["layer"], r["stored_as"]): float(r["rel_sq_error"]) for r in rows}
    layers = {layer for layer, _ in err}
    assert len(layers) == 5  # GraphSAGE 3 layers: every lin_l, and lin_r after the first layer
    for layer in layers:
        # One matrix for all rows: error (M M^T - I) X^T G, about (d + 1) / r = 8 whatever the rows.
        assert 5 < err[layer, "D/R=8 one matrix (EXACT)"] < 12
        assert err[layer, "INT2, no projection"] < 1


def test_accuracy_quick(tmp_path):
    _run("accuracy.py", tmp_path)
    rows = _rows(tmp_path / "accuracy_quick.csv")
    assert {r["graph"] for r in rows} == {"Cora", "arxiv-shaped CSBM"}
    for r in rows:
        assert 0 < float(r["test_acc_mean"]) <= 100


def test_accuracy_projected_reports_each_epoch_budget(tmp_path):
    _run("accuracy.py", tmp_path, "--graphs", "arxiv", "--projected-only")
    rows = _rows(tmp_path / "accuracy_quick_arxiv_projected.csv")
    assert [(r["variant"], r["epochs"]) for r in rows] == [
        (v, e) for v in ("fp32", "block INT2 uniform, D/R=8", "block INT2 non-uniform, D/R=8") for e in ("3", "5")]
    assert all(float(r["delta_vs_fp32"]) == 0 for r in rows if r["variant"] == "fp32")
    assert (tmp_path / "accuracy_quick_arxiv_projected.png").stat().st_size > 0


def test_bench_overhead_quick(tmp_path):
    out = _run("bench_overhead.py", tmp_path, "--epochs", "2", "--warmup", "1", "--profile")
    rows = _rows(tmp_path / "bench_overhead_quick.csv")
    assert {r["config"] for r in rows} == {"fp32", "INT2", "INT2 D/R=8"}
    assert all(float(r["ratio_vs_fp32"]) > 0 for r in rows)
    assert "x fp32" in out
    profile = (tmp_path / "bench_overhead_quick_profile.txt").read_text()
    assert "exactq::quantize" in profile and "## sage 3x128" in profile


def test_scale_products_quick(tmp_path):
    _run("scale_products.py", tmp_path, "--epochs", "2")
    rows = {r["mode"]: r for r in _rows(tmp_path / "scale_products_quick.csv")}
    assert {r["status"] for r in rows.values()} == {"trained"} and set(rows) == {"exactq", "exactq-int8", "fp32"}
    for mode in ("exactq", "exactq-int8"):
        assert float(rows[mode]["predicted_fp32_activation_GB"]) / float(rows[mode]["stored_activation_GB"]) > 10


def test_opinfo_sweep_quick(tmp_path):
    out = _run("opinfo_sweep.py", tmp_path)
    rows = _rows(tmp_path / "opinfo_sweep_quick.csv")
    assert len(rows) >= 20 and "0 ops failing with exactq only" in out
    assert all(int(r["nonfinite"]) == 0 for r in rows)


def test_max_aggregation_quick(tmp_path):
    _run("max_aggregation.py", tmp_path)
    (mem,) = _rows(tmp_path / "max_aggregation_memory_quick.csv")
    # The max aggregation's E x F input becomes one bit per element and its result nothing.
    assert float(mem["x smaller"]) >= 8
    assert float(mem["report stored MB"]) == pytest.approx(float(mem["INT2 MB"]), rel=0.05)
    assert len(_rows(tmp_path / "max_aggregation_accuracy_quick.csv")) == 3  # the synthetic graph's three models


def test_bench_compile_quick(tmp_path):
    _run("bench_compile.py", tmp_path)
    rows = {(r["mode"], r["exactq"]): r for r in _rows(tmp_path / "bench_compile_quick.csv")}
    assert float(rows[("eager", "INT2")]["saved x smaller vs fp32 same mode"]) >= 8  # eager compresses
    # Compiled regions' saved tensors are kept exactly: compiled + exactq stores about what compiled fp32 does.
    assert float(rows[("compiled", "INT2")]["saved x smaller vs fp32 same mode"]) == pytest.approx(1.0, rel=0.2)


def test_distributed_gradients_quick(tmp_path):
    _run("distributed.py", tmp_path, "--sections", "gradients")
    rows = _rows(tmp_path / "distributed_gradients_quick.csv")
    assert {r["model"] for r in rows} == {"gcn", "sage"}
    for r in rows:
        if r["message bits"] == "exact":  # exact messages: single-process training, to float rounding
            assert float(r["loss rel err"]) <= 1e-5 and float(r["grad rel err"]) <= 1e-5
        else:
            assert float(r["grad cosine"]) >= 0.99


def test_distributed_projection_quick(tmp_path):
    _run("distributed_scale.py", tmp_path, "--sections", "projection")
    rows = _rows(tmp_path / "distributed_projection_quick.csv")
    assert {int(r["machines"]) for r in rows} == {2, 4} and (tmp_path / "distributed_projection_quick.png").exists()
    for r in rows:
        assert float(r["exact MB/epoch (busiest)"]) >= 12 * float(r["2-bit MB"])


@pytest.mark.parametrize("args, named", [(("--ranks", "1"), "--ranks"), (("--device", "cuda"), "--device cuda")])
def test_distributed_scale_refuses_bad_arguments(tmp_path, args, named):
    if "cuda" in args:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is available: --device cuda is accepted")
    proc = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "distributed_scale.py"), "--out", str(tmp_path),
                           *args], capture_output=True, text=True, cwd=EXPERIMENTS, timeout=120)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-1000:]
    assert not list(tmp_path.iterdir())  # refused before any section ran


def test_distributed_memory_and_peak_quick(tmp_path):
    world = 2  # half the spawns' time of the default 4
    _run("distributed_scale.py", tmp_path, "--sections", "memory", "peak", "--ranks", str(world))
    rows = _rows(tmp_path / "distributed_memory_quick.csv")
    ranks = [r for r in rows if r["processes"] == str(world)]
    assert sorted((r["malloc"], r["halo rows"], r["rank"]) for r in ranks) == sorted(
        [("maps >= 1 MiB", k, str(i)) for k in ("column ranges", "owned + halo input") for i in range(world)]
        + [("glibc's own", "column ranges", str(i)) for i in range(world)])
    assert all(float(r["peak RSS GB"]) > 0 and int(r["halo nodes"]) > 0 for r in ranks)
    peaks = {r["process"]: float(r["peak MB"]) for r in _rows(tmp_path / "distributed_peak_quick.csv")}
    for r in range(world):  # live tensor bytes are deterministic: what each path saves is measured
        rank = f"rank {r} of {world}"
        assert peaks[f"{rank}, column ranges, features sent every epoch"] < peaks[f"{rank}, column ranges"] < \
            peaks[f"{rank}, owned + halo input"] < peaks["one process"]


def test_bench_compute_quick(tmp_path):
    _run("bench_compute.py", tmp_path, "--models", "sage", "gat", "--hidden", "64")  # memory and profile: sage
    kernels = {r["kernel"] for r in _rows(tmp_path / "bench_compute_kernels_quick_sage_gat.csv")}
    assert any(k.startswith("SpMM sum") for k in kernels) and any("torch._int_mm" in k for k in kernels)
    assert any(k.startswith("SDDMM") for k in kernels)
    configs = {r["config"] for r in _rows(tmp_path / "bench_compute_epochs_quick_sage_gat.csv")}
    assert {"fp32 CSR", "int8 compute + INT2 CSR", "int8 compute + INT2 edge_index", "bf16 autocast edge_index"} <= configs
    memory = _rows(tmp_path / "bench_compute_memory_quick_sage_gat.csv")
    assert {m["graph"] for m in memory} == {"CSR", "edge_index"}
    assert all(float(m["x smaller"]) >= 12 for m in memory)  # int8 compute keeps INT2 storage's saving (measured)
    assert "exactq::int8_spmm" in (tmp_path / "bench_compute_profile_quick_sage_gat.md").read_text()


def test_accuracy_compute_quick(tmp_path):
    _run("accuracy_compute.py", tmp_path)
    rows = _rows(tmp_path / "accuracy_compute_quick.csv")
    assert {r["model"].split()[0] for r in rows} == {"gcn", "sage", "gin"} and len(rows) == 6
    assert all(0 <= float(r["int8 + INT2 acc"]) <= 100 for r in rows)
    assert (tmp_path / "accuracy_compute_quick.png").stat().st_size > 0


def test_bench_halo_products_quick(tmp_path):
    _run("bench_halo_products.py", tmp_path, "--threads", "1")
    rows = {r["product"].split()[0]: r for r in _rows(tmp_path / "bench_halo_products_quick.csv")}
    assert set(rows) == {"forward", "transposed"}
    for r in rows.values():  # the same product both ways (float32 sums in another order)
        assert float(r["max abs diff"]) <= 1e-5 and float(r["column ranges s"]) > 0
