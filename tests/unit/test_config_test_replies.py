"""What the PII API Test screens show of a reply: its paths, never a contact or a read value; of an error reply,
its own text, never the record it quotes."""

from __future__ import annotations

import json
import time

from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.dispatcher.servicer import pii_api_answer
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


def send_test_answer(status: int, body: str) -> str:
    return pii_api_answer(pb.TestPiiApiConfigResponse(http_status=status, response_body=body))


def test_an_error_reply_shows_its_own_text_and_not_the_record_it_quotes() -> None:
    """An API that refuses a lookup may quote the record it refused (a 422 listing the fields it found
    wrong, a 403 with the customer restricted): nothing was read, so no value of it is known to take
    out, and no pattern finds a name. Only the error's own text is shown; the rest by its type."""
    body = json.dumps(
        {
            "error": {"code": "restricted", "message": "processing restricted for ann@example.org"},
            "customer": {"id": "c-1", "first_name": "Zedediah", "last_name": "Quimby", "phone": "+447400123456"},
            "errors": [{"field": "profile.name", "detail": "incomplete", "value": "Zedediah Quimby"}],
        }
    )
    shown = send_test_answer(403, body)
    assert "restricted" in shown and "processing restricted for [email]" in shown and "incomplete" in shown
    assert '"first_name":"<string>"' in shown
    for value in ("Zedediah", "Quimby", "ann@example.org", "447400123456"):
        assert value not in shown
    # A Python API escapes what is not ASCII: the name is no more found for that.
    escaped = json.dumps({"detail": "not found", "customer": {"name": "Zoë Çelik"}})
    assert "\\u00eb" in escaped
    shown = send_test_answer(404, escaped)
    assert "not found" in shown and "Zo" not in shown and "elik" not in shown


def test_an_error_reply_that_is_not_json_is_shown_scrubbed() -> None:
    shown = send_test_answer(502, "<html>Bad gateway for ann@example.org</html>")
    assert shown == "<html>Bad gateway for [email]</html>"
    assert send_test_answer(200, "not json") == "<8 bytes, not JSON>"
