"""End-to-end self-play runs on the tiny preset: run-dir layout, export, resume after kill -9."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _launch import interrupt_when, spin_in_process
from spin_diffusion import rundir
from spin_diffusion.config import load_config
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.self_play import run, train_seed

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _unet_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _unet_weights(a), _unet_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], msg=f"UNet weight {name} differs")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("spin") / "run"
    cfg = load_config(TINY, [f"run_dir={run_dir}"])
    summary = run(cfg, progress=False)
    assert summary.run_dir == run_dir
    return run_dir


def test_run_dir_layout_and_state(finished_run: Path):
    state = json.loads((finished_run / "state.json").read_text())
    assert state["completed"] == [
        "eval:0",
        "generate:0",
        "reference:0",
        "train:1",
        "eval:1",
        "generate:1",
        "reference:1",
        "train:2",
        "eval:2",
    ]
    assert (finished_run / "config.yaml").exists()
    assert (finished_run / "report.html").exists()
    for k in (0, 1, 2):
        ev = rundir.read_eval(finished_run / f"iter_{k:02d}" / "eval.json")
        model = ev.model()
        assert model.name == f"iter_{k:02d}" and len(ev.prompts) == 8
        assert 0.0 <= model.metrics["shapes_judge"] <= 1.0 and model.metrics["fd"] >= 0.0
        assert len(model.scores["shapes_judge"]) == 8
        assert (finished_run / f"iter_{k:02d}" / model.grid).exists()
        assert ev.baseline == (None if k == 0 else "iter_00")
    ev2 = rundir.read_eval(finished_run / "iter_02" / "eval.json").model()
    assert "shapes_judge_win_rate" in ev2.metrics  # against iteration 0
    for k in (1, 2):
        log = [json.loads(line) for line in (finished_run / f"iter_{k:02d}" / "train" / "train_log.jsonl").open()]
        assert [r["step"] for r in log] == [1, 2, 3, 4]
        assert log[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # policy == θ_k
        assert not (finished_run / f"iter_{k:02d}" / "train" / "checkpoints").exists()  # superseded by model/


def test_iterations_differ_and_generated_follow_opponent(finished_run: Path):
    w1 = _unet_weights(finished_run / "iter_01" / "model")
    w2 = _unet_weights(finished_run / "iter_02" / "model")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    g0 = load_file(str(finished_run / "iter_00" / "generated" / "shard_00000.safetensors"))["latents"]
    g1 = load_file(str(finished_run / "iter_01" / "generated" / "shard_00000.safetensors"))["latents"]
    assert not torch.equal(g0, g1)


def test_exported_models_carry_a_model_card_with_their_evaluation(finished_run: Path):
    from spin_diffusion.card import read_metadata

    readme = finished_run / "iter_02" / "model" / "README.md"
    meta = read_metadata(readme)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    text = readme.read_text()
    assert "spin_approx" in text and "shapes_judge" in text  # how it was trained, and its evaluation table


def test_exported_iteration_loads_in_plain_diffusers(finished_run: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(finished_run / "iter_02" / "model", local_files_only=True)
    out = pipe(
        "a red circle on the left",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 16, 16, 3)


def test_resume_of_finished_run_does_no_work(finished_run: Path):
    stamp = (finished_run / "iter_02" / "model" / "model_index.json").stat().st_mtime_ns
    cfg = load_config(TINY, [f"run_dir={finished_run}"])
    run(cfg, resume=True, progress=False)
    assert (finished_run / "iter_02" / "model" / "model_index.json").stat().st_mtime_ns == stamp


def test_existing_run_dir_needs_resume_and_same_config(finished_run: Path):
    with pytest.raises(SpinDiffusionError, match="--resume"):
        run(load_config(TINY, [f"run_dir={finished_run}"]), progress=False)
    with pytest.raises(SpinDiffusionError, match="train.learning_rate"):
        run(load_config(TINY, [f"run_dir={finished_run}", "train.learning_rate=0.5"]), resume=True, progress=False)


# ------------------------------------------------------------------------------------------------------------
# kill -9 at any phase, then --resume: the run completes with the same result as an uninterrupted run

# the command processes of the kill tests, on one torch thread as their in-process references (_launch.spin_in_process)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
KILL_CONFIG = [
    "num_iterations=1",
    "data.num_builtin=48",
    "sample.shard_size=4",
    "sample.num_steps=8",
    "train.max_steps=12",
    "train.checkpoint_every=2",
    "eval.enabled=false",
]


def _cli(run_dir: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "spin_diffusion.cli", "spin", "--config", str(TINY), "--run-dir", str(run_dir)]
    return args + [a for kv in KILL_CONFIG for a in ("--set", kv)] + list(extra)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    spin_in_process(TINY, KILL_CONFIG, run_dir)
    return run_dir


def _kill_when(run_dir: Path, ready, *extra: str) -> None:
    """kill -9 `_cli(run_dir, *extra)` as soon as `ready()` holds (failing if it finishes first)."""
    interrupt_when(_cli(run_dir, *extra), ready, env=ENV, timeout=120)


@pytest.mark.heavy
@pytest.mark.parametrize("phase", ["generate", "reference", "train"])
def test_kill9_then_resume_completes_identically(tmp_path: Path, reference_run: Path, phase: str):
    run_dir = tmp_path / "run"
    gen = run_dir / "iter_00" / "generated"
    ckpts = run_dir / "iter_01" / "train" / "checkpoints"
    if phase == "generate":
        _kill_when(run_dir, lambda: (gen / "shard_00001.safetensors").exists())
        assert not (gen / "shard_00011.safetensors").exists()
    elif phase == "reference":  # θ_0's terms of train:1's 12 micro-steps, one shard each
        _kill_when(run_dir, lambda: (run_dir / "iter_00" / "reference" / "rank00000-00001.safetensors").exists())
    else:
        _kill_when(run_dir, lambda: ckpts.exists() and any(p.name.startswith("step_") for p in ckpts.iterdir()))
        assert not (run_dir / "iter_01" / "model").exists()
    state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
    assert "train:1" not in state.get("completed", [])

    done = subprocess.run(_cli(run_dir, "--resume"), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "state.json").read_text())["completed"] == ["generate:0", "reference:0", "train:1"]
    ref_gen = load_file(str(reference_run / "iter_00" / "generated" / "shard_00003.safetensors"))
    new_gen = load_file(str(gen / "shard_00003.safetensors"))
    assert torch.equal(ref_gen["latents"], new_gen["latents"])
    _assert_same_weights(reference_run / "iter_01" / "model", run_dir / "iter_01" / "model")
    steps = [json.loads(line)["step"] for line in (run_dir / "iter_01" / "train" / "train_log.jsonl").open()]
    assert steps == list(range(1, 13))


PARTIAL = ["train.max_steps=3", "sample.shard_size=1"]  # 3 steps x batch 4 = 12 of the 48 prompts, 12 shards


@pytest.fixture(scope="module")
def partial_reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref_partial") / "run"
    spin_in_process(TINY, KILL_CONFIG + PARTIAL, run_dir)
    return run_dir


@pytest.mark.heavy
def test_kill9_during_partial_generation_then_resume_completes_identically(tmp_path: Path, partial_reference_run):
    run_dir = tmp_path / "run"
    gen = run_dir / "iter_00" / "generated"
    sets = [a for kv in PARTIAL for a in ("--set", kv)]
    _kill_when(run_dir, lambda: (gen / "shard_00001.safetensors").exists(), *sets)
    assert not (gen / "shard_00011.safetensors").exists()
    done = subprocess.run(_cli(run_dir, *sets, "--resume"), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = sorted(p.name for p in gen.glob("shard_*.safetensors"))
    assert shards == [f"shard_{i:05d}.safetensors" for i in range(12)]  # 12 of 48 prompts, nothing else
    ref_gen = partial_reference_run / "iter_00" / "generated"
    assert json.loads((gen / "meta.json").read_text()) == json.loads((ref_gen / "meta.json").read_text())
    for name in shards:
        new, ref = load_file(str(gen / name)), load_file(str(ref_gen / name))
        assert torch.equal(new["indices"], ref["indices"]) and torch.equal(new["latents"], ref["latents"])
    wa, wb = _unet_weights(partial_reference_run / "iter_01" / "model"), _unet_weights(run_dir / "iter_01" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.heavy
def test_kill9_in_iteration_2_training_with_the_opponent_pool_then_resume_completes_identically(tmp_path: Path):
    """sample.opponent_pool=all: iteration 2 trains against θ_0's and θ_1's samples. kill -9 once iteration 2 has a
    checkpoint, then --resume: the pool is rebuilt from iter_00's samples on disk and the run ends with the weights
    and the step log of the same run uninterrupted (run in this process)."""
    overrides = ["num_iterations=2", "sample.opponent_pool=all", "data.num_builtin=16", "sample.num_steps=2",
                 "train.max_steps=6"]  # fmt: skip
    sets = [a for kv in overrides for a in ("--set", kv)]
    reference = tmp_path / "reference"
    run(load_config(TINY, [*KILL_CONFIG, *overrides, f"run_dir={reference}"]), progress=False)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "iter_02" / "train" / "checkpoints"
    _kill_when(run_dir, lambda: ckpts.exists() and any(p.name.startswith("step_") for p in ckpts.iterdir()), *sets)
    assert not (run_dir / "iter_02" / "model").exists()
    completed = json.loads((run_dir / "state.json").read_text())["completed"]
    assert completed == ["generate:0", "reference:0", "train:1", "generate:1", "reference:1"]
    done = subprocess.run(_cli(run_dir, *sets, "--resume"), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_weights(reference / "iter_02" / "model", run_dir / "iter_02" / "model")
    steps = [json.loads(line)["step"] for line in (run_dir / "iter_02" / "train" / "train_log.jsonl").open()]
    assert steps == list(range(1, 7))


def test_partial_generation_generates_what_training_visits_and_trains_the_same(tmp_path: Path, monkeypatch):
    """max_steps x batch covering half the prompts generates half of them (in the order training visits them), and
    trains the same weights as generating every prompt."""
    from spin_diffusion import sampling, trainer

    overrides = ["num_iterations=1", "eval.enabled=false", "train.max_steps=2", "sample.batch_size=1"]
    run(load_config(TINY, [*overrides, f"run_dir={tmp_path / 'part'}"]), progress=False)
    gen = tmp_path / "part" / "iter_00" / "generated"
    meta = json.loads((gen / "meta.json").read_text())
    assert meta["num_generated"] == 8 and len(meta["prompts"]) == 8  # 2 steps x batch 4 of 16 prompts
    assert sorted(p.name for p in gen.glob("shard_*")) == ["shard_00000.safetensors"]
    state = json.loads((tmp_path / "part" / "state.json").read_text())
    assert state["info"]["generate:0"]["generated"] == 8 and state["info"]["generate:0"]["prompts"] == 16
    stream = trainer._IndexStream(16, train_seed(load_config(TINY, overrides), 0))
    assert meta["prompts"] == list(dict.fromkeys(stream.take(0, 8).tolist()))
    assert load_file(str(gen / "shard_00000.safetensors"))["indices"].tolist() == meta["prompts"]

    # The same run generating every prompt (as before this change) trains bit-identical weights.
    monkeypatch.setattr(trainer, "visited_rows", lambda n, seed, positions: torch.arange(n))
    run(load_config(TINY, [*overrides, f"run_dir={tmp_path / 'full'}"]), progress=False)
    full = sampling.load_generated(tmp_path / "full" / "iter_00" / "generated")
    assert full.prompts is None and full.latents.shape[0] == 16
    part = sampling.load_generated(gen)
    assert torch.equal(part.latents[part.prompts], full.latents[part.prompts])
    wa, wb = (
        _unet_weights(tmp_path / "part" / "iter_01" / "model"),
        _unet_weights(tmp_path / "full" / "iter_01" / "model"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_every_prompt_visited_keeps_the_prompt_order_layout(finished_run: Path):
    """f = 1: meta.json records no subset and shards hold consecutive prompt indices, exactly as before."""
    for k in (0, 1):
        gen = finished_run / f"iter_{k:02d}" / "generated"
        meta = json.loads((gen / "meta.json").read_text())
        assert meta["prompts"] is None and meta["num_generated"] == 16
        indices = torch.cat([load_file(str(gen / f"shard_{s:05d}.safetensors"))["indices"] for s in (0, 1)])
        assert indices.tolist() == list(range(16))


# ------------------------------------------------------------------------------------------------------------
# sample.per_caption=one: one opponent sample per distinct caption


def _repeated_captions(root: Path, n: int = 16, scenes: int = 4) -> Path:
    """n rows of `scenes` distinct captions (n / scenes renders of each scene)."""
    from spin_diffusion import world

    return world.write_imagefolder(root / "data", n, seed=0, scenes=world.split_scenes("train")[:scenes])


def _samples_by_prompt(gen: Path) -> dict[int, torch.Tensor]:
    out = {}
    for shard in sorted(gen.glob("shard_*.safetensors")):
        tensors = load_file(str(shard))
        out |= dict(zip(tensors["indices"].tolist(), tensors["latents"], strict=True))
    return out


def test_per_caption_one_samples_each_visited_caption_once_for_all_its_rows(tmp_path: Path, monkeypatch):
    """Training visits 4 of 16 rows (4 captions × 4): θ_0 samples the distinct captions among them, once each, and
    every row trains against its caption's sample; the samples are keyed by caption, so a run that visits every row
    samples the same latents for those captions."""
    from spin_diffusion import sampling, trainer

    data = _repeated_captions(tmp_path)
    captions = [json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines()]
    losers = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **kw: losers.append(a[2].loser) or real_train(*a, **kw))
    common = ["data.builtin=null", f"data.path={data}", "sample.per_caption=one", "sample.shard_size=1"]
    common += ["num_iterations=1", "eval.enabled=false"]
    part = load_config(TINY, [*common, "train.max_steps=1", f"run_dir={tmp_path / 'part'}"])
    run(part, progress=False)

    visited = trainer.visited_rows(16, train_seed(part, 0), 4).tolist()
    distinct = list(dict.fromkeys(captions[i] for i in visited))
    unique = list(dict.fromkeys(captions))
    gen = tmp_path / "part" / "iter_00" / "generated"
    meta = json.loads((gen / "meta.json").read_text())
    assert meta["spec"]["num_prompts"] == 4 and meta["spec"]["per_caption"] == "one"
    assert meta["prompts"] == [unique.index(c) for c in distinct]  # in the order training first visits them
    assert meta["num_generated"] == len(distinct) == len(list(gen.glob("shard_*")))
    assert json.loads((tmp_path / "part" / "state.json").read_text())["info"]["generate:0"]["generated"] == len(
        distinct
    )
    samples = _samples_by_prompt(gen)
    for row in visited:
        assert torch.equal(losers[0][row], samples[unique.index(captions[row])])

    run(load_config(TINY, [*common, "train.max_steps=4", f"run_dir={tmp_path / 'all'}"]), progress=False)
    every = _samples_by_prompt(tmp_path / "all" / "iter_00" / "generated")
    assert sorted(every) == [0, 1, 2, 3]
    assert all(torch.equal(samples[u], every[u]) for u in samples)
    assert sampling.load_generated(tmp_path / "all" / "iter_00" / "generated").prompts is None


def test_per_caption_one_with_spin_exact_shares_the_trajectory(tmp_path: Path):
    data = _repeated_captions(tmp_path)
    sets = ["data.builtin=null", f"data.path={data}", "sample.per_caption=one", "loss.objective=spin_exact"]
    run(load_config(TINY, [*sets, "num_iterations=1", "eval.enabled=false", f"run_dir={tmp_path / 'run'}"]))
    shard = load_file(str(tmp_path / "run" / "iter_00" / "generated" / "shard_00000.safetensors"))
    assert shard["trajectory"].shape == (4, 4 + 1, 4, 8, 8)  # 4 captions, not 16 rows
    log = [json.loads(line) for line in (tmp_path / "run" / "iter_01" / "train" / "train_log.jsonl").open()]
    assert len(log) == 4 and all(math.isfinite(entry["loss"]) for entry in log)


@pytest.mark.heavy
def test_kill9_during_per_caption_generation_then_resume_completes_identically(tmp_path: Path):
    data = _repeated_captions(tmp_path, n=48, scenes=12)
    overrides = ["data.builtin=null", f"data.path={data}", "sample.per_caption=one", "sample.shard_size=1"]
    sets = [a for kv in overrides for a in ("--set", kv)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reference = tmp_path / "reference"  # the same run uninterrupted, in this process (one interpreter start less)
    run(load_config(TINY, [*KILL_CONFIG, *overrides, f"run_dir={reference}"]), progress=False)
    run_dir = tmp_path / "run"
    gen = run_dir / "iter_00" / "generated"
    _kill_when(run_dir, lambda: (gen / "shard_00001.safetensors").exists(), *sets)
    assert not (gen / "shard_00011.safetensors").exists()
    done = subprocess.run(_cli(run_dir, *sets, "--resume"), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    ref_gen = reference / "iter_00" / "generated"
    assert sorted(p.name for p in gen.glob("shard_*")) == [f"shard_{i:05d}.safetensors" for i in range(12)]
    assert json.loads((gen / "meta.json").read_text()) == json.loads((ref_gen / "meta.json").read_text())
    new, ref = _samples_by_prompt(gen), _samples_by_prompt(ref_gen)
    assert new.keys() == ref.keys() and all(torch.equal(new[u], ref[u]) for u in ref)
    _assert_same_weights(reference / "iter_01" / "model", run_dir / "iter_01" / "model")


# ------------------------------------------------------------------------------------------------------------
# The other objectives and LoRA, end to end (one short iteration each)


def test_spin_exact_stores_trajectories_and_trains(tmp_path: Path):
    cfg = load_config(
        TINY,
        [
            f"run_dir={tmp_path / 'run'}",
            "loss.objective=spin_exact",
            "loss.timesteps_per_pair=2",
            "num_iterations=1",
            "eval.enabled=false",
        ],
    )
    run(cfg, progress=False)
    shard = load_file(str(tmp_path / "run" / "iter_00" / "generated" / "shard_00000.safetensors"))
    assert shard["trajectory"].shape == (8, 4 + 1, 4, 8, 8)  # [n, S+1, C, h, w]
    torch.testing.assert_close(shard["trajectory"][:, -1], shard["latents"])
    log = [json.loads(line) for line in (tmp_path / "run" / "iter_01" / "train" / "train_log.jsonl").open()]
    assert log[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)


def test_spin_exact_opponent_samples_at_eta_one_by_default(tmp_path: Path):
    """docs/EXACT_OBJECTIVE.md: the exact objective's opponent is stochastic (DDIM η = 1) unless sample.eta is set;
    spin_approx keeps η = 0."""
    from spin_diffusion.presets import build_preset
    from spin_diffusion.self_play import opponent_eta

    ddpm, flow = build_preset("tiny", seed=0).family, build_preset("tiny-sd3", seed=0).family
    exact = load_config(TINY, ["loss.objective=spin_exact"])
    assert opponent_eta(exact, ddpm) == 1.0 and opponent_eta(exact, flow) == 0.0
    assert opponent_eta(load_config(TINY), ddpm) == 0.0
    assert opponent_eta(load_config(TINY, ["loss.objective=spin_exact", "sample.eta=0"]), ddpm) == 0.0
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "loss.objective=spin_exact", "num_iterations=1",
                             "eval.enabled=false"])  # fmt: skip
    run(cfg, progress=False)
    meta = json.loads((tmp_path / "run" / "iter_00" / "generated" / "meta.json").read_text())
    assert meta["spec"]["eta"] == 1.0


def test_lora_run_merges_adapter_into_exported_model(tmp_path: Path):
    cfg = load_config(
        TINY,
        [
            f"run_dir={tmp_path / 'run'}",
            "model.lora_rank=4",
            "num_iterations=2",
            "train.learning_rate=1e-2",
            "eval.enabled=false",
        ],
    )
    run(cfg, progress=False)
    for k in (1, 2):
        assert (tmp_path / "run" / f"iter_{k:02d}" / "lora" / "pytorch_lora_weights.safetensors").exists()
    w1 = _unet_weights(tmp_path / "run" / "iter_01" / "model")
    assert not any("lora" in name for name in w1)  # merged: a plain UNet that any diffusers code loads
    w2 = _unet_weights(tmp_path / "run" / "iter_02" / "model")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_dpo_baseline_on_preference_pairs(tmp_path: Path):
    from spin_diffusion import world

    root = tmp_path / "pairs"
    root.mkdir()
    rows = []
    for i, (img, caption) in enumerate(world.make_examples(8, seed=0)):
        img.save(root / f"w{i}.png")
        img.convert("L").convert("RGB").save(root / f"l{i}.png")  # the rejected image: grey
        rows.append({"winner": f"w{i}.png", "loser": f"l{i}.png", "text": caption})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        TINY,
        [
            f"run_dir={tmp_path / 'run'}",
            "loss.objective=dpo",
            "data.builtin=null",
            f"data.path={root}",
            "eval.enabled=false",
        ],
    )
    run(cfg, progress=False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["completed"] == ["reference:0", "train:1"]  # no self-play generation for a baseline
    log = [json.loads(line) for line in (tmp_path / "run" / "iter_01" / "train" / "train_log.jsonl").open()]
    assert log[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert (tmp_path / "run" / "iter_01" / "model" / "model_index.json").exists()


def test_resume_scores_an_iteration_killed_before_its_evaluation(tmp_path: Path):
    """A kill right after train:1 was recorded (eval:1 not yet): --resume must still score θ_1."""
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, [f"run_dir={run_dir}", "num_iterations=1"])
    run(cfg, progress=False)
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text())
    state["completed"].remove("eval:1")
    state["info"].pop("eval:1")
    state_path.write_text(json.dumps(state))
    (run_dir / "iter_01" / "eval.json").unlink()
    summary = run(cfg, resume=True, progress=False)
    assert "eval:1" in json.loads(state_path.read_text())["completed"]
    assert (run_dir / "iter_01" / "eval.json").exists() and 1 in summary.metrics


def test_resume_accepts_a_run_saved_before_a_config_key_existed(finished_run: Path):
    """A run dir whose config.yaml predates a key (here: sample.scheduler) resumes with that key's default."""
    import yaml

    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    del saved["sample"]["scheduler"]
    (finished_run / "config.yaml").write_text(yaml.safe_dump(saved))
    run(load_config(TINY, [f"run_dir={finished_run}"]), resume=True, progress=False)


