"""The data report of the prepare step: `report.md` (markdown tables) and one length histogram PNG per text column.

Lengths are tokens of the model family's tokenizer when one is given, else whitespace-separated words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lmsys.cli import CommandError, one_line

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
CLASS_NAMES = ("A", "B", "tie")
# The truncation estimate adds this many tokens for the instruction and the chat-template markers around the texts.
MARKER_TOKENS = 64
TOKENIZE_CHUNK = 2048  # texts per tokenizer call: only the lengths are kept, never all the ids at once


@dataclass(frozen=True)
class LengthCounter:
    """Counts the length of each text in a unit the report names (`unit`)."""

    unit: str
    count: Callable[[list[str]], list[int]]


def word_counter() -> LengthCounter:
    return LengthCounter("whitespace-separated words", lambda texts: [len(text.split()) for text in texts])


def tokenizer_counter(path: str) -> LengthCounter:
    """Token counts without special tokens, as `PairEncoder.tokenize` counts each turn."""
    # The tokenizer alone: lmsys.builders would also import torch and the model stack, which a report does not need.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CommandError(f"tokenizer_path={path}: no tokenizer there ({one_line(err)})") from err

    def count(texts: list[str]) -> list[int]:
        lengths = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            ids = tokenizer(texts[start : start + TOKENIZE_CHUNK], add_special_tokens=False, verbose=False)["input_ids"]
            lengths += [len(row) for row in ids]
        return lengths

    return LengthCounter(f"tokens of the tokenizer in {path}", count)


def column_lengths(frame: pd.DataFrame, counter: LengthCounter) -> pd.DataFrame:
    """Per row and text column, the summed length of its turns."""
    lengths = {}
    for column in TEXT_COLUMNS:
        turns = frame[column].tolist()
        counts = iter(counter.count([text for row in turns for text in row]))
        lengths[column] = [sum(next(counts) for _ in row) for row in turns]
    return pd.DataFrame(lengths, index=frame.index)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of `frame` as it is (format numbers before)."""
    def cells(values) -> str:
        return "| " + " | ".join(str(value).replace("|", "\\|") for value in values) + " |"

    rows = [cells(frame.columns), "|" + "---|" * len(frame.columns)]
    return "\n".join(rows + [cells(row) for row in frame.itertuples(index=False)])


def percent(share: float) -> str:
    return "-" if pd.isna(share) else f"{100 * share:.1f}%"


