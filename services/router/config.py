"""The route config: one YAML file, validated into typed structs.

Unknown keys are errors. An invalid file is refused with the key path
(``routes[1].threshold``), the YAML line it sits on, and the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

RouteIdStr = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
]
Unit = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Positive = Annotated[float, msgspec.Meta(gt=0.0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0.0)]
EncoderBackend = Literal["onnx", "onnx-int8", "torch"]


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class EncoderConfig(_Strict, frozen=True):
    kind: Literal["local", "openai"] = "local"
    # local only: ONNX Runtime (default, faster, same embeddings as PyTorch), the same
    # model with int8 weights (faster again, slightly different embeddings), or PyTorch.
    backend: EncoderBackend = "onnx"
    # local ONNX only: how many encoder runs go at once (chunks of a batch, or the
    # micro-batches of concurrent requests), each on its own thread, one core at most.
    threads: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout_s: Positive = 10.0
    max_retries: NonNegativeInt = 2
    # Micro-batching of concurrent encodes: at most this many texts per call (answered
    # in pieces as they are encoded), waiting at most this long for company. 0 is
    # "natural batching": a batch is whatever queued while the encoder was busy. A wait
    # adds itself to a lone request's latency and, with natural batching, nothing to
    # throughput under load (bench/decision.py, single caller and concurrent).
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    max_wait_ms: Annotated[float, msgspec.Meta(ge=0.0, le=1000.0)] = 0.0


class SemanticConfig(_Strict, frozen=True):
    # How a route's score is made: a logistic head fitted on the bank's vectors
    # ("logistic"), or (head "none") an aggregation of its utterances' similarities:
    # the best one ("max"), the mean of the best k ("topk_mean"), or the cosine to the
    # route's centroid ("centroid"). Either way the score is a calibrated probability.
    # The defaults were chosen by cross-validation on the shipped banks' utterances,
    # holding out paraphrase groups (bench/routing_cv.py).
    head: Literal["none", "logistic"] = "logistic"
    aggregation: Literal["max", "topk_mean", "centroid"] = "centroid"
    k: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3
    # Blend of dense cosine and sparse lexical similarity: dense_weight * dense + (1 - w) * sparse.
    dense_weight: Unit = 0.8
    # The text matched against the bank: the last user message or the whole conversation.
    match_text: Literal["last_user", "conversation"] = "last_user"
    # BM25 parameters of the sparse side.
    bm25_k1: Positive = 1.2
    bm25_b: Unit = 0.75
    # A raw BM25 score s is squashed to s / (s + sparse_scale), so the blend is bounded.
    sparse_scale: Positive = 4.0
    # Candidates per side when querying Qdrant directly.
    candidates: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100


class BankConfig(_Strict, frozen=True):
    collection: str | None = None
    backend: Literal["memory", "qdrant"] = "memory"


class KeywordCondition(_Strict, frozen=True):
    any: tuple[str, ...] = ()
    all: tuple[str, ...] = ()


class RuleCondition(_Strict, frozen=True):
    has_tools: bool | None = None
    keywords: KeywordCondition | None = None
    regex: str | None = None
    min_input_chars: NonNegativeInt | None = None
    max_input_chars: NonNegativeInt | None = None
    min_messages: NonNegativeInt | None = None
    requested_model: str | None = None


class RuleConfig(_Strict, frozen=True):
    id: RouteIdStr
    route: RouteIdStr
    when: RuleCondition
    confidence: Unit = 1.0


class EscalationGates(_Strict, frozen=True):
    """Deterministic checks of a cheap model's answer; any failure escalates."""

    min_chars: NonNegativeInt = 80
    # Hedges and refusals, matched case-insensitively anywhere in the answer.
    refusal_phrases: tuple[str, ...] = (
        "as an ai", "i cannot", "i'm sorry, but", "i don't have access", "i am unable to",
    )
    json_when_asked: bool = True
    tool_call_when_required: bool = True


