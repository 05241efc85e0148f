"""The demo keeps the services' usual ports when the servers could bind them."""

from __future__ import annotations

import socket

from sandbox.demo import port_or_free


def _time_wait_port() -> int:
    """A port whose only socket is in TIME_WAIT: the side that closes first keeps it there."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end, on `port`, waits
        client.close()
    return port


def test_a_port_left_in_time_wait_is_still_the_usual_port():
    port = _time_wait_port()
    with socket.socket() as plain:  # what the probe used to do
        try:
            plain.bind(("127.0.0.1", port))
            refused = False
        except OSError:
            refused = True
    assert refused, "no TIME_WAIT on this machine: the test proves nothing"
    assert port_or_free(port) == port


def test_a_port_someone_listens_on_is_replaced_by_a_free_one():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = port_or_free(port)
    assert other != port and other > 0
