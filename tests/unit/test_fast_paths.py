"""Fast paths give what the slow paths give: JSON paths, email normalisation, rendering once per batch,
anonymous ID checks."""

from __future__ import annotations

import base64
import random
import string
import unicodedata

import jmespath
import phonenumbers
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.anonymous_ids import valid_anonymous_id, valid_anonymous_ids
from libs.jsonpath import field_names
from libs.message_map import new_message_ids, split_message_id
from libs.telemetry import taint_scope
from libs.write_batch import WriteBatch
from sandbox.providers.sendgrid import substitute
from services.dispatcher.guards import SENT, Idempotency
from services.dispatcher.rendering import ContentTemplates, RenderFailed
from services.dispatcher.template_sandbox import Sandbox, render
from services.resolver.contacts import InvalidContact, normalize_email, normalize_phone
from services.resolver.extraction import select
from services.resolver.phones import is_valid_number, split_international
from services.resolver.pii_client import Extraction, PiiApiClient, _add_outcome

DOCUMENTS = [
    {"data": {"results": [{"id": "c-1", "profile": {"first_name": "Ann"}}]}, "id": 5},
    {"data": {"results": {"0": 1}}},
    {"data": None},
    [{"id": "x"}],
    "text",
    None,
    {"a": {"b": {"c": {"d": 0}}, "e": False, "f": ""}, "id": [1]},
]
PATHS = [
    "id",
    "data.results",
    "data.results[0].id",
    "data.results[-1].profile.first_name",
    "[0].id",
    "@",
    "data.x.y",
    "data.results.x",
    "id.x",
    "a.e",
    "a.f",
    "a.b.c.d",
    "a.b.c.d.e",
    'a."b".c',
]


@pytest.mark.parametrize("path", [*PATHS, "data.results[*].id", "length(data.results)"])
def test_select_matches_jmespath(path: str) -> None:
    for document in DOCUMENTS:
        try:
            expected = jmespath.search(path, document)
        except jmespath.exceptions.JMESPathError:
            continue
        assert select(path, document) == expected, (path, document)


# Indexes one after another (a list of lists): jmespath gives them as one node with every index as a child.
CHAINED_INDEXES = ["x[0][0]", "x[0][-1]", "[0][1]", "x[0][0][1].id", "a.x[1][0]", "x[0][2]", "x[0][0:1]", "@[0][0]"]
NESTED_LISTS = [{"x": [["+447400123456", "b"], [{"id": "c"}, 1]]}, {"a": {"x": [[], [["d"]]]}}, [[1, 2]], {"x": [1]}]


@pytest.mark.parametrize("path", CHAINED_INDEXES)
def test_select_of_chained_indexes_matches_jmespath(path: str) -> None:
    for document in [*NESTED_LISTS, *DOCUMENTS]:
        assert select(path, document) == jmespath.search(path, document), (path, document)


@pytest.mark.parametrize("path", [*PATHS, "data.results[*].id", "length(data.results)", "a | @"])
def test_field_names_read_with_dict_get_match_jmespath(path: str) -> None:
    names = field_names(path)
    if path in ("id", "data.results", "data.x.y", "data.results.x", "id.x", "a.e", "a.f", "a.b.c.d", "a.b.c.d.e"):
        assert names == tuple(path.split("."))
    assert field_names('a."b".c') == ("a", "b", "c")
    if names is None:
        return
    for document in DOCUMENTS:
        value = document
        for name in names:
            value = value.get(name) if type(value) is dict else None
        assert value == jmespath.search(path, document), (path, document)


def _slow(value: str) -> str | None:
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError:
        return None


def _fast(value: str) -> str | None:
    try:
        return normalize_email(value)
    except InvalidContact:
        return None


