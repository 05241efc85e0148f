"""The receipts service: verifies providers' delivery receipts, maps them to campaigns and keeps only anonymised events.

Webhooks (aiohttp) and `IngestReceipt` (gRPC) share one intake: verify the
provider's signature, parse every event into one status set, look the message
up in the message-ID map, then record each genuine event exactly once (dedupe,
forward-only status, campaign counters, the workspace's event stream). Raw
receipts are never stored or logged.
"""
