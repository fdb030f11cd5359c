"""Request bodies: read (size-limited), parsed, and checked against small view structs of
just the fields the gateway reads; every other field is forwarded as it came.

Anything wrong is an ``ApiError`` with a message that says what: the gateway answers 400
(413 for size), never 500, whatever arrives.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

import msgspec
from starlette.requests import Request

from routemesh.services.router import ChatBody, Message


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def invalid(message: str, code: str = "invalid_body") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


# What a client writes that reaches an event is bounded and checked here, or refused
# with a 400 naming the field: a value the gateway cannot describe must never reach the
# publisher (one unencodable or oversized event used to stop all publishing).
ModelName = Annotated[str, msgspec.Meta(
    min_length=1, max_length=256, pattern=r"^[!-~]+$",
    description="printable ASCII without spaces, at most 256 characters")]
RequestIdText = Annotated[str, msgspec.Meta(min_length=1, max_length=128,
                                            pattern=r"^[A-Za-z0-9._:-]+$")]
RouteIdText = Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                          pattern=r"^[A-Za-z0-9_.:-]+$")]
# Printable text without control characters or lone surrogates.
LabelText = Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                        pattern=r"^[^\x00-\x1f\x7f\ud800-\udfff]+$")]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ChatView(ChatBody):
    """A chat-completions body as the gateway reads it: what routing reads (``ChatBody``)
    and what the edge relies on being typed."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: ModelName | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | None = None


class RouteView(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)] | None = None
    input: str | None = None
    model: ModelName | None = None

    def body(self) -> ChatBody:
        if self.messages is None:
            if self.input is None:
                raise invalid("invalid request body: give messages or input")
            return ChatBody([Message("user", self.input)], self.model)
        return ChatBody(self.messages, self.model)


class OutcomeBody(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/outcomes``."""

    request_id: RequestIdText
    completed: bool | None = None
    correct_route: bool | None = None
    expected_route: RouteIdText | None = None
    quality_score: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    labels: Annotated[list[LabelText], msgspec.Meta(max_length=16)] = []
    completion_time_s: Annotated[float, msgspec.Meta(ge=0)] | None = None


def client_request_id(request: Request) -> str | None:
    """The client's ``x-request-id``, for correlation; refused when it is not an id."""
    given = request.headers.get("x-request-id")
    if given is None:
        return None
    if not _REQUEST_ID.match(given):
        raise invalid("x-request-id: must be 1 to 128 of A-Z a-z 0-9 . _ : -",
                      "invalid_header")
    return given


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


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


async def read_json(request: Request, limit: int) -> Any:
    # A body must say it is JSON: text/plain, form types and no type at all are what a
    # browser may send cross-origin without asking first, so a web page could otherwise
    # spend a developer's local gateway (and its upstream keys).
    if not _is_json(request.headers.get("content-type")):
        raise ApiError(415, "the body must be JSON: send Content-Type: application/json",
                       "invalid_request_error", "unsupported_media_type")
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


# What a pattern of the views above admits, in words.
_PATTERNS = {
    "^[!-~]+$": "printable ASCII without spaces",
    "^[A-Za-z0-9._:-]+$": "letters, digits and . _ : -",
    "^[A-Za-z0-9_.:-]+$": "letters, digits and . _ : -",
    r"^[^\x00-\x1f\x7f\ud800-\udfff]+$": "text without control characters or lone surrogates",
}


def _where(message: str) -> str:
    """msgspec's "Expected `bool`, got `str` - at `$.stream`" as "stream: expected ..."."""
    reason, sep, where = message.rpartition(" - at `")
    if not sep:
        return message
    for pattern, words in _PATTERNS.items():
        reason = reason.replace(f"matching regex {pattern!r}", f"of {words}")
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
