"""Chat templates that render a conversation as segments flagged supervised or not.

Labels are built by construction: each segment is tokenised on its own and its tokens are
supervised (assistant text + end-of-turn marker) or masked (everything else). Nothing is ever
recovered by re-tokenising the whole prompt and mapping character offsets back, which is how
LLaVA ends up silently masking whole samples on a "tokenization mismatch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A conversation that no template can render (bad roles, order, or content)."""


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


def normalize_messages(conversation: Iterable[Any]) -> list[Message]:
    """Accept LLaVA turns ({"from": "human"|"gpt", "value"}), chat messages ({"role", "content"})
    or `Message`s, and return `Message`s with roles system/user/assistant."""
    messages = []
    for i, turn in enumerate(conversation):
        if isinstance(turn, Message):
            messages.append(turn)
            continue
        if not isinstance(turn, dict):
            raise ConversationError(f"turn {i} is a {type(turn).__name__}, expected a dict")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLE_ALIASES:
            raise ConversationError(
                f"turn {i} has role {role!r}; expected one of {sorted(ROLE_ALIASES)} "
                "(under key 'from' or 'role')"
            )
        if not isinstance(content, str):
            raise ConversationError(
                f"turn {i} ({role}) has no text: expected a string under 'value' or 'content', got "
                f"{type(content).__name__}"
            )
        messages.append(Message(ROLE_ALIASES[role], content))
    return messages


def check_turn_order(messages: list[Message], *, for_generation: bool = False) -> None:
    """An optional leading system message, then user/assistant alternating from a user turn.
    Training needs at least one assistant turn; a generation prompt must end on a user turn."""
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if not body:
        raise ConversationError("conversation has no user or assistant turn")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            where = i + (len(messages) - len(body))
            raise ConversationError(
                f"turn {where} is {m.role!r} but {expected!r} was expected: turns must alternate "
                "user/assistant, starting with a user turn, after an optional system message"
            )
    if for_generation and body[-1].role != "user":
        raise ConversationError("a generation prompt must end with a user turn")
    if not for_generation and not any(m.role == "assistant" for m in body):
        raise ConversationError("conversation has no assistant turn, so nothing would be supervised")


class Template(Protocol):
    name: str

    def render_segments(
        self, messages: list[Message], *, add_generation_prompt: bool, bos: str | None, eos: str | None
    ) -> list[Segment]: ...

    @property
    def control_tokens(self) -> tuple[str, ...]: ...

    def end_of_turn(self, eos: str | None) -> str | None: ...


@dataclass(frozen=True)
class ChatTemplate:
    """A template written as fixed strings. "{content}"/"{system}" are substituted; "{eos}" in
    `end_of_turn` is the tokenizer's EOS token."""

    name: str
    default_system: str = ""
    system_format: str = "{system}"
    user_format: str = "{content}"  # the whole user turn, masked
    assistant_header: str = ""  # masked; a generation prompt ends with it
    assistant_format: str = "{content}"  # supervised
    end_of_turn_marker: str = "{eos}"  # supervised right after the assistant text
    turn_suffix: str = ""  # masked text after the end-of-turn marker
    add_bos: bool = True
    user_text: bool = True  # False ('plain'): a user turn contributes only its image placeholders
    image_placeholder: str = "<image>"
    control_tokens: tuple[str, ...] = ()

    def end_of_turn(self, eos: str | None) -> str | None:
        if "{eos}" in self.end_of_turn_marker:
            if eos is None:
                raise ValueError(f"template {self.name!r} ends assistant turns with EOS but the tokenizer has none")
            return self.end_of_turn_marker.replace("{eos}", eos)
        return self.end_of_turn_marker

    def render_segments(
        self, messages: list[Message], *, add_generation_prompt: bool, bos: str | None, eos: str | None
    ) -> list[Segment]:
        end = self.end_of_turn(eos) or ""
        segments: list[Segment] = []
        if self.add_bos and bos:
            segments.append(Segment(bos, False))
        system = self.default_system
        if messages and messages[0].role == "system":
            system, messages = messages[0].content, messages[1:]
            if not self.user_text and system:
                raise ConversationError(f"template {self.name!r} takes no system prompt")
        if system and self.user_text:
            segments.append(Segment(self.system_format.replace("{system}", system), False))
        for m in messages:
            if m.role == "user":
                text = m.content if self.user_text else self.image_placeholder * m.content.count(self.image_placeholder)
                segments.append(Segment(self.user_format.replace("{content}", text), False))
            elif m.role == "assistant":
                if self.assistant_header:
                    segments.append(Segment(self.assistant_header, False))
                segments.append(Segment(self.assistant_format.replace("{content}", m.content) + end, True))
                if self.turn_suffix:
                    segments.append(Segment(self.turn_suffix, False))
            else:
                raise ConversationError("a system message is only allowed as the first turn")
        if add_generation_prompt and self.assistant_header:
            segments.append(Segment(self.assistant_header, False))
        return [s for s in segments if s.text]


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    # Pretraining: image then caption; no system prompt, no roles.
    "plain": ChatTemplate(name="plain", user_text=False),
    # LLaVA-1.5: "<s>SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        default_system=VICUNA_SYSTEM,
        system_format="{system} ",
        user_format="USER: {content} ",
        assistant_header="ASSISTANT:",
        assistant_format=" {content}",
    ),
    "phi3": ChatTemplate(
        name="phi3",
        system_format="<|system|>\n{system}<|end|>\n",
        user_format="<|user|>\n{content}<|end|>\n",
        assistant_header="<|assistant|>\n",
        end_of_turn_marker="<|end|>",
        turn_suffix="\n",
        add_bos=False,
        control_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    "chatml": ChatTemplate(
        name="chatml",
        default_system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_header="<|im_start|>assistant\n",
        end_of_turn_marker="<|im_end|>",
        turn_suffix="\n",
        add_bos=False,
        control_tokens=("<|im_start|>", "<|im_end|>"),
    ),
}

