"""Throughput benchmark: training updates and TTA prediction, padded vs packed, each mode in its own process
(so that peak RSS is its own), after a warm-up. The modes (`bench.modes`): `padded`, a typical padded loop (random
order, a fixed number of pairs per micro-batch; prediction of the file in its order, then of the swapped file); `padded_grouped`, the framework with packing
off (length-grouped order, sorted prediction); `packed`, the framework's default.

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

from lmsys.config import SwapMode, TrainConfig, register_configs
from lmsys.entry import validated_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RESULT_MARKER = "BENCH_RESULT "


def load_config(config_name: str, overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validated_config(compose(config_name=config_name, overrides=overrides))


def measure(config: TrainConfig, mode: str) -> dict:
    """Train over the pairs once (after warm-up updates) and predict them with TTA, in one batching mode."""
    from lmsys.builders import build_encoder, build_model, build_spec, build_tokenizer
    from lmsys.data.dataset import encode_split
    from lmsys.data.io import read_pairs
    from lmsys.training.optim import build_optimizer, parameter_groups

    packed = mode == "packed"
    pairs = read_pairs(config.data.train_path, require_labels=True)[: config.bench.n_pairs]
    spec = build_spec(config.model, config.data, packing=packed)
    tokenizer = build_tokenizer(config.model.path, config.model.trust_remote_code)
    split = encode_split(pairs, build_encoder(spec, tokenizer))
    accelerator = Accelerator()
    model = build_model(spec, config.model, config.lora, accelerator.device)
    opt = config.optimizer
    optimizer = build_optimizer(parameter_groups(model, opt.lr, opt.head_lr, opt.lora_b_lr_multiplier, opt.weight_decay),
                                opt.name, tuple(opt.betas), opt.eps)
    train = _time_training(config, split, model, optimizer, accelerator, tokenizer.pad_token_id, mode)
    predict = _time_prediction(config, split, model, accelerator, tokenizer.pad_token_id, mode)
    peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {**train, **predict, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": peak_gpu_mb}


def _time_training(config, split, model, optimizer, accelerator, pad_id, mode: str) -> dict:
    from lmsys.builders import build_train_batching
    from lmsys.data.batching import collate
    from lmsys.training.loop import LoopSettings, run_update
    from lmsys.training.plan import epoch_plan

    trainer = config.trainer
    pairs_per_update = trainer.batch_size * trainer.grad_accum
    batching = replace(build_train_batching(config), packed=mode == "packed", group_by_length=mode != "padded")
    settings = LoopSettings(0, pairs_per_update, SwapMode.none, batching, pad_id, config.data.padding_side,
                            trainer.max_grad_norm, 0, None, 1, 0, 0.0, 1.0, config.seed)
    warmup = epoch_plan(split, 1, config.seed, pairs_per_update, SwapMode.none, batching, 0, 1)
    timed = epoch_plan(split, 0, config.seed, pairs_per_update, SwapMode.none, batching, 0, 1)

    def step(update) -> None:
        run_update(accelerator, model, update, settings)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], trainer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for update in warmup[: config.bench.warmup_updates]:
        step(update)
    if config.bench.profile and mode == "packed":
        _profile(step, timed[0])
    start = time.perf_counter()
    for update in timed:
        step(update)
    seconds = time.perf_counter() - start
    batches = [collate(mb, batching.packed, pad_id, config.data.padding_side, batching.row_tokens,
                       batching.attention_width)
               for update in timed for mb in update.micro_batches]
    real_tokens = sum(b.n_real_tokens for b in batches)
    return {"train_seconds": seconds, "train_updates": len(timed), "train_real_tokens": real_tokens,
            "train_real_tokens_per_s": real_tokens / seconds,
            "train_padding_share": 1.0 - real_tokens / sum(b.input_ids.numel() for b in batches)}


def _time_prediction(config, split, model, accelerator, pad_id, mode: str) -> dict:
    """packed / padded_grouped: the predict command's path (sorted, token budgets, adapter folded into dense
    weights on CPU) with and without packing.
    padded: the usual TTA loop, the file in its order in batches of `bench.predict_batch_size` pairs, then the
    swapped file the same way."""
    from lmsys.builders import build_eval_batching
    from lmsys.data.batching import collate, fill_by_count
    from lmsys.evaluation.predict_loop import predict_split
    from lmsys.modeling.backbone import fold_into_dense
    from lmsys.predict import use_dense_weights

    if mode != "padded" and use_dense_weights(None, accelerator.device):
        fold_into_dense(model)  # what the predict command does by default, as it loads the model (not timed)
    start = time.perf_counter()
    if mode == "padded":
        examples = split.forward + split.swapped
        model.eval()
        with torch.inference_mode():
            for group in fill_by_count(len(examples), config.bench.predict_batch_size):
                batch = collate([examples[i] for i in group], False, pad_id, config.data.padding_side, 0)
                model(**batch.model_inputs(accelerator.device))
    else:
        batching = replace(build_eval_batching(config, pad_id), packed=mode == "packed",
                           batch_size=config.bench.predict_batch_size)
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
            for key in ("train_real_tokens_per_s", "predict_pairs_per_s", "peak_rss_mb", "peak_gpu_mb")}


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
