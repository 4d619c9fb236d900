"""What a command's process does not import: a package it rarely uses that other libraries import at start-up.

bitsandbytes, when installed, is imported by diffusers (its quantizer registry, as soon as a model class is
imported) and by peft (`peft.helpers`) whatever the run does. spin-diffusion uses it for one thing only,
`train.optimizer: adamw8bit`, and importing it costs seconds of start-up on a slow CPU core (about 2.5 s here:
docs/DEVELOPMENT.md) in every process: each rank of a launch, each demo worker, each test that starts a command.

`hold_back()` marks it as not importable (a ``None`` entry in `sys.modules`, Python's documented way to block an
import): the libraries then see it as not installed (`importlib.util.find_spec` answers None) and skip it.
`installed()` and `import_module()` see through the mark, for the one run that wants the package. It changes the
whole process, so only processes that are ours alone call it: the CLI and the demo's workers, not the library API
(a user's program may load 4-bit models).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

HELD_BACK = ("bitsandbytes",)
_held: set[str] = set()


# the libraries that decide at their own import whether a package is installed (and later import it if so)
_DECIDERS = ("diffusers", "transformers", "peft")


def hold_back() -> None:
    """Before the libraries are imported: packages of HELD_BACK not imported yet become not importable. A process
    that has imported the libraries already (a program calling `cli.main`, a test) is left as it is: they have found
    the packages installed and would fail to import them later."""
    if any(name in sys.modules for name in _DECIDERS):
        return
    for name in HELD_BACK:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            _held.add(name)


def _is_held(name: str) -> bool:
    return name in _held and name in sys.modules and sys.modules[name] is None


def installed(name: str) -> bool:
    """Whether package `name` is installed, held back or not."""
    if not _is_held(name):
        return importlib.util.find_spec(name) is not None
    del sys.modules[name]
    try:
        return importlib.util.find_spec(name) is not None
    finally:
        sys.modules[name] = None  # type: ignore[assignment]


def import_module(name: str) -> ModuleType:
    """Import package `name`, releasing it first if it was held back (the run that uses it)."""
    if _is_held(name):
        del sys.modules[name]
        _held.discard(name)
    return importlib.import_module(name)
