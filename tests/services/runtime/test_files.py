"""Local files that hold prompt text: their owner's alone, whatever the umask."""

import os

from routemesh.contracts import RouteDecided
from routemesh.services.gateway.review import Excerpt, write_raw_local
from routemesh.services.runtime.files import open_private


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_a_private_file_is_0600_in_a_0700_directory_under_any_umask(tmp_path):
    previous = os.umask(0)
    try:
        path = tmp_path / "made" / "texts.jsonl"
        with open_private(path) as out:
            out.write("one\n")
        with open_private(path, append=True) as out:
            out.write("two\n")
        assert (mode(path.parent), mode(path)) == (0o700, 0o600)
        assert path.read_text() == "one\ntwo\n"
        loose = tmp_path / "loose.json"
        loose.write_text("x")
        loose.chmod(0o644)
        with open_private(loose) as out:
            out.write("y")
        assert (mode(loose), loose.read_text()) == (0o600, "y")
    finally:
        os.umask(previous)


def test_raw_local_captures_are_written_private(tmp_path):
    previous = os.umask(0o022)
    try:
        decided = RouteDecided(request_id="r1", route_id="lite", target_model="m",
                               reason="semantic", layer="semantic")
        write_raw_local(tmp_path / "review", decided, Excerpt("a prompt", 8))
    finally:
        os.umask(previous)
    (day,) = (tmp_path / "review").iterdir()
    assert (mode(tmp_path / "review"), mode(day)) == (0o700, 0o600)
