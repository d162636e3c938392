"""The credentials of a role the desk assumes (adapters/aws/sts.py): assumed on first use,
assumed again before they expire, a refusal said with its account; no network."""

from __future__ import annotations

import datetime as dt
from typing import Any

import botocore.exceptions as bce
import botocore.session
import pytest
from botocore.config import Config

from provisioner.adapters.aws.sts import assumed_role_session, session_name
from provisioner.core.errors import RoleNotAssumable

ROLE = "arn:aws:iam::111111111111:role/provisioner-desk"


class FakeSts:
    def __init__(self, lifetimes: list[float | Exception]) -> None:
        self.lifetimes = lifetimes
        self.calls: list[dict[str, Any]] = []

    def assume_role(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        lifetime = self.lifetimes.pop(0)
        if isinstance(lifetime, Exception):
            raise lifetime
        n = len(self.calls)
        return {
            "Credentials": {
                "AccessKeyId": f"ASIA{n:016d}",
                "SecretAccessKey": f"secret-{n}",
                "SessionToken": f"token-{n}",
                "Expiration": dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime),
            }
        }


class FakeSession:
    region_name = "us-east-1"

    def __init__(self, sts: FakeSts) -> None:
        self.sts = sts
        self._session = botocore.session.Session()  # its service models are shared

    def client(self, service: str, config: Config | None = None) -> FakeSts:
        assert service == "sts"
        return self.sts


def session(sts: FakeSts, external_id: str = "") -> Any:
    return assumed_role_session(
        FakeSession(sts),  # type: ignore[arg-type]
        "prod",
        ROLE,
        external_id=external_id,
        desk="berlin 1",
        config=Config(),
    )


def test_the_role_is_assumed_on_first_use_with_the_external_id_and_the_desks_name() -> None:
    sts = FakeSts([3600])
    s = session(sts, external_id="ext-1")
    assert sts.calls == []  # nothing before the first call
    frozen = s.get_credentials().get_frozen_credentials()
    assert frozen.access_key == "ASIA0000000000000001"
    assert sts.calls == [
        {
            "RoleArn": ROLE,
            "RoleSessionName": "provisioner-berlin-1",
            "DurationSeconds": 3600,
            "ExternalId": "ext-1",
        }
    ]
    s.get_credentials().get_frozen_credentials()
    assert len(sts.calls) == 1  # an hour left: kept


def test_a_session_about_to_expire_is_assumed_again_before_it_is_used() -> None:
    sts = FakeSts([60, 3600])  # the first lasts a minute: under botocore's 10-minute floor
    s = session(sts)
    s.get_credentials().get_frozen_credentials()
    frozen = s.get_credentials().get_frozen_credentials()
    assert frozen.access_key == "ASIA0000000000000002"
    assert len(sts.calls) == 2
    assert "ExternalId" not in sts.calls[0]


def test_a_refused_renewal_names_the_account_and_the_role_and_no_secret() -> None:
    denied = bce.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "not authorized to perform sts:AssumeRole"}},
        "AssumeRole",
    )
    sts = FakeSts([60, denied])
    s = session(sts)
    s.get_credentials().get_frozen_credentials()
    with pytest.raises(RoleNotAssumable) as caught:
        s.get_credentials().get_frozen_credentials()
    line = caught.value.one_line()
    assert line.startswith(f"account prod: cannot assume role {ROLE}: AccessDenied")
    assert "trust policy" in line and "secret-1" not in line and "token-1" not in line


def test_the_session_name_is_one_sts_takes() -> None:
    assert session_name("desk/7 (lisbon)") == "provisioner-desk-7--lisbon-"
    assert len(session_name("x" * 100)) == 64


@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        ("AccessDenied", True),
        ("NoSuchEntity", True),
        ("Throttling", False),
        ("ServiceFailure", False),
    ],
)
def test_only_a_refusal_says_the_role_cannot_be_assumed(code: str, refusal: bool) -> None:
    from provisioner.adapters.aws.sts import refused

    error = bce.ClientError({"Error": {"Code": code, "Message": "m"}}, "AssumeRole")
    answer = refused("prod", ROLE, error)
    assert isinstance(answer, RoleNotAssumable) is refusal
    assert not getattr(answer, "ambiguous", False)


def test_no_answer_from_sts_is_not_ambiguous_and_names_the_account() -> None:
    from provisioner.adapters.aws.sts import refused

    answer = refused("prod", ROLE, bce.ReadTimeoutError(endpoint_url="https://sts"))
    assert not answer.ambiguous  # type: ignore[attr-defined]
    assert answer.message.startswith("account prod: no answer from STS to assume role")


def test_the_external_id_is_kept_out_of_reprs() -> None:
    from provisioner.config import AccountConfig

    assert "ext-42" not in repr(AccountConfig("prod", role_arn=ROLE, external_id="ext-42"))
