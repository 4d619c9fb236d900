"""`spin-diffusion` command line. Each command parses its arguments and calls one function of the public API
(`spin_diffusion.api`, exported by the package), then prints its result: Python users and the CLI share one path.

Errors a user can fix are printed as one line (``error: …``) with exit status 2 and no traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer

from spin_diffusion import api, console, lean_imports, preemption
from spin_diffusion.distributed import is_main, launched_rank, launched_ranks, shutdown
from spin_diffusion.errors import SpinDiffusionError

# > the launcher's worker-monitor interval (torchrun: 0.1 s), and > how far apart ranks reach an error that they all
# hit (on shared, loaded cores their imports alone can differ by seconds: with 3 s a full test run printed it twice)
RANK_ERROR_DELAY_S = 10.0

app = typer.Typer(
    name="spin-diffusion",
    help="Self-play fine-tuning (SPIN-Diffusion) of text-to-image diffusion models, with SFT and DPO baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show every library's warnings and progress bars, not only ours.")
    ] = False,
) -> None:
    if not verbose:
        console.quiet()


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set train.learning_rate=1e-5 (repeatable)."),
]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", "-o", help="Run directory (overrides run_dir).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir, skipping finished work.")]


def _loads_models() -> None:
    """A command that loads models: its process is ours alone, so it holds back the packages that libraries import
    at start-up and the run may not use (lean_imports), and it hides transformers' per-model bars unless --verbose."""
    lean_imports.hold_back()
    console.quiet_model_bars()


def _finished(result: api.RunResult) -> None:
    if is_main():  # the main process reports for the run
        typer.echo(result.summary())


@app.command()
def spin(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    resume: ResumeOpt = False,
    exact: Annotated[bool, typer.Option("--exact", help="Use the exact objective (stores trajectories).")] = False,
):
    """Self-play fine-tuning: K iterations of generate with θ_k → train θ_{k+1} against θ_k → evaluate."""
    _loads_models()
    _finished(api.spin(config, set_ or [], run_dir=run_dir, resume=resume, exact=exact, handle_signals=True))


@app.command()
def sft(config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = False):
    """Supervised fine-tuning baseline: the plain denoising loss on the real images."""
    _loads_models()
    _finished(api.sft(config, set_ or [], run_dir=run_dir, resume=resume, handle_signals=True))


@app.command()
def dpo(config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, resume: ResumeOpt = False):
    """Diffusion-DPO baseline on given preference pairs (data.winner_column / data.loser_column)."""
    _loads_models()
    _finished(api.dpo(config, set_ or [], run_dir=run_dir, resume=resume, handle_signals=True))


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Every key with its value, its default (if other) and its meaning.")
    ] = False,
):
    """Print the resolved config (defaults + file + overrides) as YAML, after validating it."""
    from spin_diffusion.config import dump_config, explain_keys, format_explain

    cfg = api.load_config(config, set_ or [])
    typer.echo(format_explain(explain_keys(cfg)) if explain else dump_config(cfg), nl=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the demo runs and report.")] = Path(
        "demo_run"
    ),
    seed: Annotated[int, typer.Option(help="First seed; the demo runs seeds seed, seed + 1, ...")] = 0,
    seeds: Annotated[int, typer.Option(help="How many seeds of SFT and SPIN (the report shows mean ± spread).")] = 3,
    scale: Annotated[float, typer.Option(help="Multiply every step count (0.2 = smoke test, 1 = default).")] = 1.0,
    pretrain: Annotated[
        bool, typer.Option("--pretrain", help="Pretrain the base from scratch (short) instead of the shipped one.")
    ] = False,
    workers: Annotated[
        int, typer.Option(help="Processes that run the arms and evaluations (0 = one per CPU core, at most 4).")
    ] = 0,
    sft_then_spin: Annotated[
        bool,
        typer.Option(
            "--sft-then-spin", help="Add the third arm: SFT for half the steps, then SPIN (vs SFT continued)."
        ),
    ] = False,
):
    """Built-in CPU demo world: SFT vs SPIN from a shipped pretrained base on rendered shapes, several seeds,
    evaluated on held-out scenes, then a report.

    Running it again on the same --out continues a killed demo (finished stages are skipped)."""
    if workers < 0:
        raise SpinDiffusionError(f"--workers must be >= 0, got {workers}")
    _loads_models()
    if workers != 1:
        console.start_workers_early()  # the workers' imports, beside this process's
    options = dict(seed=seed, seeds=seeds, scale=scale, pretrain=pretrain, sft_then_spin=sft_then_spin)
    result = api.run_demo(out, workers=workers or None, **options)
    typer.echo(f"report: {result.report}")


