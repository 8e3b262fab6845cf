"""Chat-template markers per template name: the text around the single user turn that holds the comparison.

Each is what the family's own chat template (`tokenizer.apply_chat_template`, one user turn, generation prompt on)
writes around the user's text, checked against the official templates in tests/data/test_templates.py; the bos
token is not part of them (the tokenizer adds it where the model wants one). One deliberate difference: Qwen2 and
Qwen2.5 insert a default system turn ("You are a helpful assistant." / "You are Qwen, created by Alibaba Cloud. ...")
when the conversation has none; we leave it out, as Qwen3's template does: it says nothing about the comparison,
costs about 20 tokens of every pair's budget, and the fine-tuned head learns what the marker-only layout means.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmsys.config import ConfigError, Template


@dataclass(frozen=True)
class ChatMarkers:
    user_prefix: str
    # Ends the user turn and opens the assistant turn; its last token is the one the head pools.
    assistant_prefix: str
    # Set for encoders: the token text written between the parts (prompt, A, B) instead of the chat headers; the
    # layout is then user_prefix part [separator part]... assistant_prefix, with no other fixed text and no
    # special tokens added by the tokenizer (user_prefix is its cls token).
    separator: str | None = None


CHAT_MARKERS: dict[Template, ChatMarkers] = {
    Template.llama3: ChatMarkers(
        "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    Template.gemma: ChatMarkers("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"),
    Template.chatml: ChatMarkers("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    # Mistral-7B-Instruct-v0.3 (and Mistral's v3/tekken tokenizers): "[INST] " + text + "[/INST]", no space before
    # "[/INST]" (v0.1/v0.2 wrote "[INST] text [/INST]"); the template has no separate generation prompt
    Template.mistral: ChatMarkers("[INST] ", "[/INST]"),
    Template.plain: ChatMarkers("", "\nAnswer:"),
}


def chat_markers(template: Template, tokenizer) -> ChatMarkers:
    """The markers of `template`; for `sep` (encoders) the tokenizer's own cls and sep tokens:
    [CLS] prompt [SEP] A [SEP] B [SEP]."""
    if template == Template.sep:
        if not (tokenizer.cls_token and tokenizer.sep_token):
            raise ConfigError("model.template=sep needs a tokenizer with cls and sep tokens (an encoder's)")
        return ChatMarkers(tokenizer.cls_token, tokenizer.sep_token, tokenizer.sep_token)
    return CHAT_MARKERS[template]