def test_resume_of_a_run_saved_before_per_caption_existed(finished_run: Path):
    """It sampled every row: resuming it under today's default (one per caption) is refused with the key named;
    with sample.per_caption=every_row, or through the saved config alone, it resumes."""
    import yaml

    from spin_diffusion.self_play import load_saved_config

    original = (finished_run / "config.yaml").read_text()
    saved = yaml.safe_load(original)
    del saved["sample"]["per_caption"]
    (finished_run / "config.yaml").write_text(yaml.safe_dump(saved))
    try:
        assert load_saved_config(finished_run).sample.per_caption == "every_row"
        with pytest.raises(SpinDiffusionError, match=r"sample.per_caption: 'every_row' \(saved\) vs 'one' \(now\)"):
            run(load_config(TINY, [f"run_dir={finished_run}", "sample.per_caption=one"]), resume=True, progress=False)
        sets = [f"run_dir={finished_run}", "sample.per_caption=every_row"]
        run(load_config(TINY, sets), resume=True, progress=False)
        run(load_saved_config(finished_run), resume=True, progress=False)
    finally:
        (finished_run / "config.yaml").write_text(original)


def test_resume_of_a_run_saved_with_the_old_eta_default(finished_run: Path):
    """sample.eta's default became null (automatic): a spin_approx run saved with the old default 0.0 resumes; a
    spin_exact run saved at 0.0 would now sample at 1.0, so it is refused with the key named."""
    import yaml

    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    saved["sample"]["eta"] = 0.0
    (finished_run / "config.yaml").write_text(yaml.safe_dump(saved))
    run(load_config(TINY, [f"run_dir={finished_run}"]), resume=True, progress=False)
    saved["loss"]["objective"] = "spin_exact"
    (finished_run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(SpinDiffusionError, match=r"sample.eta: 0.0 \(saved\) vs 1.0 \(now\)"):
        run(load_config(TINY, [f"run_dir={finished_run}", "loss.objective=spin_exact"]), resume=True, progress=False)
    saved["loss"]["objective"], saved["sample"]["eta"] = "spin_approx", None
    (finished_run / "config.yaml").write_text(yaml.safe_dump(saved))


def test_resume_of_a_run_saved_with_the_old_lora_targets_default(finished_run: Path):
    """model.lora_target_modules' default became null (the family's list): a run saved with the old default, the four
    attention names, resumes; other saved targets are still a change, named."""
    import yaml

    original = (finished_run / "config.yaml").read_text()
    saved = yaml.safe_load(original)
    assert saved["model"]["lora_target_modules"] is None
    try:
        saved["model"]["lora_target_modules"] = ["to_q", "to_k", "to_v", "to_out.0"]
        (finished_run / "config.yaml").write_text(yaml.safe_dump(saved))
        run(load_config(TINY, [f"run_dir={finished_run}"]), resume=True, progress=False)
        saved["model"]["lora_target_modules"] = ["to_q", "to_v"]
        (finished_run / "config.yaml").write_text(yaml.safe_dump(saved))
        with pytest.raises(
            SpinDiffusionError, match=r"model.lora_target_modules: \['to_q', 'to_v'\] \(saved\) vs None \(now\)"
        ):
            run(load_config(TINY, [f"run_dir={finished_run}"]), resume=True, progress=False)
    finally:
        (finished_run / "config.yaml").write_text(original)


def test_beta_and_learning_rate_schedules_change_per_iteration(tmp_path: Path, monkeypatch):
    """loss.beta=[2000,1000] and train.learning_rate=[1e-4,5e-5]: the trainer gets each iteration's numbers, the
    train log shows the learning rate used, state.json and the model cards record both, and --resume accepts
    the saved lists."""
    from spin_diffusion import trainer
    from spin_diffusion.card import read_metadata

    handed: list[tuple[float, float]] = []
    real_train = trainer.train

    def spy(*args, loss_cfg, train_cfg, **kw):
        handed.append((loss_cfg.beta, train_cfg.learning_rate))
        return real_train(*args, loss_cfg=loss_cfg, train_cfg=train_cfg, **kw)

    monkeypatch.setattr(trainer, "train", spy)
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "loss.beta=[2000,1000]",
        "train.learning_rate=[1e-4,5e-5]",
        "train.lr_scheduler=constant",  # the logged lr is then the iteration's value at every step
        "train.max_steps=2",
        "eval.enabled=false",
    ]
    run(load_config(TINY, overrides), progress=False)

    assert handed == [(2000.0, 1e-4), (1000.0, 5e-5)]
    info = json.loads((run_dir / "state.json").read_text())["info"]
    assert (info["train:1"]["beta"], info["train:1"]["learning_rate"]) == (2000.0, 1e-4)
    assert (info["train:2"]["beta"], info["train:2"]["learning_rate"]) == (1000.0, 5e-5)
    for k, lr in [(1, 1e-4), (2, 5e-5)]:
        log = [json.loads(line) for line in (run_dir / f"iter_{k:02d}" / "train" / "train_log.jsonl").open()]
        assert [r["lr"] for r in log] == pytest.approx([lr, lr])
    card_2 = (run_dir / "iter_02" / "model" / "README.md").read_text()
    assert "| β | 1000.0 |" in card_2 and "| learning rate | 5e-05 |" in card_2
    assert read_metadata(run_dir / "iter_02" / "model" / "README.md")["library_name"] == "diffusers"
    assert "- 1000.0" in (run_dir / "config.yaml").read_text()  # the saved config keeps the list
    handed.clear()
    run(load_config(TINY, overrides), resume=True, progress=False)  # same lists: accepted, nothing left to do
    assert handed == []


