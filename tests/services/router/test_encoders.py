import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from routemesh.services.router.encoders import (
    CachingEncoder,
    EncoderError,
    MicroBatcher,
    OpenAIEncoder,
    SparseEncoder,
    idf,
    term_id,
    tokenize,
)
from tests.services.router.conftest import HashingEncoder


def test_tokenize_is_lowercase_and_unicode_aware():
    assert tokenize("Héllo, WORLD! ça va? 東京") == ["héllo", "world", "ça", "va", "東京"]


def test_term_ids_are_stable_u32():
    assert term_id("index") == term_id("index")
    assert 0 <= term_id("anything") < 2**32


def test_bm25_document_weights_saturate_and_normalise_length():
    encoder = SparseEncoder(k1=1.2, b=0.75).fit(["a b", "a b c d"])
    once = dict(zip(*((v := encoder.document("cat dog")).indices, v.values), strict=True))
    thrice = encoder.document("cat cat cat dog")
    thrice_weights = dict(zip(thrice.indices, thrice.values, strict=True))
    assert thrice_weights[term_id("cat")] > once[term_id("cat")]
    assert thrice_weights[term_id("cat")] < 3 * once[term_id("cat")], "tf saturates"
    assert encoder.document("dog").values[0] > once[term_id("dog")], "shorter docs weigh more"


def test_query_vectors_are_binary_and_sorted():
    vector = SparseEncoder.query("b a b")
    assert list(vector.indices) == sorted({term_id("a"), term_id("b")})
    assert set(vector.values) == {1.0}


def test_idf_matches_qdrants_formula():
    assert idf(1, 10) == pytest.approx(np.log((10 - 1 + 0.5) / (1 + 0.5) + 1))
    assert idf(1, 100) > idf(50, 100)


def _embeddings(vectors):
    return {"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}


def test_openai_encoder_normalises_and_keeps_order():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/embeddings"
        assert request.headers["authorization"] == "Bearer k"
        body = _embeddings([[3.0, 4.0], [0.0, 2.0]])
        body["data"].reverse()
        return httpx.Response(200, json=body)

    encoder = OpenAIEncoder("http://emb/v1", "m", "k", transport=httpx.MockTransport(handler))
    vectors = encoder.encode(["a", "b"])
    np.testing.assert_allclose(vectors, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    assert encoder.name == "openai:m"


def test_openai_encoder_retries_5xx_then_succeeds():
    answers = iter([httpx.Response(503), httpx.Response(429),
                    httpx.Response(200, json=_embeddings([[1.0, 0.0]]))])
    encoder = OpenAIEncoder(
        "http://emb/v1", "m", max_retries=2, transport=httpx.MockTransport(lambda r: next(answers))
    )
    assert encoder.encode(["a"]).shape == (1, 2)


@pytest.mark.parametrize(
    ("responses", "message"),
    [
        ([httpx.Response(500)] * 3, "after retries"),
        ([httpx.Response(400)], "answered 400"),
        ([httpx.Response(200, json={"unexpected": True})], "malformed"),
        ([httpx.Response(200, json=_embeddings([[1.0]] * 2))], "does not match"),
    ],
)
def test_openai_encoder_failures_are_encoder_errors(responses, message):
    answers = iter(responses)
    encoder = OpenAIEncoder(
        "http://emb/v1", "m", max_retries=2, transport=httpx.MockTransport(lambda r: next(answers))
    )
    with pytest.raises(EncoderError, match=message):
        encoder.encode(["a"])


def test_openai_encoder_connection_errors_are_retried_then_reported():
    calls = []

    def refuse(request):
        calls.append(request)
        raise httpx.ConnectError("refused")

    encoder = OpenAIEncoder("http://emb/v1", "m", max_retries=1,
                            transport=httpx.MockTransport(refuse))
    with pytest.raises(EncoderError, match="ConnectError"):
        encoder.encode(["a"])
    assert len(calls) == 2


async def test_micro_batcher_groups_concurrent_items_and_keeps_their_order():
    calls = []

    def double(items):
        calls.append(list(items))
        return [item * 2 for item in items]

    batcher = MicroBatcher(double, batch_size=4, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    await batcher.aclose()
    assert results == [i * 2 for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2]


async def test_micro_batcher_fails_every_waiter_of_a_failed_batch_and_recovers():
    fail = True

    def flaky(items):
        if fail:
            raise RuntimeError("down")
        return items

    batcher = MicroBatcher(flaky, batch_size=8, max_wait_ms=10)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    fail = False
    assert await batcher.submit(7) == 7
    await batcher.aclose()


async def test_micro_batcher_answers_each_call_as_it_returns_while_another_still_runs():
    release = threading.Event()

    def slow_for_zero(items):
        if items == [0]:
            release.wait(10)
        return items

    batcher = MicroBatcher(slow_for_zero, batch_size=1, workers=2)
    stuck = asyncio.ensure_future(batcher.submit(0))
    others = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(i) for i in range(1, 5))), 5
    )
    assert others == [1, 2, 3, 4]
    assert not stuck.done()
    release.set()
    assert await stuck == 0
    await batcher.aclose()


