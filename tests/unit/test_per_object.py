"""Values derived once per config object."""

from __future__ import annotations

from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.per_object import PerObject


def test_a_value_is_derived_once_per_object_and_afresh_for_an_equal_new_one() -> None:
    derived: list[str] = []

    def derive(config: pb.OAuthConfig) -> str:
        derived.append(config.client_id)
        return config.client_id.upper()

    per_object = PerObject(derive)
    first = pb.OAuthConfig(client_id="crm")
    assert per_object(first) == per_object(first) == "CRM"
    again = pb.OAuthConfig(client_id="crm")  # what a save and a new load give: a new object
    assert per_object(again) == "CRM"
    assert derived == ["crm", "crm"]


def test_an_id_reused_by_another_object_is_not_mistaken_for_the_first() -> None:
    per_object = PerObject(lambda config: config.client_id, kept=1)
    assert per_object(pb.OAuthConfig(client_id="a")) == "a"
    # Past `kept` the first is let go; a new object may then get its id and must be derived afresh.
    for n in range(50):
        assert per_object(pb.OAuthConfig(client_id=f"b{n}")) == f"b{n}"


def test_it_holds_at_most_kept_objects() -> None:
    per_object = PerObject(lambda config: config.client_id, kept=3)
    configs = [pb.OAuthConfig(client_id=str(n)) for n in range(10)]
    for config in configs:
        per_object(config)
    assert len(per_object._values) <= 3
