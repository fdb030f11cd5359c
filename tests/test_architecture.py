"""House rules about who may import whom, checked on the source tree."""

import ast
import sys
from pathlib import Path

import pytest

from routemesh.services.runtime.service import discover_services

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "services"
# Libraries every service may use: the shared runtime and the pure router core
# (the gateway and the replay worker both call it). The runtime stays below everything;
# the router stays pure (no Kafka, no HTTP server): of the runtime it may use only the
# helpers that do no I/O.
SHARED = {"runtime", "router"}
ALLOWED = {"runtime": set(), "router": {"runtime"}}
PURE_RUNTIME = {"retry", "stats", "files"}
IO_LIBRARIES = {"aiokafka", "faststream", "httpx", "aiohttp", "uvicorn", "fastapi",
                "starlette", "socket", "qdrant_client", "prometheus_client"}
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


def _imports_any(path: Path, forbidden: set[str]) -> list[str]:
    return sorted(m for m in _imported_modules(path)
                  if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_contracts_do_no_io_and_import_no_service():
    forbidden = {"routemesh.services", "os", "io", "pathlib", "shutil", "tempfile",
                 "subprocess", "urllib", *IO_LIBRARIES}
    offending = {p.name: _imports_any(p, forbidden) for p in (ROOT / "contracts").rglob("*.py")}
    assert {name: found for name, found in offending.items() if found} == {}


def test_the_router_uses_only_the_runtimes_pure_helpers():
    for path in (SERVICES / "router").rglob("*.py"):
        runtime = {m.split(".")[3] for m in _imported_modules(path)
                   if m.startswith("routemesh.services.runtime.")}
        assert runtime <= PURE_RUNTIME, f"{path.name} imports runtime modules {runtime}"
        assert not _imports_any(path, {"aiokafka", "faststream", "uvicorn", "fastapi"})
    for name in PURE_RUNTIME:
        path = SERVICES / "runtime" / f"{name}.py"
        assert _imports_any(path, IO_LIBRARIES | {"routemesh.services"}) == [], path.name


def _constructs(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if called == name:
                return True
    return False


def test_only_the_runtime_constructs_kafka_consumers():
    outside = [str(p.relative_to(ROOT)) for p in SERVICES.rglob("*.py")
               if p.parent.name != "runtime" and _constructs(p, "AIOKafkaConsumer")]
    assert outside == []
    assert _constructs(SERVICES / "runtime" / "consumer.py", "AIOKafkaConsumer"), (
        "the check can see a construction")


def test_every_registered_service_declares_its_ports():
    specs = discover_services()
    assert {"gateway", "audit-writer"} <= set(specs)
    for name, spec in specs.items():
        assert spec.ports, name
        assert spec.ports[0].name == "metrics", f"{name}: the metrics port comes first"
        names = [p.name for p in spec.ports]
        assert len(set(names)) == len(names), name
        for port in spec.ports:
            assert port.env.startswith("ROUTEMESH_")
            assert port.host_env.startswith("ROUTEMESH_")
            assert 0 < port.default < 65536, (name, port)
    defaults = [p.default for spec in specs.values() for p in spec.ports]
    assert len(set(defaults)) == len(defaults), "no two services share a default port"


def test_imports_are_namespaced_under_routemesh():
    for path in list((ROOT / "contracts").rglob("*.py")) + list(SERVICES.rglob("*.py")):
        for module in _imported_modules(path):
            top = module.split(".")[0]
            assert top not in {"contracts", "services"}, f"{path}: bare import of {module}"
