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

The remedies (`--phase remedies`, issue 15; written before its numbers were seen). β stays at the grid's pick (2000:
β changed nothing beyond the spread at any stable rate). A run costs about 4× what the grid's did on this machine
(SPIN ~2.5 min, SFT ~1.2 min, evaluation included), so the full product (lr × guard × hinge × batch × 3 seeds) would
take ~6 h: this is a fractional design, and it says which cells it skips. The grid's SFT rows and plain-SPIN rows are
not run again: this code reproduces them (the code path without the remedies is unchanged; SFT lr 5e-4 seed 0 here:
89.6 %, as in the grid's table).

A. Validation scenes, the demo's budget (16 pairs per step). Screen on seed 0: SPIN at the rates where plain SPIN
   collapsed (1e-4, 5e-4) × {guard μ 0.9 (Fu et al.'s value with Diffusion-DPO), hinge λ_P 50 (Pal et al.'s value),
   both}, plus guard μ 0.5 with the hinge at 1e-4 and both remedies at 2e-5 (SCREEN). The two best screened cells
   (selection rule 2 on seed 0) get seeds 1 and 2; the recipe is the best of them by the 3-seed mean. SFT lr 5e-4 (the
   grid's pick) runs for seeds 0-2 because stage C starts from its models.
B. Validation scenes, the paper's batch regime by accumulation, seed 0, one iteration (a 128-pair iteration costs 8×
   a 16-pair one; three would take ~30 min here): 128 pairs per step (8 micro-steps of 16), the same 40 optimizer
   steps, learning rate by Diffusion-DPO's linear rule (train.scale_lr: the recipe's rate per pair × 128), against the
   recipe's own first iteration at 16 pairs. SFT's 256-image arm is skipped for time.
C. Test scenes, seeds 0-2, everything reported: SFT (pick); the SPIN recipe; SPIN on top of SFT (start from the seed's
   SFT model, the recipe, 3 iterations) against SFT continued from the same model for the same 120 steps; spin_exact
   at the grid's plain pick (lr 4e-6, β 2000: the knobs arm that gave 61 % at η = 0) with its opponent at DDIM η = 1
   (the new default). Base and plain SPIN (lr 4e-6, β 2000) on the test scenes are the demo's published rows.
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
PLAIN_SPIN_LR = 4e-6  # plain SPIN's pick in the grid (section 1); the demo's SPIN_LR is the remedies' recipe since
BIG_BATCH = 128  # pairs per optimizer step in stage B (8 accumulated micro-steps of 16)


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


# ---------------------------------------------------------------------------------------------------------------
# The remedies (issue 15)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting of the remedies study; `name` is its row in the tables."""

    method: str  # sft | spin
    lr: float  # per-step learning rate (stage B: the rate as used, i.e. after scale_lr)
    guard: float | None = None
    hinge: float = 0.0
    pairs: int = runner.PAIRS_PER_STEP  # pairs per optimizer step (SFT: images / 2)

    @property
    def name(self) -> str:
        if self.method == "sft":
            text = f"sft lr={self.lr:g}"
        else:
            guard = "off" if self.guard is None else f"{self.guard:g}"
            text = f"spin lr={self.lr:g} guard={guard} hinge={self.hinge:g}"
        return text + (f" pairs={self.pairs}" if self.pairs != runner.PAIRS_PER_STEP else "")

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_").replace("=", "")


def _cell_configs(out: Path, cell: Cell, s: int, base: Path, hyper: runner.Hyper):
    h = dataclasses.replace(hyper, spin_beta=2000.0, spin_loser_guard=cell.guard, spin_dpop_lambda=cell.hinge,
                            spin_caption_contrast=0.0)  # fmt: skip  # before issue 28's contrast
    sft, spin = runner.finetune_configs(out / "remedies" / cell.folder / f"seed_{s}", base, runner.prepare(out),
                                        seed=s, hyper=h, scale=1.0)  # fmt: skip
    cfg = sft if cell.method == "sft" else spin
    cfg = replace(cfg, **{"train.learning_rate": cell.lr})
    if (
        cell.pairs != runner.PAIRS_PER_STEP
    ):  # the batch regime: accumulate, rate per pair × pairs (scale_lr); 1 iteration
        cfg = replace(cfg, num_iterations=1)
        total = cell.pairs * (2 if cell.method == "sft" else 1)
        cfg = replace(
            cfg, **{"train.total_batch_size": total, "train.scale_lr": True, "train.learning_rate": cell.lr / total}
        )
    return cfg