async def test_micro_batcher_spreads_a_burst_over_its_idle_workers():
    sizes = []

    def record(items):
        sizes.append(len(items))
        return items

    batcher = MicroBatcher(record, batch_size=8, workers=2)
    await batcher.submit(-1)
    # The warm-up's worker hands back its answer before it is back at the queue; on a
    # busy machine the burst could arrive first and find one idle worker, not two.
    deadline = time.monotonic() + 10
    while batcher._idle < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    assert batcher._idle == 2, "both workers wait on the queue before the burst"
    sizes.clear()
    assert await asyncio.gather(*(batcher.submit(i) for i in range(6))) == list(range(6))
    await batcher.aclose()
    assert sizes == [3, 3]


async def test_micro_batcher_closing_fails_its_waiters_instead_of_leaving_them_hanging():
    release = threading.Event()
    batcher = MicroBatcher(lambda items: release.wait(10) and items, batch_size=1)
    waiters = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    await batcher.aclose()
    release.set()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(o, EncoderError) for o in outcomes), outcomes


async def test_micro_batcher_answers_a_generators_results_as_they_are_yielded():
    release = threading.Event()

    def first_then_wait(items):
        yield items[0]
        release.wait(10)
        yield from items[1:]

    batcher = MicroBatcher(first_then_wait, batch_size=8, max_wait_ms=50)
    waiters = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    assert await asyncio.wait_for(waiters[0], 30) == 0
    assert not any(w.done() for w in waiters[1:])
    release.set()
    assert await asyncio.gather(*waiters) == [0, 1, 2]
    await batcher.aclose()


async def test_micro_batcher_fails_the_unanswered_rest_when_a_generator_breaks_off():
    def one_then_fail(items):
        yield items[0]
        raise RuntimeError("encoder died")

    batcher = MicroBatcher(one_then_fail, batch_size=8, max_wait_ms=50)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)),
                                    return_exceptions=True)
    await batcher.aclose()
    assert outcomes[0] == 0
    assert all(isinstance(o, RuntimeError) for o in outcomes[1:]), outcomes


def test_the_cache_encodes_only_what_it_has_not_seen_and_evicts_the_oldest():
    inner = HashingEncoder()
    cache = CachingEncoder(inner, size=2)
    first = cache.encode(["alpha", "beta", "alpha"])
    assert inner.calls == [2], "a batch encodes each distinct miss once"
    assert (cache.hits, cache.misses) == (1, 2)
    again = cache.encode(["beta", "alpha"])
    assert inner.calls == [2]
    np.testing.assert_array_equal(again, first[[1, 0]])
    assert (cache.hits, cache.misses) == (3, 2)
    cache.encode(["gamma"])  # beta was used less recently than alpha: it goes
    assert len(cache) == 2
    cache.encode(["alpha"])
    assert inner.calls == [2, 1]
    cache.encode(["beta"])
    assert inner.calls == [2, 1, 1]
    np.testing.assert_array_equal(cache.encode([]), np.zeros((0, inner.dim), np.float32))


def test_the_cache_passes_the_encoders_failure_on_and_keeps_nothing():
    cache = CachingEncoder(HashingEncoder(fail=True), size=8)
    with pytest.raises(ConnectionError):
        cache.encode(["alpha"])
    assert len(cache) == 0
