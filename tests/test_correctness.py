"""No silent wrong gradient, no crash: comparison-based backwards, copies of wrapped models,
checkpoint, autocast, compile, lazy modules, nested tensors, sparse tensors built in the forward."""
import contextlib
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import exactq
from exactq import report as R


def torch_geometric_typing():
    import torch_geometric.typing

    return torch_geometric.typing


def _input_grads(fn, inputs, ctx, weight_seed=0):
    for x in inputs:
        x.grad = None
    with ctx as session:
        out = fn(*inputs)
    g = torch.Generator().manual_seed(weight_seed)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return [x.grad.clone() for x in inputs], session


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _special_values(shape, seed):
    """Random values with ties (rounded to a coarse grid), zeros, and a few NaN and Inf."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 4).round() / 4
    flat = x.view(-1)
    pos = torch.randperm(flat.numel(), generator=g)[:12]
    flat[pos[:4]] = float("nan")
    flat[pos[4:8]] = float("inf")
    flat[pos[8:]] = -float("inf")
    return x


IDX = torch.randint(0, 50, (600, 1), generator=torch.Generator().manual_seed(1)).expand(-1, 8)
# Every op whose backward reads its saved tensors only through comparisons (exactq.rules: Bits and
# Winners forms): gradients must equal fp32's bit for bit, ties, NaN and Inf included.
COMPARISON_OPS = {
    "scatter_reduce_amax": lambda x: torch.zeros(50, 8).scatter_reduce(0, IDX, x, "amax", include_self=False),
    "scatter_reduce_amin_self": lambda x: torch.ones(50, 8).scatter_reduce(0, IDX, x, "amin", include_self=True),
    "index_reduce_amax": lambda x: torch.zeros(50, 8).index_reduce(0, IDX[:, 0], x, "amax", include_self=False),
    "amax_dim": lambda x: x.amax(1),
    "amin_dims_keepdim": lambda x: x.amin((0, 1), keepdim=True).expand(3, 8),
    "max": lambda x: x.max().expand(2),
    "min": lambda x: x.min().expand(2),
    "median": lambda x: x.median().expand(2),
    "relu": F.relu,
    "relu_inplace": lambda x: F.relu(x * 1.0, inplace=True),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "leaky_relu_inplace": lambda x: F.leaky_relu(x * 1.0, 0.2, inplace=True),
    "threshold": lambda x: F.threshold(x, 0.25, -3.0),
    "hardtanh": F.hardtanh,
    "relu6": F.relu6,
    "clamp": lambda x: x.clamp(-0.5, 0.75),
    "clamp_min": lambda x: x.clamp(min=0.25),
    "clamp_max": lambda x: x.clamp(max=-0.25),
    "clamp_min_fn": lambda x: torch.clamp_min(x, 0.5),
    "hardshrink": F.hardshrink,
    "softshrink": F.softshrink,
}


@pytest.mark.parametrize("nan_inf", [False, True], ids=["finite", "nan_inf"])
@pytest.mark.parametrize("name", list(COMPARISON_OPS))
def test_comparison_backwards_are_exact(name, nan_inf):
    fn = COMPARISON_OPS[name]
    for seed in range(3):
        base = _special_values((600, 8), seed) if nan_inf else (torch.randn(600, 8) * 4).round() / 4
        x = base.clone().requires_grad_()
        ref, _ = _input_grads(lambda x: fn(x * 2), [x], contextlib.nullcontext(), seed)
        got, session = _input_grads(lambda x: fn(x * 2), [x], exactq.compress(bits=2, min_numel=0, seed=seed), seed)
        assert torch.equal(ref[0].isnan(), got[0].isnan()), f"{name}: NaN pattern differs"
        if name != "hardshrink" and name != "softshrink" or not nan_inf:
            # (hardshrink's own kernel treats a NaN input differently in its vectorised body and its
            # scalar tail, so its fp32 gradient at NaN depends on the position; finite inputs are exact.)
            assert torch.equal(torch.nan_to_num(ref[0]), torch.nan_to_num(got[0])), f"{name}: gradient differs"
        kinds = session.report().by_kind
        assert R.QUANTIZED not in kinds and (R.COMPARISON in kinds or R.SIGN in kinds), kinds
        stored = session.report().stored_bytes - (kinds[R.UNCOMPRESSED].stored_bytes if R.UNCOMPRESSED in kinds else 0)
        assert stored <= x.numel() // 8 + 64, f"{name}: {stored} bytes stored for {x.numel()} elements"
        assert set(session.report().kept) <= {"integer tensor (indices or counts)"}  # scatter's index


def test_issue_repros_are_finite_and_close_at_eight_bits():
    """The repros of issue 16: NaN / zero gradients from max-type backwards."""
    torch.manual_seed(0)
    w = torch.randn(1000, 16, requires_grad=True)
    idx = torch.randint(0, 100, (1000, 1)).expand(-1, 16)
    cases = [
        lambda w: torch.zeros(100, 16).scatter_reduce(0, idx, w * 2, "amax", include_self=False),
        lambda w: (w * 2).amax(1),
        lambda w: (w * 2).max().reshape(1),
    ]
    for fn in cases:
        ref, _ = _input_grads(fn, [w], contextlib.nullcontext())
        got, _ = _input_grads(fn, [w], exactq.compress(bits=8))
        assert got[0].isfinite().all() and torch.equal(ref[0], got[0])


def _pyg_max_models():
    from torch_geometric.nn import GIN, PNA, EdgeCNN, GraphSAGE, global_max_pool

    class GINMaxPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gin = GIN(16, 32, 2)

        def forward(self, x, edge_index, batch):
            return global_max_pool(self.gin(x, edge_index), batch)

    deg = torch.tensor([0, 10, 20, 10, 5])
    return {
        "sage_max": lambda: GraphSAGE(16, 32, 2, aggr="max"),
        "edge_cnn": lambda: EdgeCNN(16, 32, 2),
        "pna": lambda: PNA(16, 32, 2, aggregators=["mean", "min", "max", "std"], scalers=["identity", "amplification"],
                           deg=deg),
        "gin_global_max_pool": GINMaxPool,
    }


@pytest.mark.parametrize("name", ["sage_max", "edge_cnn", "pna", "gin_global_max_pool"])
def test_max_aggregation_models_close_to_fp32(name):
    from exactq.data import synthetic_graph

    g = synthetic_graph(400, 16, 3000, 4, seed=0)
    torch.manual_seed(0)
    model = _pyg_max_models()[name]()
    batch = torch.arange(g.num_nodes) // 100
    args = (g.x, g.edge_index, batch) if name == "gin_global_max_pool" else (g.x, g.edge_index)

    def grads(ctx):
        model.zero_grad()
        with ctx:
            out = model(*args)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    ref = grads(contextlib.nullcontext())
    got = grads(exactq.compress(bits=8, min_numel=0, seed=0))
    assert got.isfinite().all()
    assert _rel(got, ref) < 0.05, f"{name}: relative gradient error {_rel(got, ref):.4f}"


@pytest.mark.parametrize("form", ["std_aggregation", "mul", "pow"])
def test_variances_from_squares_give_fp32_gradients_at_int2(form):
    # E[x^2] - E[x]^2 cancels the square's gradient against the mean's; with both rounded, PNA's std
    # aggregator gave parameter gradients 7x their own norm off at INT2. Squares are kept, and every
    # other field here is stored exactly (clamp bits, sqrt result, masks), so the gradient is fp32's.
    from torch_geometric.nn.aggr import StdAggregation

    torch.manual_seed(0)
    w = torch.randn(3000, 32, requires_grad=True)
    index = torch.randint(0, 300, (3000,))
    scale = torch.linspace(0.01, 3, 32)

    def run(ctx):
        w.grad = None
        with ctx:
            x = (w * scale).relu() + 0.5 * w  # an activation, not the leaf; a few near-constant groups
            if form == "std_aggregation":
                out = StdAggregation()(x, index, dim_size=300)
            else:
                sq = x * x if form == "mul" else x.pow(2)
                m = torch.zeros(300, 32).index_add(0, index, x) / 10
                out = (torch.zeros(300, 32).index_add(0, index, sq) / 10 - (m * m if form == "mul" else m.pow(2)))
                out = out.clamp(min=1e-5).sqrt()
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return w.grad.clone()

    ref = run(contextlib.nullcontext())
    session = exactq.compress(bits=2, min_numel=0, seed=0)
    got = run(session)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert any("square" in reason for reason in session.report().kept)


def _std_of_gathered_messages(x, edge_index, towers, linears):
    """PNA's message and std aggregator: a linear map of cat([x_i, x_j]) per tower, std over each
    target's edges."""
    from torch_geometric.nn.aggr import StdAggregation

    h = torch.cat([x.index_select(0, edge_index[1]), x[edge_index[0]]], -1)
    msg = torch.stack([lin(h[:, t]) for t, lin in enumerate(linears)], 1).flatten(1)
    return StdAggregation()(msg, edge_index[1], dim_size=x.shape[0])


