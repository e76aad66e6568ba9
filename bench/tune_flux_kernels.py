"""Launch-configuration sweep of every kernel a FLUX sparse step runs, at FLUX's shapes (GPU only).

A FLUX.1-dev sparse step at 1280×768 (4352 tokens) runs per MLP site the two sparse MLP kernels with 4352
of 12288 units (the flux preset's 30% + 5% random, padded to the unit tile), per attention site the
column-sparse attention kernel with 672 of 4352 keys per 128-query group, and on selection steps the
fused unit selection (34 rows × 12288 units) after the block-mean first linear (34 × 3072 → 12288).
The attention configurations also run at S=32768 with 7% of the keys (the shipped default serves both).
This script times each of them under several launch configurations with ``triton.testing.do_bench``
(L2 flushed), so the shipped defaults can be checked on the card at hand. Outputs of every configuration
are compared with the default's (same inputs) before it is timed.

    python bench/tune_flux_kernels.py --out results.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys

import torch
import torch.nn.functional as F
import triton
from _harness import git_sha  # noqa: E402
from chipmunk_compile.kernels import column_sparse_attention as csa
from chipmunk_compile.kernels import column_sparse_mlp as csm
from chipmunk_compile.kernels import select_units as su

S, DIN, F_UNITS, DOUT, K_UNITS = 4352, 3072, 12288, 3072, 4352
HEADS, HEAD_DIM, KEYS = 24, 128, 672

_D = csm.default_config(False)
# The default only. Tried on an H100 in session 7 (bench/results/flux_kernels_NVIDIA-H100_session7.csv): tiles
# whose pipeline buffers leave room for two programs per SM (mm2 with 3 stages, or 32-wide K steps with 6;
# mm1 with 128-unit tiles) and deeper 32-wide K pipelines were all slower than the defaults (mm2 by 5-17%).
MLP_CONFIGS = {"default": _D}
_K = csa.KernelConfig
ATTN_CONFIGS = {
    "default": csa._pick_config(HEAD_DIM, 128),
    "m64n32w4s6": _K(64, 32, 4, 6),
    "m64n32w4s5": _K(64, 32, 4, 5),
    "m64n64w4s4": _K(64, 64, 4, 4),
    "m64n64w4s5": _K(64, 64, 4, 5),
    "m128n32w8s6": _K(128, 32, 8, 6),
    "m128n32w8s5": _K(128, 32, 8, 5),
    "m128n64w8s4": _K(128, 64, 8, 4),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--old-select", default="", help="folder holding oldsel.py: a copy of an earlier selection kernel "
                    "with run_old(bm, ref, k_top, n_rand, seed), timed beside the current one (before/after)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    dt = torch.bfloat16
    card = torch.cuda.get_device_name(dev)
    rows: list[dict] = []

    def row(section, name, ms, flops=0.0, check=""):
        tf = f"{flops / ms / 1e9:.1f}" if flops else ""
        rows.append(dict(card=card, torch=torch.__version__, triton=triton.__version__, git_sha=git_sha(),
                         date=datetime.date.today().isoformat(), section=section, config=name, ms=f"{ms:.4f}",
                         tflops=tf, check=check))
        print(f"{section:10s} {name:22s} {ms * 1000:9.1f} us {tf:>7s} TFLOP/s {check}", flush=True)

    torch.manual_seed(0)
    # --- selection: block-mean first linear and fused unit selection
    nb = S // 128
    w1 = torch.randn(F_UNITS, DIN, device=dev, dtype=dt) / DIN**0.5
    b1 = torch.randn(F_UNITS, device=dev, dtype=dt) * 0.1
    xm = torch.randn(1, nb, DIN, device=dev, dtype=dt)
    row("select", "bm F.linear", triton.testing.do_bench(lambda: F.linear(xm, w1, b1)))
    row("select", "bm w1 @ xmT", triton.testing.do_bench(lambda: torch.addmm(b1[:, None], w1, xm[0].t())))
    xm64 = torch.zeros(64, DIN, device=dev, dtype=dt)
    row("select", "bm padded 64", triton.testing.do_bench(lambda: F.linear(xm64, w1, b1)))
    bm = torch.randn(1, nb, F_UNITS, device=dev)
    ref = torch.randn(1, nb, F_UNITS, device=dev)
    k_top = round(0.3 * F_UNITS)
    n_rand = K_UNITS - k_top
    for warps in (16,):
        row("select", f"units w{warps}", triton.testing.do_bench(
            lambda warps=warps: su.select_units_drift(bm, ref.clone(), k_top, n_rand, 1, gated=False,
                                                      num_warps=warps)))
    row("select", "clone only", triton.testing.do_bench(lambda: ref.clone()))
    if args.old_select:  # a copy of an earlier selection kernel, for a before/after on the same card
        sys.path.insert(0, args.old_select)
        import oldsel

        same = torch.equal(oldsel.run_old(bm, ref.clone(), k_top, n_rand, 1),
                           su.select_units_drift(bm, ref.clone(), k_top, n_rand, 1, gated=False))
        row("select", "units old w16", triton.testing.do_bench(
            lambda: oldsel.run_old(bm, ref.clone(), k_top, n_rand, 1)), check="equal" if same else "DIFFERENT")

    # --- sparse MLP kernels
    x = torch.randn(1, S, DIN, device=dev, dtype=dt)
    w2t = (torch.randn(F_UNITS, DOUT, device=dev, dtype=dt) / F_UNITS**0.5)
    idx = torch.stack([torch.randperm(F_UNITS, device=dev)[:K_UNITS].sort().values for _ in range(nb)]).int()[None]
    act0 = torch.randn(1, F_UNITS, S, device=dev, dtype=dt)
    out0 = torch.randn(1, S, DOUT, device=dev, dtype=dt)
    up_flops, down_flops = 2 * S * DIN * K_UNITS, 2 * S * K_UNITS * DOUT
    ref_out = None
    for name, cfg in MLP_CONFIGS.items():
        try:
            act, out, copy = act0.clone(), out0.clone(), torch.empty_like(out0)
            packed = csm._alloc_packed(x, w2t.t(), K_UNITS, cfg)
            csm._launch_up(x, w1, b1, idx, act, packed, "gelu_tanh", False, 128, cfg)
            csm._launch_down(packed, w2t.t(), idx, out, 128, cfg, copy=copy)
            torch.cuda.synchronize()
            if ref_out is None:
                ref_out, ref_act = out.clone(), act.clone()
                check = "reference"
            else:
                err = (out.float() - ref_out.float()).abs().max().item()
                check = "equal" if err == 0 and torch.equal(act, ref_act) else f"max diff {err:.3g}"
            row("mlp up", name, triton.testing.do_bench(lambda cfg=cfg, act=act, packed=packed: csm._launch_up(
                x, w1, b1, idx, act, packed, "gelu_tanh", False, 128, cfg)), up_flops, check)
            row("mlp down", name, triton.testing.do_bench(lambda cfg=cfg, out=out, copy=copy, packed=packed:
                csm._launch_down(packed, w2t.t(), idx, out, 128, cfg, copy=copy)), down_flops, check)
        except Exception as err:  # noqa: BLE001 - a config that fails to compile must not stop the sweep
            print(f"mlp {name}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
    del act0

    # --- column-sparse attention: FLUX (672 of 4352 keys per group) and S=32k at 7% kept
    for seq, keys in ((S, KEYS), (32768, round(0.07 * 32768))):
        q, k, v, base = (torch.randn(1, seq, HEADS, HEAD_DIM, device=dev, dtype=dt).transpose(1, 2) for _ in range(4))
        g = seq // 128
        ind = torch.empty(1, HEADS, g, keys, dtype=torch.int32, device=dev)
        for h in range(HEADS):
            ind[0, h] = torch.rand(g, seq, device=dev).topk(keys, dim=-1).indices.sort(dim=-1).values.int()
        counts = torch.full((1, HEADS, g), keys, dtype=torch.int32, device=dev)
        attn_flops = 4 * seq * keys * HEAD_DIM * HEADS
        ref_o = None
        for name, cfg in ATTN_CONFIGS.items():
            try:
                def run(cfg=cfg, q=q, k=k, v=v, base=base, ind=ind, counts=counts):
                    return csa.column_sparse_attention(q, k, v, ind, counts, scale=HEAD_DIM**-0.5, group_size=128,
                                                       base=base, config=cfg)
                o = run()
                torch.cuda.synchronize()
                if ref_o is None:
                    ref_o, check = o, "reference"
                else:
                    check = f"max diff {(o.float() - ref_o.float()).abs().max().item():.3g}"
                row(f"attn {seq}", name, triton.testing.do_bench(run), attn_flops, check)
            except Exception as err:  # noqa: BLE001
                print(f"attention {name}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
        row(f"attn {seq}", "cudnn dense", triton.testing.do_bench(
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)), 4 * seq * seq * HEAD_DIM * HEADS)
        del q, k, v, base, ind, ref_o

    keys = ["card", "torch", "triton", "git_sha", "date", "section", "config", "ms", "tflops", "check"]
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
