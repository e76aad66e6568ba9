"""The ops' Triton branch (taken on CUDA) exercised on CPU under TRITON_INTERPRET=1: same results as the
PyTorch-reference branch, through dense, selection and sparse steps."""

import pytest
import torch

import chipmunk_compile.sparse_attention as sparse_attention
import chipmunk_compile.sparse_mlp as sparse_mlp
from chipmunk_compile import ChipmunkConfig
from chipmunk_compile.state import CallContext, ModelState, StepInfo, activate, deactivate

if torch.cuda.is_available():
    pytest.skip("the GPU job runs the Triton branch for real", allow_module_level=True)

CFG = ChipmunkConfig().with_overrides({
    "attention.first_dense_layers": 0, "attention.first_dense_steps": 1, "attention.query_group": 64,
    "attention.keep": 0.3, "attention.random_keep": 0.0,
    "mlp.first_dense_layers": 0, "mlp.first_dense_steps": 1, "mlp.block": 64, "mlp.keep": 0.3,
    "mlp.random_keep": 0.0,
})


def _run(op, triton: bool, monkeypatch, module, steps):
    if triton:
        monkeypatch.setattr(module, "_use_triton", lambda *a, **k: None)
    else:
        monkeypatch.setattr(module, "_use_triton", lambda *a, **k: "forced reference")
    state = ModelState(CFG)
    outs = []
    for step, args in enumerate(steps):
        token = activate(CallContext(state, StepInfo(0, step, 0)))
        try:
            outs.append(op(*args))
        finally:
            deactivate(token)
    return outs, state


def _triton_matches_reference(op, module, steps, monkeypatch) -> ModelState:
    """Runs ``steps`` through ``op`` on both branches; asserts equal outputs; returns the Triton run's state."""
    ref, _ = _run(op, False, monkeypatch, module, steps)
    got, state = _run(op, True, monkeypatch, module, steps)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return state


def test_attention_triton_branch_matches_reference(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 64) for _ in range(3))
    w = torch.randn(4, 4)
    steps = [(q + 0.05 * i * torch.randn_like(q), k, v, None, w, 1, None, False, 0, 0) for i in range(3)]
    state = _triton_matches_reference(torch.ops.chipmunk.attention.default, sparse_attention, steps, monkeypatch)
    (site,) = state.sites
    assert site.stats.sparse_calls == 2 and site.stats.backend == "triton"


@pytest.mark.parametrize("gated, concat, bsz, bias", [(False, True, 1, False), (True, False, 1, True),
                                                      (False, False, 2, True)])
def test_mlp_triton_branch_matches_reference(monkeypatch, gated, concat, bsz, bias):
    """Dense, selection and sparse steps; one sample takes the dense step's second linear on the transposed
    cache (no row-major activation), two samples the row-major path; with and without a second bias."""
    torch.manual_seed(0)
    f, din, dout = 32, 16, 16
    w1 = torch.randn(f * (2 if gated else 1), din) / 4
    b1 = torch.randn(w1.shape[0]) / 4
    width = f + (16 if concat else 0)
    w2, off = torch.randn(dout, width) / 4, (16 if concat else 0)
    b2 = torch.randn(dout) / 4 if bias else None
    x = torch.randn(bsz, 70, din)
    steps = [(x + 0.1 * i * torch.randn_like(x), w1, b1, w2, b2, 3, "gelu_tanh", gated, off, f) for i in range(4)]
    state = _triton_matches_reference(torch.ops.chipmunk.mlp.default, sparse_mlp, steps, monkeypatch)
    (site,) = state.sites
    assert site.stats.sparse_calls == 3 and site.weight_copies["w2t"].shape == (f, dout)


@pytest.mark.parametrize("triton", [False, True])
def test_selection_in_head_chunks_matches_whole(monkeypatch, triton):
    """A selection step over a few heads at a time (large column sums) gives the same output and keys."""
    torch.manual_seed(0)
    cfg = CFG.with_overrides({"attention.keep_text_keys": True, "attention.query_group": 64})
    b, h, hkv, s, d = 2, 4, 2, 150, 64
    q = torch.randn(b, s, h, d).permute(0, 2, 1, 3)  # BHSD views of BSHD, as in the models
    k, v = (torch.randn(b, s, hkv, d).permute(0, 2, 1, 3) for _ in range(2))
    key_bias = torch.zeros(b, h, s)
    key_bias[1, :, 140:] = float("-inf")  # padding of the second sample
    ctx = CallContext(ModelState(cfg), StepInfo(0, 0, 0))
    kw = dict(scale=d**-0.5, key_bias=key_bias, triton=triton, text_start=130, text_len=20)
    whole = sparse_attention._dense_and_select(ctx, q, k, v, **kw)
    monkeypatch.setattr(sparse_attention, "COLSUM_BYTES", 1)  # one kv head (two query heads) per chunk
    chunked = sparse_attention._dense_and_select(ctx, q, k, v, **kw)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-5, rtol=1e-5)
    assert chunked[0].permute(0, 2, 1, 3).is_contiguous()
    assert torch.equal(chunked[1], whole[1]) and torch.equal(chunked[2], whole[2])
    idx, counts = chunked[1][1], chunked[2][1]
    used = torch.arange(idx.shape[-1]) < counts.unsqueeze(-1)
    assert (idx[used] < 140).all()  # masked keys are never chosen
    forced = torch.stack([(idx == t) & used for t in range(130, 140)], -1).any(-2)
    assert forced.all()  # every valid text key is kept by every group


