"""More user scenarios through real diffusers pipelines (tiny random components, CPU, no text encoders: the prompt
embeddings are given) with the transformer compiled by the chipmunk backend: settings that change between
generations on one compiled transformer, interrupted loops, callbacks that edit the latents, and the QwenImage, LTX,
FLUX Kontext and Wan image-to-video pipelines. Each output is compared with the dense pipeline's from the same
generator; the report says which sites went sparse and how often; the caches must be gone after each loop.

Each test that found a bug of chipmunk_compile says in its docstring what it was (all fixed since)."""

import torch
from test_pipeline import _rel, _tiny_flux_pipeline, _tiny_hunyuan_pipeline
from torch._dynamo.utils import counters

import chipmunk_compile

FLUX_OPTIONS = {"preset": "flux", "mlp.min_tokens": 0}


def _flux_kwargs(**extra):
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                  height=64, width=64, num_inference_steps=8, guidance_scale=3.5, output_type="pt")
    kwargs.update(extra)
    return kwargs


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


def _counts(compiled):
    """{site name: (dense calls, sparse calls, selections)} of the rewritten sites that ran."""
    report = chipmunk_compile.report(compiled)
    return {s.name: (s.dense_calls, s.sparse_calls, s.selections)
            for s in report.sites if s.status == "rewritten" and s.calls}


def _delta(after, before):
    return {name: tuple(a - b for a, b in zip(v, before.get(name, (0, 0, 0)))) for name, v in after.items()}


# The tiny FLUX transformer's sites and what one 8-step generation does at each under the flux preset: the first two
# attention and MLP sites always dense; attention dense at steps 0 and 1 and selected once (step 0), MLP dense at
# step 0 and re-selected every 2nd sparse step (1, 3, 5, 7).
FLUX_ALWAYS_DENSE = ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                     "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.0.proj"]
FLUX_SPARSE_ATTN = ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
FLUX_SPARSE_MLP = ["transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff_context.net.0.proj",
                   "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_mlp"]


def _flux_schedule(n=8):
    """The expected per-site (dense, sparse, selections) of one 8-step FLUX generation whose loop called the
    transformer at steps 0..n-1 (n < 8: an interrupted loop)."""
    expected = dict.fromkeys(FLUX_ALWAYS_DENSE, (n, 0, 0))
    expected.update(dict.fromkeys(FLUX_SPARSE_ATTN, (min(n, 2), max(n - 2, 0), 1)))
    expected.update(dict.fromkeys(FLUX_SPARSE_MLP, (1, n - 1, len(range(1, n, 2)))))
    return expected


def test_flux_settings_change_between_generations_on_one_compiled_transformer():
    """One compiled FLUX transformer, four pipeline calls: 64x64, then 48x80 (another token count, not a multiple of
    the 128-query group), then 64x64 with num_images_per_prompt=2 (batch 2), then the first settings again. Each call
    is its own generation with the full schedule, close to the dense pipeline, with its caches freed; Dynamo compiles
    once per new kind of shape (static, then dynamic sequence, then dynamic batch) and the last call compiles
    nothing."""
    pipe = _tiny_flux_pipeline()
    settings = [dict(height=64, width=64), dict(height=48, width=80),
                dict(height=64, width=64, num_images_per_prompt=2), dict(height=64, width=64)]
    dense = [pipe(**_flux_kwargs(**s), generator=_seed()).images for s in settings]
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options=FLUX_OPTIONS)
    batch_selections = []

    def look_at_the_caches(pipeline, i, t, callback_kwargs):
        if i == 4:
            (state,) = chipmunk_compile.states_of(model)
            for site in state.sites:
                entry = site.cache(0, state.clock.generation)
                if entry is not None and site.kind == "attention":
                    batch_selections.append(entry.indices.clone())
        return {}

    graphs, before = [], {}
    for n, s in enumerate(settings):
        callback = look_at_the_caches if s.get("num_images_per_prompt") else None
        out = pipe(**_flux_kwargs(**s), generator=_seed(), callback_on_step_end=callback).images
        assert out.shape == dense[n].shape, (s, out.shape)
        assert 0 < _rel(out, dense[n]) < 0.01, (s, _rel(out, dense[n]))
        graphs.append(counters["stats"]["unique_graphs"])
        (state,) = chipmunk_compile.states_of(model)
        assert state.clock.generation == n, (s, state.clock.generation)
        assert not any(site.caches for site in state.sites), s
        counts = _counts(pipe.transformer)
        assert _delta(counts, before) == _flux_schedule(), (s, str(chipmunk_compile.report(pipe.transformer)))
        before = counts
    assert out.shape == (1, 3, 64, 64) and dense[2].shape == (2, 3, 64, 64)
    # every graph went through the backend; no recompiles within a generation, none at all for the repeated settings
    assert graphs[0] == 1 and graphs[-1] == graphs[-2] <= 3, graphs
    assert counters["chipmunk"]["graphs"] == graphs[-1], dict(counters["chipmunk"])
    # batch 2: each sample selects its own keys (the two latents differ); 264 tokens -> 3 query groups
    assert len(batch_selections) == 2
    for indices in batch_selections:
        assert indices.shape[:3] == (2, 2, 3), indices.shape
        assert not torch.equal(indices[0], indices[1])


