"""The lock files agree with pyproject.toml and with what is installed.

`make install` installs requirements/dev.lock; a requirement added to pyproject without
re-locking (`make lock`), or a lock edited by hand, fails here before it reaches a user.
"""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "requirements" / "runtime.lock"
DEV = ROOT / "requirements" / "dev.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def locked(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(*groups: str) -> list[Requirement]:
    project = _pyproject()
    texts = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for group in groups:
        texts += project["project"]["optional-dependencies"][group]
    return [Requirement(text) for text in texts]


@pytest.mark.parametrize(("lock", "groups"), [(RUNTIME, ()), (DEV, ("dev",))],
                         ids=["runtime", "dev"])
def test_every_requirement_of_pyproject_is_locked_within_its_range(lock, groups):
    pins = locked(lock)
    problems = []
    for requirement in _requirements(*groups):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = pins.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement} is not in {lock.name}")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement} but {lock.name} has {version}")
    assert problems == [], "run `make lock`"


def test_the_dev_lock_pins_what_the_runtime_lock_pins():
    runtime, dev = locked(RUNTIME), locked(DEV)
    assert {name: dev.get(name) for name in runtime} == runtime


def test_every_locked_pin_has_hashes():
    for lock in (RUNTIME, DEV):
        text = lock.read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text[text.index("\n", text.index("make lock")):])
        for entry in entries:
            if _PIN.match(entry.strip()):
                assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_the_cpu_build_of_torch_is_locked():
    torch = locked(RUNTIME)["torch"]
    assert (torch.base_version, torch.local) == ("2.13.0", "cpu")


def test_what_is_installed_is_what_the_lock_says():
    mismatched = {}
    for name, version in locked(DEV).items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            mismatched[name] = (str(version), str(installed))
    assert mismatched == {}, "install with `make install` (it installs requirements/dev.lock)"
