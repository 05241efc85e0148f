"""`tokensend config` and `test-pii-api` against a resolver and a dispatcher on port 0.

The CLI is synchronous; it runs in a worker thread while the servers serve on the test's loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from cli.exits import FAILED, OK, USAGE
from cli.main import main
from libs.masking import mask_email, mask_phone
from sandbox.pii_api import OAuthClient

pytestmark = pytest.mark.integration

WS = "ws-cli"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def workspace_yaml(api_url: str) -> str:
    return f"""\
kind: oauth
workspace_id: {WS}
oauth_config_id: crm
token_url: {api_url}/oauth/token
client_id: app
client_secret: oauth-secret-1
---
kind: pii-api
workspace_id: {WS}
channel: email
mode: bulk
method: post
url: {api_url}/v1/customers:batchGet
body: '{{"ids": "@anonymous_ids"}}'
oauth_config_id: crm
headers:
  X-Api-Key: api-key-1
results_path: data.results
id_path: id
contact_path: email
attribute_paths:
  first_name: profile.first_name
---
kind: sendgrid
workspace_id: {WS}
connector_id: sg
channel: email
credentials:
  api_key: SG.key-1
sender: news@brand.example
"""


@pytest.fixture
async def suite(start_pii_api_server, start_resolver, start_dispatcher):
    api = await start_pii_api_server(oauth=OAuthClient("app", "oauth-secret-1"), api_key="api-key-1")
    resolver = await start_resolver()
    dispatcher = await start_dispatcher(resolver)
    return api, f"127.0.0.1:{resolver.port}", f"127.0.0.1:{dispatcher.port}"


async def test_put_then_get_round_trip_with_masked_secrets(suite, tmp_path, capsys, customers) -> None:
    api, resolver, dispatcher = suite
    config = tmp_path / "workspace.yaml"
    config.write_text(workspace_yaml(api.base_url))
    assert (
        await run_cli("config", "put", str(config), "--resolver-addr", resolver, "--dispatcher-addr", dispatcher) == OK
    )
    assert capsys.readouterr().out.splitlines() == [
        f"saved oauth {WS}/crm: version 1, ACTIVE",
        f"saved pii-api {WS}/email: version 1",
        f"saved connector {WS}/sg: version 1, sendgrid, email",
    ]

    assert await run_cli("config", "get", "pii-api", "email", "--workspace", WS, "--addr", resolver) == OK
    pii_api = capsys.readouterr().out
    assert "api-key-1" not in pii_api
    data = yaml.safe_load(pii_api)
    assert (data["kind"], data["channel"], data["mode"], data["version"]) == ("pii-api", "email", "bulk", 1)
    assert data["headers"] == {"X-Api-Key": "********"}

    assert await run_cli("config", "get", "oauth", "crm", "--workspace", WS, "--addr", resolver) == OK
    oauth = capsys.readouterr().out
    assert "oauth-secret-1" not in oauth
    assert yaml.safe_load(oauth) | {"token_url": ""} == {
        "kind": "oauth",
        "workspace_id": WS,
        "oauth_config_id": "crm",
        "token_url": "",
        "client_id": "app",
        "client_secret": "********",
        "status": "active",
        "version": 1,
    }

    assert (
        await run_cli("config", "get", "connector", "sg", "--workspace", WS, "-o", "json", "--addr", dispatcher) == OK
    )
    connector = capsys.readouterr().out
    assert "SG.key-1" not in connector
    assert yaml.safe_load(connector)["credentials"] == {"api_key": "********"}
    assert yaml.safe_load(connector)["kind"] == "sendgrid"

    # What `get` printed goes straight back in; the saved secrets stay, so the API still lets us in.
    (tmp_path / "back.yaml").write_text(pii_api + "---\n" + oauth)
    assert await run_cli("config", "put", str(tmp_path / "back.yaml"), "--addr", resolver) == OK
    assert f"saved pii-api {WS}/email: version 2" in capsys.readouterr().out
    customer = customers["cust-000001"]
    argv = ["test-pii-api", "--workspace", WS, "--channel", "email", "--id", customer.anonymous_id]
    assert await run_cli(*argv, "--addr", resolver) == OK
    out = capsys.readouterr().out
    assert "HTTP 200" in out
    assert f"contact        {mask_email(customer.email)}" in out
    assert customer.email not in out and customer.first_name not in out


async def test_a_field_the_server_refuses_is_named_and_exits_2(suite, tmp_path, capsys) -> None:
    api, resolver, _ = suite
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"kind: pii-api\nworkspace_id: {WS}\nchannel: sms\nmode: single\nmethod: get\n"
        f"url: ftp://{api.base_url.removeprefix('http://')}/v1/customers/@anonymous_id\ncontact_path: customer.phone\n"
    )
    assert await run_cli("config", "put", str(bad), "--addr", resolver) == USAGE
    err = capsys.readouterr().err
    assert (
        f"tokensend: {bad}: pii-api {WS}/sms: the resolver refused it as invalid (INVALID_ARGUMENT): config.url: "
        "must be an https:// URL\n"
    ) in err
    assert err.count("must be an https:// URL") == 1
    assert "Traceback" not in err


async def test_failures_that_are_not_the_callers_input_exit_1(suite, tmp_path, capsys) -> None:
    api, resolver, _ = suite
    missing_oauth = tmp_path / "sms.yaml"
    missing_oauth.write_text(
        f"workspace_id: {WS}\nchannel: sms\nmode: single\nmethod: get\noauth_config_id: nope\n"
        f"url: {api.base_url}/v1/customers/@anonymous_id\ncontact_path: customer.phone\n"
    )
    assert await run_cli("config", "put", "pii-api", str(missing_oauth), "--addr", resolver) == FAILED
    assert "answered FAILED_PRECONDITION: config.oauth_config_id" in capsys.readouterr().err

    assert await run_cli("config", "get", "pii-api", "whatsapp", "--workspace", WS, "--addr", resolver) == FAILED
    assert "the resolver answered NOT_FOUND" in capsys.readouterr().err

    wrong_secret = tmp_path / "oauth.yaml"
    wrong_secret.write_text(
        f"workspace_id: {WS}\noauth_config_id: crm\ntoken_url: {api.base_url}/oauth/token\n"
        "client_id: app\nclient_secret: not-the-secret\n"
    )
    assert await run_cli("config", "put", "oauth", str(wrong_secret), "--addr", resolver) == FAILED
    captured = capsys.readouterr()
    assert f"saved oauth {WS}/crm: version 1, FAILED" in captured.out
    assert "was saved, but its token endpoint failed" in captured.err


async def test_test_pii_api_masks_the_contact_unless_asked(suite, tmp_path, capsys, customers) -> None:
    api, resolver, _ = suite
    sms = tmp_path / "sms.yaml"
    sms.write_text(
        f"kind: pii-api\nworkspace_id: {WS}\nchannel: sms\nmode: single\nmethod: get\n"
        f"url: {api.base_url}/v1/customers/@anonymous_id\nheaders: {{X-Api-Key: api-key-1}}\n"
        "contact_path: customer.phone\nattribute_paths: {first_name: customer.profile.first_name}\n"
    )
    (tmp_path / "oauth.yaml").write_text(workspace_yaml(api.base_url).split("---")[0])
    assert await run_cli("config", "put", str(tmp_path / "oauth.yaml"), "--addr", resolver) == OK
    sms.write_text(sms.read_text() + "oauth_config_id: crm\n")
    capsys.readouterr()
    customer = customers["cust-000002"]

    assert await run_cli("test-pii-api", str(sms), "--id", customer.anonymous_id, "--addr", resolver) == OK
    out = capsys.readouterr().out
    assert out.startswith(f"pii-api {WS}/sms, anonymous ID {customer.anonymous_id}:")
    assert f"contact        {mask_phone(customer.phone)}" in out
    assert "response keys  customer.id" in out and "customer.phone" in out
    assert customer.phone not in out and customer.first_name not in out and "response body" not in out

    argv = ["test-pii-api", str(sms), "--id", customer.anonymous_id, "--show-pii", "--addr", resolver]
    assert await run_cli(*argv) == OK
    out = capsys.readouterr().out
    assert f"contact        {customer.phone}" in out and f"first_name={customer.first_name}" in out
    assert "response body" in out

    assert await run_cli("test-pii-api", str(sms), "--id", "cust-999999", "--addr", resolver) == FAILED
    out = capsys.readouterr().out
    assert "status         HTTP 404" in out
    assert "error          NOT_FOUND: Invalid API response (fetching Mobile No.)" in out


async def test_the_shipped_examples_work_against_the_sample_api_as_the_readme_starts_it(
    start_pii_api_server, start_resolver, tmp_path, capsys, customers
) -> None:
    # The README's walkthrough: --oauth-client-id demo-app --oauth-client-secret demo-secret --api-key demo-api-key.
    api = await start_pii_api_server(oauth=OAuthClient("demo-app", "demo-secret"), api_key="demo-api-key")
    resolver = f"127.0.0.1:{(await start_resolver()).port}"
    files = []
    for name in ("pii-api-bulk-oauth.yaml", "pii-api-single-sms.yaml"):
        copy = tmp_path / name
        copy.write_text((EXAMPLES / name).read_text().replace("http://localhost:8090", api.base_url))
        files.append(str(copy))
    assert await run_cli("config", "put", *files, "--resolver-addr", resolver) == OK
    capsys.readouterr()
    customer = next(iter(customers.values()))
    for file in files:
        assert await run_cli("test-pii-api", file, "--id", customer.anonymous_id, "--addr", resolver) == OK, (
            capsys.readouterr().out
        )
    out = capsys.readouterr().out
    assert mask_email(customer.email) in out and mask_phone(customer.phone) in out


async def test_list_then_delete_with_the_references_named(suite, tmp_path, capsys) -> None:
    api, resolver, dispatcher = suite
    config = tmp_path / "workspace.yaml"
    config.write_text(workspace_yaml(api.base_url))
    addrs = ["--resolver-addr", resolver, "--dispatcher-addr", dispatcher]
    assert await run_cli("config", "put", str(config), *addrs) == OK
    capsys.readouterr()

    assert await run_cli("config", "list", "--workspace", WS, *addrs) == OK
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(", saved ")[0] for line in lines] == [
        "pii-api email: version 1, bulk, oauth crm",
        "oauth crm: version 1, active",
        "connector sg: version 1, sendgrid, email",
    ]
    assert all(", saved 20" in line for line in lines)
    assert await run_cli("config", "list", "oauth", "--workspace", WS, "-o", "json", "--addr", resolver) == OK
    listed = yaml.safe_load(capsys.readouterr().out)
    assert [(e["kind"], e["name"], e["status"]) for e in listed] == [("oauth", "crm", "active")]

    # In use: refused, naming what uses it.
    assert await run_cli("config", "delete", "oauth", "crm", "--workspace", WS, "--addr", resolver) == FAILED
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err and "the PII API config for channel family email (version 1)" in err

    assert await run_cli("config", "delete", "pii-api", "email", "--workspace", WS, "--addr", resolver) == OK
    assert capsys.readouterr().out == f"deleted pii-api {WS}/email: versions up to 1\n"
    assert await run_cli("config", "delete", "oauth", "crm", "--workspace", WS, "--addr", resolver) == OK
    assert await run_cli("config", "delete", "connector", "sg", "--workspace", WS, "--addr", dispatcher) == OK
    assert capsys.readouterr().out == f"deleted oauth {WS}/crm\ndeleted connector {WS}/sg\n"
    assert await run_cli("config", "list", "--workspace", WS, *addrs) == OK
    assert capsys.readouterr().out == f"workspace {WS} has no configs\n"

    assert await run_cli("config", "delete", "connector", "sg", "--workspace", WS, "--addr", dispatcher) == FAILED
    assert f"no connector 'sg' in workspace '{WS}'" in capsys.readouterr().err


def content_api_yaml(api_url: str) -> str:
    return f"""\
