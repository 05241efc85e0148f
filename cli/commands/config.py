"""`tokensend config put|get|list|delete`: PII API, OAuth, content API and connector configs from and to
YAML; the configs a workspace has, and deleting one."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from tokensend.common.v1 import common_pb2 as cpb
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as dpb_grpc
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from cli import flags
from cli.documents import (
    CONNECTOR,
    CONTENT_API,
    KINDS,
    OAUTH,
    PII_API,
    ConfigDocument,
    DocumentError,
    Kind,
    config_to_data,
    dump_yaml,
    enum_short_name,
    load_configs,
)
from cli.exits import FAILED, OK, OutputFailed, UsageError
from cli.flags import HelpFormatter
from cli.rpc import (
    DISPATCHER,
    RESOLVER,
    SERVICES,
    ClientOptions,
    Connection,
    RpcFailed,
    add_client_options,
    grpc_address,
)

PUT_EPILOG = """\
A file holds one config, several YAML documents separated by '---', or a list
of configs. Each says its kind: 'kind: pii-api', 'kind: oauth', 'kind:
content-api', or for a connector its provider, which is the Connector's own
kind field ('kind: sendgrid', ses, smtp, twilio, whatsapp_cloud,
custom_http). Naming the KIND on the command line lets a file of one kind
leave it out. Fields are named as in
the protos (protos/tokensend/*/v1/*.proto); enums take short forms (channel:
email, mode: bulk, method: post). Every file is checked before anything is
sent, and a problem names the file, the document and the field; two configs
that would be saved under one name (for PII API configs, one channel family:
SMS, MMS and RCS share one) are refused, as the second would replace the
first. OAuth configs are saved first, then PII API configs, then content API
configs, then connectors.
What 'config get' prints (secrets as ********) can be saved again: the saved
secrets are kept. A document that carries a 'version' (as 'config get' prints
it) is saved only while the config is still at that version: when someone else
saved or deleted it since, the save is refused (ABORTED, naming the version it
is at) and nothing changes; read it again and redo the edit. Leave 'version'
out, or pass --force, to save whatever the config holds now.

examples:
  tokensend config put examples/pii-api-bulk-oauth.yaml examples/connector-sendgrid.yaml
  tokensend config put connector examples/connector-twilio.yaml --timeout 10
  tokensend config get pii-api email --workspace demo > email.yaml
  tokensend config put email.yaml
  tokensend config get content-api loyalty --workspace demo > loyalty.yaml"""


def register(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config",
        help="save, read, list and delete PII API, OAuth, content API and connector configs (YAML)",
        description="Save and read PII API, OAuth, content API and connector configs as YAML; list and delete them.",
    )
    actions = config.add_subparsers(dest="config_action", required=True, metavar="ACTION")

    put = actions.add_parser(
        "put",
        help="validate and save the configs in YAML files",
        description="Validate and save the configs in YAML files (secrets are sealed by the server).",
        usage="tokensend config put [options] [{pii-api,oauth,content-api,connector}] FILE [FILE ...]",
        epilog=PUT_EPILOG,
        formatter_class=HelpFormatter,
    )
    put.add_argument(
        "targets",
        nargs="+",
        metavar="[KIND] FILE",
        help="pii-api, oauth, content-api or connector for files of one kind (optional), "
        "then YAML files ('-' reads stdin)",
    )
    put.add_argument("--workspace", metavar="W", help="workspace_id of every config that sets none")
    put.add_argument("--dry-run", action="store_true", help="check the files and send nothing")
    put.add_argument(
        "--force",
        action="store_true",
        help="save even when a config changed since the 'version' its document carries (that version is not sent)",
    )
    add_client_options(put, None)
    put.add_argument(
        "--addr",
        type=grpc_address,
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="address of the one service the files need (the resolver for pii-api, oauth and content-api, "
        "the dispatcher for connectors)",
    )
    put.add_argument(
        "--resolver-addr",
        type=grpc_address,
        metavar="HOST:PORT",
        help=f"the resolver (default: ${RESOLVER.env} or {RESOLVER.default_addr})",
    )
    put.add_argument(
        "--dispatcher-addr",
        type=grpc_address,
        metavar="HOST:PORT",
        help=f"the dispatcher (default: ${DISPATCHER.env} or {DISPATCHER.default_addr})",
    )
    put.set_defaults(handler=run_put)

    get = actions.add_parser(
        "get",
        help="print a saved config as YAML (secrets masked)",
        description="Print a saved config as YAML, secrets masked; 'config put' reads it back.",
    )
    kinds = get.add_subparsers(dest="kind", required=True, metavar="KIND")
    pii_api = kinds.add_parser(
        "pii-api",
        help="a PII API config, by channel",
        description="Print a workspace's PII API config for a channel family (SMS, MMS and RCS share one).",
    )
    pii_api.add_argument("channel", type=flags.channel, metavar="CHANNEL", help=", ".join(flags.CHANNELS))
    pii_api.add_argument(
        "--version", type=flags.non_negative_int, default=0, metavar="N", help="an older version (default: latest)"
    )
    oauth = kinds.add_parser("oauth", help="an OAuth config, by ID", description="Print an OAuth 2.0 config.")
    oauth.add_argument("name", metavar="OAUTH_CONFIG_ID")
    content_api = kinds.add_parser(
        "content-api", help="a content API config, by name", description="Print a content API config."
    )
    content_api.add_argument("name", metavar="NAME")
    content_api.add_argument(
        "--version", type=flags.non_negative_int, default=0, metavar="N", help="an older version (default: latest)"
    )
    connector = kinds.add_parser("connector", help="a connector, by ID", description="Print a provider connector.")
    connector.add_argument("name", metavar="CONNECTOR_ID")
    for parser, kind in ((pii_api, PII_API), (oauth, OAUTH), (content_api, CONTENT_API), (connector, CONNECTOR)):
        parser.add_argument("--workspace", required=True, metavar="W", help="the workspace ID")
        parser.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="format (default: yaml)")
        add_client_options(parser, SERVICES[kind.service])
        parser.set_defaults(handler=run_get, config_kind=kind)

    listing = actions.add_parser(
        "list",
        help="list a workspace's configs (no secrets)",
        description="List a workspace's configs of one kind or of every kind: names, versions, status, "
        "when each was saved; never a secret or URL.",
        epilog=LIST_EPILOG,
        formatter_class=HelpFormatter,
    )
    listing.add_argument(
        "kind", nargs="?", choices=LISTED_KINDS, metavar="KIND", help=f"{', '.join(LISTED_KINDS)} (default: every kind)"
    )
    listing.add_argument("--workspace", required=True, metavar="W", help="the workspace ID")
    listing.add_argument("-o", "--output", choices=("text", "json"), default="text", help="format (default: text)")
    _add_two_service_options(listing)
    listing.set_defaults(handler=run_list)

    delete = actions.add_parser(
        "delete",
        help="delete a config and its secrets",
        description="Delete a config, every version of it and its sealed secrets.",
        epilog=DELETE_EPILOG,
        formatter_class=HelpFormatter,
    )
    delete.add_argument("kind", choices=LISTED_KINDS, metavar="KIND", help=", ".join(LISTED_KINDS))
    delete.add_argument("name", metavar="NAME", help="the channel (pii-api), the config's ID or the content API's name")
    delete.add_argument("--workspace", required=True, metavar="W", help="the workspace ID")
    delete.add_argument(
        "--if-version",
        type=flags.non_negative_int,
        default=0,
        metavar="N",
        help="delete only while the config is at version N, as 'config get' or 'config list' showed it "
        "(default: whatever version it is at)",
    )
    _add_two_service_options(delete)
    delete.set_defaults(handler=run_delete)


LIST_EPILOG = """Each line is one config: its kind, its name, then what a summary holds (the
latest version, the mode and OAuth config it uses, a token status), and when it
was last saved. Configs saved before the service kept that time show no time.
One sealed under a key the service's TOKENSEND_SECRET_KEY lacks is shown
UNREADABLE, with its version alone (an OAuth config with its token status too):
set that key too, or put it again with its secrets, or delete it (see key
rotation in docs/operations.md).

examples:
  tokensend config list --workspace demo
  tokensend config list oauth --workspace demo -o json"""

DELETE_EPILOG = """PII API and content API configs go with every version: a campaign instance
pinned to one of them fails NOT_FOUND from then on, and a config saved later
under the same name starts after the last deleted version. An OAuth config a
PII API or content API config still uses, or one that does not open may use,
is not deleted (the answer names that config). A connector's receipts webhooks refuse what its provider still sends.
With --if-version N the delete is refused (ABORTED, naming the version it is
at) when the config changed since version N was read.

examples:
  tokensend config delete oauth old-crm --workspace demo
  tokensend config delete connector sg --workspace demo --if-version 4
  tokensend config delete pii-api sms --workspace demo"""

# The kinds list and delete take, in the order `config list` prints them.
LISTED_KINDS = [PII_API.name, OAUTH.name, CONTENT_API.name, CONNECTOR.name]


def _add_two_service_options(parser: argparse.ArgumentParser) -> None:
    """--addr for the one service a kind names, --resolver-addr and --dispatcher-addr for every kind."""
    add_client_options(parser, None)
    parser.add_argument(
        "--addr",
        type=grpc_address,
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="address of the service that keeps KIND (the resolver, or the dispatcher for connectors)",
    )
    parser.add_argument(
        "--resolver-addr",
        type=grpc_address,
        metavar="HOST:PORT",
        help=f"the resolver (default: ${RESOLVER.env} or {RESOLVER.default_addr})",
    )
    parser.add_argument(
        "--dispatcher-addr",
        type=grpc_address,
        metavar="HOST:PORT",
        help=f"the dispatcher (default: ${DISPATCHER.env} or {DISPATCHER.default_addr})",
    )


def _service_of(kind: str) -> str:
    return "dispatcher" if kind == "connector" else "resolver"


def _open(args: argparse.Namespace, service: str) -> Connection:
    explicit = {"resolver": args.resolver_addr, "dispatcher": args.dispatcher_addr}[service]
    address = explicit or getattr(args, "addr", None) or SERVICES[service].address(argparse.Namespace())
    return Connection(SERVICES[service], address, ClientOptions.from_args(args))


# --- put -------------------------------------------------------------------------------------------------------


def split_targets(targets: list[str]) -> tuple[Kind | None, list[str]]:
    """`[KIND] FILE...`: a first word that names a kind is the kind."""
    if targets[0] in KINDS:
        if len(targets) == 1:
            raise UsageError(f"config put {targets[0]}: name the FILE to read")
        kind, paths = KINDS[targets[0]], targets[1:]
    else:
        kind, paths = None, targets
    if paths.count("-") > 1:  # the second would read an input the first has read to its end
        raise UsageError("config put: standard input (-) can be named once")
    return kind, paths


def read_documents(
    paths: list[str], kind: Kind | None, workspace: str | None, kinds: list[Kind] | None = None
) -> list[ConfigDocument]:
    """The configs of every file, `--workspace` filled in, in the order they must be saved."""
    documents = [doc for path in paths for doc in load_configs(path, kind, kinds=kinds)]
    if workspace:
        for doc in documents:
            if not doc.message.workspace_id:
                doc.message.workspace_id = workspace
            elif doc.message.workspace_id != workspace:
                raise DocumentError(
                    f"{doc.where}: {doc.kind.root}.workspace_id is {doc.message.workspace_id!r} "
                    f"but --workspace is {workspace!r}"
                )
    _refuse_duplicates(documents)
    order = list(KINDS.values())
    return sorted(documents, key=lambda doc: order.index(doc.kind))  # stable: file order within a kind


# SMS, MMS and RCS share one PII API config (the resolver keeps one per channel family).
_SMS_FAMILY = {cpb.CHANNEL_SMS, cpb.CHANNEL_MMS, cpb.CHANNEL_RCS}


def _saved_as(doc: ConfigDocument) -> tuple[str, str, str | int]:
    """What a document is saved under: two documents with the same would leave only the last one."""
    message = doc.message
    if doc.kind is PII_API:
        return (
            doc.kind.name,
            message.workspace_id,
            cpb.CHANNEL_SMS if message.channel in _SMS_FAMILY else message.channel,
        )
    if doc.kind is OAUTH:
        return doc.kind.name, message.workspace_id, message.oauth_config_id
    if doc.kind is CONTENT_API:
        return doc.kind.name, message.workspace_id, message.name
    return doc.kind.name, message.workspace_id, message.connector_id


def _refuse_duplicates(documents: list[ConfigDocument]) -> None:
    first: dict[tuple[str, str, str | int], ConfigDocument] = {}
    for doc in documents:
        earlier = first.setdefault(_saved_as(doc), doc)
        if earlier is not doc:
            shared = (
                " (SMS, MMS and RCS share one)" if doc.kind is PII_API and doc.message.channel in _SMS_FAMILY else ""
            )
            other = f" as {earlier.label}{shared}" if earlier.label != doc.label else ""
            raise DocumentError(
                f"{doc.where}: {doc.label} is also in {earlier.where}{other}: "
                "the second save would replace the first; keep one"
            )


def _addresses(args: argparse.Namespace, documents: list[ConfigDocument]) -> dict[str, str]:
    needed = {doc.kind.service for doc in documents}
    explicit = {"resolver": args.resolver_addr, "dispatcher": args.dispatcher_addr}
    addr = getattr(args, "addr", None)
    if addr and len(needed) > 1:
        raise UsageError(
            "--addr is ambiguous: the files hold configs for the resolver and the dispatcher; "
            "use --resolver-addr and --dispatcher-addr"
        )
    return {name: explicit[name] or addr or SERVICES[name].address(argparse.Namespace()) for name in needed}


def run_put(args: argparse.Namespace) -> int:
    kind, paths = split_targets(args.targets)
    documents = read_documents(paths, kind, args.workspace)
    if args.dry_run:
        for doc in documents:
            print(f"ok {doc.label} ({doc.where})")
        print(f"{len(documents)} config(s) checked, nothing sent (--dry-run)")
        return OK
    options = ClientOptions.from_args(args)
    addresses = _addresses(args, documents)
    connections = {name: Connection(SERVICES[name], address, options) for name, address in addresses.items()}
    exit_code = OK
    saved = 0
    unprinted: OutputFailed | None = None  # the output failing (a full disk) stops no save: said at the end
    try:
        for doc in documents:
            connection = connections[doc.kind.service]
            try:
                line, ok = save(connection, doc, force=args.force)
            except RpcFailed as error:
                before = f"\n({saved} config(s) before it were saved)" if saved else ""
                raise RpcFailed(f"{doc.where}: {doc.label}: {error.message}{before}", error.code) from None
            saved += 1
            try:
                print(line)
            except OutputFailed as failed:
                unprinted = unprinted or failed
            if not ok:
                exit_code = FAILED
    finally:
        for connection in connections.values():
            connection.close()
    if unprinted is not None:
        raise OutputFailed(f"{unprinted.message} (the {saved} config(s) were saved all the same)")
    return exit_code


def save(connection: Connection, doc: ConfigDocument, *, force: bool = False) -> tuple[str, bool]:
    """Saves one config; the line to print, and whether it is usable. The document's `version` (what
    `config get` printed) is the version the save expects the config to be at, unless `force`."""
    expected = 0 if force else doc.message.version
    if doc.kind is PII_API:
        stub = connection.stub(rpb_grpc.ResolverServiceStub)
        request = rpb.PutPiiApiConfigRequest(config=doc.message, expected_version=expected)
        reply = connection.call(stub.PutPiiApiConfig, request)
        return f"saved {PII_API.label(reply.config)}: version {reply.version}", True
    if doc.kind is OAUTH:
        stub = connection.stub(rpb_grpc.ResolverServiceStub)
        request = rpb.PutOAuthConfigRequest(config=doc.message, expected_version=expected)
        reply = connection.call(stub.PutOAuthConfig, request)
        status = rpb.TokenStatus.Name(reply.config.status).removeprefix("TOKEN_STATUS_")
        if reply.config.status != rpb.TOKEN_STATUS_ACTIVE:
            print(
                f"{doc.where}: {doc.label} was saved, but its token endpoint failed "
                f"({reply.config.status_reason or 'no reason given'}); "
                "PII API and content API configs cannot use it until it works",
                file=sys.stderr,
            )
            return (
                f"saved {OAUTH.label(reply.config)}: version {reply.config.version}, {status} "
                f"({reply.config.status_reason})",
                False,
            )
        return f"saved {OAUTH.label(reply.config)}: version {reply.config.version}, {status}", True
    if doc.kind is CONTENT_API:
        stub = connection.stub(rpb_grpc.ResolverServiceStub)
        request = rpb.PutContentApiConfigRequest(config=doc.message, expected_version=expected)
        reply = connection.call(stub.PutContentApiConfig, request)
        return f"saved {CONTENT_API.label(reply.config)}: version {reply.version}", True
    stub = connection.stub(dpb_grpc.DispatcherServiceStub)
    reply = connection.call(
        stub.PutConnector, dpb.PutConnectorRequest(connector=doc.message, expected_version=expected)
    )
    data = config_to_data(CONNECTOR, reply.connector)
    kind, channel = data.get("kind", "?"), data.get("channel", "?")
    return f"saved {CONNECTOR.label(reply.connector)}: version {reply.connector.version}, {kind}, {channel}", True


# --- get -------------------------------------------------------------------------------------------------------


def fetch(connection: Connection, kind: Kind, workspace: str, name: str | int, version: int = 0):
    if kind is PII_API:
        stub = connection.stub(rpb_grpc.ResolverServiceStub)
        request = rpb.GetPiiApiConfigRequest(workspace_id=workspace, channel=name, version=version)
        return connection.call(stub.GetPiiApiConfig, request).config
    if kind is OAUTH:
        stub = connection.stub(rpb_grpc.ResolverServiceStub)
        request = rpb.GetOAuthConfigRequest(workspace_id=workspace, oauth_config_id=name)
        return connection.call(stub.GetOAuthConfig, request).config
    if kind is CONTENT_API:
        stub = connection.stub(rpb_grpc.ResolverServiceStub)
        request = rpb.GetContentApiConfigRequest(workspace_id=workspace, name=name, version=version)
        return connection.call(stub.GetContentApiConfig, request).config
    stub = connection.stub(dpb_grpc.DispatcherServiceStub)
    request = dpb.GetConnectorRequest(workspace_id=workspace, connector_id=name)
    return connection.call(stub.GetConnector, request).connector


def run_get(args: argparse.Namespace) -> int:
    kind: Kind = args.config_kind
    name = args.channel if kind is PII_API else args.name
    with Connection.open(SERVICES[kind.service], args) as connection:
        message = fetch(connection, kind, args.workspace, name, getattr(args, "version", 0))
    data = config_to_data(kind, message)
    if args.output == "json":
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(dump_yaml(data))
    return OK


# --- list and delete -------------------------------------------------------------------------------------------


def _all_pages(call, request, field: str) -> list:
    """Every entry of a paged List RPC."""
    entries = []
    while True:
        reply = call(request)
        entries.extend(getattr(reply, field))
        if not reply.next_page_token:
            return entries
        request.page_token = reply.next_page_token


def list_configs(connection: Connection, kind: str, workspace: str) -> list[dict]:
    """A workspace's configs of one kind, each a mapping of its summary's fields (enums in short form)."""
    if kind == "connector":
        stub = connection.stub(dpb_grpc.DispatcherServiceStub)
        request = dpb.ListConnectorsRequest(workspace_id=workspace, page_size=1000)
        entries = _all_pages(lambda r: connection.call(stub.ListConnectors, r), request, "connectors")
        return [
            _summary(
                kind,
                c.connector_id,
                c.updated_at_ms,
                version=c.version,
                provider=_known(c, enum_short_name(dpb.ConnectorKind.DESCRIPTOR, c.kind)),
                channel=_known(c, enum_short_name(cpb.Channel.DESCRIPTOR, c.channel)),
                unreadable=c.unreadable,
            )
            for c in entries
        ]
    stub = connection.stub(rpb_grpc.ResolverServiceStub)
    if kind == "pii-api":
        reply = connection.call(stub.ListPiiApiConfigs, rpb.ListPiiApiConfigsRequest(workspace_id=workspace))
        return [
            _summary(
                kind,
                enum_short_name(cpb.Channel.DESCRIPTOR, c.channel),
                c.updated_at_ms,
                version=c.version,
                mode=_known(c, enum_short_name(rpb.Mode.DESCRIPTOR, c.mode)),
                oauth_config_id=c.oauth_config_id,
                unreadable=c.unreadable,
            )
            for c in reply.configs
        ]
    if kind == "oauth":
        request = rpb.ListOAuthConfigsRequest(workspace_id=workspace, page_size=1000)
        entries = _all_pages(lambda r: connection.call(stub.ListOAuthConfigs, r), request, "configs")
        return [
            _summary(
                kind,
                c.oauth_config_id,
                c.updated_at_ms,
                version=c.version,
                status=enum_short_name(rpb.TokenStatus.DESCRIPTOR, c.status),
                status_reason=c.status_reason,
                unreadable=c.unreadable,
            )
            for c in entries
        ]
    request = rpb.ListContentApiConfigsRequest(workspace_id=workspace, page_size=1000)
    entries = _all_pages(lambda r: connection.call(stub.ListContentApiConfigs, r), request, "configs")
    return [
        _summary(
            kind,
            c.name,
            c.updated_at_ms,
            version=c.version,
            mode=_known(c, enum_short_name(rpb.Mode.DESCRIPTOR, c.mode)),
            oauth_config_id=c.oauth_config_id,
            unreadable=c.unreadable,
        )
        for c in entries
    ]


def _known(summary, value: str) -> str:
    """A field of the config itself, which an unreadable one (sealed under a key not configured) does not show."""
    return "" if summary.unreadable else value


# A config a list met that does not open with the service's TOKENSEND_SECRET_KEY (its summary's `unreadable`).
UNREADABLE = "UNREADABLE (sealed under a key not configured)"


def _summary(kind: str, name: str, updated_at_ms: int, **fields) -> dict:
    updated = datetime.fromtimestamp(updated_at_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if updated_at_ms else ""
    return {"kind": kind, "name": name, **{k: v for k, v in fields.items() if v}, "updated": updated}


def _line(entry: dict) -> str:
    details = []
    if "version" in entry:
        details.append(f"version {entry['version']}")
    for field in ("mode", "provider", "channel", "status"):
        if field in entry:
            details.append(entry[field])
    if "status_reason" in entry:
        details.append(f"({entry['status_reason']})")
    if "oauth_config_id" in entry:
        details.append(f"oauth {entry['oauth_config_id']}")
    if entry.get("unreadable"):
        details.append(UNREADABLE)
    if entry["updated"]:
        details.append(f"saved {entry['updated']}")
    return f"{entry['kind']} {entry['name']}: {', '.join(details)}"


def run_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else LISTED_KINDS
    if not args.kind and getattr(args, "addr", None) and not (args.resolver_addr and args.dispatcher_addr):
        raise UsageError(
            "--addr is ambiguous: every kind is kept by the resolver or the dispatcher; "
            "name a KIND, or use --resolver-addr and --dispatcher-addr"
        )
    entries: list[dict] = []
    connections: dict[str, Connection] = {}
    try:
        for kind in kinds:
            service = _service_of(kind)
            if service not in connections:
                connections[service] = _open(args, service)
            entries.extend(list_configs(connections[service], kind, args.workspace))
    finally:
        for connection in connections.values():
            connection.close()
    if args.output == "json":
        print(json.dumps(entries, indent=2, ensure_ascii=False))
    elif not entries:
        print(f"workspace {args.workspace} has no {args.kind or ''} configs".replace("  ", " "))
    else:
        for entry in entries:
            print(_line(entry))
    return OK


def run_delete(args: argparse.Namespace) -> int:
    kind, name, workspace, expected = args.kind, args.name, args.workspace, args.if_version
    with _open(args, _service_of(kind)) as connection:
        if kind == "connector":
            stub = connection.stub(dpb_grpc.DispatcherServiceStub)
            request = dpb.DeleteConnectorRequest(workspace_id=workspace, connector_id=name, expected_version=expected)
            connection.call(stub.DeleteConnector, request)
            print(f"deleted connector {workspace}/{name}")
            return OK
        stub = connection.stub(rpb_grpc.ResolverServiceStub)
        if kind == "pii-api":
            try:
                channel = flags.channel(name)
            except argparse.ArgumentTypeError as error:
                raise UsageError(f"config delete pii-api: {error}") from None
            request = rpb.DeletePiiApiConfigRequest(workspace_id=workspace, channel=channel, expected_version=expected)
            reply = connection.call(stub.DeletePiiApiConfig, request)
            print(f"deleted pii-api {workspace}/{name}: versions up to {reply.version}")
        elif kind == "oauth":
            request = rpb.DeleteOAuthConfigRequest(
                workspace_id=workspace, oauth_config_id=name, expected_version=expected
            )
            connection.call(stub.DeleteOAuthConfig, request)
            print(f"deleted oauth {workspace}/{name}")
        else:
            request = rpb.DeleteContentApiConfigRequest(workspace_id=workspace, name=name, expected_version=expected)
            reply = connection.call(stub.DeleteContentApiConfig, request)
            print(f"deleted content-api {workspace}/{name}: versions up to {reply.version}")
    return OK
