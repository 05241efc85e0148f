"""Keys: IDs may hold ':', the separator of a key's parts, yet two IDs never make one key."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from libs.campaign_stats import campaign_key, instance_key
from libs.store import key_part, workspace_key
from services.dispatcher.guards import Idempotency
from services.resolver.configs import OAuthConfigStore

_PART = st.text(alphabet=st.sampled_from("ab:%3A5"), max_size=6)


@given(st.lists(_PART, min_size=1, max_size=4), st.lists(_PART, min_size=1, max_size=4))
def test_different_parts_make_different_keys(one: list[str], other: list[str]) -> None:
    if one != other and len(one) == len(other):
        assert workspace_key("ws", *one) != workspace_key("ws", *other)


def test_ids_that_once_shared_a_key_no_longer_do() -> None:
    assert campaign_key("ws", "a:i:b") != instance_key("ws", "a", "b:all")
    assert Idempotency.key("ws", "run:1", "x") != Idempotency.key("ws", "run", "1:x")
    assert f"{OAuthConfigStore.key('ws', 'x')}:status" != OAuthConfigStore.key("ws", "x:status")


def test_plain_ids_keep_the_keys_they_always_had() -> None:
    assert workspace_key("ws", "idem", "run-1", "customer.42") == "ts:{ws}:idem:run-1:customer.42"
    assert workspace_key("ws") == "ts:{ws}"
    assert key_part("a:b%c") == "a%3Ab%25c"
