import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def lite_deep_copy(tmp_path) -> Path:
    """A copy of the shipped lite-deep config (and its utterance files) to rewrite."""
    examples = REPO_ROOT / "deploy" / "examples"
    shutil.copytree(examples / "lite-deep", tmp_path / "lite-deep")
    shutil.copy(examples / "lite-deep.yaml", tmp_path)
    return tmp_path / "lite-deep.yaml"
