"""A checkpoint's chat template as the Jinja template transformers' processors render.

The Jinja renders exactly the text `LlavaSmoeProcessor` renders for the same conversation,
content given as a string or as transformers' typed parts ({"type": "image"} / {"type": "text"}):
each user message's images become one image token plus a newline at the start of its text (a
newline plus an image token at its end with `image_position: last`), as
`LlavaSmoeProcessor.place_images` puts them.
"""

from __future__ import annotations

import json
from typing import Any

from llava_smoe.processing.templates import ChatTemplate, TokenizerChatTemplate


def _lit(text: str) -> str:
    """A Jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


# Every message's content as one string: images (typed parts) as placeholders, first or last,
# and the text parts joined by newlines, as the HTTP API and the processor build it.
_CONTENT = {
    "first": """{%- macro content(message) -%}
{%- if message['content'] is string -%}{{ message['content'] }}
{%- else -%}
{%- for part in message['content'] if part['type'] == 'image' -%}{{ IMAGE ~ '\\n' }}{%- endfor -%}
{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') }}
{%- endif -%}
{%- endmacro -%}""",
    "last": """{%- macro content(message) -%}
{%- if message['content'] is string -%}{{ message['content'] }}
{%- else -%}
{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') }}
{%- for part in message['content'] if part['type'] == 'image' -%}{{ '\\n' ~ IMAGE }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}""",
}


def jinja_chat_template(processor: Any) -> str:
    """The Jinja chat template that renders what `processor` renders."""
    template, image = processor.template, processor.image_token
    head = "{%- set IMAGE = " + _lit(image) + " -%}\n" + _CONTENT[processor.config.image_position] + "\n"
    if isinstance(template, TokenizerChatTemplate):
        # The tokenizer's own template, fed string contents.
        rebuild = ("{%- set ns = namespace(messages=[]) -%}{%- for m in messages -%}"
                   "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': content(m)}] -%}"
                   "{%- endfor -%}{%- set messages = ns.messages -%}\n")
        if processor.config.system_prompt is not None:
            rebuild += ("{%- if not messages or messages[0]['role'] != 'system' -%}{%- set messages = "
                        "[{'role': 'system', 'content': " + _lit(processor.config.system_prompt) + "}] + messages "
                        "-%}{%- endif -%}\n")
        return head + rebuild + processor.tokenizer.chat_template
    if not isinstance(template, ChatTemplate):
        raise ValueError(f"template {template.name!r} cannot be written as a Jinja chat template")
    t = template
    system = processor.config.system_prompt if processor.config.system_prompt is not None else t.default_system
    end = t.end_of_turn(processor.tokenizer.eos_token) or ""
    system_prefix, _, system_suffix = t.system_format.partition("{system}")
    user_prefix, _, user_suffix = t.user_format.partition("{content}")
    reply_prefix, _, reply_suffix = t.assistant_format.partition("{content}")
    parts = [head]
    parts.append("{%- set ns = namespace(system=" + _lit(system) + ") -%}\n")
    parts.append("{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = content(messages[0]) -%}"
                 "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}"
                 "{%- endif -%}\n")
    if t.add_bos:
        parts.append("{%- if bos_token -%}{{ bos_token }}{%- endif -%}\n")
    if t.user_text:
        parts.append("{%- if ns.system -%}{{ " + _lit(system_prefix) + " ~ ns.system ~ " + _lit(system_suffix)
                     + " }}{%- endif -%}\n")
    user_text = "content(message)" if t.user_text else "IMAGE * (content(message).count(IMAGE))"
    parts.append(
        "{%- for message in loop_messages -%}\n"
        "{%- if message['role'] == 'user' -%}{{ " + _lit(user_prefix) + " ~ " + user_text + " ~ " + _lit(user_suffix)
        + " }}\n"
        "{%- elif message['role'] == 'assistant' -%}{{ " + _lit(t.assistant_header) + " ~ " + _lit(reply_prefix)
        + " ~ content(message) ~ " + _lit(reply_suffix + end) + " ~ " + _lit(t.turn_suffix) + " }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ " + _lit(t.assistant_header) + " }}{%- endif -%}"
    )
    return "".join(parts)
