"""`pip install -e .` works, and an edit is seen without reinstalling.

The editable wheel is built by hatchling itself from a copy of the project (what pip
runs for `pip install -e .`); its path file, put on a fresh interpreter's path, must
import the package from the copy's own directories, edits included.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_an_editable_install_imports_the_checkout_and_sees_an_edit(tmp_path):
    from hatchling.builders.wheel import WheelBuilder

    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for name in ("contracts", "services", ".editable"):
        shutil.copytree(ROOT / name, project / name, symlinks=True)
    (wheel,) = WheelBuilder(str(project)).build(directory=str(tmp_path / "dist"),
                                                versions=["editable"])
    with zipfile.ZipFile(wheel) as archive:
        (pth,) = [n for n in archive.namelist() if n.endswith(".pth")]
        entries = archive.read(pth).decode().split()
    (project / "contracts" / "edited.py").write_text("WHERE = 'the checkout'\n")
    # The test's own interpreter has routemesh installed normally; the path file's entries
    # go first, as they would be the only copy in an editable environment.
    probe = ("import sys; sys.path[:0] = sys.argv[1:]; "
             "import routemesh.contracts.edited as e, routemesh.contracts.events as ev; "
             "print(e.WHERE); print(ev.__file__)")
    printed = subprocess.run([sys.executable, "-c", probe, *entries],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert printed[0] == "the checkout"
    assert Path(printed[1]).resolve() == (project / "contracts" / "events.py").resolve()
