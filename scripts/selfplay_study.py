"""Issue 28's study (shapes and relation worlds): does self-play that is told about the caption close the gap to SFT?

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/selfplay_study.py --out /tmp/selfplay_study   # ~55 min, 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/selfplay_study.py --world relations --out /tmp/rel_study \
        --arms sft spin "spin + caption contrast" "ddo lr=1e-4" "spin pool=all" "spin 32 pairs"   # ~35 min
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/selfplay_study.py --world relations --scale 4 --out /tmp/rel_x4 \
        --arms sft spin "spin + caption contrast" "spin 32 pairs"   # 4x the steps

The relation world (`spin_diffusion.relation_world`, 288 scenes: two shapes, their colors and a relation) runs the
same protocol from its shipped base (assets/relation_base, `scripts/train_demo_base.py --world relations`), on 4
clean pairs of each of its 144 train scenes (576 pairs), judged on its 72 validation and 72 test scenes (one image
each, the same sampler), "all correct" = both shapes, each one's color and the relation right; `--arms` runs a
subset (the combination and the runs on top of SFT need the arms they are chosen from).

Protocol (written before any of its numbers were seen; docs/DEMO_STUDY.md §4 holds what it printed):

1. Arms, from the shipped base on the demo's fine-tuning pairs, each for seeds 0, 1, 2, each at the demo's budget
   (3 iterations × 40 optimizer steps; SFT 120 steps × 32 real images):
   - `sft`: the demo's SFT (lr 5e-4);
   - `spin`: the demo's SPIN recipe (spin_approx, lr 1e-4, β 2000, guard μ 0.9, 16 real + 16 own images a step);
   - `spin + caption contrast`: the recipe + `loss.caption_contrast_weight: 1` (one-word negatives): the two
     terms weigh the same, the one value tried in the issue's sanity check, not tuned;
   - `caption contrast alone`: `loss.objective: caption_contrast` in rounds against θ_k, no generation (same lr, β;
     the guard is SPIN's and is off: the term has no generated loser);
   - `ddo lr=…`: `loss.objective: ddo` (α = 1, the paper's code default; β 2000; no guard: it is refused for DDO) at
     the recipe's lr 1e-4 and at 2e-5 (DDO is new here, so it gets two rates; the better on validation is kept);
   - `spin pool=all`: the recipe with `sample.opponent_pool: all` (losers from θ_0..θ_k's samples);
   - `spin 32 pairs`: the recipe at 32 real + 32 own images a step: SFT's real images per step (equal real images;
     twice SFT's compute per step). The plain recipe is the equal-compute arm (16 + 16 = SFT's 32 images a step).
2. Every arm's final model (and each SPIN-family iteration, for the curves) is scored on the VALIDATION scenes and
   on the TEST scenes (48 prompts each, the demo's sampler and judge). Choices use validation only: DDO's rate; the
   best self-play arm (mean all-correct over the seeds, ties within 1 point to the lower Fréchet distance); the
   combination = the recipe + every single change (caption contrast, pool=all) whose validation mean beats the
   recipe's by more than one prompt (2.1 points), run only if there are two or more such changes.
3. On top of SFT: the seed's SFT model, then the best self-play arm for its full budget, against SFT continued from
   the same model for the same 120 steps (the demo's SFT-then-SPIN comparison, for the validated arm).
4. The tables report TEST scenes for every arm, whichever way the numbers fall, with the validation columns beside
   them. Nothing here changes a default by itself: the demo's defaults follow the validated best (docs).

The relation world at 4× the budget (`--world relations --scale 4`; written before its numbers were seen): at the
demo's budget no arm, SFT included, moved prompt fidelity there beyond the seed spread (docs/DEMO_STUDY.md §4), so
the same protocol runs with every arm's optimizer steps × 4 (SFT 480 steps × 32 real images; SPIN 3 iterations ×
160 steps), nothing else changed (rates, β, guard, data, judges, seeds). Arms: `sft`, `spin`, `spin + caption
contrast` (the demo's recipe now), `spin 32 pairs` (equal real images per step); then step 3 for the arm validation
picks. Whether SFT itself now beats the base on validation by more than one prompt is reported first: if it does
not, the world still has no room at this budget, and the run says so rather than a longer one being tried.

The caption contrast's weight (protocol 5; written before its numbers were seen): the demo's w = 1 was the one value
tried. `--arms "spin + caption contrast" "spin + caption contrast w=0.5" "spin + caption contrast w=2"` runs the
recipe with the contrast at half and twice the weight (nothing else changed), in each world at the demo's budget.
Validation picks: another weight replaces w = 1 only if its validation mean beats w = 1's by more than one prompt
(2.1 points in the shapes world, 1.4 in the relation world), and only a pick in the shapes world (the demo's world)
would change the demo's default; the test columns report, whichever way they fall.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import statistics
import time
from pathlib import Path

from spin_diffusion import console, relation_world
from spin_diffusion.config import RunConfig, replace
from spin_diffusion.demo import runner
from spin_diffusion.demo.evaluate import EvalSpec, evaluate, win_rate_vs
from spin_diffusion.rundir import iter_dir

SEEDS = (0, 1, 2)
# The demo's SPIN recipe as it stood when this study was planned (the caption contrast off: the study made it the
# demo's default since, runner.SPIN_CAPTION_CONTRAST); every self-play arm states its contrast weight.
RECIPE: dict = {"loss.caption_contrast_weight": 0.0}
ARMS: dict[str, tuple[str, dict]] = {  # name -> (base config: sft | spin, overrides)
    "sft": ("sft", {}),
    "spin": ("spin", RECIPE),
    "spin + caption contrast": ("spin", {"loss.caption_contrast_weight": 1.0}),
    "spin + caption contrast w=0.5": ("spin", {"loss.caption_contrast_weight": 0.5}),
    "spin + caption contrast w=2": ("spin", {"loss.caption_contrast_weight": 2.0}),
    "caption contrast alone": ("spin", RECIPE | {"loss.objective": "caption_contrast", "loss.loser_guard": None}),
    "ddo lr=1e-4": ("spin", RECIPE | {"loss.objective": "ddo", "loss.loser_guard": None}),
    "ddo lr=2e-5": ("spin", RECIPE | {"loss.objective": "ddo", "loss.loser_guard": None, "train.learning_rate": 2e-5}),
    "spin pool=all": ("spin", RECIPE | {"sample.opponent_pool": "all"}),
    "spin 32 pairs": ("spin", RECIPE | {"train.batch_size": 2 * runner.PAIRS_PER_STEP}),
}
SINGLE_CHANGES = ("spin + caption contrast", "spin pool=all")  # candidates of the combination (protocol 2)
# the contrast's weight (protocol 5): the demo's value first
CONTRAST_WEIGHTS = ("spin + caption contrast", "spin + caption contrast w=0.5", "spin + caption contrast w=2")


def _slug(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_").replace("=", "").replace(">", "")


RELATION_PAIRS_PER_SCENE = 4
RELATION_EVAL_PER_SCENE = 1


def _base(out: Path) -> Path:
    """The base the arms start from: the shipped demo base, or --base (written to out/base.txt by main)."""
    saved = out / "base.txt"
    return Path(saved.read_text().strip()) if saved.exists() else runner.shipped_base()


def _world(out: Path) -> str:
    saved = out / "world.txt"
    return saved.read_text().strip() if saved.exists() else "shapes"


def _scale(out: Path) -> float:
    """Every arm's optimizer steps × this (--scale, written to out/scale.txt by main; 1 = the demo's budget)."""
    saved = out / "scale.txt"
    return float(saved.read_text().strip()) if saved.exists() else 1.0


def _settle(args: argparse.Namespace) -> None:
    """World, base and scale: a resumed study (out/*.txt saved) keeps its own; a flag that differs is one line."""
    for name, flag, default in (
        ("world", "--world", lambda: "shapes"),
        ("base", "--base", lambda: relation_world.SHIPPED_BASE if args.world == "relations" else None),
        ("scale", "--scale", lambda: 1.0),
    ):
        saved_file = args.out / f"{name}.txt"
        saved = saved_file.read_text().strip() if saved_file.exists() else None
        given = getattr(args, name)
        if given is not None and name == "base":
            given = given.resolve()
        if given is not None and saved is not None and _float_or(given) != _float_or(saved):
            raise SystemExit(f"error: {saved_file} ran with {flag} {saved}; pass that, or another --out")
        value = given if given is not None else saved if saved is not None else default()
        if name == "scale":
            value = float(value)
        setattr(args, name, Path(value) if name == "base" and value is not None else value)
        if value is not None:
            saved_file.write_text(f"{value}\n")


def _float_or(value: object) -> object:
    """A number's value (so --scale 4 matches a saved 4.0), else the text."""
    try:
        return float(str(value))
    except ValueError:
        return str(value)


def _data(out: Path) -> Path:
    if _world(out) == "shapes":
        return runner.prepare(out)
    folder = out / "world" / "finetune"
    if not (folder / "metadata.jsonl").exists():
        scenes = relation_world.split_scenes("train")
        relation_world.write_imagefolder(folder, RELATION_PAIRS_PER_SCENE * len(scenes), seed=7, scenes=scenes)
    return folder


def _config(out: Path, name: str, s: int, kind: str, overrides: dict) -> RunConfig:
    """Arm `name`'s run for seed s: the demo's `kind` run (sft | spin) with `overrides`."""
    sft, spin = runner.finetune_configs(
        out / "arms" / _slug(name) / f"seed_{s}",
        _base(out),
        _data(out),
        seed=s,
        hyper=runner.Hyper(),
        scale=_scale(out),
    )
    return replace(sft if kind == "sft" else spin, **overrides)


def _score(out: Path, model: Path, split: str, s: int, out_json: Path) -> dict:
    """demo.evaluate.evaluate of `model` on `split` ("val" | "test") for seed s: the demo's specs in the shapes world;
    in the relation world one image per scene of the split, on the same seeds and sampler, with its judge."""
    if _world(out) == "shapes":
        spec = runner.validation_spec(s) if split == "val" else runner.heldout_spec(s)
        return evaluate(model, spec, out_json)
    seed = (2000 if split == "val" else 1000) + s  # runner.validation_spec's and heldout_spec's
    name = "validation" if split == "val" else split
    spec = EvalSpec.for_split(name, RELATION_EVAL_PER_SCENE, seed=seed, world="relations", **runner.EVAL_SAMPLE)
    return evaluate(model, spec, out_json, world="relations")


def _job(name: str, s: int, extra: dict | None = None) -> tuple[str, int, str, dict]:
    kind, overrides = ARMS[name]
    return name, s, kind, overrides | (extra or {})


def _models(cfg: RunConfig) -> dict[int, Path]:
    return {k: iter_dir(Path(cfg.run_dir), k) / "model" for k in range(1, cfg.num_iterations + 1)}


def unit(out: Path, name: str, s: int, kind: str, overrides: dict) -> dict:
    """Train one arm for seed s (resumable) and score its models: {split: {iteration: metrics}}."""
    cfg = _config(out, name, s, kind, overrides)
    t0 = time.perf_counter()
    runner.run(cfg, resume=Path(cfg.run_dir).exists(), progress=False)
    seconds = time.perf_counter() - t0
    scores: dict = {"train_seconds": round(seconds, 1)}
    for split in ("val", "test"):
        base_r = _score(out, _base(out), split, s, out / "base" / f"{split}_seed{s}.json")
        scores[split] = {}
        for k, model in _models(cfg).items():
            r = _score(out, model, split, s, Path(cfg.run_dir) / f"{split}_iter{k}.json")
            scores[split][k] = r["metrics"] | {"win_rate_vs_base": win_rate_vs(r, base_r)}
    last = _log(Path(cfg.run_dir), cfg.num_iterations)
    (Path(cfg.run_dir) / "study.json").write_text(json.dumps(scores | {"train_log": last}, indent=1))
    return scores


def _log(run_dir: Path, iterations: int) -> list[dict]:
    out = []
    for k in range(1, iterations + 1):
        lines = (run_dir / f"iter_{k:02d}" / "train" / "train_log.jsonl").read_text().splitlines()
        out.append(json.loads(lines[-1]))
    return out


def _run_all(out: Path, jobs: list[tuple[str, int, str, dict]], workers: int) -> dict[str, list[dict]]:
    """{arm name: [scores per seed]} for `jobs` (name, seed, kind, overrides), on `workers` processes."""
    context = multiprocessing.get_context("spawn")
    results: dict[tuple[str, int], dict] = {}
    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=console.start_worker,
                                initargs=(1, True)) as pool:  # fmt: skip
        futures = {pool.submit(unit, out, *job): job[:2] for job in jobs}
        for future in cf.as_completed(futures):
            name, s = futures[future]
            results[name, s] = future.result()
            final = results[name, s]["val"][max(results[name, s]["val"])]
            print(f"{name} seed {s}: val all-correct {final['shapes_judge']:.3f} fd {final['fd']:.3f} "
                  f"({results[name, s]['train_seconds']} s training)", flush=True)  # fmt: skip
    rows: dict[str, list[dict]] = {}
    for name, s, *_ in jobs:
        rows.setdefault(name, []).append(results[name, s])
    return rows


def _final(scores: dict, split: str) -> dict:
    return scores[split][max(scores[split], key=int)]


def _mean(rows: list[dict], split: str, key: str) -> float:
    return statistics.fmean(_final(r, split)[key] for r in rows)


def _best(rows: dict[str, list[dict]], names: list[str]) -> str:
    """Best validation mean all-correct; ties within one point to the lower Fréchet distance."""
    score = {n: _mean(rows[n], "val", "shapes_judge") for n in names}
    close = [n for n in names if score[n] >= max(score.values()) - 0.01]
    return min(close, key=lambda n: _mean(rows[n], "val", "fd"))


def _cell(values: list[float], percent: bool) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}" if percent else f"{m:.3f} ± {s:.3f}"


def table(rows: dict[str, list[dict]]) -> str:
    lines = [
        "| arm | test all correct (%) | test Fréchet ↓ | test win vs base (%) | val all correct (%) | val Fréchet ↓ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, rs in rows.items():
        t = [_final(r, "test") for r in rs]
        v = [_final(r, "val") for r in rs]
        lines.append(
            f"| {name} | {_cell([x['shapes_judge'] for x in t], True)} | {_cell([x['fd'] for x in t], False)} | "
            f"{_cell([x['win_rate_vs_base'] for x in t], True)} | {_cell([x['shapes_judge'] for x in v], True)} | "
            f"{_cell([x['fd'] for x in v], False)} |"
        )
    return "\n".join(lines)


def curves(rows: dict[str, list[dict]]) -> str:
    """Test all-correct and Fréchet distance per iteration (mean over seeds) of the multi-iteration arms."""
    lines = ["| arm | iteration 1 | iteration 2 | iteration 3 |", "| --- | --- | --- | --- |"]
    for name, rs in rows.items():
        ks = sorted(rs[0]["test"], key=int)
        if len(ks) < 2:
            continue
        cells = [
            f"{100 * statistics.fmean(r['test'][k]['shapes_judge'] for r in rs):.1f} % / "
            f"{statistics.fmean(r['test'][k]['fd'] for r in rs):.3f}"
            for k in ks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/selfplay_study"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--world", choices=("shapes", "relations"), default=None, help="default: shapes")
    parser.add_argument("--base", type=Path, default=None, help="the base model (default: the world's shipped base)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="a subset of the arms")
    parser.add_argument("--scale", type=float, default=None, help="every arm's optimizer steps × this (default 1)")
    parser.add_argument(
        "--on-top", choices=("best", "all"), default="best", help="run the best self-play arm (or all) after SFT"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    _settle(args)
    _data(args.out)  # once, before the workers start
    if args.world == "shapes":
        one_prompt = 1 / len(runner.heldout_spec(0).prompts)
    else:
        one_prompt = 1 / len(relation_world.split_prompts("test", RELATION_EVAL_PER_SCENE))

    # 1-2. the arms, longest first
    order = ["spin 32 pairs", *CONTRAST_WEIGHTS, "spin pool=all", "spin", "ddo lr=1e-4", "ddo lr=2e-5",
             "caption contrast alone", "sft"]  # fmt: skip
    order = [n for n in order if args.arms is None or n in args.arms]
    rows = _run_all(args.out, [_job(n, s) for n in order for s in SEEDS], args.workers)
    picks: dict = {}
    selfplay = [n for n in order if n != "sft" and not n.startswith("ddo")]
    ddo = [n for n in order if n.startswith("ddo")]
    if ddo:
        picks["ddo"] = _best(rows, ddo)
        selfplay.append(picks["ddo"])
    weights = [n for n in CONTRAST_WEIGHTS if n in rows]
    if len(weights) > 1:  # the contrast's weight: another one replaces w = 1 only by more than one prompt
        w1 = _mean(rows[CONTRAST_WEIGHTS[0]], "val", "shapes_judge") if CONTRAST_WEIGHTS[0] in rows else None
        best_w = _best(rows, weights)
        beats = w1 is None or _mean(rows[best_w], "val", "shapes_judge") - w1 > one_prompt + 1e-9
        picks["caption contrast weight"] = best_w if beats else CONTRAST_WEIGHTS[0]
        # only the picked weight stands for the contrast among the self-play arms (the best arm, the runs on SFT)
        selfplay = [n for n in selfplay if n not in weights or n == picks["caption contrast weight"]]
    if "spin" in rows:
        recipe = _mean(rows["spin"], "val", "shapes_judge")
        margin = {n: _mean(rows[n], "val", "shapes_judge") - recipe for n in SINGLE_CHANGES if n in rows}
        better = [n for n, m in margin.items() if m > one_prompt + 1e-9]  # more than one prompt
        picks["changes that beat the recipe on validation"] = better
        if len(better) >= 2:
            combo = "spin + " + " + ".join(n.removeprefix("spin ").removeprefix("+ ") for n in better)
            ARMS[combo] = ("spin", {k: v for n in better for k, v in ARMS[n][1].items()})
            selfplay.append(combo)
            rows.update(_run_all(args.out, [_job(combo, s) for s in SEEDS], args.workers))

    # 3. on top of SFT: the best arm (--on-top all: every self-play arm) vs SFT continued, from the seed's SFT model
    top_rows: dict = {}
    if selfplay and "sft" in rows:
        best = picks["best self-play arm"] = _best(rows, selfplay)
        above = [best, *(n for n in selfplay if n != best)] if args.on_top == "all" else [best]
        sft_model = {s: {"model.path": str(_models(_config(args.out, "sft", s, *ARMS["sft"]))[1])} for s in SEEDS}
        for name in above:
            ARMS[f"sft -> {name}"] = ARMS[name]
        ARMS["sft -> sft continued"] = ARMS["sft"]
        names = [*(f"sft -> {n}" for n in above), "sft -> sft continued"]
        top_rows = _run_all(args.out, [_job(n, s, sft_model[s]) for n in names for s in SEEDS], args.workers)

    report = {
        "world": args.world,
        "base": str(_base(args.out)),
        "scale": args.scale,
        "picks": picks,
        "seconds": round(time.perf_counter() - started),
        "rows": rows,
        "on_top_of_sft": top_rows,
    }
    (args.out / "study.json").write_text(json.dumps(report, indent=1, default=str))
    print("\n## arms (test scenes; validation beside)\n\n" + table(rows))
    print("\n## per iteration (test: all-correct / Fréchet)\n\n" + curves(rows))
    if top_rows:
        print("\n## on top of SFT (test; validation beside)\n\n" + table(top_rows))
    print(f"\npicks: {json.dumps(picks)}\n{report['seconds']} s; {args.out / 'study.json'}")


if __name__ == "__main__":
    main()
