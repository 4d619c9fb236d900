"""Graceful stop on SIGTERM / SIGINT, the way clusters preempt jobs (SLURM, spot instances): the current unit of
work (an optimizer step, a generation shard) finishes, a checkpoint and the state are written, and the process
exits with `EXIT_PREEMPTED`, telling the user how to resume. A second signal stops at once.

With several processes every rank must stop at the same optimizer step, or the ranks would wait for each other
in different collectives: `agree()` reduces the ranks' flags (any rank asked to stop -> every rank stops).
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "temporary failure, the user is invited to retry" (with --resume)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested: int | None = None  # the signal that asked to stop, if any
_previous: dict[int, object] = {}


class Preempted(Exception):
    """Raised on every rank once the work is saved; the CLI prints it and exits with EXIT_PREEMPTED."""


def _handler(signum: int, frame: FrameType | None) -> None:
    global _requested
    if _requested is not None:  # second signal: stop now (a kill -9 loses at most the unsaved step)
        uninstall()
        raise KeyboardInterrupt
    _requested = signum
    print(
        f"{signal.Signals(signum).name}: stopping after the current step or shard and saving a checkpoint "
        "(send it again to stop at once)",
        file=sys.stderr,
        flush=True,
    )


def install() -> None:
    """Catch SIGTERM and SIGINT in this (main) thread from now on."""
    global _requested
    _requested = None
    for sig in _SIGNALS:
        _previous[sig] = signal.signal(sig, _handler)


def uninstall() -> None:
    for sig, previous in list(_previous.items()):
        signal.signal(sig, previous)  # type: ignore[arg-type]
        del _previous[sig]


def requested() -> bool:
    """True once this process was asked to stop."""
    return _requested is not None


class Clock:
    """Time-based checkpoints next to step-based ones: `due()` once `minutes` have passed since the last
    `reset()` (0 disables)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60.0
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.since >= self.seconds


def agree(device, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all-reduce; no collective with a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