def _run_cell(out: Path, cell: Cell, s: int, spec, split: str) -> dict:
    """Train (or reuse) one cell for seed s and score its last model on `spec` (cached per split)."""
    base = runner.shipped_base()
    base_result = evaluate(base, spec, out / split / f"base_seed{s}.json")
    cfg = _cell_configs(out, cell, s, base, runner.Hyper())
    t0 = time.perf_counter()
    runner.run(cfg, resume=Path(cfg.run_dir).exists(), progress=False)
    model = Path(cfg.run_dir) / f"iter_{cfg.num_iterations:02d}" / "model"
    result = _score(model, base_result, spec, Path(cfg.run_dir) / f"{split}.json")
    return result | {"seconds": round(time.perf_counter() - t0, 1)}


def _units_done(out: Path, units: list[tuple[Cell, int]], split: str) -> bool:
    return all((_cell_dir(out, c, s) / f"{split}.json").exists() for c, s in units)


def _cell_dir(out: Path, cell: Cell, s: int) -> Path:
    """The run dir of one cell and seed (runner.finetune_configs puts the run in seed_<s>/sft or seed_<s>/spin)."""
    return out / "remedies" / cell.folder / f"seed_{s}" / cell.method


def _claim(out: Path, key: str) -> bool:
    """True for exactly one worker per key (an atomic mkdir); the parent clears the claims before it starts them."""
    try:
        (out / "claims" / key).mkdir(parents=True)
        return True
    except FileExistsError:
        return False


def _work(out: Path, units: list[tuple[Cell, int]], split: str, worker: int) -> None:
    """Run every unit no other worker has claimed (longest-first order is the caller's), without waiting."""
    spec_of = runner.validation_spec if split == "val" else runner.heldout_spec
    for cell, s in units:
        if _claim(out, f"{split}_{cell.folder}_seed{s}"):
            r = _run_cell(out, cell, s, spec_of(s), split)
            print(f"[{worker}] {cell.name} seed {s}: all correct {r['shapes_judge']:.3f} fd {r['fd']:.3f} "
                  f"({r['seconds']} s)", flush=True)  # fmt: skip


def _collect(out: Path, units: list[tuple[Cell, int]], split: str) -> dict:
    """Wait until every unit is scored (by any worker) and return {row name: [metrics per seed]}."""
    while not _units_done(out, units, split):
        time.sleep(5)
    rows: dict[str, list[dict]] = {}
    for cell, s in units:
        r = json.loads((_cell_dir(out, cell, s) / f"{split}.json").read_text())
        base = json.loads((out / split / f"base_seed{s}.json").read_text())
        rows.setdefault(cell.name, []).append(r["metrics"] | {"win_rate_vs_base": win_rate_vs(r, base)})
    return rows


def _run_units(out: Path, units: list[tuple[Cell, int]], split: str, worker: int) -> dict:
    _work(out, units, split, worker)
    return _collect(out, units, split)


def _best(rows: dict[str, list[dict]], cells: list[Cell]) -> Cell:
    """Selection rule 2 over `cells`: best mean all-correct, ties within 1 point to the lower Fréchet distance."""
    score = {c: statistics.fmean(r["shapes_judge"] for r in rows[c.name]) for c in cells}
    top = max(score.values())
    close = [c for c in cells if score[c] >= top - 0.01]
    return min(close, key=lambda c: statistics.fmean(r["fd"] for r in rows[c.name]))


