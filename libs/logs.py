"""Logging setup shared by the services."""

from __future__ import annotations

import logging


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    # aiohttp's access logs and client errors may quote URLs with customer data.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