def test_evaluation_uses_eval_sampler_and_the_opponent_uses_sample(tmp_path: Path, monkeypatch):
    """eval.num_steps=3, eval.guidance_scale=1 while the opponent keeps tiny.yaml's sample.num_steps=4,
    sample.guidance_scale=2: generation's meta.json and every evaluation render and eval.json say so."""
    from spin_diffusion import model_eval

    rendered: list[tuple[int, float]] = []
    real_render = model_eval.render_images

    def spy(*args, num_steps, guidance_scale, **kw):
        rendered.append((num_steps, guidance_scale))
        return real_render(*args, num_steps=num_steps, guidance_scale=guidance_scale, **kw)

    monkeypatch.setattr(model_eval, "render_images", spy)
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "num_iterations=1", "eval.num_steps=3", "eval.guidance_scale=1.0"]
    run(load_config(TINY, overrides), progress=False)

    spec = json.loads((run_dir / "iter_00" / "generated" / "meta.json").read_text())["spec"]
    assert (spec["num_steps"], spec["guidance_scale"]) == (4, 2.0)  # the opponent: sample.*
    assert rendered == [(3, 1.0), (3, 1.0)]  # eval:0 and eval:1
    for k in (0, 1):
        sampler = rundir.read_eval(run_dir / f"iter_{k:02d}" / "eval.json").sampler
        assert sampler == {"seed": 1234, "num_steps": 3, "guidance_scale": 1.0}


