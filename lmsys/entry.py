"""What every entry point does before the heavy imports: make `import lmsys` work, check the family."""

from __future__ import annotations

from omegaconf import DictConfig

from lmsys.config import Family


class EntryPointError(SystemExit):
    """Raised (exiting with status 2) when a config is run with the wrong entry point."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


def check_entry_family(cfg: DictConfig, family: Family, script: str) -> None:
    """Fail in the first second when a config of another family is given to this entry point."""
    configured = cfg.model.family
    if configured != family:
        raise EntryPointError(
            f"{script} trains the '{family.value}' family, but model.family is '{Family(configured).value}' "
            f"(model.path={cfg.model.path}); use train_r_{Family(configured).value}.py"
        )