def _screen() -> list[Cell]:
    cells = [Cell("spin", lr, g, h) for lr in (1e-4, 5e-4) for g, h in ((0.9, 0.0), (None, 50.0), (0.9, 50.0))]
    return cells + [Cell("spin", 1e-4, 0.5, 50.0), Cell("spin", 2e-5, 0.9, 50.0)]


def remedies(out: Path, seeds: list[int], worker: int) -> dict:
    """Stages A, B and C of the remedies protocol (module docstring)."""
    # A. the demo budget, validation scenes: screen on the first seed, confirm the best two on the others
    sft_pick = Cell("sft", runner.SFT_LR)
    screen = _screen()
    first, rest = seeds[:1], seeds[1:]
    rows = _run_units(out, [(c, s) for s in first for c in screen] + [(sft_pick, s) for s in seeds], "val", worker)
    by_score = sorted(screen, key=lambda c: (-rows[c.name][0]["shapes_judge"], rows[c.name][0]["fd"]))
    confirmed = by_score[:2]
    for name, more in _run_units(out, [(c, s) for s in rest for c in confirmed], "val", worker).items():
        rows[name] = rows[name] + more  # the first seed's score and the others'
    recipe = _best(rows, confirmed)

    # B (validation, first seed) and C (test scenes) share the workers; B's one long unit is claimed first.
    big = dataclasses.replace(recipe, lr=recipe.lr * BIG_BATCH / recipe.pairs, pairs=BIG_BATCH)
    _work(out, [(big, s) for s in first], "val", worker)
    test_units = [(c, s) for s in seeds for c in (sft_pick, recipe)]
    _work(out, test_units, "test", worker)
    test_rows = protocols(out, seeds, sft_pick, recipe, worker)
    test_rows = _collect(out, test_units, "test") | test_rows
    rows |= _collect(out, [(big, s) for s in first], "val")
    # the recipe's first iteration at 16 pairs, the rival of the one 128-pair iteration (same scenes, same seed)
    iter1 = {}
    for s in first:
        base = json.loads((out / "val" / f"base_seed{s}.json").read_text())
        model = _cell_dir(out, recipe, s) / "iter_01" / "model"
        iter1.setdefault(f"{recipe.name}, iteration 1", []).append(
            _score(model, base, runner.validation_spec(s), _cell_dir(out, recipe, s) / "val_iter1.json")
        )
    rows |= iter1
    return {
        "validation": rows,
        "picks": {"sft": sft_pick.name, "screened best two": [c.name for c in confirmed], "recipe": recipe.name},
        "test": test_rows,
    }


def _protocol_dir(out: Path, name: str, s: int) -> Path:
    """The run dir of one stage-C protocol run (e.g. "sft -> spin", seed 2 -> protocols/sft_-_spin/seed_2)."""
    return out / "protocols" / name.replace(" ", "_").replace(">", "").replace("=", "") / f"seed_{s}"


