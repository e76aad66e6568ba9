"""Fused MLP unit re-selection (drift score, top-k + random choice, reference refresh): the Triton kernel
against its PyTorch reference and against the unfused sequence it replaces (score, ``select_topk_random``,
scatter), argument checks, and its wiring into ``run_mlp`` (CPU: TRITON_INTERPRET=1; GPU: FLUX shapes).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when @triton.jit decorates, so before the kernel modules are imported.
    os.environ["TRITON_INTERPRET"] = "1"

from chipmunk_compile.kernels import select_columns as sc  # noqa: E402
from chipmunk_compile.kernels import select_units as su  # noqa: E402
from kernel_testing import DEVICE, interpreted  # noqa: E402  (tests/ is on sys.path)

su = interpreted(su, "_select_units_drift_kernel")

# Triton 3.6's interpreter converts 1-element arrays to scalars (numpy warns; harmless with numpy < 2.4).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(lead: tuple[int, ...], f: int, gated: bool, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    width = 2 * f if gated else f
    bm = torch.randn(*lead, width, device=device)
    ref = bm + 0.1 * torch.randn_like(bm)
    return bm, ref


def _unfused(bm: torch.Tensor, ref: torch.Tensor, k_top: int, n_rand: int, seed: int, gated: bool) -> torch.Tensor:
    """What run_mlp did before: score, the selection kernel, scatter refresh (ref updated in place)."""
    f = bm.shape[-1] // 2 if gated else bm.shape[-1]
    diff = torch.sub(bm, ref).abs_()
    if gated:
        diff = diff[..., :f] + diff[..., f:]
    idx = sc.select_topk_random(diff.reshape(-1, f).contiguous(), k_top, n_rand, seed).view(*bm.shape[:-1], -1)
    cols = torch.cat([idx, idx + f], dim=-1).long() if gated else idx.long()
    ref.scatter_(-1, cols, bm.gather(-1, cols))
    return idx


def _check(bm: torch.Tensor, ref: torch.Tensor, k_top: int, n_rand: int, seed: int, gated: bool) -> torch.Tensor:
    """Kernel == reference (indices and refreshed ref), bit for bit; returns the kernel's indices."""
    ref_k, ref_r = ref.clone(), ref.clone()
    idx = su.select_units_drift(bm, ref_k, k_top, n_rand, seed, gated=gated)
    expected = su.select_units_drift_ref(bm, ref_r, k_top, n_rand, seed, gated=gated)
    assert idx.dtype == torch.int32 and idx.shape == (*bm.shape[:-1], k_top + n_rand)
    assert torch.equal(idx, expected)
    assert torch.equal(ref_k, ref_r), "refreshed reference differs"
    # Only the chosen units were refreshed, to bm's values.
    f = bm.shape[-1] // 2 if gated else bm.shape[-1]
    cols = torch.cat([idx, idx + f], dim=-1).long() if gated else idx.long()
    chosen = torch.zeros_like(bm, dtype=torch.bool).scatter_(-1, cols, True)
    assert torch.equal(ref_k[chosen], bm[chosen].float()) and torch.equal(ref_k[~chosen], ref[~chosen])
    return idx


# (lead, F, k_top, n_rand): F = 1 and not a power of two, k_top = 1 and = F, n_rand 0 / > 0 / = F - k_top.
CASES = {
    "F=1": ((1, 2), 1, 1, 0),
    "k_top=F": ((1, 3), 37, 37, 0),
    "k_top=1": ((2, 2), 37, 1, 9),
    "n_rand=F-k_top": ((1, 3), 37, 10, 27),
    "F=300": ((2, 3), 300, 90, 15),
    "F=1000": ((1, 2), 1000, 300, 50),
}


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_kernel_matches_ref_and_unfused(case, gated):
    lead, f, k_top, n_rand = CASES[case]
    bm, ref = _inputs(lead, f, gated)
    idx = _check(bm, ref, k_top, n_rand, seed=7, gated=gated)
    ref_k, ref_u = ref.clone(), ref.clone()
    su.select_units_drift(bm, ref_k, k_top, n_rand, 7, gated=gated)
    assert torch.equal(idx, _unfused(bm, ref_u, k_top, n_rand, 7, gated)), "differs from the unfused sequence"
    assert torch.equal(ref_k, ref_u)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_ties_and_unchanged_rows(gated):
    # Few distinct drifts (many ties at the threshold), and rows where bm == ref (all scores 0).
    f = 60
    ref = torch.randint(-2, 3, (2, 3, 2 * f if gated else f), device=DEVICE).float()
    bm = ref + torch.randint(-1, 2, ref.shape, device=DEVICE).float()
    bm[0, 1] = ref[0, 1]
    bm[1, 2] = ref[1, 2]
    for n_rand in (0, 7):
        idx = _check(bm, ref, 20, n_rand, seed=3, gated=gated)
        ref_u = ref.clone()
        assert torch.equal(idx, _unfused(bm, ref_u, 20, n_rand, 3, gated))
    # All scores equal (0): the top part is the first k_top units.
    idx = su.select_units_drift(bm, bm.clone(), 20, 0, 0, gated=gated)
    assert torch.equal(idx.cpu(), torch.arange(20, dtype=torch.int32).expand(2, 3, 20))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_16bit_block_means(dtype, gated):
    # The op passes the first linear's 16-bit output straight in (no cast kernel): same choice and refresh
    # as with that output widened to fp32 first, and the fp32 reference keeps its dtype.
    bm, ref = _inputs((2, 3), 300, gated)
    bm16 = bm.to(dtype)
    idx = _check(bm16, ref, 90, 15, seed=4, gated=gated)
    ref32 = ref.clone()
    assert torch.equal(idx, su.select_units_drift(bm16.float(), ref32, 90, 15, 4, gated=gated))
    assert su.supports(bm16, ref, gated=gated) is None
    assert "ref float32" in su.supports(bm16, ref.to(dtype), gated=gated)


