"""Turning a `Pair` into the token ids the model reads, within `max_length`, in the PAB or PAPB layout.

Texts are tokenized once (per text, without special tokens); a layout is a list of pieces, fixed marker text or
a slot for one turn of one part; the token budget left after the markers is shared between the parts by weight
(water-filling) and between a part's turns equally, and each over-long text keeps its head and tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest

from lmsys.config import ConfigError, InputFormat
from lmsys.data.schema import Pair
from lmsys.data.templates import ChatMarkers
from lmsys.data.truncation import head_tail, water_fill

INTRO = "Which response better answers the conversation: A, B, or is it a tie?\n\n"
RESPONSE_INTRO = "How well does the response answer the conversation?\n\n"  # a bi-encoder's sequence: one response
ELLIPSIS = " [...] "


@dataclass(frozen=True)
class Slot:
    """A place in the layout for turn `turn` of part `part`."""

    part: int
    turn: int


@dataclass(frozen=True)
class PairTokens:
    """Token ids of every turn of a pair, tokenized once, reused for both orientations."""

    prompts: list[list[int]]
    responses_a: list[list[int]]
    responses_b: list[list[int]]


class PairEncoder:
    """Builds model inputs for pairs: one fixed layout, template and truncation policy."""

    def __init__(
        self,
        tokenizer,
        markers: ChatMarkers,
        input_format: InputFormat,
        max_length: int,
        prompt_share: float,
        keep_first_turns: int,
        keep_last_turns: int,
        text_head_share: float,
    ) -> None:
        self.tokenizer = tokenizer
        self.input_format = input_format
        self.max_length = max_length
        self.prompt_share = prompt_share
        self.keep_first_turns = keep_first_turns
        self.keep_last_turns = keep_last_turns
        self.text_head_share = text_head_share
        self._separator = markers.separator
        # [bos] where the model wants one; none for the separator layout, whose user_prefix is the cls token
        self._special_prefix = [] if self._separator else tokenizer("", add_special_tokens=True)["input_ids"]
        self._marker_cache: dict[tuple[str, bool], list[int]] = {}
        # chat layouts: texts and markers tokenized as they read inside the sequence (see `_continued`); an
        # encoder's sep layout reads each text as a segment of its own, as its tokenizer's pair encoding does
        self._lead = None if self._separator else _prefix_lead(tokenizer)
        self._user_prefix = markers.user_prefix
        self._assistant_prefix = markers.assistant_prefix
        self._ellipsis = self._tok(ELLIPSIS)
        self._check_fits()

    def _check_fits(self) -> None:
        """max_length must hold the layout's markers and a token of each text: found when the encoder is built
        (before a run dir is claimed or a model loads), not on the first pair."""
        layout = self._layout(1)
        n_texts = len({piece.part for piece in layout if isinstance(piece, Slot)})
        needed = self._length(layout, []) + n_texts
        if self.max_length < needed:
            raise ConfigError(f"max_length {self.max_length} cannot hold the {self.input_format.value} layout with "
                              f"this tokenizer: its markers take {needed - n_texts} tokens and each of its {n_texts} "
                              f"texts needs one; use max_length >= {needed}")

    def tokenize(self, pairs: list[Pair]) -> list[PairTokens]:
        """Tokenize every turn of every pair in one batched call."""
        texts = [text for pair in pairs for text in (*pair.prompts, *pair.responses_a, *pair.responses_b)]
        ids = self._continued(texts)
        out, pos = [], 0
        for pair in pairs:
            sizes = (len(pair.prompts), len(pair.responses_a), len(pair.responses_b))
            groups = []
            for size in sizes:
                groups.append([list(t) for t in ids[pos : pos + size]])
                pos += size
            out.append(PairTokens(*groups))
        return out

    def encode(self, tokens: PairTokens, swapped: bool = False) -> list[int]:
        """The input ids of one pair (A and B exchanged when `swapped`), at most `max_length` long."""
        responses_a, responses_b = (tokens.responses_b, tokens.responses_a) if swapped else (
            tokens.responses_a, tokens.responses_b)
        return self._encode_parts(*self._parts(tokens.prompts, responses_a, responses_b))

    def sequences(self, tokens: PairTokens, swapped: bool = False) -> list[list[int]]:
        """The sequences the backbone reads for one pair: here one, the whole pair."""
        return [self.encode(tokens, swapped)]

    def _encode_parts(self, parts: list[list[list[int]]], weights: list[float]) -> list[int]:
        """The layout filled with the parts' turns, truncated to fit `max_length`."""
        layout = self._layout(len(parts[0]))
        if self._length(layout, parts) > self.max_length:
            parts, layout = self._fit_turns(parts)
        budget = self.max_length - self._length(layout, [[[] for _ in part] for part in parts])
        if budget < 0:
            raise ValueError(f"max_length {self.max_length} cannot hold the {self.input_format.value} markers")
        parts = self._truncate(parts, weights, budget)
        ids = list(self._special_prefix)
        for index, piece in enumerate(layout):
            ids += self._tok(piece, first=index == 0) if isinstance(piece, str) else parts[piece.part][piece.turn]
        return ids

    def _parts(self, prompts, responses_a, responses_b) -> tuple[list[list[list[int]]], list[float]]:
        """The texts that share the budget, turn-aligned, with their weights."""
        n_turns = max(len(prompts), len(responses_a), len(responses_b))
        aligned = [_pad_turns(texts, n_turns) for texts in (prompts, responses_a, responses_b)]
        response_share = (1.0 - self.prompt_share) / 2
        if self.input_format == InputFormat.pab:
            return aligned, [self.prompt_share, response_share, response_share]
        prompt, a, b = aligned
        half_prompt = self.prompt_share / 2
        return [prompt, a, [list(t) for t in prompt], b], [half_prompt, response_share, half_prompt, response_share]

    def _layout(self, n_turns: int) -> list[str | Slot]:
        turns = range(n_turns)
        if self._separator:
            return self._separated_layout(n_turns)
        if self.input_format == InputFormat.pab:
            layout: list[str | Slot] = [self._user_prefix + INTRO + "# Prompt\n"]
            for part, header in ((0, None), (1, "\n\n# Response A\n"), (2, "\n\n# Response B\n")):
                layout += ([header] if header else []) + _joined_turns(part, n_turns)
        else:
            layout = [self._user_prefix + INTRO]
            for prompt_part, response_part, name in ((0, 1, "A"), (2, 3, "B")):
                layout.append(f"# Conversation with {name}\n" if name == "A" else f"\n\n# Conversation with {name}\n")
                for turn in turns:
                    layout += [("\n" if turn else "") + "## User\n", Slot(prompt_part, turn), "\n## Assistant\n",
                               Slot(response_part, turn)]
        return layout + [self._assistant_prefix]

    def _separated_layout(self, n_turns: int) -> list[str | Slot]:
        """Encoders: [CLS] prompt [SEP] A [SEP] B [SEP] (papb: prompt [SEP] A [SEP] prompt [SEP] B [SEP]), a part's
        turns joined as in the chat layouts."""
        n_parts = 3 if self.input_format == InputFormat.pab else 4
        layout: list[str | Slot] = [self._user_prefix]
        for part in range(n_parts):
            layout += ([self._separator] if part else []) + _joined_turns(part, n_turns)
        return layout + [self._assistant_prefix]

    def _length(self, layout: list[str | Slot], parts: list[list[list[int]]]) -> int:
        fixed = sum(len(self._tok(piece, first=index == 0)) for index, piece in enumerate(layout)
                    if isinstance(piece, str))
        return len(self._special_prefix) + fixed + sum(len(t) for part in parts for t in part)

    def _fit_turns(self, parts: list[list[list[int]]]) -> tuple[list[list[list[int]]], list[str | Slot]]:
        """Keep the first k and last k turns of an over-long conversation; when the markers of those turns alone
        exceed max_length (PAPB repeats them per turn), fewer: first the last turns go, then all but the first."""
        for first, last in ((self.keep_first_turns, self.keep_last_turns), (self.keep_first_turns, 0), (1, 0)):
            selected = self._select_turns(parts, first, last)
            layout = self._layout(len(selected[0]))
            if self._length(layout, [[[] for _ in part] for part in selected]) <= self.max_length:
                break
        return selected, layout

    def _select_turns(self, parts: list[list[list[int]]], first: int, last: int) -> list[list[list[int]]]:
        """Per block of the layout (pab: each part alone; papb: a prompt and its response), the first and last turns
        whose text (the response's, in papb) is not empty: a response with empty turns (null, or fewer turns than
        the prompt) keeps the turns it has text in. Blocks with fewer turns kept are padded with empty ones."""
        selected: list[list[list[int]]] = [[] for _ in parts]
        for block, key in self._turn_blocks(len(parts)):
            positions = [i for i, turn in enumerate(parts[key]) if turn] or list(range(len(parts[key])))
            for part in block:
                selected[part] = [parts[part][i] for i in _select_turns(positions, first, last)]
        n_turns = max(len(turns) for turns in selected)
        return [turns + [[] for _ in range(n_turns - len(turns))] for turns in selected]

    def _turn_blocks(self, n_parts: int) -> list[tuple[tuple[int, ...], int]]:
        """(the parts that keep the same turns, the part whose empty turns go first)."""
        if self.input_format == InputFormat.pab:
            return [((part,), part) for part in range(n_parts)]
        return [((part, part + 1), part + 1) for part in range(0, n_parts, 2)]

    def _truncate(self, parts: list[list[list[int]]], weights: list[float], budget: int) -> list[list[list[int]]]:
        part_budgets = water_fill([sum(len(t) for t in part) for part in parts], weights, budget)
        truncated = []
        for part, part_budget in zip(parts, part_budgets, strict=True):
            turn_budgets = water_fill([len(t) for t in part], [1.0] * len(part), part_budget)
            truncated.append([head_tail(t, b, self.text_head_share, self._ellipsis) for t, b in zip(part, turn_budgets)])
        return truncated

    def _tok(self, text: str, first: bool = False) -> list[int]:
        """A marker's ids: the layout's first piece opens the sequence; every other piece continues it."""
        key = (text, first)
        if key not in self._marker_cache:
            self._marker_cache[key] = (self.tokenizer(text, add_special_tokens=False)["input_ids"] if first else
                                       self._continued([text])[0])
        return self._marker_cache[key]

    def _continued(self, texts: list[str]) -> list[list[int]]:
        """The ids of texts that continue a sequence, as the tokenizer reads them inside the whole string. A
        SentencePiece tokenizer such as Mistral's starts every text it tokenizes alone with '▁' (a space), which
        the chat template's string has not after a newline: such texts are tokenized after a newline, whose ids
        are then dropped."""
        if not texts:
            return []
        # verbose=False: texts longer than the model's context are cut later, token by token (head and tail), so
        # transformers' "sequence length is longer than ... will result in indexing errors" would only mislead
        if self._lead is None:
            return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        lead = self._lead
        ids = self.tokenizer(["\n" + text for text in texts], add_special_tokens=False, verbose=False)["input_ids"]
        return [row[len(lead):] if row[:len(lead)] == lead else
                self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
                for row, text in zip(ids, texts, strict=True)]


