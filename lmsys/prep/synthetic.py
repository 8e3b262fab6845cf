"""The default dataset: SYNTHETIC arena battles in the Kaggle LMSYS ``train.csv`` format.

This is not human preference data. Every row is a question from a small fixed table (arithmetic with small
numbers, country capitals, colours of things, animal legs / sounds / babies) answered by two "models"; each
answer is correct or wrong, and the label follows correctness of the last turn:

* A wins when only A is correct, B wins when only B is correct, tie when both are right or both are wrong.
* ~10% of the rows have 2-3 turns; the earlier turns are answered correctly by both sides.
* ~3% of the rows have a ``null`` (JSON) response in the last turn, which counts as a wrong answer.

Questions and answers come in several phrasings, with optional chit-chat before/after the answer drawn
independently of correctness, and wrong answers are drawn from the same table as the right ones, so length is
not a cue. The fact tables are shared by all splits (a model can learn the facts in training); the rows of
different splits are distinct.

    python -m lmsys.synthetic out=data/default n_train=2000 n_valid=400 seed=0

Columns: ``id, model_a, model_b, prompt, response_a, response_b, winner_model_a, winner_model_b, winner_tie``,
where prompt/response_a/response_b are JSON lists of strings (one per turn, ``null`` allowed) and exactly one
winner column is 1.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

COLUMNS = [
    "id",
    "model_a",
    "model_b",
    "prompt",
    "response_a",
    "response_b",
    "winner_model_a",
    "winner_model_b",
    "winner_tie",
]
LABELS = ("a", "b", "tie")
LABEL_PROBS = (0.35, 0.35, 0.30)
P_TIE_BOTH_CORRECT = 0.55
P_MULTI_TURN = 0.10
P_NULL_TURN = 0.03
P_IDK = 0.5  # share of wrong answers that are evasive instead of a wrong value: a signal a 135M model picks up within minutes

MODEL_NAMES = (
    "gpt-4-0613",
    "gpt-3.5-turbo-0613",
    "claude-2.1",
    "claude-instant-1",
    "llama-2-13b-chat",
    "llama-2-70b-chat",
    "vicuna-13b",
    "mistral-7b-instruct",
    "mixtral-8x7b-instruct-v0.1",
    "gemini-pro",
    "zephyr-7b-beta",
    "openchat-3.5",
)

# ---------------------------------------------------------------------------------------------------------------
# Fact tables

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Egypt": "Cairo", "Russia": "Moscow", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "India": "New Delhi", "Mexico": "Mexico City", "the United Kingdom": "London",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Austria": "Vienna", "Argentina": "Buenos Aires", "Kenya": "Nairobi", "Peru": "Lima",
    "Turkey": "Ankara", "South Korea": "Seoul", "Thailand": "Bangkok", "the Netherlands": "Amsterdam",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Cuba": "Havana", "Chile": "Santiago",
}  # fmt: skip

COLORS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "fresh snow": "white", "a ripe banana": "yellow",
    "coal": "black", "blood": "red", "a ripe tomato": "red", "a carrot": "orange", "milk": "white",
    "milk chocolate": "brown", "a lemon": "yellow", "a pumpkin": "orange", "a flamingo": "pink",
    "an eggplant": "purple", "a fire truck": "red", "a school bus": "yellow", "a crow": "black",
    "an elephant": "gray", "a cucumber": "green", "a strawberry": "red", "a polar bear": "white",
    "a frog": "green", "a plum": "purple", "a tree trunk": "brown",
}  # fmt: skip
COLOR_VALUES = sorted(set(COLORS.values()))

LEGS = {
    "spider": 8, "dog": 4, "cat": 4, "chicken": 2, "ant": 6, "horse": 4, "duck": 2, "beetle": 6, "crab": 10,
    "cow": 4, "bee": 6, "ostrich": 2, "scorpion": 8, "lobster": 10, "goat": 4, "penguin": 2,
}  # fmt: skip
LEG_VALUES = (2, 4, 6, 8, 10)

SOUNDS = {
    "cow": ("moo",), "dog": ("woof", "bark"), "cat": ("meow",), "sheep": ("baa",), "duck": ("quack",),
    "pig": ("oink",), "lion": ("roar",), "owl": ("hoot",), "horse": ("neigh",), "snake": ("hiss",),
    "bee": ("buzz",), "frog": ("croak",), "rooster": ("cock-a-doodle-doo",), "mouse": ("squeak",),
}  # fmt: skip
SOUND_VALUES = sorted({s for v in SOUNDS.values() for s in v})

BABIES = {
    "cat": "kitten", "dog": "puppy", "cow": "calf", "sheep": "lamb", "horse": "foal", "goat": "kid",
    "duck": "duckling", "frog": "tadpole", "bear": "cub", "kangaroo": "joey", "swan": "cygnet", "pig": "piglet",
    "chicken": "chick", "deer": "fawn", "owl": "owlet", "goose": "gosling",
}  # fmt: skip
BABY_VALUES = sorted(set(BABIES.values()))

NUMBER_WORDS = {2: "two", 4: "four", 6: "six", 8: "eight", 10: "ten"}
OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}

# ---------------------------------------------------------------------------------------------------------------
# Phrasings. Question templates get the fact's subject; answer templates the (right or wrong) value.

ARITH_Q = (
    "What is {a} {op} {b}?",
    "What is {a} {word} {b}?",
    "Compute {a} {op} {b}.",
    "Can you tell me what {a} {word} {b} is?",
    "Quick math question: {a} {op} {b} = ?",
    "Please calculate {a} {word} {b}.",
)
ARITH_A = (
    "{a} {op} {b} = {v}.",
    "The answer is {v}.",
    "{a} {word} {b} equals {v}.",
    "That would be {v}.",
    "It's {v}.",
    "The result is {v}.",
)
CAPITAL_Q = (
    "What is the capital of {x}?",
    "Which city is the capital of {x}?",
    "Name the capital city of {x}.",
    "Tell me the capital of {x}, please.",
    "What's the capital of {x}?",
)
CAPITAL_A = (
    "The capital of {x} is {v}.",
    "{v}.",
    "It's {v}.",
    "{v} is the capital of {x}.",
    "That would be {v}.",
)
COLOR_Q = (
    "What color is {x}?",
    "What is the usual color of {x}?",
    "Which color is {x} typically?",
    "Tell me the color of {x}.",
)
COLOR_A = ("{X} is {v}.", "It is {v}.", "Usually {v}.", "The color is {v}.", "{V}.")
LEGS_Q = (
    "How many legs does a {x} have?",
    "How many legs has a {x} got?",
    "Count the legs of a {x}.",
    "A {x} has how many legs?",
)
LEGS_A = ("A {x} has {v} legs.", "{V} legs.", "It has {v} legs.", "The answer is {v}.")
SOUND_Q = (
    "What sound does a {x} make?",
    "What noise does a {x} make?",
    "Which sound do you hear from a {x}?",
    "How does a {x} sound?",
)
SOUND_A = ('A {x} goes "{v}".', 'It says "{v}".', "{V}!", 'It makes a "{v}" sound.')
BABY_Q = (
    "What is a baby {x} called?",
    "What do you call a young {x}?",
    "What's the name for a baby {x}?",
    "A baby {x} is called what?",
)
BABY_A = ("A baby {x} is called a {v}.", "It's called a {v}.", "{V}.", "The answer is: {v}.")

PREFIXES = ("Sure! ", "Of course. ", "Good question! ", "Let me think. ", "Easy one: ", "Okay. ")
SUFFIXES = (" Hope this helps!", " Let me know if you have more questions.", " :)", " Anything else?")
IDK = (
    "I'm not sure, sorry.",
    "I don't know that one.",
    "I cannot answer that.",
    "Hmm, no idea.",
    "Sorry, I can't help with that.",
    "I would rather not guess.",
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _articles(s: str) -> str:
    """'a ostrich' -> 'an ostrich' (the animal templates say 'a {x}')."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", s)