@pytest.mark.parametrize("towers", [1, 2])
def test_gathered_copies_restore_equal_so_their_terms_cancel_at_int2(towers):
    # Each edge's copy of x_i meets a std aggregator whose gradient sums to zero over the target's edges:
    # fp32's weight gradient on the x_i half is ~0. Rounded copy by copy (as before), it kept every
    # copy's noise: 8.0 absolute where fp32 had 3e-5. Stored as x and the index, the copies restore
    # equal and cancel, and x is stored at 8 bits in fewer bytes than the copies at 2.
    torch.manual_seed(0)
    n, f = 200, 16
    x0, edge_index = torch.randn(n, towers, f), torch.randint(0, n, (2, 2000))
    lin0 = torch.nn.Linear(f, f)
    linears = torch.nn.ModuleList(torch.nn.Linear(2 * f, 8) for _ in range(towers))
    params = [*lin0.parameters(), *linears.parameters()]

    def run(ctx):
        for p in params:
            p.grad = None
        with ctx:
            out = _std_of_gathered_messages(lin0(x0), edge_index, towers, linears)
        out.sum().backward()
        return [lin.weight.grad.clone() for lin in linears]

    ref = run(contextlib.nullcontext())
    session = exactq.compress(bits=2, seed=0)
    got = run(session)
    for g, r in zip(got, ref):
        assert (g[:, :f] - r[:, :f]).abs().max() < 1e-3 * r.abs().max()  # the x_i half cancels
        assert _rel(g, r) < 0.02  # x at 8 bits
    gathered = session.report().by_kind[R.GATHERED]
    assert gathered.count == towers and gathered.stored_bytes < gathered.original_bytes / 32


