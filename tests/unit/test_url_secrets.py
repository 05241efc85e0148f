"""Unit tests for secrets in URLs and query parameters: which values a read masks, and how a URL read back
(masked) and saved again gets its secrets back."""

from __future__ import annotations

import logging

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.connector_store import TEMPLATE_PLACEHOLDER, keep_masked_secrets, masked_connector
from libs.errors import InvalidArgument
from libs.masked_secrets import MASK, masked_url, restore_masked_url, secret_query_values
from libs.telemetry import ScrubbingFilter, scrub_value
from services.dispatcher.connectors.custom_http import PLACEHOLDER
from services.resolver.configs import keep_masked_secrets as keep_config_secrets
from services.resolver.configs import masked_pii_config
from services.resolver.requests import SINGLE_PLACEHOLDER
from services.resolver.validation import validate_pii_api_config

KEY = "url-s3cr3t-key-41"
GATEWAY = "https://gw.example.com"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # a value with no placeholder is a key, whatever its parameter is called
        (f"{GATEWAY}/send?api_key={KEY}", f"{GATEWAY}/send?api_key={MASK}"),
        (f"{GATEWAY}/send?k={KEY}&sig=abc", f"{GATEWAY}/send?k={MASK}&sig={MASK}"),
        # plain parameters and templates are shown
        (f"{GATEWAY}/send?from=Brand&Channel=sms&to=@to", f"{GATEWAY}/send?from=Brand&Channel=sms&to=@to"),
        (f"{GATEWAY}/send?key=@credentials.api_key&text=@text", f"{GATEWAY}/send?key=@credentials.api_key&text=@text"),
        (f"{GATEWAY}/send?flag=&to=@to", f"{GATEWAY}/send?flag=&to=@to"),
        (f"{GATEWAY}/send?to=@to_digits", f"{GATEWAY}/send?to=@to_digits"),
        # a bare `?<key>` is its own value
        (f"{GATEWAY}/send?{KEY}&to=@to", f"{GATEWAY}/send?{MASK}&to=@to"),
        # userinfo is always a secret
        (f"https://user:{KEY}@gw.example.com/send", f"https://{MASK}@gw.example.com/send"),
        (f"{GATEWAY}/send/@to", f"{GATEWAY}/send/@to"),  # an '@' in the path is no userinfo
        ("/sms/json?api_key=" + KEY, f"/sms/json?api_key={MASK}"),
    ],
)
def test_masked_url_shows_only_templates_and_plain_parameters(url: str, shown: str) -> None:
    assert masked_url(url, TEMPLATE_PLACEHOLDER) == shown


def test_a_placeholder_is_one_of_the_template_s_own() -> None:
    """`@tomorrow` is no `@to`: a value holding it is fixed text, masked."""
    assert masked_url(f"{GATEWAY}/send?day=@tomorrow", TEMPLATE_PLACEHOLDER) == f"{GATEWAY}/send?day={MASK}"
    assert masked_url(f"{GATEWAY}/send?id=@to", SINGLE_PLACEHOLDER) == f"{GATEWAY}/send?id={MASK}"


@pytest.mark.parametrize(
    "value",
    [
        "@to",
        "+@to",
        "@to_x",
        "@to_digits",
        "@to_digitsx",
        "@tomato",
        "@sender",
        "@credentials.key_1",
        "@credentials.",
        "@message_id",
        "@text!",
    ],
)
def test_the_masking_placeholders_are_the_custom_connector_s(value: str) -> None:
    assert bool(TEMPLATE_PLACEHOLDER.search(value)) == bool(PLACEHOLDER.search(value))


def test_secret_query_values_are_what_the_mask_hides() -> None:
    url = f"https://user:pw-{KEY}@gw.example.com/send?api_key={KEY}&from=Brand&{KEY}x&to=@to"
    assert secret_query_values(url, TEMPLATE_PLACEHOLDER) == [f"user:pw-{KEY}", KEY, f"{KEY}x"]


def restored(new: str, saved: str, moved: str = "") -> str:
    return restore_masked_url(new, saved, masked_url(saved, TEMPLATE_PLACEHOLDER), "connector.custom_http.url", moved)


def test_a_url_read_back_keeps_its_secrets_by_parameter_name() -> None:
    saved = f"{GATEWAY}/send?api_key={KEY}&k=second-{KEY}&k=third-{KEY}&to=@to"
    assert restored(masked_url(saved, TEMPLATE_PLACEHOLDER), saved) == saved
    # Edited (another path, a parameter added, a value entered anew): each mask keeps its own value.
    edited = f"{GATEWAY}/v2/send?region=eu&k={MASK}&api_key={MASK}&k=new&to=@to"
    assert restored(edited, saved) == f"{GATEWAY}/v2/send?region=eu&k=second-{KEY}&api_key={KEY}&k=new&to=@to"
    assert restored(f"{GATEWAY}/send?{MASK}", f"{GATEWAY}/send?{KEY}") == f"{GATEWAY}/send?{KEY}"


