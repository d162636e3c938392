"""moto's IAM and STS, patched to refuse what AWS refuses.

moto 5 accepts any EnableMFADevice codes, serials it never created, devices already in
use and a ninth device; it drops tags, deletes assigned devices, lists seeds, and has no
Tag/Untag/ListMFADeviceTags, ResyncMFADevice or GetMFADevice (HTTP 500). A test that
passes against it proves nothing about the codes, so :func:`install` replaces those
operations, in moto's IAM backend and response classes, with :class:`StrictIamRules`.

Errors are moto's own ``IAMException`` subclasses: moto's serializer looks their code up
in botocore's IAM model, so boto3 sees the same Code and HTTP status as from AWS. STS's
``AccessDenied`` is not in the STS model (moto would send 400), so that one body is
rendered here with its real 403.

Seeds stay in moto's device objects: nothing here logs, formats or returns one, except
the CreateVirtualMFADevice response, which is the one place AWS returns it.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from moto.core.responses import ActionResult, EmptyResult
from moto.iam.exceptions import (
    DeleteConflictException,
    EntityAlreadyExists,
    IAMException,
    LimitExceededException,
    NoSuchEntity,
    TooManyTags,
    ValidationError,
)
from moto.iam.models import IAMBackend, MFADevice, User, VirtualMfaDevice, iam_backends
from moto.iam.responses import IamResponse
from moto.sts.responses import TokenResponse

from local_iam_server.aws_errors import query_error_body
from local_iam_server.control import Attempt, AttemptLog, ServerClock
from local_iam_server.totp_check import Refusal, Verdict, check_code, check_code_pair

MAX_MFA_DEVICES_PER_USER = 8
MAX_TAGS_PER_DEVICE = 50
MAX_DEVICE_NAME_LENGTH = 226
MAX_PATH_LENGTH = 512
SEED_BYTES = 40  # 64 base32 characters, as AWS issues

# AWS's patterns (Java regexes: \w is ASCII there).
_NAME_RE = re.compile(r"[\w+=,.@-]+", re.ASCII)
_PATH_RE = re.compile(r"/|/[\x21-\x7e]+/")

MSG_BAD_CODE = "Authentication code for device is not valid."
MSG_IN_USE = "MFA Device is already in use."
MSG_TOO_MANY = f"Cannot exceed quota for MFADevicesPerUser: {MAX_MFA_DEVICES_PER_USER}."
MSG_LOGIN_BAD_CODE = "MultiFactorAuthentication failed with invalid MFA one time pass code."
MSG_LOGIN_BAD_DEVICE = (
    "MultiFactorAuthentication failed, unable to validate MFA code.  Please verify your "
    "MFA serial number is valid and associated with this user."
)

# Per-device state the stand-in adds to moto's VirtualMfaDevice: the last step used for
# a login (replay protection). Kept on the device so moto's reset and delete drop it.
_LAST_LOGIN_STEP = "_local_iam_last_login_step"

_log = logging.getLogger(__name__)


class InvalidAuthenticationCode(IAMException):
    """IAM's 403 for codes that are not the device's two consecutive codes."""

    code = "InvalidAuthenticationCode"
    message = MSG_BAD_CODE


class _Refused(Exception):
    """An attempt refused by a rule: the AWS error to send and the reason to log."""

    def __init__(self, reason: str, error: Exception, verdict: Verdict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.step_offset = verdict.step_offset if verdict else None


def new_seed() -> str:
    """A fresh 40-byte TOTP key as AWS hands it out: 64 base32 characters, no padding."""
    return base64.b32encode(secrets.token_bytes(SEED_BYTES)).decode("ascii")


def _moto_time(now: float) -> datetime:
    """moto stores naive UTC datetimes; this one follows the stand-in's clock."""
    return datetime.fromtimestamp(now, UTC).replace(tzinfo=None)


def _validation_error(field: str, constraint: str) -> ValidationError:
    return ValidationError(
        f"1 validation error detected: Value at '{field}' failed to satisfy constraint: "
        f"{constraint}"
    )


