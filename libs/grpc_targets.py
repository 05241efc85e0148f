"""Whether gRPC dials a target as it reads: one rule for the services' settings (TOKENSEND_RESOLVER_ADDR)
and the command line (--addr, $TOKENSEND_*_ADDR, the benchmark's --target).

gRPC takes a port past 65535 modulo 65536 (127.0.0.1:99999 dials port 34463, whatever listens there), dials
443 for a host without a port, looks `::1:50051` up as a host name (an IPv6 address goes in brackets), and
fails on most of the rest only once a call's deadline has passed, naming no cause. Each is found here, before
anything is dialled.
"""

from __future__ import annotations

import ipaddress

HOST_PORT = "expected HOST:PORT with a port of 1..65535"
BRACKETS = "expected HOST:PORT with an IPv6 address in brackets ([::1]:50051)"

# What gRPC resolves itself; any other scheme:// is taken for a host name and fails at the deadline.
SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6")
# A socket path longer than sockaddr_un's sun_path (108 bytes, its terminating NUL included) is refused by gRPC.
UNIX_PATH_MAX_BYTES = 107


def target_problem(target: str) -> str | None:
    """Why gRPC would not dial `target` as meant, or None: HOST:PORT, [IPv6]:PORT, or a target of gRPC's
    own schemes (dns:[//AUTHORITY/]HOST:PORT, unix:PATH or unix:///PATH, unix-abstract:NAME,
    ipv4:ADDRESS:PORT[,...], ipv6:[ADDRESS]:PORT[,...]). The problem is a phrase naming no value."""
    scheme, colon, rest = target.partition(":")
    if colon and scheme == "vsock":
        # gRPC's Python build has no vsock resolver: it looks the whole target up as a host name.
        return "vsock: targets are not dialled by gRPC here (it looks them up as a host name)"
    if colon and scheme in SCHEMES:
        return _scheme_problem(scheme, rest)
    if "://" in target:
        return f"expected HOST:PORT or a gRPC target ({', '.join(f'{s}:' for s in SCHEMES)})"
    return _host_port_problem(target)


def _host_port_problem(text: str) -> str | None:
    host, colon, port = text.rpartition(":")
    if not colon or not host or (text.startswith("[") and text.endswith("]")):  # no port: gRPC would dial 443
        return HOST_PORT
    if host.startswith("[") or host.endswith("]"):
        if not _is_bracketed_ipv6(host):
            return BRACKETS
    elif ":" in host:  # an IPv6 address without brackets: gRPC looks it up as a host name
        return BRACKETS
    return None if _is_port(port) else HOST_PORT


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def _is_bracketed_ipv6(host: str) -> bool:
    if not (host.startswith("[") and host.endswith("]")):
        return False
    try:
        ipaddress.IPv6Address(host[1:-1])  # a zone (fe80::1%eth0) included, as gRPC takes it
    except ValueError:
        return False
    return True


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _scheme_problem(scheme: str, rest: str) -> str | None:
    if scheme == "dns":
        # dns:HOST:PORT, dns:///HOST:PORT or dns://AUTHORITY/HOST:PORT: the endpoint after the authority.
        endpoint = rest[2:].partition("/")[2] if rest.startswith("//") else rest
        return _host_port_problem(endpoint)
    if scheme == "unix":
        if rest.startswith("//"):
            if not rest.startswith("///"):
                return "expected unix:PATH or unix:///ABSOLUTE_PATH (a unix: target names no host)"
            rest = rest[2:]
        return _socket_name_problem(rest, "unix:PATH")
    if scheme == "unix-abstract":
        return _socket_name_problem(rest, "unix-abstract:NAME")
    # ipv4: and ipv6: take addresses only, each with its port (no default), IPv6 in brackets.
    is_address = _is_ipv4 if scheme == "ipv4" else _is_bracketed_ipv6
    for address in rest.removeprefix("//").removeprefix("/").split(","):
        host, colon, port = address.rpartition(":")
        if not (colon and is_address(host) and _is_port(port)):
            form = "ADDRESS" if scheme == "ipv4" else "[ADDRESS]"
            return f"expected {scheme}:{form}:PORT[,{form}:PORT...] with a port of 1..65535"
    return None


def _socket_name_problem(name: str, form: str) -> str | None:
    if not name:
        return f"expected {form}: the socket's name is empty"
    if len(name.encode("utf-8", "surrogateescape")) > UNIX_PATH_MAX_BYTES:
        return f"expected {form} of at most {UNIX_PATH_MAX_BYTES} bytes (a socket address's limit)"
    return None
