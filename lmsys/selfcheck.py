"""The one table that scripts/gpu_check.sh prints: the results of tests/gpu (pytest's JUnit XML) and the
throughput of the benchmark (its last JSON line) on a ~1B-parameter random Llama.

    python -m lmsys.selfcheck --junit JUNIT.xml [--bench BENCH.json]

Exits 1 when a check failed (or nothing ran), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

Row = tuple[str, str, str]  # check, result, detail


def junit_rows(junit_xml: str) -> list[Row]:
    """One row per test case: `pass`, `FAIL` (failure or error, with the first line of its message) or `skip`."""
    rows = []
    for case in ET.fromstring(junit_xml).iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        result = "pass" if outcome is None else "skip" if outcome.tag == "skipped" else "FAIL"
        message = "" if outcome is None else (outcome.get("message") or "").strip().splitlines()[:1]
        rows.append((case.get("name", "?"), result, message[0][:80] if message else ""))
    return rows


def bench_rows(bench: dict) -> list[Row]:
    """Training tokens/s packed vs padded, and each mode's peak GPU memory, from `python -m lmsys.bench`."""
    packed, padded = bench["train_real_tokens_per_s_packed"], bench["train_real_tokens_per_s_padded"]
    rows = [("train tokens/s, 1B Llama, packed vs padded", f"{packed / padded:.2f}x",
             f"{packed:,.0f} vs {padded:,.0f} real tokens/s")]
    for mode in ("padded", "packed"):
        rows.append((f"peak GPU memory, {mode}", f"{bench[f'peak_gpu_mb_{mode}'] / 1024:.1f} GiB", ""))
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table, columns padded to their widest cell (for the terminal and the README alike)."""
    header = ("check", "result", "detail")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
             for row in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--junit", type=Path, required=True, help="pytest --junitxml output of tests/gpu")
    parser.add_argument("--bench", type=Path, help="a file whose last line is the JSON line of lmsys.bench")
    args = parser.parse_args(argv)
    if not args.junit.is_file():
        parser.error(f"{args.junit}: no such file (did pytest run?)")
    rows = junit_rows(args.junit.read_text())
    if args.bench is not None:
        lines = args.bench.read_text().strip().splitlines()
        try:
            rows += bench_rows(json.loads(lines[-1]))
        except (IndexError, ValueError, KeyError) as err:
            rows.append(("throughput benchmark", "FAIL", f"{args.bench}: no benchmark result ({err!r})"[:80]))
    print(format_table(rows))
    ran = [row for row in rows if row[1] != "skip"]
    return 1 if not ran or any(row[1] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
