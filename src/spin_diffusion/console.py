"""What a normal run prints: its own lines and one progress bar per stage, not third-party noise.

Noise is fixed at its cause where the cause is ours (the reference is cast only when its dtype changes; see
models.cast). What remains comes from libraries and is not about the run:

- bitsandbytes, when installed and imported (the CLI holds it back until `train.optimizer: adamw8bit` needs it:
  lean_imports), warns that its optional CPU kernel package `kernels` is missing;
- transformers warns that `CLIPImageProcessor` falls back to its PIL backend without torchvision (diffusers'
  pipelines import it), and draws "Loading weights" / "Writing model shards" bars for every text encoder;
- diffusers' informational logs.

`quiet()` hides those (errors still show); `spin-diffusion --verbose ...` skips it and shows everything. The levels go
through the libraries' own environment variables, so they reach every process of a multi-process launch, and a value
the user set wins.
"""

from __future__ import annotations

import logging
import os

# library -> (environment variable, value) for its logging level
_LEVELS = {
    "transformers": ("TRANSFORMERS_VERBOSITY", "error"),
    "diffusers": ("DIFFUSERS_VERBOSITY", "error"),
}
# loggers whose warnings are known noise (see the module docstring)
_NOISY_LOGGERS = ("bitsandbytes",)
_quiet = False


def quiet() -> None:
    """Hide third-party warnings that are not about the run. Call before the libraries are imported."""
    global _quiet
    _quiet = True
    for variable, value in _LEVELS.values():
        os.environ.setdefault(variable, value)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_model_bars() -> None:
    """After quiet(): hide transformers' per-model bars (weights loaded, shards written); ours stay. Commands that
    load models call it (importing transformers costs a second or more, which `config` should not pay)."""
    if _quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def is_quiet() -> bool:
    """Whether quiet() was called in this process (the demo hands it on to its worker processes)."""
    return _quiet


WORKER_PRELOAD = "spin_diffusion.demo._preload"  # what the demo's fork server imports before its workers fork


def worker_context():
    """The multiprocessing context of the demo's workers: a fork server that has imported WORKER_PRELOAD (it never
    runs torch, so forking it is safe), the workers fork from it with nothing left to import; spawn where there is
    no fork server (Windows)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([WORKER_PRELOAD])
    return context


def start_workers_early() -> None:
    """Start the workers' fork server now, so that it imports what they need while this process does its own imports
    (`spin-diffusion demo` calls it first: about 20 s of one core here that no longer come before the first job)."""
    context = worker_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def start_worker(threads: int, quiet_parent: bool) -> None:
    """Initializer of a worker process (the demo's jobs): its torch threads, and the parent's console settings
    (environment variables are inherited, logger levels are not). It lives here, in a module that imports nothing
    heavy, because a spawned worker imports its initializer's module before calling it."""
    import torch

    from spin_diffusion import lean_imports

    lean_imports.hold_back()  # before the jobs import the libraries
    torch.set_num_threads(threads)
    if quiet_parent:
        quiet()
        quiet_model_bars()
