"""`tokensend stats CAMPAIGN`: a campaign's counters, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as pb_grpc

from cli.exits import OK, UsageError
from cli.flags import HelpFormatter
from cli.rpc import RECEIPTS, Connection, add_client_options

# The delivery funnel: shares are of `sent`, the messages a provider accepted.
FUNNEL = ("delivered", "bounced", "failed", "opened", "clicked", "complained", "unsubscribed")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "stats",
        help="a campaign's counters (attempted, sent, delivered ...)",
        description="Print a campaign's counters from the receipts service: attempted, resolve failures by reason, "
        "sent, and the delivery funnel (shares are of 'sent').",
        epilog="An unknown workspace, campaign or instance reads all zeros, as one that sent\n"
        "nothing yet does: the command then says so on stderr (exit 0), so a mistyped ID\n"
        "does not pass for a quiet campaign.\n\n"
        'An empty CAMPAIGN ("") reads the workspace\'s own counter instead: receipts for\n'
        "messages not (or no longer) in the message map that named no known campaign\n"
        "(unmapped). They belong to no instance: --instance does not go with it.\n\n"
        "examples:\n  tokensend stats welcome --workspace demo --instance welcome-1 --json\n"
        '  tokensend stats "" --workspace demo',
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "campaign", metavar="CAMPAIGN", help='the campaign ID; "" for the workspace\'s unmapped receipts'
    )
    parser.add_argument("--workspace", required=True, metavar="W", help="the workspace ID")
    parser.add_argument("--instance", default="", metavar="I", help="one campaign instance (default: all of them)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_client_options(parser, RECEIPTS)
    parser.set_defaults(handler=run)


def stats_to_data(reply: pb.GetCampaignStatsResponse) -> dict[str, object]:
    """Every counter, zeros included, as integers (proto JSON would write uint64 as strings)."""
    data: dict[str, object] = {}
    for field in reply.DESCRIPTOR.fields:
        value = getattr(reply, field.name)
        data[field.name] = dict(sorted(value.items())) if field.message_type is not None else int(value)
    return data


def render_table(title: str, reply: pb.GetCampaignStatsResponse) -> list[str]:
    rows: list[tuple[str, int, str]] = [
        ("attempted", reply.attempted, ""),
        ("resolve failed", reply.resolve_failed, _share(reply.resolve_failed, reply.attempted, "of attempted")),
    ]
    rows += [(f"  {reason}", count, "") for reason, count in sorted(reply.resolve_failed_by_reason.items())]
    rows += [
        ("sent", reply.sent, _share(reply.sent, reply.attempted, "of attempted")),
        ("send failed", reply.send_failed, _share(reply.send_failed, reply.attempted, "of attempted")),
    ]
    rows += [(name, getattr(reply, name), _share(getattr(reply, name), reply.sent, "of sent")) for name in FUNNEL]
    rows.append(("unmapped receipts", reply.unmapped, ""))
    shown = {"attempted", "resolve_failed", "resolve_failed_by_reason", "sent", "send_failed", "unmapped", *FUNNEL}
    rows += [  # counters added to the proto after this table was laid out
        (field.name.replace("_", " "), getattr(reply, field.name), "")
        for field in reply.DESCRIPTOR.fields
        if field.name not in shown and field.message_type is None and not field.is_repeated
    ]
    width = max(len(str(count)) for _, count, _ in rows)
    return [title] + [f"  {name:<18} {count:>{width}}  {share}".rstrip() for name, count, share in rows]


def _share(part: int, whole: int, of: str) -> str:
    return f"{100 * part / whole:5.1f}% {of}" if whole else ""


def render_unmapped(workspace: str, reply: pb.GetCampaignStatsResponse) -> list[str]:
    """The workspace's own counters: only receipts that named no known campaign are counted there, so the
    campaign's rows would read zeros that say nothing."""
    rows = [("unmapped receipts", reply.unmapped)]
    rows += [  # any other counter the service may come to keep there
        (field.name.replace("_", " "), getattr(reply, field.name))
        for field in reply.DESCRIPTOR.fields
        if field.name != "unmapped" and field.message_type is None and getattr(reply, field.name)
    ]
    width = max(len(str(count)) for _, count in rows)
    title = f"workspace {workspace}: unmapped receipts naming no known campaign (CAMPAIGN empty)"
    return [title] + [f"  {name:<18} {count:>{width}}" for name, count in rows]


def run(args: argparse.Namespace) -> int:
    if not args.campaign and args.instance:
        raise UsageError(
            "--instance needs a CAMPAIGN: an empty CAMPAIGN reads the workspace's unmapped receipts, "
            "which belong to no campaign or instance"
        )
    request = pb.GetCampaignStatsRequest(
        workspace_id=args.workspace, campaign_id=args.campaign, campaign_instance_id=args.instance
    )
    with Connection.open(RECEIPTS, args) as connection:
        reply = connection.call(connection.stub(pb_grpc.ReceiptsServiceStub).GetCampaignStats, request)
    if args.json:
        data = {
            "workspace_id": args.workspace,
            "campaign_id": args.campaign,
            "campaign_instance_id": args.instance,
            **stats_to_data(reply),
        }
        print(json.dumps(data, indent=2))
    elif not args.campaign:
        print("\n".join(render_unmapped(args.workspace, reply)))
    else:
        scope = f"instance {args.instance}" if args.instance else "all instances"
        print("\n".join(render_table(f"campaign {args.campaign} in workspace {args.workspace} ({scope})", reply)))
    if not reply.ByteSize() and not args.campaign:
        print(
            f"tokensend: no unmapped receipts counted in workspace {args.workspace!r}: none came, or the "
            "workspace ID is mistyped (an unknown workspace reads zero)",
            file=sys.stderr,
        )
    elif not reply.ByteSize():
        # The service answers an unknown campaign with zeros, so a mistyped ID would pass for a quiet campaign.
        named = f"campaign {args.campaign!r}" + (f", instance {args.instance!r}," if args.instance else "")
        print(
            f"tokensend: no counts for {named} in workspace {args.workspace!r}: nothing was dispatched for it yet, "
            "or an ID is mistyped (an unknown workspace, campaign or instance reads all zeros)",
            file=sys.stderr,
        )
    return OK
