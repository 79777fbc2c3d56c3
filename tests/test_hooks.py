"""The hook engine and user API on real PyG models."""
import contextlib
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torch_geometric.typing
from torch_geometric.utils import to_torch_csr_tensor

import exactq
from exactq import report as R
from exactq.data import synthetic_graph
from exactq.train import build_model

MODEL_CASES = [
    ("gcn", "batch_norm", "relu"),
    ("sage", "layer_norm", "elu"),
    ("gat", "batch_norm", "elu"),
    ("gatv2", "layer_norm", "relu"),
    ("gin", "batch_norm", "relu"),
    ("gcnii", None, "relu"),
]


@pytest.fixture(scope="module")
def graph():
    return synthetic_graph(600, 32, 4000, 4, seed=0)


def _model(name, norm, act, graph, seed=0):
    torch.manual_seed(seed)
    return build_model(name, graph.num_features, 64, 4, 3 if name != "gcnii" else 4, norm=norm, act=act, dropout=0.5)


def _grads(model, graph, ctx, adj=None, data_seed=123):
    """Parameter gradients of one training step; dropout masks fixed by data_seed."""
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(data_seed)
    with ctx:
        out = model(graph.x, graph.edge_index if adj is None else adj)
    F.cross_entropy(out[graph.train_mask], graph.y[graph.train_mask]).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name, norm, act", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_int8_gradients_close_to_fp32(graph, name, norm, act):
    model = _model(name, norm, act, graph)
    g32 = _grads(model, graph, contextlib.nullcontext())
    g8 = _grads(model, graph, exactq.compress(bits=8, seed=1, min_numel=0))
    assert _rel(g8, g32) < 0.05, f"{name}: int8 gradient relative error {_rel(g8, g32):.4f}"


