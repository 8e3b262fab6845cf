"""The training entry points' one body: `lmsys/code/train_r_<family>.py` and `python -m lmsys.train` call
`train_entry`, which checks the config's family in the first second, before the heavy imports."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmsys.cli import one_line
from lmsys.config import Family, register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ENTRY_POINTS = {family: f"lmsys/code/train_r_{family.value}.py" for family in Family}
DEFAULT_CONFIGS = {Family.llama: "conf_r_llama_smol", Family.gemma: "conf_r_gemma_270m",
                   Family.qwen: "conf_r_qwen25_14b", Family.mistral: "conf_r_mistral_7b",
                   Family.deberta: "conf_r_deberta_v3_large"}


class EntryPointError(SystemExit):
    """Raised (exiting with status 2, the message on stderr) when a config is run with the wrong entry point."""

    def __init__(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


def check_entry_family(cfg: DictConfig, family: Family, script: str) -> None:
    """Fail in the first second when a config of another family is given to this entry point."""
    if OmegaConf.select(cfg, "model.family") is None:  # e.g. --config-name run_layout, a part of every experiment
        raise EntryPointError(f"the config has no model section: not an experiment config (conf/conf_r_*.yaml); "
                              f"{script} --config-name conf_r_...")
    configured = Family(cfg.model.family)
    if configured != family:
        raise EntryPointError(
            f"{script} trains the '{family.value}' family, but model.family is '{configured.value}' "
            f"(model.path={cfg.model.path}); use {ENTRY_POINTS[configured]} or python -m lmsys.train"
        )


def train_entry(family: Family | None, script: str) -> None:
    """Hydra's main over conf/ for one family (None: any), returning the best validation log loss to Hydra
    (for sweeps' optimisers)."""
    register_configs()
    default = DEFAULT_CONFIGS[family] if family is not None else DEFAULT_CONFIGS[Family.llama]

    def task(cfg: DictConfig) -> float:
        restore_hydra_errors()
        if family is not None:
            check_entry_family(cfg, family, script)
        from lmsys.train import run_training

        return run_training(cfg)["best"]["log_loss"]

    with config_errors():
        hydra.main(config_path=CONF_DIR, config_name=default, version_base="1.3")(task)()
    close_process_group()


def close_process_group() -> None:
    """The process group every job of this process shared (lmsys.training.recipe.TrainingRecipe.finish), closed
    once they are done; torch only if a job imported it."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


# Set beside HYDRA_FULL_ERROR when lmsys sets it: a submitit job's process inherits both from the launching one
# (where the task never runs to restore them), and must not take the variable for the user's.
SET_BY_LMSYS = "LMSYS_SET_HYDRA_FULL_ERROR"
USER_SET_FULL_ERROR = "HYDRA_FULL_ERROR" in os.environ and SET_BY_LMSYS not in os.environ


@contextmanager
def config_errors() -> Iterator[None]:
    """A config that does not compose (a typo in a key, a value of the wrong type, an unknown config name) as one
    `error:` line and exit status 2, like every other command's bad input. Hydra prints such errors itself, over
    several lines, and exits 1, unless HYDRA_FULL_ERROR makes it raise them: set here until the task starts (then
    restored, so the task's own errors are reported as before), unless the user set it. A submitit job that fails
    (its own `error:` line, status 2) or a launcher that cannot start one is one line too."""
    if USER_SET_FULL_ERROR:
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = os.environ[SET_BY_LMSYS] = "1"
    try:
        yield
    except (HydraException, OmegaConfBaseException, FileExistsError, NotADirectoryError) as err:
        # Hydra creates the run dir before the task: hydra.run.dir=<an existing file> fails there
        if "HYDRA_FULL_ERROR" not in os.environ:  # raised by the task, after restore_hydra_errors
            raise
        if isinstance(err, (FileExistsError, NotADirectoryError)):  # not Hydra's MissingConfigException, an OSError
            print(f"error: the run dir (hydra.run.dir, or a multirun's hydra.sweep.dir) cannot be created: "
                  f"{err.filename}: {err.strerror} (a file is in the way)", file=sys.stderr)
            raise SystemExit(2) from None
        cause = f": {one_line(err.__cause__)}" if err.__cause__ is not None else ""
        print(f"error: {one_line(err).rstrip('.')}{cause}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        if not raised_by_submitit(err) or os.environ.get("LMSYS_DEBUG", "") not in ("", "0"):
            raise
        line, status = launcher_failure(err)
        print(line, file=sys.stderr)
        raise SystemExit(status) from None
    finally:
        restore_hydra_errors()


def raised_by_submitit(err: BaseException) -> bool:
    """A job's failure (submitit's own errors) or the launcher's (e.g. its RuntimeError where there is no srun)."""
    if type(err).__module__.startswith("submitit"):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}submitit{os.sep}" in frames[-1].filename


def launcher_failure(err: Exception) -> tuple[str, int]:
    """A submitit job's failure as one line and an exit status: the job's own `error:` line (bad input, status 2)
    from the log tail submitit puts in the message, else the failure's first line (status 1)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("error: ")]
    if ours:
        return ours[-1], 2
    first = lines[0] if lines else type(err).__name__
    return f"error: the multirun's launcher or a job failed: {first} (the jobs' logs: the sweep dir's .submitit/)", 1


def restore_hydra_errors() -> None:
    if not USER_SET_FULL_ERROR:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.environ.pop(SET_BY_LMSYS, None)
