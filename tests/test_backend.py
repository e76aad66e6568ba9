"""The backend as a user meets it: entry point, modes, dynamic shapes, autograd, no recompiles."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import chipmunk_compile
from chipmunk_compile.testing import TinyDiT


def test_entry_point_works_without_importing_the_package(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        import torch.nn as nn, torch.nn.functional as F
        assert "chipmunk_compile" not in sys.modules
        assert "chipmunk" in torch._dynamo.list_backends()
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv, self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(16, 32), nn.Linear(32, 16)
            def forward(self, x, timestep):
                q, k, v = self.qkv(x).view(1, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
                a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 8, 16)
                return self.fc2(F.gelu(self.fc1(x + a)))
        m = Block().eval()
        x, t = torch.randn(1, 8, 16), torch.tensor([500.0])
        with torch.no_grad():
            out = torch.compile(m, backend="chipmunk", fullgraph=True)(x, t)
            torch.testing.assert_close(out, m(x, t), atol=1e-5, rtol=1e-5)
        from torch._dynamo.utils import counters
        print(dict(counters["chipmunk"]))
        """
    )
    path = tmp_path / "user.py"
    path.write_text(script)
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "'attention_rewritten': 1" in res.stdout and "'mlp_rewritten': 1" in res.stdout


def test_grad_enabled_falls_back_to_inductor_and_says_why():
    model = TinyDiT(depth=1, seq=16)
    compiled = torch.compile(model, backend="chipmunk")
    x, t = torch.randn(1, 16, 8), torch.tensor([500.0])
    out = compiled(x, timestep=t)  # grad mode on, parameters require grad
    torch.testing.assert_close(out, model(x, timestep=t), atol=1e-5, rtol=1e-5)
    report = chipmunk_compile.report(compiled)
    assert not report.sites and any("autograd is enabled" in n for n in report.notes), str(report)
    assert "torch.no_grad" in str(report)


def test_reduce_overhead_mode_is_accepted_and_correct():
    model = TinyDiT(depth=2, seq=32).eval()
    compiled = torch.compile(model, backend="chipmunk", mode="reduce-overhead")
    x = torch.randn(1, 32, 8)
    with torch.no_grad():
        for t in (1000.0, 900.0):
            torch.testing.assert_close(compiled(x, timestep=torch.tensor([t])), model(x, timestep=torch.tensor([t])),
                                       atol=1e-5, rtol=1e-5)


def test_mode_inside_options(monkeypatch):
    """torch.compile refuses mode= with options=; options["mode"] carries it (Inductor gets the mode's
    patches), and giving it both ways, or an unknown mode, is a clear error."""
    import torch._inductor.compile_fx as compile_fx_module

    from chipmunk_compile.backend import chipmunk_backend
    from chipmunk_compile.config import ConfigError

    with pytest.raises(RuntimeError, match="Either mode or options"):
        torch.compile(TinyDiT(depth=1, seq=32), backend="chipmunk", mode="reduce-overhead",
                      options={"preset": "flux"})
    seen = []
    real = compile_fx_module.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return real(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    model = TinyDiT(depth=1, seq=32).eval()
    compiled = torch.compile(model, backend="chipmunk", options={"preset": "flux", "mode": "reduce-overhead"})
    x = torch.randn(1, 32, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, timestep=torch.tensor([900.0])),
                                   model(x, timestep=torch.tensor([900.0])), atol=1e-5, rtol=1e-5)
    assert seen and seen[0].get("triton.cudagraphs") is True, seen
    with pytest.raises(ConfigError, match="not both"):
        chipmunk_backend(None, [], mode="reduce-overhead", options={"mode": "default"})
    with pytest.raises(ConfigError, match="unknown torch.compile mode"):
        chipmunk_backend(torch.fx.symbolic_trace(torch.nn.Identity()), [], options={"mode": "fastest"})


def test_dynamic_true_rewrites_with_symbolic_sizes():
    model = TinyDiT(depth=2, seq=64).eval()
    compiled = torch.compile(model, backend="chipmunk", dynamic=True, fullgraph=True)
    with torch.no_grad():
        for s in (48, 40):
            x = torch.randn(1, s, 8)
            torch.testing.assert_close(compiled(x, timestep=torch.tensor([1000.0])),
                                       model(x, timestep=torch.tensor([1000.0])), atol=1e-5, rtol=1e-5)
    report = chipmunk_compile.report(compiled)
    assert len(report.by_kind("attention", "rewritten")) == 2 and len(report.by_kind("mlp", "rewritten")) == 2
    assert len(chipmunk_compile.states_of(model)[0].plans) == 1  # one symbolic graph served both sizes