@pytest.mark.parametrize("name, norm, act", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_int2_gradients_average_to_fp32_and_report_ratio(graph, name, norm, act):
    model = _model(name, norm, act, graph)
    g32 = _grads(model, graph, contextlib.nullcontext())
    draws = []
    for s in range(16):
        session = exactq.compress(bits=2, seed=s, min_numel=0)
        draws.append(_grads(model, graph, session))
    single = sum(_rel(g, g32) for g in draws) / len(draws)
    mean = _rel(torch.stack(draws).mean(0), g32)
    # Unbiased draws: the error of the mean of 16 shrinks ~4x; a biased estimator would not shrink.
    assert mean < 0.45 * single, f"{name}: mean-of-16 error {mean:.4f} vs single {single:.4f}"
    quantized = session.report().by_kind[R.QUANTIZED]
    assert quantized.original_bytes / quantized.stored_bytes >= 10


@pytest.mark.parametrize("name,adjacency", [*((c[0], "edge_index") for c in MODEL_CASES), ("gcn", "torch.sparse"),
                                            ("pna", "edge_index")])
def test_report_agrees_with_measured_live_memory(graph, name, adjacency):
    """Stored bytes and fp32 bytes in the report vs an independent count of live tensor storage.
    GCN on a sparse adjacency normalises it in every forward: autograd keeps those sparse tensors.
    PNA's std aggregator keeps its messages exactly (a square's operand) after they were stored for
    min/max as winner bits; GAT saves an index and expanded views of it: each storage counts once."""
    if name == "pna":
        from torch_geometric.nn import PNA
        from torch_geometric.utils import degree

        torch.manual_seed(0)
        deg = torch.bincount(degree(graph.edge_index[1], graph.num_nodes, dtype=torch.long))
        model = PNA(graph.num_features, 64, 3, 4, aggregators=["mean", "min", "max", "std"],
                    scalers=["identity", "amplification"], deg=deg, norm="batch_norm")
    else:
        model = _model(name, "batch_norm", "relu", graph)
    adj = graph.edge_index
    if adjacency == "torch.sparse":
        adj = to_torch_csr_tensor(graph.edge_index, size=(graph.num_nodes, graph.num_nodes))
    measured = {}
    for bits in (None, 2):
        ctx = exactq.compress(bits=bits, min_numel=0) if bits else contextlib.nullcontext()
        with exactq.LiveTensorMemory() as mem:
            with ctx as session:
                out = model(graph.x, adj)
            measured[bits] = mem.live_bytes() - out.untyped_storage().nbytes()
        if bits:
            report = session.report()
    assert report.original_bytes == pytest.approx(measured[None], rel=0.02)
    assert report.stored_bytes == pytest.approx(measured[2], rel=0.02)
    kept = report.by_kind[R.UNCOMPRESSED].stored_bytes  # e.g. GCN's sparse adjacencies: exact, as in fp32
    assert (measured[None] - kept) / (measured[2] - kept) > 8


def test_policy_kinds_and_dedup(graph):
    lin = torch.nn.Linear(32, 64)
    x = graph.x
    with exactq.compress(bits=2, min_numel=0) as s:
        h = F.dropout(x, 0.5, True)  # no autograd history, but made inside: an activation
        a = F.relu(lin(h))  # relu's output: 1-bit sign
        (a.sin() + a.cos()).sum()  # the same tensor saved by two ops: stored once
    rep = s.report()
    kinds = {k: t.count for k, t in rep.by_kind.items()}
    assert kinds[R.SIGN] == 1 and kinds[R.DEDUPLICATED] >= 1
    assert rep.by_op["linear"].original_bytes == h.numel() * 4  # dropout(x) counted as activation


@pytest.mark.parametrize("act", [F.relu, torch.relu, F.leaky_relu, lambda t: t.relu()],
                         ids=["F.relu", "torch.relu", "F.leaky_relu", "Tensor.relu"])
def test_relu_like_ops_store_one_bit_and_give_exact_gradients(act):
    """Exact even at NaN inputs: ReLU's backward passes a NaN's gradient, leaky ReLU scales it."""
    x = torch.randn(300, 64)
    x[0, :5] = float("nan")
    x[1, :5] = 0.0
    x.requires_grad_(True)
    c = torch.randn(64)
    grads = []
    for ctx in (contextlib.nullcontext(), exactq.compress(bits=2, min_numel=0)):
        with ctx as s:
            y = act(x * 2)
        (y * c).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    assert torch.equal(grads[0], grads[1])
    assert s.report().by_kind[R.SIGN].stored_bytes == 300 * 64 // 8 + 4  # the bits and the 0-dim 1.0


def test_dropout_gradient_is_exact_at_two_bits():
    """Dropout saves a bool mask (CUDA) or a float noise tensor {0, 1/(1-p)} (CPU): either is stored
    as a 1-bit mask, exactly, so the gradient equals fp32's."""
    x = torch.randn(300, 64, requires_grad=True)
    grads = []
    for ctx in (contextlib.nullcontext(), exactq.compress(bits=2, seed=0, min_numel=0)):
        torch.manual_seed(7)
        with ctx as s:
            y = F.dropout(x * 3, 0.3, True)
        (y * torch.arange(64.0)).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    assert torch.equal(grads[0], grads[1])
    masks = s.report().by_kind[R.MASK]
    assert masks.count == 1 and masks.stored_bytes <= x.numel() // 8 + 8


def test_parameters_and_inputs_are_referenced_not_copied(graph):
    model = _model("gcn", None, "relu", graph)
    with exactq.compress(bits=2) as s:
        model(graph.x, graph.edge_index)
    ext = s.report().by_kind[R.EXTERNAL]
    assert ext.count > 0 and ext.original_bytes == 0


def test_random_projection_applies_to_linear_inputs_and_is_unbiased(graph):
    model = _model("sage", None, "relu", graph)
    g32 = _grads(model, graph, contextlib.nullcontext())
    draws = []
    for s in range(16):
        session = exactq.compress(bits=8, rp_ratio=0.25, seed=s, min_numel=0)
        draws.append(_grads(model, graph, session))
    rep = session.report()
    assert R.PROJECTED in rep.by_kind and rep.by_kind[R.PROJECTED].count >= 2
    # Only linear ops' inputs are projected: the projected payloads are no larger than linear's share.
    assert rep.by_kind[R.PROJECTED].stored_bytes <= rep.by_op["linear"].stored_bytes
    single = sum(_rel(g, g32) for g in draws) / len(draws)
    assert _rel(torch.stack(draws).mean(0), g32) < 0.45 * single


def test_projected_weight_gradient_error_averages_over_rows():
    # lin2's weight gradient sums 2048 alike rows of lin1's output. Projected with one matrix for all
    # rows its relative squared error would stay near d / r = 8; exactq's per-group signs
    # (exactq.random_project) make it fall with the number of row groups.
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 4)
    with torch.no_grad():
        lin1.weight.mul_(0.1)
        lin1.bias.fill_(1.0)
    x = torch.randn(2048, 16)

    def weight_grad(ctx):
        lin2.zero_grad()
        with ctx:
            loss = lin2(lin1(x)).sum()
        loss.backward()
        return lin2.weight.grad.clone()

    exact = weight_grad(contextlib.nullcontext())
    errs = [float((weight_grad(exactq.compress(bits=8, rp_ratio=0.125, seed=s)) - exact).pow(2).sum()
                  / exact.pow(2).sum()) for s in range(8)]
    assert sum(errs) / len(errs) < 0.5


