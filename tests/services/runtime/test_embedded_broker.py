"""Port checks of `routemesh dev` and the embedded broker: a port only TIME-WAIT sockets
hold (a clean stop under traffic) is free, as the servers themselves will bind it."""

import socket

from routemesh.services.runtime.embedded_broker import free_port, port_is_free


def test_a_port_held_only_in_time_wait_is_free():
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end waits in TIME-WAIT
    client.close()
    listener.close()
    assert port_is_free("127.0.0.1", port)


def test_a_port_something_listens_on_is_taken():
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        assert not port_is_free("127.0.0.1", listener.getsockname()[1])
    finally:
        listener.close()
