"""Grading the synthetic default dataset from its text alone (lmsys/prep/synthetic.py): whether a response answers
its question, and the label that correctness implies. Used by the tests to check that every label is consistent."""

from __future__ import annotations

import json
import re

from lmsys.prep.synthetic import (
    BABIES,
    BABY_VALUES,
    CAPITALS,
    COLOR_VALUES,
    COLORS,
    LABELS,
    LEGS,
    NUMBER_WORDS,
    OPS,
    SOUND_VALUES,
    SOUNDS,
)

_ARITH_RE = re.compile(r"(\d+) (?:([+*-])|(plus|minus|times)) (\d+)")
_WORD_OP = {"plus": "+", "minus": "-", "times": "*"}
_NUM_RE = re.compile(r"\b(\d+|two|four|six|eight|ten)\b")
_WORD_NUM = {w: n for n, w in NUMBER_WORDS.items()}


def _word_re(words) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE), w) for w in words]


_CAPITAL_RES = _word_re(CAPITALS)
_LEGS_RES = _word_re(LEGS)
_SOUND_RES = _word_re(SOUNDS)
_BABY_RES = _word_re(BABIES)
_VALUE_RES = {
    cat: [(re.compile(rf"(?<![\w-]){re.escape(v)}(?![\w-])", re.IGNORECASE), v) for v in values]
    for cat, values in (
        ("capital", sorted(CAPITALS.values())),
        ("color", COLOR_VALUES),
        ("sound", SOUND_VALUES),
        ("baby", BABY_VALUES),
    )
}


def answer_key(prompt: str) -> tuple[str, set]:
    """(category, right values) for a generated question, read from its text."""
    m = _ARITH_RE.search(prompt)
    if m:
        a, b = int(m.group(1)), int(m.group(4))
        op = m.group(2) or _WORD_OP[m.group(3)]
        return "arith", {OPS[op][1](a, b)}
    if "capital" in prompt:
        for pat, x in _CAPITAL_RES:
            if pat.search(prompt):
                return "capital", {CAPITALS[x]}
    if "color" in prompt:
        for x in sorted(COLORS, key=len, reverse=True):
            if x in prompt:
                return "color", {COLORS[x]}
    for cat, keys, res, table in (
        ("legs", ("legs",), _LEGS_RES, LEGS),
        ("sound", ("sound", "noise"), _SOUND_RES, SOUNDS),
        ("baby", ("baby", "young"), _BABY_RES, BABIES),
    ):
        if any(k in prompt for k in keys):
            for pat, x in res:
                if pat.search(prompt):
                    v = table[x]
                    return cat, set(v) if isinstance(v, tuple) else {v}
    raise ValueError(f"not a generated question: {prompt!r}")


def grade(prompt: str, response: str | None) -> bool:
    """Whether ``response`` answers ``prompt`` correctly; a null response is wrong."""
    if response is None:
        return False
    category, right = answer_key(prompt)
    if category in ("arith", "legs"):
        nums = _NUM_RE.findall(response.lower())
        if not nums:
            return False
        last = nums[-1]
        return (_WORD_NUM[last] if last in _WORD_NUM else int(last)) in right
    found = {v for pat, v in _VALUE_RES[category] if pat.search(response)}
    return bool(found) and found <= right


def label_of(row: dict) -> str:
    return LABELS[[row["winner_model_a"], row["winner_model_b"], row["winner_tie"]].index(1)]


def expected_label(prompt_json: str, response_a_json: str, response_b_json: str) -> str:
    prompt = json.loads(prompt_json)[-1]
    ok_a = grade(prompt, json.loads(response_a_json)[-1])
    ok_b = grade(prompt, json.loads(response_b_json)[-1])
    return "a" if ok_a and not ok_b else "b" if ok_b and not ok_a else "tie"


