"""Experiment: structural variants of the column-sparse MLP kernels at the FLUX shape (GPU only).

Variants of mm1 (x·W1[S]ᵀ, GELU, cache delta) and mm2 (P·W2ᵀ[S] added to the output cache):
- the dense operand (x for mm1, P for mm2) loaded by TMA (a host tensor descriptor) instead of pointers;
- persistent grids (one program per SM walking the tiles, loop nest flattened so the next tile's loads
  overlap this tile's epilogue) instead of one program per tile;
- tile shapes / warps / stages.
Each variant's outputs are checked against the shipped kernel on the same inputs, then timed with
``triton.testing.do_bench`` (L2 flushed). Reference rows: cuBLAS GEMMs of the same FLOPs, the dense MLP.

    python bench/tune_mlp_variants.py --out results.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys

import torch
import triton
import triton.language as tl
from _harness import git_sha  # noqa: E402
from chipmunk_compile.kernels import column_sparse_mlp as csm
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _up_variant(
    x_ptr, x_desc, w1_ptr, b1_ptr, idx_ptr, act_ptr, p_ptr,
    S, K, N_ROW_TILES, N_TILES, N_PROGS,
    stride_xs, stride_w1f, stride_im, stride_af, stride_ps,
    DIN: tl.constexpr, BLOCK_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    TMA_A: tl.constexpr, FLATTEN: tl.constexpr,
):
    pid = tl.program_id(0)
    ks = tl.arange(0, BK)
    for tile in tl.range(pid, N_TILES, N_PROGS, flatten=FLATTEN):
        mt = tile % N_ROW_TILES
        nt = tile // N_ROW_TILES
        sel = (mt * BM) // BLOCK_SIZE
        rows = mt * BM + tl.arange(0, BM)
        row_ok = rows < S
        p = nt * BN + tl.arange(0, BN)
        p_ok = p < K
        units = tl.load(idx_ptr + sel * stride_im + p, mask=p_ok, other=0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, DIN, BK):
            if TMA_A:
                xt = x_desc.load([mt * BM, k0])
            else:
                xt = tl.load(x_ptr + rows[:, None] * stride_xs + (k0 + ks)[None, :], mask=row_ok[:, None], other=0.0)
            wt = tl.load(w1_ptr + units[:, None] * stride_w1f + (k0 + ks)[None, :])
            acc = tl.dot(xt, tl.trans(wt), acc)
        acc += tl.load(b1_ptr + units, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        a = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
        mask = row_ok[:, None] & p_ok[None, :]
        act_ptrs = act_ptr + units[None, :] * stride_af + rows[:, None]
        a_q = a.to(act_ptr.dtype.element_ty)
        old = tl.load(act_ptrs, mask=mask, other=0.0)
        delta = tl.where(mask, a_q.to(tl.float32) - old.to(tl.float32), 0.0)
        tl.store(act_ptrs, a_q, mask=mask)
        tl.store(p_ptr + rows[:, None] * stride_ps + p[None, :], delta.to(p_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit
def _down_variant(
    p_ptr, p_desc, w2_ptr, idx_ptr, out_ptr, copy_ptr,
    S, K, K_PAD, N_ROW_TILES, N_TILES, N_PROGS,
    stride_ps, stride_w2f, stride_im, stride_os,
    DOUT: tl.constexpr, BLOCK_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    TMA_A: tl.constexpr, FLATTEN: tl.constexpr,
):
    pid = tl.program_id(0)
    ps = tl.arange(0, BK)
    for tile in tl.range(pid, N_TILES, N_PROGS, flatten=FLATTEN):
        mt = tile % N_ROW_TILES
        nt = tile // N_ROW_TILES
        sel = (mt * BM) // BLOCK_SIZE
        rows = mt * BM + tl.arange(0, BM)
        row_ok = rows < S
        cols = nt * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K_PAD, BK):
            k_ok = (k0 + ps) < K
            units = tl.load(idx_ptr + sel * stride_im + k0 + ps, mask=k_ok, other=0)
            if TMA_A:
                pt = p_desc.load([mt * BM, k0])
            else:
                pt = tl.load(p_ptr + rows[:, None] * stride_ps + (k0 + ps)[None, :], mask=row_ok[:, None], other=0.0)
            wt = tl.load(w2_ptr + units[:, None] * stride_w2f + cols[None, :], mask=k_ok[:, None], other=0.0)
            acc = tl.dot(pt, wt, acc)
        offs = rows[:, None] * stride_os + cols[None, :]
        mask = row_ok[:, None]
        old = tl.load(out_ptr + offs, mask=mask, other=0.0)
        new = (old.to(tl.float32) + acc).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, new, mask=mask)
        tl.store(copy_ptr + offs, new, mask=mask)


def _launch_up(x, w1, b1, idx, act, packed, bm, bn, bk, warps, stages, tma, persistent, flatten, n_sms):
    s, din = x.shape[1], x.shape[2]
    k = idx.shape[2]
    n_rows = triton.cdiv(s, bm)
    n_tiles = n_rows * (packed.shape[2] // bn)
    progs = min(n_sms, n_tiles) if persistent else n_tiles
    x2 = x[0]
    desc = TensorDescriptor.from_tensor(x2, [bm, bk]) if tma else x2
    _up_variant[(progs,)](
        x2, desc, w1, b1, idx, act, packed,
        s, k, n_rows, n_tiles, progs,
        x2.stride(0), w1.stride(0), idx.stride(1), act.stride(1), packed.stride(1),
        DIN=din, BLOCK_SIZE=128, BM=bm, BN=bn, BK=bk, TMA_A=tma, FLATTEN=flatten,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _launch_down(packed, w2t, idx, out_cache, out, bm, bn, bk, warps, stages, tma, persistent, flatten, n_sms):
    s, k_pad = packed.shape[1], packed.shape[2]
    dout = w2t.shape[1]
    k = idx.shape[2]
    n_rows = triton.cdiv(s, bm)
    n_tiles = n_rows * (dout // bn)
    progs = min(n_sms, n_tiles) if persistent else n_tiles
    p2 = packed[0]
    desc = TensorDescriptor.from_tensor(p2, [bm, bk]) if tma else p2
    _down_variant[(progs,)](
        p2, desc, w2t, idx, out_cache, out,
        s, k, k_pad, n_rows, n_tiles, progs,
        p2.stride(0), w2t.stride(0), idx.stride(1), out_cache.stride(1),
        DOUT=dout, BLOCK_SIZE=128, BM=bm, BN=bn, BK=bk, TMA_A=tma, FLATTEN=flatten,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


UP = {  # name: (bm, bn, bk, warps, stages, tma, persistent, flatten)
    "up 128x256 s4 ptr": (128, 256, 64, 8, 4, False, False, False),
    "up 128x256 s4 tma": (128, 256, 64, 8, 4, True, False, False),
    "up 128x256 s3 tma": (128, 256, 64, 8, 3, True, False, False),
    "up 128x256 s4 ptr persist": (128, 256, 64, 8, 4, False, True, False),
    "up 128x256 s4 ptr persist flat": (128, 256, 64, 8, 4, False, True, True),
    "up 128x256 s4 tma persist flat": (128, 256, 64, 8, 4, True, True, True),
    "up 128x256 s3 tma persist flat": (128, 256, 64, 8, 3, True, True, True),
    "up 128x128 s4 ptr w4": (128, 128, 64, 4, 4, False, False, False),
    "up 128x128 s4 tma w4": (128, 128, 64, 4, 4, True, False, False),
    "up 128x128 s4 tma w8": (128, 128, 64, 8, 4, True, False, False),
    "up 128x128 s5 tma w4 persist flat": (128, 128, 64, 4, 5, True, True, True),
    "up 128x256 bk128 s3 tma": (128, 256, 128, 8, 3, True, False, False),
}
DOWN = {
    "down 128x128 s4 ptr": (128, 128, 64, 8, 4, False, False, False),
    "down 128x128 s4 tma": (128, 128, 64, 8, 4, True, False, False),
    "down 128x128 s4 ptr persist flat": (128, 128, 64, 8, 4, False, True, True),
    "down 128x128 s4 tma persist flat": (128, 128, 64, 8, 4, True, True, True),
    "down 128x256 s3 tma": (128, 256, 64, 8, 3, True, False, False),
    "down 128x256 s4 tma": (128, 256, 64, 8, 4, True, False, False),
    "down 128x256 s3 tma persist flat": (128, 256, 64, 8, 3, True, True, True),
    "down 128x256 s4 tma persist flat": (128, 256, 64, 8, 4, True, True, True),
    "down 128x128 s4 tma w4": (128, 128, 64, 4, 4, True, False, False),
    "down 128x192 s4 tma persist flat": (128, 192, 64, 8, 4, True, True, True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--units", type=int, default=4352)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    b, s, din, f, dout = 1, 4352, 3072, 12288, 3072
    dt = torch.bfloat16
    x = torch.randn(b, s, din, device=dev, dtype=dt)
    x2 = torch.randn(b, s, din, device=dev, dtype=dt)
    w1 = torch.randn(f, din, device=dev, dtype=dt) / din**0.5
    b1 = torch.randn(f, device=dev, dtype=dt) * 0.1
    w2 = torch.randn(dout, f, device=dev, dtype=dt) / f**0.5
    w2t = w2.t().contiguous()
    nb = s // 128
    k = args.units
    idx = torch.stack([torch.randperm(f, device=dev)[:k].sort().values for _ in range(nb)]).int()[None]
    act0 = torch.randn(b, f, s, device=dev, dtype=dt)
    out0 = torch.randn(b, s, dout, device=dev, dtype=dt)
    n_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    card = torch.cuda.get_device_name(dev)
    rows = []

    def row(name, ms, flops, ok=""):
        rows.append(dict(card=card, torch=torch.__version__, triton=triton.__version__, git_sha=git_sha(),
                         date=datetime.date.today().isoformat(), variant=name, units=k, ms=f"{ms:.4f}",
                         tflops=f"{flops / ms / 1e9:.1f}", check=ok))
        print(f"{name:42s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s {ok}", flush=True)

    up_flops = 2 * s * din * k
    down_flops = 2 * s * k * dout
    # references: cuBLAS GEMMs of the same sizes, the shipped kernels
    a = torch.randn(s, din, device=dev, dtype=dt)
    bmat = torch.randn(din, k, device=dev, dtype=dt)
    row("cublas mm1-sized", triton.testing.do_bench(lambda: a @ bmat), up_flops)
    pm = torch.randn(s, k, device=dev, dtype=dt)
    row("cublas mm2-sized", triton.testing.do_bench(lambda: pm @ w2t[:k]), down_flops)
    row("cublas dense mm1", triton.testing.do_bench(lambda: x[0] @ w1.t()), 2 * s * din * f)
    cfg = csm.default_config(False, dt)
    k_pad = triton.cdiv(k, max(cfg.up_bn, cfg.down_bk)) * max(cfg.up_bn, cfg.down_bk)
    packed_ref = torch.empty(b, s, k_pad, device=dev, dtype=dt)
    act_ref = act0.clone()
    csm._launch_up(x, w1, b1, idx, act_ref, packed_ref, "gelu_tanh", False, 128, cfg)
    out_ref = out0.clone()
    copy_ref = torch.empty_like(out_ref)
    csm._launch_down(packed_ref, w2t.t(), idx, out_ref, 128, cfg, copy=copy_ref)
    torch.cuda.synchronize()
    act_t = act0.clone()
    pk = torch.empty_like(packed_ref)
    xs = [x, x2]
    it = [0]

    def shipped_up():
        it[0] ^= 1
        csm._launch_up(xs[it[0]], w1, b1, idx, act_t, pk, "gelu_tanh", False, 128, cfg)

    row("shipped mm1", triton.testing.do_bench(shipped_up), up_flops)
    out_t = out0.clone()
    cp = torch.empty_like(out_t)
    row("shipped mm2", triton.testing.do_bench(
        lambda: csm._launch_down(packed_ref, w2t.t(), idx, out_t, 128, cfg, copy=cp)), down_flops)

    for name, (bm, bn, bk, warps, stages, tma, persistent, flatten) in UP.items():
        try:
            act_v = act0.clone()
            pv = torch.empty_like(packed_ref)
            _launch_up(x, w1, b1, idx, act_v, pv, bm, bn, bk, warps, stages, tma, persistent, flatten, n_sms)
            torch.cuda.synchronize()
            ok = "ok" if torch.equal(act_v, act_ref) and torch.equal(pv, packed_ref) else (
                f"MISMATCH act {(act_v.float() - act_ref.float()).abs().max().item():.3g} "
                f"P {(pv.float() - packed_ref.float()).abs().max().item():.3g}")

            def run(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, tma=tma, persistent=persistent,
                    flatten=flatten, act_v=act_v, pv=pv):
                it[0] ^= 1
                _launch_up(xs[it[0]], w1, b1, idx, act_v, pv, bm, bn, bk, warps, stages, tma, persistent,
                           flatten, n_sms)

            row(name, triton.testing.do_bench(run), up_flops, ok)
        except Exception as err:  # noqa: BLE001
            print(f"{name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append(dict(card=card, variant=name, check=f"FAILED {type(err).__name__}"))
    for name, (bm, bn, bk, warps, stages, tma, persistent, flatten) in DOWN.items():
        try:
            ov = out0.clone()
            cv = torch.empty_like(ov)
            _launch_down(packed_ref, w2t, idx, ov, cv, bm, bn, bk, warps, stages, tma, persistent, flatten, n_sms)
            torch.cuda.synchronize()
            ok = "ok" if torch.equal(ov, out_ref) and torch.equal(cv, out_ref) else (
                f"MISMATCH {(ov.float() - out_ref.float()).abs().max().item():.3g}")

            def run(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, tma=tma, persistent=persistent,
                    flatten=flatten, ov=ov, cv=cv):
                _launch_down(packed_ref, w2t, idx, ov, cv, bm, bn, bk, warps, stages, tma, persistent, flatten,
                             n_sms)

            row(name, triton.testing.do_bench(run), down_flops, ok)
        except Exception as err:  # noqa: BLE001
            print(f"{name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append(dict(card=card, variant=name, check=f"FAILED {type(err).__name__}"))
    keys = ["card", "torch", "triton", "git_sha", "date", "variant", "units", "ms", "tflops", "check"]
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({kk: r.get(kk, "") for kk in keys})


if __name__ == "__main__":
    sys.exit(main())
