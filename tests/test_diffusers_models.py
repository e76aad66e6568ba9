"""Every diffusers DiT we target: the sites it really has are found and rewritten, outputs match eager,
and new timesteps cause no recompile."""

import pytest
import torch
from torch._dynamo.utils import counters

import chipmunk_compile

pytest.importorskip("diffusers")
from diffusers_tiny import MODELS  # noqa: E402  (tests/ is put on sys.path by conftest.py)

OPTIONS = {"attention.first_dense_layers": 0, "mlp.first_dense_layers": 0}
CONFIG = chipmunk_compile.ChipmunkConfig().with_overrides(OPTIONS)


class CountingBackend:
    """The chipmunk backend, counting how many graphs Dynamo hands it."""

    def __init__(self):
        self.inner = chipmunk_compile.backend(CONFIG)
        self.frame_count = 0

    def __call__(self, gm, example_inputs):
        self.frame_count += 1
        return self.inner(gm, example_inputs)


@pytest.mark.parametrize("name", list(MODELS))
def test_sites_found_rewritten_and_exact(name):
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build().eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=spec.fullgraph)
    timesteps = [torch.tensor([900.0]), torch.tensor([700.0]), torch.tensor([500.0])]
    with torch.no_grad():
        ref = model(**spec.inputs(timesteps[0]))[0]
        out = compiled(**spec.inputs(timesteps[0]))[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)  # first step is dense: exact
        frames = backend.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t in timesteps[1:]:
                compiled(**spec.inputs(t))
    assert backend.frame_count == frames
    report = chipmunk_compile.report(compiled)
    attn = report.by_kind("attention", "rewritten")
    mlp = report.by_kind("mlp", "rewritten")
    assert len(attn) == spec.attention, str(report)
    assert len(mlp) == spec.mlp, str(report)
    cross = [s for s in report.by_kind("attention", "dense") if "cross-attention" in s.reason]
    assert len(cross) == spec.cross, str(report)
    assert counters["chipmunk"]["attention_rewritten"] == spec.attention
    for site in report.sites:
        assert site.status == "rewritten" or site.reason, f"dense site without a reason: {site}"
    for site in attn + mlp:
        assert site.calls == 3 and site.sparse_calls >= 1, str(report)
    if name == "hunyuan":
        assert all("masked" in s.variant for s in attn)  # key-padding mask handled, not dropped
        masked = [s for s in report.by_kind("attention", "dense") if "arbitrary attention mask" in s.reason]
        assert len(masked) == spec.extra["masked_dense"]
    if name == "flux":
        assert any("text[0:8]" in s.variant for s in attn)


def test_regional_compilation_keeps_separate_state_per_block():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    spec = MODELS["flux"]
    with torch.no_grad():
        ref = model(**spec.inputs(torch.tensor([900.0])))[0]
        model.compile_repeated_blocks(backend="chipmunk", options=OPTIONS)
        out = model(**spec.inputs(torch.tensor([900.0])))[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        model(**spec.inputs(torch.tensor([800.0])))
    report = chipmunk_compile.report(model)
    attn = report.by_kind("attention", "rewritten")
    names = sorted(s.name for s in attn)
    assert names == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn",
                     "transformer_blocks.0.attn", "transformer_blocks.1.attn"], str(report)
    assert all(s.calls == 2 for s in attn)
    assert len(report.by_kind("mlp", "rewritten")) == 2 * 2 + 2