def protocols(out: Path, seeds: list[int], sft_cell: Cell, spin_cell: Cell, worker: int) -> dict:
    """Stage C's runs that start from another model or change the sampler: SFT → SPIN vs SFT continued (both from
    the seed's SFT model, 120 more optimizer steps each), and spin_exact at the grid's plain pick with η = 1."""
    base = runner.shipped_base()
    variants = ["sft -> spin", "sft -> sft continued", "spin_exact eta=1"]
    units = [(v, s) for s in seeds for v in variants]
    hyper = runner.Hyper()
    rows: dict[str, list[dict]] = {}

    def run_variant(name: str, s: int) -> Path:
        sft_model = _cell_dir(out, sft_cell, s) / "iter_01" / "model"
        folder = _protocol_dir(out, name, s)
        if name.startswith("sft ->"):
            while not (sft_model / "model_index.json").exists():  # the other worker may still train it
                time.sleep(5)
        cell = {"sft -> spin": spin_cell, "sft -> sft continued": sft_cell}.get(name, Cell("spin", PLAIN_SPIN_LR))
        cfg = _cell_configs(out, cell, s, base, hyper)
        cfg = replace(cfg, run_dir=str(folder))
        if name.startswith("sft ->"):
            cfg = replace(cfg, **{"model.path": str(sft_model)})
        if name.startswith("spin_exact"):  # plain SPIN's pick, stated here rather than inherited (issue 28)
            cfg = replace(cfg, **{"loss.objective": "spin_exact", "sample.eta": 1.0 if name.endswith("1") else 0.0,
                                  "train.learning_rate": PLAIN_SPIN_LR, "loss.beta": 2000.0, "loss.loser_guard": None,
                                  "loss.dpop_lambda": 0.0})  # fmt: skip
        runner.run(cfg, resume=folder.exists(), progress=False)
        return folder / f"iter_{cfg.num_iterations:02d}" / "model"

    for name, s in units:
        if _claim(out, f"protocol_{name.replace(' ', '_').replace('>', '')}_seed{s}"):
            spec = runner.heldout_spec(s)
            model = run_variant(name, s)
            base_result = evaluate(base, spec, out / "test" / f"base_seed{s}.json")
            _score(model, base_result, spec, model.parent.parent / "test.json")
            print(f"[{worker}] {name} seed {s} done", flush=True)
    for name, s in units:
        folder = _protocol_dir(out, name, s)
        while not (folder / "test.json").exists():
            time.sleep(5)
        r = json.loads((folder / "test.json").read_text())
        base = json.loads((out / "test" / f"base_seed{s}.json").read_text())
        rows.setdefault(name, []).append(r["metrics"] | {"win_rate_vs_base": win_rate_vs(r, base)})
    return rows


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
    parser.add_argument("--phase", choices=["all", "grid", "knobs", "remedies"], default="all")
    parser.add_argument(
        "--workers", type=int, default=1, help="remedies: processes sharing the units (the cores split)"
    )
    parser.add_argument("--worker", type=int, default=-1, help="(internal) this process's index")
    parser.add_argument("--sft-lr", type=float, help="knobs only: skip the grid and use these")
    parser.add_argument("--spin-lr", type=float)
    parser.add_argument("--spin-beta", type=float)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    hyper = runner.Hyper(spin_caption_contrast=0.0)  # this study predates issue 28's contrast
    started = time.perf_counter()
    if args.phase == "remedies":
        _remedies_main(args, seeds, started)
        return
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


def _remedies_main(args, seeds: list[int], started: float) -> None:
    """--phase remedies: start `--workers` copies of this script sharing the cores (worker 0 writes the report)."""
    import os
    import subprocess
    import sys

    if args.worker < 0:
        # shared inputs first (the fine-tuning pairs, the base's scores), so that the workers only read them
        import shutil

        shutil.rmtree(args.out / "claims", ignore_errors=True)  # units left half-done by a killed study run again
        runner.prepare(args.out)
        for s in seeds:
            for split, spec in (("val", runner.validation_spec(s)), ("test", runner.heldout_spec(s))):
                evaluate(runner.shipped_base(), spec, args.out / split / f"base_seed{s}.json")
        threads = str(max(1, (os.cpu_count() or 1) // args.workers))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        argv = [sys.executable, __file__, "--out", str(args.out), "--seeds", str(args.seeds), "--phase", "remedies"]
        argv += ["--workers", str(args.workers)]
        procs = [subprocess.Popen([*argv, "--worker", str(w)], env=env) for w in range(args.workers)]
        while any(p.poll() is None for p in procs):  # one worker's failure stops the others (they would wait)
            if any(p.poll() not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                break
            time.sleep(2)
        if any(p.wait() != 0 for p in procs):  # also a worker that failed before the first look
            raise SystemExit(f"a worker failed: exit codes {[p.poll() for p in procs]}")
        return
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    result = remedies(args.out, seeds, args.worker)
    if args.worker != 0:
        return
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["protocol"] = __doc__
    (args.out / "study_remedies.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n## Remedies, validation scenes\n\n" + table(result["validation"]))
    print("\npicks: " + json.dumps(result["picks"]))
    print("\n## Test scenes\n\n" + table(result["test"]))
    print(f"\n{result['seconds']} s; {args.out / 'study_remedies.json'}")


if __name__ == "__main__":
    main()
