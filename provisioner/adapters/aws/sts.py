"""Credentials of a role the desk assumes in another account (``[[accounts]] role_arn``).

botocore's refreshable credentials call sts:AssumeRole on first use and again before the
session expires (botocore refreshes when less than 15 minutes are left, and must when 10
are), so a daemon that runs for weeks never signs with an expired session. A refusal is a
RoleNotAssumable naming the account and the role; nothing secret is in its message.
"""

from __future__ import annotations

import re
from typing import Any

import boto3
import botocore.exceptions as bce
import botocore.session
from botocore.config import Config
from botocore.credentials import DeferredRefreshableCredentials

from provisioner.adapters.aws.iam import translate
from provisioner.core.errors import DirectoryError, ProvisionerError, RoleNotAssumable

#: How long each assumed session lasts (AWS's default and the roles' default maximum).
SESSION_SECONDS = 3600
_SESSION_NAME = re.compile(r"[^\w+=,.@-]", re.ASCII)


def session_name(desk: str) -> str:
    """RoleSessionName: ``provisioner-<desk>``, in the characters and length STS takes;
    CloudTrail in the member account shows it, so an auditor sees which desk acted."""
    return _SESSION_NAME.sub("-", f"provisioner-{desk}")[:64]


def assumed_role_session(
    base: boto3.session.Session,
    account: str,
    role_arn: str,
    *,
    external_id: str = "",
    desk: str,
    config: Config,
) -> boto3.session.Session:
    """A boto3 session whose credentials are ``role_arn``'s, assumed with ``base``'s
    credentials, refreshed before they expire."""
    sts: Any = base.client("sts", config=config)
    params: dict[str, Any] = {
        "RoleArn": role_arn,
        "RoleSessionName": session_name(desk),
        "DurationSeconds": SESSION_SECONDS,
    }
    if external_id:
        params["ExternalId"] = external_id

    def fetch() -> dict[str, str]:
        try:
            credentials = sts.assume_role(**params)["Credentials"]
        except (bce.BotoCoreError, bce.ClientError) as e:
            raise refused(account, role_arn, e) from e
        return {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": credentials["Expiration"].isoformat(),
        }

    core = botocore.session.Session()
    # the service models the base session has already read: each account's client is
    # then made in milliseconds, not the ~200 ms of reading them again
    core.register_component("data_loader", base._session.get_component("data_loader"))  # noqa: SLF001
    core._credentials = DeferredRefreshableCredentials(  # noqa: SLF001 - boto3's documented way
        refresh_using=fetch, method="assume-role"
    )
    return boto3.session.Session(botocore_session=core, region_name=base.region_name)


#: STS's codes for "this role may not be assumed by you" (trust policy, external id, the
#: desk's own permission, no such role).
_REFUSALS = frozenset({"AccessDenied", "AccessDeniedException", "NoSuchEntity"})


def refused(account: str, role_arn: str, error: Exception) -> ProvisionerError:
    """A failed AssumeRole in the operator's words: a refusal is RoleNotAssumable; any
    other answer (throttling, STS failing) or no answer is the directory's own error,
    never ambiguous: the call that needed the role was not sent."""
    translated = translate(error, "AssumeRole", role_arn, service="sts")
    code = ""
    if isinstance(error, bce.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
    if code in _REFUSALS:
        text = str(error.response.get("Error", {}).get("Message", "")).strip()  # type: ignore[attr-defined]
        return RoleNotAssumable(
            f"account {account}: cannot assume role {role_arn}: {code}"
            + (f": {text}" if text else ""),
            code=code,
        )
    if getattr(translated, "ambiguous", False):
        return DirectoryError(
            f"account {account}: no answer from STS to assume role {role_arn}: "
            f"{translated.message}",
            code="Unreachable",
            hint=translated.hint,
        )
    return translated
