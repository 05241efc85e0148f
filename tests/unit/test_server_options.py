"""The options every tokensend gRPC server is built with: resources bounded per connection (streams, age),
and keepalive enforcement that our own clients' pings never trip."""

from __future__ import annotations

import grpc
import pytest

from libs import keepalive, server
from libs.settings import DispatcherSettings, ReceiptsSettings, ResolverSettings

SERVICES = [DispatcherSettings, ResolverSettings, ReceiptsSettings]


def settings_of(kind, **values):
    return kind(dev_mode=True, redis_url="memory://server-options", **values)


@pytest.mark.parametrize("kind", SERVICES, ids=lambda k: k.__name__)
def test_every_server_bounds_its_streams_and_the_age_of_its_connections(kind):
    options = dict(server.grpc_server_options(settings_of(kind)))
    assert options["grpc.max_concurrent_streams"] == 256
    assert options["grpc.max_connection_age_ms"] == 30 * 60 * 1000
    # Long enough that a campaign streamed on a connection that came of age runs to its end.
    assert options["grpc.max_connection_age_grace_ms"] == 24 * 3600 * 1000
    assert options["grpc.max_receive_message_length"] == 16 * 1024 * 1024
    assert options["grpc.so_reuseport"] == 0


def test_the_bounds_follow_the_settings_and_an_age_of_0_is_none():
    options = dict(
        server.grpc_server_options(
            settings_of(
                DispatcherSettings,
                grpc_max_concurrent_streams=8,
                grpc_max_connection_age_seconds=90,
                grpc_max_connection_age_grace_seconds=15,
            )
        )
    )
    assert options["grpc.max_concurrent_streams"] == 8
    assert options["grpc.max_connection_age_ms"] == 90_000
    assert options["grpc.max_connection_age_grace_ms"] == 15_000
    off = dict(server.grpc_server_options(settings_of(DispatcherSettings, grpc_max_connection_age_seconds=0)))
    assert "grpc.max_connection_age_ms" not in off and "grpc.max_connection_age_grace_ms" not in off


def test_keepalive_enforcement_lets_our_own_clients_ping():
    """A server closes a connection whose pings come more often than it accepts (GOAWAY too_many_pings):
    our channels' pings, idle or not, are well within what every server accepts."""
    options = dict(server.grpc_server_options(settings_of(DispatcherSettings)))
    client = dict(keepalive.channel_options())
    assert options["grpc.keepalive_permit_without_calls"] == 1  # our channels ping while idle
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"] // 2
    assert options["grpc.http2.max_ping_strikes"] == 2  # a ping flood is cut at the third ping too soon


async def test_a_server_started_by_start_grpc_server_carries_the_options(monkeypatch):
    built: list[list[tuple[str, object]]] = []

    class Built(Exception):
        pass

    def capture(**kwargs):
        built.append(kwargs["options"])
        raise Built

    monkeypatch.setattr(grpc.aio, "server", capture)
    settings = settings_of(ResolverSettings, grpc_max_concurrent_streams=12)
    with pytest.raises(Built):
        await server.start_grpc_server(settings, [], [])
    [options] = built
    assert options == server.grpc_server_options(settings)
    assert ("grpc.max_concurrent_streams", 12) in options


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("grpc_max_concurrent_streams", "0"),
        ("grpc_max_connection_age_seconds", "-1"),
        ("grpc_max_connection_age_grace_seconds", "-1"),
        ("grpc_max_connection_age_seconds", str(2**31 // 1000 + 1)),  # past gRPC's 32-bit milliseconds
    ],
)
def test_bounds_out_of_range_are_refused(name, value, monkeypatch):
    monkeypatch.setenv(f"TOKENSEND_{name.upper()}", value)
    with pytest.raises(ValueError, match=name):
        settings_of(DispatcherSettings)
