"""Labelled datasets (JSON lines of ``id``, ``prompt`` or ``messages``, ``route`` and an
optional ``model``): what ``eval`` scores and ``bank build --train`` trains on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from routemesh.services.router.cascade import AUTO_MODEL
from routemesh.services.router.request import RouteRequest


@dataclass(frozen=True)
class EvalItem:
    id: str
    request: RouteRequest
    route: str


class DatasetError(ValueError):
    pass


def load_dataset(path: Path) -> list[EvalItem]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            # A row may name the model its request asked for; most leave it to routing.
            model = row.get("model", AUTO_MODEL)
            if "messages" in row:
                request = RouteRequest.from_body({"messages": row["messages"], "model": model})
            else:
                request = RouteRequest.from_text(row["prompt"], model)
            items.append(EvalItem(str(row["id"]), request, row["route"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"{path.name}:{number}: needs id, prompt or messages, and route ({exc})"
            ) from None
    if not items:
        raise DatasetError(f"{path.name}: no items")
    return items


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
