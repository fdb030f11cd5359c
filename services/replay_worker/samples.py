"""Reviewed samples into eval cases: only redacted samples, only route ids as labels,
each text once. What cannot be exported is quarantined with its reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routemesh.services.router import LoadedConfig, RouteRequest

# Longer samples are quarantined: a reviewed sample is a prompt someone read and judged,
# and a giant one is more likely a pasted document than a routing example.
MAX_CHARS = 20_000


@dataclass(frozen=True)
class Quarantined:
    line: int
    id: str | None
    reason: str


@dataclass(frozen=True)
class Imported:
    rows: list[dict[str, Any]]
    quarantined: list[Quarantined]


def _request(row: dict[str, Any]) -> RouteRequest:
    if isinstance(row.get("messages"), list):
        return RouteRequest.from_body({"messages": row["messages"]})
    prompt = row.get("prompt", row.get("text"))
    if not isinstance(prompt, str):
        raise ValueError("needs prompt or messages")
    return RouteRequest.from_text(prompt)


def import_samples(path: Path, loaded: LoadedConfig, max_chars: int = MAX_CHARS) -> Imported:
    routes = {route.id for route in loaded.config.routes}
    models = {route.target_model: route.id for route in loaded.config.routes}
    rows: list[dict[str, Any]] = []
    quarantined: list[Quarantined] = []
    seen: dict[str, str] = {}
    # Exported ids and their lines: the replay indexes decisions by id, so a second sample
    # under one id would mix two cases' results.
    ids: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue

        def refuse(reason: str, sample_id: str | None = None, number: int = number) -> None:
            quarantined.append(Quarantined(number, sample_id, reason))

        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            sample_id = str(row.get("id") or row.get("request_id") or "")
            label = row.get("route", row.get("label"))
            request = _request(row)
        except (ValueError, TypeError) as exc:
            refuse(f"not a sample: {exc}")
            continue
        if not sample_id:
            refuse("no id or request_id")
        elif sample_id in ids:
            refuse(f"duplicate_id: {sample_id!r} was exported from line {ids[sample_id]}",
                   sample_id)
        elif not any(text.strip() for _, text in request.messages):
            refuse("empty_content: no text to route", sample_id)
        elif row.get("redacted") is not True:
            refuse("not redacted: only samples with \"redacted\": true are imported",
                   sample_id)
        elif label in models and label not in routes:
            refuse(f"label {label!r} is a target model; label with its route id "
                   f"{models[label]!r}", sample_id)
        elif label not in routes:
            refuse(f"label {label!r} is no route of {loaded.source} "
                   f"({', '.join(sorted(routes))})", sample_id)
        elif request.prompt_chars > max_chars:
            refuse(f"too long: {request.prompt_chars} characters (at most {max_chars})",
                   sample_id)
        elif request.prompt_sha256 in seen:
            refuse(f"duplicate: same text as {seen[request.prompt_sha256]}", sample_id)
        else:
            seen[request.prompt_sha256] = sample_id
            ids[sample_id] = number
            out: dict[str, Any] = {"id": sample_id, "route": label}
            if isinstance(row.get("messages"), list):
                out["messages"] = row["messages"]
            else:
                out["prompt"] = row.get("prompt", row.get("text"))
            rows.append(out)
    return Imported(rows, quarantined)


def write_eval(imported: Imported, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n"
                              for row in imported.rows), encoding="utf-8")