def test_wrapped_model_survives_deepcopy_save_load_and_state_dict(tmp_path):
    torch.manual_seed(0)
    model = exactq.wrap(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)),
                        bits=8, min_numel=0)
    x = torch.randn(128, 64)
    clone = copy.deepcopy(model)
    clone(x).sum().backward()
    assert all(p.grad is None for p in model.parameters()), "the copy ran the original's parameters"
    assert all(p.grad is not None for p in clone.parameters())
    assert clone.forward.exactq_session.last.report().stored_bytes > 0  # the copy is wrapped too
    with torch.no_grad():
        clone[0].weight.add_(1.0)
    assert not torch.equal(clone[0].weight, model[0].weight)  # independent parameters

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    loaded(x).sum().backward()
    assert loaded.forward.exactq_session.last.report().stored_bytes > 0
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    fresh.load_state_dict(torch.load(path))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    exactq.unwrap(model)
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="already wrapped"):
        exactq.wrap(exactq.wrap(fresh, bits=8), bits=8)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 4))


def _param_grads(model, run):
    model.zero_grad()
    run().pow(2).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_checkpoint_inside_a_block_recomputes_from_exact_inputs():
    model = _mlp()
    x = torch.randn(512, 32)
    block = torch.nn.Sequential(*model[1:4])

    def run():
        return model[4](checkpoint(block, model[0](x), use_reentrant=False))

    ref = _param_grads(model, run)

    def compressed():
        with exactq.compress(bits=2, min_numel=0, seed=0) as s:
            out = run()
        compressed.session = s
        return out

    got = _param_grads(model, compressed)
    plain = _param_grads(model, lambda: exactq.compressed(bits=2, min_numel=0, seed=0)(
        lambda: model[4](block(model[0](x))))())
    # The region's input is kept exactly for recomputation; only lin0's and lin4's saves are rounded.
    assert _rel(got, ref) < _rel(plain, ref)
    kept = compressed.session.report().kept
    assert any("custom autograd Function" in reason for reason in kept), kept