def test_regional_compilation_follows_the_models_timestep():
    """Blocks get no timestep input: the step comes from the enclosing forward, shared by all blocks."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    spec = MODELS["flux"]
    model.compile_repeated_blocks(backend="chipmunk", options={"attention.first_dense_layers": 1})
    with torch.no_grad():
        for t in (1000.0, 1000.0, 900.0, 900.0, 800.0, 800.0):  # two CFG calls per step
            model(**spec.inputs(torch.tensor([t])))
        out = model(**spec.inputs(torch.tensor([1000.0])))[0]  # rising timestep: new generation, dense
    attn = chipmunk_compile.report(model).by_kind("attention", "rewritten")
    # model-wide ordinals: only the first attention site is "first layers"; the rest go sparse at step 2
    by_name = {s.name: s for s in attn}
    assert by_name["transformer_blocks.0.attn"].sparse_calls == 0
    rest = [s for n, s in by_name.items() if n != "transformer_blocks.0.attn"]
    assert len(rest) == 3 and all(s.sparse_calls == 2 and s.dense_calls == 5 for s in rest), str(by_name)
    torch._dynamo.reset()
    ref = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out, ref(**spec.inputs(torch.tensor([1000.0])))[0], atol=1e-5, rtol=1e-4)


def test_mochi_attention_with_captured_dynamic_output_shapes():
    """Mochi drops padded text tokens with nonzero(): by default a graph break hides its joint attention.
    With capture_dynamic_output_shape_ops the graph is whole and the attention (unbacked length) rewritten."""
    spec = MODELS["mochi"]
    torch.manual_seed(0)
    model = spec.build().eval()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        compiled = torch.compile(model, backend=chipmunk_compile.backend(CONFIG))
        torch.testing.assert_close(compiled(**spec.inputs(torch.tensor([900.0])))[0],
                                   model(**spec.inputs(torch.tensor([900.0])))[0], atol=1e-5, rtol=1e-4)
        for t in (800.0, 700.0):
            compiled(**spec.inputs(torch.tensor([t])))
    attn = chipmunk_compile.report(compiled).by_kind("attention", "rewritten")
    assert len(attn) == 1 and attn[0].sparse_calls == 1


def test_single_stream_blocks_keep_the_text_keys_in_a_whole_model_graph():
    """keep_text_keys (the hunyuan preset): a single-stream block projects the already joined sequence, so its
    graph shows no text span; it takes the span its double-stream blocks showed (same key length), and every
    unmasked text key is in each of its query groups' selections, as in regional compilation."""
    spec = MODELS["hunyuan"]
    model = spec.build().eval()
    compiled = torch.compile(model, backend=chipmunk_compile.backend(
        chipmunk_compile.ChipmunkConfig.from_name("hunyuan").with_overrides({"attention.first_dense_layers": 0})))
    with torch.no_grad():
        for t in (1000.0, 900.0):  # step 0 plain dense, step 1 selects
            compiled(**spec.inputs(torch.tensor([t])))
    rows = {s.name: s for s in chipmunk_compile.report(compiled).by_kind("attention", "rewritten")}
    double, single = rows["transformer_blocks.0.attn"], rows["single_transformer_blocks.0.attn"]
    assert "text[128:136]" in double.variant and "(from" not in double.variant, double.variant
    assert "text[128:136] (from the sites of the same key length)" in single.variant, single.variant
    (state,) = chipmunk_compile.states_of(model)
    for site in state.sites:
        entry = site.cache(0, state.clock.generation) if site.kind == "attention" else None
        if entry is None:
            continue
        idx, counts = entry.indices, entry.counts
        for h in range(idx.shape[1]):
            for g in range(idx.shape[2]):
                chosen = set(idx[0, h, g, : counts[0, h, g]].tolist())
                assert set(range(128, 134)) <= chosen  # the 6 unmasked text keys (2 are padding)


