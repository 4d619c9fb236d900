"""Why the demo runs its jobs on single-threaded workers: one demo SFT arm (a quarter of its steps) with 1 and with
all torch threads, one after the other in this process, then two single-threaded copies at once in two warm
processes (training alone is timed: imports and data preparation are not).

    env -u OMP_NUM_THREADS HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_demo_workers.py [--scale 0.25]

Prints seconds per arm and the throughput of two 1-thread workers relative to one process with every thread. Run it
alone: other jobs on the cores change every figure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path


def arm(folder: str, scale: float, threads: int) -> tuple[float, float]:
    """Run one SFT arm; -> (start, end) wall-clock stamps of the training alone (imports and data excluded)."""
    import torch

    from spin_diffusion.demo import runner

    torch.set_num_threads(threads)
    out = Path(folder)
    shutil.rmtree(out, ignore_errors=True)
    data = runner.prepare(out, 0)
    sft, _ = runner.finetune_configs(
        out / "seed_0", runner.shipped_base(), data, seed=0, hyper=runner.Hyper(), scale=scale
    )
    start = time.time()
    runner.run(sft, resume=False, progress=False)
    return start, time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25)
    scale = parser.parse_args().scale
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        arm(f"{tmp}/warm", scale, 1)  # imports, caches
        one = _seconds(arm(f"{tmp}/one", scale, 1))
        every = _seconds(arm(f"{tmp}/all", scale, cores))
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            pool.starmap(arm, [(f"{tmp}/w{i}", scale, 1) for i in range(2)])  # each worker's imports and caches
            stamps = pool.starmap(arm, [(f"{tmp}/p{i}", scale, 1) for i in range(2)])
    pair = max(end for _, end in stamps) - min(start for start, _ in stamps)
    print(f"one SFT arm at scale {scale}: 1 thread {one:.1f} s, {cores} threads {every:.1f} s")
    print(f"two 1-thread arms at once in two warm processes: {pair:.1f} s from the first start to the last end")
    print(f"throughput of two 1-thread workers / one {cores}-thread process: {2 * every / pair:.2f}x")


def _seconds(stamps: tuple[float, float]) -> float:
    start, end = stamps
    return end - start


if __name__ == "__main__":
    main()