def test_email_fast_path_agrees_with_email_validator() -> None:
    rng = random.Random(7)
    local_chars = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-."
    label_chars = string.ascii_lowercase + string.digits + "-"
    tlds = ["com", "org", "c", "test", "local", "co", "x1", "museum", "arpa", "onion", "COM", "xn--p1ai"]
    for _ in range(20_000):
        local = "".join(rng.choice(local_chars) for _ in range(rng.randint(1, 12)))
        labels = ["".join(rng.choice(label_chars) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
        address = f"{local}@{'.'.join([*labels, rng.choice(tlds)])}"
        assert _fast(address) == _slow(address), address
    for address in ("Alice.Smith@Example.COM", " bob@example.org ", "x@xn--bcher-kva.com", "a@b.c", "a@localhost"):
        assert _fast(address) == _slow(address), address


@pytest.mark.parametrize(
    "address",
    [
        "a@-b.com",  # a label starting or ending with "-", first, middle or last before the TLD
        "a@b-.com",
        "a@x.-b.com",
        "a@x.b-.com",
        "a@b--c.com",
        "a@b-c.d-e.com",
        f"a@{'b' * 63}.com",  # a label of 63 characters, and of 64, first or last
        f"a@{'b' * 64}.com",
        f"a@x.{'b' * 64}.com",
        f"a@x.{'b' * 63}",
        f"a@x.{'b' * 64}",
        f"{'a' * 64}@{'b' * 59}.com",  # 128 characters in all, and 129: past the fast path's limit
        f"{'a' * 64}@{'b' * 60}.com",
        "a@b.c0m",
        "a@1.com",
        "a@b.example.test",
    ],
)
def test_email_fast_path_agrees_with_email_validator_at_the_edges(address: str) -> None:
    assert _fast(address) == _slow(address)


def test_rendering_once_per_batch_gives_the_same_messages() -> None:
    templates = ContentTemplates(pb.Content(sms_body="Hi {{ first_name }}, {{ recipient.tier }}"))
    memo: dict = {}
    people = [
        ({"first_name": n, "last_name": str(i)}, {"tier": t})
        for i, (n, t) in enumerate([("A", "g")] * 3 + [("B", "s")])
    ]
    for fetched, recipient in people:
        assert templates.render(fetched, recipient, memo=memo) == templates.render(fetched, recipient)
    assert len(memo) == 2  # last names are not in the template: they do not split the cache


def test_rendering_once_per_batch_is_not_fooled_by_the_order_of_attributes() -> None:
    templates = ContentTemplates(pb.Content(sms_body="{{ recipient.tier }}/{{ recipient.city }}"))
    memo: dict = {}
    outputs = [
        templates.render({}, recipient, memo=memo).sms_body
        for recipient in ({"tier": "g", "city": "x"}, {"city": "x", "tier": "g"}, {"tier": "x", "city": "g"})
    ]
    assert outputs == ["g/x", "g/x", "x/g"]


@pytest.mark.parametrize(
    ("source", "entries"),
    [
        ("{{ recipient.tier }} {{ first_name }}", 2),  # only `tier` counts: `city` does not split the memo
        ("{{ recipient['tier'] }}", 2),
        ("{{ recipient.tier }} {{ recipient.city }}", 4),
        ("{{ recipient.items() | list | length }}", 4),  # a method of the dict: every attribute counts
        ("{% for k, v in recipient.items() %}{{ k }}={{ v }};{% endfor %}", 4),
        ("{{ recipient | tojson }}", 4),
        ("{% set r = recipient %}{{ r.tier }}", 4),
        ("{{ recipient[first_name] | default('-') }}", 4),  # a computed key
        ("{{ recipient.get('tier', '-') }}", 4),
        ("{{ recipient.tier }}{{ recipient.nickname | default('') }}", 2),
    ],
)
def test_rendering_once_per_batch_keys_on_the_recipient_attributes_templates_read(source, entries) -> None:
    templates = ContentTemplates(pb.Content(sms_body=source))
    memo: dict = {}
    recipients = [{"tier": t, "city": c} for t in ("gold", "blue") for c in ("x", "y")]
    for recipient in recipients:
        fetched = {"first_name": "Ann"}
        assert templates.render(fetched, recipient, memo=memo) == templates.render(fetched, recipient), source
    assert len(memo) == entries, source


def test_random_templates_are_rendered_every_time() -> None:
    templates = ContentTemplates(pb.Content(sms_body="{{ ['a', 'b', 'c', 'd'] | random }} {{ first_name }}"))
    memo: dict = {}
    for _ in range(5):
        templates.render({"first_name": "A"}, {}, memo=memo)
    assert memo == {}


# Templates of text and reads only, which are filled in without Jinja, and some that are not.
READS = [
    "Hi {{ first_name }}, {{ recipient.tier }} & {{ recipient['tier'] }}!",
    "{{first_name}}{{ last_name }}",
    "  {{- first_name -}}  \n{# a comment #}{% raw %}{{ x }}{% endraw %}\n",
    "{{ content.offers.headline }} / {{ content['offers']['code'] }}",
    "{{ recipient.items }}",  # the dict's method: not a read of a key
    "{{ recipient.missing }}",
    "{{ first_name.upper() }}",
    "{{ first_name | upper }}",
    "{{ first_name[0] }}",
    "{{ range }}",
    "{% if first_name %}Hi {{ first_name }}{% endif %}",
    "{{ nickname }}",
    "<a href='https://x.example/?n={{ first_name }}'>{{ last_name }}</a>",
    "[ts:0] {{ first_name }}",
]
TEXT = st.text(alphabet=st.sampled_from(list("aZé &<>\"'{}[]%:ts0\n")), max_size=12)
COMPILED = {
    source: (
        ContentTemplates(pb.Content(text_body=source, html_body=source)),
        Sandbox(False).from_string(source),
        Sandbox(True).from_string(source),
    )
    for source in READS
}
SMS_COMPILED = {source: ContentTemplates(pb.Content(sms_body=source)) for source in READS}  # no pattern


def _jinja(template, context: dict) -> str | type:
    try:
        return render(template, context)
    except Exception as exc:  # the kind of failure is what must agree
        return type(exc)


def test_templates_of_text_and_outputs_are_rendered_piece_by_piece(monkeypatch) -> None:
    simple = [source for source, (templates, _, _) in COMPILED.items() if templates.pattern is not None]
    assert simple == [source for i, source in enumerate(READS) if i not in (10, 13)]  # a tag; text like a tag
    templates = COMPILED[READS[0]][0]
    monkeypatch.setattr(type(templates._text_body.jinja), "render", lambda *_: pytest.fail("rendered by Jinja"))
    assert templates.render({"first_name": "Ann"}, {"tier": "<b>"}).html_body == "Hi Ann, &lt;b&gt; & &lt;b&gt;!"


@settings(max_examples=150, deadline=None)
@given(first=TEXT, last=TEXT, tier=st.one_of(TEXT, st.none()), headline=TEXT)
def test_templates_of_reads_render_as_jinja_renders_them(first, last, tier, headline) -> None:
    fetched = {"first_name": first, "last_name": last}
    recipient = {} if tier is None else {"tier": tier}
    content = {"offers": {"headline": headline, "code": last}}
    context = {**fetched, "recipient": recipient, "content": content}
    for source, (templates, plain, html) in COMPILED.items():
        expected = (_jinja(plain, context), _jinja(html, context))
        try:
            assert SMS_COMPILED[source].render(fetched, recipient, content).sms_body == expected[0], source
        except RenderFailed:
            assert isinstance(expected[0], type), source
        try:
            rendered = templates.render(fetched, recipient, content)
        except RenderFailed:
            assert isinstance(expected[0], type) or isinstance(expected[1], type), source
            continue
        assert (rendered.text_body, rendered.html_body) == expected, source


@settings(max_examples=150, deadline=None)
@given(first=TEXT, last=TEXT, tier=TEXT)
def test_a_pattern_with_its_substitutions_is_the_rendered_message(first, last, tier) -> None:
    templates = ContentTemplates(
        pb.Content(
            subject="{{ first_name | default('there', true) }} {{ recipient.tier | upper }}",
            html_body="<p>Dear {{ first_name | title }} {{ last_name }}</p>{{ recipient.tier }}",
            text_body="Dear {{ first_name }}{{ last_name if last_name else '' }}",
        )
    )
    pattern = templates.pattern
    assert pattern is not None
    try:
        rendered = templates.render({"first_name": first, "last_name": last}, {"tier": tier})
    except RenderFailed:
        assert "\n" in first + tier  # a subject with a line break: the only way these fail
        return
    if rendered.substitutions is None:
        assert "[ts:" in first + last + tier
        return
    assert rendered.pattern is pattern
    for part in ("subject", "html_body", "text_body"):
        assert substitute(getattr(pattern, part), rendered.substitutions) == getattr(rendered, part)


@pytest.mark.parametrize(
    "content",
    [
        pb.Content(sms_body="Hi {{ first_name }}"),  # not an email
        pb.Content(text_body="{% if first_name %}Hi{% endif %}"),  # a tag
        pb.Content(subject="{% set n = first_name %}{{ n }}", text_body="Hi"),
        pb.Content(html_body="{% for k in recipient %}{{ k }}{% endfor %}"),
        pb.Content(text_body="Use [ts:1] {{ first_name }}"),  # its own text looks like a tag
    ],
)
def test_content_that_is_not_only_text_and_outputs_has_no_pattern(content) -> None:
    assert ContentTemplates(content).pattern is None


def test_message_ids_are_distinct_random_hex_of_a_uuid_s_length() -> None:
    batch, other = new_message_ids(5000), new_message_ids(1)
    ids = batch + other
    assert len(set(ids)) == 5001
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    assert new_message_ids(0) == []
    # Each 128 IDs share their first half, and nothing else: each keeps 64 random bits of its own.
    groups = [batch[i : i + 128] for i in range(0, 5000, 128)]
    assert [len(g) for g in groups] == [128] * 39 + [8]
    assert all({split_message_id(i)[0] for i in g} == {g[0][:16]} for g in groups)
    assert len({g[0][:16] for g in groups} | {other[0][:16]}) == 41
    assert len({split_message_id(i)[1] for i in batch}) == 5000
    assert split_message_id(batch[7]) == (batch[7][:16], batch[7][16:])


def _valid_anonymous_id_by_characters(value: str) -> bool:
    if value in (".", ".."):  # dot segments: resolved away in a URL's path
        return False
    return 0 < len(value) <= 256 and not any(c.isspace() or unicodedata.category(c) == "Cc" for c in value)


def test_anonymous_id_pattern_agrees_with_a_check_of_every_character() -> None:
    for code in range(0x110000):
        character = chr(code)
        assert valid_anonymous_id(character) == _valid_anonymous_id_by_characters(character), hex(code)
        assert valid_anonymous_id(f"a{character}b") == _valid_anonymous_id_by_characters(f"a{character}b"), hex(code)
        if character.isprintable() and character not in " .":  # the batch check's shortcut takes it as valid
            assert valid_anonymous_id(character), hex(code)
    odd = ("", "x" * 256, "x" * 257, "cust-000001", "a b", "a\x7fb", "a\x85b", "a\x9fb", "\xa0", ".", "..", "...")
    for value in odd:
        assert valid_anonymous_id(value) == _valid_anonymous_id_by_characters(value), value


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(
                alphabet=st.sampled_from(["a", "é", " ", "\n", "\x85", "\xa0", "-", "\u2028", "\u200b", "\x7f"]),
                max_size=4,
            ),
            st.sampled_from(["x" * 256, "x" * 257, "cust-000001", ".", "..", "..."]),
        ),
        max_size=6,
    )
)
def test_a_batch_of_anonymous_ids_is_checked_as_each_id_is(values: list[str]) -> None:
    assert valid_anonymous_ids(values) == [v for v in values if valid_anonymous_id(v)]


