"""Logging setup shared by the services."""

from __future__ import annotations

import logging

from libs.telemetry import install_log_scrubbing


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    install_log_scrubbing()
    # aiohttp's access logs and client errors may quote URLs with customer data.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
