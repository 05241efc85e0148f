"""Masking fetched values wherever a template put them (the masked preview)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from markupsafe import escape
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.masking import mask_fetched, mask_value, stand_in
from services.dispatcher.rendering import ContentTemplates

EMAIL = "jane.doe@example.com"
PHONE = "+447700900123"
FIRST, LAST = "Jane", "O'Brien & Sons"
VALUES = [EMAIL, PHONE, FIRST, LAST]


def test_values_are_masked_by_kind():
    assert mask_value(EMAIL) == "j***@e***.com"
    assert mask_value(PHONE) == "+44 ***** **123"
    assert mask_value("Jane Doe") == "J*** D***"


def test_every_spelling_a_template_can_produce_is_masked():
    content = pb.Content(
        subject="Hi {{ first_name|upper }} {{ last_name }}",
        html_body=(
            '<p>{{ first_name }} {{ last_name }} <a href="https://shop.example/?e={{ email|urlencode }}">'
            "{{ email }}</a> {{ email.split('@')[0] }} {{ phone }} {{ phone[1:] }} {{ first_name|lower }}</p>"
        ),
        text_body="{{ first_name|title }}, {{ email|upper }}, call {{ phone }}",
    )
    rendered = ContentTemplates(content).render(
        {"first_name": FIRST, "last_name": LAST, "email": EMAIL, "phone": PHONE}, {}
    )
    subject = mask_fetched(rendered.subject, VALUES)
    html = mask_fetched(rendered.html_body, VALUES, html=True)
    text = mask_fetched(rendered.text_body, VALUES)
    for output in (subject, html, text):
        lowered = output.lower()
        for value in (EMAIL, PHONE, PHONE[1:], FIRST, "jane.doe", "example.com", "brien", "sons", quote(EMAIL)):
            assert value.lower() not in lowered, (value, output)
        assert str(escape(LAST)).lower() not in lowered
    assert subject.startswith("Hi J*** O***")
    assert "j***@e***.com" in html and "+44 ***** **123" in html
    assert text.startswith("J***, j***@e***.com, call +44 ***** **123")


def test_the_brands_own_text_is_left_alone():
    text = "Jane's totally janelike offer at Janet's: call +44 20 7946 0000"
    assert mask_fetched(text, ["Jan", "Al"]) == text
    assert mask_fetched("Hello Jane!", ["Jane"]) == "Hello J***!"
    assert mask_fetched("", VALUES) == "" and mask_fetched("x", []) == "x"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Dear Strauß", "Strauß"),  # casefolds to "strauss"
        ("Dear STRAUSS", "Strauß"),  # |upper
        ("Hi İbrahim", "İbrahim"),  # casefolds to two characters
        ("Hi İBRAHIM", "İbrahim"),
        ("utm_content=JohnSmith", "John"),  # joined to other text
        ("user=john_smith42", "Smith"),
    ],
)
def test_a_value_is_masked_whatever_its_case_mapping_and_whatever_it_is_joined_to(text: str, value: str) -> None:
    masked = mask_fetched(text, [value])
    assert value.casefold() not in masked.casefold() and value.upper() not in masked.upper()


def test_a_short_form_is_masked_only_as_a_whole_word() -> None:
    assert mask_fetched("totally Al", ["Al"]) == "totally A***"


def test_stand_ins_keep_length_case_and_punctuation_and_change_every_letter_and_digit():
    assert stand_in("Jade O'Brien-42") == "Wnqr B'Oevra-97"
    assert stand_in("Zoë Ølsen") == "Mbx xyfra"


def test_what_differs_from_the_stand_in_render_is_starred_and_plain_spellings_keep_their_masks():
    text = "Hi Jade, ade J-a-d-e edaJ"
    shadow = "Hi Wnqr, nqr W-n-q-r rqnW"
    assert mask_fetched(text, ["Jade"], shadow=shadow) == "Hi J***, *** *-*-*-* ****"


def test_a_branch_on_a_value_stars_its_own_line_only():
    text = "Hi Jade\nfamily offer\nBye for now"
    shadow = "Hi Wnqr\n\nBye for now"
    assert mask_fetched(text, ["Jade"], shadow=shadow) == "Hi J***\n****** *****\nBye for now"


def test_lines_of_different_lengths_share_only_runs_of_text():
    text = "Dear Jade, welcome back to the club"
    shadow = "Dear Wnqr, welcome to the club"
    masked = mask_fetched(text, ["Jade"], shadow=shadow)
    assert masked.startswith("Dear J***, welcome ") and masked.endswith(" the club") and "back" not in masked
