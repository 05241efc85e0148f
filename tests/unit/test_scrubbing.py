"""Scrubbing free text and pulling codes out of it."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs import scrub
from libs.scrub import scrub_text
from services.receipts.scrubbing import join_code, numeric_code, slug, smtp_code


@pytest.mark.parametrize(
    "value",
    [
        "jane.doe+tag@example.co.uk",
        "JANE@EXAMPLE.COM",
        "o'brien@mail.example",
        "user@localhost",
        "+447400123456",
        "+44 7400 123456",
        "+1 (415) 555-0100",
        "(415) 555-0100",
        "415-555-0100",
        "415.555.0100",
        "0044 20 7946 0958",
        "07700 900123",
        "447400123456",
        # Unicode dashes and invisible marks, which the resolver reads as separators (a number copied
        # out of rich text): a reply quoting the number as the API keeps it spells it so.
        "+44\u20117400\u2011123456",
        "+1 415\u2013555\u20130100",
        "+44\u00ad7400\u200b123456",
        "192.0.2.17",
        "10.5.1.1",
        "2001:db8::1",
        "2001:0db8:0000:0000:0000:ff00:0042:8329",
        "::ffff:192.0.2.1",
        "fe80::1%eth0",
        "https://track.example/click?u=jane",
        "www.example.com/path?email=jane",
    ],
)
def test_scrub_text_removes_contacts_and_addresses(value):
    text = f"550 5.1.1 <{value}>: rejected (from {value}) ok"
    scrubbed = scrub_text(text)
    assert value not in scrubbed
    assert value.lower() not in scrubbed.lower()
    assert "5.1.1" in scrubbed


@pytest.mark.parametrize(
    ("text", "contact"),
    [
        # As a form body or a query string carries them (Twilio's To, an API echoing its request URL).
        ("To=%2B447400123456&Body=hi", "447400123456"),
        ("To=%2b447400123456", "447400123456"),
        ("From=whatsapp%3A%2B447400123456", "447400123456"),
        ("lookup failed for email=jane.doe%40example.org", "jane.doe"),
        ("GET /contacts/JANE.DOE%40EXAMPLE.ORG: 404", "JANE.DOE"),
        ("twice encoded: jane.doe%2540example.org", "jane.doe"),
    ],
)
def test_scrub_text_removes_percent_encoded_contacts(text, contact):
    for scrubbed in (scrub_text(text), scrub_text(text, urls=False, collapse_whitespace=False)):
        assert contact.lower() not in scrubbed.lower()


def test_scrub_text_removes_percent_encoded_fetched_values():
    """A name is found by the exact value fetched, in whatever spelling a URL or a form gives it."""
    assert scrub_text("name=Zo%C3%AB+Smith", extra=["Zoë"]) == "name=[redacted]+Smith"
    assert scrub_text("name=Ann%20Lee&tier=gold", extra=["Ann Lee"]) == "name=[redacted]&tier=gold"


def test_scrub_text_keeps_what_is_not_pii():
    text = "421 4.7.0 Try again later, closing connection. (Code 30003, attempt 5)"
    assert scrub_text(text) == text
    assert scrub_text("") == ""


def test_scrub_text_truncates_and_collapses_whitespace():
    assert scrub_text("a  b\n\tc") == "a b c"
    assert len(scrub_text("x" * 10_000, limit=50)) == 50
    assert scrub_text("mail jane@example.com " + "y" * 300, limit=20) == "mail [email] yyyyyyy"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("smtp; 550 5.1.1 <jane@example.com>... User unknown", "5.1.1"),
        ("550 5.7.1 Service unavailable; Client host [10.5.1.1] blocked", "5.7.1"),
        ("Remote server at 192.5.1.1 said nothing", ""),
        ("421 Try again later", "421"),
        ("5.2.2", "5.2.2"),
        ("delivered to +4475001234567", ""),
        (None, ""),
        (550, ""),
    ],
)
def test_smtp_code(text, code):
    assert smtp_code(text) == code


def test_numeric_code():
    assert numeric_code("30003") == "30003"
    assert numeric_code(131026) == "131026"
    assert numeric_code("131026", max_digits=7) == "131026"
    assert numeric_code("447400123456") == ""
    assert numeric_code("+4474") == ""
    assert numeric_code(True) == ""
    assert numeric_code("٣٠٠٠٣") == ""  # other scripts' digits are not codes


def test_slug_and_join():
    vocabulary = frozenset({"auth_failure", "abuse"})
    assert slug("auth-failure", vocabulary) == "auth_failure"
    assert slug("Abuse", vocabulary) == "abuse"
    assert slug("jane@example.com", vocabulary) == ""
    assert slug(3, vocabulary) == ""
    assert join_code("hard", "", "5.1.1") == "hard:5.1.1"


_words = st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "Zs", "P"]), max_size=40)
_emails = st.from_regex(r"[a-z][a-z0-9._]{0,15}@[a-z][a-z0-9-]{0,15}\.(com|org|example|co\.uk)", fullmatch=True)
_phones = st.integers(min_value=10**9, max_value=10**13 - 1).map(lambda n: f"+{n}")
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str).filter(lambda s: s.count(":") >= 2)


@settings(max_examples=300, deadline=None)
@given(before=_words, after=_words, secret=st.one_of(_emails, _phones, _ipv4, _ipv6))
def test_scrub_text_never_keeps_a_planted_value(before, after, secret):
    scrubbed = scrub_text(f"{before} {secret} {after}", limit=1000)
    assert secret not in scrubbed


def test_scrub_text_removes_tainted_values_longest_first():
    extra = frozenset({"Jo", "Jones", "Jo Jones", "Ann"})  # "Jo" is too short to be tainted, but given here
    assert scrub_text("to Jo Jones and Ann", extra=extra, collapse_whitespace=False) == "to [redacted] and [redacted]"
    assert scrub_text("nothing tainted here", extra=extra) == "nothing tainted here"


_tainted = st.text(alphabet="ABCXYZ", min_size=3, max_size=8)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_tainted, min_size=1, max_size=30), filler=st.lists(st.text(alphabet="ABCXYZ ", max_size=6)))
def test_scrub_text_leaves_no_tainted_value(values, filler):
    # Values of letters the redaction marker does not use: what is left can only be original text.
    text = " ".join(part for pair in zip(filler, values, strict=False) for part in pair) + " " + " ".join(values)
    scrubbed = scrub_text(text, limit=10_000, extra=frozenset(values), urls=False, collapse_whitespace=False)
    assert not [v for v in values if v in scrubbed]


def _every_pattern(text: str) -> str:
    """The patterns' substitutions all run, none skipped, on the text as written and again as read
    (kept as written where reading finds nothing more): what `scrub_text` must equal."""
    text = _every_pattern_once(scrub._percent_decoded(text))
    readable = scrub._readable(text)
    if readable == text:
        return text
    again = _every_pattern_once(readable)
    return again if again != readable else text


def _every_pattern_once(text: str) -> str:
    text = scrub._URL.sub("[url]", text)
    text = scrub._EMAIL.sub("[email]", text)
    text = scrub._AT_TOKEN.sub("[email]", text)
    text = scrub._IPV6_CANDIDATE.sub(scrub._ipv6_or_keep, text)
    text = scrub._IPV4.sub("[ip]", text)
    return scrub._PHONE_CANDIDATE.sub(scrub._phone_or_keep, text)


_pieces = st.sampled_from(
    ["a", "Z", "1", "7", ".", ":", "@", "/", " ", "w", "W", "-", "(", "+", "%", "é", "K", "://", "www.", "WwW."]
    + ["jane@example.com", "x@y", "10.0.0.1", "1.2.3", "::1", "fe80::1%eth0", "+44 20 7946 0958", "http://a.b/c"]
    + ["&", "&#64;", "&amp;", "&#x3a;", "＠", "１", "．", "：", "ｗｗｗ．"]
)


@settings(max_examples=500, deadline=None)
@given(text=st.lists(_pieces, max_size=16).map("".join))
def test_scrub_text_skips_only_patterns_that_cannot_match(text):
    assert scrub_text(text, limit=1000, collapse_whitespace=False) == _every_pattern(text)


def test_value_types_keeps_the_shape_and_no_value():
    reply = '{"data": [{"id": "c-1", "email": "ann@example.org", "age": 41, "vip": true, "note": null,'
    reply += ' "profile": {"first_name": "Ann", "score": 1.5}}]}'
    shown = scrub.value_types(reply)
    assert shown == (
        '{"data":[{"id":"<string>","email":"<string>","age":"<number>","vip":"<boolean>","note":null,'
        '"profile":{"first_name":"<string>","score":"<number>"}}]}'
    )
    assert scrub.value_types("Ann <ann@example.org>") == "<21 bytes, not JSON>"
    keyed = scrub.value_types('{"Ben Schmidt": {"tier": "gold"}, "ann@example.org": 1}')
    assert keyed == '{"<key>":"<number>"}' and "Ben" not in keyed  # records keyed by their data


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_value_types_leaves_only_type_names(document):
    """Whatever the document, what is shown holds its keys and structure and no value of it."""
    shown = json.loads(scrub.value_types(json.dumps(document)))
    assert _shape(shown) == _shape(document)
    assert set(_leaves(shown)) <= {"<string>", "<number>", "<boolean>", None}


FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" would take "A\n" for a name


def _shape(value):
    if isinstance(value, dict):  # keys not like a field's name are data: shown as "<key>"
        return {(key if FIELD_NAME.match(key) else "<key>"): _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value]
    return None if value is None else "leaf"


def _leaves(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def test_a_value_the_length_bound_would_split_is_not_kept_in_part():
    """Text past eight times the limit is cut before scrubbing. A value the cut splits is no longer
    found whole; and text that shrinks as it is scrubbed (URLs) can bring the cut within the limit."""
    name = "Alexandra Smith"
    urls = "https://shop.example.com/a/very/long/path/to/a/product/page?ref=1 " * 30
    text = urls[: 8 * 200 - 11] + " " + name + " and the rest"
    assert text.index(name) < 8 * 200 < text.index(name) + len(name)
    scrubbed = scrub_text(text, extra=frozenset({name}))
    assert "Alexandra" not in scrubbed and "Smi" not in scrubbed
    assert scrubbed.startswith("[url] [url]")


# A provider or a PII API quotes a fetched value as it chose to write it: in another case, composed or
# decomposed, in full-width forms, with HTML character references.
@pytest.mark.parametrize(
    ("fetched", "quoted"),
    [
        ("Jane Doe", "JANE DOE"),
        ("Jane Doe", "jane doe"),
        ("Jane Doe", "jAnE dOe"),
        ("JANE DOE", "Jane Doe"),
        ("Jane Doe", "Ｊａｎｅ Ｄｏｅ"),
        ("Jane Doe", "ＪＡＮＥ\u3000ＤＯＥ"),
        ("Zoë", "Zoe\u0308"),  # fetched composed (NFC), quoted decomposed (NFD)
        ("Zoe\u0308", "Zoë"),
        ("Zoë", "ZOË"),
        ("Straße", "STRASSE"),  # case folding turns ß into ss
        ("STRASSE", "Straße"),
        ("Jane.Doe@Example.com", "jane.doe@example.com"),
        ("O'Brien", "o'brien"),
    ],
)
def test_a_fetched_value_is_found_however_it_is_quoted(fetched, quoted):
    text = f"no consent for {quoted} (code 30003)"
    assert scrub.redact_values(text, [fetched]) == "no consent for [redacted] (code 30003)"
    assert scrub_text(text, extra=[fetched], collapse_whitespace=False) == "no consent for [redacted] (code 30003)"


def test_a_fetched_value_written_with_character_references_is_found():
    assert scrub_text("no consent for O&#39;Brien (code 30003)", extra=["O'Brien"]) == (
        "no consent for [redacted] (code 30003)"
    )


def test_only_the_quoted_value_is_replaced_in_a_text_of_other_scripts():
    """The value's span in the text as it came is what goes, however the folding changed lengths."""
    text = "Ärger: ﬁle for STRASSE and Zoe\u0308 Smith, ok ß"
    assert scrub.redact_values(text, ["straße", "Zoë Smith"]) == "Ärger: ﬁle for [redacted] and [redacted], ok ß"
    assert scrub.redact_values("ＪＡＮＥ ＤＯＥ／ＪＡＮＥ", ["jane doe"]) == "[redacted]／ＪＡＮＥ"