def test_block_inside_checkpoint_compresses_the_region():
    model = _mlp()
    x = torch.randn(512, 32)

    def region(h):
        with exactq.compress(bits=8, min_numel=0, seed=0):
            return model[1:4](h)

    ref = _param_grads(model, lambda: model[4](model[1:4](model[0](x))))
    got = _param_grads(model, lambda: model[4](checkpoint(region, model[0](x), use_reentrant=False)))
    assert _rel(got, ref) < 0.02
    got_reentrant = _param_grads(model, lambda: model[4](checkpoint(region, model[0](x), use_reentrant=True)))
    assert _rel(got_reentrant, ref) < 0.02


def test_autocast_keeps_parameter_casts():
    model = _mlp()
    x = torch.randn(512, 32)

    def run(ctx):
        with torch.autocast("cpu", dtype=torch.bfloat16), ctx as s:
            out = model(x).float()
        return out, s

    ref = _param_grads(model, lambda: run(contextlib.nullcontext())[0])
    sessions = []
    got = _param_grads(model, lambda: (lambda o, s: (sessions.append(s), o)[1])(*run(exactq.compress(bits=8))))
    assert _rel(got, ref) < 0.05
    records = sessions[0]._engine.records
    casts = [r for r in records if "cast or view of a parameter" in r.reason]
    assert len(casts) >= 2  # the bf16 copies of the weights whose input needs a gradient
    # No weight copy among the quantized tensors (a linear layer's weight is addmm's mat2).
    assert not [r for r in records if r.kind == R.QUANTIZED and r.saved.endswith("mat2")]


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_jit_trace_inside_a_block_gives_one_graph():
    # torch.jit.trace runs the forward twice and checks that both traces agree; logging the gather of
    # x_j (exactq.gather) read the output's geometry while tracing and made them differ (PyG's own
    # test_traceable_my_conv_with_self_loops).
    from torch_geometric.nn import MessagePassing
    from torch_geometric.utils import add_self_loops

    class Conv(MessagePassing):
        def forward(self, x, edge_index):
            return self.propagate(add_self_loops(edge_index)[0], x=x)

    x, edge_index = torch.randn(4, 16), torch.tensor([[0, 1, 2], [1, 2, 3]])
    with exactq.compress(bits=8, min_numel=0):
        traced = torch.jit.trace(Conv(), (x, edge_index))
    torch.testing.assert_close(traced(x, edge_index), Conv()(x, edge_index))


def test_compiled_functions_and_models_equal_eager_without_graph_breaks():
    import torch._dynamo

    from torch_geometric.nn import GCN, GraphSAGE

    from exactq.data import synthetic_graph

    g = synthetic_graph(300, 16, 2000, 4, seed=0)
    fns = {
        "sin_sum": (lambda x: x.sin().sum(), (torch.randn(8, 8, requires_grad=True),)),
        "mlp": (_mlp(), (torch.randn(64, 32),)),
        "gcn": (GCN(16, 32, 2, 4), (g.x, g.edge_index)),
        "sage": (GraphSAGE(16, 32, 2, 4), (g.x, g.edge_index)),
    }
    for name, (fn, args) in fns.items():
        torch._dynamo.reset()
        eager = fn(*args)
        plain_breaks = torch._dynamo.explain(fn)(*args).graph_break_count  # PyG's own (GCN: nonzero)
        torch._dynamo.reset()
        with _PassThroughMode():  # any TorchFunctionMode on the stack, doing nothing
            mode_breaks = torch._dynamo.explain(fn)(*args).graph_break_count
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with exactq.compress(bits=8, min_numel=0):
                compiled = torch.compile(fn)(*args)
                explain = torch._dynamo.explain(fn)(*args)
        assert compiled.shape == eager.shape and torch.allclose(compiled, eager, atol=1e-5), name
        # exactq's tracking adds no graph break of its own: as many as under a mode that does nothing. Where
        # PyG breaks the graph itself (GCN's data-dependent nonzero), Dynamo splits it twice more under any
        # TorchFunctionMode, exactq's or not (README, "torch.compile").
        assert explain.graph_break_count == mode_breaks and mode_breaks in (plain_breaks, plain_breaks + 2), \
            f"{name}: {explain.graph_break_count} graph breaks vs {mode_breaks} under a plain mode, {plain_breaks} " \
            f"without: {explain.break_reasons}"
        compiled.float().pow(2).sum().backward()
        exactq_warnings = {str(w.message) for w in caught if "exactq" in str(w.message)}
        # One clear message: the compiled region's saved tensors are kept exactly.
        assert len(exactq_warnings) == 1 and "torch.compile" in exactq_warnings.pop(), name


