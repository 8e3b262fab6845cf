"""Sweeps on a cluster: each job of `-m ... hydra/launcher=submitit_slurm` (or `submitit_local`) is one run, and a
job of several tasks (submitit's `tasks_per_node` x `nodes`, one task per GPU) is one multi-GPU accelerate run.

submitit starts the tasks itself (srun), with torchrun semantics: one process per GPU, all running the same Hydra
job. `SubmititDistributedEnv` (registered in conf/run_layout.yaml; it does nothing outside a multi-task submitit
job) gives each task what torchrun would: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (from SLURM,
through submitit's TorchDistributedEnvironment), and, with `accelerate_config`, the variables
`accelerate launch --config_file` would set (FSDP settings), before the run builds its Accelerator.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("lmsys")
ACCELERATE_KEYS = ("ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DOWNCAST_BF16")


def accelerate_env(config_file: str | Path) -> dict[str, str]:
    """The FSDP and precision variables that `accelerate launch --config_file FILE` sets for its processes,
    computed by accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, _, _ = _validate_launch_command(args)
    launch_env = prepare_multi_gpu_env(args)
    return {k: v for k, v in launch_env.items() if k.startswith("FSDP_") or k in ACCELERATE_KEYS}


def submitit_tasks() -> int:
    """Tasks of the submitit job this process belongs to (0 outside submitit)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 0
    import submitit

    return submitit.JobEnvironment().num_tasks


class SubmititDistributedEnv(Callback):
    def __init__(self, accelerate_config: str | None = None) -> None:
        self.accelerate_config = accelerate_config

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if submitit_tasks() <= 1:
            return
        import submitit

        # CUDA_VISIBLE_DEVICES stays whole: accelerate picks cuda:LOCAL_RANK
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if self.accelerate_config:
            os.environ.update(accelerate_env(self.accelerate_config))
        log.info("submitit task %d of %d (master %s:%d)", env.rank, env.world_size, env.master_addr, env.master_port)
