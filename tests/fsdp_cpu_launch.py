"""Run a training entry point under FSDP on CPU processes (gloo), for tests/test_fsdp.py:

    ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true FSDP_...=... \
        torchrun --standalone --nproc_per_node 2 tests/fsdp_cpu_launch.py ENTRY.py HYDRA_ARGS...

accelerate 1.15 turns FSDP on only for accelerator devices (a CPU run stays MULTI_CPU and ignores the FSDP
settings), while torch's FSDP2 itself runs on CPU with gloo. This test-only launcher lets the CPU run use the FSDP
plugin that accelerate builds from the FSDP_* variables (which `accelerate launch --config_file
conf/accelerate/fsdp_*.yaml` sets on a GPU machine); everything else (accelerate's fsdp2_prepare_model,
clip_grad_norm_, no_sync, our run) is the code that runs on GPUs.
"""

from __future__ import annotations

import runpy
import sys

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType

_init = Accelerator.__init__


def _init_with_cpu_fsdp(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    if self.state.distributed_type == DistributedType.MULTI_CPU:
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables


Accelerator.__init__ = _init_with_cpu_fsdp

if __name__ == "__main__":
    entry = sys.argv[1]
    sys.argv = [entry, *sys.argv[2:]]
    runpy.run_path(entry, run_name="__main__")
