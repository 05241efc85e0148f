"""`python -m services.resolver`: runs the resolver until SIGTERM."""

from __future__ import annotations

import sys

from libs.server import run_service
from libs.settings import ResolverSettings
from services.resolver.server import ResolverDeps, build_server


def main() -> int:
    return run_service(
        "resolver",
        ResolverSettings,
        lambda settings, telemetry: build_server(settings, ResolverDeps.from_settings(settings, telemetry)),
    )


if __name__ == "__main__":
    sys.exit(main())