@pytest.mark.parametrize(
    ("new", "moved", "says"),
    [
        (f"{GATEWAY}/send?token={MASK}", "", "the saved URL does not"),  # no saved `token`
        (f"{GATEWAY}/send?api_key={MASK}&api_key={MASK}", "", "the saved URL does not"),  # one saved, two masks
        (f"{GATEWAY}/send/{MASK}?to=@to", "", "the saved URL does not"),
        ("https://collector.example.net/send?api_key=" + MASK, "it points at another host", "it points at another"),
    ],
)
def test_a_mask_with_no_saved_value_behind_it_or_sent_elsewhere_is_refused(new: str, moved: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        restored(new, f"{GATEWAY}/send?api_key={KEY}", moved)
    assert caught.value.field == "connector.custom_http.url"
    assert says in caught.value.description and "enter it" in caught.value.description
    assert KEY not in caught.value.message


def custom_connector(url: str, body: str = "", **fields: object) -> pb.Connector:
    return pb.Connector(
        workspace_id="ws-1",
        connector_id="gw",
        kind=pb.CONNECTOR_KIND_CUSTOM_HTTP,
        channel=common_pb2.CHANNEL_SMS,
        credentials={"api_secret": f"cred-{KEY}"},
        custom_http=pb.CustomHttpTemplate(method="POST", url=url, headers={"X-Auth": "h"}, body=body),
        **fields,  # type: ignore[arg-type]
    )


def test_a_connector_reads_back_without_its_url_secrets_and_saved_back_keeps_them() -> None:
    saved = custom_connector(
        f"{GATEWAY}/send?api_key={KEY}&from=Brand&to=@to", body=f'{{"key": "{KEY}", "secret": "cred-{KEY}"}}'
    )
    shown = masked_connector(saved)
    assert shown.custom_http.url == f"{GATEWAY}/send?api_key={MASK}&from=Brand&to=@to"
    assert shown.custom_http.body == f'{{"key": "{MASK}", "secret": "{MASK}"}}'  # a secret written again
    assert KEY not in str(shown)
    keep_masked_secrets(shown, saved)
    assert shown == saved


def test_a_connector_s_masked_url_secret_is_never_sent_to_another_host() -> None:
    saved = custom_connector(f"{GATEWAY}/send?api_key={KEY}&to=@to")
    edited = masked_connector(saved)
    edited.custom_http.url = edited.custom_http.url.replace(GATEWAY, "https://collector.example.net")
    edited.credentials["api_secret"], edited.custom_http.headers["X-Auth"] = "entered", "entered"
    with pytest.raises(InvalidArgument) as caught:
        keep_masked_secrets(edited, saved)
    assert caught.value.field == "connector.custom_http.url"
    assert "another host" in caught.value.description


def test_a_connector_of_another_kind_reads_back_without_a_template() -> None:
    """Set on a SendGrid connector, an empty template would refuse its save back."""
    sendgrid = pb.Connector(kind=pb.CONNECTOR_KIND_SENDGRID, credentials={"api_key": KEY})
    shown = masked_connector(sendgrid)
    keep_masked_secrets(shown, sendgrid)
    assert not shown.HasField("custom_http") and shown.credentials["api_key"] == KEY


def pii_config(**fields: object) -> rpb.PiiApiConfig:
    values: dict[str, object] = dict(
        workspace_id="ws-1",
        channel=common_pb2.CHANNEL_EMAIL,
        mode=rpb.MODE_SINGLE,
        method=rpb.HTTP_METHOD_GET,
        url=f"https://pii.example.com/v1/customers?key={KEY}&fields=email",
        query_params={"id": "@anonymous_id", "token": f"q-{KEY}", "format": "json", "t": "1"},
        contact_path="email",
        timeout_ms=1000,
        max_retries=0,
    )
    values.update(fields)
    return rpb.PiiApiConfig(**values)  # type: ignore[arg-type]


def test_a_pii_api_config_masks_secret_query_values_and_shows_plain_ones() -> None:
    saved = pii_config()
    shown = masked_pii_config(saved)
    assert shown.url == f"https://pii.example.com/v1/customers?key={MASK}&fields=email"
    assert dict(shown.query_params) == {"id": "@anonymous_id", "token": MASK, "format": "json", "t": MASK}
    shown.url = shown.url.replace("/v1/", "/v2/")  # edited on the same host: the key stays
    keep_config_secrets(shown, saved)
    assert shown.url == f"https://pii.example.com/v2/customers?key={KEY}&fields=email"
    assert shown.query_params["token"] == f"q-{KEY}"


@pytest.mark.parametrize("name", ["api_key=" + KEY, "a&b", "?key", "a b", "k#"])
def test_a_query_parameter_name_holding_a_pasted_pair_is_refused_without_echoing_it(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_pii_api_config(pii_config(query_params={name: "v", "id": "@anonymous_id"}), allow_private=False)
    assert caught.value.field == "config.query_params"
    assert name not in caught.value.message


def test_log_records_and_span_attributes_carry_no_url_query_value() -> None:
    text = f"ClientResponseError: 500, url=URL('{GATEWAY}/send?api_key={KEY}&{KEY}b&to=%2B447700900123')"
    record = logging.LogRecord("aiohttp.client", logging.ERROR, __file__, 1, "%s", (text,), None)
    ScrubbingFilter().filter(record)
    for scrubbed in (record.getMessage(), scrub_value("exception.message", text, ())):
        assert KEY not in scrubbed and "447700900123" not in scrubbed
        assert f"{GATEWAY}/send?api_key=?&?&to=?" in scrubbed


@pytest.mark.parametrize(
    ("field", "entries"),
    [
        ("query_params", {f"api_key={KEY}": MASK}),  # a pair pasted whole as the name, its value masked
        ("headers", {f"Authorization: Bearer {KEY}": MASK}),
    ],
)
def test_a_masked_entry_whose_name_holds_a_secret_is_refused_without_echoing_it(field: str, entries: dict) -> None:
    with pytest.raises(InvalidArgument) as caught:
        keep_config_secrets(pii_config(**{field: entries}), None, "config")
    assert caught.value.field == f"config.{field}"
    assert KEY not in str(caught.value)
    named = pii_config(**{field: {"X-Key": MASK}})
    with pytest.raises(InvalidArgument) as caught:  # a plain name is still named
        keep_config_secrets(named, None, "config")
    assert caught.value.field == f"config.{field}['X-Key']"
