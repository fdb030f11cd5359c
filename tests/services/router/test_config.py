import pytest

from routemesh.services.router import RouteRequest, WatchedConfig, load_router
from routemesh.services.router.config import ConfigError, load_config, parse_config
from tests.services.router.conftest import CONFIG, EXAMPLES, HashingEncoder


def test_the_shipped_examples_load():
    for name in ("lite-deep.yaml", "multi-route.yaml"):
        loaded = load_config(EXAMPLES / name)
        assert len(loaded.sha256) == 64
        assert loaded.utterances


def test_utterances_come_from_inline_lists_and_files_with_provenance(loaded):
    lite = [u for u in loaded.utterances if u.route_id == "lite"]
    deep = [u for u in loaded.utterances if u.route_id == "deep"]
    assert [u.index for u in lite] == [0, 1, 2]
    assert lite[0].source == "inline"
    assert deep[0].text == "prove that the square root of two is irrational"
    assert deep[0].source == "deep.txt"
    assert deep[0].provenance == "deep.txt:2", "comment lines are skipped, lines keep numbers"


def test_jsonl_utterances_keep_their_source(tmp_path):
    (tmp_path / "u.jsonl").write_text(
        '{"text": "hello there", "source": "support-tickets"}\n{"text": "hi"}\n'
    )
    (tmp_path / "c.yaml").write_text(
        "version: 1\ndefault_route: a\nroutes:\n  - {id: a, target_model: m, "
        "utterances_file: u.jsonl}\n"
    )
    utterances = load_config(tmp_path / "c.yaml").utterances
    assert [(u.text, u.source) for u in utterances] == [
        ("hello there", "support-tickets"), ("hi", "u.jsonl")
    ]


def test_hash_ignores_key_order_whitespace_comments_and_explicit_defaults():
    reordered = (
        "# same config, other order\n"
        "aliases: {auto: null, lite: lite, deep: deep, fast: lite, cheap-please: null}\n"
        + "\n".join(line for line in CONFIG.splitlines() if not line.startswith("aliases"))
        + "\n"
    )
    base = parse_config(CONFIG)
    assert base == parse_config(reordered)
    assert base == parse_config(CONFIG.replace("margin: 0.05", "margin:    0.05   # m"))
    from routemesh.services.router.config import canonical_sha256

    assert canonical_sha256(base) == canonical_sha256(parse_config(reordered))
    changed = parse_config(CONFIG.replace("margin: 0.05", "margin: 0.06"))
    assert canonical_sha256(changed) != canonical_sha256(base)


@pytest.mark.parametrize(
    ("edit", "path", "marker", "reason"),
    [
        (("threshold: 0.45", "threshold: high"), "routes[1].threshold", "threshold: high",
         "Expected `float`"),
        (("threshold: 0.45", "threshold: 1.5"), "routes[1].threshold", "threshold: 1.5",
         "<= 1.0"),
        (("margin: 0.05", "margin: 0.05\ncolour: red"), "colour", "colour:",
         "unknown key 'colour'"),
        (("    threshold: 0.40", "    threshold: 0.40\n    weight: 2"), "routes[0].weight",
         "weight: 2", "unknown key 'weight'"),
        (("default_route: lite", "default_route: nowhere"), "default_route", "default_route",
         "not a route"),
        (("    route: deep\n    when: {has_tools", "    route: gone\n    when: {has_tools"),
         "rules[0].route", "route: gone", "not a route"),
        (('when: {regex: "```"}', 'when: {regex: "(unclosed"}'), "rules[2].when.regex",
         "(unclosed", "invalid regex"),
        (("fast: lite,", "fast: nope,"), "aliases.fast", "aliases:", "not a route"),
        (("version: 1", "version: 2"), "version", "version: 2", "Invalid enum value 2"),
        (("    when: {min_messages: 6}", "    when: {}"), "rules[3].when", "when: {}",
         "at least one condition"),
        (("  - id: deep", "  - id: lite\n"), "routes[1].id", "id: lite\n\n", "duplicate"),
        (("encoder: {kind: local}", "encoder: {kind: openai}"), "encoder", "kind: openai",
         "base_url"),
    ],
)
def test_invalid_configs_name_the_key_path_the_line_and_the_reason(edit, path, marker, reason):
    text = CONFIG.replace(*edit)
    line = text[: text.index(marker)].count("\n") + 1
    with pytest.raises(ConfigError) as info:
        parse_config(text, "routes.yaml")
    error = info.value
    assert error.path == path
    assert reason in error.reason
    assert error.line == line
    assert str(error).startswith(f"routes.yaml:{line}: {path}: ")