def test_lazy_modules_and_nested_tensors():
    from torch_geometric.nn import GraphSAGE

    from exactq.data import synthetic_graph

    from torch_geometric.nn import Linear

    with exactq.compress(bits=8, min_numel=0):
        lazy = torch.nn.LazyLinear(4)
        y = lazy(torch.randn(3, 5))
        pyg_lazy = Linear(-1, 8).to("cpu")  # .to() of an uninitialised parameter is a tracked op (PyG's test)
        assert copy.deepcopy(pyg_lazy)(torch.randn(2, 5)).shape == (2, 8)
    assert y.shape == (3, 4)
    g = synthetic_graph(200, 16, 1000, 4, seed=0)
    torch.manual_seed(0)
    model = GraphSAGE(-1, 32, 2, 4)
    with exactq.compress(bits=8, min_numel=0):
        model(g.x, g.edge_index).sum().backward()
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    with exactq.compress(bits=8, min_numel=0) as session:
        nt = torch.nested.as_nested_tensor([a * 2, b * 2])
        out = (nt * nt).to_padded_tensor(0.0)
    out.sum().backward()
    assert torch.allclose(a.grad, 8 * a.detach()) and torch.allclose(b.grad, 8 * b.detach())
    assert any("nested tensor" in reason for reason in session.report().kept)  # kept exactly, counted


