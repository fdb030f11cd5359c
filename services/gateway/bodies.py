"""Request bodies: read (size-limited), parsed, and checked against small view structs of
just the fields the gateway reads; every other field is forwarded as it came.

Anything wrong is an ``ApiError`` with a message that says what: the gateway answers 400
(413 for size), never 500, whatever arrives.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import msgspec
from starlette.requests import Request


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def invalid(message: str, code: str = "invalid_body") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


class Message(msgspec.Struct):
    role: str
    content: Any = None


class ChatView(msgspec.Struct):
    """What the gateway reads of a chat-completions body (and relies on being typed)."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | None = None


class RouteView(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)] | None = None
    input: str | None = None
    model: str | None = None


class OutcomeView(msgspec.Struct, forbid_unknown_fields=True):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    completed: bool | None = None
    correct_route: bool | None = None
    expected_route: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    quality_score: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    labels: Annotated[list[str], msgspec.Meta(max_length=16)] = []
    completion_time_s: Annotated[float, msgspec.Meta(ge=0)] | None = None


_DECODER = msgspec.json.Decoder()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``. msgspec reads it in one pass; what it refuses is read
    again by Python's json, which accepts a lone surrogate escape (valid JSON syntax,
    though no valid Unicode: the router replaces it) but still refuses NaN, Infinity and
    numbers too large for a float; that pass also says more precisely what is wrong."""
    try:
        return _DECODER.decode(body)
    except RecursionError:
        raise invalid("malformed JSON: nested too deeply", "invalid_json") from None
    except msgspec.DecodeError:
        pass
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:
        raise invalid("malformed JSON: nested too deeply", "invalid_json") from None
    except ValueError as exc:
        raise invalid(f"malformed JSON: {exc}", "invalid_json") from None


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"request body over {limit} bytes", "invalid_request_error",
                         "body_too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return parse_json(bytes(body))


def view(data: Any, kind: type[Any]) -> Any:
    """``data`` checked as ``kind``: a 400 naming the field and what is wrong with it."""
    if not isinstance(data, dict):
        raise invalid("invalid request body: the body must be a JSON object")
    try:
        return msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise invalid(f"invalid request body: {_where(str(exc))}") from None


def _where(message: str) -> str:
    """msgspec's "Expected `bool`, got `str` - at `$.stream`" as "stream: expected ..."."""
    reason, sep, where = message.rpartition(" - at `")
    if not sep:
        return message
    path = where.rstrip("`").removeprefix("$").lstrip(".") or "body"
    return f"{path}: {reason[:1].lower()}{reason[1:]}"


async def read_body(request: Request, kind: type[Any], limit: int) -> tuple[dict[str, Any], Any]:
    """The JSON body (size-limited) and its view; ApiError when either fails."""
    data = await read_json(request, limit)
    return data, view(data, kind)


def openapi_body(kind: type[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The requestBody of an operation whose handler reads the body itself (to answer
    with OpenAI-shaped errors), and the component schemas it refers to."""
    (schema,), components = msgspec.json.schema_components(
        [kind], ref_template="#/components/schemas/{name}")
    body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema}}}}
    return body, components
