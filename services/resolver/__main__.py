"""`python -m services.resolver`: runs the resolver until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from libs.crypto import SecretKeyMissing
from libs.logs import configure_logging
from libs.server import run_until_terminated
from libs.settings import ResolverSettings
from services.resolver.server import ResolverDeps, build_server


async def serve(settings: ResolverSettings) -> None:
    service, _ = await build_server(settings, ResolverDeps.from_settings(settings))
    await run_until_terminated(service, settings.grace_seconds)


def main() -> int:
    settings = ResolverSettings()
    configure_logging(settings.log_level, "resolver")
    try:
        asyncio.run(serve(settings))
    except SecretKeyMissing as exc:
        print(f"resolver: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
