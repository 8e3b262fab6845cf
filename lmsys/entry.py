"""What every entry point does before the heavy imports: make `import lmsys` work, check the family."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from lmsys.config import Family, TrainConfig


class EntryPointError(SystemExit):
    """Raised (exiting with status 2, the message on stderr) when a config is run with the wrong entry point."""

    def __init__(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


def check_entry_family(cfg: DictConfig, family: Family, script: str) -> None:
    """Fail in the first second when a config of another family is given to this entry point."""
    configured = cfg.model.family
    if configured != family:
        raise EntryPointError(
            f"{script} trains the '{family.value}' family, but model.family is '{Family(configured).value}' "
            f"(model.path={cfg.model.path}); use train_r_{Family(configured).value}.py"
        )


def validated_config(cfg: DictConfig) -> TrainConfig:
    """The schema-checked config object. Merging into the schema again also rejects keys added with `+key=`,
    which Hydra lets into the composed config and `OmegaConf.to_object` would silently drop."""
    checked = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg, resolve=True))
    return OmegaConf.to_object(checked)
