"""A command's process does not import what its run does not use (spin_diffusion.lean_imports)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

# what every model-loading command runs first, then everything a run imports, then what adamw8bit does
_PROCESS = """
import sys
from spin_diffusion import cli, lean_imports
cli._loads_models()
from spin_diffusion import model_eval, presets, self_play
presets.build_preset("tiny", seed=0)
print("imported before the optimizer:", "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None)
print("installed:", lean_imports.installed("bitsandbytes"))
print("the optimizer", file=sys.stderr, flush=True)
print("8-bit AdamW:", lean_imports.import_module("bitsandbytes").optim.AdamW8bit.__name__)
"""


def test_a_command_imports_bitsandbytes_only_for_the_8bit_optimizer():
    if importlib.util.find_spec("bitsandbytes") is None:  # the dev extra installs it; without it nothing to hold back
        pytest.skip("bitsandbytes is not installed")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _PROCESS],  # -X importtime: every import, on stderr
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run, _, optimizer = done.stderr.partition("the optimizer\n")
    imported, then = ([ln.split("|")[-1].strip() for ln in text.splitlines() if ln.startswith("import time:")]
                      for text in (run, optimizer))  # fmt: skip
    # the libraries that import it when they can (diffusers' quantizers, peft) were imported, and it was not ...
    assert {"diffusers.quantizers", "peft.helpers"} <= set(imported)
    # (a held-back import is logged once, by its top name, when it is refused: none of its modules ran)
    assert not {name for name in imported if name.startswith("bitsandbytes.")}
    assert done.stdout.splitlines() == [
        "imported before the optimizer: False",
        "installed: True",
        "8-bit AdamW: AdamW8bit",
    ]
    assert "bitsandbytes.optim" in then  # ... until the optimizer asked for it