def test_no_recompile_across_steps_and_generations():
    model = TinyDiT(depth=2, seq=32).eval()
    compiled = torch.compile(model, backend="chipmunk", options={"attention.keep": 0.3})
    x = torch.randn(2, 32, 8)
    with torch.no_grad():
        compiled(x, timestep=torch.tensor(1000.0).expand(2))  # pipelines pass t.expand(B)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                for t in torch.linspace(1000, 0, 12)[1:]:
                    compiled(x, timestep=t.expand(2))
                chipmunk_compile.reset(compiled)


def test_hand_written_gelu_mlp_with_exact_gelu_and_no_bias():
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(16, 64, bias=False)
            self.fc2 = torch.nn.Linear(64, 16, bias=False)

        def forward(self, x, timestep):
            return self.fc2(F.gelu(self.fc1(x)))

    model = Mlp().eval()
    compiled = torch.compile(model, backend="chipmunk",
                             options={"mlp.first_dense_layers": 0, "mlp.first_dense_steps": 1, "mlp.keep": 1.0,
                                      "mlp.random_keep": 0.0})
    x = torch.randn(2, 130, 16)
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):
            torch.testing.assert_close(compiled(x, torch.tensor([t])), model(x, torch.tensor([t])),
                                       atol=1e-5, rtol=1e-5)
    (site,) = chipmunk_compile.report(compiled).by_kind("mlp", "rewritten")
    assert site.variant == "gelu" and site.sparse_calls == 2


def test_report_of_a_module_compiled_with_two_configs_shows_the_latest():
    model = TinyDiT(depth=2, seq=32).eval()
    x, t = torch.randn(1, 32, 8), torch.tensor([900.0])
    with torch.no_grad():
        torch.compile(model, backend="chipmunk", options={"attention.keep": 0.5})(x, timestep=t)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="chipmunk", options={"attention.keep": 0.2})
        compiled(x, timestep=t)
    report = chipmunk_compile.report(compiled)
    assert len(report.by_kind("attention", "rewritten")) == 2, str(report)
    assert any("2 chipmunk configurations" in n for n in report.notes)
    first = chipmunk_compile.ChipmunkConfig().with_overrides({"attention.keep": 0.5})
    assert len(chipmunk_compile.report(compiled, config=first).by_kind("attention", "rewritten")) == 2


