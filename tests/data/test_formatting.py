"""Golden strings: the exact text the model reads for PAB and PAPB pairs, with every family's template.

The expected strings are written out by hand from lmsys/data/formatting.py (the INTRO line, the section headers,
the turn separators, the template markers), not copied from the encoder's output.
"""

import logging
from string import ascii_lowercase, digits

import pytest
import tiny

from lmsys.builders import build_encoders, build_spec, build_tokenizer
from lmsys.config import InputFormat, Template
from lmsys.data.formatting import PairEncoder
from lmsys.data.io import pairs_from_frame
from lmsys.data.schema import Pair, swap_pair
from lmsys.data.templates import CHAT_MARKERS

INTRO = "Which response better answers the conversation: A, B, or is it a tie?\n\n"


@pytest.fixture(scope="module")
def bpe_bos():
    return tiny.build_tokenizer(add_bos=True)  # like Gemma's tokenizer: <bos> first


@pytest.fixture(scope="module")
def bpe_plain():
    return tiny.build_tokenizer(add_bos=False)  # like SmolLM2's ChatML tokenizer: no bos


@pytest.fixture(scope="module")
def chars_bos():
    return tiny.build_char_tokenizer(add_bos=True)  # one token per character: budgets can be counted by hand


def encoder(tokenizer, template: Template, fmt: InputFormat, max_length: int = 512, text_head_share: float = 0.5,
            keep_first: int = 1, keep_last: int = 1) -> PairEncoder:
    return PairEncoder(tokenizer, CHAT_MARKERS[template], fmt, max_length, 0.2, keep_first, keep_last, text_head_share)


def encode_text(enc: PairEncoder, pair: Pair, swapped: bool = False) -> str:
    ids = enc.encode(enc.tokenize([pair])[0], swapped=swapped)
    assert len(ids) <= enc.max_length
    return enc.tokenizer.decode(ids, skip_special_tokens=False)


SINGLE = Pair("1", ("What is the capital of France?",), ("Paris.",), ("It is Rome, I think.",), (1.0, 0.0, 0.0))
MULTI = Pair("2", ("hello", "and 2 plus 2?"), ("hi there", "4"), ("hey", ""), (0.0, 1.0, 0.0))


