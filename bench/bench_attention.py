"""Column-sparse attention and the selection step against cuDNN SDPA and FlexAttention.

    python bench/bench_attention.py                  # FLUX + S=32k shapes, appends bench/results/*.csv
    python bench/bench_attention.py --shapes all     # + HunyuanVideo 720p (S=119056)
    python bench/bench_attention.py --check --sweep  # bf16 correctness first, then tile-config sweeps
    python bench/bench_attention.py --smoke          # tiny shapes on CPU (TRITON_INTERPRET=1), code paths

Methods (per shape, bf16, random keys):
- ``cudnn``: dense ``F.scaled_dot_product_attention`` under ``SDPBackend.CUDNN_ATTENTION`` (the baseline);
- ``csa``: :func:`column_sparse_attention` with ``base`` (the sparse step ``cache + A_S``), random sorted
  indices per 128-query group keeping ``kept`` of the keys;
- ``flex``: compiled FlexAttention with a random 128x128 block mask keeping the same fraction of blocks;
- ``selection``: :func:`attention_with_colsum` + ``torch.topk`` over the column sums (the dense step
  that picks the keys), and its parts ``colsum_pass2`` / ``topk``.
Timings are the median of ``triton.testing.do_bench``; TFLOP/s counts 4*B*H*S*Sk*D for dense work and
4*B*H*S*kept_keys*D for sparse work (the selection step is counted as its dense attention).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from _harness import git_sha  # noqa: E402  (bench/ is the script's directory)

REPO = Path(__file__).resolve().parents[1]


def _load_kernel_module(name: str):
    """The kernel module, installed or not (the device machine runs a bare copy of the repository)."""
    try:
        return importlib.import_module(f"chipmunk_compile.kernels.{name}")
    except ImportError:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "kernels" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module


csa_mod = _load_kernel_module("column_sparse_attention")
colsum_mod = _load_kernel_module("attention_colsum")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    seq: int
    head_dim: int


SHAPES = {
    "flux": Shape("flux-1280x768", 1, 24, 4352, 128),
    "32k": Shape("s32768", 1, 24, 32768, 128),
    "hunyuan": Shape("hunyuan-720p-129f", 1, 24, 119056, 128),
    "smoke": Shape("smoke", 1, 2, 200, 64),
}
KEPT = (0.20, 0.10, 0.07, 0.05)


@dataclass(frozen=True)
class ExperimentConfig:
    shape: Shape
    method: str  # cudnn | csa | flex | selection | colsum_pass2 | dense_pass1 | topk
    kept: float = 1.0  # target fraction of keys (1.0 = dense)
    group_size: int = 128
    variant: str = "default"  # kernel launch configuration label


@dataclass(frozen=True)
class ExperimentResult:
    config: ExperimentConfig
    ms: float
    kept_actual: float
    speedup_vs_cudnn: float
    tflops: float


# --------------------------------------------------------------------------------------------- inputs


def _make_qkv(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0):
    """q, k, v as (B, H, S, D) permuted views of (B, S, H, D) tensors, as a DiT hands them over."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, S, D = shape.batch, shape.heads, shape.seq, shape.head_dim

    def one():
        return torch.randn((B, S, H, D), device=device, dtype=dtype, generator=g).permute(0, 2, 1, 3)

    return one(), one(), one()


def random_indices(B: int, H: int, G: int, Sk: int, keep: int, device: str, seed: int = 0):
    """Sorted random key lists of ``keep`` keys per (b, h, group): int32 (B, H, G, keep), counts."""
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.empty((B, H, G, keep), dtype=torch.int32, device=device)
    for b in range(B):
        for h in range(H):  # one head at a time: (G, Sk) scores stay small at S = 119k
            scores = torch.rand((G, Sk), device=device, generator=g)
            idx[b, h] = scores.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values.to(torch.int32)
    return idx, torch.full((B, H, G), keep, dtype=torch.int32, device=device)


