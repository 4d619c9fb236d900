"""The Python API: every `spin-diffusion` command as a function that returns a result (the CLI calls these).

    import spin_diffusion as sd

    cfg = sd.load_config("configs/tiny.yaml", ["train.max_steps=2"], run_dir="runs/mine")
    result = sd.spin(cfg)                      # or sd.sft / sd.dpo; resume=True continues a killed run
    result.exports[result.iterations]          # the last iteration's diffusers pipeline folder
    result.metrics                             # {iteration: {metric: value}}
    sd.evaluate([result.exports[1], result.exports[2]], "prompts.txt", scorers=["pickscore"], out_dir="eval")

Errors a user can fix raise `SpinDiffusionError` with a one-line message, before any work. The functions run on
every process of a distributed launch (``accelerate launch``, ``torchrun``), as the CLI does; the result's metrics
and tables are the main process's.

Heavy libraries (torch, diffusers) are imported when a function runs, not when this module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_diffusion.config import RunConfig, config_from_dict, parse_override, read_yaml, replace, to_dict
from spin_diffusion.distributed import launched_rank
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.rundir import EVAL_FILE, iter_dir, read_eval

if TYPE_CHECKING:
    from spin_diffusion.prepare import PrepareSummary

__all__ = [
    "DemoResult",
    "EvalResult",
    "RunResult",
    "demo_configs",
    "demo_prompts",
    "dpo",
    "evaluate",
    "load_config",
    "prepare_pickapic",
    "run_demo",
    "sft",
    "spin",
]

ConfigLike = RunConfig | str | os.PathLike | None
Overrides = Sequence[str] | Mapping[str, Any]

# What a run without a config starts from: every key's default (fp32, no warm-up, accumulation 1, the tiny preset)
NO_CONFIG = "no --config: every key's default (`spin-diffusion config --explain`); recipes: configs/*.yaml"


# ---------------------------------------------------------------------------------------------------------------
# Configs


def load_config(
    config: ConfigLike = None, overrides: Overrides = (), *, run_dir: str | os.PathLike | None = None
) -> RunConfig:
    """A validated run config: every key's default, then ``config``, then ``overrides``, then ``run_dir``.

    The same rules as the CLI's ``--config`` and ``--set``: an unknown key or a bad value raises
    `SpinDiffusionError` naming it. ``spin-diffusion config --explain`` lists every key with its meaning.

    Args:
        config: a YAML file (see ``configs/``), a `RunConfig` to start from, or None (the defaults).
        overrides: ``["train.learning_rate=1e-5", ...]`` (each value read as YAML, exactly as ``--set`` reads it),
            or a mapping ``{"train.learning_rate": 1e-5}`` of dotted keys to Python values.
        run_dir: the run directory (the CLI's ``--run-dir``); None keeps the config's ``run_dir``.

    Returns:
        The frozen `RunConfig` (``dataclasses.replace`` or another `load_config` call derives variants).
    """
    tree: dict[str, Any]
    if config is None:
        tree = {}
    elif isinstance(config, RunConfig):
        tree = to_dict(config)
    else:
        tree = read_yaml(config)
    for key, value in _override_items(overrides):
        _set_dotted(tree, key, value)
    if run_dir is not None:
        tree["run_dir"] = str(run_dir)
    return config_from_dict(tree)


def _override_items(overrides: Overrides) -> list[tuple[str, Any]]:
    if isinstance(overrides, str):
        raise SpinDiffusionError(f"overrides must be key=value strings in a list, or a mapping; got {overrides!r}")
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    return [parse_override(text) for text in overrides]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, last = dotted.split(".")
    node = tree
    for part in sections:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpinDiffusionError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[last] = value


def _resolve(config: ConfigLike, overrides: Overrides, run_dir, resume: bool) -> tuple[RunConfig, str]:
    """The run's config and where it came from (the line a run prints first)."""
    items = _override_items(overrides)
    if resume and config is None and not items and run_dir is not None:
        from spin_diffusion.self_play import load_saved_config

        return load_saved_config(run_dir), f"the saved config of {run_dir}"  # `--resume --run-dir D` alone
    cfg = load_config(config, overrides, run_dir=run_dir)
    if config is None:
        source = NO_CONFIG
    else:
        source = "a RunConfig" if isinstance(config, RunConfig) else str(config)
    return cfg, source + (f" + {len(items)} --set" if items else "")


# ---------------------------------------------------------------------------------------------------------------
# Training runs


@dataclass(frozen=True)
class RunResult:
    """A finished (or already finished, when resumed) run of spin, sft or dpo.

    Attributes:
        run_dir: the run directory (config.yaml, state.json, iter_*/, report.html).
        objective: ``loss.objective`` of the run (spin_approx, spin_exact, sft, dpo).
        config: the config the run used.
        iterations: how many models it trained (K for spin, 1 for sft and dpo).
        exports: iteration k (1…K) -> its diffusers pipeline folder, ``run_dir/iter_k/model`` (a LoRA run also
            writes the adapter to ``iter_k/lora``).
        metrics: iteration -> evaluation metrics (0 = the base model, when ``eval.include_base``); empty without
            ``eval.enabled`` or scorers; the main process's.
        report: ``run_dir/report.html`` (main process, when evaluated), else None.
        wall_seconds: how long this call took.
        config_source: where the config came from, e.g. ``configs/tiny.yaml + 2 --set``.
    """

    run_dir: Path
    objective: str
    config: RunConfig
    iterations: int
    exports: dict[int, Path]
    metrics: dict[int, dict[str, float]]
    report: Path | None
    wall_seconds: float
    config_source: str = ""

    def summary(self) -> str:
        """What the CLI prints at the end: each iteration's metrics, the report, then the time and the run dir (the
        last line says where the results are)."""
        lines = []
        for k, metrics in sorted(self.metrics.items()):
            shown = ", ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))
            lines.append(f"  iter {k}: {shown or '(no scorers)'}")
        if self.report is not None:
            lines.append(f"report: {self.report}")
        lines.append(f"finished in {self.wall_seconds:.0f} s: {self.run_dir}")
        return "\n".join(lines)


def spin(
    config: ConfigLike = None,
    overrides: Overrides = (),
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    exact: bool = False,
    progress: bool = True,
    handle_signals: bool = False,
) -> RunResult:
    """Self-play fine-tuning (SPIN-Diffusion): K iterations of generate with θ_k → train θ_{k+1} against θ_k →
    export → evaluate.

    Args:
        config: a `RunConfig`, a YAML file, or None (defaults); see `load_config`.
        overrides: dotted ``key=value`` strings or a mapping, applied on top (`load_config`).
        run_dir: the run directory (overrides ``run_dir``).
        resume: continue the run in ``run_dir``, skipping finished phases; with no config and no overrides it
            continues with the run's saved config.
        exact: the exact objective (``loss.objective=spin_exact``; stores the opponent's sampling trajectories).
        progress: progress bars, and a first line naming the config.
        handle_signals: SIGTERM/SIGINT finish the step or shard, checkpoint and raise ``Preempted`` (the CLI's
            behaviour; a later ``resume=True`` continues). Off by default: a library leaves signals alone.

    Returns:
        `RunResult`.

    Raises:
        SpinDiffusionError: a bad config, a run dir that holds another run, an objective that is not self-play.
    """
    cfg, source = _resolve(config, overrides, run_dir, resume)
    if exact:
        cfg = replace(cfg, **{"loss.objective": "spin_exact"})
    from spin_diffusion import objectives

    if not objectives.get(cfg.loss.objective).iterates:
        raise SpinDiffusionError(
            f"`spin` runs the objectives trained in rounds against θ_k (spin_approx, spin_exact, ddo, "
            f"caption_contrast), not {cfg.loss.objective}; use `spin-diffusion {cfg.loss.objective}`"
        )
    return _run(cfg, source, resume=resume, progress=progress, handle_signals=handle_signals)


def sft(
    config: ConfigLike = None,
    overrides: Overrides = (),
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    handle_signals: bool = False,
) -> RunResult:
    """Supervised fine-tuning baseline: the plain denoising loss on the real images (``loss.objective=sft``).

    Arguments as for `spin`. Returns a `RunResult` with one export."""
    cfg, source = _resolve(config, overrides, run_dir, resume)
    cfg = replace(cfg, **{"loss.objective": "sft"})
    return _run(cfg, source, resume=resume, progress=progress, handle_signals=handle_signals)


def dpo(
    config: ConfigLike = None,
    overrides: Overrides = (),
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    handle_signals: bool = False,
) -> RunResult:
    """Diffusion-DPO baseline on given preference pairs (``data.winner_column`` / ``data.loser_column``;
    ``loss.objective=dpo``). Arguments as for `spin`. Returns a `RunResult` with one export."""
    cfg, source = _resolve(config, overrides, run_dir, resume)
    cfg = replace(cfg, **{"loss.objective": "dpo"})
    return _run(cfg, source, resume=resume, progress=progress, handle_signals=handle_signals)


def _run(cfg: RunConfig, source: str, *, resume: bool, progress: bool, handle_signals: bool) -> RunResult:
    from spin_diffusion import preemption
    from spin_diffusion.self_play import run

    if progress and launched_rank() == 0:
        print(f"config: {source}", flush=True)
    if handle_signals:
        preemption.install()  # SIGTERM/SIGINT: finish the step or shard, checkpoint, raise Preempted
    try:
        summary = run(cfg, resume=resume, progress=progress)
    finally:
        if handle_signals:
            preemption.uninstall()
    exports = {k: iter_dir(summary.run_dir, k) / "model" for k in range(1, summary.iterations + 1)}
    return RunResult(
        run_dir=Path(summary.run_dir),
        objective=cfg.loss.objective,
        config=cfg,
        iterations=summary.iterations,
        exports=exports,
        metrics=summary.metrics,
        report=summary.report,
        wall_seconds=summary.wall_seconds,
        config_source=source,
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class EvalResult:
    """Models rendered on a prompt set and scored (`evaluate`).

    Attributes:
        out_dir: the output folder (eval.json, table.md, report.html, a grid and the images of each model).
        models: the models' names in the table, in the order given (the shortest distinct path suffixes).
        baseline: the name of the model that win rates are computed against.
        metrics: model name -> metric -> value (per scorer: mean, median, win rate vs the baseline; ``fd`` with
            FID); empty on processes other than the main one.
        table: the markdown table (also in table.md); empty on other processes.
        eval_file: out_dir/eval.json (`spin_diffusion.rundir` schema, per-prompt scores included); None on other
            processes.
    """

    out_dir: Path
    models: list[str] = field(default_factory=list)
    baseline: str | None = None
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    table: str = ""
    eval_file: Path | None = None


def evaluate(
    models: Sequence[str | os.PathLike],
    prompts: str | os.PathLike,
    *,
    scorers: Sequence[str] = (),
    scorer_paths: Mapping[str, str] | Sequence[str] | None = None,
    baseline: int = 0,
    out_dir: str | os.PathLike = "eval_out",
    num_prompts: int | None = None,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    seed: int = 0,
    fid_reference: str | os.PathLike | None = None,
    fid_features: str | None = None,
) -> EvalResult:
    """Render every prompt with every model (the same noise per prompt for all models) and score the images.

    Args:
        models: diffusers pipelines: folders (e.g. `RunResult.exports` values) or Hub ids.
        prompts: a prompt file: .txt (one per line), .csv, .jsonl or .parquet.
        scorers: pickscore, hpsv2, imagereward, aesthetic, clip, shapes_judge (the built-in world's judge).
        scorer_paths: scorer name -> local weights or Hub id (``{"pickscore": "/models/pickscore"}``), or the CLI's
            ``["pickscore=/models/pickscore"]``.
        baseline: index into ``models`` of the model that win rates are computed against.
        out_dir: where eval.json, table.md, report.html and the grids go.
        num_prompts: score only the first N prompts (None = all).
        num_steps: sampling steps.
        guidance_scale: classifier-free guidance scale.
        batch_size: sampling batch size.
        seed: sampling seed.
        fid_reference: a folder of real images; with ``fid_features`` (a CLIP folder or Hub id) adds ``fd``
            (Fréchet distance, lower is better) per model.
        fid_features: FID's feature network.

    Returns:
        `EvalResult`.

    Raises:
        SpinDiffusionError: no model, a folder that is not a pipeline, an unknown scorer, a bad prompt file, ...
            (all checked before any image is rendered).
    """
    from spin_diffusion.model_eval import evaluate_models
    from spin_diffusion.scoring import parse_scorer_paths

    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if num_prompts is not None and num_prompts < 1:
        raise SpinDiffusionError(f"num_prompts must be >= 1 (or None = all), got {num_prompts}")
    if scorer_paths is None:
        paths: dict[str, str] = {}
    elif isinstance(scorer_paths, Mapping):
        paths = parse_scorer_paths([f"{name}={path}" for name, path in scorer_paths.items()])
    else:
        paths = parse_scorer_paths(list(scorer_paths))
    out = Path(out_dir)
    table = evaluate_models(
        list(models),
        Path(prompts),
        scorers=list(scorers),
        scorer_paths=paths,
        baseline=baseline,
        out_dir=out,
        num_prompts=num_prompts,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        seed=seed,
        fid_reference=None if fid_reference is None else Path(fid_reference),
        fid_features=fid_features,
    )
    if not table:  # not the main process: it only rendered its share
        return EvalResult(out_dir=out)
    saved = read_eval(out / EVAL_FILE)
    return EvalResult(
        out_dir=out,
        models=[m.name for m in saved.models],
        baseline=saved.baseline,
        metrics={m.name: dict(m.metrics) for m in saved.models},
        table=table,
        eval_file=out / EVAL_FILE,
    )


# ---------------------------------------------------------------------------------------------------------------
# Data


def prepare_pickapic(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    keep: str = "winners",
    drop_ties: bool = True,
    on_bad_example: str = "skip",
    rows_per_shard: int | None = None,
) -> PrepareSummary:
    """Pick-a-Pic v2 parquet shards (the Hub's yuvalkirstain/pickapic_v2) -> ``out/train-*.parquet``.

    Args:
        inputs: shard paths or glob patterns (``"data/train-*.parquet"``), read in this order.
        out: a new (or empty) output folder; nothing is overwritten.
        keep: ``"winners"`` (caption + preferred image: SFT, SPIN) or ``"pairs"`` (+ winner + loser: DPO).
        drop_ties: drop ties (label_0 = 0.5); False keeps them (pairs only), marked in the ``tie`` column.
        on_bad_example: ``"skip"`` lists corrupt rows and unreadable shards in out/skipped.jsonl; ``"error"`` stops.
        rows_per_shard: rows per output shard (None = 10000).

    Returns:
        `spin_diffusion.prepare.PrepareSummary`: what was read, dropped and written (``kept_rows``, ``ties``, …).
        Train on it with ``overrides={"data.path": out}``.
    """
    from spin_diffusion import prepare

    patterns = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not patterns:
        raise SpinDiffusionError("no input shards; pass them as arguments or with --input (globs are expanded)")
    extra = {} if rows_per_shard is None else {"rows_per_shard": rows_per_shard}
    return prepare.prepare_pickapic(
        prepare.expand_inputs(patterns), out, keep=keep, drop_ties=drop_ties, on_bad_example=on_bad_example, **extra
    )


# ---------------------------------------------------------------------------------------------------------------
# The built-in demo


@dataclass(frozen=True)
class DemoResult:
    """The demo's outputs (`run_demo`): ``out`` holds seed_*/ (the runs and their evaluations), ``report``
    (report.html) and ``results`` (results.json: every model's metrics, mean and spread over the seeds)."""

    out: Path
    report: Path
    results: Path


def run_demo(
    out: str | os.PathLike = "demo_run",
    *,
    seed: int = 0,
    seeds: int = 3,
    scale: float = 1.0,
    pretrain: bool = False,
    progress: bool = True,
    workers: int | None = None,
    sft_then_spin: bool = False,
) -> DemoResult:
    """The built-in CPU demo: SFT vs SPIN from the shipped base on rendered shapes, ``seeds`` seeds, evaluated on
    held-out scenes, then a report. Calling it again on the same ``out`` continues a killed demo.

    Args:
        out: output folder.
        seed: first seed; the demo runs seeds seed, seed + 1, ...
        seeds: how many seeds of SFT and SPIN.
        scale: multiplies every step count (0.2 = smoke test).
        pretrain: pretrain the base from scratch (short) instead of using the shipped one.
        progress: progress bars.
        workers: processes that run the arms and evaluations (None: one per CPU core, at most 4).
        sft_then_spin: add the third arm, SFT for half the steps and then SPIN, against SFT continued.
    """
    from spin_diffusion.demo import runner

    if not scale > 0:
        raise SpinDiffusionError(f"--scale must be > 0, got {scale}")
    if seeds < 1:
        raise SpinDiffusionError(f"--seeds must be >= 1, got {seeds}")
    if workers is not None and workers < 1:
        raise SpinDiffusionError(f"--workers must be >= 1, got {workers}")
    report = runner.run_demo(
        out,
        seed=seed,
        seeds=seeds,
        scale=scale,
        pretrain=pretrain,
        progress=progress,
        workers=workers,
        sft_then_spin=sft_then_spin,
    )
    return DemoResult(out=Path(out), report=Path(report), results=Path(out) / "results.json")


def demo_configs(out: str | os.PathLike, *, seed: int = 0, scale: float = 1.0) -> dict[str, RunConfig]:
    """The demo's two arms as configs, to run (`spin`, `sft`) or change from Python.

    Writes the demo's fine-tuning pairs (the shapes world's train scenes) to ``out/world/finetune`` if they are not
    there. Returns ``{"sft": ..., "spin": ...}``: both start from the shipped pretrained base (``model.path``) and
    get the same optimizer steps and images per step, with run dirs ``out/seed_<seed>/{sft,spin}``. The demo
    evaluates on held-out prompts itself, so ``eval.enabled`` is false; use `evaluate` with `demo_prompts`.
    """
    from spin_diffusion.demo import runner

    if not scale > 0:
        raise SpinDiffusionError(f"scale must be > 0, got {scale}")
    out = Path(out)
    data = runner.prepare(out, seed)
    sft_cfg, spin_cfg = runner.finetune_configs(
        out / f"seed_{seed}", runner.shipped_base(), data, seed=seed, hyper=runner.Hyper(), scale=scale
    )
    return {"sft": sft_cfg, "spin": spin_cfg}


def demo_prompts(split: str = "test") -> list[str]:
    """The captions of one split of the demo's shapes world: ``"train"`` (the fine-tuning scenes), ``"validation"``
    (for choosing hyper-parameters) or ``"test"`` (the report's held-out scenes); ``shapes_judge`` scores them."""
    from spin_diffusion import world

    if split not in world.SPLITS:
        raise SpinDiffusionError(f"split must be one of {', '.join(world.SPLITS)}, got {split!r}")
    return [scene.caption for scene in world.split_scenes(split)]
