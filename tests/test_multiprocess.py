"""Runs with two real processes (torchrun, gloo on CPU): every command completes, writes what a one-process run
writes, trains the same weights as one process with twice the batch, survives kill -9 of all ranks, and stops
every rank with one line on bad input.

`accelerate launch --cpu --num_processes 2` starts ONE process on a CPU machine; `ACCELERATE_USE_CPU=1 torchrun
--nproc_per_node 2` gives a real two-process gloo group (DistributedType.MULTI_CPU, DDP-wrapped models).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _families
from _launch import interrupt_when, kill_tree, node_args, set_args, torchrun_args
from spin_diffusion.config import load_config
from spin_diffusion.self_play import run

pytestmark = pytest.mark.heavy  # real processes: left out of `scripts/test.sh --quick`

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
# The tiny run with eval and validation images on; each rank trains batch 4, so one process needs batch 8 for the
# same effective batch. Issue 28's options ride along: the caption contrast beside SPIN (c′ drawn by stream
# position) and the opponent pool (iteration 2 trains against θ_0's and θ_1's samples).
BASE = ["num_iterations=2", "train.batch_size=4", "eval.num_prompts=8", "data.cache_shard_size=8",
        "eval.validation_prompts=[a red circle on the left, a blue square on the right, a green triangle]",
        "eval.validation_every=2", "loss.caption_contrast_weight=0.5", "sample.opponent_pool=all"]  # fmt: skip


def _torchrun(command: str, *args: str, nproc: int = 2, check: bool = True, timeout: float = 900):
    done = subprocess.run(
        torchrun_args(nproc, command, *args), capture_output=True, text=True, env=ENV, timeout=timeout
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _unet(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def _files(run_dir: Path) -> set[str]:
    """The run's files, but the reference's per-rank shards (`_reference_rows` compares those)."""
    return {
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.is_file() and "tensorboard" not in p.parts and not (p.parent.name == "reference" and p.name[:4] == "rank")
    }


def _reference_rows(run_dir: Path, k: int, ranks: int, batch: int) -> torch.Tensor:
    """iter_k's stored reference errors in the pair stream's order: micro-step m of rank r holds positions
    [(m·W + r)·B, (m·W + r + 1)·B), so the ranks' micro-steps interleave. -> [positions, chunks, K]"""
    folder = run_dir / f"iter_{k:02d}" / "reference"
    per_rank = [
        torch.cat([load_file(str(p))["errors"] for p in sorted(folder.glob(f"rank{r:05d}-*.safetensors"))])
        for r in range(ranks)
    ]
    assert len({rows.shape for rows in per_rank}) == 1
    row = per_rank[0].shape[1:]
    return torch.stack([rows.reshape(-1, batch, *row) for rows in per_rank], dim=1).reshape(-1, *row)


def _completed(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "state.json").read_text())["completed"]