def _failing_after(calls_ok: int, real):
    """``real`` for the first ``calls_ok`` calls, then a Triton-style compile failure."""
    count = [0]

    def fn(*args, **kwargs):
        count[0] += 1
        if count[0] > calls_ok:
            if "act_cache" in real.__code__.co_varnames:  # half-update the MLP caches first, as a launch might
                args[5].add_(1.0)
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return real(*args, **kwargs)

    return fn


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_failing_kernel_falls_back_to_pytorch_with_a_reason(monkeypatch, caplog, kind):
    """A Triton kernel that fails mid-loop (e.g. out of shared memory on some card) is logged and the site runs
    its PyTorch path from then on. Attention: every output equals the all-PyTorch run. MLP: the failed launch
    may have half-updated the caches, so that call recomputes densely (exact) and re-caches."""
    torch.manual_seed(0)
    if kind == "attention":
        q, k, v = (torch.randn(1, 2, 70, 64) for _ in range(3))
        w = torch.randn(4, 4)
        steps = [(q + 0.05 * i * torch.randn_like(q), k, v, None, w, 1, None, False, 0, 0) for i in range(4)]
        op, module = torch.ops.chipmunk.attention.default, sparse_attention
        target, name = sparse_attention.csa_kernels, "column_sparse_attention"
    else:
        w1, b1, w2 = torch.randn(32, 16) / 4, torch.randn(32) / 4, torch.randn(16, 32) / 4
        x = torch.randn(1, 70, 16)
        steps = [(x + 0.1 * i * torch.randn_like(x), w1, b1, w2, None, 3, "gelu_tanh", False, 0, 32)
                 for i in range(4)]
        op, module = torch.ops.chipmunk.mlp.default, sparse_mlp
        target, name = sparse_mlp.mlp_kernels, "column_sparse_mlp_delta"
    ref, _ = _run(op, False, monkeypatch, module, steps)
    monkeypatch.setattr(target, name, _failing_after(1, getattr(target, name)))
    with caplog.at_level("WARNING", logger="chipmunk_compile"):
        got, state = _run(op, True, monkeypatch, module, steps)
    (site,) = state.sites
    if kind == "attention":
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    else:  # steps: 0 dense, 1 sparse (kernel ok), 2 kernel fails -> dense, 3 sparse on PyTorch
        torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-4)
        xs, w1, b1, w2 = steps[2][0], steps[2][1], steps[2][2], steps[2][3]
        exact = torch.nn.functional.linear(torch.nn.functional.gelu(xs @ w1.t() + b1, approximate="tanh"), w2)
        torch.testing.assert_close(got[2], exact, atol=1e-5, rtol=1e-5)
        assert site.stats.dense_calls == 2 and site.stats.sparse_calls == 2
    assert "pytorch (Triton kernel failed: RuntimeError: out of resource" in site.stats.backend
    assert sum("runs the PyTorch path" in r.getMessage() for r in caplog.records) == 1


