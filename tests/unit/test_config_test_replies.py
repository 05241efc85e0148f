"""What the PII API Test screens show of a reply's keys: its paths, never a contact or a read value."""

from __future__ import annotations

import json
import time

from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver.pii_client import CallResult, Extraction
from services.resolver.servicer import _fill_test_reply


def paths_shown(document: object, extraction: Extraction) -> list[str]:
    response = pb.TestPiiApiConfigResponse()
    _fill_test_reply(
        response, CallResult(http_status=200, body=json.dumps(document).encode()), extraction, time.monotonic(), []
    )
    return list(response.response_keys)


def test_the_paths_of_a_reply_are_shown() -> None:
    document = {"customer": {"email": "ann@example.org", "profile": {"first_name": "Ann"}}, "tags": [{"id": 1}]}
    extraction = Extraction(contact="ann@example.org", attributes={"first_name": "Ann"})
    assert paths_shown(document, extraction) == ["customer.email", "customer.profile.first_name", "tags[0].id"]


def test_records_keyed_by_contact_or_by_a_read_value_show_no_key() -> None:
    document = {
        "ann@example.org": {"name": "Zedediah"},
        "+44 7700 900123": {"tier": "gold"},
        "Zedediah": {"since": 2020},
    }
    shown = paths_shown(document, Extraction(contact="ann@example.org", attributes={"name": "Zedediah"}))
    assert len(shown) == 3
    for value in ("ann@example.org", "7700 900123", "Zedediah"):
        assert not any(value in path for path in shown), shown
    assert shown[2].endswith(".since")
