"""`spin-diffusion demo`: the whole method on a CPU in a few minutes, in the built-in shapes world.

Stages (each resumable, each in its own folder under `out`):

0. world/        the clean fine-tuning pairs (train scenes only, `world.split_of`) as an imagefolder
1. base          the shipped pretrained base (assets/demo_base, made by scripts/train_demo_base.py); with
                 `pretrain=True` instead: world/pretrain/ (noisy-caption corpus), stage0/ (the `demo` preset with
                 the shipped VAE and a random UNet) and base/ (BASE_STEPS of plain denoising on the corpus)
2. seed_<s>/     for every seed: sft/ (SFT baseline on the clean pairs), spin/ (SPIN-Diffusion, ITERATIONS
                 iterations from the base), eval/ (every model, the base included, judged on the held-out test
                 scenes with that seed's evaluation noise)
3. report.html   mean ± seed-to-seed spread of every metric (per-seed values too), plots with error bars,
                 training curves and image grids; results.json

SFT and SPIN get the same optimizer steps and the same number of images per step (SFT: 2B real images;
SPIN: B real + B self-generated). SPIN additionally pays for reference forwards and for generating its
opponent's images; the report shows each stage's wall-clock time, so the comparison is explicit.

Evaluation never uses a training caption: the fine-tuning pairs show only the 24 "train" scenes, the report
scores the 12 "test" scenes, and the 12 "validation" scenes are kept for choosing hyper-parameters
(`validation_spec`). A grid script can call `prepare`, `finetune_configs` with its own `Hyper`, and `run_plans`
with `SeedPlan`s that evaluate on `validation_spec`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from spin_diffusion import console, export, presets, world
from spin_diffusion.config import (
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    replace,
)
from spin_diffusion.demo.evaluate import EvalSpec, evaluate, win_rate_vs
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.report import Curve, ModelEntry, ReportData, train_curves, within_spread, write_report
from spin_diffusion.rundir import TRAIN_LOG, iter_dir
from spin_diffusion.self_play import run

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "assets" / "demo_base"  # scripts/train_demo_base.py

# Sizes and budgets of the default demo (scale multiplies every step count).
PRETRAIN_IMAGES = 2048  # --pretrain only: noisy-caption pretraining corpus
CAPTION_NOISE = 0.25  # fraction of pretraining captions that describe another scene
BASE_STEPS = 500  # --pretrain only
FINETUNE_PAIRS = 192  # clean (image, caption) pairs of the 24 train scenes, 8 each, for SFT and SPIN
SEEDS = 3
EVAL_PER_SCENE = 4  # evaluation: 4 images for each of the 12 held-out test scenes (48 prompts)
EVAL_SAMPLE = dict(num_steps=20, guidance_scale=3.0)  # the evaluation sampler
VALIDATION_PER_SCENE = 4  # the validation set (12 other held-out scenes), for a hyper-parameter grid
# SPIN's opponent samples: DDIM 10 steps, half the evaluation sampler's, one image per distinct caption (24, not 192
# rows): scripts/study_cheaper.py found every option within the seed spread of every_row + DDIM 50; the cheapest.
SAMPLE = SampleConfig(num_steps=10, guidance_scale=3.0, per_caption="one", batch_size=64, shard_size=128)
# Chosen by scripts/demo_study.py on the validation scenes (3 seeds; the same lr grid for both methods, extended
# while a pick sat at its edge; β for SPIN), then SPIN's remedies (its `--phase remedies`: the loser guard and the
# DPO-Positive hinge at the rates where plain SPIN collapsed): docs/DEMO_STUDY.md has the grids and the protocol.
SFT_LR = 5e-4
SPIN_LR = 1e-4  # plain SPIN's best was 4e-6: from 1e-4 up it collapsed without the guard
SPIN_BETA = 2000.0
SPIN_LOSER_GUARD: float | None = 0.9  # loss.loser_guard of SPIN: Diffusion-SDPO's winner guard, μ = 0.9
SPIN_DPOP_LAMBDA = 0.0  # loss.dpop_lambda of SPIN: the hinge did not add to the guard on validation
# loss.caption_contrast_weight of SPIN: the caption contrast beside real-vs-own (one-word negatives), the best
# self-play arm on validation in scripts/selfplay_study.py (issue 28; docs/DEMO_STUDY.md §4); 0.5 and 2 tied it
SPIN_CAPTION_CONTRAST = 1.0
ITERATIONS = 3
STEPS_PER_ITERATION = 40
PAIRS_PER_STEP = 16


@dataclass(frozen=True)
class Hyper:
    """The fine-tuning knobs a hyper-parameter grid varies (defaults: the module constants)."""

    sft_lr: float = SFT_LR
    spin_lr: float = SPIN_LR
    spin_beta: float = SPIN_BETA
    spin_loser_guard: float | None = SPIN_LOSER_GUARD
    spin_dpop_lambda: float = SPIN_DPOP_LAMBDA
    spin_caption_contrast: float = SPIN_CAPTION_CONTRAST
    iterations: int = ITERATIONS
    steps_per_iteration: int = STEPS_PER_ITERATION
    pairs_per_step: int = PAIRS_PER_STEP


def _steps(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def heldout_spec(seed: int) -> EvalSpec:
    """The report's evaluation: held-out test scenes, EVAL_PER_SCENE images each, noise from `seed`."""
    return EvalSpec.for_split("test", EVAL_PER_SCENE, seed=1000 + seed, **EVAL_SAMPLE)