_CONTACTS = st.one_of(
    st.sampled_from(
        [
            "ana@example.com",
            " ana@example.com ",
            "Ana@Example.COM",
            "not an address",
            "",
            "   ",
            "+447700900123",
            "+44 7700 900123",
            "0044 7700 900123",
            "+1",
            "+999999999999",
            "x@y.test",
        ]
    ),
    st.integers(min_value=-10, max_value=10**12),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
_NAMES = st.one_of(st.none(), st.text(alphabet=st.sampled_from(list("aé  1")), max_size=5), st.integers(), st.floats())


_VALID = object()  # stands for a contact valid on the test's channel


def _placed(path: str, value: object, holder: str) -> dict:
    """A record holding `value` at `path`, its outer fields' place taken by `holder`'s kind of value:
    "dict" as the path says, "text" or "list" where a field should be, "absent" for none."""
    *outer, last = path.split(".")
    record: object = {last: value}
    for name in reversed(outer):
        inner = {"dict": record, "text": "x", "list": [record], "absent": None}[holder]
        record = {name: inner} if inner is not None else {}
    return record  # type: ignore[return-value]


@settings(max_examples=400, deadline=None)
@given(
    channel=st.sampled_from([common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_WHATSAPP]),
    records=st.lists(
        st.tuples(
            st.one_of(st.just(_VALID), _CONTACTS),  # a valid contact in half the records: their attributes are read
            _NAMES,
            st.sampled_from(["dict", "text", "list", "absent"]),
            st.booleans(),
        ),
        max_size=6,
    ),
    missing=st.integers(min_value=0, max_value=2),
    encrypted=st.booleans(),
    # Paths of one or two fields are read with `dict.get` in the loop; others through their getters.
    contact_path=st.sampled_from(["contact", "data.contact", "contact | @", "[0].contact"]),
    attribute_paths=st.sampled_from(
        [
            {"first_name": "profile.first"},
            {"first_name": "first"},
            {"first_name": "profile.inner.first"},
            {"first_name": "profile.first", "nickname": "profile.inner.first"},
            {},
        ]
    ),
)
# A list record whose contact is found: its attributes, plain paths or not, are read from no dict.
@example(common_pb2.CHANNEL_EMAIL, [("ana@example.com", "x", "dict", False)], 0, False, "[0].contact", {"a": "p.f"})
@example(common_pb2.CHANNEL_SMS, [("+447700900123", "x", "text", False)], 0, False, "contact", {"a": "p.f"})
def test_a_bulk_reply_s_records_are_extracted_as_each_record_is(
    channel, records, missing, encrypted, contact_path, attribute_paths
) -> None:
    key = base64.b64encode(bytes(range(32))).decode() if encrypted else ""
    config = rpb.PiiApiConfig(
        channel=channel, contact_path=contact_path, attribute_paths=attribute_paths, encryption_key=key
    )
    contact_field = contact_path.split(" ")[0].removeprefix("[0].")
    by_id: dict = {}
    valid = "ana@example.com" if channel == common_pb2.CHANNEL_EMAIL else "+447700900123"
    for i, (contact, first, holder, not_a_dict) in enumerate(records):
        contact = valid if contact is _VALID else contact
        record: dict = _placed(contact_field, contact, "dict")
        for path in attribute_paths.values():
            record = {**record, **_placed(path, first, holder)}
        # A record that is a list: its contact found only by "[0].contact", its attributes by no path.
        by_id[f"id-{i}"] = [record] if contact_path.startswith("[0]") or (not_a_dict and i % 3 == 2) else record
    batch = [*by_id, *(f"absent-{i}" for i in range(missing))]
    absent = Extraction(error=rpb.RESOLVE_ERROR_CODE_NOT_FOUND, detail="ID not in the reply")
    one_loop, one_loop_errors = rpb.ResolveContactsResponse(), {}
    with taint_scope() as tainted:
        PiiApiClient._add_records(config, channel, batch, by_id, 200, 1, one_loop.contacts, one_loop_errors)
        one_loop_tainted = set(tainted)
    record_by_record, record_by_record_errors = rpb.ResolveContactsResponse(), {}
    with taint_scope() as tainted:
        for anonymous_id in batch:
            record = by_id.get(anonymous_id)
            extraction = absent if record is None else PiiApiClient._extract(config, channel, record)
            _add_outcome(record_by_record.contacts, anonymous_id, extraction, 200, 1, channel, record_by_record_errors)
        record_by_record_tainted = set(tainted)
    assert one_loop == record_by_record
    assert one_loop_errors == record_by_record_errors
    assert one_loop_tainted == record_by_record_tainted


def _library_parse(compact: str) -> phonenumbers.PhoneNumber | str:
    try:
        return phonenumbers.parse(compact, None)
    except phonenumbers.NumberParseException as exc:
        return f"refused: {exc.error_type}"


def _fast_parse(compact: str) -> phonenumbers.PhoneNumber | str:
    """The number as the fast path reads it off, or the library's answer where it does not."""
    split = split_international(compact)
    if split is None:
        return _library_parse(compact)
    country_code, national = split
    return phonenumbers.PhoneNumber(country_code=country_code, national_number=int(national))


def _library_normalize(compact: str) -> str:
    """What normalize_phone answered before its fast paths: parse, validate, format."""
    number = _library_parse(compact)
    if isinstance(number, str) or not phonenumbers.is_valid_number(number):
        return "invalid"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _normalize(value: str) -> str:
    try:
        return normalize_phone(value)
    except InvalidContact:
        return "invalid"


def _national_numbers(country_code: int, rng: random.Random) -> list[str]:
    """Random digits, and numbers that start with 0 or with the country's national prefix (parse strips those)."""
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    starts = ["", "0", "00", "1"]
    if metadata is not None and metadata.national_prefix:
        starts.append(metadata.national_prefix)
    numbers = []
    for start in starts:
        for length in range(3, 16 - len(str(country_code))):
            rest = max(0, length - len(start))
            numbers.append((start + "".join(rng.choice(string.digits) for _ in range(rest)))[:length])
    if metadata is not None and metadata.mobile is not None and metadata.mobile.example_number:
        numbers.append(metadata.mobile.example_number)
    return numbers


def test_phone_fast_path_agrees_with_phonenumbers_for_every_calling_code() -> None:
    rng = random.Random(7)
    checked = 0
    for country_code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        for national in _national_numbers(country_code, rng):
            compact = f"+{country_code}{national}"
            if not 6 <= len(compact) - 1 <= 15:
                continue
            number = _library_parse(compact)
            assert _fast_parse(compact) == number, compact
            if not isinstance(number, str):
                assert is_valid_number(number) == phonenumbers.is_valid_number(number), compact
            assert _normalize(compact) == _library_normalize(compact), compact
            checked += 1
    for compact in ("+0447400123456", "+2999123456", "+8081234567", "+447400123456"):
        assert _fast_parse(compact) == _library_parse(compact), compact
    assert checked > 5000


def test_phone_fast_path_parses_common_mobile_numbers_itself(monkeypatch) -> None:
    expected = {n: phonenumbers.parse(n, None) for n in ("+447400123456", "+12125550123", "+4915112345678")}

    def no_parse(*_: object) -> None:
        raise AssertionError("fell back to phonenumbers.parse")

    monkeypatch.setattr(phonenumbers, "parse", no_parse)
    monkeypatch.setattr(phonenumbers, "format_number", no_parse)
    for compact, number in expected.items():
        assert _fast_parse(compact) == number
        assert normalize_phone(compact) == compact


def test_phone_validity_agrees_with_phonenumbers_on_every_region_s_example_numbers() -> None:
    valid = checked = 0
    for region in phonenumbers.SUPPORTED_REGIONS | {"001"}:
        codes = phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS if region == "001" else {None}
        for code in codes:
            metadata = (
                phonenumbers.PhoneMetadata.metadata_for_nongeo_region(code)
                if code is not None
                else phonenumbers.PhoneMetadata.metadata_for_region(region)
            )
            for kind in (*_NUMBER_TYPES, "general_desc"):
                desc = getattr(metadata, kind, None)
                if desc is None or not desc.example_number:
                    continue
                example = desc.example_number
                # The example itself, one digit changed, one added and one removed.
                for national in {example, example[:-1] + str((int(example[-1]) + 1) % 10), example + "5", example[:-1]}:
                    number = phonenumbers.PhoneNumber(country_code=metadata.country_code, national_number=int(national))
                    expected = phonenumbers.is_valid_number(number)
                    assert is_valid_number(number) == expected, (region, kind, national)
                    valid += expected
                    checked += 1
    assert checked > 4000 and valid > 1500


_NUMBER_TYPES = (
    "fixed_line",
    "mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "personal_number",
    "voip",
    "pager",
    "uan",
    "voicemail",
)


@settings(max_examples=2000)
@given(st.from_regex(r"\+[0-9]{6,15}", fullmatch=True))
def test_phone_fast_path_agrees_with_phonenumbers_on_any_digits(compact: str) -> None:
    number = _library_parse(compact)
    assert _fast_parse(compact) == number
    if not isinstance(number, str):
        assert is_valid_number(number) == phonenumbers.is_valid_number(number)
    assert _normalize(compact) == _library_normalize(compact)


@settings(max_examples=500)
@given(st.from_regex(r"\+\d{6,15}", fullmatch=True))
def test_phone_normalisation_agrees_with_phonenumbers_on_any_script_s_digits(compact: str) -> None:
    """The fast path reads ASCII digits only; parse reads other scripts' digits, and E.164 spells them in ASCII."""
    assert _normalize(compact) == _library_normalize(compact)


_KEY_TEXT = st.text(alphabet=st.sampled_from("ab1-_:%."), min_size=1, max_size=8)


@settings(max_examples=500)
@given(_KEY_TEXT, _KEY_TEXT, _KEY_TEXT)
def test_a_batch_s_claim_prefix_settles_the_claim_admission_took(workspace: str, instance: str, anonymous_id: str):
    """The settle writes each claim's key as the batch's prefix and the escaped ID: the key
    `Idempotency.key` (and so admission) gives it, whatever ':' or '%' the parts hold."""
    claims = Idempotency(ttl_seconds=3600)
    settled = WriteBatch()
    claims.queue_settle_all(settled, Idempotency.key(workspace, instance, ""), SENT, [(anonymous_id, "m1")])
    assert settled.keys == [Idempotency.key(workspace, instance, anonymous_id)]
    assert settled.args == ["X", 1, 3600, "s:m1"]
