"""Token-budget properties: water_fill, head_tail, and the encoder built on them."""

import random

import pytest
import tiny

from lmsys.config import ConfigError, InputFormat, Template
from lmsys.data.formatting import PairEncoder
from lmsys.data.schema import Pair
from lmsys.data.templates import CHAT_MARKERS
from lmsys.data.truncation import head_tail, water_fill

ELLIPSIS = [-1, -2, -3]


def random_case(rng: random.Random) -> tuple[list[int], list[float], int]:
    n = rng.randint(1, 5)
    demands = [rng.choice([0, rng.randint(0, 10), rng.randint(0, 2000)]) for _ in range(n)]
    weights = [rng.choice([0.1, 0.2, 0.4, 1.0, rng.uniform(0.05, 2.0)]) for _ in range(n)]
    return demands, weights, rng.randint(0, 3000)


def test_water_fill_properties():
    rng = random.Random(0)
    for _ in range(3000):
        demands, weights, budget = random_case(rng)
        alloc = water_fill(demands, weights, budget)
        assert len(alloc) == len(demands)
        assert all(isinstance(a, int) for a in alloc)
        assert all(0 <= a <= d for a, d in zip(alloc, demands, strict=True)), (demands, weights, budget, alloc)
        assert sum(alloc) == min(budget, sum(demands)), (demands, weights, budget, alloc)
        cut = [i for i, (a, d) in enumerate(zip(alloc, demands, strict=True)) if a < d]
        for i in cut:
            # No part gets more than its weighted share relative to a part that was cut (up to rounding).
            for j in range(len(demands)):
                assert alloc[j] <= (alloc[i] + 1) * weights[j] / weights[i] + 1, (demands, weights, budget, alloc)


def test_water_fill_examples():
    assert water_fill([30, 108, 5], [0.2, 0.4, 0.4], 60) == [18, 37, 5]  # remainders 0.33, 0.67
    assert water_fill([10, 10], [1.0, 1.0], 100) == [10, 10]
    assert water_fill([1000, 1000], [1.0, 1.0], 11) == [5, 6]  # an even split's leftover goes to the last part
    assert water_fill([1000, 1000, 1000], [0.2, 0.4, 0.4], 2) == [0, 1, 1]  # B (then A) before the prompt
    assert water_fill([1000, 1000, 1000], [0.2, 0.4, 0.4], 469) == [94, 187, 188]  # the largest remainder first
    assert water_fill([1000, 1000, 1000], [1.0, 1.0, 1.0], 1) == [0, 0, 1]  # a part's last turn keeps a token
    assert water_fill([0, 1000, 3], [0.2, 0.4, 0.4], 50) == [0, 47, 3]
    assert water_fill([5, 5], [1.0, 1.0], 0) == [0, 0]


def test_head_tail_properties():
    rng = random.Random(1)
    for _ in range(2000):
        tokens = list(range(rng.randint(0, 300)))
        budget = rng.randint(0, 350)
        fraction = rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()])
        out = head_tail(tokens, budget, fraction, ELLIPSIS)
        assert len(out) == min(len(tokens), budget)
        if len(tokens) <= budget:
            assert out == tokens
        elif budget > len(ELLIPSIS):
            keep = budget - len(ELLIPSIS)
            n_head = out.index(ELLIPSIS[0])
            n_tail = keep - n_head
            assert out[:n_head] == tokens[:n_head]
            assert out[n_head : n_head + len(ELLIPSIS)] == ELLIPSIS
            assert out[n_head + len(ELLIPSIS) :] == (tokens[len(tokens) - n_tail :] if n_tail else [])
            assert abs(n_head - keep * fraction) <= 0.5


def test_head_tail_examples():
    tokens = list(range(10))
    assert head_tail(tokens, 10, 0.5, ELLIPSIS) == tokens
    assert head_tail(tokens, 7, 0.5, ELLIPSIS) == [0, 1, -1, -2, -3, 8, 9]
    assert head_tail(tokens, 7, 1.0, ELLIPSIS) == [0, 1, 2, 3, -1, -2, -3]
    assert head_tail(tokens, 7, 0.0, ELLIPSIS) == [-1, -2, -3, 6, 7, 8, 9]
    assert head_tail(tokens, 2, 0.5, ELLIPSIS) == [0, 1]  # no room for the ellipsis: keep the start


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_char_tokenizer(add_bos=True)


def make_encoder(tokenizer, fmt: InputFormat, max_length: int, keep_first: int = 1, keep_last: int = 1,
                 prompt_share: float = 0.2) -> PairEncoder:
    return PairEncoder(tokenizer, CHAT_MARKERS[Template.gemma], fmt, max_length, prompt_share, keep_first, keep_last,
                       0.5)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(tiny.WORDS) for _ in range(n))