TOKENIZER_TEMPLATE = "tokenizer"
TEMPLATE_NAMES = (*BUILTIN_TEMPLATES, TOKENIZER_TEMPLATE)
IMAGE_POSITIONS = ("first", "last")  # where a message's images go when its text does not place them


def with_placeholders(text: str, placeholder: str, count: int = 1, position: str = "first") -> str:
    """`text` with `count` image placeholders, each on its own line, before it or after it."""
    if position == "last":
        return text + ("\n" + placeholder) * count
    return (placeholder + "\n") * count + text


def placement_of(text: str, placeholder: str) -> str | None:
    """Where `text` holds its image placeholders: "first" (before the words), "last" (after
    them), "inside" (among them), or None (it has none): the inverse of `with_placeholders`."""
    if placeholder not in text:
        return None
    words = [part.strip() for part in text.split(placeholder)]
    if not any(words[:-1]):
        return "first"
    if not any(words[1:]):
        return "last"
    return "inside"


class TokenizerChatTemplate:
    """The tokenizer's own Jinja chat template, made to yield exact masks.

    The conversation is rendered prefix by prefix: messages[:i], then messages[:i] plus the
    generation prompt, then messages[:i+1]. Each rendering must extend the previous one; the
    new text is one segment. The text an assistant message adds after the generation prompt is
    supervised up to and including the end-of-turn marker; what follows it (e.g. a newline) is
    masked. A template that rewrites earlier turns (e.g. strips past reasoning) is rejected with
    an error, since no exact mask exists for it.

    Transformers' `return_assistant_tokens_mask` is not used: it needs `{% generation %}` blocks,
    which few templates carry, and maps character offsets of the whole re-tokenised text.
    """

    name = TOKENIZER_TEMPLATE
    control_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any, end_of_turn: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'tokenizer' needs a tokenizer with a chat_template; this one has none. "
                f"Pick a named template instead: {sorted(BUILTIN_TEMPLATES)}"
            )
        self._tokenizer = tokenizer
        self._end_of_turn = end_of_turn or self._probe_end_of_turn()

    def end_of_turn(self, eos: str | None) -> str | None:
        return self._end_of_turn or eos

    def _probe_end_of_turn(self) -> str | None:
        """The first special token the template writes after an assistant message's text
        (e.g. <|im_end|>, <|end|>, <|eot_id|>); None when it writes none."""
        probe = "Probe reply"
        messages = [Message("user", "Probe question"), Message("assistant", probe)]
        header = self._render(messages[:1], add_generation_prompt=True)
        rendered = self._render(messages, add_generation_prompt=False)
        if not rendered.startswith(header) or probe not in rendered[len(header):]:
            return None
        tail = rendered[len(header):].split(probe, 1)[1]
        special = set(self._tokenizer.all_special_tokens)
        special.update(t.content for t in self._tokenizer.added_tokens_decoder.values() if t.special)
        found = [(tail.find(t), t) for t in special if t and t in tail]
        return min(found)[1] if found else None

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self._tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @staticmethod
    def _extend(previous: str, rendered: str, what: str) -> str:
        if not rendered.startswith(previous):
            raise ConversationError(
                f"the tokenizer's chat template is not prefix-stable: rendering {what} does not extend "
                "the rendering of the turns before it, so exact label masks cannot be built. Use a "
                f"named template ({sorted(BUILTIN_TEMPLATES)}) instead.\n"
                f"before: {previous[-200:]!r}\nafter:  {rendered[-200:]!r}"
            )
        return rendered[len(previous):]

    def render_segments(
        self, messages: list[Message], *, add_generation_prompt: bool, bos: str | None, eos: str | None
    ) -> list[Segment]:
        end = self.end_of_turn(eos)
        segments: list[Segment] = []
        previous = ""
        for i, m in enumerate(messages):
            if m.role == "assistant":
                header = self._render(messages[:i], add_generation_prompt=True)
                segments.append(Segment(self._extend(previous, header, f"the header of turn {i}"), False))
                previous = header
            rendered = self._render(messages[: i + 1], add_generation_prompt=False)
            new_text = self._extend(previous, rendered, f"turn {i}")
            if m.role == "assistant":
                segments.extend(_split_after_end(new_text, m.content, end))
            else:
                segments.append(Segment(new_text, False))
            previous = rendered
        if add_generation_prompt:
            header = self._render(messages, add_generation_prompt=True)
            segments.append(Segment(self._extend(previous, header, "the generation prompt"), False))
        return [s for s in segments if s.text]


def _split_after_end(text: str, content: str, end: str | None) -> list[Segment]:
    """Supervise an assistant turn's rendered text up to and including its end-of-turn marker."""
    if not end:
        return [Segment(text, True)]
    stripped = content.strip()
    search_from = text.find(stripped) + len(stripped) if stripped and stripped in text else 0
    k = text.find(end, search_from)
    if k < 0:
        return [Segment(text, True)]
    cut = k + len(end)
    return [Segment(text[:cut], True), Segment(text[cut:], False)]


def get_template(name: str, tokenizer: Any = None, end_of_turn: str | None = None) -> Template:
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    if name == TOKENIZER_TEMPLATE:
        if tokenizer is None:
            raise ValueError("template 'tokenizer' needs the tokenizer")
        return TokenizerChatTemplate(tokenizer, end_of_turn=end_of_turn)
    raise ValueError(f"unknown chat template {name!r}; choose one of {list(TEMPLATE_NAMES)}")
