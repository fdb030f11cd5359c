import json

import httpx

from routemesh.contracts import PromptReviewCaptured, encode_event
from routemesh.contracts.topics import PROMPTS_REVIEW, topic_for_event
from routemesh.services.gateway.review import redact

CANARY = "CANARY-review-31"
SECRET_TEXT = (
    f"{CANARY} key sk-abcdef1234567890 header Bearer eyJhbGciOiJIUzI1NiJ9.abc.def "
    "mail bob@example.com blob " + "QUJD" * 15
)


def test_redaction_masks_every_kind_of_secret():
    text, count = redact(SECRET_TEXT)
    assert count == 4
    for secret in ("sk-abcdef", "eyJhbGci", "bob@example.com", "QUJDQUJD"):
        assert secret not in text
    assert "[REDACTED:sk]" in text
    assert "[REDACTED:email]" in text
    assert CANARY in text, "ordinary text is kept for the reviewer"


def _send(gateway):
    return httpx.post(f"{gateway.url}/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": SECRET_TEXT}]})


def test_capture_is_off_by_default(gateway):
    assert _send(gateway).status_code == 200
    assert not gateway.publisher.of(PromptReviewCaptured)


def test_redacted_capture_goes_only_to_the_review_topic(gateway):
    gateway.state.settings = gateway.state.settings.model_copy(
        update={"review_capture": "redacted"})
    assert _send(gateway).status_code == 200
    (captured,) = gateway.publisher.of(PromptReviewCaptured)
    assert topic_for_event(type(captured)) is PROMPTS_REVIEW
    assert captured.redactions == 4
    assert CANARY in captured.messages[0].content
    assert b"sk-abcdef1234567890" not in encode_event(captured)
    for event in gateway.publisher.events:
        if not isinstance(event, PromptReviewCaptured):
            assert CANARY.encode() not in encode_event(event)


def test_raw_local_capture_stays_on_disk(gateway, tmp_path):
    gateway.state.settings = gateway.state.settings.model_copy(
        update={"review_capture": "raw_local", "review_dir": tmp_path / "review"})
    assert _send(gateway).status_code == 200
    assert not gateway.publisher.of(PromptReviewCaptured)
    (day_file,) = (tmp_path / "review").glob("*.jsonl")
    record = json.loads(day_file.read_text())
    assert record["messages"][0] == ["user", SECRET_TEXT]
    for event in gateway.publisher.events:
        assert CANARY.encode() not in encode_event(event)
