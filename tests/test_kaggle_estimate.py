"""`python -m lmsys.kaggle estimate`: the cost model's projections (exact arithmetic on a fixed measurement) and
the command end to end on a tiny model (numbers produced and consistent with each other)."""

from __future__ import annotations

import json

import pytest
from test_predict import make_checkpoint
from tiny import arena_frame

import lmsys.kaggle.estimate as estimate_module
from lmsys.kaggle.estimate import Measurement, largest_fitting_length, pair_units, projected_hours
from lmsys.kaggle.estimate import main as estimate_main

# 100 s load, 1 ms tokenizing a pair, 10 s for a sample of 1,000 units: 0.01 s per unit
MEASURED = Measurement(load_seconds=100.0, tokenize_seconds_per_pair=0.001, predict_seconds=10.0, sample_units=1000.0,
                       measured_max_length=512)


def test_pair_units_linear_plus_attention_square():
    assert pair_units([100, 300], None) == 400.0
    assert pair_units([100, 300], 100.0) == 100 * 2 + 300 * 4


def test_projection_arithmetic():
    # 3,600 rows of 10 units: 3,600 * (0.001 + 10 * 0.01) s = 363.6 s, plus the 100 s load
    assert projected_hours(MEASURED, 10.0, 3600, 1, tta=False) == pytest.approx((100 + 363.6) / 3600)
    assert projected_hours(MEASURED, 10.0, 3600, 1, tta=True) == pytest.approx((100 + 3600 * 0.201) / 3600)
    assert projected_hours(MEASURED, 10.0, 3600, 2, tta=False) == pytest.approx((100 + 363.6 / 2) / 3600)


def test_largest_fitting_length_grows_with_the_limit():
    units_at = {128: 100.0, 256: 220.0, 512: 500.0, 1024: 1200.0}  # mean units per pair at each max_length
    fits = [largest_fitting_length(MEASURED, units_at, 3600, 1, limit, tta=True) for limit in (0.01, 3, 5, 12, 30, 99)]
    assert fits == [None, 128, 256, 512, 1024, 1024]  # with TTA: 2.03 h, 4.43 h, 10.03 h, 24.03 h


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("estimate")
    checkpoint = make_checkpoint(root / "checkpoint", tiny_models["llama"], seed=6)
    arena_frame(30, seed=11, labelled=False).to_csv(root / "test.csv", index=False)
    return {"root": root, "checkpoint": checkpoint, "test": root / "test.csv"}


def run(setup, capsys, *extra: str) -> dict:
    result = estimate_main([f"checkpoint={setup['checkpoint']}", f"data.test_path={setup['test']}", "sample=12",
                            "warmup=3", "show_progress=false", *extra])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == result and printed[1].startswith("  without TTA: ")
    return result


def test_estimate_end_to_end(setup, capsys):
    result = run(setup, capsys)
    assert result["sample"] == 12 and result["max_length"] == 128 and result["sample_pairs_per_second"] > 0
    # TTA repeats the prediction pass, not the load nor the tokenization: between 1x and 2x
    assert result["hours_no_tta"] < result["hours_tta"] < 2 * result["hours_no_tta"]
    assert result["fits_tta"] and result["largest_max_length_tta"] == result["untruncated_max_length"]
    assert result["untruncated_max_length"] is not None and result["untruncated_max_length"] % 128 == 0
    tight = run(setup, capsys, "limit_hours=1e-7")
    assert not tight["fits_no_tta"] and tight["largest_max_length_tta"] is None  # below the model load time


def test_estimate_grows_with_rows_and_shrinks_with_processes(setup, capsys, monkeypatch):
    fixed = Measurement(1.0, 0.0, 2.0, 500.0, 128)  # one measurement for the three projections
    monkeypatch.setattr(estimate_module, "measure", lambda config, spec, sample, warm, acc: (fixed, _tokenizer(setup)))
    base = run(setup, capsys, "rows=1000")
    double = run(setup, capsys, "rows=2000")
    split = run(setup, capsys, "rows=2000", "processes=2")
    load_hours = 1.0 / 3600
    assert double["hours_no_tta"] - load_hours == pytest.approx(2 * (base["hours_no_tta"] - load_hours), rel=1e-3)
    assert split["hours_tta"] == pytest.approx(base["hours_tta"], rel=1e-3)


def _tokenizer(setup):
    from lmsys.builders import build_tokenizer

    return build_tokenizer(setup["checkpoint"], False)


def test_bad_test_file_fails_before_loading(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(estimate_module, "measure", lambda *args: pytest.fail("a model was loaded"))
    arena_frame(4, seed=1, labelled=False).drop(columns=["response_b"]).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SystemExit) as exited:
        estimate_main([f"checkpoint={setup['checkpoint']}", f"data.test_path={tmp_path / 't.csv'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and err.startswith("error: ") and "response_b" in err


def test_estimate_refuses_several_processes_and_lengths_past_the_models_positions(setup, capsys, monkeypatch):
    """Launched on two processes each would time its share and the projection divide by processes again; a
    max_length past the model's 1024 positions was estimated as fitting (and the largest that fits said 1024)."""
    monkeypatch.setattr(estimate_module, "measure", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exited:
        estimate_main([f"checkpoint={setup['checkpoint']}", f"data.test_path={setup['test']}", "max_length=2048"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: max_length=2048 exceeds the 1024 positions of the model")

    class TwoProcesses:
        num_processes, is_main_process = 2, True

    monkeypatch.setattr(estimate_module, "Accelerator", TwoProcesses)
    with pytest.raises(SystemExit) as exited:
        estimate_main([f"checkpoint={setup['checkpoint']}", f"data.test_path={setup['test']}"])
    assert exited.value.code == 2 and "estimate runs in one process (launched with 2)" in capsys.readouterr().err
