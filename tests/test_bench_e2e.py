"""The step-kind prediction bench_e2e uses for loops too long to time whole (issue: HunyuanVideo 129 f)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from chipmunk_compile import ChipmunkConfig

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from bench_e2e import predict_total_ms, step_kinds  # noqa: E402


def test_step_kinds_follow_the_presets():
    hunyuan = step_kinds(ChipmunkConfig.from_name("hunyuan"), 50)
    # step 0 is plain dense (step 1 is dense too and selects); steps 10 and 40 select again
    assert [i for i, k in enumerate(hunyuan) if k[0] != "sparse"] == [0, 1, 10, 40]
    assert [k[0] for k in hunyuan[:3]] == ["dense", "select", "sparse"]
    assert hunyuan[10][0] == hunyuan[40][0] == "select" and {k[1] for k in hunyuan} == {"off"}
    flux = step_kinds(ChipmunkConfig.from_name("flux"), 50)
    # selection once, at step 0 (step 1, dense too, makes the cache), then refreshes
    assert [i for i, k in enumerate(flux) if k[0] == "select, no cache"] == [0]
    assert [i for i, k in enumerate(flux) if k[0] == "refresh"] == [1, 10, 20, 30, 40]
    assert [i for i, k in enumerate(flux) if k[1] == "cache"] == [0, 10, 20, 30, 40]
    assert [k[1] for k in flux[1:6]] == ["select", "reuse", "select", "reuse", "select"]
    assert len(set(flux)) == 5
    # a dense last step (41 steps: step 40) caches nothing
    assert step_kinds(ChipmunkConfig.from_name("flux"), 41)[40] == ("dense", "dense")
    wan = step_kinds(ChipmunkConfig.from_name("wan"), 50)
    assert [k[0] for k in wan[:3]] == ["dense", "select", "sparse"] and len(set(wan)) == 3


def test_step_kinds_of_consecutive_dense_mlp_steps():
    """Only the last of consecutive dense MLP steps makes caches."""
    cfg = ChipmunkConfig.from_name("flux").with_overrides({"mlp.first_dense_steps": 3})
    assert [k[1] for k in step_kinds(cfg, 5)] == ["dense", "dense", "cache", "select", "reuse"]


def test_prediction_needs_every_kind_and_sums_the_schedule():
    kinds = [("a",), ("b",), ("b",), ("a",)]
    assert predict_total_ms([10.0, 2.0], kinds) == 24.0
    with pytest.raises(ValueError, match="not timed"):
        predict_total_ms([10.0], kinds)


def test_prediction_matches_a_measured_hunyuan_loop():
    """H200 run of the HunyuanVideo architecture (720x1280x9 frames, 50 steps): the first 3 steps predict
    the whole loop within 2%. (Recorded when step 0 still selected and cached like step 1; the two cost
    about the same at that size, so today's kinds, which time them apart, predict it as well.)"""
    path = BENCH / "results" / "e2e_steps_hunyuan_NVIDIA-H200_2026-11-27.json"
    steps = json.loads(path.read_text())["results"]["chipmunk"]["step_ms"]
    kinds = step_kinds(ChipmunkConfig.from_name("hunyuan"), len(steps))
    predicted = predict_total_ms(steps[:3], kinds)
    assert predicted == pytest.approx(sum(steps), rel=0.02)


def test_backend_variants_parse_and_repeat():
    """``--backends`` takes chipmunk variants (overrides on top of ``--set``) and repeats, for A/B/A/B runs in
    one process; anything else is refused before a model is built."""
    from bench_e2e import labels, parse_backend

    assert parse_backend("inductor") == ("inductor", ())
    assert parse_backend("chipmunk[mlp.early_selection=false;attention.keep=0.1]") == (
        "chipmunk", (("mlp.early_selection", False), ("attention.keep", 0.1)))
    for bad in ("inductor[mlp.keep=0.2]", "eager", "chipmunk[]"):
        with pytest.raises(SystemExit):
            parse_backend(bad)
    # values as in quality.py's variants: non-JSON text is a string, lists are tuples; a key twice is refused
    assert parse_backend("chipmunk[offload=never;attention.dense_steps=[0,1,10]]") == (
        "chipmunk", (("offload", "never"), ("attention.dense_steps", (0, 1, 10))))
    with pytest.raises(SystemExit, match="given twice"):
        parse_backend("chipmunk[mlp.keep=0.1;mlp.keep=0.2]")
    from _harness import split_top_level

    # --backends splits at commas outside brackets
    assert split_top_level("inductor,chipmunk[attention.dense_steps=[0,1]]", ",") == [
        "inductor", "chipmunk[attention.dense_steps=[0,1]]"]
    entries = ("chipmunk", "chipmunk[mlp.early_selection=false]", "chipmunk", "chipmunk[mlp.early_selection=false]")
    assert labels(entries) == ["chipmunk", "chipmunk[mlp.early_selection=false]", "chipmunk#2",
                               "chipmunk[mlp.early_selection=false]#2"]


def test_flop_summary_compares_with_inductor_rate():
    """flop_ratio = dense FLOPs of the loop / chipmunk's; rate_vs_inductor = measured speedup / flop_ratio."""
    from bench_e2e import flop_summary

    kinds = [("dense",), ("sparse",), ("sparse",), ("sparse",)]
    flops = [{"total": 100}, {"total": 40}, {"total": 40}, {"total": 40}]
    s = flop_summary(100, flops, [10.0, 5.0, 6.0, 7.0], kinds, inductor_step_ms=10.0, measured_speedup=1.5)
    assert s["flop_ratio"] == pytest.approx(400 / 220)
    assert s["rate_vs_inductor"] == pytest.approx(1.5 * 220 / 400)
    assert s["inductor_tflop_per_s"] == pytest.approx(100 / 10.0 / 1e9)
    assert s["by_kind"]["sparse"] == {"steps": 3, "median_ms": 6.0, "tflop": 40 / 1e12,
                                      "tflop_per_s": 40 / 6.0 / 1e9, "flops_vs_dense": 0.4}
    with pytest.raises(ValueError, match="step counts"):
        flop_summary(100, flops[:3], [1.0] * 4, kinds, inductor_step_ms=1.0, measured_speedup=1.0)


def test_count_flops_run_on_a_tiny_flux(tmp_path, monkeypatch):
    """``--count-flops`` on CPU: the dense count includes attention (SDPA's CPU kernel has no formula of its
    own), chipmunk's sparse steps count fewer FLOPs than a dense step, and the CSV row matches the JSON.
    (On CPU the tiny model's attention sites are rewritten; CUDA keeps its head dim of 16 dense.)"""
    import csv

    from bench_e2e import main

    pytest.importorskip("diffusers")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["--model", "flux", "--size", "tiny", "--steps", "6", "--count-flops", "--out", str(tmp_path),
          "--backends", "inductor,chipmunk"])
    data = json.loads(next(tmp_path.glob("e2e_steps_flux_*.json")).read_text())
    ind, ours = data["results"]["inductor"], data["results"]["chipmunk"]
    assert len(ind["step_flops"]) == 1 and len(ours["step_flops"]) == 6
    dense = ind["step_flops"][0]["total"]
    # tiny FLUX: 2 double + 3 single blocks, 64 image + 16 text tokens, 2 heads of 16: the attention alone
    assert dense > 5 * 4 * 2 * 80 * 80 * 16
    kinds = step_kinds(ChipmunkConfig.from_name("flux"), 6)
    sparse = [f["total"] for f, k in zip(ours["step_flops"], kinds) if k[0] == "sparse"]
    assert sparse and max(sparse) < dense
    assert all(f["attention"] > 0 for f in ours["step_flops"])
    summary = data["flop_summaries"]["chipmunk"]
    assert summary["flop_ratio"] == pytest.approx(6 * dense / sum(f["total"] for f in ours["step_flops"]))
    rows = list(csv.DictReader(next(tmp_path.glob("flops_flux_*.csv")).open()))
    assert [r["backend"] for r in rows] == ["chipmunk"]
    assert float(rows[0]["flop_ratio"]) == pytest.approx(summary["flop_ratio"], rel=1e-3)


def test_bad_chipmunk_options_stop_the_run_before_any_model():
    """A variant's or --set's unknown key or bad value exits naming it, before a model is built (a GPU run would
    otherwise fail after Inductor's whole generation)."""
    from bench_e2e import main

    for argv, message in ((["--backends", "inductor,chipmunk[mlp.kep=0.1]"], "mlp.kep"),
                          (["--backends", "chipmunk[foo=1]"], "not chipmunk options"),
                          (["--set", "mlp.keep=1.5"], "mlp.keep")):
        with pytest.raises(SystemExit, match=message):
            main(["--size", "tiny", *argv])


def test_count_flops_refuses_partial_or_graphed_loops():
    from bench_e2e import main

    for extra in (["--timed-steps", "3"], ["--mode", "reduce-overhead"]):
        with pytest.raises(SystemExit):
            main(["--size", "tiny", "--count-flops", *extra])
