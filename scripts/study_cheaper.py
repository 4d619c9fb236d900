"""Cheaper self-play iterations in the demo world (issue 16): opponent samples per caption, and its sampler.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/study_cheaper.py --out /tmp/cheaper --workers 2   # ~1 h on 2 cores

Protocol (written before its numbers were seen; docs/CHEAPER_ITERATIONS.md holds the results it printed):

- Every arm is the demo's SPIN recipe (runner.Hyper(): lr 1e-4, guard 0.9, β 2000, 3 iterations × 40 steps × 16
  pairs) from the shipped base on the demo's fine-tuning pairs (192 rows, 24 distinct captions, 8 rows each); only
  the opponent's sampling changes (ARMS). Seeds 0..S-1 (default 3), the same seeds for every arm.
- Each arm's last model is scored on the VALIDATION scenes (which choose) and on the TEST scenes (which report),
  with the demo's evaluation (fixed sampler, DDIM 20; not the opponent's).
- Cost of an arm = UNet forwards per iteration: opponent images generated × sampler steps × 2 (guidance) + training
  (optimizer steps × pairs × 8 forward-equivalents: policy forward and backward and reference forward on two latents).
- The reference is the paper's protocol, every_row + DDIM 50. An arm keeps the final metrics "within the seed
  spread" when its validation mean of all-correct is at least the reference's mean minus the larger of the two
  standard deviations over seeds, and its mean Fréchet distance at most the reference's plus the larger of theirs.
  The recommended setting is the cheapest arm that does; its test numbers are reported with every other arm's,
  whichever way they fall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from demo_study import _claim, _mean_sd, _score, table

from spin_diffusion.config import replace
from spin_diffusion.demo import runner
from spin_diffusion.demo.evaluate import evaluate

# name -> sample.* overrides of the demo's SPIN run (runner.SAMPLE: DDIM 10, CFG 3)
ARMS = {
    f"{per_caption}, {name} {steps}": {
        "sample.per_caption": per_caption,
        "sample.scheduler": scheduler,
        "sample.num_steps": steps,
    }
    for per_caption, name, scheduler, steps in [
        ("every_row", "DDIM", "ddim", 50),
        ("every_row", "DDIM", "ddim", 10),
        ("every_row", "DPM++", "dpmsolver++", 10),
        ("every_row", "DPM++", "dpmsolver++", 20),
        ("one", "DDIM", "ddim", 10),
        ("one", "DPM++", "dpmsolver++", 20),
    ]
}
REFERENCE = "every_row, DDIM 50"
TRAIN_FORWARDS_PER_PAIR = 8


def _folder(arm: str) -> str:
    return arm.replace(", ", "_").replace(" ", "").replace("+", "p")


def _config(out: Path, arm: str, s: int):
    _, spin = runner.finetune_configs(out / "runs" / _folder(arm) / f"seed_{s}", runner.shipped_base(),
                                      runner.prepare(out), seed=s, hyper=runner.Hyper(), scale=1.0)  # fmt: skip
    return replace(spin, **ARMS[arm])


def _run_unit(out: Path, arm: str, s: int) -> dict:
    """Train one arm for seed s, score its last model on both splits; timings and forwards from state.json."""
    cfg = _config(out, arm, s)
    t0 = time.perf_counter()
    runner.run(cfg, resume=Path(cfg.run_dir).exists(), progress=False)
    seconds = time.perf_counter() - t0
    run_dir = Path(cfg.run_dir)
    model = run_dir / f"iter_{cfg.num_iterations:02d}" / "model"
    result = {"arm": arm, "seed": s, "seconds": round(seconds, 1)}
    for split, spec in (("val", runner.validation_spec(s)), ("test", runner.heldout_spec(s))):
        base = json.loads((out / split / f"base_seed{s}.json").read_text())
        result[split] = _score(model, base, spec, run_dir / f"{split}.json")
    info = json.loads((run_dir / "state.json").read_text())["info"]
    gen = [info[f"generate:{k}"] for k in range(cfg.num_iterations)]
    train = [info[f"train:{k + 1}"] for k in range(cfg.num_iterations)]
    cfg_forwards = 2 if cfg.sample.guidance_scale > 1 else 1
    result["generated_per_iteration"] = statistics.fmean(g["generated"] for g in gen)
    result["generate_seconds"] = [g.get("wall_seconds") for g in gen]
    result["train_seconds"] = [t["wall_seconds"] for t in train]
    result["forwards_per_iteration"] = (
        result["generated_per_iteration"] * cfg.sample.num_steps * cfg_forwards
        + cfg.train.max_steps * cfg.train.batch_size * TRAIN_FORWARDS_PER_PAIR
    )
    (run_dir / "unit.json").write_text(json.dumps(result, indent=1))
    return result


def _unit_file(out: Path, arm: str, s: int) -> Path:
    return out / "runs" / _folder(arm) / f"seed_{s}" / "spin" / "unit.json"


def work(out: Path, seeds: list[int], worker: int) -> None:
    units = [(arm, s) for s in seeds for arm in ARMS]
    units.sort(key=lambda u: u[0] != REFERENCE)  # the longest units first
    for arm, s in units:
        if not _unit_file(out, arm, s).exists() and _claim(out, f"{_folder(arm)}_seed{s}"):
            r = _run_unit(out, arm, s)
            val, test = r["val"]["shapes_judge"], r["test"]["shapes_judge"]
            print(f"[{worker}] {arm} seed {s}: val {val:.3f} test {test:.3f} ({r['seconds']} s)", flush=True)


def within_spread(rows: dict[str, list[dict]], arm: str) -> bool:
    """The protocol's test on validation rows {arm: [metrics per seed]} against REFERENCE."""
    (ref_acc, ref_acc_sd), (acc, acc_sd) = (_mean_sd([r["shapes_judge"] for r in rows[a]]) for a in (REFERENCE, arm))
    (ref_fd, ref_fd_sd), (fd, fd_sd) = (_mean_sd([r["fd"] for r in rows[a]]) for a in (REFERENCE, arm))
    return acc >= ref_acc - max(ref_acc_sd, acc_sd) and fd <= ref_fd + max(ref_fd_sd, fd_sd)


