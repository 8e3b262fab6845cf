"""K-fold runs and their out-of-fold files: a real fold sweep of the tiny model (one run dir per fold, oof.csv with
the logits, the fold in the sweep summary), `python -m lmsys.oof join` over fold run dirs (every training id once,
duplicates and gaps named), and a fold sweep on a file without a fold column failing before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from entry_runs import entry_env, finish, read_metrics, start_entry, tiny_overrides
from tiny import arena_frame

from lmsys.config import InputFormat
from lmsys.data.io import DataError
from lmsys.data.schema import SOFT_TARGET_COLUMNS, TARGET_COLUMNS, Pair, swap_abt
from lmsys.ensemble import load_oof
from lmsys.evaluation.predict_loop import LOGIT_COLUMNS, SWAPPED_LOGIT_COLUMNS, SplitPredictions, softmax
from lmsys.evaluation.validation import Evaluation, oof_frame
from lmsys.oof import join_oof, main, read_run_oof
from lmsys.sweep import SUMMARY_FILE

FOLDS, SEED = (0, 1), 5


def fake_fold_run(root: Path, fold: int, ids: list[int], swapped: bool = True, classes: int = 3) -> Path:
    """A run dir holding only an oof.csv as save_best writes it, with distinct made-up numbers per id ((A, B, tie)
    columns, or a two-class run's (A, B))."""
    run_dir = root / f"fold{fold}_seed1"
    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(fold)
    logits = rng.normal(size=(len(ids), classes))
    frame = pd.DataFrame(softmax(logits), columns=list(TARGET_COLUMNS[:classes]))
    frame.insert(0, "id", [str(i) for i in ids])
    frame["label"] = [i % classes for i in ids]
    frame[list(LOGIT_COLUMNS[:classes])] = logits
    if swapped:
        frame[list(SWAPPED_LOGIT_COLUMNS[:classes])] = logits + 0.5
    frame.to_csv(run_dir / "oof.csv", index=False)
    return run_dir


@pytest.fixture
def three_folds(tmp_path) -> SimpleNamespace:
    train = tmp_path / "train.csv"
    arena_frame(12).to_csv(train, index=False)  # ids 0..11
    folds = [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    return SimpleNamespace(train=train, folds=folds,
                           runs=[fake_fold_run(tmp_path / "runs", k, ids) for k, ids in enumerate(folds)])


def test_join_of_three_folds_holds_every_training_id_once(three_folds, tmp_path):
    out = tmp_path / "joined" / "oof.csv"
    main(["join", *map(str, three_folds.runs), "--out", str(out), "--train", str(three_folds.train)])
    joined = pd.read_csv(out, dtype={"id": str})
    assert list(joined["id"]) == [str(i) for i in range(12)]  # the training file's order
    expected = ["id", *TARGET_COLUMNS, "label", *LOGIT_COLUMNS, *SWAPPED_LOGIT_COLUMNS]
    assert list(joined.columns) == expected
    inputs = pd.concat([pd.read_csv(run / "oof.csv", dtype={"id": str}) for run in three_folds.runs])
    pd.testing.assert_frame_equal(joined, inputs.set_index("id").loc[joined["id"]].reset_index())  # values intact
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # atomic write, nothing left over
    ids, _probs, targets = load_oof([str(out)])  # the ensembling command reads it as it stands
    assert list(ids) == list(joined["id"]) and targets.argmax(1).tolist() == joined["label"].tolist()


def test_join_of_two_class_folds_feeds_the_ensemble(tmp_path):
    """A WSDM (two-class) fold sweep's oof.csv files have no tie columns: they join, and the ensemble reads them."""
    train = tmp_path / "train.csv"
    arena_frame(6).to_csv(train, index=False)
    runs = [fake_fold_run(tmp_path / "runs", k, ids, classes=2) for k, ids in enumerate([[0, 2, 4], [1, 3, 5]])]
    out = tmp_path / "oof.parquet"
    main(["join", *map(str, runs), "--out", str(out), "--train", str(train)])
    joined = pd.read_parquet(out)
    assert list(joined.columns) == ["id", *TARGET_COLUMNS[:2], "label", *LOGIT_COLUMNS[:2], *SWAPPED_LOGIT_COLUMNS[:2]]
    assert list(joined["id"]) == [str(i) for i in range(6)]
    _ids, probs, targets = load_oof([str(out)])
    assert probs[0].shape == (6, 2) and targets.tolist() == np.eye(2)[[i % 2 for i in range(6)]].tolist()
    with pytest.raises(DataError, match="differ from"):  # a three-class fold among them
        join_oof([*runs, fake_fold_run(tmp_path / "three", 2, [6, 7])])


def test_join_without_train_file_keeps_run_order_and_writes_parquet(three_folds, tmp_path):
    out = tmp_path / "oof.parquet"
    main(["join", *map(str, three_folds.runs), "--out", str(out)])
    joined = pd.read_parquet(out)
    assert list(joined["id"]) == [str(i) for fold in three_folds.folds for i in fold]
    assert joined[list(LOGIT_COLUMNS)].to_numpy().std() > 0.1


def test_an_id_in_two_folds_fails_naming_it(three_folds, tmp_path):
    overlapping = fake_fold_run(tmp_path / "other", 3, [11, 12])
    with pytest.raises(DataError, match=rf"id=11 is in the oof.csv of both {three_folds.runs[2]} and {overlapping}"):
        join_oof([*three_folds.runs, overlapping])


def test_a_training_id_in_no_fold_fails_naming_it(three_folds, capsys, tmp_path):
    out = tmp_path / "out.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["join", *map(str, three_folds.runs[:2]), "--out", str(out), "--train", str(three_folds.train)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {three_folds.train}: row id=2 is in no run's oof.csv (4 of the 12 training ids "
                          f"are in none")
    assert not out.exists()


def test_an_oof_id_outside_the_training_file_fails(three_folds, tmp_path):
    stranger = fake_fold_run(tmp_path / "other", 3, [99])
    with pytest.raises(DataError, match=rf"{stranger / 'oof.csv'}: id=99 is not in {three_folds.train}"):
        join_oof([*three_folds.runs, stranger], three_folds.train)


def test_folds_evaluated_with_and_without_tta_do_not_mix(three_folds, tmp_path):
    no_tta = fake_fold_run(tmp_path / "no_tta", 3, [20, 21], swapped=False)
    with pytest.raises(DataError, match="same trainer.eval_tta"):
        join_oof([*three_folds.runs, no_tta])


def test_the_output_never_replaces_an_input(three_folds):
    with pytest.raises(SystemExit) as exit_info:
        main(["join", *map(str, three_folds.runs), "--out", str(three_folds.runs[0] / "oof.csv")])
    assert exit_info.value.code == 2


def test_the_output_never_goes_into_another_run(three_folds, tmp_path, capsys):
    other = fake_fold_run(tmp_path / "other", 7, [40, 41])
    (other / "lmsys_run.txt").write_text("a run\n")
    before = (other / "oof.csv").read_bytes()
    for target in (other / "oof.csv", other / "joined.csv"):
        with pytest.raises(SystemExit) as exit_info:
            main(["join", *map(str, three_folds.runs), "--out", str(target)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: --out={target} lies inside the run dir {other}")
    assert (other / "oof.csv").read_bytes() == before and not (other / "joined.csv").exists()


def test_two_and_three_class_folds_do_not_mix(three_folds, tmp_path):
    two_class = fake_fold_run(tmp_path / "two", 3, [20, 21], classes=2)
    with pytest.raises(DataError, match="a two-class run and a three-class one"):
        join_oof([*three_folds.runs, two_class])


def test_a_dir_without_oof_fails(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: no oof.csv"):
        join_oof([tmp_path])


@pytest.fixture(scope="module")
def fold_sweep(tmp_path_factory, tiny_models) -> SimpleNamespace:
    """`-m data.valid_fold=0,1` of the tiny Llama on a 16-pair file with a fold column, TTA evaluation."""
    root = tmp_path_factory.mktemp("fold_sweep")
    frame = arena_frame(16, seed=7)
    frame["fold"] = [i % 2 for i in range(16)]
    frame.to_csv(root / "train.csv", index=False)
    overrides = tiny_overrides(tiny_models["llama"], root / "train.csv", "null", trainer__max_steps=1,
                               trainer__eval_tta="true", seed=SEED)
    sweep_dir = root / "sweep"
    log = root / "sweep.log"
    finish(start_entry(["-m", f"data.valid_fold={','.join(map(str, FOLDS))}", *overrides,
                        f"hydra.sweep.dir={sweep_dir}"], log), log)
    return SimpleNamespace(root=root, dir=sweep_dir, train=root / "train.csv", log=log.read_text())


def test_a_fold_sweep_gives_one_run_dir_per_fold(fold_sweep):
    names = sorted(p.name for p in fold_sweep.dir.iterdir() if p.is_dir())
    assert names == [f"fold{k}_seed{SEED}" for k in FOLDS]
    for k in FOLDS:
        run_dir = fold_sweep.dir / f"fold{k}_seed{SEED}"
        assert read_metrics(run_dir)["n_valid_pairs"] == 8
        oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str})
        assert sorted(map(int, oof["id"])) == list(range(k, 16, 2))  # exactly the fold's ids
    summary = json.loads((fold_sweep.dir / SUMMARY_FILE).read_text())
    assert [(run["fold"], run["seed"]) for run in summary["runs"]] == [(k, SEED) for k in FOLDS]
    assert f"fold0_seed{SEED}" in fold_sweep.log and f"fold1_seed{SEED}" in fold_sweep.log  # the printed table


def test_oof_carries_the_logits_behind_its_probabilities(fold_sweep):
    oof = pd.read_csv(fold_sweep.dir / f"fold0_seed{SEED}" / "oof.csv", dtype={"id": str})
    assert list(oof.columns) == ["id", *TARGET_COLUMNS, "label", *LOGIT_COLUMNS, *SWAPPED_LOGIT_COLUMNS]
    forward = softmax(oof[list(LOGIT_COLUMNS)].to_numpy())
    swapped_back = softmax(oof[list(SWAPPED_LOGIT_COLUMNS)].to_numpy())  # already in (A, B, tie) order
    np.testing.assert_allclose(oof[list(TARGET_COLUMNS)].to_numpy(), (forward + swapped_back) / 2, atol=1e-6)
    # the (B, A) pass is not the (A, B) pass relabelled: a mix-up of swap_abt would show here
    assert np.abs(oof[list(SWAPPED_LOGIT_COLUMNS)].to_numpy() - oof[list(LOGIT_COLUMNS)].to_numpy()).max() > 1e-4
    assert np.abs(swap_abt(oof[list(SWAPPED_LOGIT_COLUMNS)].to_numpy()) - oof[list(LOGIT_COLUMNS)].to_numpy()).max() > 0


def test_join_of_a_real_fold_sweep_covers_the_training_file(fold_sweep, tmp_path):
    out = tmp_path / "oof.csv"
    runs = [str(fold_sweep.dir / f"fold{k}_seed{SEED}") for k in FOLDS]
    done = subprocess.run([sys.executable, "-m", "lmsys.oof", "join", *runs, "--out", str(out), "--train",
                           str(fold_sweep.train)], capture_output=True, text=True, env=entry_env(), timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    joined = pd.read_csv(out, dtype={"id": str})
    assert list(joined["id"]) == [str(i) for i in range(16)]
    assert set(joined["label"]) == {0, 1, 2}


def test_a_fold_sweep_without_a_fold_column_fails_before_any_model_loads(tmp_path, tiny_models):
    arena_frame(8).to_csv(tmp_path / "train.csv", index=False)
    overrides = tiny_overrides(tiny_models["llama"], tmp_path / "train.csv", "null", trainer__max_steps=1)
    log = tmp_path / "sweep.log"
    process = start_entry(["-m", "data.valid_fold=0,1", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], log)
    process.wait(timeout=120)
    assert process.returncode == 2
    text = log.read_text()
    assert f"error: data.train_path={tmp_path / 'train.csv'}: data.valid_fold=0 needs a 'fold' column" in text
    assert "Traceback" not in text
    # Hydra makes the job's dir; no run claimed it (config.yaml, train.log are written right after the data checks)
    assert not [path for path in (tmp_path / "sweep").glob("fold*/**/*") if path.is_file()]


def test_oof_rows_of_soft_targets_carry_them():
    """A run validated on soft targets (data.ties=split, pseudo-labels) scores against them: oof.csv says so, since
    `label` is only their argmax (a 0.5 / 0.5 tie would read as an A win)."""
    pairs = [Pair("t", ("q",), ("a",), ("b",), target=(0.5, 0.5)), Pair("h", ("q",), ("a",), ("b",), target=(0.0, 1.0))]
    logits = np.array([[0.2, -0.1], [0.0, 1.0]])
    evaluation = Evaluation({}, softmax(logits), SplitPredictions([logits], None))
    frame = oof_frame(SimpleNamespace(pairs=pairs), evaluation)
    assert list(frame.columns) == ["id", *TARGET_COLUMNS[:2], "label", *SOFT_TARGET_COLUMNS[:2], *LOGIT_COLUMNS[:2]]
    assert frame[list(SOFT_TARGET_COLUMNS[:2])].to_numpy().tolist() == [[0.5, 0.5], [0.0, 1.0]]
    hard = oof_frame(SimpleNamespace(pairs=pairs[1:]), Evaluation({}, softmax(logits[1:]), SplitPredictions(
        [logits[1:]], None)))
    assert SOFT_TARGET_COLUMNS[0] not in hard.columns


def test_a_multi_format_runs_oof_carries_each_formats_logits_and_the_join_keeps_them(tmp_path):
    """The probabilities average the formats; the first format's logits alone could not reproduce them, nor make
    the run a teacher of both formats."""
    pairs = [Pair(str(i), ("q",), ("a",), ("b",), target=(1.0, 0.0, 0.0)) for i in range(2)]
    pab, papb = np.array([[0.2, -0.1, 0.0], [0.0, 1.0, 0.3]]), np.array([[1.0, 0.1, -0.5], [0.4, 0.0, 0.2]])
    predictions = SplitPredictions([pab, papb], None)
    frame = oof_frame(SimpleNamespace(pairs=pairs), Evaluation({}, predictions.probs_ab, predictions),
                      (InputFormat.pab, InputFormat.papb))
    np.testing.assert_array_equal(frame[["logit_a_papb", "logit_b_papb", "logit_tie_papb"]].to_numpy(), papb)
    np.testing.assert_array_equal(frame[list(LOGIT_COLUMNS)].to_numpy(), pab)
    np.testing.assert_allclose(frame[list(TARGET_COLUMNS)].to_numpy(), (softmax(pab) + softmax(papb)) / 2)
    run = tmp_path / "run"
    run.mkdir()
    frame.to_csv(run / "oof.csv", index=False)
    assert "logit_tie_papb" in join_oof([run]).columns
    one_format = tmp_path / "pab"
    one_format.mkdir()
    frame.drop(columns=[c for c in frame.columns if c.endswith(("_papb", "_pab"))]).assign(
        id=["2", "3"]).to_csv(one_format / "oof.csv", index=False)
    with pytest.raises(DataError, match="runs of other data.formats: join the folds of one model"):
        join_oof([run, one_format])


def test_join_keeps_soft_targets_and_the_ensemble_fits_to_them(tmp_path):
    runs = [fake_fold_run(tmp_path / "runs", k, ids, classes=2) for k, ids in enumerate([[0, 2], [1, 3]])]
    for run in runs:
        frame = pd.read_csv(run / "oof.csv")
        frame.insert(4, "target_a", 0.5)
        frame.insert(5, "target_b", 0.5)
        frame.to_csv(run / "oof.csv", index=False)
    out = tmp_path / "oof.csv"
    main(["join", *map(str, runs), "--out", str(out)])
    assert {"target_a", "target_b"} <= set(pd.read_csv(out).columns)
    _ids, _probs, targets = load_oof([str(out)])
    assert targets.tolist() == [[0.5, 0.5]] * 4  # not the labels' one-hot


def test_a_two_class_join_leaves_out_the_ties_that_data_ties_drop_never_validated(tmp_path, caplog):
    train = tmp_path / "train.csv"
    arena_frame(9).to_csv(train, index=False)  # labels cycle A, B, tie: ids 2, 5, 8 are ties
    runs = [fake_fold_run(tmp_path / "runs", k, ids, classes=2) for k, ids in enumerate([[0, 3, 6], [1, 4, 7]])]
    with caplog.at_level("WARNING", logger="lmsys"):
        joined = join_oof(runs, train)
    assert list(joined["id"]) == ["0", "1", "3", "4", "6", "7"]
    assert ("3 tied row(s) have no two-class prediction (data.ties=drop left them out), e.g. ['2', '5', '8']"
            in caplog.text)
    # a missing fold still fails, named by a row it would have scored (not by a tie no fold scores)
    with pytest.raises(DataError, match=r"row id=1 is in no run's oof.csv \(3 of the 6 training ids are in none"):
        join_oof(runs[:1], train)
    # data.ties=split scored the ties: one not scored is a gap like any other, counted with the rest
    split = [fake_fold_run(tmp_path / "split", k, ids, classes=2) for k, ids in enumerate([[0, 2, 4], [1, 3, 5]])]
    with pytest.raises(DataError, match=r"row id=6 is in no run's oof.csv \(3 of the 9 training ids are in none"):
        join_oof(split, train)


def test_a_split_ties_fold_that_drew_no_tie_joins_the_others(tmp_path):
    """data.ties=split: an oof.csv carries target_* only when its targets are soft, so a fold without ties has none;
    its one-hot labels stand in for them, and the join is the folds' rows as they were."""
    runs = [fake_fold_run(tmp_path / "runs", k, ids, classes=2) for k, ids in enumerate([[0, 2], [1, 3]])]
    frame = pd.read_csv(runs[1] / "oof.csv")
    frame.insert(4, "target_a", [0.5, 0.0])
    frame.insert(5, "target_b", [0.5, 1.0])
    frame.to_csv(runs[1] / "oof.csv", index=False)
    joined = join_oof(runs)
    assert list(joined.columns) == list(read_run_oof(runs[1]).columns)
    assert joined[["target_a", "target_b"]].to_numpy().tolist() == [[1, 0], [1, 0], [0.5, 0.5], [0, 1]]
    assert joined["label"].tolist() == [0, 0, 1, 1]
    assert joined["logit_a"].tolist() == [*pd.read_csv(runs[0] / "oof.csv")["logit_a"], *frame["logit_a"]]


def test_a_cell_that_is_not_a_number_is_named(three_folds, tmp_path):
    frame = pd.read_csv(three_folds.runs[1] / "oof.csv", dtype={"id": str})
    frame["logit_b"] = frame["logit_b"].astype(object)
    frame.loc[2, "logit_b"] = ""
    frame.to_csv(three_folds.runs[1] / "oof.csv", index=False)
    with pytest.raises(DataError, match=rf"{three_folds.runs[1] / 'oof.csv'}: row id=7 column 'logit_b': not a finite"):
        join_oof(three_folds.runs)
