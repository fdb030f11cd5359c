import hashlib

import httpx
import pytest

from routemesh.services.gateway.app import create_app
from routemesh.services.gateway.auth import ApiKeys, KeyFileError


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_keys_rotate_through_the_file_without_a_restart(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# current\n{sha('old-key')}\n")
    keys = ApiKeys(key_file=key_file, check_every_s=0)
    assert keys.allows("Bearer old-key")
    assert not keys.allows("Bearer new-key")
    key_file.write_text(f"{sha('old-key')}\n{sha('new-key')}  # rotating\n")
    assert keys.allows("Bearer old-key")
    assert keys.allows("Bearer new-key")
    key_file.write_text(f"{sha('new-key')}\n")
    assert not keys.allows("Bearer old-key")
    assert keys.allows("Bearer new-key")


def test_a_broken_key_file_keeps_the_last_good_keys(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(sha("k1") + "\n")
    keys = ApiKeys(key_file=key_file, check_every_s=0)
    key_file.write_text("not-a-hash\n")
    assert keys.allows("Bearer k1")


def test_inline_hashes_and_bad_headers():
    keys = ApiKeys(inline=f"{sha('a')},{sha('b')}")
    assert keys.allows("Bearer a")
    assert keys.allows("Bearer b")
    for header in (None, "", "Bearer", "Bearer c", f"Basic {sha('a')}", "a"):
        assert not keys.allows(header)


def test_auth_on_with_no_keys_refuses_to_start(tmp_path):
    with pytest.raises(KeyFileError, match="no key hashes"):
        ApiKeys()
    (tmp_path / "k").write_text("xyz\n")
    with pytest.raises(KeyFileError, match=r"k:1: not a sha256"):
        ApiKeys(key_file=tmp_path / "k")


def test_the_gateway_answers_401_for_a_bad_key_and_counts_it(gateway):
    gateway.state.keys = ApiKeys(inline=sha("good"))
    url = f"{gateway.url}/v1/chat/completions"
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(url, json=body, headers={"authorization": "Bearer bad"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"authorization": "Bearer good"}).status_code == 200
    assert gateway.state.registry.get_sample_value(
        "routemesh_gateway_auth_failures_total") == 2
    assert httpx.get(f"{gateway.url}/openapi.json").status_code == 200



V1 = [("POST", "/v1/chat/completions"), ("POST", "/v1/route"), ("POST", "/v1/outcomes"),
      ("GET", "/v1/models"), ("HEAD", "/v1/models"), ("GET", "/v1/models/{model_id}"),
      ("HEAD", "/v1/models/{model_id}")]


def test_the_auth_tests_cover_every_v1_endpoint(gateway):
    app = create_app(gateway.state)
    served = {(method, route.path) for route in app.routes
              if route.path.startswith("/v1/") for method in route.methods}
    assert served == set(V1), "a new /v1 endpoint: add it to V1"


@pytest.mark.parametrize(("method", "path"), V1)
def test_every_v1_endpoint_refuses_a_wrong_or_missing_key(gateway, method, path):
    gateway.state.keys = ApiKeys(inline=sha("good"))
    url = gateway.url + path.replace("{model_id}", "small-model")
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({"authorization": "Bearer wrong"}, {}):
        refused = httpx.request(method, url, json=body, headers=headers)
        assert refused.status_code == 401, (method, path, headers)
        if method != "HEAD":
            assert refused.json()["error"]["code"] == "invalid_api_key"
    allowed = httpx.request(method, url, json=body, headers={"authorization": "Bearer good"})
    assert allowed.status_code != 401
