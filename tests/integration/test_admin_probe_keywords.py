"""Opt-out keyword RPCs probed as an operator with grpcurl would: a keyword holding what no customer's reply
could match is refused naming its entry, and the list in force is kept."""

from __future__ import annotations

import grpc
import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

pytestmark = pytest.mark.integration


def put(stub, stop=(), start=()):
    return stub.PutOptOutKeywords(
        pb.PutOptOutKeywordsRequest(
            workspace_id="probe", keywords=pb.OptOutKeywords(stop_keywords=stop, start_keywords=start)
        )
    )


@pytest.mark.parametrize(
    ("stop", "start", "field"),
    [
        (["HALT", "\x00HALT NOW"], [], "keywords.stop_keywords[1]"),
        (["HALT\x7f"], [], "keywords.stop_keywords[0]"),
        (["HALT"], ["GO\x1b"], "keywords.start_keywords[0]"),
        (["HALT"], ["GO", "\x01"], "keywords.start_keywords[1]"),
    ],
)
async def test_a_keyword_with_a_control_character_is_refused_and_the_saved_list_kept(
    start_dispatcher, stop, start, field
):
    dispatcher = await start_dispatcher()
    saved = await put(dispatcher.stub, ["PAUSE"], ["GO ON"])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await put(dispatcher.stub, stop, start)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(f"{field}: ")
    now = await dispatcher.stub.GetOptOutKeywords(pb.GetOptOutKeywordsRequest(workspace_id="probe"))
    assert now.keywords == saved.keywords


async def test_keywords_with_spaces_and_punctuation_around_them_are_still_saved(start_dispatcher):
    dispatcher = await start_dispatcher()
    reply = await put(dispatcher.stub, [" Halt. ", "halt  now"], ["Go on!"])
    assert "HALT" in reply.keywords.stop_keywords and list(reply.keywords.start_keywords) == ["GO ON"]
