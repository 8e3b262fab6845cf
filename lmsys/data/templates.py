"""Chat-template markers per template name: the text around the single user turn that holds the comparison."""

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
    Template.mistral: ChatMarkers("[INST] ", " [/INST]"),
    Template.plain: ChatMarkers("", "\nAnswer:"),
}
