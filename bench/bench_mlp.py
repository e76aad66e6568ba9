"""Benchmark: cached-delta column-sparse MLP (Triton) against the dense torch.compile'd MLP.

Shapes: FLUX (B=1, S=4352, 3072→12288→3072) and Wan 14B FFN (S=16384 instead of 75600, 5120→13824→5120),
tanh-GELU, bf16, biases. Per token block a random sorted selection of ``k`` hidden units,
``k = keep·F`` rounded to a multiple of 128 (what an ops layer should pick: whole unit tiles).
``block_size`` 256/512 means several 128-row tiles share one selection (fewer selections, less quality;
quality is measured elsewhere, this file measures speed only).

Timing: median of ``triton.testing.do_bench`` (which flushes L2 between calls, so weights come from DRAM
as in a real forward pass). Calls alternate between two inputs so every delta is non-zero (a repeated
input would make the second call's delta all zeros). TFLOP/s counts the FLOPs actually executed
(``2·B·S·k·(Din·(1+gated) + Dout)``; dense: ``k = F``).

Usage::

    python bench/bench_mlp.py                    # FLUX table, CSV appended to bench/results/
    python bench/bench_mlp.py --sweep --wan      # + tile sweep at keep 0.3, + Wan shape
    python bench/bench_mlp.py --gated --split    # + SwiGLU of FLUX's dims, + mm1/mm2 timed alone
    python bench/bench_mlp.py --check            # + bf16 kernel vs fp32 reference on the FLUX shape

Tile names starting with ``sweep:`` are variations of ``ColumnSparseMlpConfig()``'s field defaults;
``default`` is the kernel's ``default_config(gated)``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
from _harness import git_sha  # noqa: E402  (bench/ is the script's directory)
from chipmunk_compile.kernels import column_sparse_mlp as csm
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (B, S, Din, F, Dout)
    "flux": (1, 4352, 3072, 12288, 3072),
    "wan": (1, 16384, 5120, 13824, 5120),
    "flux_swiglu": (1, 4352, 3072, 12288, 3072),  # FLUX dims with a SiLU-gated (SwiGLU) first linear
}
GATED = {"flux_swiglu"}
KEEPS = (0.5, 0.35, 0.30, 0.20, 0.10)

_C = csm.ColumnSparseMlpConfig
TILES = {
    "default": _C(),
    "up_s4": _C(up_stages=4),
    "up_bn256": _C(up_bn=256),
    "up_bn256_s4": _C(up_bn=256, up_stages=4),
    "up_w4_s4": _C(up_warps=4, up_stages=4),
    "up_bm64_bn256": _C(up_bm=64, up_bn=256, up_warps=4, up_stages=4),
    "down_bn256": _C(down_bn=256),
    "down_s4": _C(down_stages=4),
    "down_w4_s4": _C(down_warps=4, down_stages=4),
    "down_bn256_s4": _C(down_bn=256, down_stages=4),
    "down_bm64_bn256": _C(down_bm=64, down_bn=256, down_warps=4, down_stages=4),
    "up_bk128": _C(up_bk=128),
    "down_bk128": _C(down_bk=128),
    "cols_fastest": _C(rows_fastest=False),
}
# 256-row tiles for selections shared by 256+ tokens (128-wide on the other side: registers).
BIG_ROW_TILES = {
    "both_bm256": dict(
        up_bm=256, up_bn=128, up_bk=64, up_warps=8, up_stages=3,
        down_bm=256, down_bn=128, down_bk=64, down_warps=8, down_stages=3,
    )
}


@dataclass(frozen=True)
class ExperimentConfig:
    model: str
    keep: float
    block_size: int = 128
    w2_layout: str = "t"  # "t": transposed view of an (F, Dout) copy; "rowmajor": the (Dout, F) weight
    tiles: str = "default"
    tile_config: csm.ColumnSparseMlpConfig | None = None  # None: the kernel's default_config(gated)
    dtype: torch.dtype = torch.bfloat16

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return SHAPES[self.model]

    @property
    def gated(self) -> bool:
        return self.model in GATED

    @property
    def activation(self) -> str:
        return "silu" if self.gated else "gelu_tanh"

    @property
    def tiles_used(self) -> csm.ColumnSparseMlpConfig:
        return self.tile_config or csm.default_config(self.gated, self.dtype)

    @property
    def k(self) -> int:
        units = self.shape[3]
        return min(units, max(128, round(self.keep * units / 128) * 128))


@dataclass(frozen=True)
class ExperimentResult:
    config: ExperimentConfig
    ms: float
    dense_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.ms

    @property
    def tflops(self) -> float:
        bsz, seq, din, _, dout = self.config.shape
        din_work = 2 * din if self.config.gated else din
        return 2 * bsz * seq * self.config.k * (din_work + dout) / self.ms * 1e-9


class _Problem:
    """Weights, two inputs and caches of one shape, built once and shared by its experiments."""

    def __init__(self, model: str, dtype: torch.dtype):
        bsz, seq, din, units, dout = SHAPES[model]
        dev = dict(device="cuda", dtype=dtype)
        self.model, self.gated = model, model in GATED
        self.xs = [torch.randn(bsz, seq, din, **dev) for _ in range(2)]
        self.fc1 = nn.Linear(din, 2 * units if self.gated else units).to(**dev)
        self.fc2 = nn.Linear(units, dout).to(**dev)
        self.w2_t = self.fc2.weight.detach().t().contiguous()  # (F, Dout)
        self.act = 0.5 * torch.randn(bsz, units, seq, **dev)
        self.out = torch.randn(bsz, seq, dout, **dev)
        self.dense_ms: float | None = None

    def w2(self, layout: str) -> torch.Tensor:
        return self.w2_t.t() if layout == "t" else self.fc2.weight.detach()


def _indices(bsz, seq, units, k, block_size, device="cuda"):
    nb = -(-seq // block_size)
    sel = torch.rand(bsz * nb, units, device=device).argsort(dim=1)[:, :k]
    return sel.sort(dim=1).values.to(torch.int32).view(bsz, nb, k).contiguous()


def _alternating(fn, xs):
    state = [0]

    def call():
        state[0] ^= 1
        return fn(xs[state[0]])

    return call


def _time(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


class _SwiGLU(nn.Module):
    def __init__(self, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):
        u, g = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(u * torch.nn.functional.silu(g))


def dense_ms(problem: _Problem) -> float:
    """The baseline: the dense MLP through torch.compile (Inductor, default mode)."""
    if problem.dense_ms is None:
        if problem.gated:
            mlp = torch.compile(_SwiGLU(problem.fc1, problem.fc2))
        else:
            mlp = torch.compile(nn.Sequential(problem.fc1, nn.GELU(approximate="tanh"), problem.fc2))
        with torch.no_grad():
            problem.dense_ms = _time(_alternating(mlp, problem.xs))
    return problem.dense_ms


def run_experiment(cfg: ExperimentConfig, problem: _Problem) -> ExperimentResult:
    bsz, seq, _, units, _ = cfg.shape
    idx = _indices(bsz, seq, units, cfg.k, cfg.block_size)
    w1, b1, w2 = problem.fc1.weight.detach(), problem.fc1.bias.detach(), problem.w2(cfg.w2_layout)

    def sparse(x):
        csm.column_sparse_mlp_delta(
            x, w1, b1, w2, idx, problem.act, problem.out, activation=cfg.activation, gated=cfg.gated,
            block_size=cfg.block_size, config=cfg.tile_config,
        )

    return ExperimentResult(cfg, _time(_alternating(sparse, problem.xs)), dense_ms(problem))


def run_split(cfg: ExperimentConfig, problem: _Problem) -> tuple[float, float]:
    """Milliseconds of mm1 alone and mm2 alone (same inputs as run_experiment)."""
    bsz, seq, _, units, _ = cfg.shape
    idx = _indices(bsz, seq, units, cfg.k, cfg.block_size)
    w1, b1, w2 = problem.fc1.weight.detach(), problem.fc1.bias.detach(), problem.w2(cfg.w2_layout)
    tc = cfg.tiles_used
    packed = csm._alloc_packed(problem.xs[0], w2, cfg.k, tc)
    up = lambda x: csm._launch_up(
        x, w1, b1, idx, problem.act, packed, cfg.activation, cfg.gated, cfg.block_size, tc
    )
    up_ms = _time(_alternating(up, problem.xs))
    down_ms = _time(lambda: csm._launch_down(packed, w2, idx, problem.out, cfg.block_size, tc))
    return up_ms, down_ms


def check_flux(problem: _Problem, cfg: ExperimentConfig) -> str:
    """bf16 kernel vs the fp32-accumulating reference on the FLUX shape: relative errors."""
    bsz, seq, _, units, _ = cfg.shape
    idx = _indices(bsz, seq, units, cfg.k, cfg.block_size)
    w1, b1, w2 = problem.fc1.weight.detach(), problem.fc1.bias.detach(), problem.w2(cfg.w2_layout)
    kw = dict(activation=cfg.activation, gated=cfg.gated, block_size=cfg.block_size)
    a_k, o_k, a_r, o_r = problem.act.clone(), problem.out.clone(), problem.act.clone(), problem.out.clone()
    csm.column_sparse_mlp_delta(problem.xs[0], w1, b1, w2, idx, a_k, o_k, **kw, config=cfg.tile_config)
    csm.column_sparse_mlp_delta_ref(problem.xs[0], w1, b1, w2, idx, a_r, o_r, **kw)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    d_out = rel(o_k - problem.out, o_r - problem.out)
    return (
        f"check {cfg.model} keep={cfg.keep} block={cfg.block_size} w2={cfg.w2_layout} tiles={cfg.tiles}: "
        f"rel err out={rel(o_k, o_r):.2e} out-update={d_out:.2e} act={rel(a_k, a_r):.2e}"
    )


def _csv_path(out_dir: Path) -> Path:
    name = torch.cuda.get_device_name().replace("NVIDIA", "")
    card = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return out_dir / f"mlp_{card}_{datetime.date.today().isoformat()}.csv"


def write_csv(results: list[ExperimentResult], out_dir: Path) -> Path:
    """Append one row per result to ``out_dir/mlp_<card>_<date>.csv`` (header when the file is new)."""
    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    path = _csv_path(out_dir)
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, git_sha=git_sha(), date=date)
    rows = []
    for r in results:
        c = r.config
        bsz, seq, din, units, dout = c.shape
        rows.append({
            **meta, "model": c.model, "bsz": bsz, "seq": seq, "din": din, "units": units, "dout": dout,
            "activation": c.activation, "dtype": str(c.dtype).removeprefix("torch."), "keep": c.keep,
            "k": c.k, "kept_fraction": round(c.k / units, 4), "block_size": c.block_size,
            "w2_layout": c.w2_layout, "tiles": c.tiles,
            "tile_config": str(dataclasses.astuple(c.tiles_used)),
            "ms": round(r.ms, 5), "dense_ms": round(r.dense_ms, 5), "speedup_vs_dense": round(r.speedup, 3),
            "tflops": round(r.tflops, 1),
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(results: list[ExperimentResult]) -> None:
    head = ("model", "keep", "k", "block", "w2", "tiles", "ms", "dense ms", "speedup", "TFLOP/s")
    body = [
        (r.config.model, r.config.keep, r.config.k, r.config.block_size, r.config.w2_layout, r.config.tiles,
         f"{r.ms:.4f}", f"{r.dense_ms:.4f}", f"{r.speedup:.2f}x", f"{r.tflops:.0f}")
        for r in results
    ]
    try:
        from tabulate import tabulate

        print(tabulate(body, headers=head))
    except ImportError:
        for row in (head, *body):
            print("  ".join(str(v).rjust(9) for v in row))
    sys.stdout.flush()


def _best(results: list[ExperimentResult], prefix: str) -> ExperimentResult:
    cands = [
        r for r in results
        if r.config.w2_layout == "t" and (r.config.tiles == "default" or r.config.tiles.startswith(prefix))
    ]
    return min(cands, key=lambda r: r.ms)


def get_configs(model: str, tile_config: csm.ColumnSparseMlpConfig, tiles: str, keeps=KEEPS):
    configs = []
    for keep in keeps:
        configs.append(ExperimentConfig(model, keep, 128, "t", tiles, tile_config))
        if keep in (0.3, 0.1):
            configs.append(ExperimentConfig(model, keep, 128, "rowmajor", tiles, tile_config))
        for block in (256, 512):
            configs.append(ExperimentConfig(model, keep, block, "t", tiles, tile_config))
            for name, over in BIG_ROW_TILES.items():
                cfg = replace(tile_config or _C(), **over)
                configs.append(ExperimentConfig(model, keep, block, "t", f"{tiles}+{name}", cfg))
    return configs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-flux", action="store_true", help="skip the FLUX keep × block table")
    parser.add_argument("--sweep", action="store_true", help="tile sweep on FLUX at keep 0.3 first")
    parser.add_argument("--wan", action="store_true", help="also the Wan FFN shape (S=16384)")
    parser.add_argument("--gated", action="store_true", help="also a SwiGLU MLP of FLUX's dimensions")
    parser.add_argument("--split", action="store_true", help="mm1 and mm2 timed alone (FLUX, keep 0.3)")
    parser.add_argument("--check", action="store_true", help="bf16 kernel vs reference on the FLUX shape")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    flux = _Problem("flux", torch.bfloat16)
    card = torch.cuda.get_device_name()
    print(f"{card}  dense FLUX MLP (torch.compile): {dense_ms(flux):.4f} ms", flush=True)
    results: list[ExperimentResult] = []

    def record(cfg: ExperimentConfig, problem: _Problem) -> None:
        try:
            results.append(run_experiment(cfg, problem))
        except Exception as exc:  # a tile config that does not fit (shared memory, registers)
            print(f"FAILED {cfg.model} keep={cfg.keep} block={cfg.block_size} {cfg.tiles}: {exc!r:.300}")
            return
        write_csv(results[-1:], args.out_dir)  # row by row: a run cut short keeps what it measured

    tiles, tile_config = "default", None
    if args.check:
        for layout in ("t", "rowmajor"):
            print(check_flux(flux, ExperimentConfig("flux", 0.3, 128, layout)), flush=True)
        big = replace(_C(), **BIG_ROW_TILES["both_bm256"])
        print(check_flux(flux, ExperimentConfig("flux", 0.3, 512, "t", "both_bm256", big)), flush=True)
    if args.split:
        for cfg in (ExperimentConfig("flux", 0.3), ExperimentConfig("flux", 0.2)):
            up_ms, down_ms = run_split(cfg, flux)
            print(f"split flux keep={cfg.keep} k={cfg.k} {cfg.tiles_used}: mm1 {up_ms:.4f} ms, "
                  f"mm2 {down_ms:.4f} ms", flush=True)
    if args.sweep:
        sweep = [ExperimentConfig("flux", 0.3, 128, "t", f"sweep:{n}", c) for n, c in TILES.items()]
        sweep.append(ExperimentConfig("flux", 0.3, 128, "rowmajor", "sweep:down_bn256", TILES["down_bn256"]))
        for cfg in sweep:
            record(cfg, flux)
            print_table(results[-1:])
    if not args.no_flux:
        for cfg in get_configs("flux", tile_config, tiles):
            record(cfg, flux)
    if args.gated:
        del flux
        torch.cuda.empty_cache()
        glu = _Problem("flux_swiglu", torch.bfloat16)
        print(f"dense SwiGLU (FLUX dims, torch.compile): {dense_ms(glu):.4f} ms", flush=True)
        for keep in (0.3, 0.2):
            record(ExperimentConfig("flux_swiglu", keep), glu)
        record(ExperimentConfig("flux_swiglu", 0.3, tiles="gated_s3", tile_config=_C(down_stages=4)), glu)
        print(check_flux(glu, ExperimentConfig("flux_swiglu", 0.3)), flush=True)
        del glu
    if args.wan:
        flux = None
        torch.cuda.empty_cache()
        wan = _Problem("wan", torch.bfloat16)
        print(f"dense Wan FFN (torch.compile): {dense_ms(wan):.4f} ms", flush=True)
        for keep in (0.3, 0.2, 0.1):
            record(ExperimentConfig("wan", keep, 128, "t", tiles, tile_config), wan)
    print_table(results)
    print(f"CSV: {_csv_path(args.out_dir)}")


if __name__ == "__main__":
    main()