def test_retain_graph_and_repeated_backward(graph):
    model = _model("gcn", "batch_norm", "relu", graph)
    with exactq.compress(bits=2, min_numel=0):
        out = model(graph.x, graph.edge_index)
    loss = out.pow(2).mean()
    g1 = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)  # unpack is deterministic and nothing was freed on first unpack


def test_double_backward(graph):
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 1)
    x = graph.x.clone().requires_grad_()

    def penalty(ctx):
        with ctx:
            y = lin2(torch.tanh(lin1(x))).sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        lin1.zero_grad()
        gx.pow(2).sum().backward()
        return lin1.weight.grad.clone()

    ref = penalty(contextlib.nullcontext())
    got = penalty(exactq.compress(bits=8, min_numel=0))
    assert _rel(got, ref) < 0.05


def test_inplace_change_after_saving_raises_like_pytorch():
    a = torch.randn(100, 100, requires_grad=True)
    for ctx in (contextlib.nullcontext(), exactq.compress(bits=2, min_numel=0)):
        with ctx:
            b = a * 2
            c = b.sin()
        b.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            c.sum().backward()


def test_nested_blocks_innermost_applies():
    x = torch.randn(64, 128, requires_grad=True)
    with exactq.compress(bits=8, min_numel=0) as outer:
        y = x.sin()
        with exactq.compress(bits=2, min_numel=0) as inner:
            z = y.cos()
        w = z.exp()
    (w.sum()).backward()
    # cos's input y was saved inside the inner block only; exp's result in the outer one only.
    assert set(inner.report().by_op) == {"cos"}
    assert "exp" in outer.report().by_op and "cos" not in outer.report().by_op
    assert inner.report().by_kind[R.QUANTIZED].stored_bytes * 3 < outer.report().by_kind[R.QUANTIZED].stored_bytes


def _hooks_active() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def test_exception_leaves_no_hooks_behind():
    with pytest.raises(ValueError, match="boom"):
        with exactq.compress(bits=2):
            assert _hooks_active()
            raise ValueError("boom")
    assert not _hooks_active()
    assert torch._C._len_torch_function_stack() == 0


def test_restore_buffers_are_reused_only_once_free():
    from exactq.engine import _RestoreBuffers

    cpu = torch.device("cpu")
    pool = _RestoreBuffers(min_bytes=1024)
    a = pool.empty(1000, torch.float32, cpu)
    b = pool.empty(1000, torch.float32, cpu)
    ptr_a = a.data_ptr()
    view = a.view(10, 100)  # a view still uses a's storage
    del a
    c = pool.empty(1000, torch.float32, cpu)
    assert len({ptr_a, b.data_ptr(), c.data_ptr()}) == 3
    del view
    d = pool.empty(600, torch.float32, cpu)  # a's 4000 bytes are free and fit (at most twice the request)
    assert d.data_ptr() == ptr_a and d.shape == (600,)
    assert pool.empty(1000, torch.float16, cpu).data_ptr() not in {ptr_a, b.data_ptr(), c.data_ptr()}
    assert pool.empty(10, torch.float32, cpu) is None  # small: malloc reuses its own free lists
    assert pool.empty(1 << 30, torch.float32, cpu) is None  # beyond max_bytes: a spare would cost memory
    assert pool.empty(1000, torch.float32, torch.device("meta")) is None  # not CPU: the allocator caches


def test_large_exact_restores_reuse_buffers_and_stay_exact(monkeypatch):
    """Restores of >= 1 MiB are written into reused buffers. A chain of dropout and ReLU, whose saved
    tensors are stored exactly, must still give fp32's gradients bit for bit, with fewer buffers than
    restores."""
    from exactq.engine import _RestoreBuffers

    handed_out = []
    original = _RestoreBuffers.empty

    def recording(self, numel, dtype, device):
        out = original(self, numel, dtype, device)
        if out is not None:
            handed_out.append(out.data_ptr())
        return out

    monkeypatch.setattr(_RestoreBuffers, "empty", recording)
    x = torch.randn(4096, 128, requires_grad=True)  # 2 MiB per activation
    grads = []
    for ctx in (contextlib.nullcontext(), exactq.compress(bits=2, seed=0)):
        torch.manual_seed(3)
        with ctx:
            h = x
            for _ in range(4):
                h = F.relu(F.dropout(h * 1.5, 0.3, True))
        (h * torch.arange(128.0)).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    assert torch.equal(grads[0], grads[1])
    assert len(handed_out) == 8 and len(set(handed_out)) <= 3


