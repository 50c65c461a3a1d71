"""Engine deltas -> a sequence of output parts (reasoning, text, tool call), each opened, grown and closed:
the shape both Anthropic's content blocks and the Responses API's output items stream in."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from mixq.serve.parsing import Delta

REASONING, TEXT, CALL = "reasoning", "text", "call"


@dataclass
class Part:
    kind: str
    index: int
    text: str = ""  # reasoning or text; a call's arguments as JSON
    name: Optional[str] = None  # a call's function name


@dataclass
class Event:
    what: str  # start | delta | stop
    part: Part
    delta: str = ""


@dataclass
class Parts:
    """Feed deltas in order; each feed returns the events it caused. `parts` holds everything so far."""

    parts: list = field(default_factory=list)
    open: Optional[Part] = None

    def _switch(self, kind: str, events: list, name: Optional[str] = None) -> Part:
        if self.open is not None and self.open.kind == kind and kind != CALL:
            return self.open
        self._close(events)
        self.open = Part(kind, len(self.parts), name=name)
        self.parts.append(self.open)
        events.append(Event("start", self.open))
        return self.open

    def _close(self, events: list) -> None:
        if self.open is not None:
            events.append(Event("stop", self.open))
            self.open = None

    def feed(self, d: Delta) -> list[Event]:
        events: list[Event] = []
        for kind, text in ((REASONING, d.reasoning), (TEXT, d.content)):
            if text:
                part = self._switch(kind, events)
                part.text += text
                events.append(Event("delta", part, text))
        for call in d.tool_calls:
            args = call.get("arguments", {})
            args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            part = self._switch(CALL, events, name=call["name"])
            part.text = args
            events.append(Event("delta", part, args))
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        self._close(events)
        return events


def call_input(part: Part) -> dict:
    """A call's arguments as an object (Anthropic's tool_use.input); text that is not an object is kept whole."""
    try:
        value = json.loads(part.text or "{}")
    except json.JSONDecodeError:
        return {"_raw": part.text}
    return value if isinstance(value, dict) else {"_value": value}
