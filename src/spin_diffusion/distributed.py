"""Which process does what: the one place that knows about ranks.

Every run may be started as N processes (`accelerate launch`, `torchrun`, several nodes). The rules:

* one writer: the run dir, state.json, exports, reports and checkpoint renames are written by the main
  process only (`on_main`), and every other rank waits at a barrier before it reads them;
* each rank writes only what is its own: its generation and cache shards, its RNG state in checkpoints;
* a user error on any rank stops every rank with that rank's one-line message (`cli.main` exits, and the
  launcher, which watches its workers, terminates the others).

`state()` must be the first thing that touches accelerate in a process: a bare `PartialState()` created on a
CPU machine ignores `ACCELERATE_USE_CPU` and silently runs every rank as a lone "main" process.
(`accelerate launch` with an FSDP config does exactly that on CPU: two processes that each think they are alone.)
Creating the PartialState first does not hide FSDP from accelerate: `Accelerator()` reads ACCELERATE_USE_FSDP and
the FSDP_* variables of the accelerate config itself. On GPUs that gives DistributedType.FSDP; on CPU accelerate 1.15
keeps MULTI_CPU (plain DDP) whatever the config says, and the trainer warns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from spin_diffusion.errors import SpinDiffusionError

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")


def launched_ranks() -> int:
    """How many processes the launcher started (WORLD_SIZE), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fsdp_requested() -> bool:
    """Whether the launcher's accelerate config asks for FSDP, read as accelerate itself reads it (its
    ``ACCELERATE_USE_FSDP == "true"`` test). On CPU accelerate still runs such a config as DDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def state() -> PartialState:
    """The process group of this process, created on first use: gloo on CPU machines (or when
    `ACCELERATE_USE_CPU=1`), the accelerator's backend otherwise."""
    import torch  # here, not at the top: the CLI imports this module before it knows it needs torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        from accelerate.utils import is_deepspeed_available

        if not is_deepspeed_available():
            raise SpinDiffusionError(
                "the accelerate config asks for DeepSpeed, but deepspeed is not installed: "
                "pip install deepspeed, or launch with configs/accelerate/fsdp.yaml"
            )
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def is_main() -> bool:
    return state().is_main_process


def barrier() -> None:
    state().wait_for_everyone()


def on_main(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """Run `fn` on the main process only, then wait until it is done on every rank. Returns its result on main."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def split(n: int) -> range:
    """This rank's contiguous part of range(n) (the first n % world ranks take one extra item)."""
    s = state()
    per, extra = divmod(n, s.num_processes)
    start = s.process_index * per + min(s.process_index, extra)
    return range(start, start + per + (1 if s.process_index < extra else 0))


def shutdown() -> None:
    """End of a command: wait for every rank, then take the process group down in order. Leaving it to the
    interpreter's exit lets a rank abort in gloo's teardown ("terminate called without an active exception")
    when its peers are already gone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
