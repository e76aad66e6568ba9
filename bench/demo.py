"""`make demo`: the trained reference DiT, dense vs ``torch.compile(backend="chipmunk")``, side by side.

Samples a few classes with 50 steps (classifier-free guidance, one batched call per step) from the same
noise, once with the dense model under plain ``torch.compile`` (Inductor) and once under the chipmunk
backend, then prints the chipmunk report (every site, rewritten or dense and why, kept fractions,
per-site error vs dense) and the numbers: output PSNR / relative L2 vs dense, attention and MLP FLOPs
relative to dense, and wall time. On a CPU the sparse ops run their PyTorch references, so the time
column says nothing about GPU speed; see README for GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import chipmunk_compile  # noqa: E402
from bench.reference_dit.sample import load, sample  # noqa: E402
from chipmunk_compile.runner import FLOP_COUNTER, FlopTally  # noqa: E402
from chipmunk_compile.testing import psnr, relative_l2  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["image", "video"], default="image")
    p.add_argument("--classes", type=int, default=2, help="how many classes to sample (one image each)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--preset", default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="chipmunk option override, e.g. --set attention.keep=0.2")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load(args.variant, device, dtype)
    labels = torch.arange(args.classes) * 3 % model.config.num_classes
    options = {"preset": args.preset, "check_error": True}
    for item in args.set:
        key, value = item.split("=", 1)
        options[key] = json.loads(value)
    kw = dict(num_steps=args.steps, guidance_scale=3.0, device=device, dtype=dtype)

    print(f"reference DiT '{args.variant}' ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"{model.config.num_tokens} tokens) on {device}; {args.classes} samples x {args.steps} steps, CFG 3")
    t0 = time.perf_counter()
    dense = sample(torch.compile(model), model.config, labels, **kw)
    t_dense = time.perf_counter() - t0
    torch._dynamo.reset()

    tally = FlopTally()
    token = FLOP_COUNTER.set(tally)
    t0 = time.perf_counter()
    try:
        fast = sample(torch.compile(model, backend="chipmunk", options=options), model.config, labels, **kw)
    finally:
        FLOP_COUNTER.reset(token)
    t_fast = time.perf_counter() - t0

    report = chipmunk_compile.report(model)
    print(report)
    dense_flops = {"attention": 0, "mlp": 0}
    for state in chipmunk_compile.states_of(model):
        for site in state.sites:
            dense_flops[site.kind] += site.stats.dense_flops * site.stats.calls
    frac = {k: tally.total(f"chipmunk.{k}") / v for k, v in dense_flops.items() if v}
    print()
    print(f"{'':28}{'dense (inductor)':>18}{'chipmunk':>12}")
    print(f"{'wall time incl. compile [s]':28}{t_dense:18.1f}{t_fast:12.1f}")
    print(f"{'attention FLOPs vs dense':28}{1.0:18.3f}{frac.get('attention', 1.0):12.3f}")
    print(f"{'MLP FLOPs vs dense':28}{1.0:18.3f}{frac.get('mlp', 1.0):12.3f}")
    print(f"{'PSNR vs dense [dB]':28}{'inf':>18}{psnr(fast, dense):12.2f}")
    print(f"{'relative L2 vs dense':28}{0.0:18.3f}{relative_l2(fast, dense):12.4f}")
    if device == "cpu":
        print("\nOn CPU the chipmunk ops run their PyTorch references (gathers, no Triton): times here are not a"
              " speed measurement. GPU speed: see README.")


if __name__ == "__main__":
    main()
