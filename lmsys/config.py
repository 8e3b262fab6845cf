"""The one schema every YAML file and command-line override is validated against.

`TrainConfig` is stored in Hydra's ConfigStore as `train_schema` and listed first in every experiment's defaults
list, so an unknown key, a wrong type or a typo fails while composing, before any model is loaded.
Cross-field rules live in `__post_init__`; `OmegaConf.to_object` runs them once at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


def choices(name: str, values: str) -> type[Enum]:
    """A str Enum whose members are named as their values: OmegaConf checks a value against them and names them
    in its error (it rejects `Literal`)."""
    return Enum(name, [(value, value) for value in values.split()], type=str, module=__name__, qualname=name)


# deberta: the encoder family (model_type deberta-v2: DeBERTa-v3 and mDeBERTa), padded batches only
Family = choices("Family", "llama gemma qwen mistral deberta")
# sep: the encoders' layout, [CLS] prompt [SEP] A [SEP] B [SEP] with the tokenizer's own cls/sep tokens
Template = choices("Template", "auto llama3 gemma chatml mistral plain sep")
Quantization = choices("Quantization", "nf4 fp4 int8 none")
ComputeDtype = choices("ComputeDtype", "auto float32 bfloat16 float16")
Attention = choices("Attention", "auto eager sdpa flash_attention_2 flex_attention")
HeadType, HeadInit = choices("HeadType", "linear mlp"), choices("HeadInit", "normal zeros torch_default")
# lora: frozen (quantized) backbone + LoRA + head; full: every backbone weight trains (unquantized), the
# checkpoint holds the whole backbone
FineTune = choices("FineTune", "lora full")
# cross_encoder: one sequence holds the prompt and both responses; bi_encoder: the shared backbone reads (prompt, A)
# and (prompt, B) as two sequences, and a swap-equivariant head compares the two pooled states
Architecture = choices("Architecture", "cross_encoder bi_encoder")
# how a LoRA projection computes (lmsys/modeling/lora_kernel.py): peft's layer, or the base dequantized once and one
# fused autograd function; auto: dense on CPU, peft on GPU
LoraKernel = choices("LoraKernel", "auto peft dense")
# how the elementwise work of RMSNorm modules (model.norm_kernel: lmsys/modeling/compile.py), of gated MLPs'
# activations (model.mlp_kernel: lmsys/modeling/gated_mlp.py) and bf16 training attention (model.attention_kernel:
# lmsys/modeling/attention.py) runs: eager, or compiled into generated loops forward and backward; auto: compiled
# for bf16 on CPU (where it measured faster), eager elsewhere
ElementwiseKernel = choices("ElementwiseKernel", "auto eager compiled")
ELEMENTWISE_OPTIONS = ("norm_kernel", "mlp_kernel", "attention_kernel")  # the model options of that choice


@dataclass
class ModelConfig:
    path: str = MISSING  # local directory with config.json, weights and tokenizer
    name: str = ""  # the hub name it came from, for the record
    family: Family = MISSING
    template: Template = Template.auto
    max_length: int = 512
    quantization: Quantization = Quantization.nf4
    double_quant: bool = True
    compute_dtype: ComputeDtype = ComputeDtype.auto  # auto: bf16 on GPU; on CPU the faster of fp32/bf16 (measured)
    attn_implementation: Attention = Attention.auto  # auto: the family's packing-exact kernel
    head: HeadType = HeadType.linear
    head_dropout: float = 0.0
    head_init: HeadInit = HeadInit.normal
    head_init_std: float = 0.02
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    lora_kernel: LoraKernel = LoraKernel.auto  # dense: base dequantized once + fused LoRA (CPU default); peft
    norm_kernel: ElementwiseKernel = ElementwiseKernel.auto  # compiled: RMSNorm by torch.compile (bf16 CPU default)
    mlp_kernel: ElementwiseKernel = ElementwiseKernel.auto  # compiled: act(gate) * up by torch.compile (bf16 CPU default)
    attention_kernel: ElementwiseKernel = ElementwiseKernel.auto  # compiled: bf16 CPU training attention compiled (default)
    trust_remote_code: bool = False
    num_classes: int = 3  # 3: A, B, tie (LMSYS); 2: A, B (WSDM Cup, no ties; see data.ties)
    init_from: str | None = None  # an earlier run's checkpoint/: start from its adapter and head (a warm start)
    finetune: FineTune = FineTune.lora  # full: no LoRA (the lora section is ignored), e.g. with conf/accelerate/fsdp_full.yaml
    architecture: Architecture = Architecture.cross_encoder  # bi_encoder: max_length holds for each of the 2 sequences

    @property
    def sequences_per_pair(self) -> int:
        return 2 if self.architecture == Architecture.bi_encoder else 1

    def __post_init__(self) -> None:
        require(self.finetune == FineTune.lora or self.quantization == Quantization.none,
                "model.finetune=full trains every weight: it needs model.quantization=none")
        # float16 weights would need float32 master copies to unscale their gradients into (loss scaling)
        require(self.finetune == FineTune.lora or self.compute_dtype != ComputeDtype.float16,
                "model.finetune=full with model.compute_dtype=float16 is not supported (float16 weights cannot take "
                "loss-scaled updates): use bfloat16 (Kahan-summed AdamW) or float32")
        require(self.num_classes in (2, 3), "model.num_classes must be 3 (A, B, tie) or 2 (A, B)")
        require(self.max_length >= 32, "model.max_length must be at least 32")
        require(0.0 <= self.head_dropout < 1.0, "model.head_dropout must be in [0, 1)")
        require(self.head_init_std > 0, "model.head_init_std must be positive")
        require(not (self.torch_compile and self.lora_kernel == LoraKernel.dense),
                "model.torch_compile=true compiles peft's LoRA layers: use model.lora_kernel=auto or peft with it")
        for option in ELEMENTWISE_OPTIONS:
            require(not (self.torch_compile and getattr(self, option) == ElementwiseKernel.compiled),
                    f"model.torch_compile=true compiles whole layers, their elementwise work too: use "
                    f"model.{option}=auto or eager")


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_dora: bool = False

    def __post_init__(self) -> None:
        require(self.r > 0 and self.alpha > 0, "lora.r and lora.alpha must be positive")
        require(0.0 <= self.dropout < 1.0, "lora.dropout must be in [0, 1)")
        require(len(self.target_modules) > 0, "lora.target_modules must not be empty")


InputFormat, PaddingSide = choices("InputFormat", "pab papb"), choices("PaddingSide", "left right")
# A two-class run and tied rows: error (name them), drop them (counted in the log), split (0.5 / 0.5 soft target)
Ties = choices("Ties", "error drop split")


@dataclass
class DataConfig:
    train_path: str = MISSING
    valid_path: str | None = None  # without it: the `fold` column, else a prompt-grouped stratified split
    valid_fold: int | None = None
    valid_fraction: float = 0.1
    split_seed: int = 0
    max_train_pairs: int | None = None
    max_valid_pairs: int | None = None
    # every pair is trained in each listed format within the same optimizer update (format augmentation), and
    # validation averages the formats' probabilities
    formats: list[InputFormat] = field(default_factory=lambda: [InputFormat.pab])
    prompt_share: float = 0.2  # of the text budget; the responses share the rest equally
    keep_first_turns: int = 1  # over-long conversations keep the first k and last k turns
    keep_last_turns: int = 1
    text_head_share: float = 0.5  # an over-long text keeps this share of its budget from its start, the rest from its end
    padding_side: PaddingSide = PaddingSide.left
    ties: Ties = Ties.error  # only read by two-class runs (model.num_classes=2)

    def __post_init__(self) -> None:
        require(0.0 < self.valid_fraction < 1.0, "data.valid_fraction must be in (0, 1)")
        require(0.0 < self.prompt_share < 1.0, "data.prompt_share must be in (0, 1)")
        require(0.0 <= self.text_head_share <= 1.0, "data.text_head_share must be in [0, 1]")
        require(self.keep_first_turns >= 1 and self.keep_last_turns >= 0, "data.keep_first_turns >= 1, keep_last_turns >= 0")
        for key in ("max_train_pairs", "max_valid_pairs"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"data.{key} must be >= 1 or unset (null), got {value}")
        require(len(self.formats) > 0, "data.formats must list at least one format (pab, papb)")
        require(len(set(self.formats)) == len(self.formats), f"data.formats lists a format twice: {list(self.formats)}")
        require(self.valid_fold is None or self.valid_fold >= 0, "data.valid_fold must be >= 0")
        # otherwise every job of a fold sweep would validate on the same file and train on all of data.train_path
        require(self.valid_fold is None or not self.valid_path,
                "data.valid_fold picks the validation rows of data.train_path by its 'fold' column; it cannot be "
                "combined with data.valid_path (pass data.valid_path=null)")


# stable_adamw: AdamW with per-tensor update clipping (torch-optimi's StableAdamW, used by the LMSYS 2nd place)
OptimizerName = choices("OptimizerName", "adamw adamw_8bit stable_adamw")


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
    # carry each update's rounding error into the next (torch-optimi): without it, weights stored in bf16 (full
    # fine-tuning in bf16) lose every update below half their rounding step; None: on exactly for such weights
    kahan_summation: bool | None = None

    def __post_init__(self) -> None:
        require(self.lr > 0 and self.head_lr > 0, "optimizer.lr and optimizer.head_lr must be positive")
        require(self.lora_b_lr_multiplier > 0, "optimizer.lora_b_lr_multiplier must be positive")
        require(0.0 <= self.warmup_ratio < 1.0, "optimizer.warmup_ratio must be in [0, 1)")
        require(0.0 <= self.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio must be in [0, 1]")
        require(len(self.betas) == 2 and all(0.0 <= beta < 1.0 for beta in self.betas),
                "optimizer.betas needs two values in [0, 1)")
        require(self.eps >= 0 and self.weight_decay >= 0, "optimizer.eps and optimizer.weight_decay must be >= 0")
        require(not (self.kahan_summation and self.name == OptimizerName.adamw_8bit),
                "optimizer.kahan_summation=true needs optimizer.name=adamw or stable_adamw (bitsandbytes' 8-bit "
                "AdamW keeps no compensation)")


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    distill_temperature: float = 1.0  # soft targets from a teacher are sharpened/softened by 1/T before the loss
    # (ce_weight * CE(labels) + kl_weight * T^2 KL(teacher || student, T = kl_temperature) + cosine_weight *
    # (1 - cos(p_student, p_teacher))) / (sum of the weights); KL and cosine need a `teacher_logits` column
    ce_weight: float = 1.0
    kl_weight: float = 0.0
    cosine_weight: float = 0.0
    kl_temperature: float = 1.0

    def __post_init__(self) -> None:
        require(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)")
        require(self.distill_temperature > 0, "loss.distill_temperature must be positive")
        require(self.kl_temperature > 0, "loss.kl_temperature must be positive")
        weights = (self.ce_weight, self.kl_weight, self.cosine_weight)
        require(min(weights) >= 0 and sum(weights) > 0, "loss weights must be >= 0 with a positive sum")


SwapMode, TtaMode = choices("SwapMode", "none random full"), choices("TtaMode", "prob logit")


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
    max_grad_norm: float | None = 1.0  # null: no clipping (as the LMSYS 2nd place trained); the norm is still logged
    eval_frequency: int = 0  # updates between evaluations; 0 evaluates only at the end
    patience: int | None = None  # evaluations without improvement before stopping
    eval_tta: bool = False
    tta_mode: TtaMode = TtaMode.prob
    log_frequency: int = 10
    state_frequency: int = 50  # updates between saves of the full training state (for resume=true); 0: never

    def __post_init__(self) -> None:
        require(self.epochs > 0, "trainer.epochs must be positive")
        require(self.max_steps is None or self.max_steps >= 0, "trainer.max_steps must be >= 0")
        require(self.batch_size >= 1 and self.grad_accum >= 1, "trainer.batch_size and grad_accum must be >= 1")
        require(self.max_grad_norm is None or self.max_grad_norm > 0,
                "trainer.max_grad_norm must be positive, or null for no clipping")
        require(self.eval_frequency >= 0, "trainer.eval_frequency must be >= 0")
        require(self.state_frequency >= 0, "trainer.state_frequency must be >= 0")
        require(self.log_frequency >= 1, "trainer.log_frequency must be >= 1")
        require(self.row_tokens is None or self.row_tokens >= 1, "trainer.row_tokens must be >= 1 or unset (null)")
        require(self.eval_max_tokens > 0 and self.max_tokens > 0, "trainer.max_tokens and eval_max_tokens must be > 0")
        require(self.patience is None or self.patience >= 1, "trainer.patience must be >= 1")


@dataclass
class WandbConfig:
    # an option left unset is wandb's environment variable's (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_NAME,
    # WANDB_TAGS, WANDB_DIR), else: project lmsys, mode online, the run dir's name, no tags, the run dir
    project: str | None = None
    entity: str | None = None
    mode: str | None = None  # online, offline or disabled
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.mode in (None, "online", "offline", "disabled"), "wandb.mode must be online, offline or disabled")


PEER_MODES = ("hf_trainer_typical", "hf_trainer_strong")  # the HF Trainer peer (lmsys/bench_peer.py)
BENCH_MODES = ("padded", "padded_grouped", "packed", *PEER_MODES)


@dataclass
class BenchConfig:
    """Only read by `python -m lmsys.bench`."""

    n_pairs: int = 64
    warmup_updates: int = 1
    # pairs predicted untimed before the timed prediction, in every mode (the peer's too): they compile the inference
    # graphs of the compiled kernels, as the warm-up updates do for training
    warmup_pairs: int = 16
    predict_batch_size: int = 8  # the padded, unsorted prediction loop it is compared with
    # padded: a typical padded loop (random order, batch_size pairs per micro-batch); padded_grouped: the same with
    # length-grouped order; packed: the framework's default (packing, token budgets, length-grouped order);
    # hf_trainer_typical / hf_trainer_strong: the HF Trainer peer (lmsys/bench_peer.py)
    modes: list[str] = field(default_factory=lambda: list(BENCH_MODES))
    mode: str | None = None  # set by the bench for its child processes
    profile: bool = False  # print the top operators of one packed training update
    # the HF Trainer peer's compute dtype; auto: the faster of fp32 and bf16 on this CPU (as model.compute_dtype=auto)
    peer_dtype: ComputeDtype = ComputeDtype.auto
    roofline_tokens: int = 512  # rows of the matmuls that measure the roofline (a micro-batch's tokens)
    repeats: int = 1  # rounds of all modes, interleaved; the table shows medians and the rounds their spread

    def __post_init__(self) -> None:
        require(self.n_pairs >= 1 and self.warmup_updates >= 0 and self.warmup_pairs >= 0,
                "bench.n_pairs >= 1, bench.warmup_updates >= 0 and bench.warmup_pairs >= 0")
        require(all(m in BENCH_MODES for m in self.modes) and 0 < len(set(self.modes)) == len(self.modes),
                f"bench.modes: one or more of {', '.join(BENCH_MODES)}, each once, got {self.modes}")
        require(self.roofline_tokens >= 1, "bench.roofline_tokens must be >= 1")
        require(self.repeats >= 1, "bench.repeats must be >= 1")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    seed: int = 42
    use_wandb: bool = False
    overwrite: bool = False  # allow reusing a run dir that already holds a finished run
    resume: bool = False  # continue from the run dir's latest training state (a fresh start if there is none)

    def __post_init__(self) -> None:
        require(
            self.model.max_length >= 64 or InputFormat.papb not in self.data.formats,
            "model.max_length must be at least 64 for the papb format",
        )
        # a bi-encoder pair is two sequences of up to model.max_length each, packed into the same row
        pair_tokens, twice = self.model.max_length * self.model.sequences_per_pair, _twice(self.model)
        require(
            not self.trainer.packing or self.trainer.max_tokens >= pair_tokens,
            f"trainer.max_tokens must be at least model.max_length{twice} so that every pair fits a packed row",
        )
        require(
            not self.trainer.packing or self.trainer.eval_max_tokens >= pair_tokens,
            f"trainer.eval_max_tokens must be at least model.max_length{twice}",
        )
        require(not (self.resume and self.overwrite), "resume=true and overwrite=true contradict each other")
        require(
            not (self.trainer.packing and self.model.family == Family.deberta),
            "model.family=deberta needs trainer.packing=false: an encoder's bidirectional attention has no "
            "packed layout in transformers (position_ids do not restart its relative-position attention)",
        )


def _twice(model: ModelConfig) -> str:
    return "" if model.sequences_per_pair == 1 else " x 2 (model.architecture=bi_encoder: two sequences per pair)"


class ConfigError(ValueError):
    """A configuration value that breaks a rule the schema's types cannot express."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def run_name(valid_fold: int | None, seed: int) -> str:
    """The name of a run's dir (and of its sweep subdir): `seed<s>`, or `fold<k>_seed<s>` when a fold of the
    training file validates, so that every job of a folds x seeds sweep gets its own dir. A pure function of the
    config: every process of a multi-GPU run computes the same name."""
    return f"seed{seed}" if valid_fold is None else f"fold{valid_fold}_seed{seed}"


