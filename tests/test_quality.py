"""The quality sweep on the trained reference DiT (bench/quality.py), on the CPU, in a few seconds per test.

- keep = 1 for attention and MLP (no random columns, no dense layers) reproduces the dense model over a
  short CFG sampling loop, while every site was rewritten and took sparse steps;
- the sweep machinery on 3 settings and a few steps gives finite metrics that get worse as keep falls;
- the metrics themselves (SSIM, PSNR, FLOP accounting) on known inputs.
"""

import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import chipmunk_compile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("diffusers")
quality = importlib.import_module("bench.quality")
rd_sample = importlib.import_module("bench.reference_dit.sample")


def _require_checkpoint(variant: str) -> None:
    path = rd_sample.checkpoint_path(variant)
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is missing: train it with bench/reference_dit/train.py")


def test_keep_one_reproduces_dense_sampling():
    _require_checkpoint("image")
    model = rd_sample.load("image")
    labels = torch.tensor([7])  # with CFG: one (2, ...) batch per step
    steps = 6  # attention: dense at steps 0, 1 and sparse at 2..5; MLP: dense at 0, sparse at 1..5
    ref = rd_sample.sample(model, model.config, labels, num_steps=steps, guidance_scale=3.0, seed=3)
    options = {
        "attention.keep": 1.0,
        "attention.random_keep": 0.0,
        "attention.first_dense_layers": 0,
        "mlp.keep": 1.0,
        "mlp.random_keep": 0.0,
        "mlp.first_dense_layers": 0,
    }
    compiled = torch.compile(model, backend="chipmunk", options=options)
    out = rd_sample.sample(compiled, model.config, labels, num_steps=steps, guidance_scale=3.0, seed=3)

    report = chipmunk_compile.report(compiled)
    for kind in ("attention", "mlp"):
        rows = report.by_kind(kind, "rewritten")
        assert len(rows) == model.config.depth, str(report)
        for row in rows:
            assert row.calls == steps and row.sparse_calls >= steps - 2, str(report)
            assert row.kept_fraction == pytest.approx(1.0), str(report)
    # the sweep's dense FLOP count (its denominator) is what the sites record as their dense cost
    dense = quality.dense_flops_per_call(model.config, batch=2 * len(labels))
    for kind in ("attention", "mlp"):
        sites = [s for st in chipmunk_compile.states_of(model) for s in st.sites if s.kind == kind]
        assert sum(s.stats.dense_flops for s in sites) == dense[kind]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert quality.relative_l2(out, ref) < 1e-5


