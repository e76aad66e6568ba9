"""Through a real 50-step diffusers loop (FlowMatchEulerDiscreteScheduler) on small FLUX and HunyuanVideo
configs with the paper's presets: sparse steps compute the configured fraction and FLOPs fall accordingly."""

import sys
from pathlib import Path

import pytest

from chipmunk_compile.selection import column_budget

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fidelity import FidelityConfig, run_fidelity  # noqa: E402


@pytest.mark.slow
def test_flux_preset_through_50_steps():
    # min_tokens 0: the small model's sequences are far below the preset's 1024-token floor for MLPs
    res = run_fidelity(FidelityConfig(model="flux", size="small", preset="flux", steps=50,
                                      overrides=(("mlp.min_tokens", 0),)))
    s = 16 * 16 + 32  # image + text tokens of the joint attention
    k_top, n_rand = column_budget(672 / 4352, 0.0, s)
    k = (k_top + n_rand) / s
    assert res.attention_kept == pytest.approx(k)
    f = 4 * 64  # FeedForward hidden units (4 x inner dim 64)
    k_top, n_rand = column_budget(0.3, 0.05, f)
    assert res.mlp_kept == pytest.approx((k_top + n_rand) / f)
    # 6 attention sites, 2 always dense; the others select at step 0 without forming the cache (step 1 is
    # dense too), refresh at 1, 10, 20, 30, 40 (dense + forming the cache), sparse at the 44 other steps.
    expected = (2 * 50 + 4 * (1.5 + 5 * (1 + k) + 44 * k)) / (6 * 50)
    assert res.attention_flops_frac == pytest.approx(expected, rel=0.005)
    assert res.mlp_flops_frac < 0.6
    assert res.rel_l2 < 0.05 and res.psnr_db > 40
    assert all(0 <= e < 1 for _, _, e in res.site_errors)


@pytest.mark.slow
def test_hunyuan_preset_with_cfg_and_key_padding_mask():
    res = run_fidelity(FidelityConfig(model="hunyuan", size="small", preset="hunyuan", steps=50, cfg=True))
    k = res.attention_kept
    s = 4 * 8 * 8 + 16
    k_top, n_rand = column_budget(0.05, 0.01, s)
    # text keys (16, 4 of them padding) are always kept; masked keys never: kept <= the budget
    assert 12 / s < k <= max(k_top, 17) / s + n_rand / s
    # dense steps {1, 10, 40} select (dense + column sums + cache), step 0 is plain dense (step 1 is dense
    # too), 46 sparse steps; 2 of 6 sites dense
    expected = (2 * 50 + 4 * (1 + 3 * (1.5 + k) + 46 * k)) / (6 * 50)
    assert res.attention_flops_frac == pytest.approx(expected, rel=0.01)
    assert res.mlp_flops_frac == 1.0 and res.mlp_kept is None  # the preset leaves MLPs dense
    assert res.rel_l2 < 0.05