# ---------------------------------------------------------------------------------------------------------------
# Questions: each category returns (prompt, correct_values, wrong_values, render(value) -> answer text)


class _Question:
    def __init__(self, category, prompt, correct, wrong, answer_templates, fields):
        self.category = category
        self.prompt = prompt
        self.correct = list(correct)
        self.wrong = list(wrong)
        self._templates = answer_templates
        self._fields = fields

    def answer(self, rng: random.Random, value) -> str:
        text = str(value)
        if self.category == "legs" and rng.random() < 0.3:
            text = NUMBER_WORDS[value]
        tpl = rng.choice(self._templates)
        return _articles(tpl.format(v=text, V=_cap(text), **self._fields))


def _arith(rng: random.Random) -> _Question:
    op = rng.choice("++--*")
    if op == "+":
        a, b = rng.randint(1, 12), rng.randint(1, 12)
    elif op == "-":
        a = rng.randint(2, 15)
        b = rng.randint(1, a - 1)
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    word, fn = OPS[op]
    v = fn(a, b)
    wrong = sorted({v + d for d in (-3, -2, -1, 1, 2, 3, 10) if v + d >= 0} - {v})
    f = {"a": a, "b": b, "op": op, "word": word}
    return _Question("arith", rng.choice(ARITH_Q).format(**f), [v], wrong, ARITH_A, f)


def _capital(rng: random.Random) -> _Question:
    x = rng.choice(sorted(CAPITALS))
    v = CAPITALS[x]
    wrong = sorted(set(CAPITALS.values()) - {v})
    f = {"x": x}
    return _Question("capital", _cap(rng.choice(CAPITAL_Q).format(**f)), [v], wrong, CAPITAL_A, f)