def test_evaluation_sampler_defaults_to_the_opponents(finished_run: Path):
    """Without eval.num_steps / eval.guidance_scale, evaluation samples like the opponent (tiny.yaml: 4 steps,
    CFG 2), as before these keys existed."""
    for k in (0, 1, 2):
        sampler = rundir.read_eval(finished_run / f"iter_{k:02d}" / "eval.json").sampler
        assert sampler == {"seed": 1234, "num_steps": 4, "guidance_scale": 2.0}


# ---------------------------------------------------------------------------------------------------------------
# Issue 28: the caption contrast, DDO and the opponent pool, end to end


def test_pool_iterations():
    from spin_diffusion.self_play import pool_iterations

    assert pool_iterations("latest", 3) == [] and pool_iterations(1, 3) == []
    assert pool_iterations("all", 0) == [] and pool_iterations("all", 2) == [0, 1]
    assert pool_iterations(2, 2) == [1] and pool_iterations(3, 1) == [0] and pool_iterations(3, 4) == [2, 3]


def test_opponent_pool_all_trains_on_every_earlier_iterations_samples(tmp_path: Path, monkeypatch):
    """sample.opponent_pool=all: train:k+1 gets θ_0..θ_{k-1}'s samples beside θ_k's, read back from their generated/
    folders, with the rows each of them sampled (max_steps=2 visits half of the 16 rows per iteration, a different
    half each time); the reference stays θ_k (first loss log 2)."""
    from spin_diffusion import sampling, trainer

    seen, real = [], trainer.train

    def record(policy, ref, data, **kw):
        seen.append((data.loser_pool, data.loser_pool_has))
        return real(policy, ref, data, **kw)

    monkeypatch.setattr(trainer, "train", record)
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, [f"run_dir={run_dir}", "sample.opponent_pool=all", "num_iterations=3", "train.max_steps=2",
                             "eval.enabled=false", "sample.per_caption=every_row"])  # fmt: skip
    run(cfg, progress=False)
    assert seen[0] == (None, None)
    for k in (1, 2):
        pool, has = seen[k]
        assert len(pool) == k and has.shape == (k, 16)
        for j in range(k):
            gen = sampling.load_generated(run_dir / f"iter_{j:02d}" / "generated")
            assert has[j].nonzero()[:, 0].tolist() == sorted(gen.prompts.tolist())  # the rows θ_j sampled
            rows = gen.prompts
            torch.testing.assert_close(pool[j][rows], gen.latents[rows])
    for k in (1, 2, 3):
        log = [json.loads(line) for line in (run_dir / f"iter_{k:02d}" / "train" / "train_log.jsonl").open()]
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize(
    ("extra", "phases", "first_loss"),
    [
        (  # rounds, no generation
            ["loss.objective=caption_contrast"],
            ["reference:0", "train:1", "reference:1", "train:2"],
            math.log(2),
        ),
        (
            ["loss.caption_contrast_weight=0.5", "num_iterations=1"],
            ["generate:0", "reference:0", "train:1"],
            1.5 * math.log(2),
        ),
        (
            ["loss.objective=ddo"],
            ["generate:0", "reference:0", "train:1", "generate:1", "reference:1", "train:2"],
            2 * math.log(2),
        ),
    ],
    ids=["caption_contrast", "spin+caption_contrast", "ddo"],
)
def test_caption_contrast_and_ddo_run_in_rounds_against_theta_k(tmp_path: Path, extra, phases, first_loss):
    run_dir = tmp_path / "run"
    run(load_config(TINY, [f"run_dir={run_dir}", "eval.enabled=false", *extra]), progress=False)
    assert json.loads((run_dir / "state.json").read_text())["completed"] == phases
    for k in range(1, len([p for p in phases if p.startswith("train")]) + 1):
        log = [json.loads(line) for line in (run_dir / f"iter_{k:02d}" / "train" / "train_log.jsonl").open()]
        assert log[0]["loss"] == pytest.approx(first_loss, abs=1e-6)  # policy == θ_k at the start of every round
    assert (run_dir / f"iter_{k:02d}" / "model" / "model_index.json").exists()


