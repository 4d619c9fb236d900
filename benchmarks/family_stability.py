"""Does preference training blow up the winner's error, per family? SPIN (spin_approx) on every tiny preset, with
Diffusion-SDPO's winner guard off and on, logging θ's denoising error on the winner (the real image) and on the loser
(θ_k's own image) at every step.

Users report Diffusion-DPO on FLUX.2-klein and Qwen-Image as unstable: the winner's error grows after a few steps
(Flow-Factory #108, DiffSynth-Studio #998). The failure DPO's loss allows is exactly that: the logit only asks the
loser's error to grow *more* than the winner's, so both may grow. This script measures, on the tiny presets, how the
winner's error moves under each family's recipe β (5000 for the ε-prediction UNets, Diffusion-DPO's; 100 for the
velocity-predicting transformers, flow_grpo's) and under β = 5000 for every family, with loss.loser_guard off and 0.9.

    OMP_NUM_THREADS=2 python benchmarks/family_stability.py [--steps 40] [--json out.json]

Tiny presets are random networks on the built-in shapes data: the figures show the mechanism and how β and the guard
act on it, not what a pretrained FLUX.2 does. Prints one row per run: the winner's and loser's error over the last
quarter of the steps relative to the first step, the largest winner ratio on the way, and the last step's margin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# preset -> the recipe's β (configs/*_pickapic.yaml: ε errors for the UNets, velocity errors for the transformers)
RECIPE_BETA = {
    "tiny": 5000.0,
    "tiny-sdxl": 5000.0,
    "tiny-sd3": 100.0,
    "tiny-flux": 100.0,
    "tiny-zimage": 100.0,
    "tiny-qwenimage": 100.0,
    "tiny-flux2": 100.0,
}
EXTRA = {
    "tiny-flux": ["sample.guidance_scale=3.5", "model.max_sequence_length=32"],
    "tiny-qwenimage": ["model.max_sequence_length=192"],
}


def run_one(preset: str, beta: float, guard: float | None, steps: int, work: Path) -> dict:
    from spin_diffusion import api

    run_dir = work / f"{preset}-{beta:g}-{guard}"
    overrides = [
        f"model.preset={preset}",
        "num_iterations=1",
        "data.num_builtin=32",
        "sample.num_steps=8",
        f"loss.beta={beta}",
        f"loss.loser_guard={'null' if guard is None else guard}",
        "train.batch_size=4",
        f"train.max_steps={steps}",
        "train.checkpoint_every=1000",
        "eval.enabled=false",
        *EXTRA.get(preset, []),
    ]
    api.spin(REPO / "configs" / "tiny.yaml", overrides, run_dir=run_dir, progress=False)
    log = [json.loads(line) for line in (run_dir / "iter_01" / "train" / "train_log.jsonl").open()]
    winner = [r["policy_error_winner"] for r in log]
    loser = [r["policy_error_loser"] for r in log]
    tail = max(1, len(log) // 4)
    return {
        "preset": preset,
        "beta": beta,
        "guard": guard,
        "steps": len(log),
        "winner_end_ratio": statistics.fmean(winner[-tail:]) / winner[0],
        "winner_max_ratio": max(winner) / winner[0],
        "loser_end_ratio": statistics.fmean(loser[-tail:]) / loser[0],
        "margin_end": log[-1]["margin"],
        "winner": winner,
        "loser": loser,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--presets", nargs="*", default=list(RECIPE_BETA))
    parser.add_argument("--json", type=Path, help="also write every run's per-step errors here")
    args = parser.parse_args()
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for beta in sorted({RECIPE_BETA[preset], 5000.0}):
                for guard in (None, 0.9):
                    rows.append(run_one(preset, beta, guard, args.steps, Path(tmp)))
                    r = rows[-1]
                    print(f"  {preset} β={beta:g} guard={guard}: winner ×{r['winner_end_ratio']:.3f}", file=sys.stderr)
    print(f"SPIN (spin_approx), 1 iteration of {args.steps} steps × 4 pairs, lr 1e-4, full fine-tuning, seed 0")
    print("| preset | β | guard | winner error, end / start | winner, max / start | loser, end / start | margin |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['preset']} | {r['beta']:g} | {'off' if r['guard'] is None else r['guard']} | "
            f"{r['winner_end_ratio']:.3f} | {r['winner_max_ratio']:.3f} | {r['loser_end_ratio']:.3f} | "
            f"{r['margin_end']:.2f} |"
        )
    print(f"wall: {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
