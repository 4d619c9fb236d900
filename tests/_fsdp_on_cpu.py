"""Test-only launcher: `spin_diffusion.cli` with accelerate's FSDP path forced on CPU.

accelerate 1.15 turns an FSDP config into FSDP only on accelerators; on CPU (DistributedType.MULTI_CPU) it silently
runs DDP. torch's FSDP2 (`fully_shard`) itself works on CPU with gloo, so this script flips the resolved type to
FSDP after accelerate has set up the process group, the one thing accelerate refuses. Everything else (plugin from
the accelerate config's FSDP_* environment, prepare, save_state/load_state, the trainer) is the production path.

    accelerate launch --config_file configs/accelerate/fsdp.yaml tests/_fsdp_on_cpu.py spin --config ... --run-dir ...
"""

import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()  # reads FSDP_* env


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from spin_diffusion.cli import main

    sys.exit(main())
