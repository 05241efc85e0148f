"""`tokensend send-test`: one test message to one anonymous ID, with the PII API's error in full."""

from __future__ import annotations

import argparse

from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from cli import flags
from cli.documents import DocumentError, enum_short_name, load_mappings, parse_message, read_text
from cli.exits import FAILED, OK
from cli.flags import HelpFormatter
from cli.rpc import DISPATCHER, Connection, add_client_options

EPILOG = """\
The content file maps onto the Content message: subject, html_body, text_body
(email), sms_body, media_urls (MMS only), whatsapp_template {name, language,
params} (WhatsApp). Text fields are Jinja2 templates: fetched attributes by
name ({{ first_name }}), the recipient's own under 'recipient'
({{ recipient.tier }}).

example:
  tokensend send-test --workspace demo --campaign welcome --channel email \\
      --connector sendgrid --id cust-000001 --content examples/content-email.yaml --attr tier=gold"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "send-test",
        help="send one test message to one anonymous ID",
        description="Send one test message (not counted in the campaign's stats) and print the result; "
        "when the contact could not be fetched, also the PII API's status and (scrubbed) answer.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--workspace", required=True, metavar="W", help="the workspace ID")
    parser.add_argument("--campaign", required=True, metavar="C", help="the campaign being tested")
    parser.add_argument("--channel", required=True, type=flags.channel, help=", ".join(flags.CHANNELS))
    parser.add_argument("--connector", required=True, metavar="ID", help="the connector to send through")
    parser.add_argument(
        "--id", required=True, dest="anonymous_id", type=flags.anonymous_id, metavar="ANON_ID", help="the anonymous ID"
    )
    parser.add_argument("--content", required=True, metavar="FILE", help="YAML with the message content")
    parser.add_argument(
        "--attr",
        action="append",
        type=flags.key_value,
        default=[],
        metavar="NAME=VALUE",
        help="a recipient attribute, {{ recipient.NAME }} (repeatable)",
    )
    parser.add_argument(
        "--show-pii",
        action="store_true",
        help="print the PII API's answer (scrubbed of contacts, but it may name the customer)",
    )
    add_client_options(parser, DISPATCHER)
    parser.set_defaults(handler=run)


def read_content(path: str) -> pb.Content:
    entries = load_mappings(read_text(path), path)
    if len(entries) != 1:
        raise DocumentError(f"{path}: expected one content mapping, found {len(entries)}")
    where, data = entries[0]
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if not (k == "kind" and str(v).lower() == "content")}
    return parse_message(data, pb.Content, "content", where)


def render(request: pb.SendTestRequest, reply: pb.SendTestResponse, show_pii: bool = False) -> list[str]:
    result = reply.result
    status = pb.DispatchStatus.Name(result.status).removeprefix("DISPATCH_STATUS_")
    channel = enum_short_name(common_pb2.Channel.DESCRIPTOR, request.channel)
    lines = [f"test message to {request.recipient.anonymous_id} via {request.connector_id} ({channel}): {status}"]
    if result.message_id:
        lines.append(f"  message ID   {result.message_id}")
    if result.error_code or result.error_message:
        lines.append(f"  error        {result.error_code}: {result.error_message}".rstrip(": "))
    if reply.pii_api_http_status or reply.pii_api_error:
        status_text = f"HTTP {reply.pii_api_http_status}" if reply.pii_api_http_status else "no HTTP answer"
        lines.append(f"  PII API      {status_text}")
        if reply.pii_api_error:
            # "<what went wrong>; HTTP <status>: <the API's body>": the first part is ours, the body the
            # API's, whose contacts are scrubbed but whose names no pattern finds.
            ours, said, body = reply.pii_api_error.partition("; HTTP ")
            if show_pii or not said:
                lines.append(f"  its answer   {reply.pii_api_error}")
            else:
                lines.append(f"  its answer   {ours}; HTTP {body.partition(':')[0]}: (its body: --show-pii)")
    return lines


def run(args: argparse.Namespace) -> int:
    request = pb.SendTestRequest(
        workspace_id=args.workspace,
        campaign_id=args.campaign,
        channel=args.channel,
        connector_id=args.connector,
        content=read_content(args.content),
        recipient=pb.Recipient(anonymous_id=args.anonymous_id, attributes=dict(args.attr)),
    )
    with Connection.open(DISPATCHER, args) as connection:
        reply = connection.call(connection.stub(pb_grpc.DispatcherServiceStub).SendTest, request)
    print("\n".join(render(request, reply, args.show_pii)))
    return OK if reply.result.status == pb.DISPATCH_STATUS_SENT else FAILED
