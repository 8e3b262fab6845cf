import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from lmsys.config import ConfigError
from lmsys.data.io import DataError
from lmsys.ensemble import combine, fit_ensemble_weights, load_oof, main, parse_args, run_ensemble
from lmsys.evaluation.metrics import log_loss

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["winner_model_a", "winner_model_b", "winner_tie"]


def ensemble(argv: list[str]) -> None:
    """`python -m lmsys.ensemble` with its errors raised rather than printed."""
    run_ensemble(parse_args(argv))


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    return (rng.random(len(probs))[:, None] > probs.cumsum(axis=1)[:, :2]).sum(axis=1)


def mixture_case(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Three models; labels drawn from 0.7 * model1 + 0.3 * model2, the third model is noise."""
    rng = np.random.default_rng(seed)
    models = [rng.dirichlet(np.full(3, 0.7), size=n) for _ in range(3)]
    labels = sample_labels(rng, 0.7 * models[0] + 0.3 * models[1])
    return models, labels, np.eye(3)[labels]


def write_oof(path: Path, ids: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> Path:
    frame = pd.DataFrame(probs, columns=COLUMNS)
    frame.insert(0, "id", ids)
    frame["label"] = labels
    frame.to_csv(path, index=False)
    return path


def write_submission(path: Path, ids: np.ndarray, probs: np.ndarray) -> Path:
    frame = pd.DataFrame(probs, columns=COLUMNS)
    frame.insert(0, "id", ids)
    frame.to_csv(path, index=False)
    return path


def test_fit_recovers_mixture_weights() -> None:
    models, _, targets = mixture_case(20_000)
    weights, temperature = fit_ensemble_weights(models, targets)
    np.testing.assert_allclose(weights, [0.7, 0.3, 0.0], atol=0.05)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    assert temperature == 1.0
    assert log_loss(combine(models, weights, temperature), targets) <= log_loss(models[0], targets)


def test_fit_recovers_temperature() -> None:
    # A model twice as sharp as the truth: softmax(log(softmax(2z)) / 2) = softmax(z), so T = 2 is optimal.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5_000, 3))
    sharp = softmax(2 * logits, axis=1)
    weights, temperature = fit_ensemble_weights([sharp, sharp], softmax(logits, axis=1), fit_temperature=True)
    assert temperature == pytest.approx(2.0, rel=1e-3)
    assert weights.sum() == pytest.approx(1.0)


def test_combine_rows_sum_to_one() -> None:
    models, _, _ = mixture_case(100)
    for temperature in (0.5, 1.0, 3.0):
        np.testing.assert_allclose(combine(models, np.array([0.2, 0.5, 0.3]), temperature).sum(axis=1), 1.0)


def test_cli_end_to_end(tmp_path: Path) -> None:
    n = 3_000
    models, labels, _ = mixture_case(n, seed=2)
    ids = np.arange(1000, 1000 + n)
    # Each file in its own row order: alignment must go by id.
    orders = [np.arange(n), np.random.default_rng(3).permutation(n), np.arange(n)[::-1]]
    oofs = [write_oof(tmp_path / f"oof{m}.csv", ids[o], models[m][o], labels[o]) for m, o in enumerate(orders)]
    test_ids = np.array(["x9", "a1", "m5", "b2"])
    test_probs = [np.random.default_rng(4 + m).dirichlet(np.ones(3), size=4) for m in range(3)]
    subs = [write_submission(tmp_path / f"sub{m}.csv", test_ids[::-1] if m else test_ids,
                             test_probs[m][::-1] if m else test_probs[m]) for m in range(3)]
    out = tmp_path / "ens"

    result = subprocess.run(
        [sys.executable, "-m", "lmsys.ensemble", "--oof", *map(str, oofs), "--submissions", *map(str, subs),
         "--out", str(out), "--temperature"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert "ensemble" in result.stdout

    saved = json.loads((out / "weights.json").read_text())
    assert saved["models"] == [str(p) for p in oofs]
    assert sum(saved["weights"]) == pytest.approx(1.0)
    assert saved["weights"][0] > saved["weights"][2]
    assert saved["temperature"] > 0 and saved["oof_log_loss"] > 0

    submission = pd.read_csv(out / "submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == test_ids.tolist()
    np.testing.assert_allclose(submission[COLUMNS].sum(axis=1), 1.0, atol=1e-6)
    expected = combine(test_probs, np.array(saved["weights"]), saved["temperature"])
    np.testing.assert_allclose(submission[COLUMNS].to_numpy(), expected, atol=1e-9)

    # Re-applying the saved weights reproduces the submission without fitting.
    main(["--weights", str(out / "weights.json"), "--submissions", *map(str, subs), "--out", str(tmp_path / "again")])
    again = pd.read_csv(tmp_path / "again" / "submission.csv", dtype={"id": str})
    pd.testing.assert_frame_equal(again, submission)

    # Another ensemble into the same --out would leave the first one's submission beside its own weights: refused,
    # and with --overwrite the directory holds the second ensemble's files alone.
    with pytest.raises(SystemExit) as exit_info:
        main(["--oof", *map(str, oofs[:2]), "--out", str(out)])
    assert exit_info.value.code == 2 and json.loads((out / "weights.json").read_text()) == saved
    main(["--oof", *map(str, oofs[:2]), "--out", str(out), "--overwrite"])
    assert json.loads((out / "weights.json").read_text())["models"] == [str(p) for p in oofs[:2]]
    assert sorted(path.name for path in out.iterdir()) == ["weights.json"]


def test_soft_targets_preferred_over_label(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": [1, 2], "winner_model_a": [0.5, 0.2], "winner_model_b": [0.3, 0.3],
                          "winner_tie": [0.2, 0.5], "label": [0, 2], "target_a": [0.6, 0.0],
                          "target_b": [0.4, 0.1], "target_tie": [0.0, 0.9]})
    frame.to_csv(tmp_path / "oof.csv", index=False)
    _, _, targets = load_oof([str(tmp_path / "oof.csv")])
    np.testing.assert_allclose(targets, [[0.6, 0.4, 0.0], [0.0, 0.1, 0.9]])


def test_mismatched_ids_error(tmp_path: Path) -> None:
    probs, labels = np.full((3, 3), 1 / 3), np.array([0, 1, 2])
    first = write_oof(tmp_path / "a.csv", np.array([1, 2, 3]), probs, labels)
    second = write_oof(tmp_path / "b.csv", np.array([1, 2, 4]), probs, labels)
    with pytest.raises(ValueError, match=r"b\.csv.*1 missing.*'3'.*1 extra.*'4'"):
        ensemble(["--oof", str(first), str(second), "--out", str(tmp_path / "out")])


def valid_oof(path: Path) -> pd.DataFrame:
    frame = pd.DataFrame({"id": ["a", "b", "c"], "winner_model_a": [0.5, 0.2, 0.1], "winner_model_b": [0.3, 0.3, 0.1],
                          "winner_tie": [0.2, 0.5, 0.8], "label": [0, 2, 1]})
    frame.to_csv(path, index=False)
    return frame


@pytest.mark.parametrize(("column", "row", "value", "message"), [
    ("winner_model_a", 1, float("nan"), r"not a finite number in 1 row\(s\), e.g. ids \['b'\]"),
    ("winner_model_b", 2, -0.1, r"negative probability in 1 row\(s\), e.g. ids \['c'\]"),
    ("winner_tie", 0, 0.9, r"rows must sum to 1 .*ids \['a'\] do not"),
    ("label", 1, -1, r"column 'label': expected one of \[0, 1, 2\].*ids \['b'\]"),
    ("label", 0, 3, r"column 'label'.*ids \['a'\]"),
    ("label", 2, float("nan"), r"column 'label'.*ids \['c'\]"),
    ("label", 2, 1.5, r"column 'label'.*ids \['c'\]"),
    ("id", 1, None, r"data row 1 \(counting from 0\) column 'id': missing id"),
])
def test_invalid_oof_files_are_named(tmp_path: Path, column, row, value, message) -> None:
    good = tmp_path / "good.csv"
    frame = valid_oof(good)
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(DataError, match=rf"{bad}: .*{message}"):
        ensemble(["--oof", str(bad), str(good), "--out", str(tmp_path / "out")])
    if column != "label":  # the second file is checked as well, and a submission like an OOF file
        with pytest.raises(DataError, match=rf"{bad}: .*{message}"):
            ensemble(["--oof", str(good), str(bad), "--out", str(tmp_path / "out")])
        twin = tmp_path / "twin.csv"  # another model's file (the same file twice is refused)
        twin.write_bytes(good.read_bytes())
        with pytest.raises(DataError, match=rf"{bad}: .*{message}"):
            ensemble(["--oof", str(good), str(twin), "--submissions", str(good), str(bad),
                      "--out", str(tmp_path / "o")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()  # nothing created before the checks


def test_invalid_soft_targets_are_named(tmp_path: Path) -> None:
    frame = valid_oof(tmp_path / "oof.csv").assign(target_a=[1.0, 0.5, 0.2], target_b=[0.0, 0.6, 0.2],
                                                     target_tie=[0.0, 0.0, 0.6])
    frame.to_csv(tmp_path / "oof.csv", index=False)
    with pytest.raises(DataError, match=r"columns \['target_a', 'target_b', 'target_tie'\]: rows must sum.*\['b'\]"):
        load_oof([str(tmp_path / "oof.csv")])


def test_a_fit_that_does_not_converge_fails(monkeypatch) -> None:
    from scipy.optimize import minimize

    def one_iteration(*args, **kwargs):
        return minimize(*args, **{**kwargs, "options": {**kwargs["options"], "maxiter": 1}})

    monkeypatch.setattr("lmsys.ensemble.minimize", one_iteration)
    models, _, targets = mixture_case(2_000)
    with pytest.raises(DataError, match="did not converge"):
        fit_ensemble_weights(models, targets)


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_missing_id_in_a_parquet_file_is_named(tmp_path: Path, missing) -> None:
    """A parquet id cell can be null (a CSV one only empty): it would be written as a submission row without id."""
    frame = valid_oof(tmp_path / "good.csv").astype({"id": object})
    frame.loc[1, "id"] = missing
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad, index=False)
    for argv in (["--oof", str(bad), str(tmp_path / "good.csv")],
                 ["--oof", str(tmp_path / "good.csv"), "--submissions", str(bad)]):
        with pytest.raises(DataError, match=rf"^{bad}: data row 1 \(counting from 0\) column 'id': missing id$"):
            ensemble([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_temperature_with_given_weights_is_refused(tmp_path: Path, capsys) -> None:
    """--weights applies the temperature its weights.json holds: a --temperature beside it would do nothing."""
    good = tmp_path / "good.csv"
    valid_oof(good)
    with pytest.raises(SystemExit) as exit_info:
        main(["--weights", str(tmp_path / "w.json"), "--submissions", str(good), "--temperature", "--out",
              str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--weights applies the weights.json's own" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_status_2(tmp_path: Path, capsys) -> None:
    probs, labels = np.full((3, 3), 1 / 3), np.array([0, 1, 2])
    first = write_oof(tmp_path / "a.csv", np.array([1, 2, 3]), probs, labels)
    second = write_oof(tmp_path / "b.csv", np.array([1, 2, 4]), probs, labels)
    with pytest.raises(SystemExit) as exit_info:
        main(["--oof", str(first), str(second), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {second}: id set differs from the first file: 1 missing (e.g. ['3']), 1 extra (e.g. ['4'])\n"
    assert not (tmp_path / "out").exists()


def test_the_output_never_replaces_an_input(tmp_path: Path) -> None:
    probs, labels = np.full((3, 3), 1 / 3), np.array([0, 1, 2])
    oof = write_oof(tmp_path / "oof.csv", np.array([1, 2, 3]), probs, labels)
    (tmp_path / "ens").mkdir()
    sub = write_submission(tmp_path / "ens" / "submission.csv", np.array(["x"]), np.array([[0.2, 0.3, 0.5]]))
    before = sub.read_bytes()
    with pytest.raises(ConfigError, match=r"--out=.*ens contains the input --submissions\[0\]"):
        ensemble(["--oof", str(oof), "--submissions", str(sub), "--out", str(tmp_path / "ens")])
    with pytest.raises(ConfigError, match=r"--out=.*oof.csv is an existing file, not a directory"):
        ensemble(["--oof", str(oof), "--out", str(oof)])
    assert sub.read_bytes() == before and list((tmp_path / "ens").iterdir()) == [sub]
    with pytest.raises(ConfigError, match="2 --submissions for 1 --oof files"):
        ensemble(["--oof", str(oof), "--submissions", str(sub), str(sub), "--out", str(tmp_path / "other")])
    with pytest.raises(ConfigError, match=r"--oof: .*oof.csv is given twice; name each model's file once"):
        ensemble(["--oof", str(oof), str(tmp_path / "." / "oof.csv"), "--out", str(tmp_path / "other")])


def test_oof_files_must_share_their_labels(tmp_path: Path) -> None:
    probs = np.full((3, 3), 1 / 3)
    first = write_oof(tmp_path / "a.csv", np.array([1, 2, 3]), probs, np.array([0, 1, 2]))
    second = write_oof(tmp_path / "b.csv", np.array([3, 2, 1]), probs, np.array([2, 1, 1]))  # id 1: 1, not 0
    with pytest.raises(DataError, match=rf"{second}: targets differ from {first}'s in 1 row\(s\), e.g. ids \['1'\]"):
        load_oof([str(first), str(second)])


def test_the_parquet_of_oof_join_reads_with_ids_as_written(tmp_path: Path) -> None:
    frame = valid_oof(tmp_path / "unused.csv").assign(id=["NA", "007", "null"])
    frame.to_parquet(tmp_path / "oof.parquet")
    frame.to_csv(tmp_path / "oof.csv", index=False)
    for path in ("oof.parquet", "oof.csv"):
        ids, probs, targets = load_oof([str(tmp_path / path)])
        assert list(ids) == ["NA", "007", "null"] and targets.argmax(1).tolist() == [0, 2, 1]
        np.testing.assert_allclose(probs[0], frame[COLUMNS].to_numpy())


def test_two_class_models_ensemble_into_a_wsdm_submission(tmp_path: Path) -> None:
    """WSDM: (A, B) OOF files, labels 0/1, probability tables of the test pairs (predict's probs_output) in, and
    WSDM's `id, winner` out; a hard-label submission or a three-class file among them is refused."""
    rng = np.random.default_rng(5)
    models = [rng.dirichlet(np.ones(2), size=400) for _ in range(2)]
    labels = (rng.random(400) < models[0][:, 1]).astype(int)  # drawn from the first model
    oofs = []
    for m, probs in enumerate(models):
        frame = pd.DataFrame(probs, columns=COLUMNS[:2]).assign(label=labels)
        frame.insert(0, "id", [f"r{i}" for i in range(400)])
        frame.to_csv(tmp_path / f"oof{m}.csv", index=False)
        oofs.append(str(tmp_path / f"oof{m}.csv"))
    test = [np.array([[0.9, 0.1], [0.2, 0.8], [0.45, 0.55]]), np.array([[0.1, 0.9], [0.3, 0.7], [0.6, 0.4]])]
    subs = [tmp_path / f"probs{m}.csv" for m in range(2)]
    for path, probs in zip(subs, test):
        pd.DataFrame(probs, columns=COLUMNS[:2]).assign(id=["t0", "t1", "t2"]).to_csv(path, index=False)
    ensemble(["--oof", *oofs, "--submissions", *map(str, subs), "--out", str(tmp_path / "ens")])
    weights = json.loads((tmp_path / "ens" / "weights.json").read_text())["weights"]
    assert weights[0] > 0.8
    submission = pd.read_csv(tmp_path / "ens" / "submission.csv")
    mixed = weights[0] * test[0] + weights[1] * test[1]
    assert list(submission.columns) == ["id", "winner"] and submission["id"].tolist() == ["t0", "t1", "t2"]
    assert submission["winner"].tolist() == np.where(mixed[:, 0] >= mixed[:, 1], "model_a", "model_b").tolist()
    hard = tmp_path / "wsdm.csv"
    submission.to_csv(hard, index=False)
    with pytest.raises(DataError, match=rf"{hard}: holds a two-class model's submission \(id, winner\)"):
        ensemble(["--oof", *oofs, "--submissions", str(subs[0]), str(hard), "--out", str(tmp_path / "e2")])
    three = write_oof(tmp_path / "three.csv", np.array([f"r{i}" for i in range(400)]), np.full((400, 3), 1 / 3),
                      labels)
    with pytest.raises(DataError, match=r"three.csv: probability columns .*winner_tie'\], the first file's"):
        ensemble(["--oof", oofs[0], str(three), "--out", str(tmp_path / "e3")])


def test_a_temperature_at_its_bound_is_said(tmp_path: Path, capsys) -> None:
    """Uninformative OOF predictions (labels drawn independently of them) push T to its upper bound."""
    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.ones(3) * 0.3, size=600)
    oof = write_oof(tmp_path / "oof.csv", np.arange(600), probs, rng.integers(0, 3, size=600))
    ensemble(["--oof", str(oof), "--out", str(tmp_path / "ens"), "--temperature"])
    assert json.loads((tmp_path / "ens" / "weights.json").read_text())["temperature"] == pytest.approx(20.0, rel=1e-3)
    assert "warning: the fitted temperature 20 sits at its bound (0.05 to 20)" in capsys.readouterr().err
