"""The re-selection's block-mean first linear: the reference against ``F.linear``, the kernel against the
reference on awkward shapes (CPU: TRITON_INTERPRET=1 in fp16; GPU: bf16 and fp16), argument checks, and
its use by ``run_mlp`` on CUDA."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from chipmunk_compile.kernels import block_mean_linear as bml  # noqa: E402
from kernel_testing import DEVICE, interpreted  # noqa: E402

bml = interpreted(bml, "_block_mean_linear_kernel")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
WEIGHT_DTYPES = [
    torch.float16,
    pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")]),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_ref_is_f_linear_on_rounded_means():
    """fp32 weights make the rounding a no-op: the reference is F.linear in fp32 then."""
    means, w, b = torch.randn(5, 24), torch.randn(40, 24), torch.randn(40)
    torch.testing.assert_close(bml.block_mean_linear_ref(means, w, b), F.linear(means, w, b))
    # 2-byte weights: the means are rounded to the weight dtype first, the sum stays fp32
    wh = w.half()
    want = means.half().double() @ wh.double().t() + b.half().double()
    torch.testing.assert_close(bml.block_mean_linear_ref(means, wh, b.half()).double(), want, atol=1e-5, rtol=1e-5)


CASES = [  # (R, F, K, bias)
    (34, 96, 256, True),  # FLUX-like row count, K a multiple of the K tile
    (3, 70, 200, True),  # ragged units and K
    (1, 33, 16, False),  # one row, no bias, K below one tile
    (80, 64, 128, True),  # more rows than one 64-row tile
]


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize(("r", "f", "k", "bias"), CASES)
def test_kernel_matches_ref(r, f, k, bias, dtype):
    means = torch.randn(r, k, device=DEVICE)
    w = (torch.randn(f, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(f, device=DEVICE).to(dtype) if bias else None
    got = bml.block_mean_linear(means, w, b)
    want = bml.block_mean_linear_ref(means, w, b)
    assert got.dtype == torch.float32 and got.shape == (r, f) and got.is_contiguous()
    # Same rounded operands, fp32 products and sums in another order: a few fp32 ulps of the row norm.
    torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, k**0.5 / 16), rtol=1e-5)
    # It is at least as close to the exact (fp64) result as F.linear in the weight dtype is.
    exact = means.to(dtype).double() @ w.double().t() + (b.double() if bias else 0)
    if DEVICE == "cuda":
        torch_err = (F.linear(means.to(dtype), w, b).double() - exact).abs().max()
        assert (got.double() - exact).abs().max() <= 2 * torch_err + 1e-6


@pytest.mark.parametrize("tiles", [(16, 32, 4, 2), (64, 64, 4, 3)])
def test_other_tiles(tiles):
    means = torch.randn(10, 100, device=DEVICE)
    w = torch.randn(50, 100, device=DEVICE).half()
    b = torch.randn(50, device=DEVICE).half()
    torch.testing.assert_close(bml.block_mean_linear(means, w, b, tiles=tiles), bml.block_mean_linear_ref(means, w, b),
                               atol=1e-3, rtol=1e-5)


def test_strided_weight_rows():
    """A row slice of a wider weight (unit stride along K, larger row stride) works without a copy."""
    wide = torch.randn(40, 96, device=DEVICE).half()
    w = wide[:, 16:80]
    means = torch.randn(4, 64, device=DEVICE)
    torch.testing.assert_close(bml.block_mean_linear(means, w, None), bml.block_mean_linear_ref(means, w, None),
                               atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize(
    ("means", "w", "b", "match"),
    [
        (torch.randn(2, 8, dtype=torch.float16), torch.randn(4, 8).half(), None, "means dtype"),
        (torch.randn(2, 8), torch.randn(4, 8), None, "weight dtype"),
        (torch.randn(2, 8), torch.randn(4, 9).half(), None, "needs means"),
        (torch.randn(2, 8), torch.randn(4, 8).half(), torch.randn(3).half(), "bias"),
        (torch.randn(8, 2).t(), torch.randn(4, 8).half(), None, "unit stride"),
    ],
)
def test_bad_inputs_raise(means, w, b, match):
    means, w = means.to(DEVICE), w.to(DEVICE)
    b = None if b is None else b.to(DEVICE)
    assert bml.supports(means, w, b) is not None
    with pytest.raises(ValueError, match=match):
        bml.block_mean_linear(means, w, b)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(bml.triton.knobs.runtime, "interpret", False)
    reason = bml.supports(torch.randn(2, 8), torch.randn(4, 8).half(), None)
    assert reason is not None and "device cpu" in reason


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_run_mlp_selection_uses_kernel(monkeypatch):
    """On CUDA the MLP's selection step computes its block means through the kernel."""
    from chipmunk_compile import sparse_mlp

    calls = []
    real = bml.block_mean_linear
    monkeypatch.setattr(sparse_mlp.bm_kernels, "block_mean_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    from chipmunk_compile.state import SiteState

    site = SiteState.__new__(SiteState)
    site.selection_kernel_error = None
    x = torch.randn(1, 256, 64, device=DEVICE, dtype=torch.bfloat16)
    w1 = torch.randn(128, 64, device=DEVICE, dtype=torch.bfloat16)
    b1 = torch.randn(128, device=DEVICE, dtype=torch.bfloat16)
    bm = sparse_mlp._selection_block_means(site, x, w1, b1, 128, True)
    assert calls and bm.shape == (1, 2, 128) and bm.dtype == torch.float32
    want = F.linear(sparse_mlp.block_means(x, 128), w1.float(), b1.float())
    torch.testing.assert_close(bm, want, atol=0.05, rtol=0.02)