def test_sparse_adjacency_built_in_the_forward_is_counted():
    """A CSR made from a COO adjacency inside the forward (PyG does it for ``adj_t``) shares the COO's
    values but makes new row pointers: the report counts it, as the measurement does."""
    n = 2000
    ei = torch.randint(0, n, (2, 20000), generator=torch.Generator().manual_seed(0))
    coo = torch.sparse_coo_tensor(ei, torch.ones(ei.shape[1]), (n, n)).coalesce()
    x = torch.randn(n, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    with exactq.LiveTensorMemory() as mem:
        with exactq.compress(bits=2, min_numel=0) as s:
            out = coo.to_sparse_csr() @ (x @ w)
        held = mem.live_bytes() - out.untyped_storage().nbytes()
    rep = s.report()
    assert rep.original_bytes == pytest.approx(held, rel=0.05)
    assert rep.by_kind[R.UNCOMPRESSED].original_bytes >= (n + 1) * 8  # the row pointers at least


def test_pytest_plugin_runs_tests_inside_a_block(tmp_path):
    import subprocess
    import sys

    (tmp_path / "test_user.py").write_text(
        "import torch\n"
        "def test_grad():\n"
        "    from torch.autograd.graph import saved_tensors_hooks\n"
        "    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None\n"
        "    x = torch.randn(100, 100, requires_grad=True)\n"
        "    (x.sin() * 2).sum().backward()\n"
        "    exact = 2 * x.detach().cos()\n"
        "    assert float((x.grad - exact).norm() / exact.norm()) < 0.02  # 8-bit: close, not equal\n"
    )
    args = [sys.executable, "-m", "pytest", "-q", "-p", "exactq.testing", str(tmp_path)]
    on = subprocess.run(args + ["--exactq-bits", "8"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert on.returncode == 0, on.stdout + on.stderr
    assert "1 test calls ran inside exactq.compress(bits=8)" in on.stdout
    off = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert off.returncode == 1  # without --exactq-bits no block: the hook check fails


def test_graphs_dropped_without_backward_are_freed():
    """A forward whose graph is dropped without a backward (e.g. evaluation with grad on) must not leak:
    the engine keeps no reference from a saved tensor's handle back to its node."""
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256)
    with exactq.LiveTensorMemory() as mem:
        for _ in range(5):
            with exactq.compress(bits=2, min_numel=0):
                out = torch.relu(lin(x)).amax(1)
            del out
        assert mem.live_bytes() == 0


@pytest.mark.skipif(not (torch_geometric_typing().WITH_TORCH_SPARSE or torch_geometric_typing().WITH_PYG_LIB),
                    reason="NeighborLoader needs torch-sparse or pyg-lib (.ci/install builds torch-sparse; "
                           "its build failed or was skipped here)")
def test_neighbor_loader_mini_batch_training():
    """Mini-batch training with PyG's NeighborLoader, each batch's forward inside a block."""
    from torch_geometric.loader import NeighborLoader
    from torch_geometric.nn import GraphSAGE

    from exactq.data import load_planetoid

    data = load_planetoid("Cora")
    accs, ratios = {}, []
    for bits in (None, 2):
        torch.manual_seed(0)
        loader = NeighborLoader(data, num_neighbors=[10, 10], batch_size=256, input_nodes=data.train_mask,
                                shuffle=True)
        model = GraphSAGE(data.num_features, 64, 2, 7, dropout=0.5)
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
        for _ in range(20):
            model.train()
            for batch in loader:
                opt.zero_grad()
                with exactq.compress(bits=bits) if bits else contextlib.nullcontext() as s:
                    out = model(batch.x, batch.edge_index)[: batch.batch_size]
                F.cross_entropy(out, batch.y[: batch.batch_size]).backward()
                opt.step()
                if bits:
                    ratios.append(s.report().ratio)
        model.eval()
        with torch.no_grad():
            accs[bits] = float((model(data.x, data.edge_index).argmax(1) == data.y)[data.test_mask].float().mean())
    assert accs[None] > 0.7 and abs(accs[2] - accs[None]) < 0.03, accs
    assert min(ratios) > 5  # each batch's saved activations compressed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mostly_zero_activations_are_stored_sparse_and_exact(dtype):
    """Sums of bag-of-words features (GIN on Cora: 3.4% nonzero) lose a third of their norm at INT2 but
    take fewer bytes as their nonzeros: stored exactly then, NaN/Inf included."""
    torch.manual_seed(0)
    x = (torch.rand(3000, 700) < 0.03).to(dtype) * torch.randint(1, 6, (3000, 700)).to(dtype)
    x[5, 3], x[7, 1] = float("nan"), float("inf")
    w = torch.randn(700, 8, dtype=dtype, requires_grad=True)
    with exactq.compress(bits=2) as session:
        y = (x * 1.0) @ w
    y.sum().backward()
    ref = w.detach().clone().requires_grad_()
    ((x * 1.0) @ ref).sum().backward()
    torch.testing.assert_close(w.grad, ref.grad, rtol=0, atol=0, equal_nan=True)  # bit for bit
    assert bool(w.grad.isnan().any()) and bool(w.grad.isinf().any())
    kinds = session.report().by_kind
    assert set(kinds) == {"sparse"}
    assert kinds["sparse"].stored_bytes < x.numel() * 2 / 8  # below what INT2 codes alone would take
    dense = torch.randn(3000, 700, dtype=dtype).relu()  # half zeros: quantized, not sparse
    with exactq.compress(bits=2) as session:
        (dense * 1.0) @ w
    assert "sparse" not in session.report().by_kind


def test_rows_of_very_different_scale_get_a_block_each():
    # Pooled per-graph rows: a hub's row would set the range of its block's small rows.
    g = torch.Generator().manual_seed(0)
    scales = torch.exp(torch.randn(4096, 1, generator=g) * 2)
    pooled = torch.rand(4096, 64, generator=g) * scales
    alike = torch.randn(4096, 64, generator=g)
    assert exactq.functional.row_blocks_pay(pooled, 2, 256)
    assert not exactq.functional.row_blocks_pay(alike, 2, 256)
    assert not exactq.functional.row_blocks_pay(pooled, 2, 64)  # a block is a row already
    assert not exactq.functional.row_blocks_pay(pooled.t(), 2, 256)  # not contiguous: left as configured

    # Restored through a product's backward (d(p * v)/dv = p): each row's relative error.
    v = torch.ones(4096, 64, requires_grad=True)
    errors = {}
    for label, block_rows in (("auto", None), ("256", 4)):
        with exactq.compress(bits=2, seed=0, block_rows=block_rows) as s:
            out = pooled.clone() * v
        (restored,) = torch.autograd.grad(out, v, torch.ones_like(out))
        errors[label] = float(((restored - pooled).norm(dim=1) / pooled.norm(dim=1)).mean())
        if label == "auto":
            assert s.report().stored_bytes >= 4096 * 64 // 4 + 4096 * 4  # codes + one block's stats per row
    assert errors["auto"] < errors["256"] / 3, errors
