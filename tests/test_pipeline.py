"""Real diffusers pipelines (FLUX, Wan, SD3, HunyuanVideo, CogVideoX with tiny random components) with their
transformer compiled by the chipmunk backend: the user's one-line change, the pipeline's own denoising loop and
VAE decode. No text encoders: the prompt embeddings are given, so encode_prompt is skipped."""

import torch

import chipmunk_compile


def _tiny_flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0).eval()
    # no text encoders: the prompt embeddings are given (encode_prompt is skipped)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _tiny_wan_pipeline():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=3, rope_max_seq_len=32).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler())


def _tiny_hunyuan_pipeline():
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=16, num_layers=2, num_single_layers=2,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 text_embed_dim=32, pooled_projection_dim=32,
                                                 rope_axes_dim=(4, 6, 6)).eval()
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
                                    temporal_compression_ratio=4, mid_block_add_attention=False).eval()
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)


def test_flux_pipeline_with_compiled_transformer():
    pipe = _tiny_flux_pipeline()
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                  height=64, width=64, num_inference_steps=8, guidance_scale=3.5, output_type="pt")
    dense = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk",
                                     options={"preset": "flux", "mlp.min_tokens": 0})
    outs = [pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
    for out in outs:
        assert out.shape == dense.shape == (1, 3, 64, 64)
        rel = float((out - dense).norm() / dense.norm())
        assert 0 < rel < 0.02, rel  # sparse steps ran (not bit-equal) and stayed close to the dense pipeline
    report = chipmunk_compile.report(pipe.transformer)
    attn, mlp = report.by_kind("attention", "rewritten"), report.by_kind("mlp", "rewritten")
    assert len(attn) == 4 and len(mlp) == 6, str(report)
    assert all(s.sparse_calls == 12 for s in attn[2:]), str(report)  # 8 steps x 2 generations, dense at 0 and 1
    # the pipeline's loop is `for i, t in enumerate(timesteps)`: one generation each, caches freed after the last
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 1 and not any(site.caches for site in state.sites)


def test_wan_pipeline_with_cfg_as_two_calls_and_text_as_long_as_the_video():
    """WanPipeline calls the transformer twice per step (conditional, then unconditional): two CFG streams.
    Its tiny video here has 8 tokens, as many as the text: the cross-attention must still stay dense."""
    pipe = _tiny_wan_pipeline()
    transformer = pipe.transformer
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  height=32, width=32, num_frames=5, num_inference_steps=8, guidance_scale=5.0, output_type="pt")
    dense = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "wan"})
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    rel = float((out - dense).norm() / dense.norm())
    assert out.shape == dense.shape and 0 < rel < 0.02, rel
    report = chipmunk_compile.report(pipe.transformer)
    self_attn = report.by_kind("attention", "rewritten")
    cross = [s for s in report.by_kind("attention", "dense") if s.name.endswith("attn2")]
    assert [s.name for s in self_attn] == [f"blocks.{i}.attn1" for i in range(3)], str(report)
    assert len(cross) == 3 and all("encoder_hidden_states only" in s.reason for s in cross), str(report)
    # 8 steps x 2 calls; dense at steps 0 and 1 (wan: first 2 steps, then every 10)
    assert self_attn[2].dense_calls == 4 and self_attn[2].sparse_calls == 12, str(report)
    (state,) = chipmunk_compile.states_of(transformer)
    assert not any(site.caches for site in state.sites)


def _rel(out, ref):
    return float((out - ref).norm() / ref.norm())


def _tiny_sd3_pipeline():
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    # 4 joint blocks (the default preset keeps the first 2 attention and MLP sites dense); the last block is
    # context_pre_only: no text MLP. 32x32 px -> 16x16 latents -> 64 image tokens + 8 text tokens.
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=16).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0).eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def _sd3_kwargs():
    gen = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                negative_pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                height=32, width=32, num_inference_steps=8, guidance_scale=5.0, output_type="pt")


# Skip-layer guidance: at loop indices 1, 2, 3 (0 < i < 8 * 0.5) the pipeline calls the transformer a second time
# in the step, with the conditional half alone (batch 1) and block 2 skipped.
SLG = dict(skip_guidance_layers=[2], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.5)


