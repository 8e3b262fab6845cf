"""Will the Kaggle notebook finish? Time a sample of the test file on this machine and project the full run.

    python -m lmsys.kaggle estimate checkpoint=CKPT data.test_path=FILE [rows=25000] [limit_hours=9] [sample=64]
        [warmup=8] [processes=1] [quantization=...] [compute_dtype=...] [max_length=...] (any lmsys.predict setting)

Run it where the notebook will run (a Kaggle T4 session with the bundle), with the settings it will use. It
loads the model (timed), predicts `warmup` pairs (not timed: first-call allocations, kernel selection), then
times the (A, B) pass over `sample` pairs drawn from the file (seeded), and prints projected hours with and
without swap TTA and the largest `max_length` whose projection with TTA (and without) fits `limit_hours`.

The cost model. A pair of n tokens costs n * (1 + n / w) units, w being the model's attention width
(lmsys.modeling.families.attention_width: projections are linear in the tokens, sdpa/eager attention quadratic
in the row width; flash/flex attention: w = infinity). The measured pass gives seconds per unit; a full run costs
load + rows * (tokenize per pair + units per pair * seconds per unit) / processes, where units per pair is the
sample's mean at the checkpoint's max_length, or at another max_length L from the sample re-encoded (truncated)
at L. TTA runs the same lengths a second time, so its prediction part is twice the no-TTA one: so it is on GPU;
on CPU, where `share_prefixes` computes a pair's shared prefix once, a TTA pass costs less and the projection is an
upper bound. `processes`: the rows are dealt to that many data-parallel processes (two T4s: 2), each loading its
own model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass

from accelerate import Accelerator
from omegaconf import MISSING

from lmsys.builders import build_encoders, build_inference_batching, build_prediction_spec, build_tokenizer
from lmsys.cli import run_command
from lmsys.config import ConfigError, require
from lmsys.data.dataset import encode_split
from lmsys.data.io import read_pairs
from lmsys.evaluation.predict_loop import predict_split
from lmsys.logs import setup_logging
from lmsys.modeling.checkpoint import ModelSpec
from lmsys.modeling.model_facts import position_limit
from lmsys.prediction import load_prediction_model
from lmsys.prediction_config import InferenceConfig

log = logging.getLogger("lmsys")
LENGTH_STEP = 128  # max_length candidates are multiples of this
NO_POSITION_LIMIT = 8192  # the longest candidate for a model without one (DeBERTa-v3's relative positions)


@dataclass
class EstimateConfig(InferenceConfig):
    checkpoint: str = MISSING
    rows: int = 25000  # rows of the hidden test set (LMSYS: ~25k)
    limit_hours: float = 9.0  # Kaggle's notebook limit
    sample: int = 64  # pairs timed
    warmup: int = 8  # pairs predicted first, not timed
    processes: int = 1  # data-parallel processes on the target (Kaggle's 2x T4: 2)
    seed: int = 0  # of the sample

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rows >= 1 and self.sample >= 1 and self.warmup >= 0 and self.processes >= 1,
                 "rows, sample and processes must be >= 1, warmup >= 0")
        require(self.limit_hours > 0, "limit_hours must be > 0")


@dataclass(frozen=True)
class Measurement:
    load_seconds: float  # model load, once per process
    tokenize_seconds_per_pair: float
    predict_seconds: float  # the timed (A, B) pass over the sample
    sample_units: float  # sum over the sample of n * (1 + n / w) at the measured max_length
    measured_max_length: int


def pair_units(lengths: list[int], width: float | None) -> float:
    """Sum of n * (1 + n / w) over the sequences' token counts (one per pair; a bi-encoder's two), w None: attention
    is free of the row width."""
    return float(sum(n * (1 + (n / width if width else 0.0)) for n in lengths))


def projected_hours(measurement: Measurement, units_per_pair: float, rows: int, processes: int, tta: bool) -> float:
    seconds_per_unit = measurement.predict_seconds / measurement.sample_units
    per_pair = measurement.tokenize_seconds_per_pair + units_per_pair * seconds_per_unit * (2 if tta else 1)
    return (measurement.load_seconds + rows * per_pair / processes) / 3600


def largest_fitting_length(
    measurement: Measurement, units_at: dict[int, float], rows: int, processes: int, limit_hours: float, tta: bool
) -> int | None:
    """The largest candidate max_length whose projection fits; None when even the smallest does not."""
    fitting = [length for length, units in sorted(units_at.items())
               if projected_hours(measurement, units, rows, processes, tta) <= limit_hours]
    return fitting[-1] if fitting else None


def measure(config: EstimateConfig, spec: ModelSpec, sample, warm, accelerator: Accelerator):
    """Time the load, the tokenization and the (A, B) pass over the sample (after the warm-up pairs)."""
    tokenizer = build_tokenizer(config.checkpoint, spec.trust_remote_code)
    start = time.perf_counter()
    model = load_prediction_model(config.checkpoint, spec, config, accelerator)
    load_seconds = time.perf_counter() - start
    encoders = build_encoders(spec, tokenizer)
    start = time.perf_counter()
    split = encode_split(sample, encoders)
    tokenize_seconds = time.perf_counter() - start
    batching = build_inference_batching(config, spec, tokenizer.pad_token_id)
    if warm:
        predict_split(model, encode_split(warm, encoders), False, batching, accelerator, False)
    start = time.perf_counter()
    predict_split(model, split, False, batching, accelerator, False)  # logits come back to the CPU: synchronised
    predict_seconds = time.perf_counter() - start
    width = spec.attention_width
    measurement = Measurement(load_seconds, tokenize_seconds / len(sample), predict_seconds,
                              pair_units([len(s) for ex in split.forward for s in ex.sequences()], width),
                              spec.max_length)
    return measurement, tokenizer


def units_at_length(spec: ModelSpec, tokenizer, tokens, width: float | None, length: int) -> tuple[float, int]:
    """Mean units per pair of the (pre-tokenized) sample truncated at `length`, and its longest sequence (a
    bi-encoder reads two per pair, each costing its own square)."""
    encoder = build_encoders(dataclasses.replace(spec, max_length=length), tokenizer)[0]
    lengths = [len(ids) for pair_tokens in tokens for ids in encoder.sequences(pair_tokens, swapped=False)]
    return pair_units(lengths, width) / len(tokens), max(lengths)


def units_by_max_length(spec: ModelSpec, tokenizer, tokens, width: float | None,
                        limit: int) -> tuple[dict[int, float], int | None]:
    """Mean units per pair at each candidate max_length: multiples of LENGTH_STEP within the model's positions, up
    to the first at which no sample pair is truncated (a longer one costs the same), which is returned too (None:
    pairs are still truncated at the model's limit)."""
    units = {}
    for length in range(LENGTH_STEP, limit + 1, LENGTH_STEP):
        units[length], longest = units_at_length(spec, tokenizer, tokens, width, length)
        if longest < length:
            return units, length
    return units, None


def estimate(config: EstimateConfig) -> dict:
    accelerator = Accelerator()
    setup_logging(accelerator.is_main_process)
    if accelerator.num_processes > 1:  # each would time its share of the sample, then divide by processes again
        raise ConfigError(f"estimate runs in one process (launched with {accelerator.num_processes}): it times one "
                          f"process and projects several with processes=N")
    pairs = read_pairs(config.data.test_path, require_labels=False)
    spec = build_prediction_spec(config.checkpoint, config)  # the checkpoint and base checked before loading
    shuffled = random.Random(config.seed).sample(pairs, len(pairs))
    sample = shuffled[: config.sample]
    warm = (shuffled[config.sample :] or sample)[: config.warmup]
    measurement, tokenizer = measure(config, spec, sample, warm, accelerator)
    width = spec.attention_width
    tokens = build_encoders(spec, tokenizer)[0].tokenize(sample)
    units = units_at_length(spec, tokenizer, tokens, width, spec.max_length)[0]
    limit = position_limit(spec.model_dir(config.checkpoint)) or NO_POSITION_LIMIT
    units_at, untruncated = units_by_max_length(spec, tokenizer, tokens, width, limit)
    hours = {tta: projected_hours(measurement, units, config.rows, config.processes, tta) for tta in (False, True)}
    largest = {tta: largest_fitting_length(measurement, units_at, config.rows, config.processes, config.limit_hours,
                                           tta) for tta in (False, True)}
    return {
        "rows": config.rows, "limit_hours": config.limit_hours, "processes": config.processes,
        "sample": len(sample), "max_length": spec.max_length, "load_seconds": round(measurement.load_seconds, 2),
        "sample_pairs_per_second": round(len(sample) / measurement.predict_seconds, 3),
        "hours_no_tta": round(hours[False], 4), "hours_tta": round(hours[True], 4),
        "fits_no_tta": hours[False] <= config.limit_hours, "fits_tta": hours[True] <= config.limit_hours,
        "largest_max_length_no_tta": largest[False], "largest_max_length_tta": largest[True],
        "untruncated_max_length": untruncated,  # no sample pair is cut at this max_length (None: at none)
    }


def report_lines(result: dict) -> list[str]:
    def fit(tta: bool) -> str:
        key = "tta" if tta else "no_tta"
        length = result[f"largest_max_length_{key}"]
        return (f"{result[f'hours_{key}']:.2f} h ({'fits' if result[f'fits_{key}'] else 'does NOT fit'} "
                f"{result['limit_hours']} h); largest max_length that fits: {length if length else 'none'}")

    return [(f"{result['rows']} rows on {result['processes']} process(es) at max_length {result['max_length']}, "
            f"from {result['sample']} timed pairs ({result['sample_pairs_per_second']} pairs/s, model load "
            f"{result['load_seconds']} s):"),
            f"  without TTA: {fit(False)}", f"  with TTA:    {fit(True)}",
            f"  (no sample pair is truncated from max_length {result['untruncated_max_length']} on: a larger one "
            "costs the same)"
            if result["untruncated_max_length"] else "  (some sample pairs are truncated at every max_length)",
            json.dumps(result)]


USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> dict:
    return run_command(EstimateConfig, USAGE, run_estimate, argv)


def run_estimate(config: EstimateConfig) -> dict:
    result = estimate(config)
    print("\n".join(report_lines(result)))
    return result


if __name__ == "__main__":
    main()
