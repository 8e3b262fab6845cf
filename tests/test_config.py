"""Every experiment config composes against the schema; typos, wrong types and broken rules fail at compose time."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmsys.config import ConfigError, Family, HeadInit, Quantization, Template, TrainConfig, validated_config

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
EXPERIMENTS = sorted(path.stem for path in CONF_DIR.glob("conf_r_*.yaml"))


def compose_config(name: str, overrides: tuple[str, ...] = (), conf_dir: Path = CONF_DIR, hydra: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=hydra)


def test_the_experiments_are_there():
    assert {"conf_r_llama_smol", "conf_r_gemma_270m", "conf_r_gemma_m110", "conf_r_gemma_m205",
            "conf_r_llama_m205", "conf_r_qwen25_14b", "conf_r_mistral_7b"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    """Every experiment validates, its name says its family, and each value its own file sets (the lines below
    `defaults`) wins over the group defaults it lists, in the validated config: a misplaced `_self_` or a group
    file that overrode an experiment's choice would show here."""
    cfg = compose_config(name)
    config = validated_config(cfg)  # what run_training does first: every __post_init__ rule, ??? left unset
    assert isinstance(config, TrainConfig)
    # the file name says which entry point trains it: conf_r_<family>[version]_... (conf_r_qwen25_14b: qwen)
    family = name.split("_")[2].rstrip("0123456789")
    assert config.model.family == Family(family)
    assert (CONF_DIR.parent / "lmsys" / "code" / f"train_r_{family}.py").is_file()
    own = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    own.pop("defaults", None)
    validated = OmegaConf.structured(config)
    leaves = list(own_leaves(OmegaConf.to_container(own)))
    assert leaves, f"{name} sets nothing of its own"
    for key, value in leaves:
        got = OmegaConf.select(validated, key)
        assert getattr(got, "value", got) == value, f"{name}: {key} is {got!r}, the file sets {value!r}"


def own_leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from own_leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_the_defaults_of_the_embedded_configs():
    config = validated_config(compose_config("conf_r_llama_smol"))
    assert config.model.quantization == Quantization.nf4
    assert config.model.path == "models/SmolLM2-135M-Instruct" and config.model.template.value == "chatml"
    gemma = validated_config(compose_config("conf_r_gemma_270m"))
    assert gemma.model.family == Family.gemma and gemma.model.template.value == "auto"
    m110 = validated_config(compose_config("conf_r_gemma_m110"))
    assert m110.seed == 91 and m110.optimizer.lora_b_lr_multiplier == 10.0 and m110.data.valid_fold == 0
    for seed_config in ("conf_r_gemma_m110", "conf_r_gemma_m205", "conf_r_llama_m205"):  # what their headers say
        config = validated_config(compose_config(seed_config))
        assert config.trainer.swap_augmentation.value == "full" and config.trainer.eval_tta, seed_config
    # the CPU defaults measured on real pairs (docs/measurements.md: Auto-J -> PandaLM transfer beats the swap-symmetric prior)
    for embedded in ("conf_r_llama_smol", "conf_r_gemma_270m"):
        config = validated_config(compose_config(embedded))
        assert config.trainer.swap_augmentation.value == "random" and config.trainer.eval_tta, embedded
        assert config.model.head_init == HeadInit.normal and config.model.head_init_std == 0.002, embedded
        assert config.optimizer.head_lr == 3e-4, embedded
    tascj = validated_config(compose_config("conf_r_gemma_full_s1"))  # the 2nd place's stage 1, as its header says
    assert (tascj.model.finetune.value, tascj.model.quantization.value, tascj.model.head.value) == ("full", "none", "mlp")
    assert tascj.optimizer.kahan_summation and tascj.trainer.max_grad_norm is None
    assert [f.value for f in tascj.data.formats] == ["pab", "papb"] and tascj.trainer.swap_augmentation.value == "full"
    bi = validated_config(compose_config("conf_r_llama_smol_bi"))  # swap-equivariant: swapping changes nothing
    assert bi.trainer.swap_augmentation.value == "none" and not bi.trainer.eval_tta