@pytest.mark.parametrize(
    "text",
    [
        "mail jane＠example.com now",
        "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ",
        "mail jane&#64;example.com now",
        "mail jane&#x40;example.com now",
        "mail jane&commat;example.com now",
        "mail jane&amp;#64;example.com now",  # a reference to a reference
        "mail jane&#x25;40example.com now",  # a reference to a percent-escape
        "call ０７７００－９００１２３ now",
        "call （４１５） ５５５－０１００ now",
        "call ＋４４－７４００－１２３４５６ now",
    ],
)
def test_contacts_written_with_character_references_or_full_width_forms_are_found(text):
    for scrubbed in (scrub_text(text), scrub_text(text, urls=False, collapse_whitespace=False)):
        assert not re.search("jane|ｊａｎｅ|example|[0-9０-９]{3}", scrubbed, re.IGNORECASE), scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "421 4.7.0 Try again later (Code 30003, attempt 5)",
        "Zoë Müller's order: 3 items, ½ done, ＯＫ",
        "Tom &amp; Jerry &copy 2024 &notify=1 &#169; &bogus;",
        "Jane called; Doe wrote; Zoe and Smith",
        "e\u0301 combining, ﬁne, ß",
    ],
)
def test_text_without_a_contact_or_a_fetched_value_is_kept_as_it_came(text):
    extra = ["Jane Doe", "Zoë Smith", "Straße"]
    assert scrub.redact_values(text, extra) == text
    assert scrub_text(text, limit=1000, extra=extra, collapse_whitespace=False) == text
    assert scrub_text(text, limit=1000, extra=frozenset(), collapse_whitespace=False) == text