def _validate_device_name(name: str | None) -> None:
    if not name or len(name) > MAX_DEVICE_NAME_LENGTH:
        raise _validation_error(
            "virtualMFADeviceName",
            f"Member must have length between 1 and {MAX_DEVICE_NAME_LENGTH}",
        )
    if not _NAME_RE.fullmatch(name):
        raise _validation_error(
            "virtualMFADeviceName",
            r"Member must satisfy regular expression pattern: [\w+=,.@-]+",
        )


def _validate_path(path: str) -> None:
    if len(path) > MAX_PATH_LENGTH or not _PATH_RE.fullmatch(path):
        raise ValidationError(
            "The specified value for path is invalid. It must begin and end with / and "
            "contain only alphanumeric characters and/or / characters."
        )


def _validate_code_format(code: str | None, field: str) -> None:
    if code is None or not re.fullmatch(r"[0-9]{6}", code):
        # Never echo the value: it is a one-time code.
        raise ValidationError(
            f"1 validation error detected: The specified value for '{field}' is invalid. "
            "It must be a six-digit decimal number"
        )


def _user_shape(user: User) -> dict[str, Any]:
    """The IAM ``User`` structure as ListVirtualMFADevices nests it."""
    return {
        "Path": user.path,
        "UserName": user.name,
        "UserId": user.id,
        "Arn": user.arn,
        "CreateDate": user.create_date,
    }


def paginate(
    items: list[Any], marker: str | None, max_items: int | None
) -> tuple[list[Any], str | None]:
    """IAM's Marker/MaxItems paging over a stable list; the marker is an index."""
    limit = 100 if max_items is None else int(max_items)
    if not 1 <= limit <= 1000:
        raise _validation_error("maxItems", "Member must have value between 1 and 1000")
    try:
        start = int(marker) if marker else 0
    except ValueError:
        raise ValidationError("Invalid Marker.") from None
    if not 0 <= start <= len(items):
        raise ValidationError("Invalid Marker.")
    page = items[start : start + limit]
    following = start + limit
    return page, (str(following) if following < len(items) else None)


