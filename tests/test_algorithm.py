"""The cached-delta math, checked against independently written formulas, and the step state end to end."""

import pytest
import torch
import torch.nn.functional as F

import chipmunk_compile
from chipmunk_compile import ChipmunkConfig
from chipmunk_compile.state import CallContext, ModelState, StepInfo, activate, deactivate
from chipmunk_compile.testing import TinyDiT, denoise, flops_per_call, relative_l2


def _call(state, step, op, *args, stream=0):
    token = activate(CallContext(state, StepInfo(0, step, stream)))
    try:
        return op(*args)
    finally:
        deactivate(token)


def _masked_attention(q, k, v, keep, scale):
    """Attention where query i sees only keys j with keep[b, h, i, j] (dense formula, fp64)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v.double()


def _keep_from_indices(indices, counts, s, sk, group):
    """(B, H, G, K) indices -> boolean (B, H, S, Sk) column mask per query."""
    b, h, g, _ = indices.shape
    keep = torch.zeros(b, h, g, sk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for gi in range(g):
                keep[bi, hi, gi, indices[bi, hi, gi, : counts[bi, hi, gi]].long()] = True
    return keep.repeat_interleave(group, dim=2)[:, :, :s]


@pytest.mark.parametrize("masked", [False, True, "float"])
def test_sparse_attention_equals_independent_formula(masked, monkeypatch):
    """The cache (dense step) and the sparse step against the dense formula restricted to the selected keys.
    With a key-padding mask the selection lists no masked key, so for a bool mask the sparse passes run without
    a key bias (the faster kernel); an additive float mask keeps its bias (it may hold other values)."""
    from chipmunk_compile import sparse_attention

    biases = []
    sparse = sparse_attention._sparse

    def recording(*args, key_bias, **kwargs):
        biases.append(key_bias)
        return sparse(*args, key_bias=key_bias, **kwargs)

    monkeypatch.setattr(sparse_attention, "_sparse", recording)
    cfg = ChipmunkConfig().with_overrides({"attention.first_dense_layers": 0, "attention.query_group": 64,
                                           "attention.keep": 0.2, "attention.random_keep": 0.1,
                                           "attention.first_dense_steps": 1})
    state = ModelState(cfg)
    b, h, s, d = 2, 2, 150, 16
    q0, k0, v0 = (torch.randn(b, h, s, d) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
        mask[1, ..., 100:] = False
        if masked == "float":
            mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    op = torch.ops.chipmunk.attention.default
    w = torch.randn(4, 4)
    o0 = _call(state, 0, op, q0, k0, v0, mask, w, 7, None, False, 0, 0)
    torch.testing.assert_close(o0, F.scaled_dot_product_attention(q0, k0, v0, attn_mask=mask), atol=1e-5, rtol=1e-5)
    entry = state.site("attention", 7, w).cache(0, 0)
    keep = _keep_from_indices(entry.indices, entry.counts, s, s, 64)
    if masked:
        assert not keep[1, :, :, 100:].any()  # masked keys are never selected
        assert (entry.counts[1] <= 100).all()
    assert entry.indices.shape[-1] == round(0.2 * s) + round(0.1 * (s - round(0.2 * s)))
    q1, k1, v1 = (t + 0.1 * torch.randn_like(t) for t in (q0, k0, v0))
    out = _call(state, 1, op, q1, k1, v1, mask, w, 7, None, False, 0, 0)
    scale = d**-0.5
    expected = o0.double() - _masked_attention(q0, k0, v0, keep, scale) + _masked_attention(q1, k1, v1, keep, scale)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert out.stride() == torch.empty(b, s, h, d).permute(0, 2, 1, 3).stride()
    assert len(biases) == 2  # the cache at step 0, the sparse step 1
    assert all((bias is None) == (masked != "float") for bias in biases), [type(x) for x in biases]


def test_one_time_selection_is_made_at_the_first_dense_step():
    """recompute_selection off: the first of two dense steps selects (no cache), the second makes the cache
    with that selection; if the second never comes, the next call makes the cache itself (exact output)."""
    cfg = ChipmunkConfig().with_overrides({"attention.first_dense_layers": 0, "attention.query_group": 64,
                                           "attention.keep": 0.25, "attention.recompute_selection": False,
                                           "attention.dense_steps": [0, 1]})
    op, w = torch.ops.chipmunk.attention.default, torch.randn(4, 4)
    gen = torch.Generator().manual_seed(1)
    qkv = [tuple(torch.randn(1, 2, 100, 16, generator=gen) for _ in range(3)) for _ in range(3)]
    for skip_step_1 in (False, True):
        state = ModelState(cfg)
        out0 = _call(state, 0, op, *qkv[0], None, w, 3, None, False, 0, 0)
        site = state.site("attention", 3, w)
        entry = site.cache(0, 0)
        chosen = entry.indices.clone()
        assert entry.cache is None and site.stats.last_phase == "dense+select (next step dense)"
        torch.testing.assert_close(out0, F.scaled_dot_product_attention(*qkv[0]), atol=1e-5, rtol=1e-5)
        step = 2 if skip_step_1 else 1  # step 2 is not a dense step: it must make the missing cache
        out1 = _call(state, step, op, *qkv[1], None, w, 3, None, False, 0, 0)
        torch.testing.assert_close(out1, F.scaled_dot_product_attention(*qkv[1]), atol=1e-5, rtol=1e-5)
        assert site.cache(0, 0).cache is not None and torch.equal(site.cache(0, 0).indices, chosen)
        out2 = _call(state, step + 1, op, *qkv[1], None, w, 3, None, False, 0, 0)  # sparse on the same inputs
        assert site.stats.last_phase == "sparse" and site.stats.selections == 1
        torch.testing.assert_close(out2, out1, atol=1e-5, rtol=1e-5)


def test_selection_picks_the_heaviest_columns():
    cfg = ChipmunkConfig().with_overrides({"attention.first_dense_layers": 0, "attention.query_group": 64,
                                           "attention.keep": 0.1, "attention.random_keep": 0.0})
    state = ModelState(cfg)
    base = torch.randn(8)
    q = base + 0.1 * torch.randn(1, 1, 64, 8)
    k, v = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    k[..., [3, 17, 40], :] = base * 2  # keys every query attends to strongly
    w = torch.randn(2, 2)
    for step in (0, 1):  # dense steps 0 and 1: the last of them selects
        _call(state, step, torch.ops.chipmunk.attention.default, q, k, v, None, w, 1, None, False, 0, 0)
    chosen = set(state.site("attention", 1, w).cache(0, 0).indices[0, 0, 0].tolist())
    assert {3, 17, 40} <= chosen


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_dense_step_before_a_dense_step_is_plain(kind):
    """Of consecutive dense steps only the last selects and caches (the next step would remake them): the
    first returns the exact dense output and leaves no cache; the sparse step after them uses the last one's
    (given step 1's inputs again, it must give step 1's exact output)."""
    cfg = ChipmunkConfig().with_overrides({f"{kind}.first_dense_layers": 0, f"{kind}.first_dense_steps": 2,
                                           f"{kind}.dense_every": 0, "attention.query_group": 64,
                                           "mlp.block": 64, f"{kind}.keep": 0.25})
    state = ModelState(cfg)
    gen = torch.Generator().manual_seed(0)
    if kind == "attention":
        w = torch.randn(4, 4)
        op, shape = torch.ops.chipmunk.attention.default, (1, 2, 100, 16)
        inputs = [tuple(torch.randn(shape, generator=gen) for _ in range(3)) for _ in range(3)]
        args = lambda i: (*inputs[i], None, w, 3, None, False, 0, 0)  # noqa: E731
        dense = lambda i: F.scaled_dot_product_attention(*inputs[i])  # noqa: E731
    else:
        w1, w2 = torch.randn(32, 16, generator=gen) / 4, torch.randn(12, 32, generator=gen) / 4
        w = w1
        op, inputs = torch.ops.chipmunk.mlp.default, [torch.randn(1, 100, 16, generator=gen) for _ in range(3)]
        args = lambda i: (inputs[i], w1, None, w2, None, 3, "gelu_tanh", False, 0, 32)  # noqa: E731
        dense = lambda i: F.linear(F.gelu(F.linear(inputs[i], w1), approximate="tanh"), w2)  # noqa: E731
    out0 = _call(state, 0, op, *args(0))
    site = state.site(kind, 3, w)
    assert site.cache(0, 0) is None and site.stats.last_phase == "dense (no cache)"
    torch.testing.assert_close(out0, dense(0), atol=1e-5, rtol=1e-5)
    out1 = _call(state, 1, op, *args(1))
    assert site.cache(0, 0) is not None and site.stats.last_phase != "dense (no cache)"
    torch.testing.assert_close(out1, dense(1), atol=1e-5, rtol=1e-5)
    inputs[2] = inputs[1]  # sparse step on step 1's inputs: exact iff its caches are step 1's
    out2 = _call(state, 2, op, *args(2))
    assert site.stats.last_phase == "sparse" and site.stats.sparse_calls == 1
    torch.testing.assert_close(out2, dense(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated, activation, bias", [(False, "gelu_tanh", True), (True, "silu", False),
                                                     (False, "gelu", False)])
def test_sparse_mlp_equals_independent_formula(gated, activation, bias):
    cfg = ChipmunkConfig().with_overrides({"mlp.first_dense_layers": 0, "mlp.block": 64, "mlp.keep": 0.25,
                                           "mlp.random_keep": 0.1, "mlp.first_dense_steps": 1})
    state = ModelState(cfg)
    bsz, s, din, f, dout = 2, 150, 16, 32, 12
    w1 = torch.randn(f * (2 if gated else 1), din) / 4
    b1 = torch.randn(w1.shape[0]) if bias else None
    w2, b2 = torch.randn(dout, f + 5) / 4, (torch.randn(dout) if bias else None)
    op = torch.ops.chipmunk.mlp.default
    args = (w1, b1, w2, b2, 9, activation, gated, 5, f)

    def act(x):
        h = x.double() @ w1.double().T + (b1.double() if bias else 0)
        if gated:
            u, g = h.chunk(2, -1)
            return u * {"silu": F.silu, "gelu": F.gelu}[activation](g)
        return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")

    x0 = torch.randn(bsz, s, din)
    out0 = _call(state, 0, op, x0, *args)
    dense0 = act(x0) @ w2[:, 5:].double().T + (b2.double() if bias else 0)
    torch.testing.assert_close(out0.double(), dense0, atol=1e-5, rtol=1e-5)
    x1 = x0 + 0.2 * torch.randn_like(x0)
    out1 = _call(state, 1, op, x1, *args)
    entry = state.site("mlp", 9, w1).cache(0, 0)
    idx = entry.indices.long()  # (B, nb, k) chosen at this step
    assert idx.shape[-1] == round(0.25 * f) + round(0.1 * (f - round(0.25 * f)))
    expected = dense0.clone()
    a0, a1 = act(x0), act(x1)
    for bi in range(bsz):
        for m in range(idx.shape[1]):
            rows, cols = slice(m * 64, (m + 1) * 64), idx[bi, m]
            delta = a1[bi, rows][:, cols] - a0[bi, rows][:, cols]
            expected[bi, rows] += delta @ w2[:, 5:].double()[:, cols].T
    torch.testing.assert_close(out1.double(), expected, atol=1e-5, rtol=1e-5)


def _loop_outputs(model, noise, steps):
    outs = []

    def record(x, timestep):
        out = model(x, timestep=timestep)
        outs.append(out.clone())
        return out

    final = denoise(record, noise, steps=steps)
    return final, outs


def test_keep_one_reproduces_dense_at_every_step_of_50():
    model = TinyDiT(depth=3, seq=48).eval()
    noise = torch.randn(1, 48, 8)
    _, ref = _loop_outputs(model, noise, 50)
    opts = {"attention.keep": 1.0, "attention.random_keep": 0.0, "mlp.keep": 1.0, "mlp.random_keep": 0.0,
            "attention.first_dense_layers": 0, "mlp.first_dense_layers": 0}
    compiled = torch.compile(model, backend="chipmunk", options=opts)
    _, got = _loop_outputs(compiled, noise, 50)
    for step, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    report = chipmunk_compile.report(compiled)
    assert all(s.sparse_calls > 30 for s in report.sites if s.status == "rewritten"), str(report)


def test_dense_steps_equal_inductor_alone():
    model = TinyDiT(depth=2, seq=32).eval()
    x, t = torch.randn(2, 32, 8), torch.tensor([999.0, 999.0])
    with torch.no_grad():
        ours = torch.compile(model, backend="chipmunk")(x, timestep=t)
        torch._dynamo.reset()
        inductor = torch.compile(model, backend="inductor")(x, timestep=t)
    torch.testing.assert_close(ours, inductor, atol=1e-5, rtol=1e-5)


SPARSE = {"attention.keep": 0.25, "attention.random_keep": 0.0, "mlp.keep": 0.3, "mlp.random_keep": 0.0,
          "attention.first_dense_layers": 1, "mlp.first_dense_layers": 1}


def test_batch_two_equals_two_runs_of_batch_one():
    model = TinyDiT(depth=2, seq=64).eval()
    noise = torch.randn(2, 64, 8)
    compiled = torch.compile(model, backend="chipmunk", options=SPARSE)
    single = [denoise(compiled, noise[i : i + 1], steps=8) for i in range(2)]
    batched = denoise(compiled, noise, steps=8)
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-4, rtol=1e-4)


def test_two_cfg_streams_keep_separate_state():
    model = TinyDiT(depth=2, seq=64).eval()
    xa, xb = torch.randn(1, 64, 8), torch.randn(1, 64, 8)
    ts = [1000.0, 900.0, 800.0, 700.0]
    shared = torch.compile(model, backend="chipmunk", options=SPARSE)
    with torch.no_grad():
        inter = [(shared(xa, timestep=torch.tensor([t])), shared(xb, timestep=torch.tensor([t]))) for t in ts]
    separate = []
    for x in (xa, xb):
        torch._dynamo.reset()
        m = TinyDiT(depth=2, seq=64).eval()
        c = torch.compile(m, backend="chipmunk", options=SPARSE)
        with torch.no_grad():
            separate.append([c(x, timestep=torch.tensor([t])) for t in ts])
    for i in range(len(ts)):
        torch.testing.assert_close(inter[i][0], separate[0][i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inter[i][1], separate[1][i], atol=1e-5, rtol=1e-5)
    phases = {s.last_phase for s in chipmunk_compile.report(shared).sites if s.status == "rewritten"}
    assert "sparse" in phases


def test_new_generation_reset_and_resolution_change():
    model = TinyDiT(depth=2, seq=64).eval()
    compiled = torch.compile(model, backend="chipmunk", options=SPARSE)
    x = torch.randn(1, 64, 8)
    with torch.no_grad():
        for t in (1000.0, 900.0, 800.0):
            compiled(x, timestep=torch.tensor([t]))
        # a rising timestep starts a new generation: step 0 is dense, so the output is exact
        torch.testing.assert_close(compiled(x, timestep=torch.tensor([1000.0])),
                                   model(x, timestep=torch.tensor([1000.0])), atol=1e-5, rtol=1e-5)
        compiled(x, timestep=torch.tensor([900.0]))
        compiled(x, timestep=torch.tensor([800.0]))
        chipmunk_compile.reset(compiled)
        torch.testing.assert_close(compiled(x, timestep=torch.tensor([700.0])),
                                   model(x, timestep=torch.tensor([700.0])), atol=1e-5, rtol=1e-5)
        # resolution change mid-way: Dynamo recompiles (dynamic), sites stay rewritten, output exact
        x2 = torch.randn(1, 40, 8)
        torch.testing.assert_close(compiled(x2, timestep=torch.tensor([600.0])),
                                   model(x2, timestep=torch.tensor([600.0])), atol=1e-5, rtol=1e-5)
        compiled(x2, timestep=torch.tensor([500.0]))
    report = chipmunk_compile.report(compiled)
    rewritten = [s for s in report.sites if s.status == "rewritten"]
    assert len(rewritten) == 4 and all(s.calls == 9 for s in rewritten), str(report)
    states = chipmunk_compile.states_of(model)
    assert len(states) == 1 and len(states[0].plans) == 2  # two graphs, one state


def test_two_compiled_models_never_share_state():
    a, b = TinyDiT(depth=2, seq=32, seed=1).eval(), TinyDiT(depth=2, seq=32, seed=2).eval()
    ca = torch.compile(a, backend="chipmunk", options=SPARSE)
    cb = torch.compile(b, backend="chipmunk", options=SPARSE)
    x = torch.randn(1, 32, 8)
    with torch.no_grad():
        for t in (1000.0, 900.0, 800.0):
            ya = ca(x, timestep=torch.tensor([t]))
            yb = cb(x, timestep=torch.tensor([t]))
    sa, sb = chipmunk_compile.states_of(a), chipmunk_compile.states_of(b)
    assert len(sa) == 1 and len(sb) == 1 and sa[0] is not sb[0]
    assert not ({id(s) for s in sa[0].sites} & {id(s) for s in sb[0].sites})
    assert not torch.allclose(ya, yb)


def test_flops_fall_on_sparse_steps():
    model = TinyDiT(depth=3, seq=128, dim=64).eval()
    opts = dict(SPARSE, **{"attention.query_group": 64, "mlp.block": 64})
    compiled = torch.compile(model, backend="chipmunk", options=opts)
    x = torch.randn(1, 128, 8)
    calls = [((x,), {"timestep": torch.tensor([t])}) for t in (1000.0, 900.0, 800.0, 700.0)]
    flops = flops_per_call(compiled, calls)
    # steps 0, 1 dense (step 0 plain, step 1 also selects); 2, 3 sparse. Layer 0 stays dense
    # (first_dense_layers=1).
    per_layer = 2 * 1 * 4 * 128 * 128 * (16 + 16)  # one dense attention: B=1, H=4, S=128, D=16
    select = per_layer * (1 + 0.5 + 0.25)  # dense + column-sum pass + forming the cache at 25% kept
    assert flops[0]["attention"] == pytest.approx(3 * per_layer, rel=0.01), flops
    assert flops[1]["attention"] == pytest.approx(per_layer + 2 * select, rel=0.01), flops
    assert flops[2]["attention"] == pytest.approx(per_layer * (1 + 2 * 0.25), rel=0.01), flops
    assert flops[2]["mlp"] < 0.6 * flops[0]["mlp"], flops
    assert flops[2]["total"] < 0.8 * flops[0]["total"], flops
    assert flops[2]["other"] == flops[0]["other"]
    report = chipmunk_compile.report(compiled)
    kept = {s.kind: s.kept_fraction for s in report.sites if s.status == "rewritten" and s.sparse_calls}
    assert kept["attention"] == pytest.approx(0.25, abs=0.01) and kept["mlp"] == pytest.approx(0.3, abs=0.01)


def test_check_error_mode_records_error_against_dense():
    model = TinyDiT(depth=2, seq=64).eval()
    compiled = torch.compile(model, backend="chipmunk", options=dict(SPARSE, check_error=True))
    noise = torch.randn(1, 64, 8)
    out = denoise(compiled, noise, steps=6)
    ref = denoise(model, noise, steps=6)
    assert relative_l2(out, ref) < 0.5
    sparse = [s for s in chipmunk_compile.report(compiled).sites if s.sparse_calls]
    assert sparse and all(len(s.errors) == s.sparse_calls and 0 < s.mean_error < 1 for s in sparse)


def test_caches_are_freed_with_the_model():
    import gc
    import weakref

    model = TinyDiT(depth=2, seq=32).eval()
    compiled = torch.compile(model, backend="chipmunk", options=SPARSE)
    with torch.no_grad():
        for t in (1000.0, 900.0, 800.0):
            compiled(torch.randn(1, 32, 8), timestep=torch.tensor([t]))
    (state,) = chipmunk_compile.states_of(model)
    entries = [e for s in state.sites for e in s.caches.values()]
    caches = [weakref.ref(e.cache) for e in entries if getattr(e, "cache", None) is not None]
    assert caches
    state_ref = weakref.ref(state)
    del state, model, compiled, entries
    gc.collect()
    assert state_ref() is None and all(r() is None for r in caches)


def test_failing_selection_kernel_falls_back_with_a_log(monkeypatch, caplog):
    """A selection kernel that fails (e.g. a GPU it cannot compile for) is logged and replaced, per site."""
    import chipmunk_compile.sparse_mlp as sparse_mlp

    calls = []

    def flaky(scores, k_top, n_rand, seed, *, use_kernel=True):
        calls.append(use_kernel)
        if use_kernel:
            raise RuntimeError("no kernel for this device")
        return select(scores, k_top, n_rand, seed, use_kernel=False)

    select = sparse_mlp.select_columns_fast
    monkeypatch.setattr(sparse_mlp, "select_columns_fast", flaky)
    state = ModelState(ChipmunkConfig().with_overrides({"mlp.first_dense_layers": 0, "mlp.first_dense_steps": 1}))
    site = state.site("mlp", 1, torch.randn(2, 2))
    diff = torch.rand(1, 3, 64)
    with pytest.raises(RuntimeError):  # on CPU the kernel is never the cause: the error is not hidden
        sparse_mlp._select_units(site, diff, 8, 2, seed=1)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with caplog.at_level("WARNING", logger="chipmunk_compile"):
        idx = sparse_mlp._select_units(site, diff, 8, 2, seed=1)
    assert idx.shape == (1, 3, 10) and "selection kernel failed" in caplog.text
    assert site.selection_kernel_error.startswith("RuntimeError") and calls[-2:] == [True, False]
    sparse_mlp._select_units(site, diff, 8, 2, seed=2)
    assert calls[-1] is False  # not retried


def test_mlp_budget_fills_the_kernel_tiles_with_random_units():
    """FLUX's 30% + 5% of 12288 units is 4116 units, which the kernels compute as 4352 (17 tiles of 256):
    the 236 padding slots become random units. Small layers keep their configured budget."""
    from chipmunk_compile.kernels.column_sparse_mlp import unit_multiple

    from chipmunk_compile.selection import column_budget
    from chipmunk_compile.sparse_mlp import padded_budget

    assert column_budget(0.3, 0.05, 12288) == (3686, 430)
    assert unit_multiple(False) == 256 and unit_multiple(True) == 128
    assert padded_budget(0.3, 0.05, 12288, 256) == (3686, 666)
    assert padded_budget(0.3, 0.05, 12288, 128) == (3686, 538)  # 4224 = 33 x 128
    assert padded_budget(0.3, 0.05, 256, 256) == column_budget(0.3, 0.05, 256)  # +170 units > 10% of 256
    assert padded_budget(0.3, 0.0, 1000, 256) == column_budget(0.3, 0.0, 1000)
    assert padded_budget(0.5, 0.0, 512, 256) == (256, 0)  # already whole tiles