@pytest.fixture(scope="module")
def spin_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The same spin_approx run (+ caption contrast, opponent pool all) on 2 processes × batch 4 and on 1 process ×
    batch 8."""
    root = tmp_path_factory.mktemp("mp")
    two, one = root / "two", root / "one"
    _torchrun("spin", "--config", str(TINY), "--run-dir", str(two), *set_args(BASE))
    run(load_config(TINY, [*BASE, "train.batch_size=8", f"run_dir={one}"]), progress=False)
    return two, one


def test_two_processes_write_what_one_process_writes(spin_runs):
    two, one = spin_runs
    assert _files(two) == _files(one)
    # the reference's precomputed errors: each rank stored its own visits, together the one process's (up to float
    # rounding: one thread per rank, two here)
    for k in (0, 1):
        torch.testing.assert_close(_reference_rows(two, k, 2, 4), _reference_rows(one, k, 1, 8), rtol=1e-4, atol=1e-6)
    assert (
        _completed(two)
        == _completed(one)
        == [
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
    )
    # the real-image cache is encoded by both ranks (each its shards) and equals the one-process cache (up to
    # float rounding: the ranks run 1 OpenMP thread each, this process 2, and the VAE's convolutions sum in
    # another order)
    shards = sorted((two / "cache" / "real").glob("*.safetensors"))
    assert len(shards) >= 2
    for shard in shards:
        a, b = load_file(str(shard)), load_file(str(one / "cache" / "real" / shard.name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])
    # θ_0's samples are keyed by (seed, iteration, prompt) alone: identical however the shards were split
    for shard in ("shard_00000", "shard_00001"):
        a = load_file(str(two / "iter_00" / "generated" / f"{shard}.safetensors"))
        b = load_file(str(one / "iter_00" / "generated" / f"{shard}.safetensors"))
        assert torch.equal(a["latents"], b["latents"])
    for k in (1, 2):
        log = [json.loads(line) for line in (two / f"iter_{k:02d}" / "train" / "train_log.jsonl").open()]
        assert [r["step"] for r in log] == [1, 2, 3, 4]  # written once (by the main process), not once per rank
        assert "caption_contrast_term" in log[0]  # the contrast was on, in both iterations
        # validation images while training: the ranks shared the 3 prompts, at steps 2 and 4 (no rank waits alone)
        rendered = sorted(p.relative_to(two).as_posix() for p in (two / f"iter_{k:02d}" / "validation").rglob("*"))
        assert rendered == [
            f"iter_{k:02d}/validation/{step}{name}"
            for step in ("step_0000002", "step_0000004")
            for name in ("", "/00000.png", "/00001.png", "/00002.png")
        ]
    ev_two = json.loads((two / "iter_02" / "eval.json").read_text())
    ev_one = json.loads((one / "iter_02" / "eval.json").read_text())
    assert ev_two["prompts"] == ev_one["prompts"] and len(ev_two["models"][0]["scores"]["shapes_judge"]) == 8


def test_two_processes_batch_b_equal_one_process_batch_2b(spin_runs):
    """DDP averages the two ranks' mean losses; with per-pair (t, ε) keyed by stream position this is the
    1-process loss on the 2B pairs, so the weights may differ only by float summation order. The bound is
    relative to the size of the update θ_{k+1} - θ_k (absolute differences alone say nothing when the update is
    tiny): 1e-3 of the update is ~1000x the float32 rounding of these sums and far below any real divergence
    (a wrong batch split or noise draw changes the update by O(1))."""
    two, one = spin_runs
    from spin_diffusion.presets import build_preset
    from spin_diffusion.self_play import pool_iterations

    assert load_config(two / "config.yaml").sample.opponent_pool == "all" and pool_iterations("all", 1) == [0]
    base = {n: t.detach().clone() for n, t in build_preset("tiny", seed=0).denoiser.state_dict().items()}
    for k in (1, 2):
        w2, w1 = _unet(two / f"iter_{k:02d}" / "model"), _unet(one / f"iter_{k:02d}" / "model")
        prev = base if k == 1 else _unet(one / f"iter_{k - 1:02d}" / "model")
        diff = torch.cat([(w2[n] - w1[n]).flatten() for n in w1]).norm()
        update = torch.cat([(w1[n] - prev[n]).flatten() for n in w1]).norm()
        assert update > 0
        assert diff <= 1e-3 * update, f"iteration {k}: |2-proc − 1-proc| = {diff:.3g}, update = {update:.3g}"


def _assert_same_generation_and_weights(two: Path, one: Path) -> tuple[dict, int]:
    """θ_0's samples (meta.json, shard names, indices, latents) and θ_1's weights of two one-iteration runs agree.
    -> (meta.json, number of shards)"""
    gen2, gen1 = two / "iter_00" / "generated", one / "iter_00" / "generated"
    meta = json.loads((gen2 / "meta.json").read_text())
    assert meta == json.loads((gen1 / "meta.json").read_text())
    names = sorted(p.name for p in gen2.glob("shard_*"))
    assert names == sorted(p.name for p in gen1.glob("shard_*"))
    for name in names:
        a, b = load_file(str(gen2 / name)), load_file(str(gen1 / name))
        assert torch.equal(a["indices"], b["indices"])
        torch.testing.assert_close(a["latents"], b["latents"])  # ranks run 1 OpenMP thread, this process 2
    w2, w1 = _unet(two / "iter_01" / "model"), _unet(one / "iter_01" / "model")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name])
    return meta, len(names)


def test_partial_generation_on_two_processes_equals_one_process(tmp_path: Path):
    """1 step x 2 ranks x batch 4 visits 8 of the 16 prompts: the ranks generate those 8 (shards split by rank),
    exactly what one process with batch 8 generates, and train the same weights."""
    part = ["num_iterations=1", "eval.enabled=false", "train.max_steps=1", "sample.shard_size=2"]
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun("spin", "--config", str(TINY), "--run-dir", str(two), *set_args([*part, "train.batch_size=4"]))
    run(load_config(TINY, [*part, "train.batch_size=8", f"run_dir={one}"]), progress=False)
    meta, shards = _assert_same_generation_and_weights(two, one)
    assert meta["num_generated"] == 8 and shards == 4


def test_per_caption_one_on_two_processes_equals_one_process(tmp_path: Path):
    """sample.per_caption=one, 1 step × 2 ranks × batch 2 (4 rows of 16, 4 distinct captions × 4): the ranks sample
    the distinct captions among the visited rows, as one process with batch 4 does, and train the same weights."""
    from spin_diffusion import world

    data = world.write_imagefolder(tmp_path / "data", 16, seed=0, scenes=world.split_scenes("train")[:4])
    part = ["num_iterations=1", "eval.enabled=false", "train.max_steps=1", "sample.shard_size=1"]
    part += ["data.builtin=null", f"data.path={data}", "sample.per_caption=one"]
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun("spin", "--config", str(TINY), "--run-dir", str(two), *set_args([*part, "train.batch_size=2"]))
    run(load_config(TINY, [*part, "train.batch_size=4", f"run_dir={one}"]), progress=False)
    meta, shards = _assert_same_generation_and_weights(two, one)
    assert meta["spec"]["num_prompts"] == 4 and shards == meta["num_generated"]


@pytest.mark.parametrize(
    ("command", "overrides", "completed"),
    [
        ("spin", ["loss.objective=spin_exact", "loss.timesteps_per_pair=2"], ["generate:0", "reference:0", "train:1"]),
        ("spin", ["model.lora_rank=4", "train.learning_rate=1e-2"], ["generate:0", "reference:0", "train:1"]),
        ("sft", [], ["train:1"]),
        ("dpo", "pairs", ["reference:0", "train:1"]),
    ],
    ids=["spin_exact", "lora", "sft", "dpo"],
)
def test_every_objective_runs_on_two_processes(tmp_path: Path, command, overrides, completed):
    if overrides == "pairs":
        overrides = ["data.builtin=null", f"data.path={_write_pairs(tmp_path / 'pairs')}"]
    common = ["num_iterations=1", "eval.enabled=false", "train.batch_size=4", *overrides]
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(command, "--config", str(TINY), "--run-dir", str(two), *set_args(common))
    objective = {"sft": "sft", "dpo": "dpo"}.get(command)
    one_overrides = [*common, "train.batch_size=8", f"run_dir={one}"]
    run(load_config(TINY, one_overrides + ([f"loss.objective={objective}"] if objective else [])), progress=False)
    assert _completed(two) == completed
    assert _files(two) == _files(one)
    w2, w1 = _unet(two / "iter_01" / "model"), _unet(one / "iter_01" / "model")
    assert w2.keys() == w1.keys() and not any("lora" in n for n in w2)  # LoRA: exported merged
    # the bound of the tests above, relative to the update (an element-wise 1e-6 fails on some CPUs: the ranks run
    # one OpenMP thread, this process two, and the merged LoRA product sums in another order)
    from spin_diffusion.presets import build_preset

    base = build_preset("tiny", seed=0).denoiser.state_dict()
    diff = torch.cat([(w2[n] - w1[n]).flatten() for n in w1]).norm()
    update = torch.cat([(w1[n] - base[n]).flatten() for n in w1]).norm()
    assert update > 0 and diff <= 1e-3 * update, f"|2-proc − 1-proc| = {diff:.3g}, update = {update:.3g}"


@pytest.mark.parametrize(("preset", "objective"), list(_families.TWO_PROCESS_OBJECTIVE.items()))
def test_families_on_two_processes_equal_one_process(tmp_path: Path, preset: str, objective: str):
    """The family seam under DDP: SDXL's per-image time ids, SD3's and SD3.5's (dynamically shifted) flow draws,
    FLUX's packed latents and guidance embedding, Z-Image's and Qwen-Image's masked prompts of their own lengths and
    FLUX.2's patchified, BN-normalised latents travel through the data loader and the wrapped module, and 2 processes
    × batch 4 give 1 process × batch 8's update (bound relative to the update, as for SD-1.x)."""
    from spin_diffusion.presets import build_preset

    common = ["num_iterations=1", "eval.enabled=false", *_families.settings(preset), f"loss.objective={objective}"]
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun("spin", "--config", str(TINY), "--run-dir", str(two), *set_args([*common, "train.batch_size=4"]))
    run(load_config(TINY, [*common, "train.batch_size=8", f"run_dir={one}"]), progress=False)
    assert _files(two) == _files(one)
    sub = "unet" if preset == "tiny-sdxl" else "transformer"
    w2, w1 = (
        load_file(str(d / "iter_01" / "model" / sub / "diffusion_pytorch_model.safetensors")) for d in (two, one)
    )
    base = build_preset(preset, seed=0).denoiser.state_dict()
    diff = torch.cat([(w2[n] - w1[n]).flatten() for n in w1]).norm()
    update = torch.cat([(w1[n] - base[n]).flatten() for n in w1]).norm()
    assert update > 0 and diff <= 1e-3 * update, f"|2-proc − 1-proc| = {diff:.3g}, update = {update:.3g}"