def _stop_at(step):
    def stop(pipeline, i, t, callback_kwargs):
        if i == step:
            pipeline._interrupt = True
        return {}

    return stop


def test_flux_interrupted_generation_then_a_full_one():
    """A callback interrupts the loop after step 3 (the pipeline skips the remaining steps, so the transformer never
    sees its last step); the next call is a new generation with the full schedule, its own selection, and frees every
    cache, the interrupted generation's too."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()
    dense_stopped = pipe(**kwargs, generator=_seed(), callback_on_step_end=_stop_at(3)).images
    dense = pipe(**kwargs, generator=_seed()).images
    assert _rel(dense_stopped, dense) > 0.05  # the interrupt did cut the loop short
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options=FLUX_OPTIONS)

    out = pipe(**kwargs, generator=_seed(), callback_on_step_end=_stop_at(3)).images
    assert 0 < _rel(out, dense_stopped) < 0.01, _rel(out, dense_stopped)
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 0
    first = _counts(pipe.transformer)
    assert first == _flux_schedule(4), str(chipmunk_compile.report(pipe.transformer))
    # README: caches are freed after the last step of a loop the runner sees whole; this one never got there
    assert any(site.caches for site in state.sites)

    out = pipe(**kwargs, generator=_seed()).images
    assert 0 < _rel(out, dense) < 0.01, _rel(out, dense)
    assert state.clock.generation == 1
    assert _delta(_counts(pipe.transformer), first) == _flux_schedule(), str(chipmunk_compile.report(pipe.transformer))
    assert not any(site.caches for site in state.sites)


def test_flux_a_generation_that_ran_only_step_0_then_a_full_one():
    """Two ways a loop can stop right after step 0: a 1-step warm-up call (common before timing a pipeline), and a
    callback that interrupts after step 0. In both, the next call's step 0 has the same loop key (-0) as the last
    call seen; before the keys carried their loop's identity, the step clock took it for a second CFG stream of the
    old step 0 and continued the old generation: the generation count stayed put, the MLP ran dense at steps 0 and
    1, and after an interrupt with other inputs the new loop's step 1 ran sparse on the interrupted loop's caches
    and selection (stream 0)."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()
    gen = torch.Generator().manual_seed(7)
    other = _flux_kwargs(prompt_embeds=3 * torch.randn(1, 8, 32, generator=gen),
                         pooled_prompt_embeds=3 * torch.randn(1, 32, generator=gen))
    dense = pipe(**kwargs, generator=_seed()).images
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options=FLUX_OPTIONS)
    clean = pipe(**kwargs, generator=_seed()).images  # generation 0
    clean_rel = _rel(clean, dense)
    (state,) = chipmunk_compile.states_of(model)
    reports = []

    pipe(**dict(kwargs, num_inference_steps=1), generator=_seed())  # generation 1: a 1-step warm-up
    before = _counts(pipe.transformer)
    out = pipe(**kwargs, generator=_seed()).images  # generation 2
    reports.append(str(chipmunk_compile.report(pipe.transformer)))
    warm_up_generation = state.clock.generation
    warm_up_schedule = _delta(_counts(pipe.transformer), before)
    assert 0 < _rel(out, dense) < 0.01

    pipe(**other, generator=_seed(3), callback_on_step_end=_stop_at(0))  # generation 3: other inputs, stopped
    out = pipe(**kwargs, generator=_seed()).images  # generation 4
    reports.append(str(chipmunk_compile.report(pipe.transformer)))
    assert (warm_up_generation, state.clock.generation) == (2, 4), reports
    assert warm_up_schedule == _flux_schedule(), reports[0]
    # a clean generation's error, not that of a loop that started on another prompt's caches (~3.7x larger)
    assert _rel(out, dense) < 1.5 * clean_rel, (_rel(out, dense), clean_rel)
    assert not any(site.caches for site in state.sites)


