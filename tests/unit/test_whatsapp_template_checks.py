"""A WhatsApp template's name and language are checked by Meta's rules when the call comes, so a typo fails the
call, naming the field, rather than every recipient at the provider; a refusal never quotes the value."""

from __future__ import annotations

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import InvalidArgument
from services.dispatcher.servicer import validate_content


def content(name: str, language: str) -> pb.Content:
    return pb.Content(whatsapp_template=pb.WhatsAppTemplate(name=name, language=language, params=["{{ first_name }}"]))


@pytest.mark.parametrize(
    ("name", "language"),
    [
        ("spring_offer", "en"),
        ("welcome2", "en_US"),
        ("2024_summer_sale", "pt_BR"),
        ("t", "fil"),
        ("order_update", "prs_AF"),
        ("x" * 512, "zh_HK"),
    ],
)
def test_names_and_languages_meta_takes_pass(name, language) -> None:
    validate_content(common_pb2.CHANNEL_WHATSAPP, content(name, language))


@pytest.mark.parametrize(
    "name",
    ["spring offer", "spring_offer\n", "\x00offer", "Spring_Offer", "spring-offer", " spring_offer", "spr\u00efng"],
)
def test_a_name_meta_cannot_hold_is_refused(name) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_content(common_pb2.CHANNEL_WHATSAPP, content(name, "en_US"))
    assert refused.value.field == "content.whatsapp_template.name"
    assert "lowercase letters, digits and underscores" in refused.value.description
    assert "offer" not in str(refused.value)


@pytest.mark.parametrize("language", ["en US", "en_US\n", "\x00en", "en-US", "EN", "e", "english", " en", "en_"])
def test_a_language_code_meta_cannot_hold_is_refused(language) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_content(common_pb2.CHANNEL_WHATSAPP, content("spring_offer", language))
    assert refused.value.field == "content.whatsapp_template.language"
    assert "such as en or en_US" in refused.value.description
