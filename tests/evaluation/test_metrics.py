import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss as sklearn_log_loss

from lmsys.evaluation.metrics import (
    accuracy,
    calibration_bins,
    class_prior_log_loss,
    evaluation_metrics,
    expected_calibration_error,
    log_loss,
    position_bias,
    save_reliability_diagram,
    subset_table,
    tta_combine,
)


def random_probs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.dirichlet(np.ones(3), size=n)


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(3)[labels]


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One label per row drawn from that row's probabilities."""
    # Only the first two cumulative sums: the last is 1 up to rounding and must not yield a label 3.
    return (rng.random(len(probs))[:, None] > probs.cumsum(axis=1)[:, :2]).sum(axis=1)


@pytest.mark.parametrize("n", [1, 7, 100, 5000])
def test_log_loss_matches_sklearn(n: int) -> None:
    rng = np.random.default_rng(n)
    probs = random_probs(rng, n)
    labels = rng.integers(0, 3, size=n)
    expected = sklearn_log_loss(labels, probs, labels=[0, 1, 2])
    assert log_loss(probs, one_hot(labels)) == pytest.approx(expected, abs=1e-9)


def test_log_loss_clips_zero_probability() -> None:
    loss = log_loss(np.array([[0.0, 1.0, 0.0]]), one_hot(np.array([0])))
    assert np.isfinite(loss) and loss == pytest.approx(-np.log(1e-15), rel=1e-6)


def test_log_loss_soft_targets() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    targets = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = (-(0.5 * np.log(0.5) + 0.5 * np.log(0.3)) - np.log(0.8)) / 2
    assert log_loss(probs, targets) == pytest.approx(expected, abs=1e-12)


def test_accuracy() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.2, 0.3, 0.5], [0.4, 0.5, 0.1]])
    assert accuracy(probs, one_hot(np.array([0, 1, 2, 0]))) == pytest.approx(0.75)


