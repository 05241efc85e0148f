"""A failed render names what went wrong without quoting a fetched value."""

from __future__ import annotations

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.rendering import ContentTemplates, RenderFailed


def test_missing_variable_is_named() -> None:
    with pytest.raises(RenderFailed) as caught:
        ContentTemplates(pb.Content(sms_body="Hi {{ nickname }}")).render({"first_name": "Zedediah"}, {})
    assert caught.value.reason == "content.sms_body: 'nickname' is undefined"


def test_a_fetched_value_used_as_a_key_is_not_quoted() -> None:
    templates = ContentTemplates(pb.Content(sms_body="{{ recipient[first_name] }}"))
    with pytest.raises(RenderFailed) as caught:
        templates.render({"first_name": "Zedediah"}, {"tier": "gold"})
    assert "Zedediah" not in caught.value.reason
    assert caught.value.reason.startswith("content.sms_body: 'dict object' has no attribute")
