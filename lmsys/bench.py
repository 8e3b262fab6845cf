"""Throughput benchmark: training updates and prediction (single pass and TTA), each mode in its own process (so that
peak RSS is its own), after a warm-up, against the matmul roofline of this machine. The modes (`bench.modes`, all by
default): `padded`, a typical padded loop (random order, a fixed number of pairs per micro-batch; prediction of the
file in its order, then of the swapped file); `padded_grouped`, the framework with packing off (length-grouped
order, sorted prediction); `packed`, the framework's default; `hf_trainer_typical` and `hf_trainer_strong`, the HF
Trainer peer (lmsys/bench_peer.py). The roofline (lmsys/roofline.py): the matmul rate of the model's projections in
each mode's compute dtype, over 4 x the projection weights a trained token (6 x with gradient checkpointing).

    python -m lmsys.bench --config-name conf_r_llama_smol data.train_path=FILE bench.n_pairs=64 [bench.repeats=3]

Each mode's roofline is the matmul rate measured in its own process just before and after its timed training (the
machine's speed drifts between minutes). With bench.repeats=N the modes run N interleaved rounds: the table shows
medians, then every round's values. Prints a table (packed over each baseline in the last columns, like for like,
and packed's TTA rate over each baseline's single pass in a row of its own) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator, PartialState
from hydra import compose, initialize_config_dir

from lmsys.cli import CommandError, command_errors
from lmsys.config import (
    PEER_MODES,
    Architecture,
    ComputeDtype,
    ConfigError,
    SwapMode,
    TrainConfig,
    register_configs,
    require,
    validated_config,
)
from lmsys.entry import config_errors
from lmsys.roofline import ProjectionShapes, Roofline, rate_around

if TYPE_CHECKING:
    from lmsys.data.dataset import EncodedSplit

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RESULT_MARKER = "BENCH_RESULT "


def load_config(config_name: str, overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = validated_config(compose(config_name=config_name, overrides=overrides))
    peers = [mode for mode in config.bench.modes if mode in PEER_MODES]
    # the peer is AutoModelForSequenceClassification on one sequence per pair: no bi-encoder to compare with
    require(config.model.architecture == Architecture.cross_encoder or not peers,
            f"bench.modes: {', '.join(peers)} (the HF Trainer peer) is a cross-encoder; with "
            f"model.architecture=bi_encoder pass bench.modes=[padded,padded_grouped,packed]")
    from lmsys.modeling.families import FAMILIES

    require(not FAMILIES[config.model.family].encoder or "packed" not in config.bench.modes,
            f"bench.modes: packed; the {config.model.family.value} family is an encoder, whose bidirectional "
            f"attention cannot be packed: pass bench.modes=[padded,padded_grouped]")
    return config


def measure(config: TrainConfig, mode: str) -> dict:
    """Train over the pairs once (after warm-up updates) and predict them, in a single pass and with TTA, in one
    batching mode."""
    from lmsys import builders
    from lmsys.data.dataset import encode_split
    from lmsys.data.io import read_pairs
    from lmsys.modeling.backbone import resolve_dtype

    packed = mode == "packed"
    # Every mode trains the same examples: one orientation per pair, whatever the config's swap augmentation.
    trainer = replace(config.trainer, packing=packed, group_by_length=mode != "padded", swap_augmentation=SwapMode.none)
    config = replace(config, trainer=trainer)
    pairs = read_pairs(config.data.train_path, require_labels=True)[: config.bench.n_pairs]
    spec = builders.build_spec(config.model, config.data, packing=packed)
    tokenizer = builders.build_tokenizer(config.model.path, config.model.trust_remote_code)
    split = encode_split(pairs, builders.build_encoders(spec, tokenizer))
    accelerator = Accelerator()
    model = builders.build_model(spec, config.model, config.lora, accelerator.device)
    dtype = resolve_dtype(spec.compute_dtype, accelerator.device, spec.base_model_path)
    train, gflops = rate_around(lambda: _time_training(config, spec, split, model, accelerator, tokenizer.pad_token_id),
                                ProjectionShapes.from_model_dir(config.model.path), dtype,
                                config.bench.roofline_tokens, accelerator.device)
    predict = _time_prediction(config, spec, split, model, accelerator, tokenizer.pad_token_id, mode)
    return {**train, **predict, "train_matmul_gflops": gflops,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "gradient_checkpointing": config.model.gradient_checkpointing,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0}


def _time_training(config, spec, split, model, accelerator, pad_id) -> dict:
    """Updates of the run's own plan (the same pairs per update in every mode) through the recipe's `update`."""
    from lmsys import builders
    from lmsys.data.batching import collate
    from lmsys.training.plan import epoch_plan
    from lmsys.training.recipe import TrainingRecipe

    settings = builders.build_loop_settings(config, spec, len(split), 1, pad_id)
    optimizer = builders.build_optimizer(config.optimizer, model)
    scheduler = builders.build_scheduler(config.optimizer, optimizer, settings.total_updates)
    recipe = TrainingRecipe(accelerator, model, optimizer, scheduler, settings, split,
                            grad_scaler=builders.build_grad_scaler(config.model, accelerator.device))
    warmup, timed = epoch_plan(split, 1, settings, 0, 1), epoch_plan(split, 0, settings, 0, 1)
    model.train()
    for update in warmup[: config.bench.warmup_updates]:
        recipe.update(update)
    if config.bench.profile and settings.batching.packed:
        _profile(recipe.update, timed[0])
    start = time.perf_counter()
    for update in timed:
        recipe.update(update)
    seconds = time.perf_counter() - start
    batches = [collate(mb, settings.batching) for update in timed for mb in update.micro_batches]
    real_tokens = sum(b.n_real_tokens for b in batches)
    # the tokens the backbone computes: packed rows' pad tails are dropped first where the model does so
    computed = real_tokens if settings.batching.packed and getattr(model, "drops_pad_tails", False) else sum(
        b.input_ids.numel() for b in batches)
    return {"train_seconds": seconds, "train_updates": len(timed), "train_real_tokens": real_tokens,
            "train_real_tokens_per_s": real_tokens / seconds, "train_padding_share": 1.0 - real_tokens / computed}


def _time_prediction(config, spec, split, model, accelerator, pad_id, mode: str) -> dict:
    """A single pass (the pairs as they are) and a TTA pass (both orientations), each timed on its own.
    packed / padded_grouped: the predict command's path (sorted, token budgets, adapter folded into dense weights on
    CPU; with TTA, swap trees where packed) with and without packing.
    padded: the usual loop, the file in its order in batches of `bench.predict_batch_size` pairs (with TTA, then
    the swapped file the same way)."""
    from lmsys import builders
    from lmsys.data.batching import collate, micro_batches
    from lmsys.evaluation.predict_loop import predict_split
    from lmsys.modeling.backbone import fold_into_dense
    from lmsys.prediction import use_dense_weights

    batching = replace(builders.build_eval_batching(config, spec, pad_id), batch_size=config.bench.predict_batch_size)
    if mode != "padded" and use_dense_weights(None, accelerator.device):
        fold_into_dense(model)  # what the predict command does by default, as it loads the model (not timed)

    def predict(pairs: EncodedSplit, tta: bool) -> float:
        start = time.perf_counter()
        if mode == "padded":
            model.eval()
            with torch.inference_mode():
                for group in micro_batches(pairs.forward + pairs.swapped if tta else pairs.forward, batching):
                    model(**collate(group, batching).model_inputs(accelerator.device))
        else:
            predict_split(model, pairs, tta, batching, accelerator, show_progress=False)
        return time.perf_counter() - start

    if config.bench.warmup_pairs:  # untimed: compiles the inference graphs
        for tta in (False, True):
            predict(first_pairs(split, config.bench.warmup_pairs), tta)
    single, both = predict(split, False), predict(split, True)
    return {"predict_single_seconds": single, "predict_single_pairs_per_s": len(split) / single,
            "predict_seconds": both, "predict_pairs_per_s": len(split) / both}


def first_pairs(split: EncodedSplit, n: int) -> EncodedSplit:
    """The split's first n pairs, in every format and orientation."""
    return replace(split, pairs=split.pairs[:n], forward_by_format=[f[:n] for f in split.forward_by_format],
                   swapped_by_format=[f[:n] for f in split.swapped_by_format], prompt_tokens=split.prompt_tokens[:n])


