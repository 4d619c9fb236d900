"""The arithmetic of benchmarks/iteration_cost.py (the cost model of docs/CHEAPER_ITERATIONS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "iteration_cost", Path(__file__).resolve().parents[1] / "benchmarks" / "iteration_cost.py"
)
cost = importlib.util.module_from_spec(_spec)
sys.modules["iteration_cost"] = cost  # dataclasses look their module up
_spec.loader.exec_module(cost)


def test_the_papers_iteration_is_92_percent_generation():
    f = cost.forwards(cost.Scale(), cost.PROTOCOLS[0])
    assert f["images"] == 959_040  # 500 × 2048 = 1,024,000 positions visit every row
    assert f["generate"] == 959_040 * 50 * 2
    assert f["train"] == 500 * 2048 * 8
    assert f["reference"] == 500 * 2048 * 2  # the reference's 2 of a pair's 8, precomputed after generation
    assert f["per_gpu"] == pytest.approx((95_904_000 + 8_192_000) / 8)
    assert f["generate"] / f["total"] == pytest.approx(0.921, abs=1e-3)


def test_per_caption_and_fewer_steps_divide_the_generation():
    scale = cost.Scale(unique_captions=60_000)
    one = cost.forwards(scale, cost.Protocol("x", "one", "ddim", 50))
    assert one["images"] == 60_000 and one["generate"] == 60_000 * 100
    dpm = cost.forwards(scale, cost.Protocol("x", "one", "dpmsolver++", 20, guidance=False))
    assert dpm["generate"] == 60_000 * 20 and dpm["train"] == one["train"]


def test_a_short_iteration_samples_at_most_the_rows_it_visits():
    scale = cost.Scale(rows=10_000, unique_captions=5_000, optimizer_steps=10, pairs_per_step=100)
    assert scale.visited_rows == 1_000
    assert cost.opponent_images(scale, "every_row") == 1_000 and cost.opponent_images(scale, "one") == 1_000
    with pytest.raises(ValueError, match="every_row or one"):
        cost.opponent_images(scale, "all")


def test_the_table_reports_the_ratio_to_the_papers_protocol():
    text = cost.table(cost.Scale(), 8.0)
    rows = [line for line in text.splitlines() if line.startswith("| paper") or line.startswith("| per_caption, DPM")]
    assert rows[0].endswith("| 1.00x |")
    expected = (95_904_000 + 8_192_000) / (58_960 * 40 + 8_192_000)
    assert rows[1].endswith(f"| {expected:.2f}x |")
