import json

import httpx

from routemesh.contracts import PromptReviewCaptured, encode_event
from routemesh.services.gateway.review import redact
from routemesh.services.runtime.captures import read_captures
from tests.services.gateway.conftest import reconfigure

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


SYSTEM = "SYSTEM-PROMPT-never-captured"
TOOL = "TOOL-OUTPUT-never-captured"


def _send(gateway, text=SECRET_TEXT):
    return httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "auto", "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "an earlier question"},
        {"role": "tool", "tool_call_id": "1", "content": TOOL},
        {"role": "user", "content": text},
    ]})


def test_capture_is_off_by_default(gateway):
    assert _send(gateway).status_code == 200
    assert not gateway.publisher.of(PromptReviewCaptured)
    assert not gateway.review.events


def test_redacted_topic_capture_goes_only_through_its_own_publisher(gateway):
    reconfigure(gateway, review_capture="redacted_topic")
    assert _send(gateway).status_code == 200
    (captured,) = gateway.review.events
    assert isinstance(captured, PromptReviewCaptured)
    assert captured.redactions == 4
    assert [m.role for m in captured.messages] == ["user"]
    assert CANARY in captured.messages[0].content
    assert (captured.original_chars, captured.truncated) == (len(SECRET_TEXT), False)
    encoded = encode_event(captured)
    for never in (b"sk-abcdef1234567890", SYSTEM.encode(), TOOL.encode(), b"earlier question"):
        assert never not in encoded
    assert not gateway.publisher.of(PromptReviewCaptured), "not on the events' queue"
    for event in gateway.publisher.events:
        assert CANARY.encode() not in encode_event(event)


def test_a_long_message_is_cut_and_its_length_recorded(gateway):
    reconfigure(gateway, review_capture="redacted_topic", review_max_chars=50)
    text = "a few words. " * 4 + CANARY + " more words" * 20
    assert _send(gateway, text).status_code == 200
    (captured,) = gateway.review.events
    assert captured.messages[0].content == text[:50]
    assert (captured.original_chars, captured.truncated) == (len(text), True)


def test_raw_local_capture_stays_on_disk(gateway, tmp_path):
    reconfigure(gateway, review_capture="raw_local", review_dir=tmp_path / "review")
    assert _send(gateway).status_code == 200
    assert not gateway.publisher.of(PromptReviewCaptured)
    (day_file,) = (tmp_path / "review").glob("*.jsonl")
    record = json.loads(day_file.read_text())
    assert record["messages"] == [["user", SECRET_TEXT]]
    assert (record["original_chars"], record["truncated"]) == (len(SECRET_TEXT), False)
    assert not gateway.review.events
    for event in gateway.publisher.events:
        assert CANARY.encode() not in encode_event(event)


def test_redacted_capture_stays_on_disk_masked_and_private(gateway, tmp_path):
    reconfigure(gateway, review_capture="redacted", review_dir=tmp_path / "review")
    assert _send(gateway).status_code == 200
    assert not gateway.review.events, "published only when redacted_topic is chosen"
    assert not gateway.publisher.of(PromptReviewCaptured)
    (day_file,) = (tmp_path / "review").glob("*.jsonl")
    assert day_file.stat().st_mode & 0o777 == 0o600
    text = day_file.read_text()
    assert CANARY in text
    assert "sk-abcdef1234567890" not in text
    (capture,) = read_captures(tmp_path / "review", with_text=True).values()
    assert capture.mode == "redacted"
    assert "[REDACTED:sk]" in capture.text
