"""The chart rendered by Helm's own SDK (no helm binary), as helm-unittest would see it."""

import copy
from pathlib import Path

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "routemesh"
MINIMAL = yaml.safe_load((CHART / "ci" / "minimal-values.yaml").read_text())
ALL_ON = yaml.safe_load((CHART / "ci" / "all-on-values.yaml").read_text())


def merged(base: dict, override: dict) -> dict:
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def render(values: dict | None = None, base: dict = MINIMAL) -> dict[str, list[dict]]:
    """Template path -> the manifests it rendered."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(merged(base, values or {}), name="rm", namespace="mesh")
    return {path: [d for d in yaml.safe_load_all(text) if d]
            for path, text in out.items() if not path.endswith("NOTES.txt")}


def manifests(values: dict | None = None, base: dict = MINIMAL) -> list[dict]:
    return [doc for docs in render(values, base).values() for doc in docs]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def env(workload: dict) -> dict:
    return {e["name"]: e for e in container(workload)["env"]}
