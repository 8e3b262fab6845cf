"""Teacher logits: attached to training rows by `python -m lmsys.teachers` (ids checked, teachers averaged in logit
space, orientations averaged), read back beside the labels, and a KL-only student moving to the teacher."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from accelerate import Accelerator

from lmsys.builders import build_encoders, build_loop_settings
from lmsys.cli import parse_config
from lmsys.config import DataConfig, Family, LossConfig, ModelConfig, TrainConfig, TrainerConfig
from lmsys.data.dataset import encode_split
from lmsys.data.io import DataError, read_pairs
from lmsys.evaluation.predict_loop import predict_split
from lmsys.teachers import TeachersConfig, attach_teachers
from lmsys.training.optim import create_optimizer, parameter_groups, warmup_cosine_scheduler
from lmsys.training.plan import iterate_updates
from lmsys.training.recipe import TrainingRecipe


def logits_file(path, ids, logits, swapped=None):
    frame = pd.DataFrame(logits, columns=["logit_a", "logit_b", "logit_tie"])
    frame.insert(0, "id", ids)
    if swapped is not None:
        frame[["swapped_logit_a", "swapped_logit_b", "swapped_logit_tie"]] = swapped
    frame.to_csv(path, index=False)
    return str(path)


@pytest.fixture()
def train_file(tmp_path):
    path = tmp_path / "train.csv"
    tiny.arena_frame(8, seed=2).to_csv(path, index=False)
    return path


def test_teachers_are_averaged_in_logit_space_and_read_back(train_file, tmp_path):
    ids = [str(i) for i in range(8)]
    rng = np.random.default_rng(0)
    first, first_swapped, second = (rng.normal(size=(8, 3)) for _ in range(3))
    files = [logits_file(tmp_path / "t1.csv", ids, first, first_swapped),
             logits_file(tmp_path / "t2.csv", ids[::-1], second[::-1])]  # any row order
    out = tmp_path / "with_teachers.parquet"
    attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"logits=[{files[0]},{files[1]}]",
                                                  f"output={out}"]))
    pairs = read_pairs(out, require_labels=True)
    expected = ((first + first_swapped) / 2 + second) / 2
    np.testing.assert_allclose([pair.teacher_logits for pair in pairs], expected, atol=1e-12)
    assert [pair.target for pair in pairs] == [pair.target for pair in read_pairs(train_file, True)]


def test_a_teacher_of_several_formats_is_the_mean_of_its_formats(train_file, tmp_path):
    """A multi-format run predicts the mean of its formats; its first format's plain columns alone distilled only
    that format (the per-format columns are what predict's logits_output and a multi-format oof.csv hold)."""
    ids = [str(i) for i in range(8)]
    rng = np.random.default_rng(1)
    pab, pab_swapped, papb, papb_swapped = (rng.normal(size=(8, 3)) for _ in range(4))
    frame = pd.read_csv(logits_file(tmp_path / "t.csv", ids, pab, pab_swapped), dtype={"id": str})
    for suffix, (forward, swapped) in (("_pab", (pab, pab_swapped)), ("_papb", (papb, papb_swapped))):
        frame[[f"logit_{c}{suffix}" for c in ("a", "b", "tie")]] = forward
        frame[[f"swapped_logit_{c}{suffix}" for c in ("a", "b", "tie")]] = swapped
    frame.to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "with_teacher.parquet"
    attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"logits=[{tmp_path / 't.csv'}]",
                                                  f"output={out}"]))
    expected = ((pab + pab_swapped) / 2 + (papb + papb_swapped) / 2) / 2
    np.testing.assert_allclose([pair.teacher_logits for pair in read_pairs(out, True)], expected, atol=1e-12)


def test_teacher_ids_must_match_the_training_ids(train_file, tmp_path):
    ids = [str(i) for i in range(8)]
    short = logits_file(tmp_path / "short.csv", ids[:7], np.zeros((7, 3)))
    with pytest.raises(DataError, match=r"1 missing \(e.g. \['7'\]\)"):
        attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"logits=[{short}]",
                                                      f"output={tmp_path / 'o.parquet'}"]))
    extra = logits_file(tmp_path / "extra.csv", [*ids, "99"], np.zeros((9, 3)))
    with pytest.raises(DataError, match=r"1 not in it \(e.g. \['99'\]\)"):
        attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"logits=[{extra}]",
                                                      f"output={tmp_path / 'o.parquet'}"]))
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize(("drop", "message"), [
    (["logit_b"], r"missing column\(s\) \['logit_b'\];"),  # its tie logit would have been read as B's
    (["swapped_logit_tie"], r"missing column\(s\) \['swapped_logit_tie'\] \(the swapped logits: all of them"),
    (["id"], r"missing column\(s\) \['id'\];"),
])
def test_a_teacher_file_with_part_of_its_columns_is_refused(train_file, tmp_path, drop, message):
    ids = [str(i) for i in range(8)]
    full = logits_file(tmp_path / "full.csv", ids, np.ones((8, 3)), np.zeros((8, 3)))
    partial = tmp_path / "partial.csv"
    pd.read_csv(full).drop(columns=drop).to_csv(partial, index=False)
    with pytest.raises(DataError, match=rf"{partial}: {message}"):
        attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"logits=[{partial}]",
                                                      f"output={tmp_path / 'o.parquet'}"]))
    assert not (tmp_path / "o.parquet").exists()


