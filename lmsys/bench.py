"""Throughput benchmark: training updates and TTA prediction, padded vs packed, each mode in its own process
(so that peak RSS is its own), after a warm-up. The modes (`bench.modes`): `padded`, a typical padded loop
(random order, a fixed number of pairs per micro-batch; prediction of the file in its order, then of the swapped
file); `padded_grouped`, the framework with packing off (length-grouped order, sorted prediction); `packed`, the
framework's default.

    python -m lmsys.bench --config-name conf_r_llama_smol data.train_path=FILE bench.n_pairs=64

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir

from lmsys.config import SwapMode, TrainConfig, register_configs, validated_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RESULT_MARKER = "BENCH_RESULT "


def load_config(config_name: str, overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validated_config(compose(config_name=config_name, overrides=overrides))


def measure(config: TrainConfig, mode: str) -> dict:
    """Train over the pairs once (after warm-up updates) and predict them with TTA, in one batching mode."""
    from lmsys import builders
    from lmsys.data.dataset import encode_split
    from lmsys.data.io import read_pairs

    packed = mode == "packed"
    # Every mode trains the same examples: one orientation per pair, whatever the config's swap augmentation.
    trainer = replace(config.trainer, packing=packed, group_by_length=mode != "padded", swap_augmentation=SwapMode.none)
    config = replace(config, trainer=trainer)
    pairs = read_pairs(config.data.train_path, require_labels=True)[: config.bench.n_pairs]
    spec = builders.build_spec(config.model, config.data, packing=packed)
    tokenizer = builders.build_tokenizer(config.model.path, config.model.trust_remote_code)
    split = encode_split(pairs, builders.build_encoder(spec, tokenizer))
    accelerator = Accelerator()
    model = builders.build_model(spec, config.model, config.lora, accelerator.device)
    train = _time_training(config, spec, split, model, accelerator, tokenizer.pad_token_id)
    predict = _time_prediction(config, spec, split, model, accelerator, tokenizer.pad_token_id, mode)
    return {**train, **predict, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _time_training(config, spec, split, model, accelerator, pad_id) -> dict:
    """Updates of the run's own plan (the same pairs per update in every mode) through the recipe's `update`."""
    from lmsys import builders
    from lmsys.data.batching import collate
    from lmsys.training.plan import epoch_plan
    from lmsys.training.recipe import TrainingRecipe

    settings = builders.build_loop_settings(config, spec, len(split), 1, pad_id)
    optimizer = builders.build_optimizer(config.optimizer, model)
    scheduler = builders.build_scheduler(config.optimizer, optimizer, settings.total_updates)
    recipe = TrainingRecipe(accelerator, model, optimizer, scheduler, settings, split)
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
    return {"train_seconds": seconds, "train_updates": len(timed), "train_real_tokens": real_tokens,
            "train_real_tokens_per_s": real_tokens / seconds,
            "train_padding_share": 1.0 - real_tokens / sum(b.input_ids.numel() for b in batches)}


def _time_prediction(config, spec, split, model, accelerator, pad_id, mode: str) -> dict:
    """packed / padded_grouped: the predict command's path (sorted, token budgets, adapter folded into dense
    weights on CPU) with and without packing.
    padded: the usual TTA loop, the file in its order in batches of `bench.predict_batch_size` pairs, then the
    swapped file the same way."""
    from lmsys import builders
    from lmsys.data.batching import collate, micro_batches
    from lmsys.evaluation.predict_loop import predict_split
    from lmsys.modeling.backbone import fold_into_dense
    from lmsys.predict import use_dense_weights

    batching = replace(builders.build_eval_batching(config, spec, pad_id), batch_size=config.bench.predict_batch_size)
    if mode != "padded" and use_dense_weights(None, accelerator.device):
        fold_into_dense(model)  # what the predict command does by default, as it loads the model (not timed)
    start = time.perf_counter()
    if mode == "padded":
        model.eval()
        with torch.inference_mode():
            for group in micro_batches(split.forward + split.swapped, batching):
                model(**collate(group, batching).model_inputs(accelerator.device))
    else:
        predict_split(model, split, True, batching, accelerator, show_progress=False)
    seconds = time.perf_counter() - start
    return {"predict_seconds": seconds, "predict_pairs_per_s": len(split) / seconds}


def _profile(step, update) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(update)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)


def run_child(config_name: str, overrides: list[str], mode: str) -> dict:
    command = [sys.executable, "-m", "lmsys.bench", "--config-name", config_name, *overrides, f"bench.mode={mode}"]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench child for {mode} failed:\n{done.stderr[-3000:]}")
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith(RESULT_MARKER)), flush=True)
    return json.loads(lines[-1][len(RESULT_MARKER):])


def report(results: dict[str, dict], config: TrainConfig) -> dict:
    rows = [("train real tokens/s", "train_real_tokens_per_s", 1), ("train seconds", "train_seconds", 1),
            ("train padding share", "train_padding_share", 100), ("predict pairs/s (TTA)", "predict_pairs_per_s", 1),
            ("predict seconds", "predict_seconds", 1), ("peak RSS MB", "peak_rss_mb", 1)]
    modes = list(results)
    compare = "packed" in results and "padded" in results
    print(f"\n{config.bench.n_pairs} pairs of {config.data.train_path}, max_length {config.model.max_length}, "
          f"{config.trainer.batch_size * config.trainer.grad_accum} pairs/update (padded: {config.trainer.batch_size} "
          f"per micro-batch; packed: {config.trainer.max_tokens} tokens per micro-batch), "
          f"{config.model.compute_dtype.value} compute, {torch.get_num_threads()} threads")
    print(f"| {'metric':<24} | " + " | ".join(f"{m:>14}" for m in modes) + " | packed/padded |")
    print(f"|{'-' * 26}|" + "|".join("-" * 16 for _ in modes) + "|---------------|")
    for label, key, scale in rows:
        ratio = results["packed"][key] / results["padded"][key] if compare and results["padded"][key] else float("nan")
        cells = [results[m][key] * scale for m in modes]
        digits = 2 if max(cells) < 10 else 1
        print(f"| {label:<24} | " + " | ".join(f"{c:>14.{digits}f}" for c in cells) + f" | {ratio:>13.2f} |")
    return {f"{key}_{mode}": round(results[mode][key], 3) for mode in modes
            for key in ("train_real_tokens_per_s", "predict_pairs_per_s", "peak_rss_mb")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", required=True)
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config_name, overrides)
    if config.bench.mode:
        print(RESULT_MARKER + json.dumps(measure(config, config.bench.mode)), flush=True)
        return
    results = {mode: run_child(args.config_name, overrides, mode) for mode in config.bench.modes}
    print(json.dumps(report(results, config)))


if __name__ == "__main__":
    main()
