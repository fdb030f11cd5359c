"""The OpenAI-compatible upstream: pooled connections, timeouts, bounded retries.

aiohttp rather than httpx here: httpx's pool polls the socket of every idle connection
each time it hands out or takes back one (encode/httpcore#928, still open), so its cost
grows with the pool: at a few dozen concurrent requests it cost several times aiohttp's
CPU per request (bench/gateway.py, concurrency 32), and that CPU is the gateway's event
loop, which every other request waits for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from routemesh.services.runtime.retry import Backoff


def upstream_failed(status: int) -> bool:
    """The one rule for an answer that is the upstream's failure, not the request's: it is
    retried, served by a fallback route, and reaches the client as a 502."""
    return status == 429 or status >= 500


# Below uvicorn's (so vLLM's and LiteLLM's) 5 s keep-alive, so the server is never the
# one to close a connection we are about to reuse.
KEEPALIVE_S = 4.0


class UpstreamUnavailable(Exception):
    """No answer after the retries: connection refused or timed out. Its message is one
    of ``connect_error``, ``connect_timeout``, ``read_timeout``, ``disconnected``: the
    observation's error class, the same whatever HTTP client the gateway uses."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamStreamError(UpstreamUnavailable):
    """The upstream's body broke off or stalled after its headers were received."""


def _failure(
    exc: BaseException, kind: type[UpstreamUnavailable] = UpstreamUnavailable
) -> UpstreamUnavailable:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return kind("connect_error", False)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return kind("connect_timeout", True)
    if isinstance(exc, TimeoutError):
        return kind("read_timeout", True)
    return kind("disconnected", False)


class UpstreamResponse:
    """Status and body of one upstream answer, its body not yet read."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _failure(exc, UpstreamStreamError) from None
        finally:
            self._response.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, never buffered whole."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _failure(exc, UpstreamStreamError) from None

    def close(self) -> None:
        """Done with it: a body read to its end returns the connection to the pool; one
        cut short closes it, which cancels the upstream call."""
        self._response.release()


class Upstream:
    def __init__(self, connect_timeout_s: float, read_timeout_s: float, max_retries: int) -> None:
        self.max_retries = max_retries
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the event loop that runs it.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=512, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
                ),
                timeout=self._timeout,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def open(self, base_url: str, api_key: str | None, body: bytes) -> UpstreamResponse:
        """POST /chat/completions and return the response with its body unread (so a
        stream can be relayed). Connect errors, 429 and 5xx are retried with backoff;
        nothing is retried once the body has started to flow."""
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        url = base_url.rstrip("/") + "/chat/completions"
        delays = Backoff(0.1, 2.0).delays()
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(next(delays))
            try:
                response = await self._client().post(url, data=body, headers=headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                if attempt == self.max_retries:
                    raise _failure(exc) from None
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _failure(exc) from None
            if upstream_failed(response.status) and attempt < self.max_retries:
                response.release()
                continue
            return UpstreamResponse(response)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
