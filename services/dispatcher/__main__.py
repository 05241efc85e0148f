"""`python -m services.dispatcher`: runs the dispatcher until SIGTERM."""

from __future__ import annotations

import sys

from libs.server import run_service
from libs.settings import DispatcherSettings
from services.dispatcher.server import DispatcherDeps, build_server


def main() -> int:
    return run_service(
        "dispatcher",
        DispatcherSettings,
        lambda settings, telemetry: build_server(settings, DispatcherDeps.from_settings(settings, telemetry)),
    )


if __name__ == "__main__":
    sys.exit(main())
