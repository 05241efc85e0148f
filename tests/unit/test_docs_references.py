"""What the README and docs/ point at exists: the files they name, and the dependencies they explain."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from libs.settings import DispatcherSettings, ReceiptsSettings, ResolverSettings

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A path into the repository, as the docs write one: `tests/unit/test_x.py`, `unit/test_x.py`,
# `services/dispatcher/campaign.py`, `examples/content-sms.yaml`.
NAMED_PATH = re.compile(
    r"(?<![\w/.-])((?:tests/)?(?:unit|integration|e2e)/[\w./-]+|"
    r"(?:services|libs|bench|sandbox|cli|scripts|deploy|protos|examples|docs)/[\w./-]+)"
)
# Written by runs, never kept in the repository (bench/results/ is ignored).
RUN_OUTPUTS = ("bench/results/",)


def named_paths(text: str) -> set[str]:
    found = set()
    for match in NAMED_PATH.finditer(text):
        path = match.group(1).rstrip(".,;:")
        if path.startswith(RUN_OUTPUTS):
            continue
        if path.startswith(("unit/", "integration/", "e2e/")):
            path = "tests/" + path
        found.add(path)
    return found


def exists(path: str) -> bool:
    if (ROOT / path).exists() or (ROOT / f"{path}.py").exists():
        return True
    # `libs/server`, a module; `libs/server.tune_gc`, `libs/telemetry.ServerSpans`: a name in one.
    module, _, name = path.rpartition(".")
    return bool(module) and name.isidentifier() and (ROOT / f"{module}.py").exists()


def test_named_paths_are_read_as_paths() -> None:
    text = "see `tests/unit/test_docs.py`, integration/test_preview.py and libs/server.tune_gc."
    assert named_paths(text) == {"tests/unit/test_docs.py", "tests/integration/test_preview.py", "libs/server.tune_gc"}


def test_every_file_the_readme_and_docs_name_exists() -> None:
    missing = [
        f"{page.relative_to(ROOT)}: {path}"
        for page in PAGES
        for path in sorted(named_paths(page.read_text()))
        if not exists(path)
    ]
    assert not missing, f"paths named in the docs that do not exist: {missing}"


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def dependency_table() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Why each dependency is here") :]
    end = section.find("\n## ", 1)
    return section if end < 0 else section[:end]


def explained_names(table: str) -> tuple[set[str], set[str], set[str]]:
    """The runtime, dev and npm packages the README's table names, `-sdk` read as `opentelemetry-sdk`."""
    runtime, dev, npm = set(), set(), set()
    for row in table.splitlines():
        if not row.startswith("| ") or row.startswith(("| package", "|---")):
            continue
        cell = row.split("|")[1].strip()
        target = runtime
        for kind, into in (("dev:", dev), ("npm:", npm)):
            if cell.startswith(kind):
                cell, target = cell[len(kind) :].strip(), into
        stem = ""
        for name in (part.strip() for part in cell.split(",")):
            name = re.sub(r"\[.*?\]", "", name)
            if name.startswith("-"):
                name = stem + name
            else:
                stem = name.rsplit("-", 1)[0] if "-" in name else name
            target.add(name.lower())
    return runtime, dev, npm


def test_dependency_rows_are_read_as_names() -> None:
    table = (
        "| package | why |\n|---|---|\n| opentelemetry-api, -sdk | traces |\n| redis | client |\n"
        "| dev: moto[server], aiosmtpd | peers |\n| npm: @bufbuild/buf | lint |\n"
    )
    assert explained_names(table) == (
        {"opentelemetry-api", "opentelemetry-sdk", "redis"},
        {"moto", "aiosmtpd"},
        {"@bufbuild/buf"},
    )


def test_the_readme_explains_every_dependency_and_no_other() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    # Extras installed with a dependency are dependencies too: `redis[hiredis]` brings hiredis.
    runtime |= {
        extra.strip().lower()
        for r in project["dependencies"]
        for extras in re.findall(r"\[(.*?)\]", r.split(";")[0])
        for extra in extras.split(",")
        if requirement_name(r) == "redis"
    }
    dev = {requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    npm = {name.lower() for name in json.loads((ROOT / "package.json").read_text())["devDependencies"]}

    named_runtime, named_dev, named_npm = explained_names(dependency_table())
    assert named_runtime == runtime, (
        f"not explained: {sorted(runtime - named_runtime)}; not dependencies: {sorted(named_runtime - runtime)}"
    )
    assert named_dev == dev, f"not explained: {sorted(dev - named_dev)}; not dependencies: {sorted(named_dev - dev)}"
    assert named_npm == npm, f"not explained: {sorted(npm - named_npm)}; not dependencies: {sorted(named_npm - npm)}"


def test_the_readme_services_table_names_the_default_ports() -> None:
    text = (ROOT / "README.md").read_text()
    rows = {
        "resolver": ResolverSettings.model_fields["grpc_port"].default,
        "dispatcher": DispatcherSettings.model_fields["grpc_port"].default,
        "receipts": ReceiptsSettings.model_fields["grpc_port"].default,
    }
    for service, port in rows.items():
        row = re.search(rf"^\| {service} \| .*$", text, re.M)
        assert row is not None, f"no row for the {service} in the README's services table"
        assert f"(:{port})" in row[0], f"the {service}'s row does not name its default port {port}"
    webhooks = ReceiptsSettings.model_fields["http_port"].default
    assert f"webhooks (:{webhooks})" in text
    assert f"+ webhooks :{webhooks}" in text  # the walkthrough's `serve all` line
