"""Linters over what deploys: yamllint on deploy/, helm/ and compose.yaml; hadolint on the
Dockerfile; shellcheck on every shell script there and on .ci/run; compose.yaml read by
docker-compose (no daemon needed)."""

import subprocess
import sys
from pathlib import Path

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
