"""Attention caches in pinned CPU memory (CUDA only): same outputs as on-GPU caches."""

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.testing import TinyDiT, denoise

OPTS = {"attention.keep": 0.2, "attention.first_dense_layers": 1, "mlp.first_dense_layers": 1,
        "attention.query_group": 128, "mlp.block": 128}


@pytest.mark.gpu
def test_offloaded_caches_give_the_same_outputs():
    outs = {}
    for mode in ("never", "always"):
        torch._dynamo.reset()
        model = TinyDiT(channels=16, dim=256, heads=4, depth=4, seq=512).cuda().eval()
        compiled = torch.compile(model, backend="chipmunk", options=dict(OPTS, offload=mode))
        noise = torch.randn(2, 512, 16, generator=torch.Generator().manual_seed(0)).cuda()
        outs[mode] = denoise(compiled, noise, steps=12)
        rows = chipmunk_compile.report(compiled).by_kind("attention", "rewritten")
        locations = {r.cache_location for r in rows if r.sparse_calls}
        assert locations == ({"cpu (pinned)"} if mode == "always" else {"cuda:0"}), locations
        assert all(r.sparse_calls > 0 for r in rows[1:])
    torch.testing.assert_close(outs["always"], outs["never"], atol=0, rtol=0)


def test_offload_option_is_validated():
    with pytest.raises(chipmunk_compile.ConfigError, match="offload"):
        chipmunk_compile.ChipmunkConfig().with_overrides({"offload": "sometimes"})


def test_offload_is_a_no_op_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    model = TinyDiT(depth=3, seq=64).eval()
    compiled = torch.compile(model, backend="chipmunk", options=dict(OPTS, offload="always"))
    denoise(compiled, torch.randn(1, 64, 8), steps=4)
    report = chipmunk_compile.report(compiled)
    rows = [r for r in report.by_kind("attention", "rewritten") if r.sparse_calls]
    assert rows and all(r.cache_location == "cpu" for r in rows)
    assert "pinned" not in str(report)


def test_host_memory_check_raises_a_clear_error():
    """Offloading more than the host can spare raises OutOfMemoryError with advice (pinned pages would
    otherwise run the host out of memory and get the process killed)."""
    from chipmunk_compile.offload import HOST_RESERVE_BYTES, check_host_memory, host_available_bytes

    check_host_memory(1 << 30, None, 0)  # unknown host memory: no check
    check_host_memory(1 << 30, HOST_RESERVE_BYTES + (2 << 30), 0)
    with pytest.raises(torch.OutOfMemoryError, match="attention caches do not fit.*attention.keep"):
        check_host_memory(4 << 30, HOST_RESERVE_BYTES + (2 << 30), 50 << 30)
    available = host_available_bytes()
    assert available is None or available > 0
