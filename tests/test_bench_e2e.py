"""The step-kind prediction bench_e2e uses for loops too long to time whole (issue: HunyuanVideo 129 f)."""

import json
import sys
from pathlib import Path

import pytest

from chipmunk_compile import ChipmunkConfig

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from bench_e2e import predict_total_ms, step_kinds  # noqa: E402


def test_step_kinds_follow_the_presets():
    hunyuan = step_kinds(ChipmunkConfig.from_name("hunyuan"), 50)
    assert [i for i, k in enumerate(hunyuan) if k[0]] == [0, 1, 10, 40] and all(k[1] == k[0] for k in hunyuan)
    assert {k[2] for k in hunyuan} == {"off"}
    flux = step_kinds(ChipmunkConfig.from_name("flux"), 50)
    assert [i for i, k in enumerate(flux) if k[1]] == [0]  # selection once, then refreshes
    assert [i for i, k in enumerate(flux) if k[2] == "dense"] == [0, 10, 20, 30, 40]
    assert [k[2] for k in flux[1:6]] == ["select", "reuse", "select", "reuse", "select"]
    assert len(set(flux)) == 5


def test_prediction_needs_every_kind_and_sums_the_schedule():
    kinds = [("a",), ("b",), ("b",), ("a",)]
    assert predict_total_ms([10.0, 2.0], kinds) == 24.0
    with pytest.raises(ValueError, match="not timed"):
        predict_total_ms([10.0], kinds)


def test_prediction_matches_a_measured_hunyuan_loop():
    """H200 run of the HunyuanVideo architecture (720x1280x9 frames, 50 steps): the first 3 steps predict
    the whole loop within 2%."""
    path = BENCH / "results" / "e2e_steps_hunyuan_NVIDIA-H200_2026-11-27.json"
    steps = json.loads(path.read_text())["results"]["chipmunk"]["step_ms"]
    kinds = step_kinds(ChipmunkConfig.from_name("hunyuan"), len(steps))
    predicted = predict_total_ms(steps[:3], kinds)
    assert predicted == pytest.approx(sum(steps), rel=0.02)
