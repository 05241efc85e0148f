"""A brand's workspace wired to the sandbox peers: PII API configs, OAuth, connectors.

The demo, the end-to-end tests and the benchmarks configure tokensend exactly as a
brand would, through the public RPCs; this module only builds the messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from sandbox.providers import CUSTOM, SENDGRID, TWILIO, WHATSAPP, ProviderAccount

C = common_pb2.Channel
OAUTH_CLIENT_ID = "sandbox-app"
OAUTH_CLIENT_SECRET = "sandbox-oauth-secret"
SENDGRID_KEY = "SG.sandbox-key"
TWILIO_SID = "AC" + "5a" * 16
TWILIO_TOKEN = "sandbox-twilio-token"
TWILIO_FROM = "+14155550100"
WHATSAPP_PHONE_ID = "109876543210"
WHATSAPP_TOKEN = "sandbox-whatsapp-token"
WHATSAPP_APP_SECRET = "sandbox-whatsapp-app-secret"
GATEWAY_KEY = "sandbox-gateway-key"
GATEWAY_SECRET = "sandbox-gateway-secret"

CONNECTORS = {
    "sendgrid": C.CHANNEL_EMAIL,
    "twilio": C.CHANNEL_SMS,
    "whatsapp": C.CHANNEL_WHATSAPP,
    "gateway": C.CHANNEL_SMS,
}


@dataclass(frozen=True)
class SandboxWorkspace:
    workspace_id: str
    pii_api_url: str  # http://127.0.0.1:PORT of the sample PII API
    providers_url: str  # http://127.0.0.1:PORT of the sandbox providers
    sendgrid_public_key: str = ""
    use_oauth: bool = True

    def provider_accounts(self) -> list[ProviderAccount]:
        ws = self.workspace_id
        return [
            ProviderAccount(SENDGRID, SENDGRID_KEY, ws, "sendgrid"),
            ProviderAccount(TWILIO, TWILIO_SID, ws, "twilio", secret=TWILIO_TOKEN),
            ProviderAccount(
                WHATSAPP, WHATSAPP_PHONE_ID, ws, "whatsapp", secret=WHATSAPP_APP_SECRET, access_token=WHATSAPP_TOKEN
            ),
            ProviderAccount(CUSTOM, GATEWAY_KEY, ws, "gateway", secret=GATEWAY_SECRET),
        ]

    def oauth_config(self) -> rpb.OAuthConfig:
        return rpb.OAuthConfig(
            workspace_id=self.workspace_id,
            oauth_config_id="crm",
            token_url=f"{self.pii_api_url}/oauth/token",
            client_id=OAUTH_CLIENT_ID,
            client_secret=OAUTH_CLIENT_SECRET,
        )

    def pii_api_configs(self) -> list[rpb.PiiApiConfig]:
        """Email: bulk with OAuth; SMS: single lookups; WhatsApp: bulk."""
        oauth = "crm" if self.use_oauth else ""
        names = {"first_name": "profile.first_name", "last_name": "profile.last_name"}
        bulk = dict(
            mode=rpb.MODE_BULK,
            method=rpb.HTTP_METHOD_POST,
            url=f"{self.pii_api_url}/v1/customers:batchGet",
            body='{"ids": "@anonymous_ids"}',
            results_path="data.results",
            id_path="id",
            attribute_paths=names,
            batch_size=500,
            oauth_config_id=oauth,
        )
        return [
            rpb.PiiApiConfig(workspace_id=self.workspace_id, channel=C.CHANNEL_EMAIL, contact_path="email", **bulk),
            rpb.PiiApiConfig(
                workspace_id=self.workspace_id,
                channel=C.CHANNEL_SMS,
                mode=rpb.MODE_SINGLE,
                method=rpb.HTTP_METHOD_GET,
                url=f"{self.pii_api_url}/v1/customers/@anonymous_id",
                id_path="customer.id",  # each reply must be for the customer asked for
                contact_path="customer.phone",
                attribute_paths={k: f"customer.{v}" for k, v in names.items()},
                oauth_config_id=oauth,
            ),
            rpb.PiiApiConfig(workspace_id=self.workspace_id, channel=C.CHANNEL_WHATSAPP, contact_path="phone", **bulk),
        ]

    def connectors(self, rate_limit_per_second: int = 0) -> dict[str, dpb.Connector]:
        ws, base = self.workspace_id, self.providers_url
        common = dict(workspace_id=ws, rate_limit_per_second=rate_limit_per_second)
        return {
            "sendgrid": dpb.Connector(
                connector_id="sendgrid",
                kind=dpb.CONNECTOR_KIND_SENDGRID,
                channel=C.CHANNEL_EMAIL,
                base_url=base,
                credentials={"api_key": SENDGRID_KEY},
                sender="news@brand.example",
                webhook_secret=self.sendgrid_public_key,
                **common,
            ),
            "twilio": dpb.Connector(
                connector_id="twilio",
                kind=dpb.CONNECTOR_KIND_TWILIO,
                channel=C.CHANNEL_SMS,
                base_url=base,
                credentials={"account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN},
                sender=TWILIO_FROM,
                **common,
            ),
            "whatsapp": dpb.Connector(
                connector_id="whatsapp",
                kind=dpb.CONNECTOR_KIND_WHATSAPP_CLOUD,
                channel=C.CHANNEL_WHATSAPP,
                base_url=f"{base}/v21.0",
                credentials={"access_token": WHATSAPP_TOKEN, "verify_token": "sandbox-verify"},
                sender=WHATSAPP_PHONE_ID,
                webhook_secret=WHATSAPP_APP_SECRET,
                **common,
            ),
            "gateway": dpb.Connector(
                connector_id="gateway",
                kind=dpb.CONNECTOR_KIND_CUSTOM_HTTP,
                channel=C.CHANNEL_SMS,
                base_url=base,
                credentials={"api_key": GATEWAY_KEY, "api_secret": GATEWAY_SECRET},
                sender="BRAND",
                custom_http=dpb.CustomHttpTemplate(
                    method="POST",
                    url="/sms/json",
                    body=(
                        "api_key=@credentials.api_key&api_secret=@credentials.api_secret"
                        "&from=@sender&to=@to&text=@text&client-ref=@message_id"
                    ),
                    message_id_path='messages[0]."message-id"',
                ),
                **common,
            ),
        }


async def configure(workspace: SandboxWorkspace, resolver, dispatcher, rate_limit_per_second: int = 0) -> None:
    """Saves the workspace's OAuth config, PII API configs and connectors through the public RPCs."""
    if workspace.use_oauth:
        await resolver.PutOAuthConfig(rpb.PutOAuthConfigRequest(config=workspace.oauth_config()))
    for config in workspace.pii_api_configs():
        await resolver.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=config))
    for connector in workspace.connectors(rate_limit_per_second).values():
        await dispatcher.PutConnector(dpb.PutConnectorRequest(connector=connector))