def test_quick_sweep_gets_worse_as_keep_falls(tmp_path):
    _require_checkpoint("image")
    run = quality.QualityRun("image", classes=1, seeds=1, steps=8)
    settings = quality.sweep("quick")
    keeps = [s.config().attention.keep for s in settings]
    assert keeps == sorted(keeps, reverse=True)
    _, dense, results = quality.run_variant(run, settings, log=lambda _: None)

    for r in results:
        assert all(math.isfinite(v) for v in (r.psnr, r.ssim, r.rel_l2, r.flops_frac)), r
        assert 0 < r.flops_frac < 1 and -1 <= r.ssim <= 1
        assert r.seconds_per_sample is None  # CPU: not timed
    psnrs, rel_l2s = [r.psnr for r in results], [r.rel_l2 for r in results]
    flops = [r.flops_frac for r in results]
    assert psnrs == sorted(psnrs, reverse=True) or rel_l2s == sorted(rel_l2s), (psnrs, rel_l2s)
    assert flops == sorted(flops, reverse=True), flops
    for r in results:  # the measured kept fractions follow the configured budgets
        cfg = r.config
        assert r.kept["attention"] == pytest.approx(cfg.attention.keep, abs=0.02)
        assert r.kept["mlp"] == pytest.approx(cfg.mlp.keep + cfg.mlp.random_keep * (1 - cfg.mlp.keep), abs=0.01)

    rows = quality.csv_rows(run, [dense, *results])
    quality.write_csv(tmp_path / "q.csv", rows)
    quality.plot_speed_quality(tmp_path / "q.png", run, dense, results)
    quality.save_sample_grid(tmp_path / "grid.png", run, dense, results)
    header = (tmp_path / "q.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == quality.CSV_COLUMNS
    assert (tmp_path / "q.png").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_ssim_and_psnr_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    assert torch.allclose(quality.ssim(x, x), torch.ones(3, dtype=torch.float64))
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    noisier = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s1, s2 = quality.ssim(noisy, x), quality.ssim(noisier, x)
    assert (s1 < 1).all() and (s2 < s1).all()
    assert quality.ssim(noisy, x) == pytest.approx(quality.ssim(x, noisy))  # symmetric
    # a constant offset: luminance term only; SSIM < 1 but structure kept
    shifted = x * 0.5 + 0.25
    assert 0 < float(quality.ssim(shifted + 0.1, shifted).mean()) < 1
    p = quality.psnr_per_sample(torch.full((2, 4), 0.5), torch.full((2, 4), 0.6))
    assert torch.allclose(p, torch.full((2,), 20.0, dtype=torch.float64))
    clips = torch.rand(2, 3, 4, 16, 16, generator=g) * 2 - 1
    m = quality.sample_metrics(clips, clips)
    assert m["rel_l2"] == 0 and m["ssim"] == pytest.approx(1.0) and m["psnr"] > 100


def test_dense_flops_match_the_ops_formulas():
    cfg = importlib.import_module("bench.reference_dit.model").DiTConfig.from_name("image")
    flops = quality.dense_flops_per_call(cfg, batch=2)
    s, d = 1024, 256
    assert flops["attention"] == 6 * 2 * 2 * 4 * s * s * (64 + 64)
    assert flops["mlp"] == 6 * 2 * (2 * s) * d * (4 * d) * 2


def test_tile_permutation_and_tiled_model():
    perm = quality.tile_permutation((4, 4), (2, 2))
    assert perm.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    video = quality.tile_permutation((8, 16, 16), quality.TILES["video"])
    assert sorted(video.tolist()) == list(range(2048))
    assert video[:3].tolist() == [0, 1, 2] and video[8].item() == 16 and video[64].item() == 256
    _require_checkpoint("image")
    model = rd_sample.load("image")
    tiled = quality.TiledTokens(model, quality.TILES["image"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.config.sample_shape, generator=g)
    t, y = torch.tensor([900.0, 300.0]), torch.tensor([4, 12])
    with torch.no_grad():
        torch.testing.assert_close(tiled(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-5)


def test_settings_preset_variants_are_built_and_validated():
    """--settings: grid names are looked up, PRESET[KEY=JSON;...] is built (no sampling); errors name the fault."""
    got = quality.select_settings("flux,flux[mlp.keep=0.15],wan", "cpu")
    assert [s.name for s in got] == ["flux", "flux[mlp.keep=0.15]", "wan"]
    assert got[0] == quality.sweep("cpu")[7]  # the grid's own flux preset
    variant = got[1]
    assert variant.family == "preset" and variant.token_order == "raster"
    assert variant.options == (("preset", "flux"), ("mlp.min_tokens", 0), ("mlp.keep", 0.15))
    cfg, flux = variant.config(), got[0].config()
    assert cfg.mlp.keep == 0.15 and cfg.mlp.min_tokens == 0 and cfg.mlp.random_keep == flux.mlp.random_keep
    assert cfg.attention == flux.attention
    assert quality.select_settings("", "quick") == quality.sweep("quick")

    # several overrides; JSON values (lists become tuples, bools); commas inside brackets do not split names
    (multi,) = quality.select_settings(
        "flux[ attention.keep=0.1 ; attention.dense_steps=[0,1,10]; mlp.min_tokens=512;mlp.enabled=true]", "cpu"
    )
    cfg = multi.config()
    assert cfg.attention.keep == 0.1 and cfg.attention.dense_steps == (0, 1, 10)
    assert cfg.mlp.min_tokens == 512 and cfg.mlp.enabled is True
    hash(multi)

    bad = {
        "flx[mlp.keep=0.1]": "unknown preset 'flx'",
        "flux[mlp.kep=0.1]": "unknown chipmunk option 'mlp.kep'",
        "flux[mlp.keep=1.5]": "mlp.keep",
        "flux[mlp.keep=true]": "mlp.keep must be a number",
        "flux[foo=1]": "not chipmunk options",
        "flux[mlp.keep=0.1": "PRESET[KEY=JSON",
        "flux[mlp.keep]": "not KEY=JSON",
        "flux[]": "no overrides",
        "flux[preset=wan]": "cannot be overridden",
        "flux[mlp.keep=0.1;mlp.keep=0.2]": "given twice",
        "attn0.33": "not in the cpu grid",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            quality.select_settings(spec, "cpu")

    # the CLI turns them into an argparse error before loading a model or sampling
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--variant", "image", "--device", "cpu", "--settings", "flux,flux[mlp.kep=0.1]"])
    assert exit_info.value.code == 2
