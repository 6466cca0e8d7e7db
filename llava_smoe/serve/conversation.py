"""A multi-turn conversation the interactive front ends (terminal, web page) keep per user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from llava_smoe.inference.engine import Completion, Turn
from llava_smoe.inference.sampling import SamplingParams

if TYPE_CHECKING:
    from PIL import Image

    from llava_smoe.inference.engine import Engine


@dataclass
class Conversation:
    """Turns so far plus images waiting for the next user message."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    pending_images: list["Image.Image"] = field(default_factory=list)
    last: Completion | None = None

    def reply(self, engine: "Engine", text: str, params: SamplingParams) -> Iterator[str]:
        """Stream the reply to `text`; the exchange joins the history once the reply is complete
        (a refused or abandoned request leaves the conversation as it was)."""
        user = Turn("user", text, tuple(self.pending_images))
        system = [Turn("system", self.system)] if self.system else []
        handle = engine.submit(system + self.turns + [user], params)
        done = False
        try:
            yield from handle
            done = True
        finally:
            if not done:
                handle.cancel()
        self.last = handle.result()
        self.turns += [user, Turn("assistant", self.last.text)]
        self.pending_images = []

    def reset(self) -> None:
        self.turns, self.pending_images, self.last = [], [], None


def routing_lines(completion: Completion | None) -> list[str]:
    """Tokens per expert in each MoE layer for a reply, as aligned text lines."""
    if completion is None:
        return ["no reply yet"]
    if not completion.routing:
        return ["this model has no MoE layers"]
    width = max(len(row["layer"]) for row in completion.routing)
    lines = [f"{'layer':<{width}}  tokens per expert (text | image)"]
    for row in completion.routing:
        text = " ".join(f"{c:5d}" for c in row["text"])
        image = " ".join(f"{c:5d}" for c in row["image"])
        lines.append(f"{row['layer']:<{width}}  {text} | {image}")
    return lines
