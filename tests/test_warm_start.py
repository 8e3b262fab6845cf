"""Warm starts (`model.init_from`) and two-class runs (`model.num_classes=2`, `data.ties`): the warm-started model
predicts exactly as its source checkpoint (an adapter for a LoRA run, a merged checkpoint for full fine-tuning),
mismatches fail before a model loads, a 3-class head starts a 2-class run with its A and B rows, and a 2-class model
predicts WSDM submissions with exact swap symmetry."""

import json
import logging
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from accelerate import Accelerator
from entry_runs import read_oof, run_entry, tiny_overrides
from test_predict import make_checkpoint, swapped_frame

from lmsys.builders import build_encoders, build_model, build_prediction_spec, build_spec, build_splits
from lmsys.cli import parse_config
from lmsys.config import (
    ConfigError,
    DataConfig,
    Family,
    FineTune,
    HeadType,
    LoraConfig,
    ModelConfig,
    Quantization,
    Ties,
    TrainConfig,
)
from lmsys.data.dataset import encode_split
from lmsys.data.io import DataError, read_pairs
from lmsys.evaluation.predict_loop import predict_split
from lmsys.logs import held_records
from lmsys.merging import run_export
from lmsys.modeling.checkpoint import load_head_state, read_spec, save_checkpoint
from lmsys.modeling.warm_start import check_warm_start
from lmsys.prediction import predict_checkpoint, run_prediction, submission_frame
from lmsys.prediction_config import ExportConfig, PredictConfig, PredictDataConfig
from lmsys.training.recipe import TrainingRecipe, release

CPU = torch.device("cpu")
LORA = LoraConfig(r=8, alpha=16, dropout=0.0)  # the shape of make_checkpoint's adapter


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_models):
    return make_checkpoint(tmp_path_factory.mktemp("warm") / "checkpoint", tiny_models["llama"])


@pytest.fixture(scope="module")
def merged_source(tmp_path_factory, source):
    """The adapter source merged into a float32 base: what a full fine-tuning run's checkpoint is (backbone + head)."""
    out = tmp_path_factory.mktemp("merged") / "checkpoint"
    run_export(parse_config(ExportConfig, [f"checkpoint={source}", f"output_dir={out}", "dtype=float32"]))
    return out


def model_config(tiny_models, **extra) -> ModelConfig:
    return ModelConfig(path=str(tiny_models["llama"]), family=Family.llama, max_length=128, **extra)


def logits(model, spec, pairs, tokenizer_dir):
    from lmsys.builders import build_inference_batching, build_tokenizer

    tokenizer = build_tokenizer(tokenizer_dir, False)
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    batching = build_inference_batching(PredictConfig(checkpoint="x", output="x.csv"), spec, tokenizer.pad_token_id)
    return predict_split(model, split, False, batching, Accelerator(cpu=True), show_progress=False).logits_ab


def test_a_warm_started_model_predicts_as_its_source(tiny_models, arena_files, source):
    pairs = read_pairs(arena_files["valid"], require_labels=True)
    spec = build_spec(model_config(tiny_models), DataConfig(train_path="unused"), packing=True)
    reference = build_model(spec, None, None, CPU, adapter_dir=source)
    warm = build_model(spec, model_config(tiny_models, init_from=str(source)), LORA, CPU)
    assert any(p.requires_grad for n, p in warm.named_parameters() if "lora_" in n)  # it trains
    np.testing.assert_allclose(logits(warm, spec, pairs, source), logits(reference, spec, pairs, source), atol=1e-5)
    fresh = build_model(spec, model_config(tiny_models), LORA, CPU)
    assert np.abs(logits(fresh, spec, pairs, source) - logits(reference, spec, pairs, source)).max() > 1e-2