class Route(_Strict, frozen=True):
    id: RouteIdStr
    target_model: Annotated[str, msgspec.Meta(min_length=1)]
    threshold: Unit = 0.5
    utterances: tuple[str, ...] = ()
    utterances_file: str | None = None
    description: str = ""
    # Where this route's requests go, if not the gateway's default upstream. The key is
    # named by environment variable, never written in the config.
    upstream_base_url: str | None = None
    upstream_api_key_env: str | None = None
    # Served instead when this route's upstream still fails after retries (a failover;
    # "fallback" is the cascade's default-route layer). ``fallback_route`` is read as an
    # older spelling of this key.
    failover_route: RouteIdStr | None = None
    # Non-streaming only: retry on this route when a gate fails on the answer.
    escalate_to: RouteIdStr | None = None
    gates: EscalationGates = EscalationGates()
    # What the route's model costs, for `routemesh tune --objective cost` and replays.
    price_per_1k_input_tokens: NonNegativeFloat = 0.0
    price_per_1k_output_tokens: NonNegativeFloat = 0.0


class RoutingConfig(_Strict, frozen=True):
    version: Literal[1]
    default_route: RouteIdStr
    routes: Annotated[tuple[Route, ...], msgspec.Meta(min_length=1)]
    margin: Unit = 0.05
    encoder: EncoderConfig = EncoderConfig()
    semantic: SemanticConfig = SemanticConfig()
    bank: BankConfig = BankConfig()
    rules: tuple[RuleConfig, ...] = ()
    aliases: dict[str, RouteIdStr | None] = {}

    def route(self, route_id: str) -> Route:
        for route in self.routes:
            if route.id == route_id:
                return route
        raise KeyError(route_id)


@dataclass(frozen=True, slots=True)
class Utterance:
    route_id: str
    text: str
    source: str
    index: int
    provenance: str


@dataclass(frozen=True)
class LoadedConfig:
    config: RoutingConfig
    # The config's logical name (its file's base name unless one is given): it travels in
    # every decision, so it is never a local path.
    source: str
    sha256: str
    utterances: tuple[Utterance, ...]
    # Every file the config was read from (itself first, then its utterance files): a
    # change to any of them changes the router.
    files: tuple[Path, ...] = ()


class ConfigError(ValueError):
    """Why a config was refused: where (file, line, key path) and what is wrong."""

    def __init__(self, source: str, path: str, reason: str, line: int | None = None) -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {path or '<root>'}: {reason}")
        self.source = source
        self.path = path
        self.reason = reason
        self.line = line