def _profile(step, update) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(update)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)


def run_child(config_name: str, overrides: list[str], mode: str) -> dict:
    command = [sys.executable, "-m", "lmsys.bench", "--config-name", config_name, *overrides, f"bench.mode={mode}"]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    if done.returncode == 2 and said:  # the child's own one-line error (bad input it found)
        raise CommandError(f"bench mode {mode}: {said[-1].removeprefix('error: ')}")
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench child for {mode} failed:\n{done.stderr[-3000:]}")
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith(RESULT_MARKER)), flush=True)
    return json.loads(lines[-1][len(RESULT_MARKER):])


ROWS = [("train real tokens/s", "train_real_tokens_per_s", 1), ("matmul GFLOP/s (during)", "train_matmul_gflops", 1),
        ("roofline tokens/s", "train_roofline_tokens_per_s", 1),
        ("% of roofline", "train_roofline_fraction", 100), ("train seconds", "train_seconds", 1),
        ("train padding share %", "train_padding_share", 100), ("predict pairs/s (TTA)", "predict_pairs_per_s", 1),
        ("predict pairs/s (1 pass)", "predict_single_pairs_per_s", 1), ("predict seconds (TTA)", "predict_seconds", 1),
        ("peak RSS MB", "peak_rss_mb", 1)]
