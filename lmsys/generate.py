"""Answer prompts with two different local models each, for unlabelled pairs to pseudo-label.

    python -m lmsys.generate prompts=FILE models=[M1,M2,...] output=pairs.parquet [max_new_tokens=256]
        [engine=hf|vllm] [seed=0] [sampling=greedy|sample] [temperature=0.7] [top_p=0.95] [batch_size=8]
        [max_prompt_tokens=2048] [template_fallback=false] [compute_dtype=auto] [overwrite=false]

The parquet (id, prompt, response_a, response_b as lists of turns, model_a, model_b, source=generated) is what
`python -m lmsys.pseudo_label data.test_path=pairs.parquet ...` labels. The work is lmsys/generation.py's
`run_generate`, imported once the arguments are checked (--help and a typo answer at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from lmsys.cli import run_command
from lmsys.config import ComputeDtype, choices, require

USAGE = __doc__ + """
Keys:
  prompts            .csv/.parquet with a `prompt` column (a JSON list of user turns, or plain text; ids from an
                     `id` column, else the row position), or .txt with one prompt per line
  models             two or more local model directories (config.json, weights, tokenizer); each prompt is answered
                     by two different ones, drawn per prompt from `seed`, in a random A/B order
  engine             hf: transformers generate, batched with left padding (CPU or GPU); vllm: needs vllm (GPU)
  sampling           greedy, or sample with temperature and top_p
  max_prompt_tokens  a longer rendered conversation keeps its last tokens (the end nearest the answer); at most
                     the model's positions less max_new_tokens
  template_fallback  false: a model without a chat template is refused; true: it gets 'User: ...' /
                     'Assistant:' plain text and its answer stops at the next 'User:'
Multi-turn prompts are answered turn by turn: turn k is generated after the model's own answers to turns 1..k-1.
"""


Engine, Sampling = choices("Engine", "hf vllm"), choices("Sampling", "greedy sample")


@dataclass
class GenerateConfig:
    prompts: str = MISSING
    models: list[str] = MISSING
    output: str = MISSING  # .parquet
    max_new_tokens: int = 256
    engine: Engine = Engine.hf
    seed: int = 0  # draws the model pairs and seeds sampling
    sampling: Sampling = Sampling.greedy
    temperature: float = 0.7  # sampling=sample only
    top_p: float = 0.95  # sampling=sample only
    batch_size: int = 8  # engine=hf: conversations per generate call
    max_prompt_tokens: int = 2048
    template_fallback: bool = False
    compute_dtype: ComputeDtype = ComputeDtype.auto  # engine=hf; auto: bfloat16 on GPU, float32 on CPU
    overwrite: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        require(len(self.models) >= 2, "models must name at least two model directories")
        names = [model_name(path) for path in self.models]
        require(len(set(names)) == len(names), f"models must have distinct directory names (they name model_a/"
                                                f"model_b), got {names}")
        require(self.output.endswith(".parquet"), "output must end in .parquet")
        require(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        require(self.temperature > 0, "temperature must be positive")
        require(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1")


def model_name(path: str) -> str:
    return Path(path).resolve().name


def main(argv: list[str] | None = None) -> Path:
    return run_command(GenerateConfig, USAGE, "lmsys.generation:run_generate", argv)


if __name__ == "__main__":
    main()
