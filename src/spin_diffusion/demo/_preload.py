"""What the demo's worker processes need, imported once by their fork server before they fork from it
(`console.start_workers_early`, `runner.run_plans`): the libraries without bitsandbytes (lean_imports), then the
runner, which imports the training and evaluation code."""

from spin_diffusion import lean_imports

lean_imports.hold_back()

import spin_diffusion.demo.runner  # noqa: E402, F401  (the import is this module's job)