def test_a_logit_cell_that_is_not_a_number_is_named(train_file, tmp_path):
    ids = [str(i) for i in range(8)]
    path = tmp_path / "t.csv"
    frame = pd.read_csv(logits_file(path, ids, np.ones((8, 3)), np.zeros((8, 3))), dtype={"id": str})
    frame["swapped_logit_tie"] = frame["swapped_logit_tie"].astype(object)
    for value, shown in (("abc", "'abc'"), ("1e39", "1e\\+39")):  # 1e39: inf in the float32 tensor the loss reads
        frame.loc[5, "swapped_logit_tie"] = value
        frame.to_csv(path, index=False)
        with pytest.raises(DataError, match=rf"{path}: row id=5 column 'swapped_logit_tie': not a finite \(float32\) "
                                            rf"number \({shown}"):
            attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"logits=[{path}]",
                                                          f"output={tmp_path / 'o.parquet'}"]))


def test_two_class_teachers_leave_out_the_ties_they_never_scored(train_file, tmp_path, capsys):
    """A two-class teacher sweep with data.ties=drop validated no tied row; the student drops them all the same."""
    scored = [str(i) for i in range(8) if i % 3 != 2]  # arena_frame's labels cycle A, B, tie
    two = pd.DataFrame({"id": scored, "logit_a": 1.0, "logit_b": -1.0})
    two.to_csv(tmp_path / "two.csv", index=False)
    out = tmp_path / "o.parquet"
    attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"logits=[{tmp_path / 'two.csv'}]",
                                                  f"output={out}"]))
    assert [pair.id for pair in read_pairs(out, require_labels=True)] == scored
    assert "2 tied row(s) have no two-class prediction" in capsys.readouterr().err
    two.drop(index=0).to_csv(tmp_path / "short.csv", index=False)  # a scored row missing as well: still an error
    with pytest.raises(DataError, match=r"1 missing \(e.g. \['0'\]\)"):  # the scored row, not the ties
        attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"logits=[{tmp_path / 'short.csv'}]",
                                                      f"output={tmp_path / 'o2.parquet'}"]))
    three = pd.DataFrame({"id": [str(i) for i in range(8)], "logit_a": 1.0, "logit_b": -1.0, "logit_tie": 0.0})
    three.to_csv(tmp_path / "three.csv", index=False)
    for logits in (["three.csv", "two.csv"], ["two.csv", "three.csv"]):  # named as such, not as missing ties
        with pytest.raises(DataError, match=r"^teachers disagree on the number of classes: \[2, 3\]"):
            attach_teachers(parse_config(TeachersConfig, [f"train={train_file}", f"output={tmp_path / 'o3.parquet'}",
                                                          f"logits=[{','.join(str(tmp_path / n) for n in logits)}]"]))


def test_a_student_trained_on_the_kl_term_moves_to_its_teacher(tiny_models, train_file, tmp_path):
    """20 updates of KL-only distillation on the tiny NF4 model: the student's probabilities approach the teacher's
    (which disagree with the labels, so the labels cannot be what it learns)."""
    pairs = read_pairs(train_file, require_labels=True)
    teacher = np.tile([2.0, -1.0, 0.0], (len(pairs), 1))  # A wins, confidently, whatever the label says
    pairs = [replace(pair, teacher_logits=tuple(row)) for pair, row in zip(pairs, teacher, strict=True)]
    model, spec, tokenizer = tiny.build_preference_model(tiny_models["llama"], "llama", "nf4")
    split = encode_split(pairs, build_encoders(spec, tokenizer))
    config = TrainConfig(model=ModelConfig(path=str(tiny_models["llama"]), family=Family.llama, max_length=128),
                         data=DataConfig(train_path=str(train_file)),
                         loss=LossConfig(ce_weight=0.0, kl_weight=1.0, kl_temperature=1.0),
                         trainer=TrainerConfig(epochs=20, batch_size=8, max_tokens=512))
    settings = build_loop_settings(config, spec, len(split), 1, tokenizer.pad_token_id)
    optimizer = create_optimizer(parameter_groups(model, 3e-3, 3e-2, 1.0, 0.0), config.optimizer.name,
                                 (0.9, 0.999), 1e-8)
    recipe = TrainingRecipe(Accelerator(cpu=True), model, optimizer,
                            warmup_cosine_scheduler(optimizer, settings.total_updates, 0.0, 1.0), settings, split)
    target = torch.softmax(torch.tensor(teacher), -1).numpy()

    def gap() -> float:
        return float(np.abs(predict_split(model, split, False, settings.batching, recipe.accelerator,
                                          show_progress=False).probs_ab - target).max())

    before = gap()
    model.train()
    for update in iterate_updates(split, settings, 0, 1):
        recipe.update(update)
    assert before > 0.3 and gap() < 0.5 * before