def test_backward_after_block_and_memory_freed_after_backward(graph):
    model = _model("sage", "batch_norm", "relu", graph)
    with exactq.LiveTensorMemory() as mem:
        with exactq.compress(bits=2, min_numel=0):
            out = model(graph.x, graph.edge_index)
        held = mem.live_bytes() - out.untyped_storage().nbytes()
        loss = out.pow(2).mean()
        del out
        loss.backward()
        del loss
        after = mem.live_bytes()
    assert held > 0
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    assert after <= grads, f"{after} bytes still alive after backward (gradients: {grads})"


def test_memory_flat_over_200_steps(graph):
    model = _model("gcn", "batch_norm", "relu", graph)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    live = []
    with exactq.LiveTensorMemory() as mem:
        for _ in range(200):
            opt.zero_grad()
            with exactq.compress(bits=2, min_numel=0):
                out = model(graph.x, graph.edge_index)
            F.cross_entropy(out[graph.train_mask], graph.y[graph.train_mask]).backward()
            opt.step()
            del out
            live.append(mem.live_bytes())
    assert live[-1] == live[10], f"live bytes grew from {live[10]} to {live[-1]}"


_RETAINED = """
import sys, torch
from exactq.memory import map_large_allocations
if sys.argv[1] == "mapped":
    assert map_large_allocations(2**20)
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
big = torch.ones(6 * 2**20)
del big  # a freed 24 MiB mapping: glibc's own threshold rises to 24 MiB
before = rss()
pairs = [(torch.ones(2**20), torch.ones(50_000)) for _ in range(64)]  # 4 MiB tensors between 200 kB ones
small = [s for _, s in pairs]
del pairs
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="map_large_allocations sets glibc's malloc")
def test_map_large_allocations_returns_freed_tensors_to_the_os():
    retained = {}
    for mode in ("glibc default", "mapped"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        proc = subprocess.run([sys.executable, "-c", _RETAINED, mode], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        retained[mode] = int(proc.stdout.split()[-1])
    # 256 MiB freed, 12.8 MB still alive: glibc's raised threshold keeps the freed tensors in the heap
    # (between live ones, so it cannot shrink); mapped, they go back.
    assert retained["glibc default"] > 128 * 2**20, retained
    assert retained["mapped"] < 32 * 2**20, retained


@pytest.mark.parametrize("bad", [0, -1, 33 * 2**20, 1.5, True, "1M"])
def test_map_large_allocations_rejects_bad_threshold(bad):
    with pytest.raises(ValueError, match="threshold_bytes must be an int in 1 .. 33554432"):
        exactq.memory.map_large_allocations(bad)


@pytest.mark.parametrize("adjacency", ["edge_index", "torch.sparse"])
@pytest.mark.parametrize("with_scatter", [True, False], ids=["torch_scatter", "no_torch_scatter"])
@pytest.mark.parametrize("name", ["gcn", "sage"])
def test_edge_index_and_sparse_adjacency_with_and_without_torch_scatter(graph, monkeypatch, name, adjacency, with_scatter):
    if with_scatter and not torch_geometric.typing.WITH_TORCH_SCATTER:
        pytest.skip("torch_scatter is not installed")
    monkeypatch.setattr(torch_geometric.typing, "WITH_TORCH_SCATTER", with_scatter)
    model = _model(name, "batch_norm", "relu", graph)
    adj = None
    if adjacency == "torch.sparse":
        # The synthetic graph is symmetric, so the adjacency equals its transpose (PyG's adj_t).
        adj = to_torch_csr_tensor(graph.edge_index, size=(graph.num_nodes, graph.num_nodes))
    g32 = _grads(model, graph, contextlib.nullcontext(), adj)
    g8 = _grads(model, graph, exactq.compress(bits=8, seed=3, min_numel=0), adj)
    assert _rel(g8, g32) < 0.02


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_dense_operand_of_constant_sparse_product_is_not_stored(graph, reduce):
    """REFERENCE.md section 1: A @ X with constant A needs nothing saved for X's gradient (PyTorch's
    reducing sparse matmul, which PyG uses, saves it anyway)."""
    adj = to_torch_csr_tensor(graph.edge_index, size=(graph.num_nodes, graph.num_nodes))
    x = graph.x.clone().requires_grad_()
    w = torch.randn(graph.num_nodes, 32)
    grads = []
    for ctx in (contextlib.nullcontext(), exactq.compress(bits=2, min_numel=0)):
        with ctx as s:
            y = torch.sparse.mm(adj, x * 2, reduce)
        (y * w).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    assert torch.equal(grads[0], grads[1])
    unneeded = s.report().by_kind[R.UNNEEDED]
    assert unneeded.count == 1 and unneeded.stored_bytes == 0 and unneeded.original_bytes == x.numel() * 4
    # With a sparse matrix that needs a gradient, the dense operand is stored (quantized) as usual.
    adj_g = adj.detach().clone().requires_grad_()
    with exactq.compress(bits=2, min_numel=0) as s:
        torch.sparse.mm(adj_g, x * 2, reduce)
    assert R.UNNEEDED not in s.report().by_kind


def test_decorator_and_wrap_match_context_manager(graph):
    model = _model("sage", "batch_norm", "relu", graph)
    ref = _grads(model, graph, exactq.compress(bits=2, seed=9, min_numel=0))

    @exactq.compressed(bits=2, seed=9, min_numel=0)
    def forward(x, ei):
        return model(x, ei)

    model.zero_grad()
    torch.manual_seed(123)
    out = forward(graph.x, graph.edge_index)
    F.cross_entropy(out[graph.train_mask], graph.y[graph.train_mask]).backward()
    dec = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(dec, ref)
    assert forward.exactq_session.last.report().stored_bytes > 0

    exactq.wrap(model, bits=2, seed=9, min_numel=0)
    wrapped = _grads(model, graph, contextlib.nullcontext())
    assert torch.equal(wrapped, ref)
    assert model.forward.exactq_session.last.report().ratio > 5
    exactq.unwrap(model)
    assert not hasattr(model.forward, "exactq_session")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        exactq.compress(bits=3)
    with pytest.raises(TypeError, match="unknown compression option"):
        exactq.compress(bitz=2)
    with pytest.raises(TypeError, match="config must be an exactq.Config"):
        exactq.compress("int2")
    with pytest.raises(ValueError, match="rp_ratio must be None or one of"):
        exactq.Config(rp_ratio=0.3)
    with pytest.raises(ValueError, match="min_numel must be an int >= 0"):
        exactq.Config(min_numel=-1)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        exactq.Config(block_size=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        exactq.wrap(lambda x: x)
    with pytest.raises(RuntimeError, match="has not run yet"):
        exactq.compress().report()
    s = exactq.compress()
    with s:
        pass
    with pytest.raises(RuntimeError, match="entered once"):
        with s:
            pass
    cfg = exactq.Config()
    with pytest.raises(Exception):
        cfg.bits = 4  # frozen


def test_block_rows_groups_whole_rows():
    x = torch.randn(1000, 48, requires_grad=True)
    with exactq.compress(bits=2, block_rows=1, min_numel=0) as per_row:
        (x * 2).sin()
    with exactq.compress(bits=2, block_rows=8, min_numel=0) as eight:
        (x * 2).sin()
    rows = per_row.report().by_kind[R.QUANTIZED].stored_bytes
    blocks = eight.report().by_kind[R.QUANTIZED].stored_bytes
    assert rows == 1000 * 48 // 4 + 1000 * 4  # one (min, range) pair per row
    assert blocks == 1000 * 48 // 4 + 125 * 4
    with pytest.raises(ValueError, match="block_rows must be None or an int >= 1"):
        exactq.Config(block_rows=0)


def test_config_is_immutable_and_composable():
    base = exactq.Config(bits=4, block_size=128)
    s = exactq.compress(base, bits=8)
    assert s.config.bits == 8 and s.config.block_size == 128 and base.bits == 4
    auto = exactq.Config(bits=2)
    assert auto.nonuniform_for(normal_like=True) and not auto.nonuniform_for(normal_like=False)
    assert not exactq.Config(bits=4).nonuniform_for(normal_like=True)
    assert exactq.Config(bits=2, nonuniform=True).nonuniform_for(normal_like=False)
    with pytest.raises(ValueError, match="nonuniform=True needs bits=2"):
        exactq.Config(bits=4, nonuniform=True)


def test_auto_levels_nonuniform_for_normalisation_inputs_only(graph, monkeypatch):
    from exactq import engine

    flags = []
    real = engine.EF.quantize

    def spy(t, bits, block_size, nonuniform, seed):
        flags.append(nonuniform)
        return real(t, bits, block_size, nonuniform, seed)

    monkeypatch.setattr(engine.EF, "quantize", spy)
    model = _model("sage", "batch_norm", "relu", graph)
    with exactq.compress(bits=2, min_numel=0) as s:
        model(graph.x, graph.edge_index)
    # Each quantize call is followed by its record: pair them.
    quantized = [r for r in s._engine.records if r.kind == R.QUANTIZED]
    assert len(quantized) == len(flags)
    seen = {(r.op, r.saved.split(".")[0], f) for r, f in zip(quantized, flags)}
    assert ("batch_norm", "NativeBatchNormBackward0", True) in seen
    assert any(op == "linear" and not f for op, _, f in seen)
    assert not any(op == "linear" and f for op, _, f in seen)


# PyG's messages: PNA's, EdgeConv's, and GAT's (x_j alone, of heads x channels).
MESSAGES = {
    "cat": lambda x, index: torch.cat([x.index_select(0, index[1]), x[index[0]]], -1),
    "edge_conv": lambda x, index: torch.cat([x[index[1]], x[index[0]] - x[index[1]]], -1),
    "x_j": lambda x, index: x.view(-1, 2, 16).index_select(0, index[0]).flatten(1),
}


def _gather_and_transform(x, index, lin, message="cat"):
    return lin(MESSAGES[message](x, index)).relu().sum()  # the ReLU stores one exact bit


@pytest.mark.parametrize("message", MESSAGES)
def test_rows_gathered_from_an_input_are_referenced_exactly(message):
    # Gathered copies of an input cost nothing and restore exactly: fp32's gradient bit for bit at INT2.
    torch.manual_seed(0)
    width = 32 if message == "x_j" else 64
    x, index, lin = torch.randn(100, 32), torch.randint(0, 100, (2, 1000)), torch.nn.Linear(width, 8)
    _gather_and_transform(x, index, lin, message).backward()
    ref, lin.weight.grad = lin.weight.grad.clone(), None
    with exactq.compress(bits=2) as session:
        loss = _gather_and_transform(x, index, lin, message)
    loss.backward()
    assert torch.equal(lin.weight.grad, ref)
    gathered = session.report().by_kind[R.GATHERED]
    assert gathered.count == 1 and gathered.original_bytes == 1000 * width * 4 and gathered.stored_bytes == 0
    if message == "cat":  # rows of a parameter (an embedding table read as `weight[index]`): referenced too
        table = torch.nn.Parameter(x.clone())
        with exactq.compress(bits=2) as session:
            loss = _gather_and_transform(table, index, lin, message)
        assert session.report().by_kind[R.GATHERED].stored_bytes == 0
    with exactq.compress(bits=2):
        loss = _gather_and_transform(x, index, lin, message)
    x.add_(1.0)  # the rows backward would gather are no longer those the forward used
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_gathers_stored_as_copies_when_the_source_is_larger_or_changed():
    torch.manual_seed(0)
    x0, lin0, lin = torch.randn(1000, 32), torch.nn.Linear(32, 32), torch.nn.Linear(64, 8)
    few = torch.randint(0, 1000, (2, 50))  # 100 rows of 1,000: storing the source would cost more
    with exactq.compress(bits=8) as session:
        _gather_and_transform(lin0(x0), few, lin).backward()
    assert R.GATHERED not in session.report().by_kind
    many = torch.randint(0, 1000, (2, 5000))
    for change in (False, True):
        with exactq.compress(bits=8) as session:
            x = lin0(x0)
            h = torch.cat([x.index_select(0, many[1]), x[many[0]]], -1)
            if change:
                x.mul_(2.0)  # after the gather: h holds the old rows, so x cannot stand for them
            lin(h).relu().sum().backward()
        assert (R.GATHERED in session.report().by_kind) is not change


def test_index_add_source_is_read_only_for_its_shape():
    torch.manual_seed(0)
    w, index = torch.randn(5000, 16, requires_grad=True), torch.randint(0, 100, (5000,))
    with exactq.compress(bits=2) as session:
        out = torch.zeros(100, 16).index_add(0, index, w * 2, alpha=1.5)
    (out * torch.arange(1600.0).view(100, 16)).sum().backward()
    torch.testing.assert_close(w.grad, 3.0 * torch.arange(1600.0).view(100, 16)[index])
    assert session.report().by_kind[R.UNNEEDED].count == 1