def test_guard_hinge_and_total_batch_on_two_processes_equal_one_process(tmp_path: Path):
    """The loser guard's λ is per pair and timestep, so it needs no collective: 2 processes × batch 2 with
    train.total_batch_size=8 (accumulation 2, derived) give 1 process × batch 8's update, with the guard and the
    hinge on and train.scale_lr's rate (same total, same rate), and the EMA exported; bound relative to the update,
    as above."""
    from spin_diffusion.presets import build_preset

    common = ["num_iterations=1", "eval.enabled=false", "loss.loser_guard=0.5", "loss.dpop_lambda=5",
              "train.total_batch_size=8", "train.scale_lr=true", "train.learning_rate=1.25e-5",
              "train.ema_decay=0.5"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun("spin", "--config", str(TINY), "--run-dir", str(two), *set_args([*common, "train.batch_size=2"]))
    run(load_config(TINY, [*common, "train.batch_size=8", f"run_dir={one}"]), progress=False)
    log = [json.loads(line) for line in (two / "iter_01" / "train" / "train_log.jsonl").open()]
    assert "loser_guard_lambda" in log[-1] and "dpop_term" in log[-1]
    used = json.loads((two / "state.json").read_text())["info"]["train:1"]["learning_rate"]
    assert used == pytest.approx(1.25e-5 * 8)  # scale_lr: the rate per pair × 8 pairs per step
    w2, w1 = (_unet(d / "iter_01" / "model") for d in (two, one))
    base = build_preset("tiny", seed=0).denoiser.state_dict()
    diff = torch.cat([(w2[n] - w1[n]).flatten() for n in w1]).norm()
    update = torch.cat([(w1[n] - base[n]).flatten() for n in w1]).norm()
    assert update > 0 and diff <= 1e-3 * update, f"|2-proc − 1-proc| = {diff:.3g}, update = {update:.3g}"


def test_a_total_batch_that_does_not_divide_stops_every_rank_with_one_line(tmp_path: Path):
    run_dir = tmp_path / "run"
    bad = set_args(["train.batch_size=4", "train.total_batch_size=12"])
    done = _torchrun("spin", "--config", str(TINY), "--run-dir", str(run_dir), *bad, check=False, timeout=120)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "train.total_batch_size=12 is not a multiple of" in lines[0], done.stderr[-3000:]
    assert "= 4 × 2" in lines[0] and not run_dir.exists()


def _write_pairs(root: Path) -> Path:
    from spin_diffusion import world

    root.mkdir(parents=True)
    rows = []
    for i, (img, caption) in enumerate(world.make_examples(16, seed=0)):
        img.save(root / f"w{i}.png")
        img.convert("L").convert("RGB").save(root / f"l{i}.png")
        rows.append({"winner": f"w{i}.png", "loser": f"l{i}.png", "text": caption})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_evaluate_on_two_processes_equals_one_process(spin_runs, tmp_path: Path):
    two, _ = spin_runs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square on the right\na green triangle at the top\n")
    models = ["--model", str(two / "iter_01" / "model"), "--model", str(two / "iter_02" / "model")]
    args = [*models, "--prompts", str(prompts), "--scorer", "shapes_color", "--steps", "3", "--batch-size", "2"]
    done = _torchrun("evaluate", *args, "--out", str(tmp_path / "two"))
    assert done.stdout.count("shapes_color") >= 1
    assert sorted(p.name for p in (tmp_path / "two" / "iter_02_model_images").iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]
    from spin_diffusion.cli import main

    assert main(["evaluate", *args, "--out", str(tmp_path / "one")]) == 0
    a = json.loads((tmp_path / "two" / "eval.json").read_text())
    b = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert a == b


# ------------------------------------------------------------------------------------------------------------
# kill -9 of the launcher and all its ranks, then the same command with --resume

KILL = [
    "num_iterations=1",
    "data.num_builtin=48",
    "sample.shard_size=4",
    "sample.num_steps=8",
    "train.max_steps=12",
    "train.checkpoint_every=2",
    "train.batch_size=2",
    "eval.enabled=false",
]


def _spin_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--run-dir", str(run_dir), *set_args(KILL), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("mp_ref") / "run"
    _torchrun("spin", *_spin_args(run_dir))
    return run_dir


def _kill_all_when(run_dir: Path, ready) -> None:
    """kill -9 the launcher and every rank of a 2-process run as soon as `ready()` holds, as a node failure would."""
    interrupt_when(torchrun_args(2, "spin", *_spin_args(run_dir)), ready, env=ENV)


@pytest.mark.parametrize("phase", ["generate", "train"])
def test_kill9_of_all_ranks_then_resume_equals_uninterrupted(tmp_path: Path, uninterrupted: Path, phase: str):
    run_dir = tmp_path / "run"
    gen = run_dir / "iter_00" / "generated"
    ckpts = run_dir / "iter_01" / "train" / "checkpoints"
    if phase == "generate":
        _kill_all_when(run_dir, lambda: (gen / "shard_00002.safetensors").exists())
        assert not (gen / "shard_00011.safetensors").exists()
    else:
        _kill_all_when(run_dir, lambda: ckpts.exists() and any(p.name.startswith("step_") for p in ckpts.iterdir()))
        assert not (run_dir / "iter_01" / "model").exists()
    _torchrun("spin", *_spin_args(run_dir, "--resume"))
    assert _completed(run_dir) == ["generate:0", "reference:0", "train:1"]
    for shard in range(12):
        name = f"shard_{shard:05d}.safetensors"
        assert torch.equal(
            load_file(str(gen / name))["latents"],
            load_file(str(uninterrupted / "iter_00" / "generated" / name))["latents"],
        )
    w, ref = _unet(run_dir / "iter_01" / "model"), _unet(uninterrupted / "iter_01" / "model")
    for name in ref:
        assert torch.equal(w[name], ref[name]), f"UNet weight {name} differs after resume"
    steps = [json.loads(line)["step"] for line in (run_dir / "iter_01" / "train" / "train_log.jsonl").open()]
    assert steps == list(range(1, 13))


# ------------------------------------------------------------------------------------------------------------
# Bad input: one line, every rank stopped, non-zero exit, nothing written


def test_bad_input_stops_every_rank_with_one_line(tmp_path: Path):
    run_dir = tmp_path / "run"
    started = time.time()
    done = _torchrun(
        "spin",
        "--config",
        str(TINY),
        "--run-dir",
        str(run_dir),
        "--set",
        "model.path=/no/such/model",
        check=False,
        timeout=120,
    )
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "/no/such/model" in lines[0], done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.strip().startswith("File ") and "spin_diffusion" in line]
    assert not ours, "a traceback from our code reached the user"  # (torchrun prints its own summary)
    assert time.time() - started < 60
    assert not run_dir.exists()  # a failed start leaves nothing: the corrected command needs no --resume