def test_flux_callback_that_edits_the_latents_mid_loop():
    """callback_on_step_end returns new latents at two sparse steps (scaled at step 3, partly re-noised at step 5):
    the cached-delta steps follow the edited inputs and stay close to the dense pipeline with the same callback; the
    schedule is the usual one (an edit of the inputs triggers no dense step)."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()

    def edit(pipeline, i, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        if i == 3:
            return {"latents": 0.8 * latents}
        if i == 5:
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))
            return {"latents": 0.8 * latents + 0.2 * noise}
        return {}

    dense_edited = pipe(**kwargs, generator=_seed(), callback_on_step_end=edit).images
    dense = pipe(**kwargs, generator=_seed()).images
    assert _rel(dense_edited, dense) > 0.05  # the edits change the image
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options=FLUX_OPTIONS)
    out = pipe(**kwargs, generator=_seed(), callback_on_step_end=edit).images
    assert 0 < _rel(out, dense_edited) < 0.01, _rel(out, dense_edited)
    assert _rel(out, dense_edited) < _rel(out, dense) / 5  # the edits did apply
    assert _counts(pipe.transformer) == _flux_schedule(), str(chipmunk_compile.report(pipe.transformer))
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 0 and not any(site.caches for site in state.sites)


def _tiny_qwenimage_pipeline():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(0)
    # 64x64 px -> 32x32 latents (VAE factor 2) -> 2x2 patches: 256 image tokens, after the text ([text, image])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)


def _qwenimage_kwargs():
    # true CFG: the conditional call (10 text tokens, 3 of them padding) and the unconditional one (6, 1 padding) per
    # step, with other shapes: two graphs, two streams
    gen = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, 10, 32, generator=gen),
                prompt_embeds_mask=torch.tensor([[1] * 7 + [0] * 3]),
                negative_prompt_embeds=torch.randn(1, 6, 32, generator=gen),
                negative_prompt_embeds_mask=torch.tensor([[1] * 5 + [0]]),
                true_cfg_scale=4.0, height=64, width=64, num_inference_steps=8, output_type="pt")


def _attention_selections(model, step, out):
    """A callback that stores, at ``step``, (stream, indices, counts) of every attention cache of the generation."""

    def look(pipeline, i, t, callback_kwargs):
        if i == step:
            (state,) = chipmunk_compile.states_of(model)
            for site in state.sites:
                for stream in range(2):
                    entry = site.cache(stream, state.clock.generation)
                    if entry is not None and site.kind == "attention":
                        out.append((stream, entry.indices.clone(), entry.counts.clone()))
        return {}

    return look


def _chosen(indices, counts):
    """The sets of keys chosen per (sample, head, query group)."""
    b, h, g = counts.shape
    return [set(indices[i, j, k, : counts[i, j, k]].tolist()) for i in range(b) for j in range(h) for k in range(g)]


def test_qwenimage_pipeline_with_true_cfg_and_prompt_masks():
    """QwenImagePipeline: prompt_embeds + prompt_embeds_mask, and true CFG as a second call per step with a shorter
    negative prompt (other shapes: a second graph, a second stream). The joint attention takes the key-padding mask
    built from the prompt mask: padding text keys are never selected."""
    pipe = _tiny_qwenimage_pipeline()
    kwargs = _qwenimage_kwargs()
    dense = pipe(**kwargs, generator=_seed()).images
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk")  # default preset
    selections = []
    outs = [pipe(**kwargs, generator=_seed(), callback_on_step_end=_attention_selections(model, 4, selections)).images
            for _ in range(2)]
    for out in outs:
        assert out.shape == dense.shape == (1, 3, 64, 64)
        assert 0 < _rel(out, dense) < 0.01, _rel(out, dense)
    report = chipmunk_compile.report(pipe.transformer)
    attn = [s for s in report.by_kind("attention", "rewritten") if s.calls]
    mlp = [s for s in report.by_kind("mlp", "rewritten") if s.calls]
    assert [s.name for s in attn] == [f"transformer_blocks.{i}.attn" for i in range(3)], str(report)
    assert all(s.variant.startswith("masked") for s in attn), str(report)
    assert not report.by_kind("attention", "dense"), str(report)
    # the last block's text MLP computes an output nothing reads (only the image stream leaves the model): never run
    names = {f"transformer_blocks.{i}.{m}_mlp.net.0.proj" for i in range(3) for m in ("img", "txt")}
    assert {s.name for s in mlp} == names - {"transformer_blocks.2.txt_mlp.net.0.proj"}, str(report)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    # 8 steps x 2 calls x 2 generations; attention dense at steps 0 and 1 (selected at 1), MLP dense at step 0
    sparse_attn = [s for s in attn if s.sparse_calls]
    assert [s.name for s in sparse_attn] == ["transformer_blocks.2.attn"], str(report)
    assert (attn[2].dense_calls, attn[2].sparse_calls, attn[2].selections) == (8, 24, 4), str(report)
    sparse_mlp = [s for s in mlp if s.sparse_calls]
    assert len(sparse_mlp) == 3 and all((s.dense_calls, s.sparse_calls, s.selections) == (4, 28, 16)
                                        for s in sparse_mlp), str(report)
    # step 4 of each generation: stream 0 has keys 0..9 as text (7..9 padding), stream 1 keys 0..5 (5 padding)
    assert sorted(stream for stream, _, _ in selections) == [0, 0, 1, 1]
    for stream, indices, counts in selections:
        masked = {7, 8, 9} if stream == 0 else {5}
        assert indices.shape[:3] == (1, 2, 3)
        assert all(chosen and not chosen & masked for chosen in _chosen(indices, counts))
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 1 and not any(site.caches for site in state.sites)


def test_qwenimage_keep_text_keys_keeps_the_unmasked_text_keys():
    """With attention.keep_text_keys, every query group keeps the prompt's unmasked text keys. QwenImage's joint keys
    are cat([text, image]) along the sequence (in (B, S, H, D) layout, before the attention dispatch transposes
    them), as the pass expects; its text stream is projected by add_k_proj after txt_norm/txt_in/txt_mod, so no graph
    input named like encoder/context/text is among the 32 nearest ancestors (add_k_proj's weight, norm_added_k's
    weight and pos_embed.pos_freqs are): the pass now also takes the text stream's projection weights as text."""
    pipe = _tiny_qwenimage_pipeline()
    kwargs = _qwenimage_kwargs()
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk",
                                     options={"attention.keep_text_keys": True})
    selections = []
    pipe(**kwargs, generator=_seed(), callback_on_step_end=_attention_selections(model, 4, selections))
    report = chipmunk_compile.report(pipe.transformer)
    attn = report.by_kind("attention", "rewritten")
    # the text comes first; its length is the stream's prompt length (10 and 6: one graph each, the row shows the last)
    assert attn and all("text[0:" in s.variant for s in attn), str(report)
    assert len(selections) == 2
    for stream, indices, counts in selections:
        text, masked = (set(range(7)), {7, 8, 9}) if stream == 0 else (set(range(5)), {5})
        assert all(text <= chosen and not chosen & masked for chosen in _chosen(indices, counts))


