"""The README's demo table from a demo's results.json: mean ± spread over seeds, per-seed values in brackets.

.venv/bin/python scripts/demo_table.py demo_run/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [
    ("all correct", "shapes_judge", True),
    ("color", "shapes_color", True),
    ("shape", "shapes_shape", True),
    ("position", "shapes_position", True),
    ("Fréchet distance ↓", "fd", False),
    ("win rate vs base", "win_rate_vs_base", True),
]
NAMES = {
    "base": "base (shipped)",
    "sft": "SFT, 120 steps × 32 images",
    "spin iter 3": "SPIN iteration 3 (120 steps in all)",
    "sft then spin": "SFT 60 steps, then SPIN 3 × 20 steps",
}


def cell(model: dict, key: str, percent: bool) -> str:
    mean, spread, seeds = model["metrics"][key], model["spread"].get(key, 0.0), model["per_seed"].get(key, [])
    if percent:
        shown = f"{100 * mean:.1f} ± {100 * spread:.1f} %"
        values = ", ".join(f"{100 * v:.0f}" for v in seeds)
    else:
        shown = f"{mean:.2f} ± {spread:.2f}"
        values = ", ".join(f"{v:.2f}" for v in seeds)
    return shown + (f" <sub>({values})</sub>" if seeds else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    results = json.loads(parser.parse_args().results.read_text())
    print("| model | " + " | ".join(label for label, _, _ in COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    for model in results["models"]:
        name = NAMES.get(model["name"], model["name"].replace("spin iter", "SPIN iteration"))
        print(f"| {name} | " + " | ".join(cell(model, key, pct) for _, key, pct in COLUMNS) + " |")
    timings = results.get("timings", {})
    if "total" in timings:
        print(f"\ntotal wall-clock: {timings['total']:.0f} s")


if __name__ == "__main__":
    main()