def summarize(out: Path, seeds: list[int]) -> dict:
    units = {arm: [json.loads(_unit_file(out, arm, s).read_text()) for s in seeds] for arm in ARMS}
    val = {arm: [u["val"] for u in us] for arm, us in units.items()}
    test = {arm: [u["test"] for u in us] for arm, us in units.items()}
    cost = {arm: us[0]["forwards_per_iteration"] for arm, us in units.items()}
    passing = [arm for arm in ARMS if within_spread(val, arm)]
    pick = min(passing, key=lambda a: cost[a])
    timing = {
        arm: {
            "generated_per_iteration": us[0]["generated_per_iteration"],
            "forwards_per_iteration": cost[arm],
            "cost_vs_reference": round(cost[arm] / cost[REFERENCE], 3),
            "generate_seconds_per_iteration": _mean_sd([x for u in us for x in u["generate_seconds"]]),
            "train_seconds_per_iteration": _mean_sd([x for u in us for x in u["train_seconds"]]),
        }
        for arm, us in units.items()
    }
    return {"validation": val, "test": test, "passing": passing, "pick": pick, "timing": timing}


def cost_table(timing: dict) -> str:
    lines = [
        "| arm | images / iteration | UNet forwards / iteration | cost vs reference | generate s / it "
        "| train s / it |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm, t in timing.items():
        (g, gs), (tr, ts) = t["generate_seconds_per_iteration"], t["train_seconds_per_iteration"]
        lines.append(f"| {arm} | {t['generated_per_iteration']:.0f} | {t['forwards_per_iteration']:.0f} | "
                     f"{t['cost_vs_reference']:.3f} | {g:.1f} ± {gs:.1f} | {tr:.1f} ± {ts:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/study_cheaper"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the units (the cores split)")
    parser.add_argument("--worker", type=int, default=-1, help="(internal) this process's index")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    if args.worker >= 0:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        work(args.out, seeds, args.worker)
        return
    import shutil

    started = time.perf_counter()
    shutil.rmtree(args.out / "claims", ignore_errors=True)  # units left half-done by a killed study run again
    runner.prepare(args.out)
    for s in seeds:  # shared inputs first, so that the workers only read them
        for split, spec in (("val", runner.validation_spec(s)), ("test", runner.heldout_spec(s))):
            evaluate(runner.shipped_base(), spec, args.out / split / f"base_seed{s}.json")
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    argv = [sys.executable, __file__, "--out", str(args.out), "--seeds", str(args.seeds)]
    procs = [subprocess.Popen([*argv, "--worker", str(w)], env=env) for w in range(args.workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")
    result = summarize(args.out, seeds) | {"protocol": __doc__, "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "study_cheaper.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n## Validation scenes\n\n" + table(result["validation"]))
    print(f"\nwithin the spread of {REFERENCE}: {result['passing']}; pick (cheapest): {result['pick']}")
    print("\n## Test scenes\n\n" + table(result["test"]))
    print("\n## Cost\n\n" + cost_table(result["timing"]))
    print(f"\n{result['seconds']} s; {args.out / 'study_cheaper.json'}")


if __name__ == "__main__":
    main()
