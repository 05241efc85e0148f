"""`test-pii-api FILE --channel CH` with a file holding no config for that channel names the channel asked
for and the ones the file holds ("for that channel" alone left the operator to guess both)."""

from __future__ import annotations

from pathlib import Path

from cli.exits import USAGE
from cli.main import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_a_file_without_the_channel_asked_for_names_both(capsys, tmp_path) -> None:
    sms = str(EXAMPLES / "pii-api-single-sms.yaml")
    assert main(["test-pii-api", sms, "--id", "cust-1", "--channel", "whatsapp", "--addr", "127.0.0.1:9"]) == USAGE
    assert capsys.readouterr().err == (
        f"tokensend: {sms}: holds no pii-api config for that channel (--channel whatsapp; it holds sms)\n"
    )
    both = tmp_path / "both.yaml"
    both.write_text((EXAMPLES / "pii-api-bulk-oauth.yaml").read_text() + "\n---\n" + Path(sms).read_text())
    assert (
        main(["test-pii-api", str(both), "--id", "cust-1", "--channel", "whatsapp", "--addr", "127.0.0.1:9"]) == USAGE
    )
    assert capsys.readouterr().err.endswith("(--channel whatsapp; it holds email, sms)\n")
