"""The IAM adapter: the only module that imports boto3/botocore.

Standard boto3 configuration (credential chain, profile, region, ``AWS_ENDPOINT_URL_IAM``
/ ``AWS_ENDPOINT_URL``), botocore's standard retry mode, inputs validated before they
are sent, and every botocore exception translated into the DirectoryError tree. Each answer's
``Date`` header feeds the AwsClock, so codes are computed for AWS's time, not ours.
The seed is taken out of the CreateVirtualMFADevice answer, together with the QR code
that encodes it, and handed on only as a Seed. An AccessDenied names the permission the
desk's principal lacks (``permissions.py`` lists those it needs). Kept in one module
so that every boto3 call goes through the one translation of its errors.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
import botocore.exceptions as bce
from botocore.config import Config
from botocore.parsers import ResponseParserError

from provisioner.adapters.aws.permissions import CallerIdentity, Decision, Evaluation
from provisioner.core import validation
from provisioner.core.clock import AwsClock
from provisioner.core.errors import (
    AccessDenied,
    AlreadyExists,
    AwsCredentialsMissing,
    ChangeInProgress,
    CodesRejected,
    ConcurrentChange,
    DeviceLimitReached,
    DirectoryError,
    DirectoryUnavailable,
    InUse,
    InvalidInput,
    NotFound,
    ProvisionerError,
    ServiceFailure,
    Throttled,
    UserNotFound,
    failure_reason,
)
from provisioner.core.model import DeviceSpec, VirtualDevice
from provisioner.core.secret import Seed

logger = logging.getLogger("provisioner.aws_iam")  # the journal's name for it, kept across moves

_BY_CODE: dict[str, type[DirectoryError]] = {
    "NoSuchEntity": NotFound,
    "LimitExceeded": DeviceLimitReached,
    "EntityAlreadyExists": AlreadyExists,
    "InvalidAuthenticationCode": CodesRejected,
    "EntityTemporarilyUnmodifiable": ChangeInProgress,
    "ConcurrentModification": ConcurrentChange,
    "Throttling": Throttled,
    "ThrottlingException": Throttled,
    "RequestLimitExceeded": Throttled,
    "ServiceFailure": ServiceFailure,
    "InternalFailure": ServiceFailure,
    "ServiceUnavailable": ServiceFailure,
    "AccessDenied": AccessDenied,
    "AccessDeniedException": AccessDenied,
    "DeleteConflict": InUse,
    "InvalidClientTokenId": AwsCredentialsMissing,
    "SignatureDoesNotMatch": AwsCredentialsMissing,
    "ExpiredToken": AwsCredentialsMissing,
}

_AMBIGUOUS = (
    bce.ConnectionClosedError,
    bce.ReadTimeoutError,
    ResponseParserError,
    bce.IncompleteReadError,
)
_UNREACHABLE = (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ProxyConnectionError)


def guard_vendor_logging() -> None:
    """botocore's DEBUG log prints response bodies: the seed is in one. Never below INFO."""
    for name in ("botocore", "boto3", "urllib3"):
        log = logging.getLogger(name)
        if log.level < logging.INFO:
            log.setLevel(logging.INFO)


#: Told of each IAM call: (AWS action name, retries botocore made, error code or None).
CallObserver = Callable[[str, int, "str | None"], None]


# "User: arn:... is not authorized to perform: iam:EnableMFADevice on resource: ..."
_PERFORM = re.compile(r"\bperform: ([A-Za-z0-9-]+:[A-Za-z0-9*]+)")