# a row of ratios only, after the 1-pass row: packed's TTA rate over each baseline's single pass (what TTA costs
# against a baseline that predicts each pair once)
TTA_OVER_SINGLE = "packed TTA / their 1 pass"
BASELINES = ("padded", "hf_trainer_typical", "hf_trainer_strong")  # what packed is compared with, a column each
JSON_KEYS = ("train_real_tokens_per_s", "train_roofline_fraction", "predict_pairs_per_s", "predict_single_pairs_per_s",
             "peak_rss_mb")


def add_roofline(results: dict[str, dict], roofline: Roofline) -> None:
    """Each mode's limit at the matmul rate measured around its own training, in its own compute dtype (x 6/4 with
    gradient checkpointing), and its fraction of it."""
    for result in results.values():
        limit = roofline.limit(result["train_matmul_gflops"], result["gradient_checkpointing"])
        result["train_roofline_tokens_per_s"] = limit
        result["train_roofline_fraction"] = result["train_real_tokens_per_s"] / limit


def mean_rates(results: dict[str, dict]) -> dict[str, float]:
    """dtype name -> the mean matmul rate of the modes that computed in it."""
    rates: dict[str, list[float]] = {}
    for result in results.values():
        rates.setdefault(result["compute_dtype"], []).append(result["train_matmul_gflops"])
    return {name: statistics.fmean(values) for name, values in rates.items()}


def report(results: dict[str, dict], config: TrainConfig, roofline: Roofline) -> dict:
    """The table (each mode a column, then packed over each baseline, like for like; after the 1-pass row, packed's
    TTA rate over each baseline's single pass) and the values of the JSON line."""
    modes = list(results)
    baselines = [m for m in BASELINES if m in results and "packed" in results]
    width = max(14, *(len(m) for m in modes))
    print(f"\n{config.bench.n_pairs} pairs of {config.data.train_path}, max_length {config.model.max_length}, "
          f"{config.trainer.batch_size * config.trainer.grad_accum} pairs/update (padded: {config.trainer.batch_size} "
          f"per micro-batch; packed: {config.trainer.max_tokens} tokens per micro-batch), "
          f"torch threads {torch.get_num_threads()}")
    gflops = mean_rates(results)
    print(roofline.describe(gflops))
    print(f"| {'metric':<26} | " + " | ".join(f"{m:>{width}}" for m in modes) + " | "
          + " | ".join(f"packed/{m}" for m in baselines) + " |")
    print(f"|{'-' * 28}|" + "|".join("-" * (width + 2) for _ in modes) + "|"
          + "|".join("-" * (len(m) + 9) for m in baselines) + "|")
    dtypes = [results[m]["compute_dtype"] + (" +ckpt" if results[m]["gradient_checkpointing"] else "") for m in modes]
    _print_row("compute dtype", [f"{d:>{width}}" for d in dtypes], [" " * (len(m) + 7) for m in baselines])
    for label, key, scale in ROWS:
        cells = [results[m][key] for m in modes]
        digits = 2 if max(c * scale for c in cells) < 10 else 1
        _print_row(label, [_cell(c, scale, digits, width) for c in cells],
                   [_cell(_ratio(results, key, key, m), 1, 2, len(m) + 7) for m in baselines])
        if key == "predict_single_pairs_per_s" and baselines:
            _print_row(TTA_OVER_SINGLE, [_cell(None, 1, 2, width) for _ in modes],
                       [_cell(_ratio(results, "predict_pairs_per_s", key, m), 1, 2, len(m) + 7) for m in baselines])
    values = {f"{key}_{mode}": round(results[mode][key], 3) for mode in modes for key in JSON_KEYS}
    return {**values, **{f"matmul_gflops_{name}": round(rate, 1) for name, rate in gflops.items()}}