class StrictIamRules:
    """What AWS enforces for virtual MFA devices, applied to moto's IAM backend.

    Every method takes the moto ``IAMBackend`` of the calling account first; the rules
    object itself only holds the stand-in's clock and attempt log, and a lock so two
    concurrent requests cannot both win a device.
    """

    def __init__(self, clock: ServerClock, attempts: AttemptLog) -> None:
        self._clock = clock
        self._attempts = attempts
        self._lock = threading.RLock()

    # -- devices ---------------------------------------------------------------------

    def create_virtual_mfa_device(
        self,
        backend: IAMBackend,
        name: str,
        path: str | None,
        tags: list[dict[str, str]] | None = None,
    ) -> VirtualMfaDevice:
        path = path or "/"
        _validate_device_name(name)
        _validate_path(path)
        tags = list(tags or [])
        backend._tag_verification(tags)  # moto's: count, key chars/length, duplicates
        with self._lock:
            device = VirtualMfaDevice(backend.account_id, backend.region_name, path + name)
            if device.serial_number in backend.virtual_mfa_devices:
                raise EntityAlreadyExists(
                    "MFADevice entity at the same path and name already exists."
                )
            device.base32_string_seed = new_seed()
            backend.virtual_mfa_devices[device.serial_number] = device
            if tags:
                backend.tagger.tag_resource(device.serial_number, tags)
        return device

    def delete_virtual_mfa_device(self, backend: IAMBackend, serial: str) -> None:
        with self._lock:
            device = self._virtual_device(backend, serial)
            if device.user is not None:
                # moto deletes it and leaves the user holding a dangling device.
                raise DeleteConflictException(
                    "Cannot delete entity, must deactivate the MFA device first."
                )
            del backend.virtual_mfa_devices[serial]
            backend.tagger.delete_all_tags_for_resource(serial)

    def list_virtual_mfa_devices(
        self,
        backend: IAMBackend,
        assignment_status: str | None,
        marker: str | None,
        max_items: int | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Devices as AWS lists them: no seed, no QR code; User/EnableDate if assigned."""
        status = assignment_status or "Any"
        if status not in ("Assigned", "Unassigned", "Any"):
            raise _validation_error(
                "assignmentStatus",
                "Member must satisfy enum value set: [Unassigned, Any, Assigned]",
            )
        with self._lock:
            devices = sorted(backend.virtual_mfa_devices.values(), key=lambda d: d.serial_number)
            entries = []
            for device in devices:
                assigned = device.user is not None
                if (status == "Assigned" and not assigned) or (status == "Unassigned" and assigned):
                    continue
                entry: dict[str, Any] = {"SerialNumber": device.serial_number}
                if device.user is not None:
                    entry["User"] = _user_shape(device.user)
                    entry["EnableDate"] = device.enable_date
                tags = backend.tagger.list_tags_for_resource(device.serial_number)["Tags"]
                if tags:
                    entry["Tags"] = tags
                entries.append(entry)
        return paginate(entries, marker, max_items)

    # -- enable / resync / deactivate --------------------------------------------------

    def enable_mfa_device(
        self, backend: IAMBackend, user_name: str, serial: str, code1: str, code2: str
    ) -> None:
        def enable() -> Verdict:
            _validate_code_format(code1, "authenticationCode1")
            _validate_code_format(code2, "authenticationCode2")
            user = self._user(backend, user_name)
            device = backend.virtual_mfa_devices.get(serial)
            if device is None:
                raise _Refused(
                    "no-such-device",
                    NoSuchEntity(f"VirtualMFADevice with serial number {serial} doesn't exist."),
                )
            if device.user is not None:
                raise _Refused("device-in-use", EntityAlreadyExists(MSG_IN_USE))
            if len(user.mfa_devices) >= MAX_MFA_DEVICES_PER_USER:
                raise _Refused("limit-exceeded", LimitExceededException(MSG_TOO_MANY))
            now = self._clock.now()
            verdict = self._check_pair(device, code1, code2, now)
            device.enable_date = _moto_time(now)
            device.user = user
            device.user_attribute = {
                **_user_shape(user),
                "Tags": backend.tagger.list_tags_for_resource(user.arn)["Tags"],
            }
            # moto's MFADevice would also keep the codes; the stand-in keeps none.
            mfa = MFADevice(serial, "", "")
            mfa.enable_date = device.enable_date
            user.mfa_devices[serial] = mfa
            return verdict

        self._judged("EnableMFADevice", user_name, serial, enable)

    def resync_mfa_device(
        self, backend: IAMBackend, user_name: str, serial: str, code1: str, code2: str
    ) -> None:
        def resync() -> Verdict:
            _validate_code_format(code1, "authenticationCode1")
            _validate_code_format(code2, "authenticationCode2")
            user = self._user(backend, user_name)
            device = backend.virtual_mfa_devices.get(serial)
            if device is None or serial not in user.mfa_devices:
                raise _Refused(
                    "not-assigned-to-user",
                    NoSuchEntity(f"MFA Device with serial number {serial} does not exist."),
                )
            return self._check_pair(device, code1, code2, self._clock.now())

        self._judged("ResyncMFADevice", user_name, serial, resync)

    def deactivate_mfa_device(self, backend: IAMBackend, user_name: str, serial: str) -> None:
        """As moto does it (which matches AWS), under the lock."""
        with self._lock:
            user = backend.get_user(user_name)
            if serial not in user.mfa_devices:
                raise NoSuchEntity(f"MFA Device with serial number {serial} does not exist.")
            device = backend.virtual_mfa_devices.get(serial)
            if device is not None:
                device.enable_date = None
                device.user = None
                device.user_attribute = None
            del user.mfa_devices[serial]

    def get_mfa_device(self, backend: IAMBackend, serial: str, user_name: str | None) -> NoReturn:
        """AWS's GetMFADevice accepts FIDO security key ARNs only; there are none here."""
        if user_name is not None:
            backend.get_user(user_name)
        raise NoSuchEntity(
            f"MFA device {serial} is not a FIDO security key; GetMFADevice accepts only "
            "FIDO security keys."
        )

    # -- tags ------------------------------------------------------------------------

    def tag_mfa_device(self, backend: IAMBackend, serial: str, tags: list[dict[str, str]]) -> None:
        backend._tag_verification(tags)
        with self._lock:
            self._virtual_device(backend, serial)
            current = backend.tagger.get_tag_dict_for_resource(serial)
            new_keys = {tag["Key"].lower() for tag in tags}
            # IAM tag keys are case-insensitive: a new "Desk" replaces an old "desk".
            kept = {k: v for k, v in current.items() if k.lower() not in new_keys}
            if len(kept) + len(tags) > MAX_TAGS_PER_DEVICE:
                raise LimitExceededException(
                    f"Cannot exceed quota for TagsPerMFADevice: {MAX_TAGS_PER_DEVICE}."
                )
            backend.tagger.delete_all_tags_for_resource(serial)
            backend.tagger.tag_resource(
                serial, [{"Key": k, "Value": v} for k, v in kept.items()] + list(tags)
            )

    def untag_mfa_device(self, backend: IAMBackend, serial: str, keys: list[str]) -> None:
        if len(keys) > MAX_TAGS_PER_DEVICE:
            raise TooManyTags(keys, param="tagKeys")
        for key in keys:
            backend._validate_tag_key(key, exception_param="tagKeys")
        with self._lock:
            self._virtual_device(backend, serial)
            gone = {key.lower() for key in keys}
            current = backend.tagger.get_tag_dict_for_resource(serial)
            backend.tagger.untag_resource_using_names(
                serial, [k for k in current if k.lower() in gone]
            )

    def list_mfa_device_tags(
        self, backend: IAMBackend, serial: str, marker: str | None, max_items: int | None
    ) -> tuple[list[dict[str, str]], str | None]:
        with self._lock:
            self._virtual_device(backend, serial)
            tags = backend.tagger.list_tags_for_resource(serial)["Tags"]
        return paginate(sorted(tags, key=lambda t: t["Key"]), marker, max_items)

    # -- users -----------------------------------------------------------------------

    def check_user_deletable(self, backend: IAMBackend, user_name: str) -> None:
        """AWS refuses to delete a user who still has MFA devices; moto does not."""
        user = backend.get_user(user_name)
        if user.mfa_devices:
            raise DeleteConflictException("Cannot delete entity, must delete MFA device first.")

    # -- STS login -------------------------------------------------------------------

    def check_login(
        self, backend: IAMBackend, caller_user: str | None, serial: str | None, code: str | None
    ) -> str | None:
        """The MFA check of GetSessionToken. Returns None if it passes, else the message.

        The device must be an assigned virtual device (assigned to the caller when the
        caller's access key belongs to an IAM user) and the code that of a step in
        N-1..N+1 not already used for a login with this device.
        """
        device = backend.virtual_mfa_devices.get(serial) if serial else None
        owner = device.user.name if device is not None and device.user is not None else None

        def login() -> Verdict:
            if serial is None or code is None:
                raise _Refused("incomplete-mfa", _LoginDenied(MSG_LOGIN_BAD_DEVICE))
            _validate_code_format(code, "tokenCode")
            if device is None or owner is None or (caller_user not in (None, owner)):
                raise _Refused("not-assigned-to-caller", _LoginDenied(MSG_LOGIN_BAD_DEVICE))
            verdict = check_code(
                device.base32_string_seed,
                code,
                now=self._clock.now(),
                after_step=getattr(device, _LAST_LOGIN_STEP, None),
            )
            if not verdict.accepted:
                raise _Refused(str(verdict.reason), _LoginDenied(MSG_LOGIN_BAD_CODE), verdict)
            setattr(device, _LAST_LOGIN_STEP, verdict.step)
            return verdict

        try:
            self._judged("GetSessionToken", owner or caller_user, serial, login)
        except _LoginDenied as denied:
            return denied.message
        return None

    # -- helpers ---------------------------------------------------------------------

    def _judged(
        self, action: str, user: str | None, serial: str | None, attempt: Callable[[], Verdict]
    ) -> None:
        """Run one attempt under the lock and log its outcome (never codes or seeds)."""
        try:
            with self._lock:
                try:
                    verdict = attempt()
                except ValidationError as error:
                    raise _Refused(Refusal.MALFORMED.value, error) from None
                except NoSuchEntity as error:
                    raise _Refused("no-such-user", error) from None
        except _Refused as refused:
            self._record(action, user, serial, False, refused.reason, refused.step_offset)
            _log.info("%s refused for %s on %s: %s", action, user, serial, refused.reason)
            raise refused.error from None
        self._record(action, user, serial, True, None, verdict.step_offset)
        _log.info("%s accepted for %s on %s (s-N=%s)", action, user, serial, verdict.step_offset)

    def _record(
        self,
        action: str,
        user: str | None,
        serial: str | None,
        accepted: bool,
        reason: str | None,
        step_offset: int | None,
    ) -> None:
        self._attempts.record(
            Attempt(action, user, serial, accepted, reason, step_offset, self._clock.now())
        )

    def _check_pair(self, device: VirtualMfaDevice, code1: str, code2: str, now: float) -> Verdict:
        verdict = check_code_pair(device.base32_string_seed, code1, code2, now=now)
        if not verdict.accepted:
            raise _Refused(str(verdict.reason), InvalidAuthenticationCode(), verdict)
        return verdict

    @staticmethod
    def _user(backend: IAMBackend, user_name: str) -> User:
        return backend.get_user(user_name)  # NoSuchEntity 404 with AWS's message

    @staticmethod
    def _virtual_device(backend: IAMBackend, serial: str) -> VirtualMfaDevice:
        device = backend.virtual_mfa_devices.get(serial)
        if device is None:
            raise NoSuchEntity(f"VirtualMFADevice with serial number {serial} doesn't exist.")
        return device


class _LoginDenied(Exception):
    """STS's AccessDenied for a failed MFA check (rendered by the STS patch)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- installing the rules into moto --------------------------------------------------


def install(rules: StrictIamRules) -> None:
    """Patch moto's IAM backend and IAM/STS response classes with ``rules``.

    Process-wide by nature (moto's classes are); the server calls it once at start-up,
    before the first request.
    """
    original_delete_user = IAMBackend.delete_user
    original_get_session_token = TokenResponse.get_session_token

    def delete_user(backend: IAMBackend, user_name: str) -> None:
        rules.check_user_deletable(backend, user_name)
        original_delete_user(backend, user_name)

    # moto's own backend methods, so any other moto code path gets the rules too; the
    # operations moto lacks exist only as response handlers.
    backend_patches: dict[str, Callable[..., Any]] = {
        name: _as_method(getattr(rules, name))
        for name in (
            "create_virtual_mfa_device",
            "delete_virtual_mfa_device",
            "list_virtual_mfa_devices",
            "enable_mfa_device",
            "deactivate_mfa_device",
        )
    }
    backend_patches["delete_user"] = delete_user
    for name, patch in backend_patches.items():
        setattr(IAMBackend, name, patch)

    for name, handler in _iam_handlers(rules).items():
        setattr(IamResponse, name, handler)

    def get_session_token(response: TokenResponse) -> Any:
        serial = response._get_param("SerialNumber")
        code = response._get_param("TokenCode")
        if serial is None and code is None:
            return original_get_session_token(response)
        iam = iam_backends[response.current_account][response.partition]
        key = iam.access_keys.get(response.get_access_key())
        caller = key.user_name if key is not None else None
        try:
            denial = rules.check_login(iam, caller, serial, code)
        except ValidationError as error:
            body = query_error_body("ValidationError", error.message, status=400, service="sts")
            return body.decode("utf-8"), {"status": 400, "Content-Type": "text/xml"}
        if denial is not None:
            body = query_error_body("AccessDenied", denial, status=403, service="sts")
            return body.decode("utf-8"), {"status": 403, "Content-Type": "text/xml"}
        return original_get_session_token(response)

    sts_handlers: dict[str, Callable[[TokenResponse], Any]] = {
        "get_session_token": get_session_token
    }
    for name, sts_handler in sts_handlers.items():
        setattr(TokenResponse, name, sts_handler)


def _as_method(rule: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function (so it binds to the backend) that calls a rules method."""

    def method(backend: IAMBackend, *args: Any, **kwargs: Any) -> Any:
        return rule(backend, *args, **kwargs)

    method.__name__ = getattr(rule, "__name__", "rule")
    return method


def _iam_handlers(rules: StrictIamRules) -> dict[str, Callable[[IamResponse], ActionResult]]:
    """IamResponse methods for the MFA operations (moto dispatches by method name)."""

    def create_virtual_mfa_device(self: IamResponse) -> ActionResult:
        tags = self._get_param("Tags", [])
        device = rules.create_virtual_mfa_device(
            self.backend, self._get_param("VirtualMFADeviceName"), self._get_param("Path"), tags
        )
        created: dict[str, Any] = {
            "SerialNumber": device.serial_number,
            # A blob in the model: the serializer base64-encodes the base32 text, and
            # boto3 hands back its bytes, as with AWS.
            "Base32StringSeed": device.base32_string_seed,
            "QRCodePNG": device.qr_code_png,
        }
        if tags:
            created["Tags"] = tags
        return ActionResult({"VirtualMFADevice": created})

    def delete_virtual_mfa_device(self: IamResponse) -> ActionResult:
        rules.delete_virtual_mfa_device(self.backend, self._get_param("SerialNumber"))
        return EmptyResult()

    def list_virtual_mfa_devices(self: IamResponse) -> ActionResult:
        devices, marker = rules.list_virtual_mfa_devices(
            self.backend,
            self._get_param("AssignmentStatus"),
            self._get_param("Marker"),
            self._get_param("MaxItems"),
        )
        return ActionResult(
            {"VirtualMFADevices": devices, "IsTruncated": marker is not None, "Marker": marker}
        )

    def enable_mfa_device(self: IamResponse) -> ActionResult:
        rules.enable_mfa_device(
            self.backend,
            self._get_param("UserName"),
            self._get_param("SerialNumber"),
            self._get_param("AuthenticationCode1"),
            self._get_param("AuthenticationCode2"),
        )
        return EmptyResult()

    def resync_mfa_device(self: IamResponse) -> ActionResult:
        rules.resync_mfa_device(
            self.backend,
            self._get_param("UserName"),
            self._get_param("SerialNumber"),
            self._get_param("AuthenticationCode1"),
            self._get_param("AuthenticationCode2"),
        )
        return EmptyResult()

    def deactivate_mfa_device(self: IamResponse) -> ActionResult:
        rules.deactivate_mfa_device(
            self.backend, self._get_param("UserName"), self._get_param("SerialNumber")
        )
        return EmptyResult()

    def get_mfa_device(self: IamResponse) -> ActionResult:
        rules.get_mfa_device(
            self.backend, self._get_param("SerialNumber"), self._get_param("UserName")
        )
        return EmptyResult()  # not reached: there are no FIDO keys here

    def tag_mfa_device(self: IamResponse) -> ActionResult:
        rules.tag_mfa_device(
            self.backend, self._get_param("SerialNumber"), self._get_param("Tags", [])
        )
        return EmptyResult()

    def untag_mfa_device(self: IamResponse) -> ActionResult:
        rules.untag_mfa_device(
            self.backend, self._get_param("SerialNumber"), self._get_param("TagKeys", [])
        )
        return EmptyResult()

    def list_mfa_device_tags(self: IamResponse) -> ActionResult:
        tags, marker = rules.list_mfa_device_tags(
            self.backend,
            self._get_param("SerialNumber"),
            self._get_param("Marker"),
            self._get_param("MaxItems"),
        )
        return ActionResult({"Tags": tags, "IsTruncated": marker is not None, "Marker": marker})

    handlers = [
        create_virtual_mfa_device,
        delete_virtual_mfa_device,
        list_virtual_mfa_devices,
        enable_mfa_device,
        resync_mfa_device,
        deactivate_mfa_device,
        get_mfa_device,
        tag_mfa_device,
        untag_mfa_device,
        list_mfa_device_tags,
    ]
    return {handler.__name__: handler for handler in handlers}


__all__ = ["InvalidAuthenticationCode", "StrictIamRules", "install", "new_seed", "paginate"]