def translate(
    error: Exception, action: str, subject: str, service: str = "iam"
) -> ProvisionerError:
    """One botocore exception -> one DirectoryError that says what was being done to whom."""
    if isinstance(error, bce.ClientError):
        err = error.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        text = str(err.get("Message", "")).strip()
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        cls = _BY_CODE.get(code)
        if cls is AccessDenied:
            return _access_denied(action, subject, service, code, text)
        if cls is None:
            cls = ServiceFailure if status >= 500 else DirectoryError
        message = f"IAM refused {action} for {subject}: {code}" + (f": {text}" if text else "")
        return cls(message, code=code)
    if isinstance(error, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return AwsCredentialsMissing(f"no AWS credentials to {action}: {error}")
    if isinstance(error, bce.ParamValidationError):
        return InvalidInput(f"refused to send {action} for {subject}: {error}")
    if isinstance(error, _UNREACHABLE):
        # Not ambiguous: nothing reached IAM.
        return DirectoryError(
            f"cannot reach IAM to {action} for {subject}: {error}",
            code="Unreachable",
            hint=DirectoryUnavailable.hint,
        )
    if isinstance(error, _AMBIGUOUS):
        return DirectoryUnavailable(
            f"no usable answer from IAM to {action} for {subject}: {type(error).__name__}"
        )
    return DirectoryUnavailable(f"IAM call {action} for {subject} failed: {type(error).__name__}")


def _access_denied(action: str, subject: str, service: str, code: str, text: str) -> AccessDenied:
    """Name the missing permission: AWS's own words if it said them, else the IAM action
    called (an IAM API name is its permission's name). STS's AccessDenied for a login is
    a refused MFA code, not a permission."""
    found = _PERFORM.search(text)
    permission = found.group(1) if found else (f"iam:{action}" if service == "iam" else None)
    detail = f"{code}: {text}" if text else code
    if permission is None:
        return AccessDenied(
            f"{service.upper()} refused {action} for {subject}: {detail}", code=code
        )
    return AccessDenied(
        f"IAM refused {action} for {subject}: the desk's AWS principal lacks {permission} "
        f"({detail})",
        code=code,
        permission=permission,
        hint=f"grant the desk's AWS principal {permission}, as docs/iam-policy.json does",
    )


@dataclass(frozen=True)
class AssumedRole:
    """The role the desk assumes in an account it serves (``[[accounts]]``)."""

    account: str
    role_arn: str
    external_id: str = ""
    desk: str = "desk"

    def denied(self, error: AccessDenied) -> AccessDenied:
        """A permission the role lacks, said of the role (not of the desk's principal)."""
        who = f"the role {self.role_arn} of account {self.account}"
        return AccessDenied(
            error.message.replace("the desk's AWS principal", who),
            code=error.code,
            permission=error.permission,
            hint=f"grant {who} {error.permission or 'the permission'}, as "
            "docs/member-account-role-policy.json does",
        )


#: The error codes with which AWS says "too many requests".
THROTTLING_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)


