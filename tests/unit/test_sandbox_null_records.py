"""The sample PII API's `null_records` fault: "no such customer" said in JSON, as some APIs do."""

from __future__ import annotations

import pytest

from sandbox.pii_api import Faults
from tests.unit.test_sandbox_pii_api import BATCH, make_sandbox, serve


@pytest.mark.asyncio
async def test_null_records_are_null_where_the_customer_would_be() -> None:
    faults = Faults.from_json({"null_records": ["cust-000001"]})
    assert faults.to_json()["null_records"] == ["cust-000001"]
    async with serve(make_sandbox(faults=faults)) as client:
        single = await client.get("/v1/customers/cust-000001")
        assert (single.status, await single.json()) == (200, {"customer": None})
        body = await (await client.post(BATCH, json={"ids": ["cust-000001", "cust-000002"]})).json()
    first, second = body["data"]["results"]
    assert first is None and second["id"] == "cust-000002"
    assert body["meta"] == {"requested": 2, "found": 1}
    with pytest.raises(ValueError, match="null_records must be a list of strings"):
        Faults.from_json({"null_records": "cust-000001"})
