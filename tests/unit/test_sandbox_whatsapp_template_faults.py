"""The sandbox's `template_errors` fault: WhatsApp templates refused by name with Meta's code."""

from __future__ import annotations

import pytest

from sandbox.providers.model import Faults


def test_template_errors_are_read_from_the_admin_body_and_written_back() -> None:
    faults = Faults.from_json({"template_errors": {"welcome": 132001, "promo": 132015}})
    assert faults.template_errors == {"welcome": 132001, "promo": 132015}
    assert faults.to_json()["template_errors"] == {"welcome": 132001, "promo": 132015}
    assert Faults().to_json()["template_errors"] == {}


@pytest.mark.parametrize("value", [["welcome"], {"welcome": "132001"}, {"welcome": True}, {"welcome": 10**6}])
def test_template_errors_that_are_not_codes_by_name_are_refused_naming_the_field(value: object) -> None:
    with pytest.raises(ValueError, match="^template_errors must map template names to Meta's numeric error codes$"):
        Faults.from_json({"template_errors": value})