def validation_spec(seed: int) -> EvalSpec:
    """For hyper-parameter choice: the validation scenes (disjoint from the test and the train scenes)."""
    return EvalSpec.for_split("validation", VALIDATION_PER_SCENE, seed=2000 + seed, **EVAL_SAMPLE)


# ---------------------------------------------------------------------------------------------------------------
# Stages


def prepare(out: Path, seed: int = 0) -> Path:
    """The clean fine-tuning pairs (train scenes only) as an imagefolder under out/world/finetune."""
    folder = out / "world" / "finetune"
    if not (folder / "metadata.jsonl").exists():
        world.write_imagefolder(folder, FINETUNE_PAIRS, seed=seed + 7, scenes=world.split_scenes("train"))
    return folder


def _write_pretrain_corpus(out: Path, seed: int) -> Path:
    """--pretrain: the noisy-caption corpus (all 48 scenes, CAPTION_NOISE of the captions wrong)."""
    folder = out / "world" / "pretrain"
    if (folder / "metadata.jsonl").exists():
        return folder
    tmp = folder.with_name("pretrain.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    pairs, _ = world.noisy_examples(PRETRAIN_IMAGES, seed=seed, noise=CAPTION_NOISE)
    lines = []
    for i, (image, caption) in enumerate(pairs):
        image.save(tmp / f"{i:05d}.png")
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption}))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder)
    return folder


def pretrain_base(out: Path, seed: int, scale: float, progress: bool) -> Path:
    """--pretrain: the demo preset's random UNet trained BASE_STEPS on the noisy corpus. Returns the model."""
    corpus = _write_pretrain_corpus(out, seed)
    stage0 = out / "stage0" / "model"
    if not stage0.exists():
        export.save_pipeline(presets.build_preset("demo", seed=seed), stage0)
    cfg = _config(
        out / "base",
        stage0,
        DataConfig(path=str(corpus)),
        "sft",
        seed=seed,
        iterations=1,
        steps=_steps(BASE_STEPS, scale),
        batch=32,
        lr=1e-3,
        beta=SPIN_BETA,
        warmup=20,
        caption_dropout=0.1,
    )
    run(cfg, resume=(out / "base").exists(), progress=progress)
    return iter_dir(out / "base", 1) / "model"


