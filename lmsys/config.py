"""The one schema every YAML file and command-line override is validated against.

`TrainConfig` is stored in Hydra's ConfigStore as `train_schema` and listed first in every experiment's defaults
list, so an unknown key, a wrong type or a typo fails while composing, before any model is loaded.
Cross-field rules live in `__post_init__`; `OmegaConf.to_object` runs them once at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Family(str, Enum):
    llama = "llama"
    gemma = "gemma"
    qwen = "qwen"
    mistral = "mistral"


class Template(str, Enum):
    auto = "auto"
    llama3 = "llama3"
    gemma = "gemma"
    chatml = "chatml"
    mistral = "mistral"
    plain = "plain"


class InputFormat(str, Enum):
    pab = "pab"
    papb = "papb"


class Quantization(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"
    int8 = "int8"
    none = "none"


class ComputeDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Attention(str, Enum):
    auto = "auto"
    eager = "eager"
    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"
    flex_attention = "flex_attention"


class FineTune(str, Enum):
    lora = "lora"  # frozen (quantized) backbone + LoRA adapters + head
    full = "full"  # every backbone weight trains (unquantized); the checkpoint holds the whole backbone


class HeadType(str, Enum):
    linear = "linear"
    mlp = "mlp"


class HeadInit(str, Enum):
    normal = "normal"
    zeros = "zeros"
    torch_default = "torch_default"


class SwapMode(str, Enum):
    none = "none"
    random = "random"
    full = "full"


class PaddingSide(str, Enum):
    left = "left"
    right = "right"


class OptimizerName(str, Enum):
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"


class TtaMode(str, Enum):
    prob = "prob"
    logit = "logit"


@dataclass
class ModelConfig:
    path: str = MISSING  # local directory with config.json, weights and tokenizer
    name: str = ""  # the hub name it came from, for the record
    family: Family = MISSING
    template: Template = Template.auto
    max_length: int = 512
    quantization: Quantization = Quantization.nf4
    double_quant: bool = True
    compute_dtype: ComputeDtype = ComputeDtype.auto  # auto: bfloat16 on GPU, float32 on CPU
    attn_implementation: Attention = Attention.auto  # auto: the family's packing-exact kernel
    head: HeadType = HeadType.linear
    head_dropout: float = 0.0
    head_init: HeadInit = HeadInit.normal
    head_init_std: float = 0.02
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    trust_remote_code: bool = False
    finetune: FineTune = FineTune.lora  # full: no LoRA (the lora section is ignored), e.g. with conf/accelerate/fsdp_full.yaml

    def __post_init__(self) -> None:
        _require(self.finetune == FineTune.lora or self.quantization == Quantization.none,
                 "model.finetune=full trains every weight: it needs model.quantization=none")
        _require(self.max_length >= 32, "model.max_length must be at least 32")
        _require(0.0 <= self.head_dropout < 1.0, "model.head_dropout must be in [0, 1)")
        _require(self.head_init_std > 0, "model.head_init_std must be positive")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_dora: bool = False

    def __post_init__(self) -> None:
        _require(self.r > 0 and self.alpha > 0, "lora.r and lora.alpha must be positive")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout must be in [0, 1)")
        _require(len(self.target_modules) > 0, "lora.target_modules must not be empty")


@dataclass
class DataConfig:
    train_path: str = MISSING
    valid_path: str | None = None  # without it: the `fold` column, else a prompt-grouped stratified split
    valid_fold: int | None = None
    valid_fraction: float = 0.1
    split_seed: int = 0
    max_train_pairs: int | None = None
    max_valid_pairs: int | None = None
    format: InputFormat = InputFormat.pab
    prompt_share: float = 0.2  # of the text budget; the responses share the rest equally
    keep_first_turns: int = 1  # over-long conversations keep the first k and last k turns
    keep_last_turns: int = 1
    head_fraction: float = 0.5  # an over-long text keeps this share of its budget from its start, the rest from its end
    padding_side: PaddingSide = PaddingSide.left

    def __post_init__(self) -> None:
        _require(0.0 < self.valid_fraction < 1.0, "data.valid_fraction must be in (0, 1)")
        _require(0.0 < self.prompt_share < 1.0, "data.prompt_share must be in (0, 1)")
        _require(0.0 <= self.head_fraction <= 1.0, "data.head_fraction must be in [0, 1]")
        _require(self.keep_first_turns >= 1 and self.keep_last_turns >= 0, "data.keep_first_turns >= 1, keep_last_turns >= 0")


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-4
    head_lr: float = 1e-4
    lora_b_lr_multiplier: float = 1.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.02
    min_lr_ratio: float = 0.1  # cosine decays to this share of the peak

    def __post_init__(self) -> None:
        _require(self.lr > 0 and self.head_lr > 0, "optimizer.lr and optimizer.head_lr must be positive")
        _require(self.lora_b_lr_multiplier > 0, "optimizer.lora_b_lr_multiplier must be positive")
        _require(0.0 <= self.warmup_ratio < 1.0, "optimizer.warmup_ratio must be in [0, 1)")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio must be in [0, 1]")
        _require(len(self.betas) == 2, "optimizer.betas needs two values")


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    distill_temperature: float = 1.0  # soft targets from a teacher are sharpened/softened by 1/T before the loss

    def __post_init__(self) -> None:
        _require(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)")
        _require(self.distill_temperature > 0, "loss.distill_temperature must be positive")


@dataclass
class TrainerConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # caps the optimizer updates; 0 only evaluates the initial model
    batch_size: int = 4  # pairs per micro-batch (padded path)
    grad_accum: int = 1  # micro-batches per update: batch_size * grad_accum pairs per update
    packing: bool = True  # padding-free rows, position_ids restart per pair
    max_tokens: int = 4096  # token budget of a packed micro-batch
    row_tokens: int | None = None  # packed row width; None: model.max_length (raise it with flash attention)
    eval_max_tokens: int = 8192
    group_by_length: bool = True  # shuffle in length-sorted buckets (less padding, fuller token budgets)
    swap_augmentation: SwapMode = SwapMode.none
    max_grad_norm: float = 1.0
    eval_frequency: int = 0  # updates between evaluations; 0 evaluates only at the end
    patience: int | None = None  # evaluations without improvement before stopping
    eval_tta: bool = False
    tta_mode: TtaMode = TtaMode.prob
    log_frequency: int = 10
    state_frequency: int = 50  # updates between saves of the full training state (for resume=true); 0: never

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "trainer.epochs must be positive")
        _require(self.max_steps is None or self.max_steps >= 0, "trainer.max_steps must be >= 0")
        _require(self.batch_size >= 1 and self.grad_accum >= 1, "trainer.batch_size and grad_accum must be >= 1")
        _require(self.max_grad_norm > 0, "trainer.max_grad_norm must be positive")
        _require(self.eval_frequency >= 0, "trainer.eval_frequency must be >= 0")
        _require(self.state_frequency >= 0, "trainer.state_frequency must be >= 0")
        _require(self.eval_max_tokens > 0 and self.max_tokens > 0, "trainer.max_tokens and eval_max_tokens must be > 0")
        _require(self.patience is None or self.patience >= 1, "trainer.patience must be >= 1")


@dataclass
class WandbConfig:
    project: str = "lmsys"
    entity: str | None = None
    mode: str = "online"  # online, offline or disabled
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.mode in ("online", "offline", "disabled"), "wandb.mode must be online, offline or disabled")


BENCH_MODES = ("padded", "padded_grouped", "packed")


@dataclass
class BenchSettings:
    """Only read by `python -m lmsys.bench`."""

    n_pairs: int = 64
    warmup_updates: int = 1
    predict_batch_size: int = 8  # the padded, unsorted prediction loop it is compared with
    # padded: a typical padded loop (random order, batch_size pairs per micro-batch); padded_grouped: the same with
    # length-grouped order; packed: the framework's default (packing, token budgets, length-grouped order)
    modes: list[str] = field(default_factory=lambda: ["padded", "padded_grouped", "packed"])
    mode: str | None = None  # set by the bench for its child processes
    profile: bool = False  # print the top operators of one packed training update

    def __post_init__(self) -> None:
        _require(self.n_pairs >= 1 and self.warmup_updates >= 0, "bench.n_pairs >= 1 and bench.warmup_updates >= 0")
        _require(all(m in BENCH_MODES for m in self.modes), f"bench.modes: some of {', '.join(BENCH_MODES)}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    bench: BenchSettings = field(default_factory=BenchSettings)
    seed: int = 42
    use_wandb: bool = False
    overwrite: bool = False  # allow reusing a run dir that already holds a finished run
    resume: bool = False  # continue from the run dir's latest training state (a fresh start if there is none)

    def __post_init__(self) -> None:
        _require(
            self.model.max_length >= 64 or self.data.format == InputFormat.pab,
            "model.max_length must be at least 64 for the papb format",
        )
        _require(
            not self.trainer.packing or self.trainer.max_tokens >= self.model.max_length,
            "trainer.max_tokens must be at least model.max_length so that every pair fits a packed row",
        )
        _require(
            not self.trainer.packing or self.trainer.eval_max_tokens >= self.model.max_length,
            "trainer.eval_max_tokens must be at least model.max_length",
        )
        _require(not (self.resume and self.overwrite), "resume=true and overwrite=true contradict each other")


class ConfigError(ValueError):
    """A configuration value that breaks a rule the schema's types cannot express."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
