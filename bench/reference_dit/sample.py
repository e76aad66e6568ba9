"""Load a trained reference DiT and sample it with diffusers' FlowMatchEulerDiscreteScheduler.

    model = load("image", "cuda", torch.bfloat16)
    x = sample(model, model.config, torch.arange(12), guidance_scale=3.0, device="cuda")
    x = sample(torch.compile(model, backend="chipmunk"), model.config, torch.arange(12), device="cuda")

``sample`` takes any callable ``model(x, timestep, class_labels)``, so one loop runs an eager model
and a compiled one on identical noise (drawn on the CPU from ``seed``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from .model import DiT, DiTConfig

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


def checkpoint_path(variant: str, checkpoint_dir: str | Path = CHECKPOINT_DIR) -> Path:
    return Path(checkpoint_dir) / f"{variant}.safetensors"


def load(
    variant: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint_dir: str | Path = CHECKPOINT_DIR,
) -> DiT:
    """Build the DiT from the config stored in the checkpoint and load its (EMA) weights, in eval mode."""
    path = checkpoint_path(variant, checkpoint_dir)
    with safe_open(str(path), framework="pt") as f:
        cfg = DiTConfig.from_dict(json.loads(f.metadata()["config"]))
    model = DiT(cfg)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def sample(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    config: DiTConfig,
    class_labels: torch.Tensor,
    *,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cfg_batched: bool = True,
) -> torch.Tensor:
    """Euler-sample rectified flow from noise (sigma = 1) to data (sigma = 0).

    class_labels: (B,) int64 in [0, num_classes). With ``guidance_scale != 1`` classifier-free
    guidance runs the null class too: in one call on a (2B, ...) batch ([cond; uncond]) when
    ``cfg_batched``, else as two calls per step (cond first). The model gets x in ``dtype`` and
    timestep (B,) or (2B,) float32 in [1, 1000].
    Returns (B, *config.sample_shape) float32.
    """
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(num_steps, device=device)
    b = class_labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, *config.sample_shape), generator=g).to(device)
    labels = class_labels.to(device)
    null = torch.full_like(labels, config.null_class)

    def velocity(xin: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(xin.to(dtype), t, y).float()

    for t in scheduler.timesteps:
        tb = t.float().expand(b).to(device)
        if guidance_scale == 1.0:
            v = velocity(x, tb, labels)
        else:
            if cfg_batched:
                v_cond, v_uncond = velocity(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([labels, null])).chunk(2)
            else:
                v_cond, v_uncond = velocity(x, tb, labels), velocity(x, tb, null)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x.float()
