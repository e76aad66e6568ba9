"""Column selection kernel (top-k by score plus seeded random columns): the Triton kernel against its exact
PyTorch reference and against ``torch.topk`` semantics (CPU: TRITON_INTERPRET=1; GPU: real shapes), and the
``select_columns_fast`` / ``ModelState.next_seed`` wiring.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when @triton.jit decorates, so before the kernel module is imported (compile-notes §6.2).
    os.environ["TRITON_INTERPRET"] = "1"

from chipmunk_compile.kernels import select_columns as sc  # noqa: E402

from chipmunk_compile.config import ChipmunkConfig  # noqa: E402
from chipmunk_compile.selection import select_columns, select_columns_fast  # noqa: E402
from chipmunk_compile.state import ModelState  # noqa: E402

# Triton 3.6's interpreter converts 1-element arrays to scalars (numpy warns; harmless with numpy < 2.4).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (R, N, k_top, n_rand): edge budgets, N not a power of two (the row block is padded), R = 1 and 37.
CASES = {
    "single": (1, 1, 1, 0),
    "k_top=N": (2, 7, 7, 0),
    "n_rand=0": (3, 100, 30, 0),
    "n_rand=N-k_top": (3, 100, 10, 90),
    "k_top=1": (2, 65, 1, 20),
    "R=37": (37, 300, 45, 30),
    "N=1025": (2, 1025, 300, 50),
    "flux-mlp": (1, 12288, 3686, 430),
}


def _topk_expected(scores: torch.Tensor, k: int) -> list[set[int]]:
    """Per row, the k largest with ties at the threshold going to the lowest columns (independent of the
    kernel's reference: a threshold from torch.topk, then an explicit scan)."""
    out = []
    for row in scores:
        thr = torch.topk(row, k).values[-1]
        above = (row > thr).nonzero().flatten().tolist()
        tied = (row == thr).nonzero().flatten().tolist()
        out.append(set(above) | set(tied[: k - len(above)]))
    return out


def _split(out: torch.Tensor, top: list[set[int]]) -> list[set[int]]:
    """The random part of each row of ``out`` (its columns outside the top set)."""
    return [set(row.tolist()) - t for row, t in zip(out, top)]


def _check_valid(out: torch.Tensor, scores: torch.Tensor, k_top: int, n_rand: int) -> list[set[int]]:
    rows, n = scores.shape
    assert out.dtype == torch.int32 and tuple(out.shape) == (rows, k_top + n_rand)
    out = out.cpu()
    assert ((out >= 0) & (out < n)).all()
    assert (out[:, 1:] > out[:, :-1]).all(), "rows must be strictly ascending (sorted, distinct)"
    top = _topk_expected(scores.cpu(), k_top)
    for row, t in zip(out, top):
        assert t <= set(row.tolist()), "the top part must be the k_top best columns (ties: lower first)"
    rand = _split(out, top)
    assert all(len(r) == n_rand for r in rand)
    return rand


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_kernel_matches_ref_and_topk(case):
    rows, n, k_top, n_rand = CASES[case]
    scores = torch.randn(rows, n, device=DEVICE)
    out = sc.select_topk_random(scores, k_top, n_rand, seed=7)
    assert torch.equal(out, sc.select_columns_ref(scores, k_top, n_rand, seed=7))
    _check_valid(out, scores, k_top, n_rand)


@pytest.mark.parametrize("n_rand", [0, 9])
def test_ties_go_to_lower_columns(n_rand):
    # Few distinct values (many ties at the threshold), negatives, and both zeros (-0.0 ties with +0.0).
    scores = torch.randint(-3, 3, (5, 97), device=DEVICE).float()
    scores[:, ::2] *= -1.0  # turns some 0.0 into -0.0
    assert (torch.signbit(scores) & (scores == 0)).any()
    out = sc.select_topk_random(scores, 40, n_rand, seed=1)
    assert torch.equal(out, sc.select_columns_ref(scores, 40, n_rand, seed=1))
    _check_valid(out, scores, 40, n_rand)
    # All equal: the top part is the first k_top columns.
    flat = torch.full((2, 50), 0.5, device=DEVICE)
    assert torch.equal(sc.select_topk_random(flat, 20, 0, seed=0).cpu(), torch.arange(20).int().expand(2, 20))


@pytest.mark.parametrize("n_rand", [0, 13])
def test_keys_that_differ_only_in_low_bits(n_rand):
    # The threshold search goes 8 bits at a time from the top: scores 1 + j·ulp share their upper three
    # bytes, so the k-th largest is found only by the last pass; repeats put ties exactly at the threshold.
    ulp = torch.finfo(torch.float32).eps
    j = torch.randint(0, 600, (4, 301), device=DEVICE).float()
    scores = 1.0 + j * ulp
    scores[1] = -scores[1]  # negatives: the flipped-bit image
    out = sc.select_topk_random(scores, 77, n_rand, seed=5)
    assert torch.equal(out, sc.select_columns_ref(scores, 77, n_rand, seed=5))
    _check_valid(out, scores, 77, n_rand)


def test_extreme_values():
    scores = torch.randn(3, 200, device=DEVICE) * 1e-30
    scores[0, 5] = torch.finfo(torch.float32).max
    scores[1, 7] = -torch.finfo(torch.float32).max
    scores[2, :100] = -torch.finfo(torch.float32).tiny / 4  # subnormals
    out = sc.select_topk_random(scores, 60, 10, seed=3)
    assert torch.equal(out, sc.select_columns_ref(scores, 60, 10, seed=3))
    _check_valid(out, scores, 60, 10)


def test_random_part_seeded():
    scores = torch.randn(4, 257, device=DEVICE)
    a = sc.select_topk_random(scores, 50, 40, seed=11)
    assert torch.equal(a, sc.select_topk_random(scores, 50, 40, seed=11)), "deterministic per seed"
    top = _topk_expected(scores.cpu(), 50)
    rand_a = _split(a.cpu(), top)
    for seed in (12, 2**40 + 11, -5):
        b = sc.select_topk_random(scores, 50, 40, seed=seed)
        _check_valid(b, scores, 50, 40)
        assert all(x != y for x, y in zip(rand_a, _split(b.cpu(), top))), f"seed {seed} repeated seed 11"
    # Rows differ even with equal scores; the seed is taken modulo 2**62.
    same = sc.select_topk_random(scores[:1].expand(3, -1).contiguous(), 50, 40, seed=11)
    assert len({tuple(r.tolist()) for r in same}) == 3
    assert torch.equal(sc.select_topk_random(scores, 50, 40, seed=11 + 2**62), a)


def test_out_argument():
    scores = torch.randn(3, 64, device=DEVICE)
    out = torch.full((3, 20), -1, dtype=torch.int32, device=DEVICE)
    assert sc.select_topk_random(scores, 12, 8, seed=0, out=out) is out
    assert torch.equal(out, sc.select_columns_ref(scores, 12, 8, seed=0))


def test_random_part_stratified():
    """Each non-top column is drawn with probability n_rand / (N - k_top), whatever its position: one per
    stratum of (N - k_top) / n_rand consecutive non-top columns, uniformly within it, independently across
    strata."""
    n, k_top, n_rand = 48, 16, 8
    p = n_rand / (n - k_top)
    # The top columns are scattered (every third) so that a bias by position or by neighbour would show.
    base = torch.zeros(n)
    base[::3] = 1.0
    top = set(range(0, n, 3))
    rest = [c for c in range(n) if c not in top]
    strata = [rest[i : i + 4] for i in range(0, len(rest), 4)]  # M = 32 non-top columns, 8 strata of 4

    def frequencies(outs: list[torch.Tensor]) -> torch.Tensor:
        sel = torch.zeros(n)
        for o in outs:
            sel.index_add_(0, o.flatten().long().cpu(), torch.ones(o.numel()))
        return sel / sum(o.shape[0] for o in outs)

    # Kernel (slow under the interpreter): 16 rows (the hash depends on the row) x 2 seeds = 32 draws,
    # std of a frequency ~0.08; it equals the reference, which is then checked on many more draws.
    scores = base.expand(16, n).contiguous().to(DEVICE)
    outs = [sc.select_topk_random(scores, k_top, n_rand, seed=s) for s in range(2)]
    assert all(torch.equal(o, sc.select_columns_ref(scores, k_top, n_rand, seed=s)) for s, o in enumerate(outs))
    freq = frequencies(outs)
    assert torch.all(freq[sorted(top)] == 1)
    assert (freq[rest] - p).abs().max() < 0.35, freq[rest]
    # Reference (the same function, fast on CPU): 20000 draws, std ~0.003.
    outs = [sc.select_columns_ref(base.expand(1000, n), k_top, n_rand, seed=s) for s in range(20)]
    freq = frequencies(outs)
    assert (freq[rest] - p).abs().max() < 0.02, freq[rest]
    sel = torch.zeros(sum(o.shape[0] for o in outs), n)
    sel.scatter_(1, torch.cat(outs).long(), 1.0)
    # exactly one column per stratum in every draw
    for cols in strata:
        assert torch.all(sel[:, cols].sum(1) == 1)
    # columns of different strata are drawn independently: pair frequency p * p
    pair = sel[:, strata[0]].T @ sel[:, strata[1]] / sel.shape[0]
    assert (pair - p * p).abs().max() < 0.01, pair


def test_random_part_strata_of_unequal_size():
    """M not a multiple of n_rand: strata of floor and ceil(M / n_rand) non-top columns, still one each."""
    n, k_top, n_rand = 50, 3, 7  # M = 47: strata of 6 and 7
    scores = torch.zeros(200, n)
    scores[:, [5, 20, 41]] = 1.0
    out = sc.select_columns_ref(scores, k_top, n_rand, seed=3)
    rest = [c for c in range(n) if c not in (5, 20, 41)]
    bounds = [(i * 47) // 7 for i in range(8)]
    for r in out.tolist():
        chosen = set(r)
        assert {5, 20, 41} <= chosen and len(chosen) == k_top + n_rand
        for i in range(7):
            assert len(chosen & set(rest[bounds[i] : bounds[i + 1]])) == 1


def test_validates_inputs():
    scores = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="k_top"):
        sc.select_topk_random(scores, 0, 0, seed=0)
    with pytest.raises(ValueError, match="k_top"):
        sc.select_topk_random(scores, 33, 0, seed=0)
    with pytest.raises(ValueError, match="n_rand"):
        sc.select_topk_random(scores, 10, 23, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        sc.select_topk_random(scores.view(2, 2, 32), 4, 0, seed=0)
    with pytest.raises(ValueError, match="float32"):
        sc.select_topk_random(scores.double(), 4, 0, seed=0)
    with pytest.raises(ValueError, match="contiguous"):
        sc.select_topk_random(scores.t(), 2, 0, seed=0)
    with pytest.raises(ValueError, match="out must be"):
        sc.select_topk_random(scores, 4, 2, seed=0, out=torch.empty(4, 5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        sc.select_topk_random(scores, 4, 2, seed=0, out=torch.empty(4, 6, dtype=torch.int64, device=DEVICE))


def test_supports_reasons():
    ok = torch.randn(2, 16, device=DEVICE)
    assert sc.supports(ok) is None
    assert "float32" in sc.supports(ok.half())
    assert "(R, N)" in sc.supports(ok.view(2, 4, 4))
    assert "contiguous" in sc.supports(torch.randn(16, 2, device=DEVICE).t())
    assert "columns" in sc.supports(torch.empty(1, sc.MAX_COLUMNS + 1, device=DEVICE))
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            assert "needs CUDA" in sc.supports(ok)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


def test_select_columns_fast_matches_select_columns_on_cpu():
    """Off CUDA the PyTorch path runs, with a generator seeded from the seed (shapes (..., N) kept)."""
    scores = torch.randn(2, 3, 200)
    idx = select_columns_fast(scores, 40, 20, seed=5)
    ref, ref_counts = select_columns(scores, 40, 20, torch.Generator().manual_seed(5), all_valid=True)
    assert torch.equal(idx, ref) and (ref_counts == 60).all()
    assert idx.shape == (2, 3, 60) and idx.dtype == torch.int32
    assert torch.equal(select_columns_fast(scores, 40, 20, seed=5), idx)
    assert not torch.equal(select_columns_fast(scores, 40, 20, seed=6), idx)
    _check_valid(idx.view(6, 60), scores.view(6, 200), 40, 20)


def test_next_seed_is_a_fresh_int_per_call():
    a, b = ModelState(ChipmunkConfig(seed=3)), ModelState(ChipmunkConfig(seed=3))
    seeds = [a.next_seed() for _ in range(5)]
    assert len(set(seeds)) == 5 and all(isinstance(s, int) and 0 <= s < 2**62 for s in seeds)
    assert seeds == [b.next_seed() for _ in range(5)], "the same config replays the same seeds"
    other = ModelState(ChipmunkConfig(seed=4))
    assert not set(seeds) & {other.next_seed() for _ in range(5)}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows,n,k_top,n_rand",
    [
        (34, 12288, 3686, 430),  # FLUX MLP
        (24 * 34, 4352, 672, 0),  # FLUX attention
        (7, 13824, 4147, 484),
        (5, 32768, 9830, 1000),
        (300, 1000, 1, 999),
    ],
)
def test_kernel_gpu_real_shapes(rows, n, k_top, n_rand):
    scores = torch.rand(rows, n, device="cuda")
    out = sc.select_topk_random(scores, k_top, n_rand, seed=123)
    assert torch.equal(out, sc.select_columns_ref(scores, k_top, n_rand, seed=123))
    top = torch.topk(scores, k_top, dim=-1).indices.sort(-1).values
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, out.long(), True)
    assert chosen.gather(1, top).all() and (chosen.sum(-1) == k_top + n_rand).all()
    assert (out[:, 1:] > out[:, :-1]).all()


@pytest.mark.gpu
def test_select_columns_fast_gpu_uses_kernel():
    scores = torch.rand(1, 34, 12288, device="cuda")
    idx = select_columns_fast(scores, 3686, 430, seed=9)
    assert torch.equal(idx.view(34, -1), sc.select_topk_random(scores.view(34, -1), 3686, 430, seed=9))
    assert idx.shape == (1, 34, 4116)
