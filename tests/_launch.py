"""Command lines that start real processes (torchrun, two "nodes"), shared by the multi-process tests."""

from __future__ import annotations

import sys


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