def test_ltx_pipeline_with_cfg_batched_and_prompt_masks():
    """LTXPipeline (LTX-Video): CFG batched into one call (batch 2) with each half's prompt mask; the video
    self-attention goes sparse, the text cross-attention (masked) stays dense, the VAE decodes 9 frames."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                             num_layers=3, caption_channels=32).eval()
    # spatial 4x, temporal 4x: 9 frames of 64x64 px -> 3 x 16 x 16 latents = 768 video tokens
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
                                encoder_causal=True, decoder_causal=False).eval()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=transformer)
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
                  negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  negative_prompt_attention_mask=torch.tensor([[1] * 3 + [0] * 5]),
                  height=64, width=64, num_frames=9, num_inference_steps=8, guidance_scale=3.0, output_type="pt")
    dense = pipe(**kwargs, generator=_seed()).frames
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "default"})
    outs = [pipe(**kwargs, generator=_seed()).frames for _ in range(2)]
    for out in outs:
        assert out.shape == dense.shape == (1, 9, 3, 64, 64)
        assert 0 < _rel(out, dense) < 0.02, _rel(out, dense)
    report = chipmunk_compile.report(pipe.transformer)
    attn, mlp = report.by_kind("attention", "rewritten"), report.by_kind("mlp", "rewritten")
    assert [s.name for s in attn] == [f"transformer_blocks.{i}.attn1" for i in range(3)], str(report)
    assert [s.name for s in mlp] == [f"transformer_blocks.{i}.ff.net.0.proj" for i in range(3)], str(report)
    cross = report.by_kind("attention", "dense")
    assert [s.name for s in cross] == [f"transformer_blocks.{i}.attn2" for i in range(3)], str(report)
    assert all("cross-attention (query length 768, key length 8)" == s.reason for s in cross), str(report)
    (caption,) = [s for s in report.by_kind("mlp", "dense") if s.name.startswith("caption_projection")]
    assert caption.reason.startswith("conditioning projection"), str(report)
    # 8 steps x 2 generations, one batch-2 call per step
    assert (attn[2].dense_calls, attn[2].sparse_calls, attn[2].selections) == (4, 12, 2), str(report)
    assert (mlp[2].dense_calls, mlp[2].sparse_calls, mlp[2].selections) == (2, 14, 8), str(report)
    assert all(s.dense_calls == 16 and not s.sparse_calls for s in attn[:2] + mlp[:2]), str(report)
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 1 and not any(site.caches for site in state.sites)


def test_flux_kontext_pipeline_with_image_tokens_appended():
    """FluxKontextPipeline: the conditioning image is VAE-encoded and its tokens are appended to the latent tokens
    (8 text + 256 latent + 256 image = 520 keys in every joint attention); the transformer's output for the image
    tokens is cut off by the pipeline. Same sites and schedule as plain FLUX."""
    from diffusers import FluxKontextPipeline

    flux = _tiny_flux_pipeline()
    pipe = FluxKontextPipeline(scheduler=flux.scheduler, vae=flux.vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=flux.transformer)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    kwargs = _flux_kwargs(image=image, max_area=64 * 64, _auto_resize=False, guidance_scale=2.5)
    dense = pipe(**kwargs, generator=_seed()).images
    other_image = pipe(**dict(kwargs, image=1 - image), generator=_seed()).images
    assert _rel(other_image, dense) > 1e-4  # the conditioning image reaches the output (weakly, random weights)
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options=FLUX_OPTIONS)
    outs = [pipe(**kwargs, generator=_seed()).images for _ in range(2)]
    for out in outs:
        assert out.shape == dense.shape == (1, 3, 64, 64)
        assert 0 < _rel(out, dense) < 0.01, _rel(out, dense)
    report = chipmunk_compile.report(pipe.transformer)
    attn = report.by_kind("attention", "rewritten")
    assert len(attn) == 4 and all(s.shapes["k"][2] == 520 for s in attn), str(report)
    assert all("text[0:8]" in s.variant for s in attn[:2]), str(report)
    counts = _counts(pipe.transformer)
    assert counts == {name: tuple(2 * c for c in v) for name, v in _flux_schedule().items()}, str(report)
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 1 and not any(site.caches for site in state.sites)


def _tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    # spatial 2x, temporal 2x (its config's scale factors say so: the image-to-video pipeline encodes the image with
    # them): 5 frames of 32x32 px -> 3 x 16 x 16 latents -> patches (1, 2, 2): 192 video tokens
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2,
                            scale_factor_spatial=2).eval()


def test_wan_image_to_video_pipeline_without_image_encoder():
    """WanImageToVideoPipeline as Wan 2.2 A14B runs it: no image encoder (the transformer has no image_dim), the
    first frame is VAE-encoded and joins the latents channel-wise (4 latent + 2 mask + 4 condition channels), CFG as
    two calls. (Wan 2.1's image_embeds cannot replace the image encoder: the pipeline still needs `image` for the VAE
    condition, and check_inputs refuses `image` together with `image_embeds`.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=10, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=4, rope_max_seq_len=32).eval()
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_tiny_wan_vae(), transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler())
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=gen)
    kwargs = dict(image=image, prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  height=32, width=32, num_frames=5, num_inference_steps=8, guidance_scale=5.0, output_type="pt")
    dense = pipe(**kwargs, generator=_seed()).frames
    assert _rel(pipe(**dict(kwargs, image=torch.zeros_like(image)), generator=_seed()).frames, dense) > 0.005
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "wan"})
    outs = [pipe(**kwargs, generator=_seed()).frames for _ in range(2)]
    for out in outs:
        assert out.shape == dense.shape == (1, 5, 3, 32, 32)
        assert 0 < _rel(out, dense) < 0.005, _rel(out, dense)
    report = chipmunk_compile.report(pipe.transformer)
    self_attn, cross = report.by_kind("attention", "rewritten"), report.by_kind("attention", "dense")
    assert [s.name for s in self_attn] == [f"blocks.{i}.attn1" for i in range(4)], str(report)
    assert [s.name for s in cross] == [f"blocks.{i}.attn2" for i in range(4)], str(report)
    assert all(s.reason == "cross-attention (query length 192, key length 8)" for s in cross), str(report)
    # 8 steps x 2 calls x 2 generations; dense at steps 0 and 1
    assert all((s.dense_calls, s.sparse_calls, s.selections) == (8, 24, 4) for s in self_attn[2:]), str(report)
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 1 and not any(site.caches for site in state.sites)