def test_broken_yaml_is_refused_with_its_line():
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        parse_config("version: 1\nroutes: [\n  - a\n", "x.yaml")
    assert info.value.line == 3, "where the parser met the stray block entry"
    assert str(info.value).startswith("x.yaml:3: ")


def test_missing_utterance_file_and_empty_route_are_refused(config_path):
    (config_path.parent / "deep.txt").unlink()
    with pytest.raises(ConfigError, match=r"routes\[1\].utterances_file: no such file"):
        load_config(config_path)
    config_path.write_text(CONFIG.replace("    utterances_file: deep.txt\n", ""))
    with pytest.raises(ConfigError, match="needs utterances"):
        load_config(config_path)


def test_a_route_id_must_be_a_safe_label():
    with pytest.raises(ConfigError, match=r"routes\[0\].id"):
        parse_config(CONFIG.replace("  - id: lite", '  - id: "lite route!"'))


def test_the_config_is_named_by_its_base_name_or_a_given_name_never_its_path(config_path):
    assert load_config(config_path).source == "routes.yaml"
    assert load_config(config_path, "prod-routing").source == "prod-routing"
    (config_path.parent / "deep.txt").unlink()
    with pytest.raises(ConfigError) as info:
        load_config(config_path)
    assert str(config_path.parent) not in str(info.value)
    assert str(info.value).startswith("routes.yaml:")


def test_a_config_with_bytes_that_are_not_utf8_is_refused_with_its_line(config_path):
    config_path.write_bytes(CONFIG.encode().replace(b"margin", b"ma\xffrgin"))
    with pytest.raises(ConfigError, match=r"not UTF-8 \(byte 0xff\)") as info:
        load_config(config_path)
    assert info.value.line == 1 + CONFIG[: CONFIG.index("margin")].count("\n")
    (config_path.parent / "deep.txt").write_bytes(b"# deep\nfine\nbad \xc3\x28 here\n")
    config_path.write_text(CONFIG)
    with pytest.raises(ConfigError, match=r"deep.txt:3: not UTF-8"):
        load_config(config_path)


@pytest.mark.parametrize("broken", [b"routes: [\n", b"\xff\xfe not text", b""])
def test_a_watched_config_that_breaks_keeps_the_last_good_one_and_never_raises(
        config_path, broken):
    """Scorer and drift detector reload through it: an exception here once ended their
    consume loops for good."""
    watched = WatchedConfig(config_path)
    assert watched.load() is not None
    config_path.write_bytes(broken)
    assert watched.load() is None
    config_path.write_text(CONFIG)
    assert watched.load() is not None, "a good file again is read again"


@pytest.mark.parametrize(("text", "coding"), [
    ("def add(a: int, b: int) -> int:\n    \"\"\"Return the sum.\"\"\"\n", True),
    ("Why does this fail?\nfrom collections import Counter\nCounter(None)", True),
    ("import numpy as np\nnp.zeros(3)", True),
    ("#include <stdio.h>\nint main() { return 0; }", True),
    ("fn main() {\n    println!(\"hi\");\n}", True),
    ("What import duties apply to cheese from France?", False),
    ("Define a class of problems where greedy works.", False),
    ("My function keeps failing, any idea why?", False),
])
def test_multi_route_sends_code_pasted_without_a_fence_to_coding(text, coding):
    router = load_router(load_config(EXAMPLES / "multi-route.yaml"), encoder=HashingEncoder())
    decision = router.decide_rules_only(RouteRequest.from_text(text), "r")
    assert (decision.reason == "rule") is coding
    assert (decision.route_id == "coding") is coding