# ------------------------------------------------------------------------------------------------------------
# train.precompute_reference: θ_k's terms stored in reference:k, no reference model while training


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return _unet_weights(run_dir / "iter_02" / "model")


@pytest.mark.parametrize(
    "extra",
    [
        ["loss.objective=spin_exact", "loss.loser_guard=0.5", "loss.timesteps_per_pair=2"],  # η = 1, guidance 2
        ["model.lora_rank=4", "train.learning_rate=1e-2", "loss.caption_contrast_weight=1.0"],
    ],
    ids=["spin_exact_guard", "lora_contrast"],
)
def test_precomputed_reference_gives_the_same_run_without_a_reference_copy(tmp_path: Path, monkeypatch, extra):
    """Two iterations with train.precompute_reference on and off end with bit-identical weights; with it on, no
    frozen copy of θ_k is ever made for training (full fine-tuning's reference), and reference:k is a phase."""
    from spin_diffusion import models

    runs = {}
    for on in (False, True):
        made = []
        real_copy = models.frozen_copy
        monkeypatch.setattr(models, "frozen_copy", lambda m, made=made, copy=real_copy: made.append(1) or copy(m))
        run_dir = tmp_path / f"precompute_{on}"
        overrides = [f"run_dir={run_dir}", "eval.enabled=false", f"train.precompute_reference={str(on).lower()}"]
        run(load_config(TINY, overrides + extra), progress=False)
        completed = json.loads((run_dir / "state.json").read_text())["completed"]
        assert ("reference:0" in completed) == on and ("reference:1" in completed) == on
        assert (run_dir / "iter_01" / "reference").exists() == on
        assert len(made) == (0 if on or "model.lora_rank=4" in extra else 2)
        runs[on] = _final_weights(run_dir)
    assert all(torch.equal(runs[False][k], runs[True][k]) for k in runs[False])
    assert not all(torch.equal(runs[True][k], v) for k, v in _unet_weights(tmp_path / "precompute_True" / "iter_01"
                                                                           / "model").items())  # fmt: skip