def test_update_zero_of_a_warm_started_run_equals_the_source_predictions(tiny_models, arena_files, source, tmp_path):
    run_dir = tmp_path / "run"
    run_entry([*tiny_overrides(tiny_models["llama"], arena_files["train"], arena_files["valid"]),
               "trainer.max_steps=0", f"model.init_from={source}", "lora.r=8", "lora.alpha=16", "model.double_quant=true",
               "model.template=llama3",
               f"hydra.run.dir={run_dir}"], tmp_path / "log.txt")
    oof = read_oof(run_dir).astype({"id": str}).set_index("id")
    config = PredictConfig(checkpoint=str(source), output="unused.csv", tta=True, dense_weights=False,
                           show_progress=False)  # the run evaluates with swap TTA (trainer/cpu.yaml)
    pairs = read_pairs(arena_files["valid"], require_labels=True)
    probs = predict_checkpoint(str(source), build_prediction_spec(str(source), config), pairs, config,
                               Accelerator(cpu=True)).combined("prob")
    ours = oof.loc[[pair.id for pair in pairs], ["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    np.testing.assert_allclose(ours, probs, atol=1e-5)


FULL = {"finetune": FineTune.full, "quantization": Quantization.none}


def test_a_full_fine_tuning_run_starts_from_a_merged_checkpoint(tiny_models, arena_files, merged_source):
    """Its backbone is the checkpoint's (loaded in place of model.path's), every weight trains, the head is the
    checkpoint's: it predicts as the checkpoint does."""
    pairs = read_pairs(arena_files["valid"], require_labels=True)
    spec = build_spec(model_config(tiny_models, **FULL), DataConfig(train_path="unused"), packing=True)
    check_warm_start(spec, LORA, str(merged_source), FineTune.full)
    reference = build_model(read_spec(merged_source), None, None, CPU, adapter_dir=merged_source)
    warm = build_model(spec, model_config(tiny_models, init_from=str(merged_source), **FULL), None, CPU)
    assert all(p.requires_grad for p in warm.backbone.parameters())
    ours, theirs = logits(warm, spec, pairs, merged_source), logits(reference, spec, pairs, merged_source)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    fresh = build_model(spec, model_config(tiny_models, **FULL), None, CPU)
    assert np.abs(logits(fresh, spec, pairs, merged_source) - theirs).max() > 1e-2


def test_a_run_over_the_run_dir_holding_its_warm_start_is_refused(tiny_models, arena_files, tmp_path):
    """overwrite=true would have removed the earlier run's checkpoint/ (the warm start) before the model loaded."""
    run_dir = tmp_path / "seed0"
    checkpoint = make_checkpoint(run_dir / "checkpoint", tiny_models["llama"])
    (run_dir / "lmsys_run.txt").write_text("")
    before = sorted(p.name for p in checkpoint.iterdir())
    config = TrainConfig(model=model_config(tiny_models, init_from=str(checkpoint)), lora=LORA, overwrite=True,
                         data=DataConfig(train_path=str(arena_files["train"]), valid_path=str(arena_files["valid"])))
    with pytest.raises(ConfigError, match=rf"the run dir={run_dir} contains the input model.init_from={checkpoint}"):
        TrainingRecipe.setup(config, run_dir, "warm: {}\n")
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_a_checkpoint_of_the_other_kind_is_refused(tiny_models, source, merged_source):
    full = build_spec(model_config(tiny_models, **FULL), DataConfig(train_path="unused"), packing=True)
    with pytest.raises(ConfigError, match="model.finetune=full starts from a merged checkpoint .* not an adapter"):
        check_warm_start(full, LORA, str(source), FineTune.full)
    lora = build_spec(model_config(tiny_models), DataConfig(train_path="unused"), packing=True)
    with pytest.raises(ConfigError, match="a merged checkpoint .* starts only a model.finetune=full run"):
        check_warm_start(lora, LORA, str(merged_source))


def test_warm_start_mismatches_fail_naming_the_difference(tiny_models, source):
    spec = build_spec(model_config(tiny_models), DataConfig(train_path="unused"), packing=True)
    with pytest.raises(ConfigError, match="lora.r differs: checkpoint 8, this run 16"):
        check_warm_start(spec, LoraConfig(r=16, alpha=16), str(source))
    with pytest.raises(ConfigError, match="head differs"):
        check_warm_start(replace(spec, head=HeadType.mlp), LORA, str(source))
    gemma = build_spec(ModelConfig(path=str(tiny_models["gemma3"]), family=Family.gemma, max_length=128),
                       DataConfig(train_path="unused"), packing=True)
    with pytest.raises(ConfigError, match="family differs: checkpoint llama, this run gemma"):
        check_warm_start(gemma, LORA, str(source))


def test_a_three_class_head_starts_a_two_class_run_with_its_a_and_b_rows(tiny_models, source, tmp_path):
    spec = build_spec(model_config(tiny_models, num_classes=2), DataConfig(train_path="unused"), packing=True)
    check_warm_start(spec, LORA, str(source))
    warm = build_model(spec, model_config(tiny_models, num_classes=2, init_from=str(source)), LORA, CPU)
    head = load_head_state(source)
    ours = warm.head.state_dict()
    for key, value in head.items():
        torch.testing.assert_close(ours[key], value[: ours[key].shape[0]])
    save_checkpoint(tmp_path / "two", warm, tiny.build_tokenizer(False), spec)
    three = build_spec(model_config(tiny_models), DataConfig(train_path="unused"), packing=True)
    with pytest.raises(ConfigError, match="a 2-class head cannot start a 3-class run"):
        check_warm_start(three, LORA, str(tmp_path / "two"))


def wsdm_file(path, n: int, with_ties: bool):
    frame = tiny.arena_frame(n, seed=4)
    frame["winner"] = np.where(frame.winner_model_a == 1, "model_a", "model_b")
    frame = frame.drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])
    if with_ties:  # Kaggle-schema rows with ties, for the ties rule
        frame = tiny.arena_frame(n, seed=4)
    frame.to_csv(path, index=False)
    return path


