"""chipmunk_compile.testing: the checks a user puts in their CI, used on a tiny DiT."""

import pytest
import torch

from chipmunk_compile.testing import (
    TinyDiT,
    check_fidelity,
    check_flops,
    check_sites,
    check_speedup,
    denoise,
)

OPTS = {"attention.keep": 0.25, "mlp.keep": 0.3, "attention.first_dense_layers": 1, "mlp.first_dense_layers": 1,
        "attention.query_group": 64, "mlp.block": 64}


def test_deterministic_checks_on_cpu():
    model = TinyDiT(depth=3, seq=128).eval()
    compiled = torch.compile(model, backend="chipmunk", options=OPTS)
    x = torch.randn(1, 128, 8)
    calls = [((x,), {"timestep": torch.tensor([t])}) for t in (1000.0, 900.0, 800.0)]
    flops = check_flops(compiled, calls, kind="attention", max_fraction=0.6)
    check_sites(compiled, attention=3, mlp=3)
    with pytest.raises(AssertionError, match="expected 4 rewritten attention"):
        check_sites(compiled, attention=4)
    with pytest.raises(AssertionError, match="attention FLOPs"):
        check_flops(compiled, calls, kind="attention", max_fraction=0.01)
    assert flops[2]["attention"] < flops[0]["attention"]
    noise = torch.randn(1, 128, 8)
    torch._dynamo.reset()
    compiled = torch.compile(TinyDiT(depth=3, seq=128).eval(), backend="chipmunk", options=OPTS)
    p, r = check_fidelity(denoise(compiled, noise, steps=10), denoise(model, noise, steps=10), max_rel_l2=0.5)
    assert r < 0.5 and p > 0
    with pytest.raises(AssertionError, match="PSNR"):
        check_fidelity(noise, noise + 1.0, min_psnr=40)


def test_speedup_check_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("covered by the GPU job")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        check_speedup(lambda: None, lambda: None, min_speedup=1.0)


@pytest.mark.gpu
def test_speedup_check_on_gpu():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    speedup = check_speedup(lambda: a @ a @ a, lambda: a @ a, min_speedup=1.3)
    assert speedup > 1.3