def _print_row(label: str, cells: list[str], ratios: list[str]) -> None:
    print(f"| {label:<26} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


def _ratio(results: dict[str, dict], ours: str, theirs: str, baseline: str) -> float | None:
    """packed's `ours` over the baseline's `theirs` (None where that is 0, e.g. a padding share)."""
    denominator = results[baseline][theirs]
    return results["packed"][ours] / denominator if denominator else None


def _cell(value: float | None, scale: float, digits: int, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value * scale:>{width}.{digits}f}"


def refresh_dtype_probe(config: TrainConfig, device: torch.device) -> None:
    """Probe fp32 against bf16 anew (and cache it) before the modes start, so that every mode's compute_dtype=auto
    reads a choice made on the machine as it is now."""
    from lmsys.modeling.compute_dtype import auto_dtype

    if device.type == "cpu" and ComputeDtype.auto in (config.model.compute_dtype, config.bench.peer_dtype):
        auto_dtype(device, config.model.path, refresh=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", required=True)
    args, overrides = parser.parse_known_args(argv)
    with command_errors(), config_errors():  # a typo, a wrong type, a broken rule: one `error:` line, exit 2
        config = load_config(args.config_name, overrides)
    if config.bench.mode:
        if config.bench.mode in PEER_MODES:
            from lmsys.bench_peer import measure_peer as measure_mode  # transformers' Trainer: only its children
        else:
            measure_mode = measure
        print(RESULT_MARKER + json.dumps(measure_mode(config, config.bench.mode)), flush=True)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with command_errors():
        check_pairs(config)  # before any child: a bad file is said once, not by each mode's process
    device = PartialState().device
    refresh_dtype_probe(config, device)
    with command_errors():
        rounds = [{mode: run_child(args.config_name, overrides, mode) for mode in config.bench.modes}
                  for _ in range(config.bench.repeats)]  # interleaved: each round runs every mode once
    roofline = Roofline(ProjectionShapes.from_model_dir(config.model.path), config.bench.roofline_tokens,
                        torch.get_num_threads())
    for results in rounds:
        add_roofline(results, roofline)
    results = {mode: median_result([results[mode] for results in rounds]) for mode in config.bench.modes}
    summary = report(results, config, roofline)
    if len(rounds) > 1:
        print_rounds(rounds)
    print(json.dumps(summary))


def check_pairs(config: TrainConfig) -> None:
    """The training file read and checked as every mode reads it, holding at least bench.n_pairs pairs."""
    from lmsys.data.io import read_pairs

    held = len(read_pairs(config.data.train_path, require_labels=True))
    if held < config.bench.n_pairs:
        raise ConfigError(f"bench.n_pairs={config.bench.n_pairs}, but data.train_path={config.data.train_path} holds "
                          f"{held} pairs")


def median_result(results: list[dict]) -> dict:
    """Each number the median over the rounds (a mode's other fields are the same in every round)."""
    first = results[0]
    return {key: statistics.median(r[key] for r in results)
            if isinstance(value, float | int) and not isinstance(value, bool) else value
            for key, value in first.items()}


def print_rounds(rounds: list[dict[str, dict]]) -> None:
    """The spread: every round's training tokens/s, fraction of the roofline and prediction pairs/s per mode, and
    packed over each baseline within the same round (the runs closest in time)."""
    print(f"\n{len(rounds)} rounds (each cell above is the median):")
    for key, label, scale in (("train_real_tokens_per_s", "train real tokens/s", 1),
                              ("train_roofline_fraction", "% of roofline", 100),
                              ("predict_pairs_per_s", "predict pairs/s (TTA)", 1),
                              ("predict_single_pairs_per_s", "predict pairs/s (1 pass)", 1)):
        for mode in rounds[0]:
            print(f"  {label} {mode}: " + ", ".join(f"{r[mode][key] * scale:.2f}" for r in rounds))
    for baseline in (m for m in BASELINES if m in rounds[0] and "packed" in rounds[0]):
        for label, ours, theirs in ((f"train packed/{baseline}", "train_real_tokens_per_s", "train_real_tokens_per_s"),
                                    (f"packed TTA/{baseline} 1 pass", "predict_pairs_per_s",
                                     "predict_single_pairs_per_s")):
            ratios = [r["packed"][ours] / r[baseline][theirs] for r in rounds]
            print(f"  {label}: " + ", ".join(f"{x:.2f}" for x in ratios) + f" (median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