@app.command()
def evaluate(
    model: Annotated[
        list[str], typer.Option("--model", "-m", help="Diffusers pipeline: a Hub id or a folder (repeatable).")
    ],
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="Prompt file: .txt, .csv, .jsonl or .parquet.")],
    scorer: Annotated[
        list[str] | None,
        typer.Option("--scorer", help="pickscore, hpsv2, imagereward, aesthetic, clip, shapes_judge (repeatable)."),
    ] = None,
    scorer_path: Annotated[
        list[str] | None, typer.Option("--scorer-path", help="name=/local/weights or name=hub/id (repeatable).")
    ] = None,
    baseline: Annotated[int, typer.Option(help="Index of the --model that win rates are computed against.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (eval.json, table, image grids).")] = Path(
        "eval_out"
    ),
    num_prompts: Annotated[int, typer.Option(help="Score only the first N prompts (0 = all).")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 50,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    batch_size: Annotated[int, typer.Option(help="Sampling batch size.")] = 8,
    seed: Annotated[int, typer.Option(help="Sampling seed (the same noise for every model).")] = 0,
    fid_reference: Annotated[Path | None, typer.Option(help="Folder of real images: adds FID per model.")] = None,
    fid_features: Annotated[str | None, typer.Option(help="CLIP folder or Hub id: FID's feature network.")] = None,
):
    """Generate images for a prompt set with each model and score them (mean, median, win rate vs baseline)."""
    _loads_models()
    result = api.evaluate(
        model,
        prompts,
        scorers=list(scorer or []),
        scorer_paths=list(scorer_path or []),
        baseline=baseline,
        out_dir=out,
        num_prompts=num_prompts or None,
        num_steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        seed=seed,
        fid_reference=fid_reference,
        fid_features=fid_features,
    )
    if result.table:  # the main process's; the other ranks only rendered their share
        typer.echo(result.table)
        typer.echo(f"results: {out}")


prepare_app = typer.Typer(help="Turn downloaded datasets into training data the trainer reads.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


@prepare_app.command("pickapic")
def prepare_pickapic(
    out: Annotated[Path, typer.Option("--out", "-o", help="New (or empty) output folder.")],
    shards: Annotated[
        list[str] | None, typer.Argument(help="Pick-a-Pic v2 parquet shards or glob patterns.", show_default=False)
    ] = None,
    input_: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="A shard or a quoted glob, e.g. 'data/train-*.parquet' (repeatable)."),
    ] = None,
    keep: Annotated[
        str, typer.Option(help="winners: caption + preferred image (SFT, SPIN); pairs: + winner + loser (DPO).")
    ] = "winners",
    drop_ties: Annotated[
        bool, typer.Option("--drop-ties/--keep-ties", help="Drop ties, label_0 = 0.5 (--keep-ties: pairs only).")
    ] = True,
    on_bad_example: Annotated[
        str, typer.Option(help="skip: list corrupt rows and unreadable shards in skipped.jsonl; error: stop.")
    ] = "skip",
    rows_per_shard: Annotated[int | None, typer.Option(help="Rows per output shard (default 10000).")] = None,
):
    """Pick-a-Pic v2 parquet shards (the Hub's yuvalkirstain/pickapic_v2) -> out/train-*.parquet.

    Ties are dropped; JPEG bytes are copied unchanged (each checked to decode); bad rows go to out/skipped.jsonl.

    Train on the result with --set data.path=OUT."""
    s = api.prepare_pickapic(
        [*(shards or []), *(input_ or [])],
        out,
        keep=keep,
        drop_ties=drop_ties,
        on_bad_example=on_bad_example,
        rows_per_shard=rows_per_shard,
    )
    unreadable = f" (see {s.skipped_file})" if s.shards_unreadable else ""
    typer.echo(f"shards read: {s.shards_read:,}, unreadable: {s.shards_unreadable:,}{unreadable}")
    typer.echo(f"pairs read: {s.pairs_read:,}")
    typer.echo(f"ties: {s.ties:,} ({'dropped' if s.drop_ties else 'kept, marked in the tie column'})")
    same = "dropped" if s.keep == "pairs" else "kept"
    typer.echo(f"same images (are_different=false): {s.same_images:,} ({same})")
    typer.echo(f"corrupt rows: {s.corrupt_rows:,} (see {s.skipped_file})")
    typer.echo(f"kept rows: {s.kept_rows:,} ({s.keep})")
    typer.echo(f"unique captions: {s.unique_captions:,}")
    if s.kept_rows == 0:
        raise SpinDiffusionError(f"no rows were kept; see {s.skipped_file} for why")
    command = "dpo" if s.keep == "pairs" else "spin"
    typer.echo(f"train on it: spin-diffusion {command} --set data.path={s.out}")
    typer.echo(f"output: {s.out} ({s.output_shards} shard(s), prepare.json)")


def _peer_failed(err: BaseException) -> bool:
    """A collective broke because another rank of this run exited (its own error line says why)."""
    import torch.distributed as dist

    return launched_ranks() > 1 and (
        isinstance(err, dist.DistError) or "Connection closed by peer" in str(err) or "Connection reset" in str(err)
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status.

    With several processes, a user error on any rank prints its line once and exits 2; the launcher then
    stops the other ranks. Ranks other than 0 wait a moment before printing, so an error that every rank
    hits (a bad config) is printed once, by rank 0, before the launcher stops the rest."""
    try:
        app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
        if launched_ranks() > 1:
            shutdown()
    except preemption.Preempted as stop:
        if launched_rank() == 0:
            typer.echo(f"preempted: {stop}; run the same command with --resume to continue", err=True)
        return preemption.EXIT_PREEMPTED
    except SpinDiffusionError as err:
        if launched_ranks() > 1 and launched_rank() != 0:
            time.sleep(RANK_ERROR_DELAY_S)
        typer.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        err.show()
        return 2
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun with --resume to continue", err=True)
        return 130
    except Exception as err:
        if not _peer_failed(err):
            raise
        time.sleep(RANK_ERROR_DELAY_S)  # the launcher is about to stop this rank; the failing rank said why
        typer.echo(f"error: stopped because another process of this run failed ({type(err).__name__})", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
