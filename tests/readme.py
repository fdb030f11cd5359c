"""What the README promises, read from it, for tests that check the product against it."""

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


@dataclass(frozen=True)
class DocumentedMetric:
    name: str
    type: str
    labels: frozenset[str]
    services: str


def documented_metrics() -> dict[str, DocumentedMetric]:
    """The rows of the README's metrics table."""
    text = README.read_text()
    table = text[text.index("## Metrics"):]
    table = table[: table.index("\n## ", 1)]
    metrics = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`routemesh_"):
            continue
        name, kind, labels, services = cells
        metrics[name.strip("`")] = DocumentedMetric(
            name.strip("`"), kind, frozenset(re.findall(r"`([a-z_]+)`", labels)), services)
    return metrics


def served_metrics(text: str) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """Family name -> (type, the label sets of its samples) of a /metrics page."""
    families: dict[str, tuple[str, set[frozenset[str]]]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE routemesh_"):
            _, _, name, kind = line.split()
            families[name] = (kind, set())
    for line in text.splitlines():
        if not line.startswith("routemesh_"):
            continue
        sample = line.split("{")[0].split()[0]
        labels = frozenset(re.findall(r'([a-z_]+)="', line)) - {"le"}
        family = next((f for f in families if sample == f or (sample.startswith(f + "_")
                       and sample[len(f) + 1:] in ("bucket", "sum", "count"))), None)
        if family is not None:
            families[family][1].add(labels)
    return families