def canonical_sha256(config: RoutingConfig) -> str:
    """sha256 of the validated config with sorted keys: key order, whitespace, comments
    and explicitly written defaults do not change it."""
    canonical = json.dumps(
        msgspec.to_builtins(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")


def _msgspec_path(message: str) -> tuple[str, str]:
    """Split msgspec's "reason - at `$.routes[1].threshold`" into (path, reason)."""
    reason, sep, where = message.rpartition(" - at `")
    if not sep:
        return "", message
    return where.rstrip("`").removeprefix("$").lstrip("."), reason


def _line_of(root: yaml.Node | None, path: str) -> int | None:
    """The 1-based YAML line of a key path such as ``routes[1].threshold``."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for match in _PATH_PART.finditer("." + path if path and path[0] != "[" else path):
        key, index = match.group(1), match.group(2)
        if isinstance(node, yaml.MappingNode) and key is not None:
            found = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
            if found is None:
                break
            line = next(k for k, v in node.value if v is found).start_mark.line + 1
            node = found
        elif isinstance(node, yaml.SequenceNode) and index is not None:
            if int(index) >= len(node.value):
                break
            node = node.value[int(index)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_config(text: str, source: str = "<config>") -> RoutingConfig:
    """Validate YAML text into a RoutingConfig (structure and cross-references)."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(
            source, "", f"not valid YAML: {getattr(exc, 'problem', exc)}",
            mark.line + 1 if mark else None,
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(source, "", "the config must be a mapping", 1)
    for i, route in enumerate(data.get("routes") or ()):
        if isinstance(route, dict) and "fallback_route" in route:
            if "failover_route" in route:
                key = f"routes[{i}].fallback_route"
                raise ConfigError(source, key, "give failover_route or its older spelling "
                                  "fallback_route, not both", _line_of(root, key))
            route["failover_route"] = route.pop("fallback_route")
    try:
        config = msgspec.convert(data, RoutingConfig, strict=True)
    except msgspec.ValidationError as exc:
        path, reason = _msgspec_path(str(exc))
        if reason.startswith("Object contains unknown field"):
            unknown = reason.split("`")[1]
            path = f"{path}.{unknown}" if path else unknown
            reason = f"unknown key {unknown!r}"
        raise ConfigError(source, path, reason, _line_of(root, path)) from None

    def refuse(path: str, reason: str) -> ConfigError:
        return ConfigError(source, path, reason, _line_of(root, path))

    ids = [route.id for route in config.routes]
    for i, route_id in enumerate(ids):
        if route_id in ids[:i]:
            raise refuse(f"routes[{i}].id", f"duplicate route id {route_id!r}")
    if config.default_route not in ids:
        raise refuse("default_route", f"{config.default_route!r} is not a route ({_known(ids)})")
    for i, rule in enumerate(config.rules):
        if rule.route not in ids:
            raise refuse(f"rules[{i}].route", f"{rule.route!r} is not a route ({_known(ids)})")
        if rule.when == RuleCondition():
            raise refuse(f"rules[{i}].when", "a rule needs at least one condition")
        if rule.when.regex is not None:
            try:
                re.compile(rule.when.regex)
            except re.error as exc:
                raise refuse(f"rules[{i}].when.regex", f"invalid regex: {exc}") from None
    for i, route in enumerate(config.routes):
        for key in ("failover_route", "escalate_to"):
            target = getattr(route, key)
            if target is not None and (target not in ids or target == route.id):
                raise refuse(f"routes[{i}].{key}",
                             f"{target!r} is not another route ({_known(ids)})")
    for alias, target in config.aliases.items():
        if target is not None and target not in ids:
            raise refuse(f"aliases.{alias}", f"{target!r} is not a route ({_known(ids)})")
    if config.encoder.kind == "openai" and not (config.encoder.base_url and config.encoder.model):
        raise refuse("encoder", "kind openai needs base_url and model")
    return config


def _known(ids: list[str]) -> str:
    return "routes: " + ", ".join(ids)


def read_utf8(path: Path, display: str) -> str:
    """A config file's text; ValueError naming the line of the first byte that is not
    UTF-8 (a reload refuses such a file and keeps the last good config)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{display}:{line}: not UTF-8 (byte {data[exc.start]:#04x})") from None


def _read_utterance_file(path: Path, route_id: str, display: str) -> list[Utterance]:
    utterances: list[Utterance] = []
    lines = read_utf8(path, display).splitlines()
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(stripped)
                text, source = item["text"], item.get("source", path.name)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{display}:{number}: needs a JSON object with text ({exc})"
                ) from None
        else:
            text, source = stripped, path.name
        utterances.append(
            Utterance(route_id, text, str(source), len(utterances), f"{path.name}:{number}")
        )
    return utterances


def load_config(path: Path | str, name: str | None = None) -> LoadedConfig:
    """Read, validate and resolve a config file (utterance files relative to it).

    ``name`` is what decisions and error messages call the config (default: the file's
    base name); the path itself stays on this machine."""
    path = Path(path)
    source = name or path.name
    try:
        text = read_utf8(path, source)
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    except ValueError as exc:
        where, _, reason = str(exc).partition(": ")
        raise ConfigError(source, "", reason, int(where.rpartition(":")[2])) from None
    config = parse_config(text, source)
    root = yaml.compose(text)
    utterances: list[Utterance] = []
    files = [path]
    for i, route in enumerate(config.routes):
        own = [
            Utterance(route.id, u, "inline", n, f"{path.name}:routes[{i}].utterances[{n}]")
            for n, u in enumerate(route.utterances)
        ]
        if route.utterances_file:
            file_path = (path.parent / route.utterances_file).resolve()
            key = f"routes[{i}].utterances_file"
            if not file_path.is_file():
                raise ConfigError(source, key, f"no such file {route.utterances_file!r}",
                                  _line_of(root, key))
            files.append(file_path)
            try:
                from_file = _read_utterance_file(file_path, route.id, route.utterances_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(source, key, str(exc), _line_of(root, key)) from None
            offset = len(own)
            own += [
                Utterance(u.route_id, u.text, u.source, offset + u.index, u.provenance)
                for u in from_file
            ]
        if not own:
            key = f"routes[{i}]"
            raise ConfigError(
                source, key, "a route needs utterances or an utterances_file", _line_of(root, key)
            )
        utterances += own
    return LoadedConfig(
        config, source, canonical_sha256(config), tuple(utterances), tuple(dict.fromkeys(files))
    )
