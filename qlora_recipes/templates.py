"""Chat templates, verbatim from PEFT's examples/sft, and the tokenizer changes each template needs.

Pure: `tokenizer_changes(template)` says what to add; the runner applies it to a real tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_recipes.schema import TemplateConfig, TemplateFormat

CHATML = (
    "{% for message in messages %}\n"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% if loop.last and add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
    "{% endfor %}"
)

ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

JINJA = {TemplateFormat.chatml: CHATML, TemplateFormat.zephyr: ZEPHYR}


@dataclass(frozen=True)
class TokenizerChanges:
    chat_template: str | None  # None = keep the tokenizer's own
    special_tokens: dict[str, str] = field(default_factory=dict)  # pad/bos/eos to set
    additional_special_tokens: list[str] = field(default_factory=list)


def tokenizer_changes(template: TemplateConfig) -> TokenizerChanges:
    chat_template = JINJA.get(template.format)
    if not template.add_tokens:
        return TokenizerChanges(chat_template=chat_template)
    special = {
        key: value
        for key, value in (
            ("pad_token", template.pad_token),
            ("bos_token", template.bos_token),
            ("eos_token", template.eos_token),
        )
        if value
    }
    return TokenizerChanges(chat_template, special, list(template.role_tokens))
