"""Train a reference DiT with rectified flow on the procedural shapes data, for a wall-clock budget.

    python -m bench.reference_dit.train --variant image --minutes 3.5 --out bench/reference_dit/checkpoints

Objective: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0 from
(x_t, t * 1000, class); t ~ logit-normal(0, 1); the class is replaced by the null class with
probability ``class_dropout`` so classifier-free guidance works. AdamW, linear warm-up then cosine
decay over the *time* budget, bf16 autocast on CUDA, EMA of the weights.

Writes to ``--out``: ``<variant>.safetensors`` (EMA weights, fp16, the config in the metadata),
``<variant>.json`` (config, settings, steps, losses, card, versions, date) and ``<variant>.png``
(a grid of 50-step Euler samples). The checkpoint and JSON are rewritten every ``--ckpt-every-s``
seconds so a killed run still leaves one. This module must not import diffusers (the GPU machine
has none): it carries its own Euler loop, numerically the same as
``FlowMatchEulerDiscreteScheduler(shift=1.0)`` (checked in tests/test_reference_dit.py).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .data import make_batch, to_grid
from .model import DiT, DiTConfig, count_params

DEFAULT_BATCH = {"image": 128, "video": 64}


def tiny_overrides(variant: str) -> dict:
    """A debug-sized model (same data and token count) for CPU smoke runs."""
    axes = (16, 16) if variant == "image" else (8, 12, 12)
    return {"dim": 64, "depth": 2, "num_heads": 2, "rope_axes_dim": axes}


def flow_sigmas(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigma schedule of FlowMatchEulerDiscreteScheduler(shift=1): linspace(1, 1/T, n) then 0. (n + 1,)"""
    s = torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps, dtype=torch.float64)
    return torch.cat([s, s.new_zeros(1)]).float()


