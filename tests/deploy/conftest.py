"""Tools the deploy checks run. Debian packages (promtool, shellcheck, docker-compose) may
be missing on a developer's machine, where their tests skip; CI installs them and sets
CI_REQUIRE_DEPLOY_TOOLS=1, which turns a missing tool into a failure."""

import os
import shutil

import pytest


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI_REQUIRE_DEPLOY_TOOLS"):
            pytest.fail(f"{name} is required here (CI_REQUIRE_DEPLOY_TOOLS) but missing")
        pytest.skip(f"{name} is not installed (Debian: apt-get install {name})")
    return found
