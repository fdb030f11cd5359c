"""Linters over what deploys: yamllint on deploy/, helm/ and compose.yaml; hadolint on the
Dockerfile; shellcheck on every shell script there and on .ci/run; compose.yaml read by
docker-compose (no daemon needed)."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import tool

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _run(*command: str) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_is_clean():
    _run(str(VENV_BIN / "yamllint"), "--strict", "-c", ".yamllint.yaml", "deploy", "helm",
         "compose.yaml")


def test_hadolint_passes_the_dockerfile():
    _run(str(VENV_BIN / "hadolint"), "deploy/Dockerfile")


def test_shellcheck_is_clean():
    scripts = [p for d in ("deploy", "helm") for p in (ROOT / d).rglob("*.sh")]
    _run(tool("shellcheck"), ".ci/run", *(str(p.relative_to(ROOT)) for p in scripts))


def test_compose_file_is_valid():
    _run(tool("docker-compose"), "-f", "compose.yaml", "config", "-q")
    result = subprocess.run([tool("docker-compose"), "-f", "compose.yaml", "config"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert "service_completed_successfully" in result.stdout


def test_the_try_override_points_the_gateway_at_its_fake_upstream():
    """`--profile mesh` alone uses the upstream you name (the host's port 4000 by
    default, as `routemesh dev`); the try override adds the fake upstream and points the
    gateway at it, instead of at a service no profile ran."""
    compose = tool("docker-compose")
    alone = yaml.safe_load(subprocess.run(
        [compose, "-f", "compose.yaml", "--profile", "mesh", "config"], cwd=ROOT,
        capture_output=True, text=True, check=True).stdout)
    assert "fake-upstream" not in alone["services"]
    assert "host.docker.internal" in \
        alone["services"]["gateway"]["environment"]["ROUTEMESH_UPSTREAM_BASE_URL"]
    tried = yaml.safe_load(subprocess.run(
        [compose, "-f", "compose.yaml", "-f", "deploy/compose/try.yaml", "--profile", "mesh",
         "config"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert tried["services"]["gateway"]["environment"]["ROUTEMESH_UPSTREAM_BASE_URL"] == \
        "http://fake-upstream:4000/v1"
    assert "fake-upstream" in tried["services"]["gateway"]["depends_on"]
    kafka = alone["services"]["kafka"]
    assert kafka["environment"]["KAFKA_LOG_DIRS"] in " ".join(kafka["volumes"] if isinstance(
        kafka["volumes"][0], str) else [v["target"] for v in kafka["volumes"]])


# Flags and forms only BuildKit understands; the classic builder (the only one this
# machine has, and a common one on hosts without buildx) refuses or misreads them.
BUILDKIT_ONLY = re.compile(r"^\s*#\s*syntax=|--mount=|--link\b|--chmod=|--parents\b|"
                           r"--exclude=|<<-?\s*['\"]?[A-Z]+", re.MULTILINE)


def test_the_dockerfile_builds_with_the_classic_builder_too():
    found = BUILDKIT_ONLY.findall((ROOT / "deploy" / "Dockerfile").read_text())
    assert found == [], f"BuildKit-only syntax in deploy/Dockerfile: {found}"


def test_the_local_override_is_valid_and_brings_no_registry_image():
    """deploy/compose/local.yaml runs the mesh from the images `make image` builds:
    every service it starts uses one of them."""
    result = subprocess.run(
        [tool("docker-compose"), "-f", "compose.yaml", "-f", "deploy/compose/local.yaml",
         "-f", "deploy/compose/try.yaml", "--profile", "mesh", "config"], cwd=ROOT,
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    images = {name: s["image"] for name, s in services.items() if s.get("scale", 1) != 0}
    assert "gateway" in images
    assert all(i.startswith("routemesh") for i in images.values()), images