class IamClient:
    """IamDirectory over boto3."""

    #: IAM lets a user hold at most this many MFA devices of any kind.
    device_limit = 8

    def __init__(
        self,
        clock: AwsClock,
        *,
        profile: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        local_time: Callable[[], float] = time.time,
        role: AssumedRole | None = None,
        base: boto3.session.Session | None = None,
    ) -> None:
        """The desk's own account (its profile's or the environment's credentials), or,
        with ``role``, another account's through the role the desk assumes there
        (starting from ``base``, the desk's own session, when given: its credentials and
        the service models it has read)."""
        guard_vendor_logging()
        self._observers: list[CallObserver] = []
        self._clock = clock
        self._local_time = local_time
        self._role = role
        try:
            session = base or boto3.session.Session(profile_name=profile or None)
        except bce.ProfileNotFound as e:
            raise AwsCredentialsMissing(f"AWS profile {profile!r} is not configured") from e
        config = Config(
            region_name=region or session.region_name or "us-east-1",
            # adaptive: botocore's standard retries, and a client-side rate limit that
            # backs off when AWS throttles (many desks on one account share its limits)
            retries={"mode": "adaptive", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            user_agent_extra="provisioner",
            # an idle desk's connection stays open (with keep_warm): the next plug does
            # not pay a TCP and TLS handshake before its first call
            tcp_keepalive=True,
            # a hub of 16 tokens, each enrollment's two checks side by side: 32 calls at
            # once keep their connections (botocore's default pool keeps 10 and opens,
            # then drops, one more connection, TLS handshake and all, for each beyond)
            max_pool_connections=32,
        )
        if role is not None:
            from provisioner.adapters.aws.sts import assumed_role_session

            session = assumed_role_session(
                session,
                role.account,
                role.role_arn,
                external_id=role.external_id,
                desk=role.desk,
                config=config,
            )
        self._iam = session.client("iam", endpoint_url=endpoint_url or None, config=config)
        # STS (who the desk is) through boto3's own endpoint resolution: AWS_ENDPOINT_URL_STS
        # or AWS_ENDPOINT_URL, else AWS. Made on first use; enrollments never need it.
        self._session, self._config = session, config
        #: The desk's own session (its credentials), which another account's client can
        #: start from: ``IamClient(..., role=..., base=client.base_session)``.
        self.base_session = base or session if role is None else base
        self._sts: Any = None
        events = self._iam.meta.events
        events.register("before-call.iam", self._before_call)
        events.register("after-call.iam", self._after_call)
        events.register("needs-retry.iam", self._throttled)
        self._throttle_observers: list[Callable[[str], None]] = []

    def observe_calls(self, observer: CallObserver) -> None:
        """Tell ``observer`` about each call: its action, retries, and error code if any."""
        self._observers.append(observer)

    def _tell_observers(self, action: str, retries: int, error_code: str | None) -> None:
        for observer in self._observers:
            observer(action, retries, error_code)

    @property
    def endpoint_url(self) -> str:
        return str(self._iam.meta.endpoint_url)

    def observe_throttling(self, observer: Callable[[str], None]) -> None:
        """Tell ``observer`` the action of each answer AWS throttled (retried or not)."""
        self._throttle_observers.append(observer)

    def _throttled(self, response: Any = None, operation: Any = None, **_: Any) -> None:
        if not response:
            return
        code = (response[1] or {}).get("Error", {}).get("Code")
        if code in THROTTLING_CODES:
            action = getattr(operation, "name", "?")
            for observer in self._throttle_observers:
                observer(action)

    # --- AWS's clock --------------------------------------------------------------------

    def _before_call(self, context: dict[str, Any], **_: Any) -> None:
        context["provisioner_sent"] = self._local_time()

    def _after_call(self, http_response: Any, context: dict[str, Any], **_: Any) -> None:
        received = self._local_time()
        date = getattr(http_response, "headers", {}).get("Date")
        sent = context.get("provisioner_sent", received)
        if not date:
            return
        try:
            server = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            logger.debug("unreadable Date header from IAM: %r", date)
            return
        self._clock.observe(server, sent=sent, received=received)

    # --- calls --------------------------------------------------------------------------

    def _call(self, action: str, subject: str, **params: Any) -> dict[str, Any]:
        method = getattr(self._iam, action)
        name = self._iam.meta.method_to_api_mapping.get(action, action)  # AWS's own word
        logger.debug("IAM %s for %s", name, subject)
        try:
            result: dict[str, Any] = method(**params)
        except (bce.BotoCoreError, bce.ClientError, ResponseParserError) as e:
            error = translate(e, name, subject)
            if self._role is not None and isinstance(error, AccessDenied):
                error = self._role.denied(error)
            logger.debug("IAM %s for %s failed: %s", name, subject, error.message)
            response = getattr(e, "response", None) or {}  # None when no answer came
            retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
            self._tell_observers(name, int(retries or 0), failure_reason(error))
            raise error from e
        meta = result.get("ResponseMetadata", {})
        self._tell_observers(name, int(meta.get("RetryAttempts") or 0), None)
        logger.debug(
            "IAM %s for %s: HTTP %s after %s retries",
            name,
            subject,
            meta.get("HTTPStatusCode"),
            meta.get("RetryAttempts", 0),
        )
        return result

    def user_account(self, user: str) -> str:
        return self.user_arn(user).split(":")[4]

    def device_id(self, account: str, path: str, name: str) -> str:
        return f"arn:aws:iam::{account}:mfa{path}{name}"

    def device_account(self, device_id: str) -> str:
        return device_id.split(":")[4]

    def under_path(self, device_id: str, path: str) -> bool:
        return f":mfa{path}" in device_id

    def user_arn(self, user: str) -> str:
        validation.user_name(user)
        try:
            return str(self._call("get_user", user, UserName=user)["User"]["Arn"])
        except NotFound as e:
            raise UserNotFound(f"IAM user {user} does not exist", code=e.code) from e

    def list_mfa_devices(self, user: str) -> list[str]:
        validation.user_name(user)
        serials: list[str] = []
        marker: str | None = None
        while True:
            params: dict[str, Any] = {"UserName": user}
            if marker:
                params["Marker"] = marker
            try:
                page = self._call("list_mfa_devices", user, **params)
            except NotFound as e:
                raise UserNotFound(f"IAM user {user} does not exist", code=e.code) from e
            serials.extend(str(d["SerialNumber"]) for d in page.get("MFADevices", []))
            if not page.get("IsTruncated"):
                return serials
            marker = page.get("Marker")

    def create_virtual_mfa_device(self, spec: DeviceSpec) -> tuple[str, Seed]:
        validation.device_name(spec.name)
        validation.device_path(spec.path)
        validation.tags(spec.tags)
        result = self._call(
            "create_virtual_mfa_device",
            f"{spec.path}{spec.name}",
            VirtualMFADeviceName=spec.name,
            Path=spec.path,
            Tags=[{"Key": k, "Value": v} for k, v in spec.tags],
        )
        device = result.get("VirtualMFADevice", {})
        raw = device.pop("Base32StringSeed", None)
        device.pop("QRCodePNG", None)  # it encodes the seed too
        serial = str(device.get("SerialNumber", ""))
        if not raw or not serial:
            raise DirectoryUnavailable(f"IAM created {spec.name} but returned no seed or serial")
        try:
            return serial, Seed.from_base32(raw)
        except ValueError as e:
            raise DirectoryUnavailable(f"IAM returned an unreadable seed for {serial}") from e

    def enable_mfa_device(self, user: str, serial: str, code1: str, code2: str) -> None:
        validation.user_name(user)
        validation.serial_number(serial)
        validation.auth_code(code1)
        validation.auth_code(code2)
        self._call(
            "enable_mfa_device",
            user,
            UserName=user,
            SerialNumber=serial,
            AuthenticationCode1=code1,
            AuthenticationCode2=code2,
        )

    def resync_mfa_device(self, user: str, serial: str, code1: str, code2: str) -> None:
        validation.user_name(user)
        validation.serial_number(serial)
        validation.auth_code(code1)
        validation.auth_code(code2)
        self._call(
            "resync_mfa_device",
            user,
            UserName=user,
            SerialNumber=serial,
            AuthenticationCode1=code1,
            AuthenticationCode2=code2,
        )

    def deactivate_mfa_device(self, user: str, serial: str) -> None:
        validation.user_name(user)
        validation.serial_number(serial)
        self._call("deactivate_mfa_device", user, UserName=user, SerialNumber=serial)

    def delete_virtual_mfa_device(self, serial: str) -> None:
        validation.serial_number(serial)
        self._call("delete_virtual_mfa_device", serial, SerialNumber=serial)

    def tag_device(self, device_id: str, tags: Sequence[tuple[str, str]]) -> None:
        validation.serial_number(device_id)
        validation.tags(tuple(tags))
        self._call(
            "tag_mfa_device",
            device_id,
            SerialNumber=device_id,
            Tags=[{"Key": k, "Value": v} for k, v in tags],
        )

    def keep_warm(self) -> None:
        """The cheapest call the desk may make (one unassigned device listed): its
        connection to IAM stays open through idle periods."""
        self._call(
            "list_virtual_mfa_devices", "keep-warm", AssignmentStatus="Unassigned", MaxItems=1
        )

    def list_virtual_mfa_devices(self, *, assigned: bool | None = None) -> list[VirtualDevice]:
        status = {None: "Any", True: "Assigned", False: "Unassigned"}[assigned]
        devices: list[VirtualDevice] = []
        marker: str | None = None
        while True:
            params: dict[str, Any] = {"AssignmentStatus": status}
            if marker:
                params["Marker"] = marker
            page = self._call("list_virtual_mfa_devices", f"{status.lower()} devices", **params)
            for d in page.get("VirtualMFADevices", []):
                d.pop("Base32StringSeed", None)  # never returned by AWS; never kept if it is
                d.pop("QRCodePNG", None)
                devices.append(
                    VirtualDevice(
                        serial_number=str(d["SerialNumber"]),
                        user=(d.get("User") or {}).get("UserName"),
                        tags=tuple((t["Key"], t["Value"]) for t in d.get("Tags", [])),
                    )
                )
            if not page.get("IsTruncated"):
                return devices
            marker = page.get("Marker")

    # --- the desk's own principal ------------------------------------------------------

    def caller_identity(self) -> CallerIdentity:
        """Who these credentials are (STS GetCallerIdentity: no permission needed)."""
        if self._sts is None:
            self._sts = self._session.client("sts", config=self._config)
        try:
            answer = self._sts.get_caller_identity()
        except (bce.BotoCoreError, bce.ClientError, ResponseParserError) as e:
            raise translate(e, "GetCallerIdentity", "the desk's credentials", "sts") from e
        return CallerIdentity(
            account=str(answer["Account"]), arn=str(answer["Arn"]), user_id=str(answer["UserId"])
        )

    def simulate(self, principal_arn: str, checks: Iterable[tuple[str, str]]) -> list[Evaluation]:
        """IAM's policy simulator on each (action, resource) for ``principal_arn``, in order.

        One SimulatePrincipalPolicy per distinct resource (the simulator crosses every
        action with every resource it is given), pages followed.
        """
        wanted = [(str(action), str(resource)) for action, resource in checks]
        by_resource: dict[str, list[str]] = {}
        for action, resource in wanted:
            actions = by_resource.setdefault(resource, [])
            if action not in actions:
                actions.append(action)
        decisions: dict[tuple[str, str], Decision] = {}
        for resource, actions in by_resource.items():
            for result in self._simulate_on(principal_arn, actions, resource):
                key = (str(result.get("EvalActionName", "")).lower(), resource)
                decisions[key] = _decision_on(result, resource)
        evaluations = []
        for action, resource in wanted:
            decision = decisions.get((action.lower(), resource))
            if decision is None:
                raise DirectoryUnavailable(
                    f"IAM's policy simulator said nothing about {action} on {resource}"
                )
            evaluations.append(Evaluation(action, resource, decision))
        return evaluations

    def _simulate_on(
        self, principal_arn: str, actions: list[str], resource: str
    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        marker: str | None = None
        while True:
            params: dict[str, Any] = {"PolicySourceArn": principal_arn, "ActionNames": actions}
            if resource != "*":  # "*" is the simulator's default
                params["ResourceArns"] = [resource]
            if marker:
                params["Marker"] = marker
            page = self._call("simulate_principal_policy", principal_arn, **params)
            results.extend(page.get("EvaluationResults", []))
            if not page.get("IsTruncated"):
                return results
            marker = page.get("Marker")


def _decision_on(result: dict[str, Any], resource: str) -> Decision:
    """The decision for ``resource``: its own entry if the simulator gave per-resource
    results, else the (then single-resource) top-level one."""
    value = result.get("EvalDecision")
    for specific in result.get("ResourceSpecificResults") or []:
        if specific.get("EvalResourceName") == resource:
            value = specific.get("EvalResourceDecision")
    try:
        return Decision(str(value))
    except ValueError:
        raise DirectoryUnavailable(
            f"IAM's policy simulator answered an unknown decision {value!r}"
        ) from None


def login_with_mfa(serial: str, code: str, *, profile: str | None = None) -> str:
    """STS GetSessionToken with an MFA code: the proof that AWS accepts codes of the token.

    In AWS this works for the caller's own device only (a user checking their new token);
    the local IAM server accepts it for any assigned device, which is what the demo uses.
    Returns the session's expiration time as text; the session credentials are dropped.
    """
    validation.serial_number(serial)
    validation.auth_code(code)
    session = boto3.session.Session(profile_name=profile or None)
    sts = session.client(
        "sts",
        region_name=session.region_name or "us-east-1",
        config=Config(retries={"mode": "standard", "total_max_attempts": 3}),
    )
    try:
        answer = sts.get_session_token(SerialNumber=serial, TokenCode=code, DurationSeconds=900)
    except (bce.BotoCoreError, bce.ClientError, ResponseParserError) as e:
        raise translate(e, "GetSessionToken", serial, "sts") from e
    return str(answer["Credentials"]["Expiration"])