def test_seed_and_out_argument():
    bm, ref = _inputs((1, 4), 64, gated=True)
    a = su.select_units_drift(bm, ref.clone(), 12, 8, 11, gated=True)
    assert not torch.equal(a, su.select_units_drift(bm, ref.clone(), 12, 8, 12, gated=True))
    assert torch.equal(a, su.select_units_drift(bm, ref.clone(), 12, 8, 11 + 2**62, gated=True))
    out = torch.full((1, 4, 20), -1, dtype=torch.int32, device=DEVICE)
    assert su.select_units_drift(bm, ref.clone(), 12, 8, 11, gated=True, out=out) is out
    assert torch.equal(out, a)


def test_validates_inputs():
    bm, ref = _inputs((1, 4), 32, gated=False)
    call = lambda *a, **kw: su.select_units_drift(*a, **{"gated": False, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="k_top"):
        call(bm, ref, 0, 0, 0)
    with pytest.raises(ValueError, match="k_top"):
        call(bm, ref, 33, 0, 0)
    with pytest.raises(ValueError, match="n_rand"):
        call(bm, ref, 10, 23, 0)
    with pytest.raises(ValueError, match="k_top"):
        call(bm, ref, 17, 0, 0, gated=True)  # gated: F = 16
    with pytest.raises(ValueError, match="even"):
        su.select_units_drift(bm[..., :31].contiguous(), ref[..., :31].contiguous(), 4, 0, 0, gated=True)
    with pytest.raises(ValueError, match="shape"):
        call(bm, ref[:, :3].contiguous(), 4, 0, 0)
    with pytest.raises(ValueError, match="at least 2-D"):
        call(bm[0, 0], ref[0, 0], 4, 0, 0)
    with pytest.raises(ValueError, match="tensors"):
        call(bm, ref.tolist(), 4, 0, 0)
    with pytest.raises(ValueError, match="float32"):
        call(bm, ref.double(), 4, 0, 0)
    with pytest.raises(ValueError, match="float32"):
        call(bm.double(), ref, 4, 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        call(bm.transpose(-1, -2), ref.transpose(-1, -2), 4, 0, 0)
    with pytest.raises(ValueError, match="out must be"):
        call(bm, ref, 4, 2, 0, out=torch.empty(1, 4, 5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        call(bm, ref, 4, 2, 0, out=torch.empty(1, 4, 6, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="n_rand"):
        su.select_units_drift_ref(bm, ref, 10, 23, 0, gated=False)


def test_supports_reasons():
    bm, ref = _inputs((1, 2), 16, gated=False)
    assert su.supports(bm, ref, gated=False) is None
    assert "float32" in su.supports(bm, ref.half(), gated=False)
    assert "contiguous" in su.supports(bm.transpose(-1, -2), ref.transpose(-1, -2), gated=False)
    assert "differ" in su.supports(bm, ref[:, :1], gated=False)
    big = torch.empty(1, sc.MAX_COLUMNS + 1, device=DEVICE)
    assert "units" in su.supports(big, big, gated=False)
    wide = torch.empty(1, 2 * sc.MAX_COLUMNS, device=DEVICE)
    assert su.supports(wide, wide, gated=True) is None
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            assert "needs CUDA" in su.supports(bm, ref, gated=False)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


# ---------------------------------------------------------------------------------------------------------
# Wiring into run_mlp's selection step


def _site():
    from chipmunk_compile.config import ChipmunkConfig
    from chipmunk_compile.state import ModelState

    state = ModelState(ChipmunkConfig().with_overrides({"mlp.first_dense_layers": 0, "mlp.first_dense_steps": 1}))
    return state.site("mlp", 1, torch.randn(2, 2))


def test_fused_selection_is_used_on_cuda_only(monkeypatch):
    import chipmunk_compile.sparse_mlp as sparse_mlp

    site = _site()
    bm, ref = _inputs((1, 3), 40, gated=True, device="cpu")
    assert sparse_mlp._select_units_fused(site, bm, ref.clone(), True, 8, 2, seed=1) is None  # CPU: PyTorch path
    if DEVICE == "cpu":  # pretend to be on CUDA: the (interpreted) kernel runs
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    bm, ref = _inputs((1, 3), 40, gated=True)
    ref_f, ref_r = ref.clone(), ref.clone()
    idx = sparse_mlp._select_units_fused(site, bm, ref_f, True, 8, 2, seed=1)
    assert torch.equal(idx, su.select_units_drift_ref(bm, ref_r, 8, 2, 1, gated=True))
    assert torch.equal(ref_f, ref_r)
    # Unsupported inputs (fp64): the caller's PyTorch path, with nothing disabled.
    assert sparse_mlp._select_units_fused(site, bm.double(), ref.double(), True, 8, 2, seed=1) is None
    assert site.selection_kernel_error is None


def test_failing_fused_kernel_falls_back_with_a_log(monkeypatch, caplog):
    import chipmunk_compile.sparse_mlp as sparse_mlp

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    site = _site()
    bm, ref = _inputs((1, 3), 40, gated=False)
    monkeypatch.setattr(sparse_mlp.unit_kernels, "select_units_drift", broken)
    if DEVICE == "cpu":
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    before = ref.clone()
    with caplog.at_level("WARNING", logger="chipmunk_compile"):
        assert sparse_mlp._select_units_fused(site, bm, ref, False, 8, 2, seed=1) is None
    assert "fused selection kernel failed" in caplog.text and torch.equal(ref, before)
    assert site.selection_kernel_error.startswith("RuntimeError")
    caplog.clear()
    assert sparse_mlp._select_units_fused(site, bm, ref, False, 8, 2, seed=2) is None  # not retried
    assert not caplog.text


# ---------------------------------------------------------------------------------------------------------
# GPU: real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize(
    "lead,f,k_top,n_rand",
    [
        ((1, 34), 12288, 3686, 430),  # FLUX MLP (single and double blocks)
        ((2, 34), 12288, 3686, 430),  # two CFG samples
        ((1, 7), 32768, 9830, 1000),
        ((3, 100), 1000, 1, 999),
    ],
)
def test_kernel_gpu_real_shapes(lead, f, k_top, n_rand, gated):
    bm, ref = _inputs(lead, f, gated, device="cuda")
    idx = _check(bm, ref, k_top, n_rand, seed=123, gated=gated)
    ref_u = ref.clone()
    assert torch.equal(idx, _unfused(bm, ref_u, k_top, n_rand, 123, gated))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_block_means_in_16_bits_equal_the_rounded_fp32_means(dtype):
    # run_mlp asks CUDA for the 16-bit means in one kernel where it used the fp32 means and a cast.
    from chipmunk_compile.sparse_mlp import block_means

    x = torch.randn(2, 4352, 3072, device="cuda", dtype=dtype) * 3
    assert torch.equal(block_means(x, 128, dtype), block_means(x, 128).to(dtype))
    assert torch.equal(block_means(x[:, :4300], 128, dtype), block_means(x[:, :4300], 128).to(dtype))


@pytest.mark.gpu
def test_gpu_fast_path_is_bit_identical(monkeypatch):
    from chipmunk_compile.kernels import _launch

    monkeypatch.setattr(_launch, "CHECK", True)  # re-derive Triton's specialization on every fast launch
    su._launch_kernel.clear()  # kernels cached by earlier tests recorded no specialization to check against
    bm, ref = _inputs((1, 34), 12288, gated=True, device="cuda")
    run = lambda: (su.select_units_drift(bm, (r := ref.clone()), 3686, 430, 5, gated=True), r)  # noqa: E731
    su._launch_kernel.enabled = False
    try:
        normal = run()
    finally:
        su._launch_kernel.enabled = True
    run()
    before = su._launch_kernel.fast_launches
    fast = run()
    assert su._launch_kernel.fast_launches > before, "fast path not taken"
    assert all(torch.equal(n, f) for n, f in zip(normal, fast))
