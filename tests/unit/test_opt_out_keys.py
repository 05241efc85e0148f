"""Pure pieces of opting out: keywords, unsubscribe tokens, the phone-number blind index, derived keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import time

import fakeredis
import phonenumbers
import pytest
from pydantic import SecretStr

from libs.blind_index import BlindIndex, normalize_number, sent_number, spellings, whatsapp_spellings
from libs.derived_keys import derive_key, master_keys
from libs.errors import InvalidArgument
from libs.opt_out import (
    ALWAYS_STOP,
    DEFAULT_START,
    DEFAULT_STOP,
    START,
    Keywords,
    KeywordStore,
    clean_keywords,
    normalize,
)
from libs.unsubscribe import (
    PURPOSE,
    InvalidToken,
    UnsubscribeTokens,
    list_unsubscribe_headers,
    list_unsubscribe_headers_signed,
)
from services.resolver.contacts import normalize_phone


def key() -> SecretStr:
    return SecretStr(base64.urlsafe_b64encode(os.urandom(32)).decode())


@pytest.mark.parametrize(
    ("body", "action"),
    [
        ("STOP", "stop"),
        ("stop", "stop"),
        ("  Stop.  ", "stop"),
        ("Arrêt", "stop"),
        ("¡ALTO!", "stop"),
        ("parar", "stop"),
        ("unsubscribe", "stop"),
        ("START", "start"),
        ("unstop", "start"),
        ("Yes", "start"),
        ("STOP please", None),
        ("please stop", None),
        ("", None),
        ("STOP" * 100, None),
        ("Stopped", None),
        ("Stop  promotions", "stop"),
        ("STOP" + " " * 130, "stop"),  # padding is trimmed before the length is checked
        ("\n" * 200 + "start\n", "start"),
    ],
)
def test_a_message_matches_only_when_it_is_exactly_a_keyword(body, action):
    assert Keywords().classify(body) == action


def test_defaults_cover_several_languages_and_never_overlap():
    for word in ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "ARRET", "ALTO", "PARAR"):
        assert word in DEFAULT_STOP
    for word in ("START", "UNSTOP", "YES"):
        assert word in DEFAULT_START
    assert not set(DEFAULT_STOP) & set(DEFAULT_START)


def test_keywords_are_normalised_and_checked():
    cleaned = clean_keywords(["halt", "Halt!", "Arrête", " stop   promotions "], "stop")
    assert cleaned == ("HALT", "ARRETE", "STOP PROMOTIONS")
    assert normalize(" ¿Sí? ") == "SI"
    with pytest.raises(InvalidArgument) as caught:
        clean_keywords(["five words are too many"], "keywords.stop_keywords")
    assert caught.value.field == "keywords.stop_keywords[0]"
    with pytest.raises(InvalidArgument):
        clean_keywords([f"W{i}" for i in range(51)], "stop")


def test_unsubscribe_tokens_round_trip_and_are_deterministic():
    tokens = UnsubscribeTokens(key())
    expires = int(time.time()) + 3600
    token = tokens.sign("brand", "0f" * 16, expires)
    assert token == tokens.sign("brand", "0f" * 16, expires)  # the archive rebuilds the same header
    request = tokens.verify(token)
    assert (request.workspace_id, request.message_id, request.expires_at) == ("brand", "0f" * 16, expires)
    assert token.replace("-", "").replace("_", "").isalnum()  # safe in a URL path as is


def test_a_batch_s_signer_gives_each_message_the_token_of_the_documented_format():
    """Links already sent must keep verifying: the payload is the expiry, the workspace's length, the
    workspace and the message ID, followed by the first 16 bytes of its HMAC-SHA256."""
    secret = key()
    tokens = UnsubscribeTokens(secret)
    expires = int(time.time()) + 3600
    sign = tokens.signer("brand", expires)
    mac_key = derive_key(master_keys(secret)[0], PURPOSE)
    for message_id in ("0f" * 16, "m1", "a" * 128):
        payload = struct.pack(">IB", expires, 5) + b"brand" + message_id.encode()
        mac = hmac.new(mac_key, payload, hashlib.sha256).digest()[:16]
        expected = base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()
        assert sign(message_id) == tokens.sign("brand", message_id, expires) == expected
        assert tokens.verify(expected).message_id == message_id


def test_tampered_foreign_and_expired_tokens_are_refused():
    tokens = UnsubscribeTokens(key())
    token = tokens.sign("brand", "ab" * 16, int(time.time()) + 60)
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    for bad in (flipped, token[:-2], "", "x" * 600, "not-a-token", UnsubscribeTokens(key()).sign("brand", "m1", 2**31)):
        with pytest.raises(InvalidToken) as caught:
            tokens.verify(bad)
        assert not caught.value.expired
    with pytest.raises(InvalidToken) as caught:
        tokens.verify(tokens.sign("brand", "m1", int(time.time()) - 1))
    assert caught.value.expired


def test_tokens_signed_before_a_key_rotation_still_verify():
    old, new = key(), key()
    token = UnsubscribeTokens(old).sign("brand", "m1", int(time.time()) + 60)
    rotating = UnsubscribeTokens(SecretStr(f"{new.get_secret_value()},{old.get_secret_value()}"))
    assert rotating.verify(token).message_id == "m1"
    assert UnsubscribeTokens(new).sign("brand", "m1", 5) == rotating.sign("brand", "m1", 5)  # the first key signs


def test_list_unsubscribe_headers_follow_rfc_8058():
    headers = list_unsubscribe_headers("https://hooks.example/base/", "TOKEN")
    assert headers == {
        "List-Unsubscribe": "<https://hooks.example/base/unsubscribe/TOKEN>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def test_a_batch_s_headers_are_those_of_each_message_s_own_token() -> None:
    tokens = UnsubscribeTokens(key())
    expires = int(time.time()) + 3600
    sign = tokens.signer("brand", expires)
    headers = list_unsubscribe_headers_signed("https://hooks.example/base/", sign)
    made = [(message_id, headers(message_id)) for message_id in (f"{n:032x}" for n in range(200))]
    for message_id, message_headers in made:
        assert message_headers == list_unsubscribe_headers("https://hooks.example/base/", sign(message_id))
        assert tokens.verify(message_headers["List-Unsubscribe"][:-1].rpartition("/")[2]).message_id == message_id
    # Base64's "+" and "/" come out URL-safe, as "-" and "_" (200 MACs hold both).
    links = "".join(h["List-Unsubscribe"] for _, h in made)
    assert "-" in links.partition("unsubscribe/")[2] and "_" in links and "+" not in links


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("+447400123456", "+447400123456"),
        ("447400123456", "+447400123456"),
        ("whatsapp:+14155550100", "+14155550100"),
        ("+1 415 555 0100", "+14155550100"),
        ("not a number", None),
        ("", None),
    ],
)
def test_numbers_are_normalised_as_providers_send_them(raw, e164):
    assert normalize_number(raw) == e164


def test_a_sent_number_keys_the_index_as_a_stop_reply_from_it_will():
    # The dispatcher takes the resolver's E.164 as it is; a STOP reply's number goes through
    # normalize_number. Both must give the same text, for every region's numbers.
    checked = 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            international = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
            from_resolver = normalize_phone(international)
            assert sent_number(from_resolver) == normalize_number(from_resolver) == from_resolver
            checked += 1
    assert checked > 400
    assert sent_number("whatsapp:+14155550100") == "+14155550100"  # anything else is normalised
    assert sent_number("not a number") is None


@pytest.mark.parametrize(
    ("wa_id", "forms"),
    [
        # Brazil's mobiles: WhatsApp may drop the ninth digit, or a number may be known without it.
        ("5511987654321", ["+5511987654321", "+551187654321"]),
        ("551187654321", ["+551187654321", "+5511987654321"]),
        ("whatsapp:+552199876543", ["+552199876543", "+5521999876543"]),  # eight digits starting 9
        ("551133334444", ["+551133334444"]),  # a landline (2-5): no ninth digit ever
        # A mobile issued with its ninth digit (9 then 1-5) never had an eight-digit form: without the
        # nine it is a landline's number, someone else's.
        ("5511934567890", ["+5511934567890"]),
        ("5521912345678", ["+5521912345678"]),
        # Mexico's: WhatsApp may keep the "1" once dialled before a mobile, which phonenumbers refuses.
        ("5215512345678", ["+5215512345678", "+525512345678"]),
        ("+525512345678", ["+525512345678", "+5215512345678"]),
        # Argentina's: WhatsApp writes a mobile with the "9" after 54, a number may be stored without it.
        ("5491123456789", ["+5491123456789", "+541123456789"]),
        ("541123456789", ["+541123456789", "+5491123456789"]),
        ("whatsapp:+5493514567890", ["+5493514567890", "+543514567890"]),
        ("548001234567", ["+548001234567"]),  # toll-free: no mobile has its digits
        ("5496001234567", ["+5496001234567"]),  # no area code 600: not a mobile's shape
        ("549112345678", ["+549112345678"]),  # a digit short of a mobile
        ("447400123456", ["+447400123456"]),
        ("not a number", []),
    ],
)
def test_a_whatsapp_sender_is_looked_up_under_each_spelling_of_its_number(wa_id, forms):
    assert whatsapp_spellings(wa_id) == forms


def test_only_whatsapp_senders_have_other_spellings():
    """An SMS sender is the number as the carrier routes it: one spelling."""
    assert spellings("sms", "+5511987654321") == ["+5511987654321"]
    assert spellings("sms", "+5215512345678") == []
    assert spellings("whatsapp", "+5511987654321") == ["+5511987654321", "+551187654321"]


def test_blind_index_digests_are_keyed_per_workspace_and_never_the_plain_hash():
    secret = key()
    index = BlindIndex(None, secret)  # type: ignore[arg-type]  # digests need no Redis
    number = "+447400123456"
    digest = index.digest("brand", number)
    assert digest == BlindIndex(None, secret).digest("brand", number)  # every service derives the same key
    assert digest != index.digest("other-brand", number)
    assert digest != BlindIndex(None, key()).digest("brand", number)
    assert digest not in {hashlib.sha256(v.encode()).hexdigest() for v in (number, number[1:])}
    assert number not in digest and number[1:] not in digest


@pytest.mark.parametrize(
    ("body", "action"),
    [
        ("STOP ALL", "stop"),
        ("stop-all", "stop"),
        ("Opt out", "stop"),  # the FCC's own wording of a revocation
        ("opt-out", "stop"),
        ("OPT_OUT!", "stop"),
        ("Un-subscribe", "stop"),
        ("stop promotions", "stop"),
        ("Stop-Promotions", "stop"),
        ("un stop", "start"),
        ("S.T.A.R.T", "start"),
        ("stop stop", None),
        ("stop all of it", None),
    ],
)
def test_a_keyword_written_with_spaces_or_hyphens_between_its_letters_still_matches(body, action):
    assert Keywords().classify(body) == action


async def test_a_start_keyword_that_is_a_stop_keyword_spelled_apart_is_refused():
    store = KeywordStore(fakeredis.FakeAsyncRedis())
    with pytest.raises(InvalidArgument) as caught:
        await store.save("brand", (), clean_keywords(["Opt Out"], "keywords.start_keywords"))
    assert caught.value.field == "keywords" and "OPT OUT" in caught.value.description


ALWAYS_STOPPING = ("STOP", "Quit", "end", "Revoke", "opt out", "Cancel", "unsubscribe", "Stop all", "Arrêt")


async def test_the_words_carriers_and_the_fcc_require_always_stop_whatever_a_workspace_saves():
    """A workspace's STOP list adds to STOP, QUIT, END, REVOKE, OPT OUT, CANCEL, UNSUBSCRIBE, STOPALL
    and ARRET (Canada's carriers require it beside STOP); it replaces only the other defaults."""
    store = KeywordStore(fakeredis.FakeAsyncRedis())
    saved = await store.save("brand", clean_keywords(["halt", "Basta"], "keywords.stop_keywords"), ())
    for keywords in (saved, await store.load("brand")):
        assert [keywords.classify(body) for body in ALWAYS_STOPPING] == ["stop"] * len(ALWAYS_STOPPING)
        assert keywords.classify("Halt!") == keywords.classify("basta") == "stop"
        assert keywords.classify("Alto") is None  # a default the workspace left out
        assert keywords.stop[:9] == ALWAYS_STOP and keywords.stop[9:] == ("HALT", "BASTA")
        assert keywords.start == DEFAULT_START


async def test_a_list_saved_without_stop_before_it_was_always_on_still_stops():
    redis = fakeredis.FakeAsyncRedis()
    # Saved when a workspace could drop STOP, and then make it a START keyword.
    await redis.hset(KeywordStore.key("brand"), mapping={"stop": '["HALT"]', "start": '["STOP", "GO"]'})
    keywords = await KeywordStore(redis).load("brand")
    assert keywords.classify("STOP") == keywords.classify("halt") == "stop"
    assert keywords.start == ("GO",)  # what a read shows is what acts
    assert Keywords(stop=("HALT",)).classify("unsubscribe") == "stop"


def test_the_always_on_words_lead_the_defaults_and_are_listed_once():
    assert DEFAULT_STOP[: len(ALWAYS_STOP)] == ALWAYS_STOP
    assert set(ALWAYS_STOP) == {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "ARRET"}
    # A workspace that names an always-on word, spelled apart or not, gets it once.
    assert Keywords(stop=("OPT OUT", "STOP", "HALT")).stop == (*ALWAYS_STOP, "HALT")


@pytest.mark.parametrize("word", ["Stop", "Opt Out", "S T O P", "Un subscribe", "Revoke!", "Arrêt"])
def test_a_start_keyword_that_always_stops_is_refused_naming_it(word):
    with pytest.raises(InvalidArgument) as caught:
        clean_keywords(["go", "go", word], "keywords.start_keywords", kind=START)
    assert caught.value.field == "keywords.start_keywords[2]"  # its place in the request, duplicates counted
    assert "always" in caught.value.description
    assert clean_keywords(["Go", "Opt in"], "keywords.start_keywords", kind=START) == ("GO", "OPT IN")


def test_the_always_on_words_do_not_count_against_a_workspace_s_fifty():
    # What GetOptOutKeywords answers can be sent back as it is.
    own = [f"HALT{i}" for i in range(50)]
    assert clean_keywords([*ALWAYS_STOP, *own], "keywords.stop_keywords") == (*ALWAYS_STOP, *own)
    with pytest.raises(InvalidArgument):
        clean_keywords([*ALWAYS_STOP, *own, "HALT50"], "keywords.stop_keywords")
