"""`routemesh tune` on the shipped labelled sets."""

from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from routemesh.services.cli.main import app
from routemesh.services.router import (
    LoadedConfig,
    build_dense_encoder,
    load_config,
    load_dataset,
)
from routemesh.services.router.config import canonical_sha256
from routemesh.services.scorer.tune import tune

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples"


def shifted(loaded: LoadedConfig, by: float) -> LoadedConfig:
    routes = tuple(msgspec.structs.replace(r, threshold=round(min(0.95, r.threshold + by), 2))
                   for r in loaded.config.routes)
    config = msgspec.structs.replace(loaded.config, routes=routes)
    return LoadedConfig(config, loaded.source, canonical_sha256(config), loaded.utterances,
                        loaded.files)


@pytest.mark.model
@pytest.mark.slow
# +0.2 as the issue asks; +0.35 where that loses more than one held-back item (on
# multi-route it loses one, which the training split holds no evidence for).
@pytest.mark.parametrize(("example", "shifts"), [("lite-deep", (0.2, 0.35)),
                                                 ("multi-route", (0.2,))])
def test_tune_recovers_a_mistuned_threshold_and_keeps_the_shipped_ones(example, shifts):
    loaded = load_config(EXAMPLES / f"{example}.yaml")
    items = load_dataset(EXAMPLES / f"{example}.eval.jsonl")
    encoder = build_dense_encoder(loaded.config.encoder)
    shipped = tune(loaded, encoder, items)
    assert shipped.held_after.accuracy >= shipped.held_before.accuracy
    for by in shifts:
        result = tune(shifted(loaded, by), encoder, items)
        lost = shipped.held_before.accuracy - result.held_before.accuracy
        recovered = result.held_after.accuracy - result.held_before.accuracy
        assert recovered >= 0.9 * lost, (by, lost, recovered)
        assert result.safe


@pytest.mark.model
@pytest.mark.slow
def test_tune_prints_the_diff_and_applies_it_keeping_a_backup(lite_deep_copy):
    text = lite_deep_copy.read_text()
    start = text.index("id: deep")
    at = text.index("threshold: 0.60", start)
    lite_deep_copy.write_text(text[:at] + "threshold: 0.95" + text[at + 15:])
    result = CliRunner().invoke(app, [
        "tune", "--config", str(lite_deep_copy),
        "--dataset", str(EXAMPLES / "lite-deep.eval.jsonl"), "--apply"])
    assert result.exit_code == 0, result.output
    assert "-    threshold: 0.95\n+    threshold: 0." in result.output
    assert load_config(lite_deep_copy).config.route("deep").threshold < 0.95
    assert "threshold: 0.95" in lite_deep_copy.with_name("lite-deep.yaml.bak").read_text()
    assert "# low-confidence fallback" in lite_deep_copy.read_text()
