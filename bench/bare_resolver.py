"""The bare resolver: a plain gRPC server doing only what a `ResolveContacts` call cannot avoid.

The resolver-overhead section calls it beside the resolver, so that the resolver's overhead can be
read against what Python's gRPC server and HTTP client cost on the same machine at the same moment.
Per call: one PII API request (a GET for one ID, one bulk POST for several, with an OAuth token
fetched once at start), the JSON parsed, and the reply's protobuf built from the benchmark's own
paths (the overhead workspace's: one ID is SMS, `customer.phone`; several are Email, `data.results`
by `id`, `email`). No config lookup, validation, tainting, retries, circuit breaker, limits, spans
or metrics. It runs on uvloop with the services' garbage-collector settings, as they do:

    python -m bench.bare_resolver --port 50999 --pii-api http://127.0.0.1:8090
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import grpc
import orjson
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as pb_grpc

from bench.baseline import pii_api_token
from libs.server import loop_factory, tune_gc

NOT_FOUND = pb.ResolveError(code=pb.RESOLVE_ERROR_CODE_NOT_FOUND, message="not found")


class BareResolver(pb_grpc.ResolverServiceServicer):
    def __init__(self, http: aiohttp.ClientSession, pii_api: str, token: str) -> None:
        self._http = http
        self._pii_api = pii_api
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def ResolveContacts(  # noqa: N802 - the gRPC method's name
        self, request: pb.ResolveContactsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveContactsResponse:
        ids = list(request.anonymous_ids)
        if request.channel != common_pb2.CHANNEL_EMAIL and len(ids) == 1:
            async with self._http.get(f"{self._pii_api}/v1/customers/{ids[0]}", headers=self._headers) as reply:
                customer = orjson.loads(await reply.read()).get("customer")
            records = {ids[0]: customer} if customer else {}
            contact_field, names = "phone", ("first_name",)
        else:
            body = orjson.dumps({"ids": ids})
            async with self._http.post(
                f"{self._pii_api}/v1/customers:batchGet", data=body, headers=self._headers
            ) as reply:
                document = orjson.loads(await reply.read())
            records = {r["id"]: r for r in document["data"]["results"]}
            contact_field, names = "email", ("first_name", "last_name")
        response = pb.ResolveContactsResponse()
        for anonymous_id in ids:
            record = records.get(anonymous_id)
            if record is None:
                response.contacts.add(anonymous_id=anonymous_id, error=NOT_FOUND)
                continue
            contact = response.contacts.add(anonymous_id=anonymous_id, contact=record[contact_field])
            profile = record.get("profile") or {}
            for name in names:
                if name in profile:
                    contact.attributes[name] = profile[name]
        return response


async def serve(port: int, pii_api: str) -> None:
    async with aiohttp.ClientSession() as http:
        token = await pii_api_token(http, pii_api)
        server = grpc.aio.server()
        pb_grpc.add_ResolverServiceServicer_to_server(BareResolver(http, pii_api, token), server)
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        tune_gc()
        await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_resolver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pii-api", required=True, help="the sample PII API's base URL")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
        runner.run(serve(args.port, args.pii_api.rstrip("/")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