def _cut_back_to_generation(run_dir: Path, keep_shards: int) -> None:
    """What a kill during reference:0 leaves: generate:0 recorded, the first `keep_shards` reference shards."""
    state = json.loads((run_dir / "state.json").read_text())
    state["completed"] = ["generate:0"]
    (run_dir / "state.json").write_text(json.dumps(state))
    for shard in sorted((run_dir / "iter_00" / "reference").glob("rank*.safetensors"))[keep_shards:]:
        shard.unlink()
    shutil.rmtree(run_dir / "iter_01")


def test_reference_terms_resume_after_a_partial_precompute_and_refuse_another_runs(tmp_path: Path):
    """A precompute cut short keeps its finished shards, --resume computes the rest to the same bytes and trains the
    same weights; shards made for another run (here: another seed) are refused with one line, never reused."""
    overrides = ["eval.enabled=false", "num_iterations=1", "sample.shard_size=4"]  # batch 4: one micro-step a shard
    full = tmp_path / "full"
    run(load_config(TINY, [f"run_dir={full}", *overrides]), progress=False)
    folder = full / "iter_00" / "reference"
    before = {p.name: load_file(str(p))["errors"] for p in sorted(folder.glob("rank*.safetensors"))}
    assert len(before) == 4  # 4 steps × 1 micro-step
    weights = _unet_weights(full / "iter_01" / "model")
    _cut_back_to_generation(full, keep_shards=2)
    kept = {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("rank*"))}
    assert len(kept) == 2
    run(load_config(TINY, [f"run_dir={full}", *overrides]), resume=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("rank*"))[:2]} == kept  # not recomputed
    for name, errors in before.items():
        assert torch.equal(load_file(str(folder / name))["errors"], errors)
    assert all(torch.equal(w, _unet_weights(full / "iter_01" / "model")[k]) for k, w in weights.items())

    other = tmp_path / "other"  # another seed's run, with this run's reference folder copied in
    run(load_config(TINY, [f"run_dir={other}", *overrides, "seed=1"]), progress=False)
    _cut_back_to_generation(other, keep_shards=4)
    shutil.rmtree(other / "iter_00" / "reference")
    shutil.copytree(full / "iter_00" / "reference", other / "iter_00" / "reference")
    with pytest.raises(SpinDiffusionError, match="holds reference terms of another run") as err:
        run(load_config(TINY, [f"run_dir={other}", *overrides, "seed=1"]), resume=True, progress=False)
    assert "\n" not in str(err.value)