def register_configs() -> None:
    """The schema, and the `run_name` resolver that conf/run_layout.yaml names run dirs with."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def validated_config(cfg: DictConfig) -> TrainConfig:
    """The schema-checked config object. Merging into the schema again also rejects keys added with `+key=`,
    which Hydra lets into the composed config and `OmegaConf.to_object` would silently drop."""
    checked = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg, resolve=True))
    check_list_items(checked)
    return OmegaConf.to_object(checked)


def check_list_items(config: DictConfig, prefix: str = "") -> None:
    """A list of settings holds plain values: OmegaConf lets `predict_args=[tta: false]` (a mapping, for
    `tta=false`) or `[[a]]` into a list of strings, where the command would fail with a traceback."""
    for key, value in config.items_ex(resolve=False):
        if isinstance(value, DictConfig) and not (value._is_none() or value._is_missing()):
            check_list_items(value, f"{prefix}{key}.")
        elif isinstance(value, ListConfig) and not (value._is_none() or value._is_missing()):
            nested = [item for item in value if isinstance(item, (DictConfig, ListConfig))]
            if nested:
                raise ConfigError(f"{prefix}{key}: a list of plain values, got {OmegaConf.to_container(nested[0])!r} "
                                  f"in it (a setting is written key=value, not key: value; quote an item holding "
                                  f"brackets)")
