"""House rules about who may import whom, checked on the source tree."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "services"
# Libraries every service may use: the shared runtime and the pure router core
# (the gateway and the replay worker both call it). Those two import no service:
# the router stays pure (no Kafka), the runtime stays below everything.
SHARED = {"runtime", "router"}
ALLOWED = {"runtime": set(), "router": set()}
# The command line composes services; it is no service itself.
COMPOSERS = {"cli"}


def _packages() -> list[str]:
    return sorted(p.name for p in SERVICES.iterdir() if (p / "__init__.py").is_file())


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            found.add(f"<relative level {node.level}>")
    return found


def _service_imports(package: str) -> dict[str, set[str]]:
    """For each file of a package, the other service packages it imports."""
    result = {}
    for path in (SERVICES / package).rglob("*.py"):
        others = set()
        for module in _imported_modules(path):
            if module.startswith("<relative"):
                others.add(module)
                continue
            parts = module.split(".")
            if parts[:2] == ["routemesh", "services"] and len(parts) > 2 and parts[2] != package:
                others.add(parts[2])
        if others:
            result[str(path.relative_to(ROOT))] = others
    return result


@pytest.mark.parametrize("package", [p for p in _packages() if p not in COMPOSERS])
def test_no_service_imports_another_service(package):
    allowed = ALLOWED.get(package, SHARED)
    violations = {
        path: sorted(others - allowed)
        for path, others in _service_imports(package).items()
        if others - allowed
    }
    assert violations == {}


def test_the_check_catches_a_violation(tmp_path, monkeypatch):
    fake = tmp_path / "services"
    for name in ("gateway", "scorer"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text("")
    (fake / "scorer" / "x.py").write_text("from routemesh.services.gateway import app\n")
    monkeypatch.setattr(sys.modules[__name__], "SERVICES", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _service_imports("scorer") == {"services/scorer/x.py": {"gateway"}}


def test_contracts_do_no_io_and_import_no_service():
    forbidden = {"routemesh.services", "aiokafka", "faststream", "httpx", "socket", "qdrant_client"}
    for path in (ROOT / "contracts").rglob("*.py"):
        for module in _imported_modules(path):
            assert not any(module == f or module.startswith(f + ".") for f in forbidden), (
                f"{path.name} imports {module}"
            )


def test_imports_are_namespaced_under_routemesh():
    for path in list((ROOT / "contracts").rglob("*.py")) + list(SERVICES.rglob("*.py")):
        for module in _imported_modules(path):
            top = module.split(".")[0]
            assert top not in {"contracts", "services"}, f"{path}: bare import of {module}"
