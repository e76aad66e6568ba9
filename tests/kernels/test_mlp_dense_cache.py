"""Dense-step MLP epilogue: the reference against independent formulas, the kernel against the reference
(CPU: TRITON_INTERPRET=1 in fp32/fp16; GPU: bf16 too)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from chipmunk_compile.kernels import mlp_dense_cache as mdc  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _act(name, x):
    return {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}[name](x)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("seq", [64, 70])
def test_ref_matches_formulas(gated, seq):
    """fp64: a = act(h) (or u·act(g)), act_t its transpose, means = per-block torch.mean (short last block)."""
    h = torch.randn(2, seq, 12, dtype=torch.float64)
    a, act_t, means = mdc.dense_activation_cache_ref(h, activation="silu", gated=gated, block=32)
    want = h[..., :6] * F.silu(h[..., 6:]) if gated else F.silu(h)
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(act_t, want.transpose(1, 2))
    blocks = [h[:, i : i + 32].mean(dim=1) for i in range(0, seq, 32)]
    assert means.dtype == torch.float32
    torch.testing.assert_close(means, torch.stack(blocks, dim=1).float())


CASES = [  # (B, S, C, block, gated, activation)
    (1, 128, 64, 64, False, "gelu_tanh"),
    (2, 150, 40, 64, False, "gelu"),  # ragged rows and units
    (1, 70, 96, 32, True, "silu"),
    (2, 33, 26, 16, True, "gelu_tanh"),  # odd F = 13
    (1, 5, 8, 128, False, "silu"),  # one short block
]


IDS = [f"b{c[0]}s{c[1]}c{c[2]}blk{c[3]}{'g' if c[4] else ''}{c[5]}" for c in CASES]


@pytest.mark.parametrize("row_major", [True, False], ids=["rowmajor", "viewonly"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_ref(case, dtype, row_major):
    bsz, seq, c, block, gated, activation = case
    h = (2 * torch.randn(bsz, seq, c)).to(DEVICE, dtype)
    kw = dict(activation=activation, gated=gated, block=block)
    a, act_t, means = mdc.dense_activation_cache(h, **kw, row_major=row_major)
    ra, rt, rm = mdc.dense_activation_cache_ref(h, **kw)
    # fp32: the kernel's sigmoid-form tanh-GELU vs ATen's tanh: last-ulp differences; fp16: one rounding step
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(a, ra, **tol)
    torch.testing.assert_close(act_t, rt, **tol)
    assert act_t.is_contiguous()
    # without row_major, a is act_t's memory seen transposed: nothing else was written
    assert a.is_contiguous() if row_major else a.data_ptr() == act_t.data_ptr()
    torch.testing.assert_close(means, rm, rtol=1e-5, atol=1e-6)
    # the two activation outputs are the same values, transposed
    assert torch.equal(act_t, a.transpose(1, 2))


def test_strided_rows():
    """h as a column slice of a wider tensor (row stride > C)."""
    wide = torch.randn(1, 40, 100).to(DEVICE)
    h = wide[..., 10:74]
    a, act_t, means = mdc.dense_activation_cache(h, activation="gelu", gated=False, block=32)
    ra, rt, rm = mdc.dense_activation_cache_ref(h, activation="gelu", gated=False, block=32)
    torch.testing.assert_close(a, ra, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(means, rm, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    h = torch.randn(1, 8, 6).to(DEVICE)
    with pytest.raises(ValueError, match="activation must be one of"):
        mdc.dense_activation_cache(h, activation="relu", gated=False, block=16)
    with pytest.raises(ValueError, match="even C"):
        mdc.dense_activation_cache(h[..., :5], activation="silu", gated=True, block=16)
    with pytest.raises(ValueError, match="power of two"):
        mdc.dense_activation_cache(h, activation="silu", gated=False, block=48)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        mdc.dense_activation_cache(h.transpose(1, 2), activation="silu", gated=False, block=16)
    with pytest.raises(ValueError, match="dtype"):
        mdc.dense_activation_cache(h.double(), activation="silu", gated=False, block=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_bf16_flux_size_gpu(gated):
    """bf16 at a FLUX-like size: equal to the reference up to one bf16 rounding step."""
    h = torch.randn(1, 4352, 2 * 3072 if gated else 3072, device="cuda", dtype=torch.bfloat16)
    kw = dict(activation="gelu_tanh", gated=gated, block=128)
    a, act_t, means = mdc.dense_activation_cache(h, **kw)
    ra, rt, rm = mdc.dense_activation_cache_ref(h, **kw)
    torch.testing.assert_close(a, ra, rtol=8e-3, atol=8e-3)
    assert torch.equal(act_t, a.transpose(1, 2))
    torch.testing.assert_close(means, rm, rtol=1e-4, atol=1e-5)
