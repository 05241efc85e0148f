"""`tokensend test-pii-api`: one call to a PII API with a saved or an unsaved config, contacts masked."""

from __future__ import annotations

import argparse

from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from cli import flags
from cli.commands.config import read_documents
from cli.documents import PII_API, DocumentError, enum_short_name
from cli.exits import FAILED, OK, UsageError
from cli.flags import HelpFormatter
from cli.rpc import RESOLVER, Connection, add_client_options
from libs.masking import mask_contact, mask_name

EPILOG = """\
The contact and the attributes are masked (j***@e***.com, J***) and the reply
body is not shown unless --show-pii is given: what a PII API returns is a
customer's personal data.

examples:
  tokensend test-pii-api examples/pii-api-bulk-oauth.yaml --id cust-000001
  tokensend test-pii-api --workspace demo --channel sms --id cust-000001"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "test-pii-api",
        help="call a PII API once for a test ID (the 'Test' button)",
        description="Call a PII API once for one anonymous ID, with a config from a file (unsaved) or a saved one, "
        "and show the HTTP status, the reply's keys (to pick contact_path) and the contact, masked.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "file", nargs="?", metavar="FILE", help="YAML with pii-api configs; without it, test the saved config"
    )
    parser.add_argument(
        "--id", required=True, dest="anonymous_id", type=flags.anonymous_id, metavar="ANON_ID", help="the anonymous ID"
    )
    parser.add_argument("--workspace", metavar="W", help="workspace (required without FILE; fills in FILE's)")
    parser.add_argument(
        "--channel", type=flags.channel, help=f"channel ({', '.join(flags.CHANNELS)}); picks a config from FILE"
    )
    parser.add_argument(
        "--version", type=flags.non_negative_int, default=0, help="saved config version (default: latest)"
    )
    parser.add_argument("--show-pii", action="store_true", help="print the contact, attributes and reply body unmasked")
    add_client_options(parser, RESOLVER)
    parser.set_defaults(handler=run)


def _family(channel: int) -> int:
    return common_pb2.CHANNEL_SMS if channel in (common_pb2.CHANNEL_MMS, common_pb2.CHANNEL_RCS) else channel


def requests(args: argparse.Namespace) -> list[tuple[str, rpb.TestPiiApiConfigRequest]]:
    if args.file is None:
        if not args.workspace or args.channel is None:
            raise UsageError("test-pii-api: give a FILE, or --workspace and --channel to test the saved config")
        saved = rpb.TestPiiApiConfigRequest.SavedConfig(
            workspace_id=args.workspace, channel=args.channel, version=args.version
        )
        label = f"saved pii-api {args.workspace}/{enum_short_name(common_pb2.Channel.DESCRIPTOR, args.channel)}"
        return [(label, rpb.TestPiiApiConfigRequest(saved=saved, test_anonymous_id=args.anonymous_id))]
    if args.version:
        raise UsageError("test-pii-api: --version picks a saved config; a FILE is tested as it is written")
    held = read_documents([args.file], PII_API, args.workspace, kinds=[PII_API])
    documents = [doc for doc in held if args.channel is None or _family(doc.message.channel) == _family(args.channel)]
    if not documents:
        if args.channel is None:
            raise DocumentError(f"{args.file}: holds no pii-api config")
        channels = ", ".join(enum_short_name(common_pb2.Channel.DESCRIPTOR, doc.message.channel) for doc in held)
        raise DocumentError(
            f"{args.file}: holds no pii-api config for that channel (--channel "
            f"{enum_short_name(common_pb2.Channel.DESCRIPTOR, args.channel)}; it holds {channels})"
        )
    return [
        (doc.label, rpb.TestPiiApiConfigRequest(config=doc.message, test_anonymous_id=args.anonymous_id))
        for doc in documents
    ]


def render(label: str, anonymous_id: str, reply: rpb.TestPiiApiConfigResponse, show_pii: bool) -> list[str]:
    lines = [f"{label}, anonymous ID {anonymous_id}:"]
    status = f"HTTP {reply.http_status}" if reply.http_status else "no HTTP answer"
    lines.append(f"  status         {status} ({reply.latency_ms} ms)")
    if reply.HasField("error"):
        error = reply.error
        code = rpb.ResolveErrorCode.Name(error.code).removeprefix("RESOLVE_ERROR_CODE_")
        detail = f" [{error.detail}]" if error.detail else ""
        # The resolver's message says "after N attempts" when it retried: the count is not repeated then.
        said = "attempts" in error.message or "attempts" in error.detail
        tries = "" if said else f" ({error.attempts} attempt{'' if error.attempts == 1 else 's'})"
        lines.append(f"  error          {code}: {error.message}{detail}{tries}")
    if reply.contact:
        lines.append(f"  contact        {reply.contact if show_pii else mask_contact(reply.contact)}")
    if reply.attributes:
        shown = (
            f"{name}={reply.attributes[name] if show_pii else mask_name(reply.attributes[name])}"
            for name in sorted(reply.attributes)
        )
        lines.append(f"  attributes     {'  '.join(shown)}")
    if reply.response_keys:
        lines.append(f"  response keys  {reply.response_keys[0]}")
        lines += [f"                 {key}" for key in reply.response_keys[1:]]
    if show_pii and reply.response_body:
        lines.append("  response body")
        lines += [f"    {line}" for line in reply.response_body.splitlines()]
    return lines


def run(args: argparse.Namespace) -> int:
    exit_code = OK
    with Connection.open(RESOLVER, args) as connection:
        stub = connection.stub(rpb_grpc.ResolverServiceStub)
        for label, request in requests(args):
            reply = connection.call(stub.TestPiiApiConfig, request)
            print("\n".join(render(label, args.anonymous_id, reply, args.show_pii)))
            if reply.HasField("error") or not reply.contact:
                exit_code = FAILED
    return exit_code