# ------------------------------------------------------------------------------------------------------------
# Two "nodes" (two launchers, one process each, rendezvous over TCP) on a shared filesystem


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_nodes(command: str, *args: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            node_args(node, port, command, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            start_new_session=True,
        )
        for node in (0, 1)
    ]


def _wait(nodes: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    out = []
    for proc in nodes:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append((proc.returncode, stdout + stderr))
    return out


def test_two_nodes_equal_one_node_with_two_processes(spin_runs, tmp_path: Path):
    """Ranks 0 and 1 in two launchers do exactly what they do in one: same shards, same weights."""
    two, _ = spin_runs
    results = _wait(_start_nodes("spin", "--config", str(TINY), "--run-dir", str(tmp_path / "run"), *set_args(BASE)))
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    assert _files(tmp_path / "run") == _files(two)
    for k in (1, 2):
        w, ref = _unet(tmp_path / "run" / f"iter_{k:02d}" / "model"), _unet(two / f"iter_{k:02d}" / "model")
        for name in ref:
            assert torch.equal(w[name], ref[name]), name


def test_lost_node_stops_the_other_and_the_run_resumes(tmp_path: Path, uninterrupted: Path):
    """A node lost mid-training (its launcher and rank killed) must not leave the other node hanging; relaunching
    both nodes with --resume continues from the last checkpoint and ends where an uninterrupted run ends."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "iter_01" / "train" / "checkpoints"
    nodes = _start_nodes("spin", *_spin_args(run_dir))
    deadline = time.time() + 180
    while not (ckpts.exists() and any(p.name.startswith("step_") for p in ckpts.iterdir())):
        assert nodes[0].poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    kill_tree(nodes[1].pid)
    rc, output = _wait(nodes[:1], timeout=90)[0]  # the surviving node gives up instead of waiting forever
    nodes[1].wait()
    assert rc != 0
    assert not (run_dir / "iter_01" / "model").exists()
    results = _wait(_start_nodes("spin", *_spin_args(run_dir, "--resume")))
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    w, ref = _unet(run_dir / "iter_01" / "model"), _unet(uninterrupted / "iter_01" / "model")
    for name in ref:
        assert torch.equal(w[name], ref[name]), f"UNet weight {name} differs after resume"


def test_run_dir_must_be_shared_by_all_nodes(tmp_path: Path):
    """Each node sees its own folder (no shared filesystem): every rank stops with one line naming the fix."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"  # a relative run dir resolves to a different folder per node
        cwd.mkdir()
        procs.append(
            subprocess.Popen(
                node_args(node, port, "spin", "--config", str(TINY), "--run-dir", "run"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
                cwd=cwd,
                start_new_session=True,
            )
        )
    results = _wait(procs, timeout=120)
    assert all(rc != 0 for rc, _ in results)
    lines = [line for _, out in results for line in out.splitlines() if line.startswith("error: ")]
    assert any("not shared between the processes" in line for line in lines), lines
