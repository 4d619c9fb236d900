"""Real processes for the tests: command lines (torchrun, two "nodes") and the one way to interrupt a run at a
chosen point (kill -9 of a process or of a whole launcher tree, or SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest


def set_args(overrides: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [a for kv in overrides for a in ("--set", kv)]


def torchrun_args(nproc: int, command: str, *args: str) -> list[str]:
    """`spin-diffusion COMMAND ARGS` as nproc processes of one torchrun launcher on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "spin_diffusion.cli", command, *args]  # fmt: skip


def node_args(node: int, port: int, command: str, *args: str) -> list[str]:
    """`spin-diffusion COMMAND ARGS` as node `node` of two one-process nodes meeting at 127.0.0.1:port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
            "-m", "spin_diffusion.cli", command, *args]  # fmt: skip


def spin_in_process(config, overrides: list[str], run_dir) -> None:
    """`spin-diffusion spin --config CONFIG --set ... --run-dir RUN_DIR` run in this process, on one torch thread as
    the tests' command processes (OMP_NUM_THREADS=1): the reference a test compares real processes with, without
    paying a process's imports. The run's weights are bit-identical to the command's (the kill tests compare them
    with torch.equal)."""
    import torch

    from spin_diffusion import api

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        api.spin(config, overrides, run_dir=run_dir, progress=False)
    finally:
        torch.set_num_threads(threads)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it. (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave the ranks running.)"""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def interrupt_when(
    command: list[str],
    ready: Callable[[], bool],
    *,
    env: dict[str, str],
    sig: signal.Signals = signal.SIGKILL,
    timeout: float = 180.0,
) -> subprocess.Popen:
    """Start `command` and, as soon as `ready()` holds, interrupt it (failing if it ends first or `timeout` passes).

    SIGKILL kills the process and every process under it (a node failure: the launcher and all its ranks) and
    waits for them. Any other signal goes to the process alone (a launcher forwards it to its ranks) and the
    process is returned running, its stdout and stderr piped (text): `proc.communicate()` reads how it ended."""
    kill = sig == signal.SIGKILL
    out = subprocess.DEVNULL if kill else subprocess.PIPE
    proc = subprocess.Popen(command, stdout=out, stderr=out, text=True, env=env, start_new_session=kill)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail("the run finished before it could be interrupted")
            if time.time() > deadline:
                pytest.fail("timed out waiting for the point to interrupt the run")
            time.sleep(0.01)
    except BaseException:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    if kill:
        kill_tree(proc.pid)
        proc.wait()
    else:
        proc.send_signal(sig)
    return proc