def test_ties_in_a_two_class_run_error_drop_or_split(tmp_path, tiny_models):
    path = wsdm_file(tmp_path / "train.csv", 12, with_ties=True)  # every third row is a tie
    config = TrainConfig(model=model_config(tiny_models, num_classes=2), data=DataConfig(train_path=str(path),
                                                                                          valid_path=str(path)))
    with pytest.raises(DataError, match=r"4 tied row\(s\) .* row ids \['2', '5', '8', '11'\]; set data.ties"):
        build_splits(config)
    train, _ = build_splits(replace(config, data=replace(config.data, ties=Ties.drop)))
    assert len(train) == 8 and all(len(pair.target) == 2 and max(pair.target) == 1.0 for pair in train)
    train, _ = build_splits(replace(config, data=replace(config.data, ties=Ties.split)))
    assert len(train) == 12 and [pair.target for pair in train if pair.id == "2"] == [(0.5, 0.5)]


def test_dropped_ties_are_counted_in_the_run_log(tmp_path, tiny_models):
    """The count is logged while the data is read, before the run dir (and its train.log) exists: it reaches both."""
    path = wsdm_file(tmp_path / "train.csv", 12, with_ties=True)  # every third row is a tie
    config = TrainConfig(model=model_config(tiny_models, num_classes=2),
                         data=DataConfig(train_path=str(path), valid_path=str(path), ties=Ties.drop))
    recipe = TrainingRecipe.setup(config, tmp_path / "run", "ties: {}\n")
    release(recipe.accelerator)
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    dropped = [line for line in lines if "dropped 4 tied row(s) of 12 (data.ties=drop)" in line]
    assert len(dropped) == 2 and "train.csv" in dropped[0]  # the training and the validation file
    assert lines.index(dropped[1]) < next(i for i, line in enumerate(lines) if "8 train pairs, 8 valid pairs" in line)


def test_records_held_before_the_log_exists_are_printed_on_an_error(caplog):
    logger = logging.getLogger("lmsys")
    with caplog.at_level(logging.INFO, "lmsys"), pytest.raises(DataError, match="bad row"), held_records():
        logger.info("read 3 rows")
        assert not caplog.records  # held
        raise DataError("bad row")
    assert [record.getMessage() for record in caplog.records] == ["read 3 rows"]
    with held_records() as held:
        logger.info("kept")
    assert [record.getMessage() for record in held.records] == ["kept"]


def test_a_two_class_model_writes_wsdm_submissions_with_exact_swap_symmetry(tiny_models, tmp_path):
    model_cfg = model_config(tiny_models, num_classes=2, head_init_std=0.5)
    spec = build_spec(model_cfg, DataConfig(train_path="unused"), packing=True)
    torch.manual_seed(0)
    model = build_model(spec, model_cfg, LORA, CPU)
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(checkpoint, model, tiny.build_tokenizer(False), spec)
    test = wsdm_file(tmp_path / "test.csv", 10, with_ties=False)
    swapped = tmp_path / "swapped.csv"
    swapped_frame(pd.read_csv(test)).to_csv(swapped, index=False)
    config = PredictConfig(checkpoint=str(checkpoint), output="unused.csv", show_progress=False)
    spec = build_prediction_spec(str(checkpoint), config)
    probs = {name: predict_checkpoint(str(checkpoint), spec, read_pairs(path, False), config,
                                      Accelerator(cpu=True)).combined("prob") for name, path in
             (("test", test), ("swapped", swapped))}
    assert probs["test"].shape == (10, 2)
    np.testing.assert_allclose(probs["test"], probs["swapped"][:, ::-1], atol=1e-6)
    frame = submission_frame(read_pairs(test, False), probs["test"])
    assert list(frame.columns) == ["id", "winner"] and set(frame.winner) <= {"model_a", "model_b"}
    assert json.dumps(list(frame.id)) == json.dumps([str(i) for i in range(10)])
    # the command: the submission holds the argmax, probs_output the probabilities the ensemble averages
    run_prediction(PredictConfig(checkpoint=str(checkpoint), output=str(tmp_path / "sub.csv"), show_progress=False,
                                 probs_output=str(tmp_path / "probs.parquet"), data=PredictDataConfig(str(test))))
    written = pd.read_parquet(tmp_path / "probs.parquet")
    assert list(written.columns) == ["id", "winner_model_a", "winner_model_b"]
    np.testing.assert_allclose(written[["winner_model_a", "winner_model_b"]].to_numpy(), probs["test"], atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sub.csv", dtype={"id": str}), frame)


def test_wsdm_pairs_predicted_by_a_three_class_model_are_said(caplog):
    """Such a submission has LMSYS's three probability columns, which WSDM's id,winner scoring does not read."""
    from lmsys.data.schema import Pair
    from lmsys.prediction import warn_submission_schema

    wsdm = [Pair(str(i), ("q",), ("a",), ("b",), meta={"language": "English"}) for i in range(3)]
    lmsys = [Pair(str(i), ("q",), ("a",), ("b",)) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="lmsys"):
        for pairs, classes in ((wsdm, 2), (lmsys, 3), (wsdm, 3)):
            warn_submission_schema(pairs, classes, "test.parquet")
    assert [record.getMessage()[:60] for record in caplog.records] == [
        "test.parquet looks like WSDM pairs (a language column), but "]