_cased_values = st.text(alphabet="abAB\u00e9\u00c9\u0301\uff41\uff22", min_size=3, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(_cased_values, min_size=1, max_size=10),
    filler=st.lists(st.text(alphabet="abAB \u00e9\u0301\uff41", max_size=6)),
)
def test_scrub_text_leaves_no_tainted_value_in_any_case_or_form(values, filler):
    text = " ".join(part for pair in zip(filler, values, strict=False) for part in pair) + " " + " ".join(values)
    for scrubbed in (
        scrub_text(text, limit=10_000, extra=frozenset(values), urls=False, collapse_whitespace=False),
        scrub.redact_values(text, values),
    ):
        remains = scrub.fold(scrubbed.replace("[redacted]", "|"))
        assert not [v for v in values if scrub.fold(v) in remains]


# What follows a value in the text may compose with its last character when the text is normalized (an
# accent, a Hangul final consonant): the value as it was fetched still stands there, and goes.
@pytest.mark.parametrize(
    ("fetched", "text", "scrubbed"),
    [
        ("Jane Doe", "no consent for Jane Doe\u0301 (code 30003)", "no consent for [redacted]\u0301 (code 30003)"),
        ("JANE DOE", "no consent for jane doe\u0308", "no consent for [redacted]\u0308"),
        ("김미", "고객 김미\u11ab 님", "고객 [redacted]\u11ab 님"),
    ],
)
def test_a_fetched_value_followed_by_a_character_that_composes_with_it_is_found(fetched, text, scrubbed):
    assert scrub.redact_values(text, [fetched]) == scrubbed
    assert scrub_text(text, extra=[fetched], collapse_whitespace=False) == scrubbed


