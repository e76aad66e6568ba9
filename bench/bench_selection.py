"""Cost of choosing columns (``select_columns``) at real shapes, on CUDA, with a breakdown.

    python bench/bench_selection.py

FLUX MLP: scores (1, 34, 12288), 30% + 5% random; FLUX attention: (1, 24, 34, 4352), 15.4%.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from chipmunk_compile.selection import column_budget, select_columns

CASES = {
    "mlp (1,34,12288)": ((1, 34, 12288), 0.3, 0.05),
    "attention (1,24,34,4352)": ((1, 24, 34, 4352), 672 / 4352, 0.0),
}


def bench_case(shape: tuple[int, ...], keep: float, rnd: float) -> dict[str, float]:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    scores = torch.rand(shape, device=dev)
    half = scores.half()
    k_top, n_rand = column_budget(keep, rnd, shape[-1])
    us = lambda fn: do_bench(fn, return_mode="median") * 1e3  # noqa: E731
    return {
        "select_columns": us(lambda: select_columns(scores, k_top, n_rand, gen)),
        "topk_fp32": us(lambda: torch.topk(scores, k_top, dim=-1, sorted=False)),
        "topk_fp16": us(lambda: torch.topk(half, k_top, dim=-1, sorted=False)),
        "sort_fp32": us(lambda: torch.sort(scores, dim=-1, descending=True)),
        "rand": us(lambda: torch.rand(shape, generator=gen, device=dev)),
        "k_top": k_top,
        "n_rand": n_rand,
    }


def main() -> None:
    for name, case in CASES.items():
        row = bench_case(*case)
        print(name, " ".join(f"{k}={v:.0f}" for k, v in row.items()), "(us)")


if __name__ == "__main__":
    main()