def test_two_class_ties_are_left_out_of_accuracy() -> None:
    # A (0.5, 0.5) target (data.ties=split) has no right answer: argmax counted it as A's, so the same tie scored
    # 1 or 0 by which side the model was shown as A.
    probs = np.array([[0.6, 0.4], [0.4, 0.6], [0.3, 0.7]])
    targets = np.array([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    assert accuracy(probs, targets) == 1.0 and accuracy(probs[::-1, ::-1], targets[::-1, ::-1]) == 1.0
    assert np.isnan(accuracy(probs[:2], targets[:2]))


def test_class_prior_log_loss_known_case() -> None:
    # Prior (0.5, 0.25, 0.25): half the rows cost -log 0.5, the rest -log 0.25.
    targets = one_hot(np.array([0, 0, 1, 2]))
    assert class_prior_log_loss(targets) == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(4), abs=1e-12)


def test_ece_near_zero_when_labels_drawn_from_probs() -> None:
    rng = np.random.default_rng(0)
    probs = random_probs(rng, 100_000)
    targets = one_hot(sample_labels(rng, probs))
    assert expected_calibration_error(probs, targets) < 0.01


def test_ece_large_when_overconfident() -> None:
    rng = np.random.default_rng(1)
    n = 10_000
    probs = np.tile([0.95, 0.03, 0.02], (n, 1))
    targets = one_hot(sample_labels(rng, np.tile([0.6, 0.2, 0.2], (n, 1))))
    ece = expected_calibration_error(probs, targets)
    assert ece > 0.1
    assert ece == pytest.approx(0.95 - 0.6, abs=0.02)


def one_bin_input(accuracy: float, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """n predictions at confidence 0.9 (bin 13 of 15) of which a fraction `accuracy` is right."""
    probs = np.tile([0.9, 0.05, 0.05], (n, 1))
    labels = np.where(np.arange(n) < round(accuracy * n), 0, 1)
    return probs, one_hot(labels)


def accuracy_bar_pixels(path) -> int:
    """Pixels of the accuracy bars' face colour: C0 (#1f77b4) at alpha 0.7 over white."""
    from matplotlib.image import imread

    rgb = imread(path)[..., :3] * 255.0
    face = 0.7 * np.array([31, 119, 180]) + 0.3 * 255.0
    return int((np.abs(rgb - face).max(axis=-1) < 6).sum())


def test_reliability_diagram_draws_the_bins(tmp_path) -> None:
    """Known input, known numbers: one bin at confidence 0.9 with accuracy a; the bar's area in the PNG grows
    linearly with a (axes fixed at [0, 1]), so the pixel increments of a = 0.2 -> 0.4 -> 0.8 are as 1 : 2."""
    probs, targets = one_bin_input(0.4)
    bins = calibration_bins(probs, targets)
    assert bins["count"][13] == 100 and bins["count"].sum() == 100
    assert bins["confidence"][13] == pytest.approx(0.9) and bins["accuracy"][13] == pytest.approx(0.4)
    assert expected_calibration_error(probs, targets) == pytest.approx(0.5)
    pixels = {}
    for fraction in (0.2, 0.4, 0.8):
        path = save_reliability_diagram(*one_bin_input(fraction), tmp_path / "plots" / f"rel{fraction}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels[fraction] = accuracy_bar_pixels(path)
    small, large = pixels[0.4] - pixels[0.2], pixels[0.8] - pixels[0.4]
    assert small > 100  # the bar is drawn and its height follows the accuracy
    assert large / small == pytest.approx(2.0, rel=0.1)


def test_subset_table() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    targets = one_hot(np.array([0, 0, 2, 0, 1]))
    frame = pd.DataFrame({
        "n_turns": [1, 3, 1, 2, 1],
        "language": ["English", "English", "German", None, "English"],
        "source": [None] * 5,
        "prompt_tokens": [10, 64, 65, 2000, 1024],
    }, index=[10, 11, 12, 13, 14])
    rows = {(row["subset"], row["value"]): row for row in subset_table(probs, targets, frame)}

    assert set(rows) == {
        ("n_turns", "single_turn"), ("n_turns", "multi_turn"),
        ("language", "English"), ("language", "German"),
        ("prompt_tokens", "prompt_tokens<=64"), ("prompt_tokens", "prompt_tokens=65-256"),
        ("prompt_tokens", "prompt_tokens=257-1024"), ("prompt_tokens", "prompt_tokens>1024"),
    }
    single = rows[("n_turns", "single_turn")]
    assert single["n"] == 3
    assert single["log_loss"] == pytest.approx(log_loss(probs[[0, 2, 4]], targets[[0, 2, 4]]))
    assert single["accuracy"] == pytest.approx(2 / 3)
    assert rows[("language", "English")]["n"] == 3
    assert rows[("prompt_tokens", "prompt_tokens<=64")]["n"] == 2
    assert rows[("prompt_tokens", "prompt_tokens=257-1024")]["n"] == 1
    json.dumps(list(rows.values()))


def test_subset_table_rejects_misaligned_frame() -> None:
    with pytest.raises(ValueError, match="rows"):
        subset_table(np.full((2, 3), 1 / 3), one_hot(np.array([0, 1])), pd.DataFrame({"n_turns": [1]}))


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_tta_combine_symmetric_and_normalised(mode: str) -> None:
    rng = np.random.default_rng(3)
    a, b = random_probs(rng, 50), random_probs(rng, 50)
    combined = tta_combine(a, b, mode)
    np.testing.assert_allclose(combined, tta_combine(b, a, mode))
    np.testing.assert_allclose(combined.sum(axis=1), 1.0)
    np.testing.assert_allclose(tta_combine(a, a, mode), a)


def test_tta_combine_values() -> None:
    a, b = np.array([[0.6, 0.2, 0.2]]), np.array([[0.2, 0.6, 0.2]])
    np.testing.assert_allclose(tta_combine(a, b, "prob"), [[0.4, 0.4, 0.2]])
    geometric = np.sqrt(a * b)
    np.testing.assert_allclose(tta_combine(a, b, "logit"), geometric / geometric.sum())
    with pytest.raises(ValueError, match="mode"):
        tta_combine(a, b, "median")


def test_position_bias_known_arrays() -> None:
    p_ab = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    p_ba_back = np.array([[0.4, 0.5, 0.1], [0.2, 0.5, 0.3]])
    assert position_bias(p_ab, p_ba_back) == pytest.approx(0.1)
    assert position_bias(p_ab, p_ab) == 0.0


def test_evaluation_metrics_single_pass() -> None:
    rng = np.random.default_rng(4)
    probs = random_probs(rng, 200)
    targets = one_hot(sample_labels(rng, probs))
    metrics = evaluation_metrics(probs, targets)
    assert set(metrics) == {"log_loss", "accuracy", "prior_log_loss", "ece", "n"}
    assert metrics["log_loss"] == pytest.approx(log_loss(probs, targets))
    assert metrics["n"] == 200
    json.dumps(metrics)


def test_evaluation_metrics_with_tta() -> None:
    rng = np.random.default_rng(5)
    probs_ab, probs_ba_back = random_probs(rng, 200), random_probs(rng, 200)
    targets = one_hot(sample_labels(rng, probs_ab))
    frame = pd.DataFrame({"n_turns": rng.integers(1, 4, size=200)})
    metrics = evaluation_metrics(probs_ab, targets, frame=frame, probs_ba_back=probs_ba_back, tta_mode="logit")
    assert set(metrics) == {
        "log_loss", "accuracy", "prior_log_loss", "ece", "n", "subsets", "tta_mode",
        "log_loss_no_tta", "accuracy_no_tta", "log_loss_swapped_only", "position_bias",
    }
    combined = tta_combine(probs_ab, probs_ba_back, "logit")
    assert metrics["log_loss"] == pytest.approx(log_loss(combined, targets))
    assert metrics["log_loss_no_tta"] == pytest.approx(log_loss(probs_ab, targets))
    assert metrics["log_loss_swapped_only"] == pytest.approx(log_loss(probs_ba_back, targets))
    assert metrics["position_bias"] == pytest.approx(position_bias(probs_ab, probs_ba_back))
    assert sum(row["n"] for row in metrics["subsets"]) == 200
    assert all(type(v) in (float, int, str, list) for v in metrics.values())
    json.dumps(metrics)
