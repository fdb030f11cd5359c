"""Changes to a route config as a reviewable unified diff, and applied in place keeping
the file's comments and layout (ruamel.yaml round-trip, not a regex over lines)."""

from __future__ import annotations

import difflib
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.util import load_yaml_guess_indent

from routemesh.services.router import parse_config
from routemesh.services.runtime.files import write_atomically


@dataclass(frozen=True)
class ConfigChange:
    thresholds: dict[str, float] = field(default_factory=dict)
    margin: float | None = None
    # Keys of the `semantic:` block (head, aggregation, dense_weight).
    semantic: dict[str, object] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.thresholds or self.semantic) or self.margin is not None


def rewrite(text: str, change: ConfigChange) -> str:
    _, indent, dash = load_yaml_guess_indent(text)
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    # The guess is the indent of a sequence's items; a mapping's is that less the dash's.
    yaml.indent(mapping=indent - dash if dash else indent, sequence=indent, offset=dash)
    document = yaml.load(text)
    unknown = set(change.thresholds) - {route["id"] for route in document["routes"]}
    if unknown:
        raise KeyError(f"no route {', '.join(sorted(unknown))} in the config")
    for route in document["routes"]:
        if route["id"] in change.thresholds:
            route["threshold"] = change.thresholds[route["id"]]
    if change.margin is not None:
        document["margin"] = change.margin
    if change.semantic:
        if document.get("semantic") is None:
            document["semantic"] = {}
        for key, value in change.semantic.items():
            document["semantic"][key] = value
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def diff(path: Path, change: ConfigChange) -> str:
    text = path.read_text(encoding="utf-8")
    new = rewrite(text, change)
    return "".join(difflib.unified_diff(
        text.splitlines(keepends=True), new.splitlines(keepends=True),
        fromfile=f"a/{path.name}", tofile=f"b/{path.name}"))


def apply(path: Path, change: ConfigChange) -> Path:
    """Rewrite the config in place (validated first), the old file kept as ``.bak``."""
    text = path.read_text(encoding="utf-8")
    new = rewrite(text, change)
    parse_config(new, path.name)
    backup = path.with_name(path.name + ".bak")
    shutil.copy2(path, backup)
    write_atomically(path, new.encode("utf-8"))
    return backup