def shipped_base() -> Path:
    if not (SHIPPED_BASE / "model_index.json").exists():
        raise SpinDiffusionError(
            f"the shipped demo base is missing ({SHIPPED_BASE}); run scripts/train_demo_base.py, or pass --pretrain"
        )
    return SHIPPED_BASE


def _config(
    run_dir: Path,
    model: Path,
    data: DataConfig,
    objective: str,
    *,
    seed: int,
    iterations: int,
    steps: int,
    batch: int,
    lr: float,
    beta: float,
    warmup: int,
    caption_dropout: float = 0.0,
    loser_guard: float | None = None,
    dpop_lambda: float = 0.0,
    caption_contrast: float = 0.0,
) -> RunConfig:
    return RunConfig(
        run_dir=str(run_dir),
        seed=seed,
        num_iterations=iterations,
        model=ModelConfig(path=str(model)),
        data=data,
        sample=SAMPLE,
        loss=LossConfig(
            objective=objective,
            beta=beta,
            loser_guard=loser_guard,
            dpop_lambda=dpop_lambda,
            caption_contrast_weight=caption_contrast,
        ),
        train=TrainConfig(
            learning_rate=lr,
            batch_size=batch,
            max_steps=steps,
            warmup_steps=warmup,
            lr_scheduler="constant_with_warmup",
            weight_decay=0.0,
            checkpoint_every=50,
            log_every=5,
            caption_dropout=caption_dropout,
        ),
        eval=EvalConfig(enabled=False),  # the demo evaluates on held-out prompts itself (run_plans)
    )


def finetune_configs(
    seed_dir: Path, base: Path, data_dir: Path, *, seed: int, hyper: Hyper, scale: float
) -> tuple[RunConfig, RunConfig]:
    """SFT and SPIN runs of one seed: the same optimizer steps and images per step (SFT 2B real, SPIN B + B)."""
    steps = _steps(hyper.steps_per_iteration, scale)
    data = DataConfig(path=str(data_dir))
    common = dict(seed=seed, beta=hyper.spin_beta, warmup=min(5, steps))
    sft = _config(
        seed_dir / "sft",
        base,
        data,
        "sft",
        iterations=1,
        steps=steps * hyper.iterations,
        batch=2 * hyper.pairs_per_step,
        lr=hyper.sft_lr,
        **common,
    )
    spin = _config(
        seed_dir / "spin",
        base,
        data,
        "spin_approx",
        iterations=hyper.iterations,
        steps=steps,
        batch=hyper.pairs_per_step,
        lr=hyper.spin_lr,
        loser_guard=hyper.spin_loser_guard,
        dpop_lambda=hyper.spin_dpop_lambda,
        caption_contrast=hyper.spin_caption_contrast,
        **common,
    )
    return sft, spin


