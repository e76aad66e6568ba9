"""Tiny random-weight configs of the diffusers 0.42.1 DiTs, with inputs and the sites each really has.

Expected counts (per config below), derived from the model code:
- attention: self/joint SDPA calls that are rewritten; cross: SDPA calls left dense as cross-attention.
- mlp: token MLPs rewritten (timestep/text embedding MLPs have no token dimension and stay dense).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TinyModel:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Tensor], dict[str, Any]]  # timestep -> kwargs
    attention: int
    mlp: int
    cross: int = 0
    fullgraph: bool = True
    extra: dict = field(default_factory=dict)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _flux_inputs(t):
    g = _g(1)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g),
                img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.randn(8, 3, generator=g),
                timestep=t / 1000, guidance=None, return_dict=False)


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                          patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
                                          rope_axes_dim=(4, 6, 6))


def _hunyuan_inputs(t):
    g = _g(2)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=t,
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                encoder_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
                pooled_projections=torch.randn(1, 32, generator=g), guidance=t.new_full((1,), 6000.0),
                return_dict=False)


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
                                 rope_max_seq_len=32)


def _wan_inputs(t):
    g = _g(3)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=t,
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)


def _sd3_inputs(t):
    g = _g(4)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=t, return_dict=False)


def _pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=1, cross_attention_dim=16, sample_size=8, patch_size=2,
                                    caption_channels=32, norm_num_groups=1)


def _pixart_inputs(t):
    g = _g(5)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=32, num_layers=1, sample_width=8,
                                       sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=8)


def _cogvideox_inputs(t):
    g = _g(6)
    return dict(hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=t, return_dict=False)


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=1, caption_channels=32)


def _ltx_inputs(t):
    g = _g(7)
    return dict(hidden_states=torch.randn(1, 32, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=t,
                encoder_attention_mask=torch.ones(1, 8), num_frames=2, height=4, width=4, return_dict=False)


def _mochi():
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                                   pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=4,
                                   max_sequence_length=8)


def _mochi_inputs(t):
    g = _g(8)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=t,
                encoder_attention_mask=torch.tensor([[1] * 6 + [0] * 2]), return_dict=False)


MODELS = {
    "flux": TinyModel("flux", _flux, _flux_inputs, attention=2, mlp=3),
    "hunyuan": TinyModel("hunyuan", _hunyuan, _hunyuan_inputs, attention=2, mlp=4, extra={"masked_dense": 1}),
    "wan": TinyModel("wan", _wan, _wan_inputs, attention=1, mlp=1, cross=1),
    "sd3": TinyModel("sd3", _sd3, _sd3_inputs, attention=1, mlp=1),
    "pixart": TinyModel("pixart", _pixart, _pixart_inputs, attention=1, mlp=1, cross=1),
    "cogvideox": TinyModel("cogvideox", _cogvideox, _cogvideox_inputs, attention=1, mlp=1),
    "ltx": TinyModel("ltx", _ltx, _ltx_inputs, attention=1, mlp=1, cross=1),
    "mochi": TinyModel("mochi", _mochi, _mochi_inputs, attention=0, mlp=1, cross=1, fullgraph=False),
}
