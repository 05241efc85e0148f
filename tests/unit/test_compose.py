"""docker-compose.yml, the Dockerfile and the collector config agree with the code (no Docker engine needed).

Every command of our image is a real entry point that accepts its flags, every
TOKENSEND_* variable is a real setting of that service (and a valid value),
published ports are the ports the code listens on, and every host:port one
container uses to reach another names a service and a port it listens on.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from libs.settings import CommonSettings, DispatcherSettings, ReceiptsSettings, ResolverSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SETTINGS = {
    "services.resolver": ResolverSettings,
    "services.dispatcher": DispatcherSettings,
    "services.receipts": ReceiptsSettings,
}
# Values for `${VAR:?message}`, which compose refuses to start without.
REQUIRED_VARIABLES = {"TOKENSEND_SECRET_KEY": base64.urlsafe_b64encode(b"k" * 32).decode()}


def interpolate(value: str) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, as with an empty environment."""

    def replace(match: re.Match[str]) -> str:
        name, operator, word = match.group(1), match.group(2), match.group(3) or ""
        if operator == "?":
            assert name in REQUIRED_VARIABLES, f"add a valid test value for required ${{{name}}}"
            return REQUIRED_VARIABLES[name]
        return word if operator == "-" else ""

    return re.sub(r"\$\{(\w+)(?::?([-?])([^}]*))?\}", replace, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def our_services() -> dict[str, dict[str, Any]]:
    """The services that run our image (the rest are Redis, the collector and Jaeger)."""
    return {name: s for name, s in SERVICES.items() if "build" in s or str(s.get("image", "")).startswith("tokensend")}


def module_of(command: list[str]) -> tuple[str, list[str]]:
    assert command[:2] == ["python", "-m"], f"{command}: expected python -m MODULE"
    return command[2], command[3:]


def settings_for(name: str, monkeypatch: pytest.MonkeyPatch) -> CommonSettings:
    """The service's settings exactly as it would read them inside its container."""
    module, _ = module_of(SERVICES[name]["command"])
    for key in list(os.environ):
        if key.startswith("TOKENSEND_"):
            monkeypatch.delenv(key)
    for key, value in environment(SERVICES[name]).items():
        monkeypatch.setenv(key, value)
    return SETTINGS[module]()


def published_container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        text = str(entry["target"] if isinstance(entry, dict) else entry).split("/")[0]
        ports.add(int(text.rsplit(":", 1)[-1]))
    return ports


def parse_sandbox_args(module: str, args: list[str]):
    if module == "sandbox.pii_api":
        from sandbox.pii_api import _parse_args
    elif module == "sandbox.providers":
        from sandbox.providers.cli import _parse_args
    else:
        raise AssertionError(f"no parser known for {module}")
    return _parse_args(args)


def listening_ports(name: str, monkeypatch: pytest.MonkeyPatch) -> set[int]:
    module, args = module_of(SERVICES[name]["command"])
    if module in SETTINGS:
        settings = settings_for(name, monkeypatch)
        return {settings.grpc_port, *([settings.http_port] if isinstance(settings, ReceiptsSettings) else [])}
    return {parse_sandbox_args(module, args).port}


@pytest.mark.parametrize("name", sorted(our_services()))
def test_command_is_a_real_entry_point_with_valid_flags(name: str) -> None:
    module, args = module_of(SERVICES[name]["command"])
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{name}: no module {module}"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        main = Path(next(iter(spec.submodule_search_locations))) / "__main__.py"
        assert main.is_file(), f"{name}: {module} has no __main__.py"
    else:
        assert 'if __name__ == "__main__"' in Path(spec.origin).read_text(), f"{name}: {module} cannot run as -m"
    if module in SETTINGS:
        assert args == [], f"{name}: services take settings from the environment, not flags: {args}"
    else:
        parse_sandbox_args(module, args)  # argparse exits on a flag it does not know


@pytest.mark.parametrize("name", sorted(our_services()))
def test_every_tokensend_variable_is_a_setting_of_that_service(name: str, monkeypatch) -> None:
    module, _ = module_of(SERVICES[name]["command"])
    variables = [key for key in environment(SERVICES[name]) if key.startswith("TOKENSEND_")]
    if module not in SETTINGS:
        assert variables == [], f"{name}: the sandbox reads no TOKENSEND_ settings"
        return
    fields = SETTINGS[module].model_fields
    unknown = [key for key in variables if key.removeprefix("TOKENSEND_").lower() not in fields]
    assert unknown == [], f"{name}: not settings of {SETTINGS[module].__name__}: {unknown}"
    settings_for(name, monkeypatch)  # and the values validate


@pytest.mark.parametrize("name", sorted(our_services()))
def test_published_ports_are_the_ports_the_service_listens_on(name: str, monkeypatch) -> None:
    published = published_container_ports(SERVICES[name])
    listening = listening_ports(name, monkeypatch)
    assert published, f"{name}: publishes no port"
    assert published <= listening, f"{name}: publishes {published}, listens on {listening}"


def test_service_ports_are_the_documented_defaults(monkeypatch) -> None:
    expected = {"resolver": {50051}, "dispatcher": {50052}, "receipts": {50053, 8080}}
    for name, ports in expected.items():
        assert listening_ports(name, monkeypatch) == ports
        field_defaults = {SETTINGS[module_of(SERVICES[name]["command"])[0]].model_fields["grpc_port"].default}
        assert field_defaults <= ports, f"{name}: its default port differs from compose's"


def reachable(host: str, port: int, monkeypatch) -> bool:
    if host not in SERVICES:
        return False
    if host in our_services():
        return port in listening_ports(host, monkeypatch)
    return port in published_container_ports(SERVICES[host]) or host == "otel-collector"


@pytest.mark.parametrize("name", sorted(our_services()))
def test_addresses_between_containers_name_a_service_and_its_port(name: str, monkeypatch) -> None:
    env = environment(SERVICES[name])
    _, args = module_of(SERVICES[name]["command"])
    targets = []
    for key, value in env.items():
        if key.endswith("_ADDR"):
            host, _, port = value.rpartition(":")
            targets.append((key, host, int(port)))
        elif key.endswith("_URL") or key.endswith("_ENDPOINT"):
            url = urlsplit(value)
            default = {"redis": 6379, "http": 80, "https": 443}.get(url.scheme)
            targets.append((key, url.hostname, url.port or default))
    for flag, value in zip(args, args[1:], strict=False):
        if flag.endswith("-url"):
            url = urlsplit(value)
            targets.append((flag, url.hostname, url.port))
    for key, host, port in targets:
        assert reachable(host, port, monkeypatch), f"{name}: {key} points at {host}:{port}, which nothing serves"
    for dependency in SERVICES[name].get("depends_on", []):
        assert dependency in SERVICES


def test_the_collector_receives_on_the_port_the_services_export_to() -> None:
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    endpoint = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    exported = {
        urlsplit(environment(s)["OTEL_EXPORTER_OTLP_ENDPOINT"]).port
        for s in our_services().values()
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in environment(s)
    }
    assert exported == {int(endpoint.rsplit(":", 1)[1])}
    jaeger = collector["exporters"]["otlp/jaeger"]["endpoint"]
    assert jaeger.split(":")[0] in SERVICES


def test_collector_redaction_allows_only_listed_keys() -> None:
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    redaction = collector["processors"]["redaction"]
    assert redaction["allow_all_keys"] is False
    keys = redaction["allowed_keys"]
    assert isinstance(keys, list) and keys and all(isinstance(k, str) and k for k in keys)
    assert len(keys) == len(set(keys))
    for pattern in redaction.get("blocked_values", []):
        re.compile(pattern)
    for pipeline in collector["service"]["pipelines"].values():
        assert "redaction" in pipeline["processors"], "every pipeline passes the redaction processor"
        assert set(pipeline["processors"]) <= set(collector["processors"])


def test_redis_keeps_configs_across_restarts() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volumes = [str(v).split(":") for v in redis["volumes"]]
    assert any(target == "/data" and source in (COMPOSE.get("volumes") or {}) for source, target, *_ in volumes)


def final_stage(dockerfile: str) -> list[str]:
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    return lines[starts[-1] :]


def test_image_is_slim_and_runs_as_a_non_root_user() -> None:
    stage = final_stage((ROOT / "Dockerfile").read_text())
    assert "slim" in stage[0] or "distroless" in stage[0] or "alpine" in stage[0], stage[0]
    users = [line.split(None, 1)[1].strip() for line in stage if line.upper().startswith("USER ")]
    assert users, "the final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {user}"


def test_image_holds_every_package_the_commands_and_entry_points_import() -> None:
    stage = "\n".join(final_stage((ROOT / "Dockerfile").read_text()))
    packages = {module_of(s["command"])[0].split(".")[0] for s in our_services().values()}
    packages |= {"libs", "cli"}  # shared code, and the `tokensend` script pyproject.toml declares
    for package in sorted(packages):
        assert re.search(rf"COPY\s+--from=\S+\s+\S*/{package}\s", stage + "\n"), f"the image lacks {package}/"


def test_the_collector_takes_the_metrics_the_services_export_and_publishes_them() -> None:
    """The services send metrics to the endpoint they send spans to: without a metrics pipeline the
    Collector refuses them (UNIMPLEMENTED), each service logs an export error a minute and every count is lost."""
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    pipeline = collector["service"]["pipelines"].get("metrics")
    assert pipeline is not None, "no metrics pipeline"
    assert pipeline["receivers"] == ["otlp"]
    assert pipeline["processors"][0] == "redaction"  # first, before batching and export
    assert pipeline["exporters"] and set(pipeline["exporters"]) <= set(collector["exporters"])
    endpoints = [collector["exporters"][name].get("endpoint", "") for name in pipeline["exporters"]]
    scraped = {int(e.rsplit(":", 1)[1]) for e in endpoints if e.startswith("0.0.0.0:")}
    assert scraped and scraped <= published_container_ports(SERVICES["otel-collector"])