def sft_then_spin_configs(sft: RunConfig, spin: RunConfig, seed_dir: Path) -> tuple[RunConfig, RunConfig]:
    """The arm "SFT, then SPIN" (the protocol of SPIN for language models: self-play from the SFT model, on the same
    data) within the same budget: SFT for half of SFT's optimizer steps, then SPIN from that model for the other half
    (as many iterations as the SPIN arm, each with half its steps), at the SPIN arm's settings. Its rival is the SFT
    arm itself, i.e. the same SFT continued for the other half without a break (constant rate after warm-up, and the
    pair stream and noise are keyed by position, so SFT's first half is exactly this arm's SFT)."""
    half = max(1, sft.train.max_steps // 2)
    first = replace(sft, run_dir=str(seed_dir / "sft_then_spin" / "sft"), **{"train.max_steps": half})
    then = replace(
        spin,
        run_dir=str(seed_dir / "sft_then_spin" / "spin"),
        **{
            "model.path": str(iter_dir(Path(first.run_dir), 1) / "model"),
            "train.max_steps": max(1, half // spin.num_iterations),
        },
    )
    return first, then


# ---------------------------------------------------------------------------------------------------------------
# Arms and evaluations as jobs on several processes
#
# The demo's models are tiny, so torch's threads scale poorly on them: two threads run one SFT arm 1.56x faster
# than one, but two single-threaded processes side by side finish 1.28x the work of one two-threaded process
# (benchmarks/bench_demo_workers.py; docs/DEMO.md). Every arm of every
# seed is a job, and so is every model's evaluation once its arm is done; each job resumes by itself (a finished
# run or evaluation is skipped), so a killed demo continues whatever the order the jobs ran in.


@dataclass(frozen=True)
class SeedPlan:
    """What one seed runs: SFT, SPIN and, with `then`, "SFT, then SPIN"; then the evaluation of every model on
    `spec`."""

    seed: int
    folder: Path
    sft: RunConfig
    spin: RunConfig
    spec: EvalSpec
    then: bool = False

    def arms(self) -> dict[str, tuple[RunConfig, ...]]:
        """{arm: its runs, in order}."""
        arms = {"sft": (self.sft,), "spin": (self.spin,)}
        if self.then:
            arms["sft_then_spin"] = sft_then_spin_configs(self.sft, self.spin, self.folder)
        return arms

    def models(self, arm: str) -> dict[str, Path]:
        """{model name: diffusers folder} that arm `arm` exports."""
        if arm == "sft":
            return {"sft": iter_dir(Path(self.sft.run_dir), 1) / "model"}
        if arm == "spin":
            k = self.spin.num_iterations
            return {f"spin iter {i}": iter_dir(Path(self.spin.run_dir), i) / "model" for i in range(1, k + 1)}
        last = self.arms()["sft_then_spin"][-1]
        return {SFT_THEN_SPIN: iter_dir(Path(last.run_dir), last.num_iterations) / "model"}


def _finetune_job(configs: tuple[RunConfig, ...]) -> float:
    t0 = time.perf_counter()
    for cfg in configs:
        run(cfg, resume=Path(cfg.run_dir).exists(), progress=False)
    return time.perf_counter() - t0


def _evaluate_job(model: Path, spec: EvalSpec, folder: Path, name: str) -> dict:
    slug = name.replace(" ", "_")
    return evaluate(model, spec, folder / f"{slug}.json", grid=folder / f"{slug}.png")


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


def run_plans(
    plans: list[SeedPlan], base: Path, *, workers: int | None = None, progress: bool = True
) -> tuple[dict[int, dict[str, dict]], dict[int, dict[str, float]]]:
    """Fine-tune and evaluate every seed of `plans` on `workers` processes (default: one per core, at most 4),
    each with cores / workers torch threads. -> ({seed: {model name: metrics + win_rate_vs_base}},
    {seed: {arm or "eval": seconds}}). With workers=1 the jobs run in this process, one after another."""
    import concurrent.futures as cf

    from tqdm.auto import tqdm

    workers = workers or default_workers()
    threads = max(1, (os.cpu_count() or 1) // workers)
    timings: dict[int, dict[str, float]] = {p.seed: {} for p in plans}
    results: dict[int, dict[str, dict]] = {p.seed: {} for p in plans}
    by_seed = {p.seed: p for p in plans}
    # the longest arms first, so that the last job to start is a short one
    arm_order = ("spin", "sft_then_spin", "sft")
    total = sum(len(p.arms()) + 1 + sum(len(p.models(a)) for a in p.arms()) for p in plans)
    bar = tqdm(total=total, desc="demo jobs", unit="job", disable=not progress)

    if workers == 1:
        pool: cf.Executor = _InlineExecutor()
    else:
        pool = cf.ProcessPoolExecutor(  # forked from a fork server, never from this process (it holds torch threads)
            workers,
            mp_context=console.worker_context(),
            initializer=console.start_worker,
            initargs=(threads, console.is_quiet()),
        )
    with pool:
        running: dict[cf.Future, tuple[str, int, str, float]] = {}

        def submit(kind: str, seed: int, name: str, fn, *args) -> None:
            running[pool.submit(fn, *args)] = (kind, seed, name, time.perf_counter())

        for arm in arm_order:
            for p in plans:
                if arm in p.arms():
                    submit("arm", p.seed, arm, _finetune_job, p.arms()[arm])
        for p in plans:
            submit("eval", p.seed, "base", _evaluate_job, base, p.spec, p.folder / "eval", "base")
        while running:
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                kind, seed, name, _started = running.pop(future)
                if future.exception() is not None:  # a job's error stops the demo, with its own message
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise future.exception()
                value = future.result()
                bar.update(1)
                bar.set_postfix_str(f"seed {seed} {name}")
                if kind == "arm":
                    timings[seed][name] = round(value, 1)
                    plan = by_seed[seed]
                    for model_name, model in plan.models(name).items():
                        submit(
                            "eval", seed, model_name, _evaluate_job, model, plan.spec, plan.folder / "eval", model_name
                        )
                else:
                    results[seed][name] = value
                    timings[seed]["eval"] = round(timings[seed].get("eval", 0.0) + value.get("seconds", 0.0), 1)
    bar.close()
    metrics = {
        seed: {name: r["metrics"] | {"win_rate_vs_base": win_rate_vs(r, rs["base"])} for name, r in rs.items()}
        for seed, rs in results.items()
    }
    return metrics, timings


class _InlineExecutor:
    """concurrent.futures' interface, running each job at submit time in this process (workers=1)."""

    def submit(self, fn, *args):
        import concurrent.futures as cf

        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(err)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------------
# The whole demo

MARKER = "demo.json"
SFT_THEN_SPIN = "sft then spin"


def _claim(out: Path, settings: dict) -> bool:
    """Make `out` a demo folder, or check that it is one made with the same settings. True if it existed."""
    marker = out / MARKER
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved != settings:
            raise SpinDiffusionError(f"{out} holds a demo made with {saved}, not {settings}; choose another --out")
        return True
    if out.exists() and any(out.iterdir()):
        raise SpinDiffusionError(f"{out} is not empty and holds no demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings))
    return False


def run_demo(
    out: str | Path = "demo_run",
    *,
    seed: int = 0,
    seeds: int = SEEDS,
    scale: float = 1.0,
    pretrain: bool = False,
    hyper: Hyper | None = None,
    progress: bool = True,
    workers: int | None = None,
    sft_then_spin: bool = False,
) -> Path:
    """Run every demo stage for seeds seed, seed + 1, ... and write out/report.html. Rerunning continues a
    killed demo: finished stages (and finished phases inside them) are skipped, so a complete demo only
    rebuilds its report. The arms and evaluations run as jobs on `workers` processes (`run_plans`).
    `sft_then_spin` adds the third arm, "SFT, then SPIN" against SFT continued (`sft_then_spin_configs`)."""
    out = Path(out)
    hyper = hyper or Hyper()
    if seeds < 1:
        raise SpinDiffusionError(f"--seeds must be >= 1, got {seeds}")
    settings = {"seed": seed, "seeds": seeds, "scale": scale, "pretrain": pretrain, "hyper": dataclasses.asdict(hyper)}
    if sft_then_spin:  # (a demo made without the arm keeps its demo.json as it was)
        settings["sft_then_spin"] = True
    if _claim(out, settings):
        print(f"continuing the demo in {out} (finished stages are skipped)")
    started = time.perf_counter()
    timings: dict[str, dict[str, float] | float] = {}

    t0 = time.perf_counter()
    data_dir = prepare(out, seed)
    timings["world"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    base = pretrain_base(out, seed, scale, progress) if pretrain else shipped_base()
    timings["base"] = round(time.perf_counter() - t0, 1)

    plans = []
    for s in range(seed, seed + seeds):
        sft_cfg, spin_cfg = finetune_configs(out / f"seed_{s}", base, data_dir, seed=s, hyper=hyper, scale=scale)
        plans.append(SeedPlan(s, out / f"seed_{s}", sft_cfg, spin_cfg, heldout_spec(s), then=sft_then_spin))
    per_seed, seed_timings = run_plans(plans, base, workers=workers, progress=progress)
    for s in sorted(seed_timings):
        timings[f"seed_{s}"] = seed_timings[s]
        print(f"seed {s}: {json.dumps(seed_timings[s])}")
    timings["total"] = round(time.perf_counter() - started, 1)

    data = _report_data(out, per_seed, timings, base, pretrain, plans[0].sft, plans[0].spin, sft_then_spin)
    results = data.to_dict() | {"timings": timings, "per_seed": {str(s): r for s, r in per_seed.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return write_report(data, out)


def _fmt_ms(entry: ModelEntry, key: str, percent: bool) -> str:
    mean, spread = entry.metrics.get(key, float("nan")), entry.spread.get(key, 0.0)
    if percent:
        return f"{100 * mean:.1f} ± {100 * spread:.1f} %"
    return f"{mean:.2f} ± {spread:.2f}"


def _report_data(
    out: Path,
    per_seed: dict[int, dict[str, dict]],
    timings: dict,
    base: Path,
    pretrain: bool,
    sft_cfg: RunConfig,
    spin_cfg: RunConfig,
    then: bool,
) -> ReportData:
    seeds = sorted(per_seed)
    first = seeds[0]
    iterations = spin_cfg.num_iterations
    spin_steps = spin_cfg.train.max_steps
    # (name, group, x = optimizer steps since the base): SFT ran all its steps in one go, as many as SPIN's
    # iterations together, so its point shares x with SPIN's last iteration.
    layout = [("base", "base", 0), ("sft", "sft", sft_cfg.train.max_steps)]
    layout += [(f"spin iter {k}", "spin", k * spin_steps) for k in range(1, iterations + 1)]
    layout += [(SFT_THEN_SPIN, "sft then spin", sft_cfg.train.max_steps)] if then else []
    models_: list[ModelEntry] = []
    for name, group, step in layout:
        grid = out / f"seed_{first}" / "eval" / f"{name.replace(' ', '_')}.png"
        entry = ModelEntry.over_seeds(
            name,
            [per_seed[s][name] for s in seeds],
            group=group,
            step=step,
            grid=os.path.relpath(grid, out) if grid.exists() else None,
            captions=list(heldout_spec(first).prompts[:32]),
        )
        models_.append(entry)
    by_name = {m.name: m for m in models_}

    curves: list[Curve] = []
    first_dir = out / f"seed_{first}"
    for k in range(1, iterations + 1):
        curves += train_curves(iter_dir(first_dir / "spin", k) / TRAIN_LOG, prefix=f"spin iter {k} ")
    curves += train_curves(iter_dir(first_dir / "sft", 1) / TRAIN_LOG, prefix="sft ")
    for k in range(1, iterations + 1) if then else ():
        curves += train_curves(
            iter_dir(first_dir / "sft_then_spin" / "spin", k) / TRAIN_LOG, prefix=f"sft then spin iter {k} "
        )

    judged, last = "shapes_judge", f"spin iter {iterations}"
    n_prompts = len(heldout_spec(first).prompts)
    lines = [
        f"Prompt fidelity on {n_prompts} prompts of 12 held-out test scenes (exact judge: color, shape and "
        f"position all right), mean ± standard deviation over {len(seeds)} seed(s): "
        + ", ".join(f"{m.name} {_fmt_ms(m, judged, True)}" for m in models_)
        + ". Fréchet distance to real renders of the same scenes (lower is better): "
        + ", ".join(f"{m.name} {_fmt_ms(m, 'fd', False)}" for m in models_)
        + "."
    ]
    for rival in (last, SFT_THEN_SPIN) if then else (last,):
        verdicts = []
        for key, label in ((judged, "all correct"), ("fd", "Fréchet distance"), ("win_rate_vs_base", "win rate")):
            a, b = by_name["sft"], by_name[rival]
            close = within_spread(a.metrics[key], b.metrics[key], a.spread.get(key, 0.0), b.spread.get(key, 0.0))
            verdicts.append(
                f"{label}: SFT vs {rival} differ by {abs(a.metrics[key] - b.metrics[key]):.3g}"
                + (" — no more than the seed-to-seed spread, so not resolved by these seeds" if close else "")
            )
        lines.append("; ".join(verdicts) + ".")
    lines.append(
        f"SFT and SPIN ran the same number of optimizer steps ({sft_cfg.train.max_steps}) on the same "
        f"{FINETUNE_PAIRS} clean pairs of the 24 train scenes, with {sft_cfg.train.batch_size} images per step "
        f"each; SPIN also generated its opponent's images every iteration and ran reference forwards (wall-clock "
        "per seed in the section below). "
        + (
            f'"SFT then SPIN" is SFT for half of those steps, then {iterations} SPIN iterations from that model for '
            "the other half; the SFT arm is its rival, the same SFT continued. "
            if then
            else ""
        )
        + "Evaluation prompts are scenes no fine-tuning pair shows."
    )
    if len(seeds) == 1:
        lines.append("One seed only: no spread is shown, and no difference can be told from seed noise.")
    lines.append(
        "A tiny model in a toy world: this shows that the pipeline works end to end and how to read it, not a "
        "claim about Stable Diffusion."
    )
    labels = {
        "shapes_judge": "judge: all correct",
        "shapes_color": "judge: color",
        "shapes_shape": "judge: shape",
        "shapes_position": "judge: position",
        "fd": "Fréchet distance",
        "win_rate_vs_base": "win rate vs base",
    }
    info_path = base.parent / "training.json" if pretrain else base / "training.json"
    base_info = json.loads(info_path.read_text()) if info_path.exists() else {}
    base_info.pop("history", None)
    vae_info_path = presets.DEMO_VAE_DIR / "training.json"
    sections = [
        ("Stage wall-clock (s)", json.dumps(timings, indent=1)),
        (
            "Base model",
            (
                f"pretrained in this demo: {BASE_STEPS} steps on {PRETRAIN_IMAGES} noisy-caption images"
                if pretrain
                else f"shipped: {base} (scripts/train_demo_base.py)\n" + json.dumps(base_info, indent=1)
            ),
        ),
        (
            "Shipped VAE (scripts/train_demo_vae.py)",
            vae_info_path.read_text() if vae_info_path.exists() else "(not found)",
        ),
        (
            "Set-up",
            f"seeds: {seeds} (each: its own fine-tuning data order, noise and evaluation noise; the base is "
            f"shared); fine-tuning: {FINETUNE_PAIRS} clean pairs of the 24 train scenes; evaluation: "
            f"{EVAL_PER_SCENE} images for each of the 12 test scenes, DDIM {EVAL_SAMPLE['num_steps']} steps, CFG "
            f"{EVAL_SAMPLE['guidance_scale']}; validation scenes (12, not used here): "
            f"{', '.join(s.caption for s in world.split_scenes('validation'))}; test scenes: "
            f"{', '.join(s.caption for s in world.split_scenes('test'))}; SPIN opponent sampler: DDIM "
            f"{SAMPLE.num_steps} steps, CFG {SAMPLE.guidance_scale}, sample.per_caption={SAMPLE.per_caption}; "
            f"SPIN β = {spin_cfg.loss.beta}, lr = "
            f"{spin_cfg.train.learning_rate}; SFT lr = {sft_cfg.train.learning_rate}",
        ),
    ]
    return ReportData(
        title="spin-diffusion demo: SFT vs SPIN-Diffusion in the shapes world",
        summary="\n\n".join(lines),
        models=models_,
        curves=curves,
        metric_labels=labels,
        lower_is_better={"fd"},
        sections=sections,
        baseline="base",
        x_label="optimizer steps since the base model (SFT: as many as SPIN in all)",
        spread_label=f"sample standard deviation over {len(seeds)} seeds",
    )