def _tiny_wan21_i2v_pipeline():
    """Wan 2.1 image-to-video: a tiny random CLIP vision encoder gives 17 image tokens (hidden_states[-2]); the
    transformer's attn2 attends to them (add_k_proj/add_v_proj) beside the text. Its processor takes the last 512
    tokens of encoder_hidden_states as the text, so the prompt embeddings have 512 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=10, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=3, rope_max_seq_len=32, image_dim=16, added_kv_proj_dim=32).eval()
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8)).eval()
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_tiny_wan_vae(), transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=encoder,
                                   image_processor=processor)
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(image=torch.rand(1, 3, 32, 32, generator=gen), prompt_embeds=torch.randn(1, 512, 32, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 512, 32, generator=gen),
                  height=32, width=32, num_frames=5, num_inference_steps=8, guidance_scale=5.0, output_type="pt")
    return pipe, kwargs


def test_wan21_image_to_video_pipeline_with_a_tiny_image_encoder():
    """Wan 2.1 image-to-video with its image encoder (tiny, random): both cross-attentions of attn2 (to the 17 image
    tokens and to the 512 text tokens) stay dense, the video self-attention goes sparse."""
    pipe, kwargs = _tiny_wan21_i2v_pipeline()
    dense = pipe(**kwargs, generator=_seed()).frames
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "wan"})
    out = pipe(**kwargs, generator=_seed()).frames
    assert out.shape == dense.shape == (1, 5, 3, 32, 32)
    assert 0 < _rel(out, dense) < 0.005, _rel(out, dense)
    report = chipmunk_compile.report(pipe.transformer)
    self_attn, cross = report.by_kind("attention", "rewritten"), report.by_kind("attention", "dense")
    assert [s.name for s in self_attn] == [f"blocks.{i}.attn1" for i in range(3)], str(report)
    assert sorted((s.name, s.reason) for s in cross) == [
        (f"blocks.{i}.attn2", f"cross-attention (query length 192, key length {n})")
        for i in range(3) for n in (17, 512)
    ], str(report)
    assert (self_attn[2].dense_calls, self_attn[2].sparse_calls) == (4, 12), str(report)
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 0 and not any(site.caches for site in state.sites)


def test_wan21_image_embedder_mlp_stays_dense():
    """With MLP sparsity on (default preset), Wan 2.1's condition_embedder.image_embedder.ff (a GELU MLP over the
    image encoder's tokens, constant over the steps like the text embedder) stays dense as a "conditioning projection":
    its input is layer_norm(encoder_hidden_states_image), not the graph input itself. Rewritten before (the pass
    looked only at an input fed straight into the first linear), it ran first, became MLP ordinal 0 and used one of
    the two mlp.first_dense_layers: blocks.1.ffn went sparse although the config keeps the first two dense."""
    pipe, kwargs = _tiny_wan21_i2v_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "default"})
    pipe(**kwargs, generator=_seed())
    report = chipmunk_compile.report(pipe.transformer)
    rows = {s.name: s for s in report.by_kind("mlp")}
    image_mlp = rows["condition_embedder.image_embedder.ff.net.0.proj"]
    assert image_mlp.status == "dense" and image_mlp.reason.startswith("conditioning projection"), str(report)
    assert rows["blocks.1.ffn.net.0.proj"].sparse_calls == 0, str(report)
    assert rows["blocks.2.ffn.net.0.proj"].sparse_calls > 0, str(report)


def test_hunyuan_video_keep_text_keys_across_resolutions():
    """HunyuanVideo's joint keys are cat([video, text]): the text starts after the video tokens. Three resolutions on
    one compiled transformer: 32x32 (static graph), 48x32 (Dynamo recompiles with a dynamic height) and 64x32 (the
    dynamic graph is reused: video tokens 256, text at [256:264]). The hunyuan preset keeps text keys: every sparse
    site must keep the real ones at each size. With the span passed as ints from the traced sizes, the 64x32 call got
    text_start=192 and forced video keys 192..199 instead (the span is now an aten.sym_size of the video part)."""
    pipe = _tiny_hunyuan_pipeline()
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                  prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]), num_frames=5, num_inference_steps=8,
                  output_type="pt")
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "hunyuan"})
    kept = {}
    for height in (32, 48, 64):
        selections = []
        pipe(**kwargs, height=height, width=32, generator=_seed(),
             callback_on_step_end=_attention_selections(model, 4, selections))
        video = 2 * (height // 4) * (32 // 4)  # 2 latent frames x (height / 4) x 8
        assert len(selections) == 2  # the two single-stream sites (the double-stream ones are always dense)
        kept[height] = all(set(range(video, video + 6)) <= chosen and not chosen & {video + 6, video + 7}
                           for _, indices, counts in selections for chosen in _chosen(indices, counts))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # 64x32 reused the dynamic graph
    assert kept == {32: True, 48: True, 64: True}, kept