# Case folding that changes lengths (ß, ﬁ, İ), accents, Hangul jamo and full-width letters around a value.
_forms = "aAsS zé\u0301ßﬁİi\u0307Ａｓ가\u11a8\u1161"


@settings(max_examples=500, deadline=None)
@given(
    value=st.text(alphabet=_forms, min_size=3, max_size=6),
    before=st.text(alphabet=_forms, max_size=6),
    after=st.text(alphabet=_forms, max_size=6),
)
def test_a_fetched_value_never_stands_as_fetched_whatever_surrounds_it(value, before, after):
    text = f"{before}{value}{after}"
    for scrubbed in (
        scrub.redact_values(text, [value]),
        scrub_text(text, limit=10_000, extra=[value], urls=False, collapse_whitespace=False),
    ):
        assert value not in scrubbed.replace("[redacted]", "|")


@pytest.mark.parametrize("text", ["a" * 1600, "é" * 1600, "ﬁ" * 1600])
def test_values_that_occur_at_every_position_of_a_long_text_are_removed_in_linear_time(text):
    """A batch's 2,000 values sharing their first characters, some at every position of the text: neither
    finding them nor removing them may cost a step per value and position."""
    import time

    from libs.telemetry import TaintedValues

    values = [text[0] * (3 + n % 62) + ("" if n < 62 else f"#{n}") for n in range(2000)]
    tainted = TaintedValues()
    tainted.update(values)
    started = time.perf_counter()
    for extra in (values, tainted):
        assert scrub_text(text, limit=200, extra=extra) == "[redacted]"
    assert time.perf_counter() - started < 0.3  # 0.7 s and more where each position cost a step
