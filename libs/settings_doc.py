"""The configuration reference in the README, generated from the settings classes.

`python -m libs.settings_doc` prints the table; a test checks the README holds
exactly this table, so the reference cannot drift from the code.
"""

from __future__ import annotations

from pydantic.fields import FieldInfo

from libs.settings import CommonSettings, DispatcherSettings, ReceiptsSettings, ResolverSettings

BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"


def value_range(field: FieldInfo) -> str:
    """The bounds a numeric setting is checked against at start-up, as the table shows them."""
    low = high = ""
    for bound in field.metadata:  # pydantic keeps ge=, gt= and le= as one constraint object each
        if getattr(bound, "ge", None) is not None:
            low = f"{bound.ge:,}"
        elif getattr(bound, "gt", None) is not None:
            low = f"> {bound.gt:,}"
        elif getattr(bound, "le", None) is not None:
            high = f"{bound.le:,}"
    if low and high:
        return f"{low} to {high}"
    if low:
        return low if low.startswith(">") else f"≥ {low}"
    return f"≤ {high}" if high else ""


def settings_table() -> str:
    services = (("resolver", ResolverSettings), ("dispatcher", DispatcherSettings), ("receipts", ReceiptsSettings))
    rows: dict[str, tuple[dict[str, str], str, str]] = {}
    for service, cls in services:
        for name, field in cls.model_fields.items():
            common = CommonSettings.model_fields.get(name)
            description = (common or field).description or ""
            defaults, _, _ = rows.setdefault("TOKENSEND_" + name.upper(), ({}, value_range(field), description))
            defaults[service] = "(none)" if field.default is None else f"`{field.default}`"
    lines = ["| variable | services | default | range | meaning |", "|---|---|---|---|---|"]
    for env, (defaults, bounds, description) in rows.items():
        used_by = "all" if len(defaults) == len(services) else ", ".join(defaults)
        values = set(defaults.values())
        default = values.pop() if len(values) == 1 else ", ".join(f"{v} ({k})" for k, v in defaults.items())
        lines.append(f"| `{env}` | {used_by} | {default} | {bounds} | {description} |")
    return "\n".join(lines)


def write_into(path: str) -> None:
    text = open(path, encoding="utf-8").read()
    start, end = text.index(BEGIN), text.index(END)
    with open(path, "w", encoding="utf-8") as out:
        out.write(text[:start] + BEGIN + "\n" + settings_table() + "\n" + text[end:])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:
        write_into(sys.argv[2])
    else:
        print(f"{BEGIN}\n{settings_table()}\n{END}")  # noqa: T201 - a generator for the README