def test_run_dir_is_deterministic():
    cfg = compose_config("conf_r_llama_smol", ("seed=3",), hydra=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert cfg.hydra.run.dir == "outputs/conf_r_llama_smol/seed3"
        assert cfg.hydra.sweep.dir == "outputs/conf_r_llama_smol" and cfg.hydra.sweep.subdir == "seed3"
        assert cfg.hydra.job.chdir is False
    finally:
        HydraConfig.instance().cfg = None


def test_a_fold_is_part_of_the_run_dir():
    """Folds x seeds: one dir per job, the same on every process (a function of the config alone)."""
    cfg = compose_config("conf_r_llama_smol", ("seed=3", "data.valid_path=null", "data.valid_fold=2"), hydra=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert cfg.hydra.run.dir == "outputs/conf_r_llama_smol/fold2_seed3"
        assert cfg.hydra.sweep.subdir == "fold2_seed3"
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("override", [
    "trainer.max_stepz=3",  # a typo in a key
    "model.qantization=none",
    "+trainer.max_stepz=3",  # appending a key the schema does not have is a typo too
    "lora.rank=8",
    "learning_rate=1e-4",
])
def test_a_typo_override_fails(override):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        validated_config(compose_config("conf_r_llama_smol", (override,)))


def test_the_entry_point_reports_a_config_that_does_not_compose_in_one_line():
    """As every command reports bad input: one `error:` line naming the key, exit 2 (Hydra's own report is several
    lines and exit 1); with HYDRA_FULL_ERROR=1 Hydra's full report stays available."""
    entry = [sys.executable, str(REPO / "lmsys" / "code" / "train_r_llama.py"), "--config-name", "conf_r_llama_smol"]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    cases = {"trainer.eval_frequncy=5": "error: Could not override 'trainer.eval_frequncy': trainer.eval_frequncy: "
                                        "Key 'eval_frequncy' not in 'TrainerConfig'",
             "trainer.max_steps=abc": "error: Error merging override trainer.max_steps=abc: trainer.max_steps: Value "
                                      "'abc' of type 'str' could not be converted to Integer"}
    for override, line in cases.items():
        done = subprocess.run([*entry, override], capture_output=True, text=True, env=env, timeout=120, check=False)
        assert (done.returncode, done.stderr) == (2, line + "\n")
    full = subprocess.run([*entry, "trainer.eval_frequncy=5"], capture_output=True, text=True, timeout=120,
                          env={**env, "HYDRA_FULL_ERROR": "1"}, check=False)
    assert full.returncode == 1 and "Traceback" in full.stderr


@pytest.mark.parametrize("override", [
    "trainer.max_steps=abc",  # wrong type
    "model.quantization=nf5",  # not an enum value
    "model.family=gpt",
    "trainer.packing=maybe",
    "data.formats=[pabp]",
    "model=smollm2",  # a group option that does not exist
])
def test_a_wrong_value_fails(override):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        compose_config("conf_r_llama_smol", (override,))


@pytest.mark.parametrize("override,message", [
    ("model.max_length=16", "max_length must be at least 32"),
    ("trainer.max_steps=-1", "max_steps"),
    ("data.prompt_share=1.0", "prompt_share"),
    ("trainer.max_tokens=256", "max_tokens must be at least model.max_length"),
    ("optimizer.min_lr_ratio=1.5", "min_lr_ratio"),
    ("data.max_train_pairs=-1", r"data.max_train_pairs must be >= 1 or unset \(null\), got -1"),
    ("data.max_train_pairs=0", "data.max_train_pairs must be >= 1"),
    ("data.max_valid_pairs=-3", "data.max_valid_pairs must be >= 1"),
    ("data.valid_fold=0", "data.valid_fold .* cannot be combined with data.valid_path"),  # data/default sets valid_path
    ("model.finetune=full model.quantization=none model.compute_dtype=float16",
     "model.finetune=full with model.compute_dtype=float16 is not supported"),
    ("trainer.log_frequency=0", r"trainer.log_frequency must be >= 1"),  # a modulo by zero after update 1 before
    ("trainer.row_tokens=0", r"trainer.row_tokens must be >= 1"),  # silently the default before
    ("optimizer.betas=[1.5,0.9]", r"optimizer.betas needs two values in \[0, 1\)"),  # torch refused it after loading
    ("optimizer.betas=[0.9,1.0]", r"optimizer.betas needs two values in \[0, 1\)"),
    ("optimizer.eps=-1", "optimizer.eps and optimizer.weight_decay must be >= 0"),
    ("optimizer.weight_decay=-0.1", "optimizer.eps and optimizer.weight_decay must be >= 0"),  # trained silently
])
def test_a_broken_rule_fails_at_start_up(override, message):
    cfg = compose_config("conf_r_llama_smol", tuple(override.split()))
    with pytest.raises(ConfigError, match=message):
        validated_config(cfg)


def test_clipping_is_switched_off_by_null():
    assert validated_config(compose_config("conf_r_llama_smol", ("trainer.max_grad_norm=null",))).trainer.max_grad_norm is None


def test_kahan_summation_needs_an_optimizer_that_keeps_a_compensation():
    cfg = compose_config("conf_r_llama_smol", ("optimizer.name=adamw_8bit", "optimizer.kahan_summation=true"))
    with pytest.raises(ConfigError, match="optimizer.kahan_summation=true needs optimizer.name=adamw or stable_adamw"):
        validated_config(cfg)
    for name in ("adamw", "stable_adamw"):
        validated_config(compose_config("conf_r_llama_smol", (f"optimizer.name={name}", "optimizer.kahan_summation=true")))


def test_the_dense_lora_kernel_is_not_compiled():
    cfg = compose_config("conf_r_llama_smol", ("model.torch_compile=true", "model.lora_kernel=dense"))
    with pytest.raises(ConfigError, match="model.torch_compile=true compiles peft's LoRA layers"):
        validated_config(cfg)
    validated_config(compose_config("conf_r_llama_smol", ("model.torch_compile=true",)))  # auto: peft's, compiled
    for option in ("norm_kernel", "mlp_kernel", "attention_kernel"):
        cfg = compose_config("conf_r_llama_smol", ("model.torch_compile=true", f"model.{option}=compiled"))
        with pytest.raises(ConfigError, match=f"compiles whole layers, their elementwise work too: use model.{option}="):
            validated_config(cfg)


def test_a_typo_in_a_group_file_fails(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "trainer" / "cpu.yaml").write_text((conf / "trainer" / "cpu.yaml").read_text() + "eval_frequncy: 5\n")
    with pytest.raises(ConfigCompositionException):
        compose_config("conf_r_llama_smol", conf_dir=conf)


def test_a_missing_value_fails_at_start_up(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    model_file = conf / "model" / "smollm2_135m.yaml"
    lines = model_file.read_text().splitlines()
    model_file.write_text("\n".join(line for line in lines if not line.startswith("path")))
    cfg = compose_config("conf_r_llama_smol", conf_dir=conf)
    with pytest.raises(OmegaConfBaseException, match="model.path"):
        validated_config(cfg)


def test_every_entry_point_and_default_config_the_family_check_names_exists():
    from lmsys.entry import DEFAULT_CONFIGS, ENTRY_POINTS

    repo = CONF_DIR.parent
    assert set(ENTRY_POINTS) == set(DEFAULT_CONFIGS) == set(Family)
    for family, script in ENTRY_POINTS.items():
        assert (repo / script).is_file(), script
        assert f"Family.{family.value}" in (repo / script).read_text(), script  # the script serves that family
    for family, name in DEFAULT_CONFIGS.items():
        assert name in EXPERIMENTS, name
        assert validated_config(compose_config(name)).model.family == family


@pytest.mark.parametrize("name,family,hub_name,path", [
    ("conf_r_qwen25_14b", Family.qwen, "Qwen/Qwen2.5-14B-Instruct", "models/Qwen2.5-14B-Instruct"),
    ("conf_r_mistral_7b", Family.mistral, "mistralai/Mistral-7B-Instruct-v0.3", "models/Mistral-7B-Instruct-v0.3"),
])
def test_the_qwen_and_mistral_experiments(name, family, hub_name, path):
    config = validated_config(compose_config(name))
    assert (config.model.family, config.model.name, config.model.path) == (family, hub_name, path)
    assert config.model.template.value == "auto" and config.model.quantization == Quantization.nf4
    # the header says full swap and swap TTA: the values agree
    assert config.trainer.swap_augmentation.value == "full" and config.trainer.eval_tta
    assert config.model.gradient_checkpointing and config.data.valid_fold == 0


def test_a_run_dir_that_a_file_is_in_the_way_of_fails_in_one_line(tmp_path):
    """Hydra creates the run dir before the task runs: a file there was a 27-line FileExistsError traceback."""
    (tmp_path / "results.csv").write_text("x\n")
    entry = [sys.executable, str(REPO / "lmsys" / "code" / "train_r_llama.py"), "--config-name", "conf_r_llama_smol"]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    for run_dir, reason in (("results.csv", "File exists"), ("results.csv/seed0", "Not a directory")):
        done = subprocess.run([*entry, f"hydra.run.dir={tmp_path / run_dir}"], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        line = (f"error: the run dir (hydra.run.dir, or a multirun's hydra.sweep.dir) cannot be created: "
                f"{tmp_path / run_dir}: {reason} (a file is in the way)\n")
        assert (done.returncode, done.stderr) == (2, line)


@pytest.mark.parametrize("args,line", [
    (["--config-name", "conf_r_llama_smoll"],
     "error: Cannot find primary config 'conf_r_llama_smoll'. Check that it's in your config search path"),
    (["--config-name", "conf_r_llama_smol", "model=smollm2_135mm"],
     "error: In 'conf_r_llama_smol': Could not find 'model/smollm2_135mm'"),
])
def test_a_misspelt_config_or_option_is_named(args, line):
    """Hydra's MissingConfigException is an OSError too: it was reported as a run dir with a file in the way
    (`None: None`)."""
    entry = [sys.executable, str(REPO / "lmsys" / "code" / "train_r_llama.py")]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    done = subprocess.run([*entry, *args], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.splitlines() == [line]


def test_python_m_lmsys_train_checks_the_config_before_importing_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, lmsys.train; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, check=True, cwd=REPO)
    assert done.stdout == "False\n"


@pytest.mark.parametrize("family,template,accepted", [
    (Family.deberta, Template.chatml, False), (Family.llama, Template.sep, False), (Family.deberta, Template.sep, True),
    (Family.llama, Template.chatml, True), (Family.deberta, Template.auto, True),
])
def test_the_template_fits_the_family(family, template, accepted):
    """A decoder with the sep layout failed after the run dir was claimed; an encoder with a chat template trained
    silently on its markers read as plain text."""
    from lmsys.modeling.families import FamilyError, resolve_template

    if accepted:
        assert resolve_template(family, template) in (template, Template.sep)
    else:
        with pytest.raises(FamilyError, match=f"model.template={template.value} does not fit the {family.value}"):
            resolve_template(family, template)


def test_flash_attention_without_its_package_fails_before_the_model_loads(monkeypatch):
    """transformers said so only when the model loaded, after the run dir was claimed."""
    import importlib.util

    from lmsys.config import Attention
    from lmsys.modeling.families import FamilyError, resolve_attention

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(FamilyError, match="flash_attention_2 needs the flash-attn package .* to sdpa here"):
        resolve_attention(Family.llama, "llama", Attention.flash_attention_2, packing=True)
    assert resolve_attention(Family.llama, "llama", Attention.sdpa, packing=True) == Attention.sdpa


def test_flex_attention_cannot_train_on_cpu():
    """torch's FlexAttention has no CPU backward: the first update failed, after the model loaded."""
    from types import SimpleNamespace

    import torch

    from lmsys.builders import check_training_attention
    from lmsys.config import Attention

    with pytest.raises(ConfigError, match="flex_attention cannot train on CPU"):
        check_training_attention(SimpleNamespace(attn_implementation=Attention.flex_attention), torch.device("cpu"))
    check_training_attention(SimpleNamespace(attn_implementation=Attention.flex_attention), torch.device("cuda"))
    check_training_attention(SimpleNamespace(attn_implementation=Attention.sdpa), torch.device("cpu"))