def random_block_mask(shape: Shape, kept: float, device: str, seed: int = 0):
    """FlexAttention BlockMask keeping round(kept * n_kv_blocks) random 128-key blocks per query block."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, S = shape.batch, shape.heads, shape.seq
    nq = nk = triton.cdiv(S, 128)
    nb = max(1, round(kept * nk))
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand((B, H, nq, nk), device=device, generator=g)
    sel = scores.topk(nb, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    full_idx = torch.zeros((B, H, nq, nk), dtype=torch.int32, device=device)
    full_idx[..., :nb] = sel
    full_cnt = torch.full((B, H, nq), nb, dtype=torch.int32, device=device)
    empty_cnt = torch.zeros((B, H, nq), dtype=torch.int32, device=device)
    empty_idx = torch.zeros((B, H, nq, nk), dtype=torch.int32, device=device)
    bm = BlockMask.from_kv_blocks(empty_cnt, empty_idx, full_cnt, full_idx, BLOCK_SIZE=128, seq_lengths=(S, S))
    return bm, nb / nk


# -------------------------------------------------------------------------------------------- timing


def _time_ms(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _flops(shape: Shape, keys: float) -> float:
    return 4.0 * shape.batch * shape.heads * shape.seq * keys * shape.head_dim


class Runner:
    def __init__(self, device: str, dtype: torch.dtype, sink: Callable[[ExperimentResult], None] | None = None):
        self.sink = sink
        self.device = device
        self.dtype = dtype
        self.results: list[ExperimentResult] = []
        self._dense_ms: dict[str, float] = {}
        self._flex = None

    def record(self, cfg: ExperimentConfig, ms: float, keys: float) -> ExperimentResult:
        dense = self._dense_ms.get(cfg.shape.name, float("nan"))
        res = ExperimentResult(
            config=cfg,
            ms=ms,
            kept_actual=keys / cfg.shape.seq,
            speedup_vs_cudnn=dense / ms,
            tflops=_flops(cfg.shape, keys) / (ms * 1e-3) / 1e12,
        )
        self.results.append(res)
        if self.sink is not None:
            self.sink(res)  # rows reach the CSV as they come: a run cut off at its time limit keeps them
        c = cfg
        print(
            f"  {c.shape.name:>18} {c.method:>12} kept={res.kept_actual:6.4f} g={c.group_size:3d} "
            f"{c.variant:>18}: {ms:9.3f} ms  x{res.speedup_vs_cudnn:6.2f}  {res.tflops:7.1f} TFLOP/s",
            flush=True,
        )
        return res

    def dense(self, shape: Shape, q, k, v) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        scale = shape.head_dim**-0.5
        backend = SDPBackend.CUDNN_ATTENTION if self.device == "cuda" else SDPBackend.MATH
        with sdpa_kernel(backend):
            ms = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), self.device)
        self._dense_ms[shape.name] = ms
        self.record(ExperimentConfig(shape, "cudnn"), ms, shape.seq)

    def csa(self, shape, q, k, v, base, kept, group_size=128, config=None, variant="default", indices=None):
        S = shape.seq
        keep = max(1, round(kept * S))
        G = triton.cdiv(S, group_size)
        idx, cnt = indices if indices is not None else random_indices(shape.batch, shape.heads, G, S, keep, self.device)
        scale = shape.head_dim**-0.5

        def fn():
            return csa_mod.column_sparse_attention(
                q, k, v, idx, cnt, scale=scale, group_size=group_size, base=base, sign=1.0, config=config
            )

        ms = _time_ms(fn, self.device)
        return self.record(ExperimentConfig(shape, "csa", kept, group_size, variant), ms, keep)

    def flex(self, shape, q, k, v, kept):
        from torch.nn.attention.flex_attention import flex_attention

        if self._flex is None:
            self._flex = torch.compile(flex_attention, dynamic=False)
        bm, frac = random_block_mask(shape, kept, self.device)
        scale = shape.head_dim**-0.5
        ms = _time_ms(lambda: self._flex(q, k, v, block_mask=bm, scale=scale), self.device)
        return self.record(ExperimentConfig(shape, "flex", kept), ms, frac * shape.seq)

    def selection(self, shape, q, k, v, kept, group_size=128, config=None, variant="default", parts=True):
        S = shape.seq
        keep = max(1, round(kept * S))
        scale = shape.head_dim**-0.5

        def fn():
            _, _, cs = colsum_mod.attention_with_colsum(q, k, v, scale=scale, group_size=group_size, config=config)
            return cs.topk(keep, dim=-1, sorted=False).indices.to(torch.int32)

        ms = _time_ms(fn, self.device)
        self.record(ExperimentConfig(shape, "selection", kept, group_size, variant), ms, S)
        if not parts:
            return
        cs = colsum_mod.attention_with_colsum(q, k, v, scale=scale, group_size=group_size, config=config)[2]
        ms = _time_ms(lambda: cs.topk(keep, dim=-1, sorted=False), self.device)
        self.record(ExperimentConfig(shape, "topk", kept, group_size, variant), ms, S)


# ------------------------------------------------------------------------------------- correctness


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_correctness(device: str, dtype: torch.dtype) -> list[str]:
    """Kernels vs references, FlashAttention's rule: err <= 2 * err(same-dtype torch) + eps."""
    lines = []
    torch.manual_seed(0)
    cases = [(1000, 4, 4, 128, 128, False), (777, 4, 2, 64, 192, True), (4352, 2, 2, 128, 128, False)]
    if device == "cpu":
        cases = [(200, 2, 1, 64, 64, True), (130, 2, 2, 64, 128, False)]
    for S, H, Hkv, D, gs, bias_on in cases:
        shape = Shape("check", 1, H, S, D)
        q, _, _ = _make_qkv(shape, device, dtype, seed=1)
        k = torch.randn((1, S, Hkv, D), device=device, dtype=dtype).permute(0, 2, 1, 3)
        v = torch.randn((1, S, Hkv, D), device=device, dtype=dtype).permute(0, 2, 1, 3)
        scale = D**-0.5
        bias = None
        if bias_on:
            bias = torch.zeros((1, 1, S), device=device)
            bias[..., S // 3 : S // 2] = float("-inf")
        G = triton.cdiv(S, gs)
        keep = S // 10
        idx, cnt = random_indices(1, H, G, S, keep, device)
        if bias is not None:  # masked keys are never selected; keep the list sorted and dense
            allowed = torch.nonzero(bias[0, 0] == 0).flatten().to(torch.int32)
            idx = allowed[torch.randint(0, allowed.numel(), idx.shape, device=device)].sort(-1).values
        cnt[0, 0, 0] = 0
        cnt[0, -1, -1] = keep // 3
        base = torch.randn((1, S, H, D), device=device, dtype=dtype).permute(0, 2, 1, 3)
        kw = dict(scale=scale, group_size=gs, key_bias=bias, base=base, sign=-1.0)
        out = csa_mod.column_sparse_attention(q, k, v, idx, cnt, **kw)
        ref = csa_mod.column_sparse_attention_ref(
            q.double(), k.double(), v.double(), idx, cnt, **{**kw, "base": base.double()}
        )
        low = csa_mod.column_sparse_attention_ref(q, k, v, idx, cnt, **kw, upcast=False)
        e, el = _err(out, ref), _err(low, ref)
        ok = e <= 2 * el + 1e-3
        lines.append(
            f"csa S={S} H={H}/{Hkv} D={D} g={gs} bias={bias_on}: err={e:.2e} lowp={el:.2e} {'OK' if ok else 'FAIL'}"
        )

        o, lse, cs = colsum_mod.attention_with_colsum(q, k, v, scale=scale, group_size=gs, key_bias=bias)
        ro, rl, rc = colsum_mod.attention_with_colsum_ref(
            q.double(), k.double(), v.double(), scale=scale, group_size=gs, key_bias=bias
        )
        lo, ll, lc = colsum_mod.attention_with_colsum_ref(
            q, k, v, scale=scale, group_size=gs, key_bias=bias, upcast=False
        )
        for name, a, r, lp, eps in (
            ("o", o, ro, lo, 1e-3),
            ("lse", lse, rl, ll, 1e-4),
            ("colsum", cs, rc, lc, 1e-3),
        ):
            e, el = _err(a, r), _err(lp, r)
            ok = e <= 2 * el + eps
            lines.append(
                f"colsum.{name} S={S} H={H}/{Hkv} D={D} g={gs} bias={bias_on}: err={e:.2e} "
                f"lowp={el:.2e} {'OK' if ok else 'FAIL'}"
            )
        if device == "cuda" and Hkv == H and not bias_on:
            tri = colsum_mod.attention_with_colsum(
                q, k, v, scale=scale, group_size=gs, config=colsum_mod.ColsumConfig(dense_pass="triton")
            )
            cud = colsum_mod._dense_pass_cudnn(q, k, v, scale)
            if cud is None:
                lines.append("cudnn dense pass: unavailable")
            else:
                lines.append(
                    f"cudnn vs triton pass 1 S={S}: o err={_err(cud[0], ro):.2e} "
                    f"(triton {_err(tri[0], ro):.2e}), "
                    f"lse err={_err(cud[1], rl):.2e} (triton {_err(tri[1], rl):.2e})"
                )
    return lines


# ------------------------------------------------------------------------------------------- sweeps

# Launch configurations swept with --sweep. Measured on H200 (2026-11-27, S=32k, 7% kept): BLOCK_N=32 with
# 4 stages beat 64/128 (8.3x vs 6.9x dense); Triton's automatic warp specialization (tl.range(...,
# warp_specialize=True)) was slower (6.2x) or failed to compile on the gather loop, so it is not offered.
_K = csa_mod.KernelConfig
CSA_SWEEP = {
    "m64n32w4s4": _K(64, 32, 4, 4),
    "m64n32w4s5": _K(64, 32, 4, 5),
    "m64n32w4s6": _K(64, 32, 4, 6),
    "m64n16w4s6": _K(64, 16, 4, 6),
    "m64n16w4s8": _K(64, 16, 4, 8),
    "m64n64w4s4": _K(64, 64, 4, 4),
    "m128n32w8s4": _K(128, 32, 8, 4),
    "m128n32w8s6": _K(128, 32, 8, 6),
    "m128n16w8s6": _K(128, 16, 8, 6),
    "m128n128w8s3": _K(128, 128, 8, 3),
    "m128n32w4s4": _K(128, 32, 4, 4),
    "m128n16w4s6": _K(128, 16, 4, 6),
}
_C = colsum_mod.ColsumConfig
COLSUM_SWEEP = {
    "p1tri-m128n128w8s3": _C(fwd_block_n=128, dense_pass="triton"),
    "p1tri-m128n64w8s4": _C(fwd_block_n=64, fwd_stages=4, dense_pass="triton"),
    "p2-n128m128w8s3": _C(colsum_block_n=128, colsum_block_m=128, colsum_warps=8, colsum_stages=3),
    "p2-n128m128w8s2": _C(colsum_block_n=128, colsum_block_m=128, colsum_warps=8, colsum_stages=2),
    "p2-n64m64w4s3": _C(colsum_block_n=64, colsum_block_m=64, colsum_warps=4, colsum_stages=3),
    "p2-n256m64w8s3": _C(colsum_block_n=256, colsum_block_m=64, colsum_warps=8, colsum_stages=3),
    "p2-n256m64w8s2": _C(colsum_block_n=256, colsum_block_m=64, colsum_warps=8, colsum_stages=2),
    "p2-n128m64w8s3": _C(colsum_block_n=128, colsum_block_m=64, colsum_warps=8, colsum_stages=3),
    "p2-n256m32w8s4": _C(colsum_block_n=256, colsum_block_m=32, colsum_warps=8, colsum_stages=4),
    "p2-n128m128w4s2": _C(colsum_block_n=128, colsum_block_m=128, colsum_warps=4, colsum_stages=2),
}


def sweep(runner: Runner, shape: Shape, q, k, v, base) -> dict[str, str]:
    """Time every launch configuration; returns the fastest label per kernel."""
    best = {}
    S = shape.seq
    for kept in (0.07,):
        idx = random_indices(shape.batch, shape.heads, triton.cdiv(S, 128), S, round(kept * S), runner.device)
        timings = {}
        for label, cfg in CSA_SWEEP.items():
            try:
                timings[label] = runner.csa(shape, q, k, v, base, kept, config=cfg, variant=label, indices=idx).ms
            except Exception as exc:  # a config that fails to compile must not stop the sweep
                print(f"  csa {label}: {type(exc).__name__}: {str(exc)[:200]}")
        best["csa"] = min(timings, key=timings.get)
        del idx
    scale = shape.head_dim**-0.5
    p1, p2 = {}, {}
    for label, cfg in COLSUM_SWEEP.items():
        try:
            o, lse, cs = colsum_mod.attention_with_colsum(q, k, v, scale=scale, group_size=128, config=cfg)
            if label.startswith("p1"):
                ms = _time_ms(lambda cfg=cfg: _pass1_only(q, k, v, scale, cfg), runner.device)
                p1[label] = runner.record(ExperimentConfig(shape, "dense_pass1", 1.0, 128, label), ms, S).ms
            else:
                ms = _time_ms(lambda cfg=cfg, lse=lse: _pass2_only(q, k, lse, scale, cfg), runner.device)
                p2[label] = runner.record(ExperimentConfig(shape, "colsum_pass2", 1.0, 128, label), ms, S).ms
            del o, lse, cs
        except Exception as exc:
            print(f"  colsum {label}: {type(exc).__name__}: {str(exc)[:200]}")
    if p1:
        best["pass1"] = min(p1, key=p1.get)
    if p2:
        best["pass2"] = min(p2, key=p2.get)
    return best


def _pass1_only(q, k, v, scale, cfg):
    B, H, S, D = q.shape
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    bias = q.new_zeros((1, 1, 1), dtype=torch.float32)
    colsum_mod._attention_fwd_kernel[(triton.cdiv(S, cfg.fwd_block_m), H, B)](
        q, k, v, bias, out, lse, S, k.shape[2], scale * colsum_mod._LOG2E,
        *q.stride(), *k.stride(), *v.stride(), 0, 0, 0,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        GQA_RATIO=H // k.shape[1], HEAD_DIM=D, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n,
        HAS_BIAS=False, UPCAST=False, PRECISION="tf32", OFF64=False,
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )  # fmt: skip
    return out


def _pass2_only(q, k, lse, scale, cfg, group_size=128):
    B, H, S, D = q.shape
    Sk = k.shape[2]
    G = triton.cdiv(S, group_size)
    colsum = torch.empty((B, H, G, Sk), dtype=torch.float32, device=q.device)
    bias = q.new_zeros((1, 1, 1), dtype=torch.float32)
    colsum_mod._attention_colsum_kernel[(triton.cdiv(Sk, cfg.colsum_block_n), H, B)](
        q, k, bias, lse, colsum, S, Sk, G, scale * colsum_mod._LOG2E,
        *q.stride(), *k.stride(), 0, 0, 0, lse.stride(0), lse.stride(1),
        colsum.stride(0), colsum.stride(1), colsum.stride(2),
        GQA_RATIO=H // k.shape[1], GROUP_SIZE=group_size, HEAD_DIM=D, BLOCK_N=cfg.colsum_block_n,
        BLOCK_M=cfg.colsum_block_m, HAS_BIAS=False, UPCAST=False, PRECISION="tf32", OFF64=False,
        num_warps=cfg.colsum_warps, num_stages=cfg.colsum_stages,
    )  # fmt: skip
    return colsum


# --------------------------------------------------------------------------------------------- main


def run_shape(
    runner: Runner,
    shape: Shape,
    kept_list,
    *,
    flex: bool,
    csa_cfg=None,
    csa_label="default",
    colsum_cfg=None,
    colsum_label="default",
    do_sweep=False,
    selection_kept=(0.07,),
) -> dict:
    print(f"== {shape}", flush=True)
    q, k, v = _make_qkv(shape, runner.device, runner.dtype)
    base = torch.randn_like(q)
    runner.dense(shape, q, k, v)
    best = {}
    if do_sweep:
        best = sweep(runner, shape, q, k, v, base)
        print(f"  best: {best}", flush=True)
        csa_cfg, csa_label = CSA_SWEEP[best["csa"]], best["csa"]
    for kept in kept_list:
        runner.csa(shape, q, k, v, base, kept, config=csa_cfg, variant=csa_label)
        if flex:
            try:
                runner.flex(shape, q, k, v, kept)
            except Exception as exc:
                print(f"  flex: {type(exc).__name__}: {str(exc)[:300]}")
    for kept in selection_kept:
        runner.selection(shape, q, k, v, kept, config=colsum_cfg, variant=colsum_label)
        if do_sweep and "pass1" in best and "pass2" in best:
            p1, p2 = COLSUM_SWEEP[best["pass1"]], COLSUM_SWEEP[best["pass2"]]
            for dense_pass in ("triton", "cudnn"):
                cfg = dataclasses.replace(p2, dense_pass=dense_pass, fwd_block_m=p1.fwd_block_m,
                                          fwd_block_n=p1.fwd_block_n, fwd_warps=p1.fwd_warps,
                                          fwd_stages=p1.fwd_stages)  # fmt: skip
                label = f"{dense_pass}+{best['pass1']}+{best['pass2']}"
                runner.selection(shape, q, k, v, kept, config=cfg, variant=label, parts=False)
    if shape.seq >= 32768 and kept_list:
        for gs in (64, 192):  # the paper's 192-query groups, and finer 64-query groups, at one fraction
            cfg = csa_cfg if csa_cfg is not None and gs % csa_cfg.block_m == 0 else None
            runner.csa(shape, q, k, v, base, 0.07, group_size=gs, config=cfg, variant=csa_label if cfg else "default")
    return best


_CFG_FIELDS = (
    "name",
    "batch",
    "heads",
    "seq",
    "head_dim",
    "method",
    "kept",
    "kept_actual",
    "group_size",
    "variant",
)


def csv_path(out_dir: Path, card: str) -> Path:
    return out_dir / f"attention_{card}_{datetime.date.today().isoformat()}.csv"


def append_csv(path: Path, results: list[ExperimentResult], card: str) -> None:
    """Append rows (header first if the file is new): run metadata, the config, then the timings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, git_sha=git_sha())
    meta["date"] = datetime.date.today().isoformat()
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow([*meta, *_CFG_FIELDS, "ms", "speedup_vs_cudnn", "tflops"])
        for r in results:
            c = r.config
            s = dataclasses.asdict(c.shape)
            w.writerow([*meta.values(), s["name"], s["batch"], s["heads"], s["seq"], s["head_dim"], c.method,
                        c.kept, f"{r.kept_actual:.5f}", c.group_size, c.variant, f"{r.ms:.4f}",
                        f"{r.speedup_vs_cudnn:.3f}", f"{r.tflops:.1f}"])  # fmt: skip


def print_table(results: list[ExperimentResult]) -> None:
    rows = []
    for r in results:
        c = r.config
        if c.method not in ("cudnn", "csa", "flex", "selection", "topk"):
            continue
        kept = c.kept if c.method in ("selection", "topk") else r.kept_actual
        rows.append((c.shape.name, c.method, f"{kept:.3f}", c.group_size, c.variant, f"{r.ms:.3f}",
                     f"{r.speedup_vs_cudnn:.2f}", f"{r.tflops:.0f}"))  # fmt: skip
    head = ("shape", "method", "kept", "group", "variant", "ms", "x cudnn", "TFLOP/s")
    try:
        from tabulate import tabulate

        print(tabulate(rows, headers=head))
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        for row in (head, *rows):
            print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="flux,32k", help="comma list of flux,32k,hunyuan or 'all'")
    p.add_argument("--kept", default=",".join(str(x) for x in KEPT))
    p.add_argument("--check", action="store_true", help="bf16 correctness against the references first")
    p.add_argument("--sweep", action="store_true", help="sweep launch configs on the S=32k shape")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    card = torch.cuda.get_device_name().replace(" ", "-") if device == "cuda" else "cpu"
    path = csv_path(Path(args.out_dir), card)
    runner = Runner(device, dtype, sink=lambda r: append_csv(path, [r], card))
    print(f"card={card} torch={torch.__version__} triton={triton.__version__}", flush=True)

    if args.check:
        t0 = time.time()
        for line in check_correctness(device, dtype):
            print("  " + line, flush=True)
        print(f"  (checks {time.time() - t0:.1f} s)", flush=True)

    kept_list = [float(x) for x in args.kept.split(",") if x]
    if args.smoke:
        names = ["smoke"]
    elif args.shapes == "all":
        names = ["flux", "32k", "hunyuan"]
    else:
        names = args.shapes.split(",")
    if args.sweep and "32k" in names:  # the sweep picks the launch configs the other shapes use
        names.remove("32k")
        names.insert(0, "32k")
    best: dict = {}
    for name in names:
        shape = SHAPES[name]
        t0 = time.time()
        big = shape.seq > 100_000
        if name in ("32k", "flux", "smoke") and args.sweep:
            shape_best = run_shape(runner, shape, kept_list, flex=not (args.no_flex or args.smoke), do_sweep=True)
            best = best or shape_best  # the first swept shape (S=32k) sets the configs of unswept shapes
        else:
            csa_cfg = CSA_SWEEP.get(best.get("csa", ""))
            run_shape(
                runner, shape, [0.07] if big else kept_list, flex=not (args.no_flex or big or args.smoke),
                csa_cfg=csa_cfg, csa_label=best.get("csa", "default"),
            )  # fmt: skip
        print(f"  ({shape.name}: {time.time() - t0:.1f} s)", flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None

    print(f"\nappended {len(runner.results)} rows to {path}")
    print_table(runner.results)


if __name__ == "__main__":
    main()
