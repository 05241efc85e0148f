"""HTTP/2 keepalive between tokensend's processes: the pings the dispatcher sends on its channel to the
resolver (and the CLI on its own), the pings every tokensend server sends its callers, and those it accepts
from them. Kept together so that they agree: a server that takes a client's pings for abuse closes its
connection (GOAWAY "too_many_pings")."""

from __future__ import annotations

# A resolver whose host vanished without closing the connection (a machine lost, a network partition, a
# load balancer that blackholes) answers nothing, and gRPC would keep putting calls on that connection,
# each waiting its whole deadline, until the kernel gives up on it many minutes later. A ping after 20 s
# without a frame from the resolver, unanswered within 10 s (a live one answers in milliseconds, however
# busy), closes the connection: the calls on it fail UNAVAILABLE within 30 s and the next ones reconnect.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

# The most often a server accepts a client's pings: a quarter of ours, for timer slack, and room for a
# caller's own keepalive (the campaign engine's) down to 5 s. Pings closer than this are strikes, and the
# third closes the connection, as gRPC does against a ping flood.
MIN_PING_INTERVAL_MS = 5_000
# gRPC core's own default, said here so that it stays what the comment above counts on.
MAX_PING_STRIKES = 2

# A caller whose host vanished the same way (the campaign engine's, mid-DispatchStream or tailing
# StreamDeliveryEvents) would keep its calls running on the server until the kernel gives up on the
# connection: results piling up unsent, a stream's batch slots and its task, a workspace's place for a
# tail. A ping after 60 s without a frame from the caller, unanswered within 20 s, closes the connection
# and cancels its calls. Every HTTP/2 client answers pings, keepalive of its own or not, so a caller that
# is only quiet keeps its calls. Slower than the dispatcher's pings: a caller may be further away than the
# resolver, and a minute's wait costs a server little.
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


def channel_options() -> list[tuple[str, int]]:
    """Options of a channel to a tokensend server: pings every KEEPALIVE_TIME_MS, calls in flight or not."""
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # What gRPC core (1.85) waits for a ping's answer before closing the connection: a minute by default
        # once keepalive is on, whatever keepalive_timeout_ms says.
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Idle too: a connection lost between campaigns is found before a batch's call goes onto it.
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC otherwise stops after two pings with no data sent: an idle channel, or a call waiting
        # on a slow PII API, would go unwatched from then on.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> list[tuple[str, int]]:
    """Options of every tokensend server: ping each caller after SERVER_KEEPALIVE_TIME_MS without a frame
    from it, and accept its pings as often as every MIN_PING_INTERVAL_MS, calls or not. gRPC's defaults
    ping every 2 hours, and count a ping on a connection without calls, or within 5 minutes of the last
    one, as a strike, and would close an idle dispatcher's channel to the resolver after about a minute."""
    return [
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        # The answer's deadline gRPC core (1.85) goes by, as on the dispatcher's channel. A server pings on
        # however long it sends no data (no max_pings_without_data to lift, unlike a client).
        ("grpc.http2.ping_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC core's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS (a name it does not know is ignored).
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]
