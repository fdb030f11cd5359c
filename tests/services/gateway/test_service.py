import asyncio
import socket

import pytest
import uvicorn

from routemesh.services.gateway.service import _EmbeddedServer
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.runtime.embedded_broker import free_port
from routemesh.services.runtime.kafka import delivery_options
from routemesh.services.runtime.settings import ServiceSettings


def test_the_gateway_batches_its_events_longer_than_other_producers(monkeypatch):
    assert delivery_options(GatewaySettings())["linger_ms"] == 50
    assert delivery_options(ServiceSettings())["linger_ms"] == 5
    monkeypatch.setenv("ROUTEMESH_KAFKA_LINGER_MS", "0")
    assert delivery_options(GatewaySettings())["linger_ms"] == 0


async def test_the_embedded_server_is_listening_when_it_says_so():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    server = _EmbeddedServer(uvicorn.Config(app, host="127.0.0.1", port=port,
                                            log_config=None, lifespan="off"))
    serving = asyncio.create_task(server.serve())
    await server.listening(serving)
    # No retry: the port accepts the moment listening() returns.
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    server.should_exit = True
    await serving


async def test_a_server_that_ends_before_listening_is_an_error():
    class Ends(_EmbeddedServer):
        async def serve(self, sockets=None):
            return None

    server = Ends(uvicorn.Config(lambda scope, receive, send: None, port=free_port()))
    with pytest.raises(RuntimeError, match="stopped before it listened"):
        await server.listening(asyncio.create_task(server.serve()))
