"""No RPC repeats a contact it was wrongly given, in its error or in a log line.

Every RPC of the resolver and the dispatcher is called with each of its text fields (and each list of
texts) set to a canary's address or number: where an ID, a name or a code is wanted, that is bad
input, refused naming the field, never quoting the value. Neither the error's details, nor its rich
status in the trailers, nor the logs and spans may hold it.
"""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from tests.canary import canary_customers, hits
from tests.integration.test_leak_probe_harness import log_records, sinks

pytestmark = pytest.mark.integration


@pytest.fixture
def customers():
    return canary_customers(2)


# Valid values for the fields most requests share, so that the one field holding the contact is reached.
BASELINE = {
    "workspace_id": "brand",
    "connector_id": "sendgrid",
    "campaign_id": "spring",
    "campaign_instance_id": "run-1",
    "channel": 1,
    "name": "loyalty",
    "oauth_config_id": "brand-oauth",
    "test_anonymous_id": "canary-0",
    "requested_by": "dpo-1",
    "reason": "DSAR",
}


def baseline(request_class):
    request = request_class()
    for name, value in BASELINE.items():
        field = request_class.DESCRIPTOR.fields_by_name.get(name)
        if field is None or field.is_repeated:
            continue
        if (field.type == FieldDescriptor.TYPE_STRING and isinstance(value, str)) or (
            field.type == FieldDescriptor.TYPE_ENUM and isinstance(value, int)
        ):
            setattr(request, name, value)
    return request


def requests_with(request_class, value: str):
    """One request per text field of `request_class` (top level) holding `value`, the others valid."""
    for field in request_class.DESCRIPTOR.fields:
        if field.type != FieldDescriptor.TYPE_STRING:
            continue
        request = baseline(request_class)
        if field.is_repeated:
            getattr(request, field.name)[:] = [value]
        else:
            setattr(request, field.name, value)
        yield field.name, request


def contact_forms(people) -> set[str]:
    forms = set()
    for p in people.values():
        forms |= {p.email, p.email.lower(), p.phone, p.phone.lstrip("+")}
    return forms


async def test_no_rpc_repeats_a_contact_it_was_given(start_suite, customers, redis, captured_logs, tmp_path):
    people = customers
    async with sinks(tmp_path, "dispatcher") as probe:
        suite = await start_suite(telemetry=probe.telemetry["dispatcher"])
        errors: list[str] = []
        for stub, module, service in (
            (suite.dispatcher.stub, pb, "DispatcherService"),
            (suite.resolver.stub, rpb, "ResolverService"),
        ):
            for method in module.DESCRIPTOR.services_by_name[service].methods:
                if method.client_streaming:
                    continue
                request_class = getattr(module, method.input_type.name)
                for person in people.values():
                    for value in (person.email, person.phone):
                        for field_name, request in requests_with(request_class, value):
                            call = getattr(stub, method.name)
                            try:
                                if method.server_streaming:
                                    async for _ in call(request, timeout=5):
                                        break
                                else:
                                    await call(request, timeout=5)
                            except grpc.aio.AioRpcError as exc:
                                trailers = [(k, v) for k, v in (exc.trailing_metadata() or ())]
                                errors.append(f"{method.name}.{field_name}: {exc.code()} {exc.details()} {trailers}")
        probe.flush()
        spans = probe.spans()
    assert len(errors) > 100  # most of them are bad input
    forms = contact_forms(people)
    found = {
        "errors": [e for e in errors if hits(forms, [e])],
        "logs": hits(forms, log_records(captured_logs)),
        "spans": hits(forms, [spans]),
    }
    assert found == {"errors": [], "logs": [], "spans": []}, json.dumps(found, indent=1)
