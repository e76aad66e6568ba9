"""A real diffusers pipeline (FluxPipeline with tiny random components) with its transformer compiled by the
chipmunk backend: the user's one-line change, the pipeline's own denoising loop and VAE decode."""

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
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=3, rope_max_seq_len=32).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler())
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