@torch.no_grad()
def euler_sample(
    model,
    cfg: DiTConfig,
    class_labels: torch.Tensor,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Diffusers-free Euler sampler. class_labels (B,) -> samples (B, *cfg.sample_shape) float32.

    The initial noise is drawn on the CPU from ``seed`` so it is the same on every device.
    """
    b = class_labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, *cfg.sample_shape), generator=g).to(device)
    labels = class_labels.to(device)
    null = torch.full_like(labels, cfg.null_class)
    sigmas = flow_sigmas(num_steps)
    use_cfg = guidance_scale != 1.0
    for i in range(num_steps):
        t = torch.full((b,), float(sigmas[i]) * 1000.0, device=device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if use_cfg:
                v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float()
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                v = model(x, t, labels).float()
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    return x


def save_png(grid: torch.Tensor, path: Path, scale: int = 1) -> None:
    """grid (H, W, 3) uint8 -> PNG (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    img = Image.fromarray(grid.numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(ema: DiT, cfg: DiTConfig, meta: dict, out: Path) -> None:
    """Write ``<name>.safetensors`` (fp16 EMA weights) and ``<name>.json`` atomically."""
    tensors = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in ema.state_dict().items()}
    st_meta = {"config": json.dumps(cfg.to_dict())}
    _atomic_write(out / f"{cfg.name}.safetensors", lambda p: save_file(tensors, str(p), metadata=st_meta))
    # One line for the loss curve, indented JSON for the rest.
    text = json.dumps({**meta, "loss_curve": "@curve@"}, indent=1)
    text = text.replace('"@curve@"', json.dumps(meta.get("loss_curve", [])))
    _atomic_write(out / f"{cfg.name}.json", lambda p: p.write_text(text + "\n"))


def rf_loss(model, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow velocity MSE. x0/noise (B, *sample), y (B,), t (B,) in (0, 1)."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    xt = (1 - tb) * x0 + tb * noise
    v = model(xt, t * 1000.0, y)
    return F.mse_loss(v.float(), noise - x0)


@torch.no_grad()
def eval_loss(model, variant: str, batch: int, batches: int, device, autocast_dtype) -> float:
    """Loss on a fixed validation set (seed 10_000) with t on an even grid: comparable across runs."""
    g = torch.Generator(device=device).manual_seed(10_000)
    total = 0.0
    for _ in range(batches):
        x0, y = make_batch(variant, batch, g)
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = (torch.arange(batch, device=device) + 0.5) / batch
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            total += rf_loss(model, x0, y, t, noise).item()
    return total / batches


def sample_grid(ema: DiT, cfg: DiTConfig, device, autocast_dtype, out: Path, guidance: float) -> str:
    """Save ``<name>.png``: image -> 3 rows x 12 classes; video -> 8 clips (rows) x frames."""
    if cfg.name == "video":
        labels, nrow = torch.tensor([0, 3, 6, 9, 1, 5, 8, 11]), cfg.input_size[0]
    else:
        labels, nrow = torch.arange(3 * cfg.num_classes) % cfg.num_classes, cfg.num_classes
    x = euler_sample(ema, cfg, labels, 50, guidance, seed=0, device=device, autocast_dtype=autocast_dtype)
    path = out / f"{cfg.name}.png"
    save_png(to_grid(x, nrow), path, scale=2 if cfg.name == "video" else 1)
    return path.name


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["image", "video"], required=True)
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget for setup + training")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoints")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every-s", type=float, default=60.0)
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale for the PNG grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="regional torch.compile (auto: CUDA)"
    )
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--tiny", action="store_true", help="debug-sized model for CPU smoke runs")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    deadline = t_start + 60.0 * args.minutes
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    amp = torch.bfloat16 if is_cuda else None
    if is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    batch = args.batch_size or DEFAULT_BATCH[args.variant]

    torch.manual_seed(args.seed)
    cfg = DiTConfig.from_name(args.variant, **(tiny_overrides(args.variant) if args.tiny else {}))
    model = DiT(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay, fused=is_cuda)
    compiled = args.compile == "on" or (args.compile == "auto" and is_cuda)
    if compiled:
        for blk in model.blocks:
            blk.compile()  # regional: the six identical blocks share one compiled graph

    card = torch.cuda.get_device_name(device) if is_cuda else "cpu"
    meta = {
        "variant": args.variant,
        "config": cfg.to_dict(),
        "params": count_params(model),
        "training": {
            "objective": "rectified flow, x_t=(1-t)x0+t*noise, target noise-x0, timestep=t*1000",
            "timestep_sampling": "logit-normal(0, 1)",
            "batch_size": batch,
            "optimizer": "AdamW",
            "lr": args.lr,
            "betas": [0.9, 0.99],
            "weight_decay": args.weight_decay,
            "grad_clip": 1.0,
            "schedule": f"linear warm-up {args.warmup_steps} steps, cosine to 0.1x over the time budget",
            "ema_decay": args.ema_decay,
            "class_dropout": args.class_dropout,
            "autocast": str(amp) if amp else None,
            "compiled_blocks": compiled,
            "budget_minutes": args.minutes,
            "seed": args.seed,
            "tiny": args.tiny,
        },
        "card": card,
        "torch_version": torch.__version__,
    }

    g = torch.Generator(device=device).manual_seed(args.seed)
    curve: list[list[float]] = []
    loss_acc = torch.zeros((), device=device)
    step = 0
    t_train0 = time.perf_counter()
    last_ckpt = t_train0

    def lr_at(step: int, now: float) -> float:
        warm = min(1.0, (step + 1) / args.warmup_steps)
        frac = min(1.0, (now - t_train0) / max(deadline - t_train0, 1e-6))
        return args.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))

    def write(complete: bool) -> None:
        meta.update(
            steps=step,
            samples_seen=step * batch,
            elapsed_s=round(time.perf_counter() - t_start, 1),
            final_loss=curve[-1][2] if curve else None,
            loss_curve_every=args.log_every,
            loss_curve=curve,
            complete=complete,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        save_checkpoint(ema, cfg, meta, args.out)

    def train_step() -> torch.Tensor:
        x0, y = make_batch(args.variant, batch, g)
        drop = torch.rand(batch, generator=g, device=device) < args.class_dropout
        y = torch.where(drop, torch.full_like(y, cfg.null_class), y)
        t = torch.sigmoid(torch.randn(batch, generator=g, device=device))
        noise = torch.randn(x0.shape, generator=g, device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = rf_loss(model, x0, y, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, now)
        if step == 0 and compiled:
            try:
                loss = train_step()
            except Exception as e:  # a compile failure must not cost the GPU run: fall back to eager
                print(f"compile failed ({type(e).__name__}: {e}); training eagerly", flush=True)
                for blk in model.blocks:
                    blk._compiled_call_impl = None
                opt.zero_grad(set_to_none=True)
                meta["training"]["compiled_blocks"] = compiled = False
                loss = train_step()
            print(f"first step done at {time.perf_counter() - t_start:.1f}s", flush=True)
        else:
            loss = train_step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        loss_acc += loss
        step += 1
        if step % args.log_every == 0:
            mean = loss_acc.item() / args.log_every
            loss_acc.zero_()
            el = time.perf_counter() - t_start
            curve.append([step, round(el, 1), round(mean, 5)])
            print(f"step {step} t={el:.0f}s loss={mean:.4f} lr={opt.param_groups[0]['lr']:.2e}", flush=True)
            if time.perf_counter() - last_ckpt >= args.ckpt_every_s:
                write(complete=False)
                last_ckpt = time.perf_counter()

    if is_cuda:
        torch.cuda.synchronize()
    meta["train_seconds"] = round(time.perf_counter() - t_train0, 1)
    meta["eval_loss_ema"] = round(eval_loss(ema, args.variant, batch, 2, device, amp), 5)
    write(complete=True)
    print(f"{args.variant}: {step} steps, final loss {meta['final_loss']}, eval (EMA) {meta['eval_loss_ema']}")
    if not args.no_png:
        t0 = time.perf_counter()
        meta["sample_png"] = sample_grid(ema, cfg, device, amp, args.out, args.guidance)
        meta["sample_png_guidance"] = args.guidance
        write(complete=True)
        print(f"sample grid in {time.perf_counter() - t0:.1f}s", flush=True)
    return meta


if __name__ == "__main__":
    main()
