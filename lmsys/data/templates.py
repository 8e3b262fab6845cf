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

from lmsys.config import Template


@dataclass(frozen=True)
class ChatMarkers:
    user_prefix: str
    # Ends the user turn and opens the assistant turn; its last token is the one the head pools.
    assistant_prefix: str


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
