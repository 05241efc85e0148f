"""Redis's replies that mean "not now" are store errors (UNAVAILABLE, 503: retry later), whichever parser reads them."""

from __future__ import annotations

import pytest
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser
from redis.exceptions import ResponseError

from libs.store import STORE_ERRORS

RETRY_LATER = [
    "NOREPLICAS Not enough good replicas to write.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. Commands that "
    "may modify the data set are disabled, because this instance is configured to report errors during writes if "
    "RDB snapshotting fails (stop-writes-on-bgsave-error option). Please check the Redis logs for details about the "
    "RDB error.",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)",
    # From a write in a script, which says so after Redis's own text.
    "NOREPLICAS Not enough good replicas to write. script: 2dc6a2806cfbef84960e763005eb136b02ebea15, on @user_script:1",
]
OURS_TO_FIX = [
    "BUSYKEY Target key name already exists.",
    "ERR syntax error",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "NOSCRIPTS is not a reply",
]


@pytest.mark.parametrize("parser", [_AsyncHiredisParser, _AsyncRESP2Parser])
@pytest.mark.parametrize("reply", RETRY_LATER)
def test_replies_that_mean_not_now_are_store_errors(parser, reply):
    error = parser.parse_error(reply)
    assert isinstance(error, STORE_ERRORS) and isinstance(error, ResponseError)
    assert str(error) == reply.split(" ", 1)[1]  # as redis-py words its own: the text after the code


@pytest.mark.parametrize("reply", OURS_TO_FIX)
def test_other_error_replies_stay_what_they_were(reply):
    error = _AsyncRESP2Parser.parse_error(reply)
    assert type(error) is ResponseError
    assert not isinstance(error, STORE_ERRORS)