kind: content-api
workspace_id: {WS}
name: loyalty
mode: single
method: get
url: {api_url}/v1/customers/@anonymous_id
oauth_config_id: crm
headers:
  X-Api-Key: api-key-1
field_paths:
  tier: customer.tier
"""


async def test_content_api_configs_put_get_list_and_delete(suite, tmp_path, capsys) -> None:
    api, resolver, dispatcher = suite
    (tmp_path / "loyalty.yaml").write_text(content_api_yaml(api.base_url) + "---\n" + workspace_yaml(api.base_url))
    addrs = ["--resolver-addr", resolver, "--dispatcher-addr", dispatcher]
    assert await run_cli("config", "put", str(tmp_path / "loyalty.yaml"), *addrs) == OK
    assert capsys.readouterr().out.splitlines() == [
        f"saved oauth {WS}/crm: version 1, ACTIVE",
        f"saved pii-api {WS}/email: version 1",
        f"saved content-api {WS}/loyalty: version 1",  # after the OAuth config it names
        f"saved connector {WS}/sg: version 1, sendgrid, email",
    ]

    assert await run_cli("config", "get", "content-api", "loyalty", "--workspace", WS, "--addr", resolver) == OK
    shown = capsys.readouterr().out
    assert "api-key-1" not in shown
    data = yaml.safe_load(shown)
    assert (data["kind"], data["name"], data["version"], data["oauth_config_id"]) == (
        "content-api",
        "loyalty",
        1,
        "crm",
    )
    assert data["headers"] == {"X-Api-Key": "********"} and data["field_paths"] == {"tier": "customer.tier"}

    # What `get` printed goes straight back in, its secrets kept; older versions stay readable.
    (tmp_path / "back.yaml").write_text(shown.replace("customer.tier", "customer.loyalty_tier"))
    assert await run_cli("config", "put", str(tmp_path / "back.yaml"), "--addr", resolver) == OK
    assert capsys.readouterr().out == f"saved content-api {WS}/loyalty: version 2\n"
    argv = ["config", "get", "content-api", "loyalty", "--workspace", WS, "--version", "1", "-o", "json"]
    assert await run_cli(*argv, "--addr", resolver) == OK
    assert yaml.safe_load(capsys.readouterr().out)["field_paths"] == {"tier": "customer.tier"}
    assert await run_cli("config", "list", "content-api", "--workspace", WS, "--addr", resolver) == OK
    assert capsys.readouterr().out.startswith("content-api loyalty: version 2, single, oauth crm, saved 20")

    assert await run_cli("config", "delete", "oauth", "crm", "--workspace", WS, "--addr", resolver) == FAILED
    assert "the PII API config for channel family email (version 1)" in capsys.readouterr().err
    assert await run_cli("config", "delete", "content-api", "loyalty", "--workspace", WS, "--addr", resolver) == OK
    assert capsys.readouterr().out == f"deleted content-api {WS}/loyalty: versions up to 2\n"
    assert await run_cli("config", "get", "content-api", "loyalty", "--workspace", WS, "--addr", resolver) == FAILED
    assert "the resolver answered NOT_FOUND" in capsys.readouterr().err


async def test_a_document_saved_again_after_another_save_is_refused_unless_forced(suite, tmp_path, capsys) -> None:
    api, resolver, dispatcher = suite
    addrs = ("--resolver-addr", resolver, "--dispatcher-addr", dispatcher)
    (tmp_path / "workspace.yaml").write_text(workspace_yaml(api.base_url))
    assert await run_cli("config", "put", str(tmp_path / "workspace.yaml"), *addrs) == OK
    capsys.readouterr()
    assert await run_cli("config", "get", "connector", "sg", "--workspace", WS, "--addr", dispatcher) == OK
    mine = yaml.safe_load(capsys.readouterr().out)
    assert mine["version"] == 1
    theirs = mine | {"sender": "theirs@brand.example"}
    (tmp_path / "theirs.yaml").write_text(yaml.safe_dump(theirs))
    assert await run_cli("config", "put", str(tmp_path / "theirs.yaml"), "--addr", dispatcher) == OK
    assert capsys.readouterr().out == f"saved connector {WS}/sg: version 2, sendgrid, email\n"

    # The second operator's edit of version 1 does not overwrite the first's.
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine | {"sender": "mine@brand.example"}))
    assert await run_cli("config", "put", str(tmp_path / "mine.yaml"), "--addr", dispatcher) == FAILED
    err = capsys.readouterr().err
    assert "ABORTED" in err and "connector 'sg' in workspace 'ws-cli' is at version 2, not version 1" in err
    assert await run_cli("config", "get", "connector", "sg", "--workspace", WS, "--addr", dispatcher) == OK
    assert yaml.safe_load(capsys.readouterr().out)["sender"] == "theirs@brand.example"

    argv = ["config", "delete", "connector", "sg", "--workspace", WS, "--addr", dispatcher]
    assert await run_cli(*argv, "--if-version", "1") == FAILED
    assert "is at version 2" in capsys.readouterr().err
    assert await run_cli("config", "put", str(tmp_path / "mine.yaml"), "--force", "--addr", dispatcher) == OK
    assert capsys.readouterr().out == f"saved connector {WS}/sg: version 3, sendgrid, email\n"
    assert await run_cli(*argv, "--if-version", "3") == OK
