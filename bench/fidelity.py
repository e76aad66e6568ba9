"""Fidelity harness: a real diffusers denoising loop, dense vs chipmunk with the same seed.

    python bench/fidelity.py --model flux --preset flux            # CPU, small random-weight config
    python bench/fidelity.py --model hunyuan --preset hunyuan --cfg

Per run it prints and appends to ``bench/results/fidelity_<date>.csv``: final-output PSNR and relative L2
vs the dense model, attention/MLP FLOPs of the chipmunk loop relative to dense (counted by our ops'
registered FLOP formulas), the measured kept fractions, and per-site error over steps
(``bench/results/fidelity_sites_<date>.csv``, from ``check_error`` mode).

Random weights say little about quality (their attention is diffuse); the trained reference DiT
(``bench/quality.py``) is the quality yardstick. This harness checks the mechanics on real model classes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from _harness import RUN_COLUMNS, append_csv, git_sha, run_fields  # noqa: E402  (bench/ is the script's directory)

import chipmunk_compile
from chipmunk_compile.runner import FLOP_COUNTER, FlopTally
from chipmunk_compile.testing import psnr, relative_l2

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class FidelityConfig:
    model: str = "flux"  # flux | hunyuan
    size: str = "small"  # tiny (tests) | small (CPU bench)
    preset: str = "flux"
    steps: int = 50
    cfg: bool = False  # two calls per step (cond / uncond), as true-CFG pipelines do
    seed: int = 0
    overrides: tuple[tuple[str, object], ...] = ()


@dataclass
class FidelityResult:
    config: FidelityConfig
    psnr_db: float
    rel_l2: float
    attention_flops_frac: float
    mlp_flops_frac: float
    attention_kept: float | None
    mlp_kept: float | None
    sites: int
    sparse_calls: int
    site_errors: list[tuple[str, int, float]] = field(default_factory=list)


def _flux(size: str):
    from diffusers import FluxTransformer2DModel

    layers, single, heads, hw, txt = (1, 1, 2, 4, 8) if size == "tiny" else (2, 4, 4, 16, 32)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single,
                                   attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    g = torch.Generator().manual_seed(1)
    n = hw * hw
    ids = torch.stack(torch.meshgrid(torch.arange(hw), torch.arange(hw), indexing="ij"), -1).reshape(n, 2)
    cond = dict(pooled_projections=torch.randn(1, 32, generator=g),
                img_ids=torch.cat([torch.zeros(n, 1), ids.float()], 1), txt_ids=torch.zeros(txt, 3),
                guidance=None, return_dict=False)
    prompts = [torch.randn(1, txt, 32, generator=g), torch.randn(1, txt, 32, generator=g)]

    def call(m, latents, t, prompt):
        return m(hidden_states=latents, timestep=(t / 1000).expand(1), encoder_hidden_states=prompt, **cond)[0]

    return model, (1, n, 16), prompts, call


def _hunyuan(size: str):
    from diffusers import HunyuanVideoTransformer3DModel

    layers, single, heads, f, hw, txt = (1, 1, 2, 2, 4, 8) if size == "tiny" else (2, 4, 4, 4, 8, 16)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                           attention_head_dim=16, num_layers=layers, num_single_layers=single,
                                           num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=32,
                                           pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(1, txt, dtype=torch.long)
    mask[:, -txt // 4 :] = 0  # padded prompt tokens: the joint attention gets a key-padding mask
    cond = dict(encoder_attention_mask=mask, pooled_projections=torch.randn(1, 32, generator=g), return_dict=False)
    prompts = [torch.randn(1, txt, 32, generator=g), torch.randn(1, txt, 32, generator=g)]

    def call(m, latents, t, prompt):
        return m(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=prompt,
                 guidance=torch.tensor([6000.0]), **cond)[0]

    return model, (1, 4, f, hw, hw), prompts, call


BUILDERS = {"flux": _flux, "hunyuan": _hunyuan}


def _denoise(model, call, shape, prompts, cfg: bool, steps: int, seed: int, counter=None) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    token = FLOP_COUNTER.set(counter) if counter is not None else None
    try:
        with torch.no_grad():
            for t in sched.timesteps:
                v = call(model, latents, t, prompts[0])
                if cfg:
                    v_uncond = call(model, latents, t, prompts[1])
                    v = v_uncond + 3.0 * (v - v_uncond)
                latents = sched.step(v, t, latents).prev_sample
    finally:
        if token is not None:
            FLOP_COUNTER.reset(token)
    return latents


def run_fidelity(config: FidelityConfig) -> FidelityResult:
    """Dense eager loop vs the chipmunk-compiled loop from the same noise."""
    torch.manual_seed(config.seed)
    model, shape, prompts, call = BUILDERS[config.model](config.size)
    model = model.eval()
    ref = _denoise(model, call, shape, prompts, config.cfg, config.steps, config.seed)
    options = {"preset": config.preset, "check_error": True, **dict(config.overrides)}
    compiled = torch.compile(model, backend="chipmunk", options=options)
    tally = FlopTally()
    out = _denoise(compiled, call, shape, prompts, config.cfg, config.steps, config.seed, counter=tally)
    report = chipmunk_compile.report(compiled)
    got = {kind: tally.total(f"chipmunk.{kind}") for kind in ("attention", "mlp")}
    rows = [s for s in report.sites if s.status == "rewritten"]
    states = chipmunk_compile.states_of(model)
    dense = {"attention": 0, "mlp": 0}
    for state in states:
        for site in state.sites:
            dense[site.kind] += site.stats.dense_flops * site.stats.calls

    def kept(kind):
        vals = [s.kept_fraction for s in rows if s.kind == kind and s.sparse_calls and s.kept_fraction is not None]
        return sum(vals) / len(vals) if vals else None

    errors = [(s.name, step, err) for s in rows for step, err in s.errors]
    return FidelityResult(
        config=config,
        psnr_db=psnr(out, ref),
        rel_l2=relative_l2(out, ref),
        attention_flops_frac=got["attention"] / dense["attention"] if dense["attention"] else 1.0,
        mlp_flops_frac=got["mlp"] / dense["mlp"] if dense["mlp"] else 1.0,
        attention_kept=kept("attention"),
        mlp_kept=kept("mlp"),
        sites=len(rows),
        sparse_calls=sum(s.sparse_calls for s in rows),
        site_errors=errors,
    )


def write_results(results: list[FidelityResult]) -> Path:
    date = datetime.date.today().isoformat()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"
    path = RESULTS / f"fidelity_{date}.csv"
    header = [*RUN_COLUMNS, "model", "size", "preset", "steps", "cfg", "overrides", "psnr_db", "rel_l2",
              "attention_flops_frac", "mlp_flops_frac", "attention_kept", "mlp_kept", "sites", "sparse_calls"]
    run = run_fields(device)
    append_csv(path, header, (
        [*run, r.config.model, r.config.size, r.config.preset, r.config.steps, r.config.cfg, dict(r.config.overrides),
         f"{r.psnr_db:.2f}", f"{r.rel_l2:.4g}", f"{r.attention_flops_frac:.4f}", f"{r.mlp_flops_frac:.4f}",
         "" if r.attention_kept is None else f"{r.attention_kept:.4f}",
         "" if r.mlp_kept is None else f"{r.mlp_kept:.4f}", r.sites, r.sparse_calls]
        for r in results))
    sha = git_sha()
    site_header = ["git_sha", "model", "preset", "site", "step", "rel_error_vs_dense"]
    append_csv(RESULTS / f"fidelity_sites_{date}.csv", site_header,
               ([sha, r.config.model, r.config.preset, name, step, f"{err:.4g}"]
                for r in results for name, step, err in r.site_errors))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(BUILDERS), default="flux")
    p.add_argument("--size", choices=["tiny", "small"], default="small")
    p.add_argument("--preset", default=None, help="chipmunk preset (default: the model's)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", action="store_true", help="two model calls per step (true CFG)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    cfg = FidelityConfig(model=args.model, size=args.size, preset=args.preset or args.model, steps=args.steps,
                         cfg=args.cfg)
    res = run_fidelity(cfg)
    summary = {k: v for k, v in asdict(res).items() if k not in ("site_errors", "config")}
    print(f"{cfg}\n" + "\n".join(f"  {k}: {v}" for k, v in summary.items()))
    if not args.no_write:
        print("wrote", write_results([res]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