def test_sd3_pipeline_with_cfg_batched_into_one_call():
    """StableDiffusion3Pipeline batches the unconditional and conditional inputs into one call (batch 2): one
    stream per step, and each sample of the batch selects its own columns."""
    pipe = _tiny_sd3_pipeline()
    kwargs = _sd3_kwargs()
    dense = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk")  # no options: the default preset
    outs = [pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
    for out in outs:
        assert out.shape == dense.shape == (1, 3, 32, 32)
        assert 0 < _rel(out, dense) < 0.02, _rel(out, dense)
    report = chipmunk_compile.report(pipe.transformer)
    attn, mlp = report.by_kind("attention", "rewritten"), report.by_kind("mlp", "rewritten")
    assert [s.name for s in attn] == [f"transformer_blocks.{i}.attn" for i in range(4)], str(report)
    assert not report.by_kind("attention", "dense"), str(report)  # joint attention only: no cross-attention
    # image MLPs in all 4 blocks, text MLPs in the first 3 (the last block is context_pre_only)
    names = [f"transformer_blocks.{i}.{ff}.net.0.proj" for i in range(4) for ff in ("ff", "ff_context")]
    assert [s.name for s in mlp] == names[:-1], str(report)
    dense_mlp = report.by_kind("mlp", "dense")
    assert dense_mlp and all(s.name.startswith("time_text_embed.") and "not a token MLP" in s.reason
                             for s in dense_mlp), str(report)
    # 8 steps x 2 generations, one call per step. First 2 sites of each kind always dense; attention dense at
    # steps 0 and 1 (default preset), MLP at step 0 only.
    assert all(s.dense_calls == 16 and s.sparse_calls == 0 for s in attn[:2] + mlp[:2]), str(report)
    assert all(s.dense_calls == 4 and s.sparse_calls == 12 and s.selections == 2 for s in attn[2:]), str(report)
    assert all(0 < s.kept_fraction < 0.2 for s in attn[2:]), str(report)
    assert all(s.dense_calls == 2 and s.sparse_calls == 14 for s in mlp[2:]), str(report)
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 1 and not any(site.caches for site in state.sites)


def test_sd3_pipeline_with_skip_layer_guidance():
    """A second run with skip-layer guidance: at some steps a third call (batch 1, block 2 skipped, another
    graph) follows the batched CFG call. The output stays close to the dense pipeline's and nothing is kept."""
    pipe = _tiny_sd3_pipeline()
    kwargs = _sd3_kwargs()
    dense = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    dense_slg = pipe(**kwargs, **SLG, generator=torch.Generator().manual_seed(0)).images
    assert _rel(dense_slg, dense) > 0.01  # the guidance changes the image
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "default"})
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert 0 < _rel(out, dense) < 0.02, _rel(out, dense)
    out = pipe(**kwargs, **SLG, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == dense_slg.shape and 0 < _rel(out, dense_slg) < 0.02, _rel(out, dense_slg)
    assert _rel(out, dense_slg) < _rel(out, dense)  # the skip-layer guidance did apply
    report = chipmunk_compile.report(pipe.transformer)
    attn, mlp = report.by_kind("attention", "rewritten"), report.by_kind("mlp", "rewritten")
    assert len(attn) == 4 and len(mlp) == 7, str(report)
    calls = {s.name: s.calls for s in attn + mlp}
    # 8 + 8 batched calls; the 3 skip-layer calls run every block but block 2
    for i in range(4):
        extra = 0 if i == 2 else 3
        assert calls[f"transformer_blocks.{i}.attn"] == 16 + extra, str(report)
        assert calls[f"transformer_blocks.{i}.ff.net.0.proj"] == 16 + extra, str(report)
    assert all(s.sparse_calls > 0 for s in attn[2:] + mlp[2:]), str(report)
    states = chipmunk_compile.states_of(model)
    assert len(states) == 1, states  # both graphs (with and without skip_layers) share the model's state
    assert not any(site.caches for site in states[0].sites)


def test_sd3_skip_layer_guidance_keeps_the_cfg_streams_schedule():
    """One pipeline call is one generation, even where some steps make an extra call with other shapes. Block 2
    is skipped by the skip-layer calls, so only the batched CFG stream runs it: its schedule must be the one
    of a run without skip-layer guidance (attention dense at steps 0 and 1, MLP at step 0, sparse after).
    Before the fix, each change of batch size restarted the generation (7 generations here, most steps dense),
    and the skip-layer stream's caches outlived the loop."""
    pipe = _tiny_sd3_pipeline()
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "default"})
    pipe(**_sd3_kwargs(), **SLG, generator=torch.Generator().manual_seed(0))
    report = chipmunk_compile.report(pipe.transformer)
    rows = {s.name: s for s in report.sites if s.status == "rewritten"}
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 0, f"one pipeline call made {state.clock.generation + 1} generations"
    attn2, mlp2 = rows["transformer_blocks.2.attn"], rows["transformer_blocks.2.ff.net.0.proj"]
    assert (attn2.dense_calls, attn2.sparse_calls) == (2, 6), str(report)
    assert (mlp2.dense_calls, mlp2.sparse_calls) == (1, 7), str(report)
    assert not any(site.caches for site in state.sites)  # the skip-layer stream's caches too


