"""The demo's study: a fair hyper-parameter grid on validation scenes, then the knobs on the held-out test scenes.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/demo_study.py --out /tmp/study        # ~35 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/demo_study.py --out /tmp/study --phase knobs --sft-lr ... (skip the grid)

Protocol (written before the numbers were seen; docs/DEMO_STUDY.md holds the results it printed):

1. Grid, the same for both methods, from the shipped base, on the demo's fine-tuning pairs (train scenes), each
   setting for the seeds 0..S-1: learning rate in LRS for SFT and for SPIN, and β in BETAS for SPIN (SFT has no β).
   Each run gets the demo's budget (SPIN: ITERATIONS iterations × STEPS optimizer steps × PAIRS real + PAIRS own
   images; SFT: the same steps × 2·PAIRS real images).
   The learning-rate grid is extended by the same rule for both methods: while a method's selected learning rate is
   the largest (smallest) it has tried, the next value ×5 (÷5) is added for it, for every seed (and every β).
2. Selection on the VALIDATION scenes only (12 scenes never trained on and never used for the report), by the mean
   over seeds of the all-correct rate of the model a user would keep (SFT's final model; SPIN's last iteration);
   ties (within 1 point) go to the lower Fréchet distance. The test scenes are not looked at in this phase.
3. Knobs, from SPIN's selected setting, on the TEST scenes, each for the same seeds: loss.sft_weight = β/4 (equal pull
   at the start of an iteration), a halving β schedule, a cheaper opponent sampler (guidance 1.0 instead of 3.0),
   and spin_exact. Their numbers are reported whichever way they fall; they do not change the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import time
from pathlib import Path

from spin_diffusion.config import replace
from spin_diffusion.demo import runner
from spin_diffusion.demo.evaluate import evaluate, win_rate_vs

LRS = (2e-5, 1e-4, 5e-4)
BETAS = (500.0, 2000.0, 8000.0)


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _score(model: Path, base_result: dict, spec, out_json: Path) -> dict:
    r = evaluate(model, spec, out_json)
    return r["metrics"] | {"win_rate_vs_base": win_rate_vs(r, base_result)}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _row(results: list[dict], key: str, percent: bool) -> str:
    m, s = _mean_sd([r[key] for r in results])
    return f"{100 * m:.1f} ± {100 * s:.1f}" if percent else f"{m:.3f} ± {s:.3f}"


def _train_summary(run_dir: Path, iterations: int) -> list[dict]:
    """Last log line of each iteration: reward_winner, reward_loser, accuracy, policy errors."""
    keys = ("reward_winner", "reward_loser", "accuracy", "policy_error_winner", "policy_error_loser", "sft_term")
    out = []
    for k in range(1, iterations + 1):
        last = _log(run_dir / f"iter_{k:02d}" / "train" / "train_log.jsonl")[-1]
        out.append({key: last[key] for key in keys if key in last})
    return out


def _grid_point(
    out: Path, method: str, lr: float, beta: float | None, s: int, hyper: runner.Hyper, rows: dict
) -> None:
    """Train and validate one (method, lr, β) setting for seed s; finished runs and scores are reused."""
    data_dir, base = runner.prepare(out), runner.shipped_base()
    spec = runner.validation_spec(s)
    base_result = evaluate(base, spec, out / "val" / f"base_seed{s}.json")
    if method == "sft":
        name, folder = f"sft lr={lr:g}", f"sft_{lr:g}"
        h = dataclasses.replace(hyper, sft_lr=lr)
    else:
        name, folder = f"spin lr={lr:g} beta={beta:g}", f"spin_{lr:g}_{beta:g}"
        h = dataclasses.replace(hyper, spin_lr=lr, spin_beta=beta)
    seed_dir = out / "grid" / folder / f"seed_{s}"
    sft, spin = runner.finetune_configs(seed_dir, base, data_dir, seed=s, hyper=h, scale=1.0)
    cfg = sft if method == "sft" else spin
    runner.run(cfg, resume=Path(cfg.run_dir).exists(), progress=False)
    model = Path(cfg.run_dir) / f"iter_{cfg.num_iterations:02d}" / "model"
    rows.setdefault(name, []).append(_score(model, base_result, spec, Path(cfg.run_dir) / "val.json"))
    print(name, s, {k: round(v, 3) for k, v in rows[name][-1].items()}, flush=True)


def _lr_of(name: str) -> float:
    return float(name.split("lr=")[1].split()[0])


def grid(out: Path, seeds: list[int], hyper: runner.Hyper) -> dict:
    rows: dict[str, list[dict]] = {}
    tried = {"sft": list(LRS), "spin": list(LRS)}
    for s in seeds:
        for lr in LRS:
            _grid_point(out, "sft", lr, None, s, hyper, rows)
        for lr, beta in itertools.product(LRS, BETAS):
            _grid_point(out, "spin", lr, beta, s, hyper, rows)
    for method in ("sft", "spin"):  # extend the lr grid while the pick sits at its edge (at most twice)
        for _ in range(2):
            # names print lr with %g: map back to the value tried (2e-5 / 5 is 4.000000000000001e-06, not 4e-06)
            lr = next(x for x in tried[method] if math.isclose(x, _lr_of(select(rows, method)), rel_tol=1e-6))
            if lr not in (max(tried[method]), min(tried[method])):
                break
            new = lr * 5 if lr == max(tried[method]) else lr / 5
            tried[method].append(new)
            for s in seeds:
                for beta in (None,) if method == "sft" else BETAS:
                    _grid_point(out, method, new, beta, s, hyper, rows)
    return rows


def select(rows: dict[str, list[dict]], method: str) -> str:
    cands = {k: v for k, v in rows.items() if k.startswith(method)}
    best = max(statistics.fmean(r["shapes_judge"] for r in v) for v in cands.values())
    close = {k: v for k, v in cands.items() if statistics.fmean(r["shapes_judge"] for r in v) >= best - 0.01}
    return min(close, key=lambda k: statistics.fmean(r["fd"] for r in close[k]))


def knobs(out: Path, seeds: list[int], hyper: runner.Hyper) -> tuple[dict, dict]:
    data_dir = runner.prepare(out)
    base = runner.shipped_base()
    beta = hyper.spin_beta
    variants = {
        "spin (selected)": {},
        f"+ sft_weight={beta / 4:g}": {"loss.sft_weight": beta / 4},
        f"β schedule [{beta:g}, {beta / 2:g}, {beta / 4:g}]": {"loss.beta": (beta, beta / 2, beta / 4)},
        "opponent guidance 1.0": {"sample": dataclasses.replace(runner.SAMPLE, guidance_scale=1.0)},
        "spin_exact": {"loss.objective": "spin_exact"},
    }
    rows: dict[str, list[dict]] = {}
    curves: dict[str, list[list[dict]]] = {}
    for s in seeds:
        spec = runner.heldout_spec(s)
        base_result = evaluate(base, spec, out / "test" / f"base_seed{s}.json")
        rows.setdefault("base", []).append(base_result["metrics"] | {"win_rate_vs_base": 0.5})
        sft, _ = runner.finetune_configs(out / "knobs" / "sft" / f"seed_{s}", base, data_dir, seed=s, hyper=hyper,
                                         scale=1.0)  # fmt: skip
        runner.run(sft, resume=Path(sft.run_dir).exists(), progress=False)
        rows.setdefault("sft", []).append(
            _score(Path(sft.run_dir) / "iter_01" / "model", base_result, spec, Path(sft.run_dir) / "test.json")
        )
        for i, (name, change) in enumerate(variants.items()):
            _, spin = runner.finetune_configs(out / "knobs" / f"v{i}" / f"seed_{s}", base, data_dir, seed=s,
                                              hyper=hyper, scale=1.0)  # fmt: skip
            spin = replace(spin, **change)
            t0 = time.perf_counter()
            runner.run(spin, resume=Path(spin.run_dir).exists(), progress=False)
            for k in range(1, hyper.iterations + 1):
                model = Path(spin.run_dir) / f"iter_{k:02d}" / "model"
                result = _score(model, base_result, spec, Path(spin.run_dir) / f"test_{k}.json")
                rows.setdefault(f"{name}, iter {k}", []).append(result | {"seconds": time.perf_counter() - t0})
            curves.setdefault(name, []).append(_train_summary(Path(spin.run_dir), hyper.iterations))
            print(name, s, rows[f"{name}, iter {hyper.iterations}"][-1], flush=True)
    return rows, curves


def table(rows: dict[str, list[dict]]) -> str:
    lines = [
        "| model | all correct (%) | Fréchet distance ↓ | win rate vs base (%) | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, results in rows.items():
        lines.append(
            f"| {name} | {_row(results, 'shapes_judge', True)} | {_row(results, 'fd', False)} | "
            f"{_row(results, 'win_rate_vs_base', True)} | {len(results)} |"
        )
    return "\n".join(lines)


def curve_table(curves: dict[str, list[list[dict]]]) -> str:
    lines = [
        "| variant | iteration | reward_winner | reward_loser | accuracy | policy error winner | policy error loser |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, per_seed in curves.items():
        for k in range(len(per_seed[0])):
            vals = {key: statistics.fmean(seed[k][key] for seed in per_seed) for key in per_seed[0][k]}
            lines.append(
                f"| {name} | {k + 1} | {vals['reward_winner']:.3g} | {vals['reward_loser']:.3g} | "
                f"{vals['accuracy']:.2f} | {vals['policy_error_winner']:.4f} | {vals['policy_error_loser']:.4f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/demo_study"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--phase", choices=["all", "grid", "knobs"], default="all")
    parser.add_argument("--sft-lr", type=float, help="knobs only: skip the grid and use these")
    parser.add_argument("--spin-lr", type=float)
    parser.add_argument("--spin-beta", type=float)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    hyper = runner.Hyper()
    started = time.perf_counter()
    report: dict = {"protocol": __doc__, "lrs": LRS, "betas": BETAS, "seeds": seeds}
    if args.phase in ("all", "grid"):
        rows = grid(args.out, seeds, hyper)
        sft_pick, spin_pick = select(rows, "sft"), select(rows, "spin")
        report |= {"grid": rows, "selected": [sft_pick, spin_pick]}
        print("\n## Grid (validation scenes)\n\n" + table(rows) + f"\n\nselected: {sft_pick}; {spin_pick}")
        sft_lr = float(sft_pick.split("lr=")[1])
        spin_lr, spin_beta = (float(x.split("=")[1]) for x in spin_pick.split()[1:])
        hyper = dataclasses.replace(hyper, sft_lr=sft_lr, spin_lr=spin_lr, spin_beta=spin_beta)
    if args.sft_lr is not None:
        hyper = dataclasses.replace(hyper, sft_lr=args.sft_lr, spin_lr=args.spin_lr, spin_beta=args.spin_beta)
    if args.phase in ("all", "knobs"):
        rows, curves = knobs(args.out, seeds, hyper)
        report |= {"knobs": rows, "curves": curves, "hyper": dataclasses.asdict(hyper)}
        print("\n## Knobs (test scenes)\n\n" + table(rows) + "\n\n" + curve_table(curves))
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"study_{args.phase}.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{report['seconds']} s; {args.out / f'study_{args.phase}.json'}")


if __name__ == "__main__":
    main()