def test_pab_gemma_golden(bpe_bos):
    expected = (
        "<bos><start_of_turn>user\n"
        "Which response better answers the conversation: A, B, or is it a tie?\n\n"
        "# Prompt\nWhat is the capital of France?"
        "\n\n# Response A\nParis."
        "\n\n# Response B\nIt is Rome, I think."
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert encode_text(encoder(bpe_bos, Template.gemma, InputFormat.pab), SINGLE) == expected


def test_pab_gemma_swapped_golden(bpe_bos):
    expected = (
        "<bos><start_of_turn>user\n"
        "Which response better answers the conversation: A, B, or is it a tie?\n\n"
        "# Prompt\nWhat is the capital of France?"
        "\n\n# Response A\nIt is Rome, I think."
        "\n\n# Response B\nParis."
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    enc = encoder(bpe_bos, Template.gemma, InputFormat.pab)
    assert encode_text(enc, SINGLE, swapped=True) == expected
    assert encode_text(enc, swap_pair(SINGLE)) == expected


def test_pab_chatml_multi_turn_golden(bpe_plain):
    # Turns of one part are joined by "\n---\n"; the empty (null) last turn of B leaves the separator alone.
    expected = (
        "<|im_start|>user\n"
        "Which response better answers the conversation: A, B, or is it a tie?\n\n"
        "# Prompt\nhello\n---\nand 2 plus 2?"
        "\n\n# Response A\nhi there\n---\n4"
        "\n\n# Response B\nhey\n---\n"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encode_text(encoder(bpe_plain, Template.chatml, InputFormat.pab), MULTI) == expected


def test_papb_chatml_golden(bpe_plain):
    expected = (
        "<|im_start|>user\n"
        "Which response better answers the conversation: A, B, or is it a tie?\n\n"
        "# Conversation with A\n"
        "## User\nhello\n## Assistant\nhi there\n"
        "## User\nand 2 plus 2?\n## Assistant\n4"
        "\n\n# Conversation with B\n"
        "## User\nhello\n## Assistant\nhey\n"
        "## User\nand 2 plus 2?\n## Assistant\n"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encode_text(encoder(bpe_plain, Template.chatml, InputFormat.papb), MULTI) == expected


def test_papb_gemma_golden(bpe_bos):
    expected = (
        "<bos><start_of_turn>user\n"
        "Which response better answers the conversation: A, B, or is it a tie?\n\n"
        "# Conversation with A\n## User\nWhat is the capital of France?\n## Assistant\nParis."
        "\n\n# Conversation with B\n## User\nWhat is the capital of France?\n## Assistant\nIt is Rome, I think."
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert encode_text(encoder(bpe_bos, Template.gemma, InputFormat.papb), SINGLE) == expected


# Truncation, counted by hand with one token per character.
# Fixed tokens of the PAB gemma layout: <bos> 1, "<start_of_turn>user\n" 6, INTRO 71, "# Prompt\n" 9,
# "\n\n# Response A\n" 15, "\n\n# Response B\n" 15, "<end_of_turn>\n<start_of_turn>model\n" 9: 126 in all.
LONG_A = "Paris is the capital and the largest city of France; it sits on the Seine river in the north of the country."
FIXED_PAB_GEMMA = 126


def test_fixed_token_count_of_the_pab_gemma_layout(chars_bos):
    assert len(INTRO) == 71
    enc = encoder(chars_bos, Template.gemma, InputFormat.pab)
    assert len(enc.encode(enc.tokenize([Pair("0", ("",), ("",), ("",))])[0])) == FIXED_PAB_GEMMA


def test_pab_gemma_truncated_golden(chars_bos):
    # Budget 60 for demands P=30, A=108, B=5 with weights 0.2/0.4/0.4: B (5 <= 24) is kept whole; the remaining 55
    # go 1:2 to P and A: 18.33 and 36.67 -> floors 18 + 36, the leftover token to the larger remainder: P 18, A 37.
    # Each keeps head and tail around " [...] " (7 tokens): P keeps 11 = round(5.5) = 6 + 5; A keeps 30 = 15 + 15.
    pair = Pair("3", ("What is the capital of France?",), (LONG_A,), ("Rome.",))
    enc = encoder(chars_bos, Template.gemma, InputFormat.pab, max_length=FIXED_PAB_GEMMA + 60)
    expected = (
        "<bos><start_of_turn>user\n"
        "Which response better answers the conversation: A, B, or is it a tie?\n\n"
        "# Prompt\nWhat i [...] ance?"
        "\n\n# Response A\nParis is the ca [...] of the country."
        "\n\n# Response B\nRome."
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = enc.encode(enc.tokenize([pair])[0])
    assert len(ids) == FIXED_PAB_GEMMA + 60
    assert chars_bos.decode(ids, skip_special_tokens=False) == expected


def test_pab_truncated_keeps_first_and_last_turns(chars_bos):
    # Four turns that do not fit: only turns 1 and 4 are laid out (keep_first_turns=1, keep_last_turns=1).
    pair = Pair("4", ("p1", "p2", "p3", "p4"), ("a1" * 20, "a2" * 20, "a3" * 20, "a4" * 20), ("b1", "b2", "b3", "b4"))
    enc = encoder(chars_bos, Template.gemma, InputFormat.pab, max_length=FIXED_PAB_GEMMA + 60)
    text = chars_bos.decode(enc.encode(enc.tokenize([pair])[0]), skip_special_tokens=False)
    # Budget 60 minus 3 "\n---\n" separators (15) = 45 for P=4, A=80, B=4: P and B whole, A gets 37, shared by its
    # two turns as 18 + 19 (the leftover token to the last). Around the 7-token ellipsis, 18 keeps 11 = round(5.5) = 6
    # from the head + 5 from the tail and 19 keeps 12 = 6 + 6.
    expected = (
        "<bos><start_of_turn>user\n"
        "Which response better answers the conversation: A, B, or is it a tie?\n\n"
        "# Prompt\np1\n---\np4"
        "\n\n# Response A\na1a1a1 [...] 1a1a1\n---\na4a4a4 [...] a4a4a4"
        "\n\n# Response B\nb1\n---\nb4"
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert text == expected
    assert "p2" not in text and "p3" not in text and "a2" not in text and "b3" not in text


def test_truncated_turns_are_those_a_response_has_text_in(chars_bos):
    # B answered turn 2 only (null elsewhere, or fewer turns than the prompt): keeping turns 1 and 4 for every part
    # showed B as two empty turns. PAB keeps each part's first and last turns with text; B's one turn is padded.
    for b_turns in (("", "b2", "", ""), ("", "b2")):
        pair = Pair("5", ("p1", "p2", "p3", "p4"), ("a1" * 20, "a2" * 20, "a3" * 20, "a4" * 20), b_turns)
        enc = encoder(chars_bos, Template.gemma, InputFormat.pab, max_length=FIXED_PAB_GEMMA + 60)
        text = chars_bos.decode(enc.encode(enc.tokenize([pair])[0]), skip_special_tokens=False)
        assert "# Prompt\np1\n---\np4\n\n# Response A\na1a1" in text
        assert "\n\n# Response B\nb2\n---\n<end_of_turn>" in text


def test_papb_truncated_turns_keep_each_response_with_its_prompt_turn(chars_bos):
    # PAPB: each conversation keeps the turns its response has text in, each with the prompt turn it answers.
    pair = Pair("6", ("p1", "p2", "p3", "p4"), ("a1", "a2", "a3", "a4" * 30), ("b1", "", "b3", ""))
    text = chars_bos.decode(encoder(chars_bos, Template.gemma, InputFormat.papb, max_length=260).encode(
        encoder(chars_bos, Template.gemma, InputFormat.papb).tokenize([pair])[0]), skip_special_tokens=False)
    assert "# Conversation with A\n## User\np1\n## Assistant\na1\n## User\np4\n## Assistant\na4a4" in text
    assert "# Conversation with B\n## User\np1\n## Assistant\nb1\n## User\np3\n## Assistant\nb3<end" in text


def test_null_turn_is_empty_text_never_none(tmp_path, bpe_plain):
    frame = tiny.arena_frame(1)
    frame.loc[0, "prompt"] = '["first", null]'
    frame.loc[0, "response_a"] = '[null, "second"]'
    frame.loc[0, "response_b"] = '["x", "y"]'
    (pair,) = pairs_from_frame(frame, "mem.csv", require_labels=True)
    assert pair.prompts == ("first", "") and pair.responses_a == ("", "second")
    text = encode_text(encoder(bpe_plain, Template.chatml, InputFormat.pab), pair)
    assert "None" not in text and "null" not in text
    assert "# Prompt\nfirst\n---\n\n\n# Response A\n\n---\nsecond" in text


def test_every_encoding_ends_with_the_assistant_marker(bpe_bos):
    # The head pools the last token: it must be the template's last token whatever the truncation.
    enc = encoder(bpe_bos, Template.gemma, InputFormat.papb, max_length=160)
    marker = bpe_bos("<end_of_turn>\n<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    pairs = pairs_from_frame(tiny.arena_frame(20, seed=3), "mem.csv", require_labels=True)
    for tokens in enc.tokenize(pairs):
        for swapped in (False, True):
            ids = enc.encode(tokens, swapped=swapped)
            assert len(ids) <= 160
            assert ids[: 1] == [bpe_bos.bos_token_id]
            assert ids[-len(marker):] == marker


# One pair in PAB and PAPB for every family, through the family table (model_type -> template) and the tokenizer
# saved with that family's tiny model (bos where the real model has one).
SINGLE_PAB_BODY = (
    "Which response better answers the conversation: A, B, or is it a tie?\n\n"
    "# Prompt\nWhat is the capital of France?\n\n# Response A\nParis.\n\n# Response B\nIt is Rome, I think."
)
SINGLE_PAPB_BODY = (
    "Which response better answers the conversation: A, B, or is it a tie?\n\n"
    "# Conversation with A\n## User\nWhat is the capital of France?\n## Assistant\nParis."
    "\n\n# Conversation with B\n## User\nWhat is the capital of France?\n## Assistant\nIt is Rome, I think."
)
LLAMA3_OPEN, LLAMA3_CLOSE = "<|start_header_id|>user<|end_header_id|>\n\n", (
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
GEMMA_OPEN, GEMMA_CLOSE = "<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"
CHATML_OPEN, CHATML_CLOSE = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
MISTRAL_OPEN, MISTRAL_CLOSE = "<bos>[INST] ", "[/INST]"
FAMILY_GOLDEN = {  # kind -> (family, what comes before the body, what comes after it)
    "llama": ("llama", LLAMA3_OPEN, LLAMA3_CLOSE),
    "gemma2": ("gemma", GEMMA_OPEN, GEMMA_CLOSE),
    "gemma3": ("gemma", GEMMA_OPEN, GEMMA_CLOSE),
    "qwen2": ("qwen", CHATML_OPEN, CHATML_CLOSE),
    "qwen3": ("qwen", CHATML_OPEN, CHATML_CLOSE),
    "mistral": ("mistral", MISTRAL_OPEN, MISTRAL_CLOSE),
}


@pytest.mark.parametrize("fmt,body", [(InputFormat.pab, SINGLE_PAB_BODY), (InputFormat.papb, SINGLE_PAPB_BODY)])
@pytest.mark.parametrize("kind", FAMILY_GOLDEN)
def test_every_family_golden(tiny_models, kind, fmt, body):
    family, opening, closing = FAMILY_GOLDEN[kind]
    model, data, _ = tiny.model_settings(tiny_models[kind], family, max_length=512)
    data.formats = [fmt]
    spec = build_spec(model, data, packing=True)
    [enc] = build_encoders(spec, build_tokenizer(tiny_models[kind], False))
    assert encode_text(enc, SINGLE) == opening + body + closing


def test_texts_longer_than_the_context_tokenize_without_transformers_indexing_warning():
    """A turn longer than the model's context is cut later, token by token; transformers' warning that such a
    sequence "will result in indexing errors" would only mislead, so the encoder tokenizes without it."""
    long_turn, warning = "word " * 400, "longer than the specified maximum sequence length"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)  # transformers' loggers do not reach the root's
    try:
        control = tiny.build_tokenizer(add_bos=False)
        control.model_max_length = 128
        control(long_turn, add_special_tokens=False)  # what the warning looks like (once per tokenizer)
        assert any(warning in record.getMessage() for record in records)
        records.clear()
        tokenizer = tiny.build_tokenizer(add_bos=False)
        tokenizer.model_max_length = 128
        enc = encoder(tokenizer, Template.chatml, InputFormat.pab, max_length=128)
        [tokens] = enc.tokenize([Pair("1", (long_turn,), ("a",), ("b",))])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert len(tokens.prompts[0]) > 128 and len(enc.sequences(tokens, swapped=False)[0]) <= 128
    assert not [record for record in records if warning in record.getMessage()]


# --- SentencePiece tokenizers (Mistral's): a text tokenized alone starts with '▁', inside the sequence it does not -


def metaspace_tokenizer(prepend_scheme: str):
    """One token per character behind a Metaspace pre-tokenizer, as Mistral v0.3's SentencePiece tokenizer: every
    text it tokenizes alone gets a leading '▁' (a space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(INTRO + "# Prompt Response Conversation with User Assistant A B\n-[.]+?" + ascii_lowercase
                       + digits) - {" "})
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "▁", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    tok.add_special_tokens(["<s>", "</s>", "[INST]", "[/INST]"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("prepend_scheme", ["first", "always"])
@pytest.mark.parametrize("fmt", [InputFormat.pab, InputFormat.papb])
def test_sentencepiece_texts_and_markers_read_as_in_the_whole_string(prepend_scheme, fmt):
    """Each text and marker was tokenized alone, so a SentencePiece tokenizer put a space token before every one:
    `# Prompt\\n what is 2+2?` where Mistral's template writes `# Prompt\\nwhat is 2+2?` (checked against
    mistral_common's v3 encoding with the real Mistral v0.3 tokenizer model: equal ids, 5-7 tokens fewer)."""
    tokenizer = metaspace_tokenizer(prepend_scheme)
    encoder = PairEncoder(tokenizer, CHAT_MARKERS[Template.mistral], fmt, 512, 0.2, 1, 1, 0.5)
    pair = Pair("1", ("what is 2+2?", "and?"), ("four", "\n\nfive"), (" 4", "[]"))
    ids = encoder.encode(encoder.tokenize([pair])[0])
    inst, end = tokenizer.convert_tokens_to_ids(["[INST]", "[/INST]"])
    assert ids[0] == inst and ids[-1] == end
    content = tokenizer.decode(ids[1:-1])
    assert "\nwhat is 2+2?\n" in content and "\n what" not in content and "\n 4\n" in content  # " 4" as written
    # the whole string's ids: [INST], the content as one text (its first word after the template's space), [/INST]
    assert ids == [inst, *tokenizer(content, add_special_tokens=False)["input_ids"], end]