def _fact(rng: random.Random, category: str, table: dict, values, questions, answers, articles: bool) -> _Question:
    """A question about one entry of a fact table; a tuple entry holds several right answers."""
    x = rng.choice(sorted(table))
    right = table[x] if isinstance(table[x], tuple) else [table[x]]
    fields = {"x": x, "X": _cap(x)}
    wrong = [w for w in values if w not in right]
    prompt = rng.choice(questions).format(**fields)
    return _Question(category, _articles(prompt) if articles else prompt, right, wrong, answers, fields)


def _color(rng: random.Random) -> _Question:
    return _fact(rng, "color", COLORS, COLOR_VALUES, COLOR_Q, COLOR_A, articles=False)


def _legs(rng: random.Random) -> _Question:
    return _fact(rng, "legs", LEGS, LEG_VALUES, LEGS_Q, LEGS_A, articles=True)


def _sound(rng: random.Random) -> _Question:
    return _fact(rng, "sound", SOUNDS, SOUND_VALUES, SOUND_Q, SOUND_A, articles=True)


def _baby(rng: random.Random) -> _Question:
    return _fact(rng, "baby", BABIES, BABY_VALUES, BABY_Q, BABY_A, articles=True)


CATEGORIES = (
    (_arith, 0.35),
    (_capital, 0.22),
    (_color, 0.15),
    (_legs, 0.10),
    (_sound, 0.09),
    (_baby, 0.09),
)


def _question(rng: random.Random) -> _Question:
    makers, weights = zip(*CATEGORIES)
    return rng.choices(makers, weights=weights)[0](rng)


def _dress(rng: random.Random, text: str) -> str:
    """Optional chit-chat around an answer, drawn independently of correctness."""
    if rng.random() < 0.2:
        text = rng.choice(PREFIXES) + text
    if rng.random() < 0.15:
        text = text + rng.choice(SUFFIXES)
    return text


def _response(rng: random.Random, q: _Question, correct: bool) -> str:
    if correct:
        return _dress(rng, q.answer(rng, rng.choice(q.correct)))
    if rng.random() < P_IDK:
        return rng.choice(IDK)
    return _dress(rng, q.answer(rng, rng.choice(q.wrong)))


def make_row(rng: random.Random) -> dict:
    """One battle (without id/models): prompts, responses and the one-hot winner columns."""
    label = rng.choices(LABELS, weights=LABEL_PROBS)[0]
    with_null = rng.random() < P_NULL_TURN
    if with_null and label == "tie":
        both_correct = False  # a null answer is a wrong answer
    else:
        both_correct = rng.random() < P_TIE_BOTH_CORRECT
    ok_a, ok_b = {"a": (True, False), "b": (False, True), "tie": (both_correct, both_correct)}[label]

    n_turns = rng.choice((2, 2, 3)) if rng.random() < P_MULTI_TURN else 1
    prompts, resp_a, resp_b = [], [], []
    for _ in range(n_turns - 1):
        q = _question(rng)
        prompts.append(q.prompt)
        resp_a.append(_response(rng, q, True))
        resp_b.append(_response(rng, q, True))
    q = _question(rng)
    prompts.append(q.prompt)
    last_a, last_b = _response(rng, q, ok_a), _response(rng, q, ok_b)
    if with_null:
        wrong_sides = [s for s, ok in (("a", ok_a), ("b", ok_b)) if not ok]
        side = rng.choice(wrong_sides)
        last_a, last_b = (None, last_b) if side == "a" else (last_a, None)
    resp_a.append(last_a)
    resp_b.append(last_b)
    return {
        "prompt": json.dumps(prompts),
        "response_a": json.dumps(resp_a),
        "response_b": json.dumps(resp_b),
        "winner_model_a": int(label == "a"),
        "winner_model_b": int(label == "b"),
        "winner_tie": int(label == "tie"),
    }


def generate_splits(n_train: int = 2000, n_valid: int = 400, seed: int = 0) -> dict[str, list[dict]]:
    """Rows for train and valid: deterministic in ``seed``; no (prompt, responses) triple occurs twice."""
    rng = random.Random(seed)
    seen: set[tuple[str, str, str]] = set()
    ids = iter(rng.sample(range(10_000_000, 99_999_999), n_train + n_valid))
    out: dict[str, list[dict]] = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows = []
        while len(rows) < n:
            row = make_row(rng)
            key = (row["prompt"], row["response_a"], row["response_b"])
            if key in seen:
                continue
            seen.add(key)
            model_a, model_b = rng.sample(MODEL_NAMES, 2)
            rows.append({"id": next(ids), "model_a": model_a, "model_b": model_b, **row})
        out[split] = rows
    return out


def write_splits(out_dir: str | Path, n_train: int = 2000, n_valid: int = 400, seed: int = 0) -> dict[str, Path]:
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate_splits(n_train, n_valid, seed).items():
        path = out_dir / f"{split}.csv"
        tmp = path.with_suffix(".csv.tmp")
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)
        tmp.replace(path)
        paths[split] = path
    return paths
