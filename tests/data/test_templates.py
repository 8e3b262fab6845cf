"""The chat markers of every family against the family's official chat template: a tiny tokenizer carrying the
template (the non-tool branch of the Jinja text in each model's tokenizer_config.json, as published with
Meta-Llama-3-8B-Instruct, gemma-2-9b-it, Qwen2-7B-Instruct, Qwen2.5-14B-Instruct, Qwen3 and
Mistral-7B-Instruct-v0.3), one user turn, `apply_chat_template(..., add_generation_prompt=True)`."""

import pytest
import tiny

from lmsys.config import Family, Template
from lmsys.data.templates import CHAT_MARKERS
from lmsys.modeling.families import FAMILIES

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def qwen2(default_system: str) -> str:
    """Qwen2 and Qwen2.5: a default system turn when the conversation has none."""
    return (
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
        "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}{%- endif %}"
        "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not "
        "loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\n' + message.content "
        "+ '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\n' }}{%- endif %}"
    )


QWEN2_SYSTEM = "You are a helpful assistant."
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN3 = (
    "{%- for message in messages %}{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if enable_thinking is defined and "
    "enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)
MISTRAL_V03 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token}}{%- endif %}"
    "{%- endfor %}"
)

# name -> (official template, template of our family table, the tokenizer adds a bos, what we leave out on purpose)
CASES = {
    "llama3": (LLAMA3, FAMILIES[Family.llama].template, True, ""),
    "gemma2": (GEMMA, FAMILIES[Family.gemma].template, True, ""),
    "qwen2": (qwen2(QWEN2_SYSTEM), FAMILIES[Family.qwen].template, False,
              f"<|im_start|>system\n{QWEN2_SYSTEM}<|im_end|>\n"),
    "qwen2.5": (qwen2(QWEN25_SYSTEM), FAMILIES[Family.qwen].template, False,
                f"<|im_start|>system\n{QWEN25_SYSTEM}<|im_end|>\n"),
    "qwen3": (QWEN3, FAMILIES[Family.qwen].template, False, ""),
    "mistral-v0.3": (MISTRAL_V03, FAMILIES[Family.mistral].template, True, ""),
}
TEXT = "Which response better answers the conversation: A, B, or is it a tie?\n\n# Prompt\nhello"


@pytest.mark.parametrize("name", CASES)
def test_markers_are_what_the_official_template_writes(name):
    template, ours, add_bos, left_out = CASES[name]
    tokenizer = tiny.build_tokenizer(add_bos, tuple(tiny.MISTRAL_TOKENS))
    tokenizer.chat_template = template
    official = tokenizer.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False,
                                             add_generation_prompt=True)
    bos = tokenizer.decode(tokenizer("", add_special_tokens=True)["input_ids"])  # what the encoder starts with
    assert bos == ("<bos>" if add_bos else "")
    markers = CHAT_MARKERS[ours]
    assert official == bos + left_out + markers.user_prefix + TEXT + markers.assistant_prefix


def test_mistral_closes_the_instruction_without_a_space():
    # v0.1/v0.2 wrote "[INST] text [/INST]"; v0.3 (the model of conf_r_mistral_7b) writes "[INST] text[/INST]"
    assert CHAT_MARKERS[Template.mistral].assistant_prefix == "[/INST]"


def test_qwen3_without_thinking_only_adds_an_empty_think_block_after_our_marker():
    tokenizer = tiny.build_tokenizer(False)
    tokenizer.chat_template = QWEN3
    text = tokenizer.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    markers = CHAT_MARKERS[Template.chatml]
    assert text == markers.user_prefix + TEXT + markers.assistant_prefix + "<think>\n\n</think>\n\n"