def _prefix_lead(tokenizer) -> list[int] | None:
    """The ids of a newline when the tokenizer adds a prefix space to a text tokenized alone (what "ab" gives
    alone differs from what it gives after a newline), else None (byte-level BPE, Gemma's SentencePiece)."""
    lead, joined, alone = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("\n", "\nab", "ab"))
    return lead if joined[:len(lead)] == lead and joined[len(lead):] != alone else None


class ResponseEncoder(PairEncoder):
    """A bi-encoder's inputs: each pair as two sequences, (prompt, A) and (prompt, B), each within `max_length`, in
    the single-response form of the format (pab: all prompts, then the response; papb: the conversation with the
    response), truncated by the same rules (the prompt's weight `prompt_share`, the response's the rest).

    A sequence depends on the prompt and its own response only, and its label names no side (`# Response`), so
    (prompt, A) is the same token ids whether the pair is shown as (A, B) or swapped as (B, A)."""

    def encode(self, tokens: PairTokens, swapped: bool = False) -> list[int]:
        """Both sequences end to end (what token budgets and length sorting count)."""
        return [i for ids in self.sequences(tokens, swapped) for i in ids]

    def sequences(self, tokens: PairTokens, swapped: bool = False) -> list[list[int]]:
        """[(prompt, first response), (prompt, second response)]: A then B, or B then A when `swapped`."""
        first, second = (tokens.responses_b, tokens.responses_a) if swapped else (tokens.responses_a,
                                                                                  tokens.responses_b)
        return [self._encode_parts(*self._response_parts(tokens.prompts, responses)) for responses in (first, second)]

    def _response_parts(self, prompts, responses) -> tuple[list[list[list[int]]], list[float]]:
        n_turns = max(len(prompts), len(responses))
        return [_pad_turns(prompts, n_turns), _pad_turns(responses, n_turns)], [self.prompt_share, 1 - self.prompt_share]

    def _layout(self, n_turns: int) -> list[str | Slot]:
        if self._separator:
            return self._separated_layout(n_turns)
        if self.input_format == InputFormat.pab:
            layout = [self._user_prefix + RESPONSE_INTRO + "# Prompt\n", *_joined_turns(0, n_turns), "\n\n# Response\n",
                      *_joined_turns(1, n_turns)]
        else:
            layout = [self._user_prefix + RESPONSE_INTRO + "# Conversation\n"]
            for turn in range(n_turns):
                layout += [("\n" if turn else "") + "## User\n", Slot(0, turn), "\n## Assistant\n", Slot(1, turn)]
        return layout + [self._assistant_prefix]

    def _separated_layout(self, n_turns: int) -> list[str | Slot]:
        """Encoders: [CLS] prompt [SEP] response [SEP] (papb: [CLS] prompt_1 [SEP] response_1 [SEP] prompt_2 ...)."""
        if self.input_format == InputFormat.pab:
            layout = [self._user_prefix, *_joined_turns(0, n_turns), self._separator, *_joined_turns(1, n_turns)]
        else:
            layout = [self._user_prefix]
            for turn in range(n_turns):
                layout += ([self._separator] if turn else []) + [Slot(0, turn), self._separator, Slot(1, turn)]
        return layout + [self._assistant_prefix]


def _joined_turns(part: int, n_turns: int) -> list[str | Slot]:
    """The turns of one part, one after another, `---` between them."""
    return [piece for turn in range(n_turns) for piece in ((["\n---\n"] if turn else []) + [Slot(part, turn)])]


def _select_turns(positions: list[int], first: int, last: int) -> list[int]:
    if len(positions) <= first + last:
        return positions
    return positions[:first] + (positions[len(positions) - last :] if last else [])


def _pad_turns(texts: list[list[int]], n_turns: int) -> list[list[int]]:
    return [list(t) if t is not None else [] for t, _ in zip_longest(texts, range(n_turns))]