def test_hunyuan_video_pipeline_with_prompt_embeds_and_attention_mask():
    """HunyuanVideoPipeline (hunyuan preset: attention only, text keys always kept, dense at steps 0 and 1 of
    8) with the prompt's attention mask given: its 2 padding text keys are masked in every joint attention."""
    pipe = _tiny_hunyuan_pipeline()  # 5 frames of 32x32 px: 2 x 8 x 8 latents = 128 video tokens (+ 8 text)
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                  prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
                  height=32, width=32, num_frames=5, num_inference_steps=8, output_type="pt")
    dense = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "hunyuan"})
    selections = []

    def look_at_the_caches(pipeline, i, t, callback_kwargs):
        if i == 4:  # a sparse step: the caches of step 1's selection are in use
            (state,) = chipmunk_compile.states_of(model)
            for site in state.sites:
                entry = site.cache(0, state.clock.generation)
                if entry is not None:
                    selections.append((entry.indices.clone(), entry.counts.clone()))
        return {}

    outs = [pipe(**kwargs, generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=look_at_the_caches).frames for _ in range(2)]
    for out in outs:
        assert out.shape == dense.shape == (1, 5, 3, 32, 32)
        assert 0 < _rel(out, dense) < 0.02, _rel(out, dense)
    report = chipmunk_compile.report(pipe.transformer)
    attn = report.by_kind("attention", "rewritten")
    assert [s.name for s in attn] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                                      "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert all("masked" in s.variant and "text[128:136]" in s.variant for s in attn), str(report)
    assert all("(from the sites of the same key length)" in s.variant for s in attn[2:]), str(report)
    (refiner,) = report.by_kind("attention", "dense")  # the text token refiner: a full (B, H, S, S) mask
    assert refiner.name.startswith("context_embedder.token_refiner") and "arbitrary attention mask" in refiner.reason
    assert not report.by_kind("mlp", "rewritten"), str(report)  # the preset leaves the MLPs dense
    token_mlps = [s for s in report.by_kind("mlp", "dense") if "not a token MLP" not in s.reason]
    assert len(token_mlps) == 7 and all(s.reason == "MLP sparsity disabled by config" for s in token_mlps)
    # 8 steps x 2 generations; first 2 sites always dense, the others dense at steps 0 and 1
    assert all(s.dense_calls == 16 and s.sparse_calls == 0 for s in attn[:2]), str(report)
    assert all(s.dense_calls == 4 and s.sparse_calls == 12 and s.selections == 2 for s in attn[2:]), str(report)
    # at step 4 of each generation both single-stream sites had a selection: every query group of every head
    # holds the 6 unmasked text keys (128..133) and never the 2 padding ones
    assert len(selections) == 4
    for indices, counts in selections:
        for h in range(indices.shape[1]):
            for g in range(indices.shape[2]):
                chosen = set(indices[0, h, g, : counts[0, h, g]].tolist())
                assert set(range(128, 134)) <= chosen and not chosen & {134, 135}, sorted(chosen)
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 1 and not any(site.caches for site in state.sites)


def test_cogvideox_pipeline_with_cfg_batched_into_one_call():
    """CogVideoXPipeline with classifier-free guidance (one batch-2 call per step) and its DDIM scheduler, whose
    timesteps are integers: the joint text+video attention and the MLPs go sparse, the VAE decodes 9 frames."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=32, num_layers=4,
                                              sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
                                              max_text_seq_length=8).eval()
    # spatial 4x, temporal 4x: 9 frames of 64x64 px -> 3 x 16 x 16 latents -> 192 video tokens (+ 8 text)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=4,
                                 temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  height=64, width=64, num_frames=9, num_inference_steps=8, guidance_scale=6.0, output_type="pt")
    dense = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    model = pipe.transformer
    pipe.transformer = torch.compile(pipe.transformer, backend="chipmunk", options={"preset": "default"})
    outs = [pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames for _ in range(2)]
    for out in outs:
        assert out.shape == dense.shape == (1, 9, 3, 64, 64)
        assert 0 < _rel(out, dense) < 0.02, _rel(out, dense)
    report = chipmunk_compile.report(pipe.transformer)
    attn, mlp = report.by_kind("attention", "rewritten"), report.by_kind("mlp", "rewritten")
    assert [s.name for s in attn] == [f"transformer_blocks.{i}.attn1" for i in range(4)], str(report)
    assert [s.name for s in mlp] == [f"transformer_blocks.{i}.ff.net.0.proj" for i in range(4)], str(report)
    assert not report.by_kind("attention", "dense"), str(report)
    assert all("not a token MLP" in s.reason for s in report.by_kind("mlp", "dense")), str(report)
    # 8 steps x 2 generations, one call per step
    assert all(s.dense_calls == 16 and s.sparse_calls == 0 for s in attn[:2] + mlp[:2]), str(report)
    assert all(s.dense_calls == 4 and s.sparse_calls == 12 and s.selections == 2 for s in attn[2:]), str(report)
    # MLP: dense at step 0, the selection remade every 2nd sparse step (steps 1, 3, 5, 7)
    assert all(s.dense_calls == 2 and s.sparse_calls == 14 and s.selections == 8 for s in mlp[2:]), str(report)
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 1 and not any(site.caches for site in state.sites)
