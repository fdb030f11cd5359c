"""The OpenAI-compatible upstream: pooled connections, timeouts, bounded retries."""

from __future__ import annotations

import asyncio

import httpx

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class UpstreamUnavailable(Exception):
    """No answer after the retries: connection refused or timed out."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Upstream:
    def __init__(
        self,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_retries: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.max_retries = max_retries
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            transport=transport,
        )

    async def open(self, base_url: str, api_key: str | None, body: bytes) -> httpx.Response:
        """POST /chat/completions and return the response with its body unread (so a
        stream can be relayed). Connect errors, 429 and 5xx are retried with backoff;
        nothing is retried once the body has started to flow."""
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        url = base_url.rstrip("/") + "/chat/completions"
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 2.0))
            request = self.client.build_request("POST", url, content=body, headers=headers)
            try:
                response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt == self.max_retries:
                    raise UpstreamUnavailable(type(exc).__name__, False) from None
                continue
            except httpx.TimeoutException as exc:
                raise UpstreamUnavailable(type(exc).__name__, True) from None
            if response.status_code in RETRYABLE_STATUS and attempt < self.max_retries:
                await response.aclose()
                continue
            return response
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.client.aclose()