@pytest.mark.parametrize("fmt", [InputFormat.pab, InputFormat.papb])
def test_a_sequence_never_exceeds_max_length(tokenizer, fmt):
    rng = random.Random(2)
    for max_length in (300, 420, 700):
        enc = make_encoder(tokenizer, fmt, max_length, keep_first=rng.randint(1, 2), keep_last=rng.randint(0, 1))
        pairs = []
        for i in range(40):
            n_turns = rng.choice([1, 1, 2, 3, 5])
            pairs.append(Pair(str(i), tuple(words(rng, rng.choice([1, 5, 200])) for _ in range(n_turns)),
                              tuple(words(rng, rng.choice([0, 3, 40, 600])) for _ in range(n_turns)),
                              tuple(words(rng, rng.choice([0, 3, 40, 600])) for _ in range(n_turns))))
        for tokens in enc.tokenize(pairs):
            forward, swapped = enc.encode(tokens), enc.encode(tokens, swapped=True)
            assert len(forward) <= max_length and len(swapped) <= max_length
            assert len(forward) == len(swapped)  # A and B get mirrored budgets


def test_response_b_survives_a_huge_response_a(tokenizer):
    enc = make_encoder(tokenizer, InputFormat.pab, 400)
    budget = 400 - 126
    short_b = Pair("1", ("Q?",), ("A" * 20000,), ("the short answer B",))
    text = tokenizer.decode(enc.encode(enc.tokenize([short_b])[0]))
    assert "# Response B\nthe short answer B<end_of_turn>" in text  # kept whole
    long_b = Pair("2", ("Q?",), ("A" * 20000,), ("B" * 5000,))
    text = tokenizer.decode(enc.encode(enc.tokenize([long_b])[0]))
    kept_b = text.split("# Response B\n")[1].split("<end_of_turn>")[0]
    kept_a = text.split("# Response A\n")[1].split("\n\n# Response B")[0]
    assert kept_b.count("B") >= int(0.45 * budget) - 8  # half of what the prompt leaves, minus the ellipsis
    assert abs(len(kept_a) - len(kept_b)) <= 1


@pytest.mark.parametrize("fmt", [InputFormat.pab, InputFormat.papb])
def test_first_and_last_turns_are_kept(tokenizer, fmt):
    n_turns = 6
    pair = Pair("1", tuple(f"<prompt {t}>" for t in range(n_turns)),
                tuple(f"<answer A{t}> " + "a" * 300 for t in range(n_turns)),
                tuple(f"<answer B{t}> " + "b" * 300 for t in range(n_turns)))
    enc = make_encoder(tokenizer, fmt, 600, keep_first=1, keep_last=1)
    text = tokenizer.decode(enc.encode(enc.tokenize([pair])[0]))
    for marker in ("<prompt 0>", "<prompt 5>", "<answer A0>", "<answer A5>", "<answer B0>", "<answer B5>"):
        assert marker in text
    for t in range(1, n_turns - 1):
        assert f"<prompt {t}>" not in text and f"<answer A{t}>" not in text and f"<answer B{t}>" not in text
    # keep_last_turns=0 keeps the first turn only
    text = tokenizer.decode(make_encoder(tokenizer, fmt, 600, keep_first=2, keep_last=0).encode(
        enc.tokenize([pair])[0]))
    assert "<prompt 0>" in text and "<prompt 1>" in text and "<prompt 5>" not in text


def test_a_conversation_that_fits_keeps_every_turn(tokenizer):
    pair = Pair("1", ("p0", "p1", "p2"), ("a0", "a1", "a2"), ("b0", "b1", "b2"))
    text = tokenizer.decode(make_encoder(tokenizer, InputFormat.pab, 400).encode(
        make_encoder(tokenizer, InputFormat.pab, 400).tokenize([pair])[0]))
    assert "# Prompt\np0\n---\np1\n---\np2" in text and "b0\n---\nb1\n---\nb2" in text


def test_papb_markers_of_many_turns_fall_back_to_fewer_turns(tokenizer):
    """PAPB repeats its markers per turn: where first + last turns cannot fit, fewer turns do, never an error."""
    enc = make_encoder(tokenizer, InputFormat.papb, 1000)
    empty = [enc.encode(enc.tokenize([Pair("e", ("",) * n, ("",) * n, ("",) * n)])[0]) for n in (1, 2)]
    one_turn, two_turns = len(empty[0]), len(empty[1])
    pair = Pair("1", ("<p0>", "<p1>", "<p2>"), ("<a0>", "<a1>", "<a2>"), ("<b0>", "<b1>", "<b2>"))
    enc = make_encoder(tokenizer, InputFormat.papb, two_turns - 1)
    assert two_turns - 1 >= one_turn + 12
    text = tokenizer.decode(enc.encode(enc.tokenize([pair])[0]))
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= two_turns - 1
    assert "<p0>" in text and "<a0>" in text and "<b0>" in text and "<p2>" not in text and "<p1>" not in text
    with pytest.raises(ConfigError, match=f"cannot hold the papb layout.*use max_length >= {one_turn + 4}"):
        make_encoder(tokenizer, InputFormat.papb, one_turn + 3)  # when built: markers, and a token per text
    make_encoder(tokenizer, InputFormat.papb, one_turn + 4)
