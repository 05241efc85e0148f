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
    # aiohttp's access log quotes URLs; botocore logs whole request bodies (recipients) at DEBUG;
    # pyreqwest can pass on reqwest's and hyper's debug logs, which quote URLs.
    for name in (
        "aiohttp.access",
        "botocore",
        "aiobotocore",
        "boto3",
        "urllib3",
        "pyreqwest",
        "reqwest",
        "hyper",
        "hyper_util",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