class _TanhMlp(torch.nn.Module):
    """One GELU-tanh MLP site, 16 -> 64 -> 16, with biases; forward(x, timestep)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 64)
        self.fc2 = torch.nn.Linear(64, 16)

    def forward(self, x, timestep):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_weights_changed_in_place_mid_generation_drop_the_mlp_caches(layer):
    """A LoRA fused in place (into W1, the site's key, or into W2 alone) must not leave sparse steps mixing
    caches of the old weights with deltas of the new ones: the next call recomputes densely, exactly."""

    torch.manual_seed(0)
    model = _TanhMlp().eval()
    compiled = torch.compile(model, backend="chipmunk",
                             options={"mlp.first_dense_layers": 0, "mlp.first_dense_steps": 1, "mlp.keep": 0.25,
                                      "mlp.random_keep": 0.0, "mlp.block": 64})
    x = torch.randn(1, 128, 16)
    with torch.no_grad():
        compiled(x, torch.tensor([900.0]))  # dense step: caches
        compiled(x + 0.1 * torch.randn_like(x), torch.tensor([800.0]))  # sparse step
        getattr(model, layer).weight.add_(0.05 * torch.randn_like(getattr(model, layer).weight))
        x3 = x + 0.2 * torch.randn_like(x)
        got = compiled(x3, torch.tensor([700.0]))
        want = model(x3, torch.tensor([700.0]))
    (site,) = chipmunk_compile.report(compiled).by_kind("mlp", "rewritten")
    assert site.dense_calls == 2 and site.sparse_calls == 1, (site.dense_calls, site.sparse_calls)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_model_made_under_inference_mode(layer, caplog):
    """Weights created under ``torch.inference_mode`` (a pipeline loaded inside it) keep no version counter:
    the backend used to crash reading it. They run, and a change between generations (here in place, under
    inference mode) is seen at the next generation's first call, which drops the site's caches and derived
    weight copies (the transposed W2 of the GPU path) and recomputes densely and exactly."""

    torch.manual_seed(0)
    with torch.inference_mode():
        model = _TanhMlp().eval()
        assert model.fc1.weight.is_inference()
        compiled = torch.compile(model, backend="chipmunk",
                                 options={"mlp.first_dense_layers": 0, "mlp.first_dense_steps": 1,
                                          "mlp.keep": 0.25, "mlp.random_keep": 0.0, "mlp.block": 64})
        x = torch.randn(1, 128, 16)
        for t in (900.0, 800.0, 700.0):  # generation 1: dense, then sparse steps
            compiled(x + (1000 - t) / 1000 * torch.randn_like(x), torch.tensor([t]))
        getattr(model, layer).weight.add_(0.05 * torch.randn_like(getattr(model, layer).weight))
        with caplog.at_level("INFO", logger="chipmunk_compile"):
            got = compiled(x, torch.tensor([950.0]))  # generation 2 (timestep rose), step 0
        want = model(x, torch.tensor([950.0]))
    assert f"weights ({'key' if layer == 'fc1' else 'w2'}) of mlp site 0 changed" in caplog.text, caplog.text
    (site,) = chipmunk_compile.report(compiled).by_kind("mlp", "rewritten")
    assert site.sparse_calls == 2 and site.dense_calls == 2, (site.dense_calls, site.sparse_calls)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_module_applied_twice_per_forward_gets_two_sites():
    """Weight tying / one MLP module called twice in a forward: each use keeps its own caches. Keyed by the
    weight alone, the second use ran on the first one's caches (error ~ the output's size at sparse steps);
    now the result equals that of a model with two separate, identical modules."""
    import copy

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    class Twice(torch.nn.Module):
        def __init__(self, shared: bool):
            super().__init__()
            self.a = Mlp()
            self.b = self.a if shared else copy.deepcopy(self.a)

        def forward(self, x, y, timestep):
            return self.a(x) + self.b(y)

    opts = {"mlp.first_dense_layers": 0, "mlp.first_dense_steps": 1, "mlp.keep": 0.25, "mlp.random_keep": 0.0,
            "mlp.block": 64}
    torch.manual_seed(0)
    shared = Twice(shared=True).eval()
    separate = Twice(shared=False).eval()
    separate.a.load_state_dict(shared.a.state_dict())
    separate.b.load_state_dict(shared.a.state_dict())
    outs = {}
    for name, model in (("shared", shared), ("separate", separate)):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="chipmunk", options=opts)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(1, 128, 16, generator=gen), 3 * torch.randn(1, 128, 16, generator=gen)
        with torch.no_grad():
            outs[name] = [compiled(x + 0.05 * i * torch.randn(x.shape, generator=gen),
                                   y + 0.05 * i * torch.randn(y.shape, generator=gen), torch.tensor([900.0 - 100 * i]))
                          for i in range(3)]
        rows = chipmunk_compile.report(compiled).by_kind("mlp", "rewritten")
        assert len(rows) == 2 and all(r.dense_calls == 1 and r.sparse_calls == 2 for r in rows), str(rows)
    for got, want in zip(outs["shared"], outs["separate"]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_inductor_compile_pool_is_started_before_the_passes(monkeypatch):
    """Inductor compiles kernels in its subprocess pool only once the pool is ready (in the caller, one by one,
    before): its own backend starts the pool on entry, and ours must too, before its passes and compile_fx."""
    import torch._inductor.async_compile as async_compile


    chipmunk_backend = sys.modules["chipmunk_compile.backend"]  # the package's `backend` is the function
    events = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: events.append("pool"))
    real_passes = chipmunk_backend.run_passes

    def passes(*args, **kwargs):
        events.append("passes")
        return real_passes(*args, **kwargs)

    monkeypatch.setattr(chipmunk_backend, "run_passes", passes)
    torch._dynamo.reset()
    model = TinyDiT(depth=1, seq=16).eval()
    x, t = torch.randn(1, 16, 8), torch.tensor([500.0])
    with torch.no_grad():
        out = torch.compile(model, backend="chipmunk")(x, timestep=t)
        torch.testing.assert_close(out, model(x, timestep=t), atol=1e-5, rtol=1e-5)
    assert events[:2] == ["pool", "passes"], events
    assert chipmunk_compile.report(model).sites, "the graph was not rewritten"