def _flux_steps(early: bool, device: str, dtype: torch.dtype, size: int = 16, heads: int = 2, head_dim: int = 16,
                sparse_ahead: bool = True):
    """Six steps of a tiny FLUX with ``mlp.early_selection`` (and ``mlp.sparse_ahead``) on or off: (outputs,
    report, the chipmunk ops in the order Inductor's generated code calls them)."""
    import re

    from diffusers import FluxTransformer2DModel
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=rope).eval().to(device, dtype)
    config = CONFIG.with_overrides({"mlp.early_selection": early, "mlp.sparse_ahead": sparse_ahead})
    compiled = torch.compile(model, backend=chipmunk_compile.backend(config))
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, size, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g),
                  img_ids=torch.randn(size, 3, generator=g), txt_ids=torch.randn(8, 3, generator=g))
    inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
    outs, order = [], []
    with torch.no_grad():
        for i, t in enumerate((900.0, 800.0, 700.0, 600.0, 500.0, 400.0)):
            timestep = torch.tensor([t / 1000], device=device, dtype=dtype)
            if i == 0:
                out, codes = run_and_get_code(compiled, **inputs, timestep=timestep, return_dict=False)
                order = re.findall(r"torch\.ops\.chipmunk\.(\w+)\.default\(", codes[0])
            else:
                out = compiled(**inputs, timestep=timestep, return_dict=False)
            outs.append(out[0].clone())
    return outs, chipmunk_compile.report(compiled), order


def _check_selection_ahead(device: str, dtype: torch.dtype, **size):
    outs, report, order = _flux_steps(True, device, dtype, **size)
    sel_outs, sel_report, _ = _flux_steps(True, device, dtype, sparse_ahead=False, **size)
    ref, ref_report, ref_order = _flux_steps(False, device, dtype, **size)
    # the single-stream blocks' MLPs (both branches read the block's input) select ahead of their attention
    assert order == ["attention", "mlp", "mlp", "mlp_select", "attention", "mlp", "mlp_select", "attention", "mlp"]
    assert "mlp_select" not in ref_order
    mlp = {s.name: s for s in report.by_kind("mlp", "rewritten")}
    ahead = [s for s in mlp.values() if "selection ahead" in s.variant]
    assert sorted(s.name for s in ahead) == ["single_transformer_blocks.0.proj_mlp",
                                             "single_transformer_blocks.1.proj_mlp"], str(report)
    for s in mlp.values():  # steps 1, 3, 5 select; those ahead made all of them at their mlp_select
        assert s.selections == 3 and s.selections_ahead == (3 if s in ahead else 0), str(report)
    assert "(3 ahead)" in str(report)
    assert not any(s.selections_ahead for s in ref_report.sites)
    # the whole sparse calls of those sites ran ahead too: all five on CPU; on CUDA from the second on (the
    # first call makes the site's W2ᵀ copy)
    for s in mlp.values():
        assert s.sparse_calls == 5 and s.sparse_ahead == ((5 if device == "cpu" else 4) if s in ahead else 0)
    assert "(5 ahead)" in str(report) if device == "cpu" else "(4 ahead)" in str(report)
    sel_mlp = sel_report.by_kind("mlp", "rewritten")
    assert not any(s.sparse_ahead for s in sel_mlp) and sum(s.selections_ahead == 3 for s in sel_mlp) == 2
    # the same selections and kernels on the same inputs (same seeds, reference), so the same outputs
    for a, b, c in zip(outs, sel_outs, ref):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_mlp_selection_ahead_of_the_attention_changes_nothing():
    _check_selection_ahead("cpu", torch.float32)


@pytest.mark.gpu
def test_mlp_selection_ahead_on_a_side_stream_changes_nothing_on_cuda():
    """On CUDA the selection runs on a side stream while the attention runs; the MLP waits for it."""
    _check_selection_ahead("cuda", torch.bfloat16, size=512, heads=4, head_dim=64)


def test_no_selection_ahead_under_cudagraphs():
    """Under CUDA graphs every op call splits the graphs: the pass places no selection ahead."""
    spec = MODELS["flux"]
    for mode, ahead in ((None, 1), ("reduce-overhead", 0)):
        torch._dynamo.reset()
        model = spec.build().eval()
        compiled = torch.compile(model, backend=chipmunk_compile.backend(CONFIG, mode=mode))
        with torch.no_grad():
            compiled(**spec.inputs(torch.tensor([900.0])))
        rewritten = chipmunk_compile.report(compiled).by_kind("mlp", "rewritten")
        assert len(rewritten) == 3 and sum("selection ahead" in s.variant for s in rewritten) == ahead
