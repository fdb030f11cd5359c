"""The virtual environments of the peers the benches run side by side (semantic-router,
the LiteLLM proxy): made on first run, kept in bench/ (git ignores them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def peer_python(venv: Path, *installs: list[str]) -> Path:
    """The Python of ``venv``; made first, with each of ``installs`` (a package list)
    pip-installed in turn, when it does not exist yet."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating the peer environment in {venv} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for packages in installs:
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages],
                           check=True)
    return python