def test_failing_dense_step_kernel_falls_back_with_a_log(monkeypatch, caplog):
    """The dense-step MLP kernel (activation + transposed cache + block means) failing is logged once and the
    site fills its caches with PyTorch from then on: outputs equal the all-PyTorch run."""
    torch.manual_seed(0)
    w1, b1, w2 = torch.randn(32, 16) / 4, torch.randn(32) / 4, torch.randn(16, 32) / 4
    x = torch.randn(1, 70, 16)
    steps = [(x + 0.1 * i * torch.randn_like(x), w1, b1, w2, None, 3, "gelu_tanh", False, 0, 32) for i in range(3)]
    op = torch.ops.chipmunk.mlp.default
    ref, _ = _run(op, False, monkeypatch, sparse_mlp, steps)

    def boom(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(sparse_mlp.dense_kernels, "dense_activation_cache", boom)
    with caplog.at_level("WARNING", logger="chipmunk_compile"):
        got, state = _run(op, True, monkeypatch, sparse_mlp, steps)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    (site,) = state.sites
    assert site.dense_kernel_error == "RuntimeError: out of resource: shared memory"
    assert "[dense step: pytorch after a kernel failure]" in site.stats.backend
    assert sum("dense-step MLP kernel failed" in r.getMessage() for r in caplog.records) == 1


def _mlp_steps(monkeypatch, ahead: bool, steps: int = 5):
    """``steps`` calls of one MLP site (PyTorch branch), each preceded by its ``mlp_select`` when ``ahead``."""
    torch.manual_seed(0)
    w1, b1, w2 = torch.randn(32, 16) / 4, torch.randn(32) / 4, torch.randn(16, 32) / 4
    x0 = torch.randn(1, 70, 16)
    xs = [x0 + 0.1 * i * torch.randn_like(x0) for i in range(steps)]

    def op(x, *rest):
        if ahead:
            torch.ops.chipmunk.mlp_select(x, w1, b1, False)
        return torch.ops.chipmunk.mlp(x, *rest)

    outs, state = _run(op, False, monkeypatch, sparse_mlp,
                       [(x, w1, b1, w2, None, 3, "gelu_tanh", False, 0, 32) for x in xs])
    return outs, state, xs, (w1, b1, w2)


def test_sparse_call_ahead_matches_in_place(monkeypatch):
    """mlp_select runs the whole sparse call (selection and update) ahead; the mlp call returns its output:
    equal to the calls made in place."""
    got, state, _, _ = _mlp_steps(monkeypatch, True)
    ref, _, _, _ = _mlp_steps(monkeypatch, False)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    (site,) = state.sites
    assert site.stats.sparse_calls == 4 and site.stats.sparse_ahead == 4 and site.stats.selections_ahead == 2


def test_sparse_call_ahead_failing_stops_running_ahead(monkeypatch, caplog):
    """A failure of the work run ahead is logged once, drops the caches it may have half-updated (that call
    runs densely, exact) and stops running ahead at the site; later calls run sparse in place."""
    real = sparse_mlp._sparse_update
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the call run ahead at step 2
            raise RuntimeError("out of resource: shared memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_mlp, "_sparse_update", flaky)
    with caplog.at_level("WARNING", logger="chipmunk_compile"):
        got, state, xs, (w1, b1, w2) = _mlp_steps(monkeypatch, True)
    (site,) = state.sites
    assert site.ahead_error == "RuntimeError: out of resource: shared memory"
    assert sum("failed running ahead" in r.getMessage() for r in caplog.records) == 1
    exact = torch.nn.functional.linear(torch.nn.functional.gelu(xs[2] @ w1.t() + b1, approximate="tanh"), w2)
    torch.testing.assert_close(got[2], exact, atol=1e-5, rtol=1e-5)
    # step 0 dense, 1 sparse ahead, 2 dense (caches remade), 3 and 4 sparse in place
    assert (site.stats.dense_calls, site.stats.sparse_calls, site.stats.sparse_ahead) == (2, 3, 1)


def test_sparse_call_ahead_whose_call_never_came_drops_the_caches(monkeypatch):
    """A sparse call run ahead whose mlp call never came (an exception in between) moved the caches on by one
    call: the next mlp_select drops them, so the next call remakes them densely (exact), not sparse on top."""
    torch.manual_seed(0)
    w1, b1, w2 = torch.randn(32, 16) / 4, torch.randn(32) / 4, torch.randn(16, 32) / 4
    xs = [torch.randn(1, 70, 16) for _ in range(4)]
    monkeypatch.setattr(sparse_mlp, "_use_triton", lambda *a, **k: "forced reference")
    state = ModelState(CFG)
    args = (w1, b1, w2, None, 3, "gelu_tanh", False, 0, 32)
    outs = {}
    for step, x in enumerate(xs):
        token = activate(CallContext(state, StepInfo(0, step, 0)))
        try:
            torch.ops.chipmunk.mlp_select(x, w1, b1, False)
            if step != 1:  # step 1's call never comes
                outs[step] = torch.ops.chipmunk.mlp(x, *args)
        finally:
            deactivate(token)
    (site,) = state.sites
    exact = torch.nn.functional.linear(torch.nn.functional.gelu(xs[2] @ w1.t() + b1, approximate="tanh"), w2)
    torch.testing.assert_close(outs[2], exact, atol=1e-5, rtol=1e-5)  # step 2 remade the caches densely
    assert (site.stats.dense_calls, site.stats.sparse_calls, site.stats.sparse_ahead) == (2, 1, 1)
