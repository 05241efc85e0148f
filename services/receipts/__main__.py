"""`python -m services.receipts`: gRPC (TOKENSEND_GRPC_PORT) and webhooks (TOKENSEND_HTTP_PORT) until SIGTERM.

On SIGTERM: health and webhook readiness NOT_SERVING, then the webhooks and gRPC
stop together within the grace period (in-flight receipts and calls finish), then
Redis and the HTTP session close. A missing secret key or an invalid setting exits
with status 2.
"""

from __future__ import annotations

import sys

from libs.server import run_service
from libs.settings import ReceiptsSettings
from services.receipts.server import ReceiptsDeps, start_receipts


def main() -> int:
    return run_service(
        "receipts",
        ReceiptsSettings,
        lambda settings, telemetry: start_receipts(settings, ReceiptsDeps.from_settings(settings, telemetry)),
    )


if __name__ == "__main__":
    sys.exit(main())
