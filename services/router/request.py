"""What the cascade reads of a request, extracted once from a typed view of its body.

``ChatBody`` is the part of an OpenAI chat-completions body that routing reads; the
gateway validates a request into (a subclass of) it, datasets convert their rows into it,
and ``RouteRequest.of`` turns it into the values every later phase uses. Format signals
are enumerations, never the client's text: a value the mesh does not know is ``other``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

ToolChoice = Literal["none", "auto", "required", "function", "other"]
ResponseFormat = Literal["text", "json_object", "json_schema", "other"]


class Message(msgspec.Struct):
    role: str
    content: Any = None
    tool_calls: Any = None


class ChatBody(msgspec.Struct):
    """The fields of a chat-completions body the cascade reads."""

    messages: list[Message]
    model: str | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None


def valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (valid JSON escapes, but no Unicode text) replaced by
    U+FFFD, so that hashing, tokenising and encoding it cannot fail."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def text_of(content: Any) -> str:
    """Text of an OpenAI message content: a string or a list of typed parts."""
    if isinstance(content, str):
        return valid_unicode(content)
    if isinstance(content, list):
        return valid_unicode("\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text")
            and isinstance(part.get("text"), str)
        ))
    return ""


def tool_choice_kind(value: Any) -> ToolChoice | None:
    if value is None:
        return None
    if isinstance(value, str):
        for known in ("none", "auto", "required"):
            if value == known:
                return known
        return "other"
    if isinstance(value, dict) and value.get("type") == "function":
        return "function"
    return "other"


def response_format_kind(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    for known in ("text", "json_object", "json_schema"):
        if kind == known:
            return known
    return "other"


@dataclass(frozen=True)
class RouteRequest:
    """What the cascade reads of a chat request: text to match and the request's shape.

    ``correlation_id`` is the client's own id for the request (``x-request-id``), carried
    as it came; the mesh's request id is its own."""

    messages: tuple[tuple[str, str], ...]
    requested_model: str | None = None
    override: str | None = None
    tools_present: bool = False
    tool_history: bool = False
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    tools_chars: int = 0
    correlation_id: str | None = None

    @classmethod
    def of(cls, body: ChatBody, override: str | None = None,
           correlation_id: str | None = None) -> RouteRequest:
        tool_history = any(m.role == "tool" or m.tool_calls for m in body.messages)
        tools = body.tools or body.functions or []
        return cls(
            messages=tuple((m.role, text_of(m.content)) for m in body.messages),
            requested_model=body.model or None,
            override=override,
            tools_present=bool(tools),
            tool_history=tool_history,
            tool_choice=tool_choice_kind(body.tool_choice),
            response_format=response_format_kind(body.response_format),
            tools_chars=len(msgspec.json.encode(tools)) if tools else 0,
            correlation_id=correlation_id,
        )

    @classmethod
    def from_body(cls, body: Any, override: str | None = None) -> RouteRequest:
        """From a chat-completions body as plain JSON values (datasets, samples), or
        ``{"input": "..."}``; ValueError when it is not one."""
        if isinstance(body, dict) and body.get("messages") is None \
                and isinstance(body.get("input"), str):
            body = {**body, "messages": [{"role": "user", "content": body["input"]}]}
        try:
            return cls.of(msgspec.convert(body, ChatBody), override)
        except msgspec.ValidationError as exc:
            raise ValueError(f"not a chat request: {exc}") from None

    @classmethod
    def from_text(cls, text: str, requested_model: str | None = None) -> RouteRequest:
        return cls(messages=(("user", valid_unicode(text)),), requested_model=requested_model)

    def match_text(self, mode: str) -> str:
        if mode == "conversation":
            return "\n".join(text for role, text in self.messages if role != "assistant" and text)
        for role, text in reversed(self.messages):
            if role == "user" and text:
                return text
        return ""

    @property
    def prompt_chars(self) -> int:
        return sum(len(text) for _, text in self.messages)

    @property
    def prompt_sha256(self) -> str:
        canonical = msgspec.json.encode([[role, text] for role, text in self.messages])
        return hashlib.sha256(canonical).hexdigest()