def label_balance(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Rows and the mean target (A, B, tie) per value of `by`; soft labels count by their probabilities."""
    targets = pd.DataFrame(frame["target"].tolist(), columns=list(CLASS_NAMES), index=frame.index)
    table = targets.groupby(frame[by]).mean().map(percent)
    table.insert(0, "rows", frame.groupby(by).size())
    return table.reset_index()


def source_table(frame: pd.DataFrame, lengths: pd.DataFrame, max_length: int) -> pd.DataFrame:
    """Per source: rows, label balance of its labelled rows, multi-turn share and share cut at max_length."""
    stats = pd.DataFrame({
        "source": frame["source"],
        "labelled": frame["target"].notna(),
        "multi-turn": frame["n_turns"] > 1,
        f"cut at {max_length}": lengths.sum(axis=1) + MARKER_TOKENS > max_length,
    })
    table = stats.groupby("source").agg(
        rows=("labelled", "size"), labelled=("labelled", "sum"),
        multi_turn=("multi-turn", "mean"), cut=(f"cut at {max_length}", "mean"),
    )
    labelled = frame[frame["target"].notna()]
    if len(labelled):
        balance = label_balance(labelled, "source").drop(columns="rows").set_index("source")
        table = table.join(balance)
    table = table.reindex(columns=["rows", "labelled", *[c for c in CLASS_NAMES if c in table], "multi_turn", "cut"])
    table["multi_turn"] = table["multi_turn"].map(percent)
    table["cut"] = table["cut"].map(percent)
    return table.fillna("-").rename(columns={"multi_turn": "multi-turn", "cut": f"cut at {max_length}"}).reset_index()


def length_table(lengths: pd.DataFrame) -> pd.DataFrame:
    quantiles = lengths.quantile([0.1, 0.5, 0.9]).T.round().astype(int)
    quantiles.columns = ["p10", "median", "p90"]
    quantiles["max"] = lengths.max()
    return quantiles.rename_axis("column").reset_index()


def save_length_histogram(lengths: pd.Series, sources: pd.Series, unit: str, path: Path) -> None:
    """Stacked by source; lengths above the 99th percentile are drawn in the last bin so the bulk stays readable."""
    cap = float(np.percentile(lengths, 99))
    clipped = lengths.clip(upper=cap)
    names = sorted(sources.unique())
    # A bare Figure renders through Agg without touching pyplot's global backend state.
    fig = Figure(figsize=(7, 4))
    axes = fig.subplots()
    axes.hist([clipped[sources == name] for name in names], bins=50, stacked=True, label=names)
    for quantile, style in ((0.1, ":"), (0.5, "--"), (0.9, ":")):
        axes.axvline(lengths.quantile(quantile), color="black", linestyle=style, linewidth=1)
    axes.set(xlabel=f"{lengths.name} length ({unit}; last bin: >= p99 = {cap:.0f})", ylabel="rows",
             title=f"{lengths.name}: p10 / median / p90 = "
                   f"{lengths.quantile(0.1):.0f} / {lengths.median():.0f} / {lengths.quantile(0.9):.0f}")
    axes.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def write_report(
    output_dir: Path,
    frame: pd.DataFrame,
    accounting: pd.DataFrame,
    duplicates: pd.DataFrame,
    notes: list[str],
    counter: LengthCounter,
    max_length: int,
) -> None:
    """`frame`: one row per output pair with source, target (None when unlabeled), n_turns, fold and the texts."""
    lengths = column_lengths(frame, counter)
    for column in TEXT_COLUMNS:
        save_length_histogram(lengths[column], frame["source"], counter.unit, output_dir / f"lengths_{column}.png")
    labelled = frame[frame["target"].notna()]
    cut = (lengths.sum(axis=1) + MARKER_TOKENS > max_length).mean()
    sections = [
        "# Data report",
        _row_counts(len(labelled), len(frame) - len(labelled)),
        "\n".join(f"- {note}" for note in notes),
        "## Rows per input\nRows read = rejected + duplicates removed + kept.\n\n" + markdown_table(accounting),
        "## Duplicates removed per source\nSame prompt and same two responses, in either A/B order; the first "
        "occurrence is kept (labelled and unlabeled rows are compared separately). Each removed row is listed in duplicates.csv.\n\n" + _duplicates_section(duplicates),
        "## Per source\nA / B / tie: mean target of the labelled rows. "
        f"Cut at {max_length}: {_cut_definition(counter)}\n\n" + markdown_table(source_table(frame, lengths, max_length)),
    ]
    if len(labelled):
        sections.append("## Label balance per fold\n\n" + markdown_table(label_balance(labelled, "fold")))
    sections += [
        f"## Lengths ({counter.unit})\nPer row, the turns of a column summed.\n\n" + markdown_table(length_table(lengths)),
        f"- Rows that truncation at max_length={max_length} would cut: {percent(cut)} ({_cut_definition(counter)})",
        f"- Multi-turn rows: {percent((frame['n_turns'] > 1).mean())}",
        "\n".join(f"![{column} lengths](lengths_{column}.png)" for column in TEXT_COLUMNS),
    ]
    (output_dir / "report.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")


def _row_counts(n_labelled: int, n_unlabeled: int) -> str:
    unlabeled_file = " in unlabeled.parquet" if n_unlabeled else ""
    return f"{n_labelled} labelled rows in train.parquet, {n_unlabeled} unlabeled rows{unlabeled_file}."


def _cut_definition(counter: LengthCounter) -> str:
    return (f"an approximation, the row's three column lengths in {counter.unit} plus {MARKER_TOKENS} for the "
            f"instruction and template markers, above max_length.")


def _duplicates_section(duplicates: pd.DataFrame) -> str:
    if duplicates.empty:
        return "None."
    table = duplicates.groupby("source").agg(
        removed=("id", "size"), different_label=("same_label", lambda same: int(same.eq(False).sum())),
    )
    return markdown_table(table.rename(columns={"different_label": "with a different label than the kept row"})
                          .reset_index())
