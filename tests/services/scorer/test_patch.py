import pytest

from routemesh.services.router import load_config
from routemesh.services.scorer.patch import ConfigChange, apply, diff


@pytest.fixture
def config(lite_deep_copy):
    return lite_deep_copy


def test_the_diff_changes_only_what_changed(config):
    patch = diff(config, ConfigChange(thresholds={"deep": 0.55}))
    removed = [line for line in patch.splitlines() if line.startswith("-")][1:]
    added = [line for line in patch.splitlines() if line.startswith("+")][1:]
    assert (removed, added) == (["-    threshold: 0.60"], ["+    threshold: 0.55"])


def test_apply_keeps_comments_and_layout_and_a_backup(config):
    before = config.read_text()
    backup = apply(config, ConfigChange(thresholds={"deep": 0.55}, margin=0.02,
                                        semantic={"head": "none"}))
    assert backup.read_text() == before
    after = config.read_text()
    assert "# low-confidence fallback" in after
    assert "# No rules:" in after
    loaded = load_config(config).config
    assert (loaded.route("deep").threshold, loaded.margin, loaded.semantic.head) == (
        0.55, 0.02, "none")
    assert len(after.splitlines()) == len(before.splitlines()) + 1


def test_an_unknown_route_is_refused(config):
    with pytest.raises(KeyError, match="no route code"):
        diff(config, ConfigChange(thresholds={"code": 0.5}))
