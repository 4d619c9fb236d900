"""Issue 28 sanity check (one seed, validation scenes, no tuning): the demo's SPIN recipe vs the same + caption
contrast (weight 1, one-word negatives), at half the demo's steps per iteration. Not the study: docs/OBJECTIVES.md.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/caption_contrast_sanity.py spin [scale] [out]
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/caption_contrast_sanity.py contrast [scale] [out]
"""

import json
import sys
import time
from pathlib import Path

from spin_diffusion.config import replace
from spin_diffusion.demo import runner
from spin_diffusion.demo.evaluate import evaluate, win_rate_vs

arm = sys.argv[1]
scale = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
out = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/caption_contrast_sanity")
base = runner.shipped_base()
data_dir = runner.prepare(out)
_, spin = runner.finetune_configs(out / "seed_0", base, data_dir, seed=0, hyper=runner.Hyper(), scale=scale)
if arm == "contrast":
    spin = replace(spin, run_dir=str(out / "seed_0" / "spin_cc"), **{"loss.caption_contrast_weight": 1.0})
spec = runner.validation_spec(0)
t0 = time.perf_counter()
runner.run(spin, resume=Path(spin.run_dir).exists(), progress=False)
train_s = time.perf_counter() - t0
base_r = evaluate(base, spec, out / "base_val.json")
rows = {}
for k in range(1, spin.num_iterations + 1):
    model = Path(spin.run_dir) / f"iter_{k:02d}" / "model"
    r = evaluate(model, spec, Path(spin.run_dir) / f"val_{k}.json")
    rows[k] = {
        **{m: round(v, 4) for m, v in r["metrics"].items()},
        "win_rate_vs_base": round(win_rate_vs(r, base_r), 4),
    }
print(
    json.dumps(
        {
            "arm": arm,
            "scale": scale,
            "lr": spin.train.learning_rate,
            "steps": spin.train.max_steps,
            "guard": spin.loss.loser_guard,
            "contrast": spin.loss.caption_contrast_weight,
            "base": base_r["metrics"],
            "iterations": rows,
            "train_seconds": round(train_s, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
        },
        indent=1,
    )
)
