"""Helpers shared by the local IAM stand-in tests (fixtures are in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
import pyotp
import pytest
from botocore.config import Config

from local_iam_server import LocalIamServer

STEP = 30

# One attempt per call: a retry would hide what the server answered.
NO_RETRY = Config(retries={"total_max_attempts": 1, "mode": "standard"})


def make_client(
    server: LocalIamServer,
    service: str,
    config: Config = NO_RETRY,
    *,
    access_key: tuple[str, str] = ("testing", "testing"),
) -> Any:
    """A real boto3 client pointed at the stand-in (dummy credentials by default)."""
    return boto3.client(
        service,
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=access_key[0],
        aws_secret_access_key=access_key[1],
        config=config,
    )


@dataclass(frozen=True)
class Device:
    """A virtual MFA device as created through boto3 (seed kept for computing codes)."""

    serial: str
    seed: str

    def __repr__(self) -> str:  # never show the seed in test output
        return f"Device(serial={self.serial!r})"

    def code(self, step: int) -> str:
        return str(pyotp.TOTP(self.seed).generate_otp(step))

    def pair(self, s: int) -> tuple[str, str]:
        """The codes of steps s-1 and s."""
        return self.code(s - 1), self.code(s)


def step_of(now: float) -> int:
    return int(now // STEP)


def error_of(excinfo: pytest.ExceptionInfo[Any]) -> tuple[str, int, str]:
    """(Code, HTTP status, Message) of a botocore ClientError."""
    response = excinfo.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"].get("Message", ""),
    )
