"""Cost of choosing columns at real shapes, on CUDA: the PyTorch ``select_columns`` (with a breakdown) and
the one-launch Triton ``select_topk_random``, device time (median, ``do_bench``) and host time per call;
then the MLP re-selection block unfused (drift score, selection, reference refresh) against the fused
``select_units_drift``, plain and gated.

    python bench/bench_selection.py

FLUX MLP: scores (1, 34, 12288), 30% + 5% random; FLUX attention: (1, 24, 34, 4352), 15.4%.
Host time: ``time.perf_counter`` around 100 calls with no sync, divided by 100 (what a host-bound
denoising loop pays per selection). Before timing, the kernel's output is checked against ``torch.topk``
(top part) and its exact PyTorch reference.
"""

from __future__ import annotations

import torch
from _harness import host_us  # noqa: E402  (bench/ is the script's directory)
from chipmunk_compile.kernels import select_units as su
from chipmunk_compile.kernels.select_columns import default_num_warps, select_columns_ref, select_topk_random
from triton.testing import do_bench

from chipmunk_compile.selection import column_budget, select_columns, select_columns_fast

CASES = {
    "mlp (1,34,12288)": ((1, 34, 12288), 0.3, 0.05),
    "attention (1,24,34,4352)": ((1, 24, 34, 4352), 672 / 4352, 0.0),
}


def check_kernel(scores: torch.Tensor, k_top: int, n_rand: int) -> None:
    """The kernel's output is valid: top part == torch.topk's set, n_rand others, distinct, ascending."""
    out = select_topk_random(scores, k_top, n_rand, seed=1234)
    rows, n = scores.shape
    assert out.shape == (rows, k_top + n_rand) and out.dtype == torch.int32
    assert bool(((out >= 0) & (out < n)).all()), "index out of range"
    assert bool((out[:, 1:] > out[:, :-1]).all()), "not strictly ascending"
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, out.long(), True)
    top = torch.topk(scores, k_top, dim=-1, sorted=False).indices  # torch.rand scores: no ties in practice
    assert bool(chosen.gather(1, top).all()), "top part differs from torch.topk"
    assert torch.equal(out, select_columns_ref(scores, k_top, n_rand, seed=1234)), "differs from the reference"
    other = select_topk_random(scores, k_top, n_rand, seed=1235)
    assert n_rand == 0 or not torch.equal(out, other), "random part does not depend on the seed"


def bench_case(shape: tuple[int, ...], keep: float, rnd: float) -> dict[str, float]:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    scores = torch.rand(shape, device=dev)
    flat = scores.view(-1, shape[-1])
    half = scores.half()
    k_top, n_rand = column_budget(keep, rnd, shape[-1])
    check_kernel(flat, k_top, n_rand)
    us = lambda fn: do_bench(fn, return_mode="median") * 1e3  # noqa: E731
    torch_path = lambda: select_columns(scores, k_top, n_rand, gen, all_valid=True)  # noqa: E731
    kernel = lambda: select_topk_random(flat, k_top, n_rand, 7)  # noqa: E731
    fast = lambda: select_columns_fast(scores, k_top, n_rand, 7)  # noqa: E731
    row = {
        "k_top": k_top,
        "n_rand": n_rand,
        "select_columns": us(lambda: select_columns(scores, k_top, n_rand, gen)),
        "select_columns_all_valid": us(torch_path),
        "select_topk_random": us(kernel),
        "select_columns_fast": us(fast),
        "topk_fp32": us(lambda: torch.topk(scores, k_top, dim=-1, sorted=False)),
        "topk_fp16": us(lambda: torch.topk(half, k_top, dim=-1, sorted=False)),
        "sort_fp32": us(lambda: torch.sort(scores, dim=-1, descending=True)),
        "rand": us(lambda: torch.rand(shape, generator=gen, device=dev)),
        "host_select_columns_all_valid": host_us(torch_path),
        "host_select_topk_random": host_us(kernel),
        "host_select_columns_fast": host_us(fast),
    }
    default = default_num_warps(shape[-1])
    for warps in sorted({max(4, default // 2), default, min(32, default * 2)}):
        row[f"select_topk_random_w{warps}"] = us(lambda w=warps: select_topk_random(flat, k_top, n_rand, 7,
                                                                                  num_warps=w))
    return row


def bench_units(gated: bool, f: int = 12288, rows: int = 34) -> dict[str, float]:
    """The MLP re-selection at FLUX's shape: unfused ops vs the fused kernel (equal results checked first)."""
    k_top, n_rand = column_budget(0.3, 0.05, f)
    bm = torch.randn(1, rows, 2 * f if gated else f, device="cuda")
    ref0 = bm + 0.1 * torch.randn_like(bm)
    ref = ref0.clone()

    def unfused():
        diff = torch.sub(bm, ref).abs_()
        if gated:
            diff = diff[..., :f] + diff[..., f:]
        idx = select_columns_fast(diff, k_top, n_rand, 7)
        cols = torch.cat([idx, idx + f], dim=-1).long() if gated else idx.long()
        ref.scatter_(-1, cols, bm.gather(-1, cols))
        return idx

    fused = lambda: su.select_units_drift(bm, ref, k_top, n_rand, 7, gated=gated)  # noqa: E731
    ref.copy_(ref0)
    a, ra = unfused(), ref.clone()
    ref.copy_(ref0)
    b, rb = fused(), ref.clone()
    assert torch.equal(a, b) and torch.equal(ra, rb), "fused selection differs from the unfused ops"
    row = {}
    for name, fn in (("unfused", unfused), ("fused", fused)):
        row[name] = do_bench(fn, return_mode="median") * 1e3
        row[f"host_{name}"] = min(host_us(fn) for _ in range(5))
    return row


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for name, case in CASES.items():
        row = bench_case(*case)
        print(name, " ".join(f"{k}={v:.0f}" for k, v in row.items()), "(us; host_* = host time per call)")
    for gated in (False, True):
        row = bench_units(gated)
        print(f"mlp re-selection{' gated' if gated else ''} (1,34,12288)", " ".join(f"{k}={v:.1f}" for k, v in
              row.items()), "(us; host_* = host time per call, best of 5)")


if __name__ == "__main__":
    main()
