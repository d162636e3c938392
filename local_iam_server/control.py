"""The stand-in's own state and its control API, as WSGI middleware around moto.

Tests and ``provisioner demo`` need to do to the stand-in what AWS does on a bad day
(throttle, fail, drop the connection, answer late, drift in time) and to see what it
received (every call per Action, every enable/resync/login attempt). That lives here,
in front of moto, so moto stays unaware of it. No moto import: moto's reset is handed in.

Control endpoints (JSON over HTTP, under a prefix no AWS call uses):

* ``GET /_local_iam/health``
* ``GET|POST|DELETE /_local_iam/faults``: list, add (``{"action", "kind", "code",
  "status", "message", "count", "delay"}``), clear.
* ``GET|PUT /_local_iam/clock``: read ``{"offset", "time", "step"}``, set ``{"offset"}``.
* ``GET /_local_iam/attempts``: enable/resync/login attempts, oldest first.
* ``GET /_local_iam/calls``: calls received per Action (faulted ones included).
* ``POST /_local_iam/users`` (``{"name", "account"}``), ``GET /_local_iam/devices[?account=]``:
  the demo's users and every virtual device (never a seed).
* ``POST /_local_iam/principals``: an IAM user holding one inline policy
  (``{"name", "policy", "path", "account"}``) and an access key for it.
* ``POST /_local_iam/roles``: a role in another account (``{"account", "name", "trust",
  "policy", "path"}``) that ``sts:AssumeRole`` judges by its trust policy (principal,
  ``sts:ExternalId``); its credentials see that account only (``accounts.py``).
  ``account`` is a 12-digit id; absent, moto's default account (the dummy credentials').
* ``GET|PUT /_local_iam/auth``: read or set ``{"enforced"}``. Off (the default), any
  credentials do anything, as moto's dummy ones do; on, every IAM and STS call must be
  signed with a key of a principal and allowed by its policies (``authorization.py``).
* ``GET|PUT /_local_iam/latency``: read or set ``{"seconds", "actions"}``: every AWS
  call (or only the named Actions) waits that long before it is answered, as over a real
  network; requests are served concurrently, so parallel calls wait side by side.
* ``POST /_local_iam/reset``: moto's state and all of the above, enforcement off again
  (``/moto-api/reset`` resets both too).
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs

from local_iam_server.aws_errors import KNOWN_ERRORS, query_error_body
from local_iam_server.totp_check import step_at

CONTROL_PREFIX = "/_local_iam/"
MAX_DELAY_SECONDS = 600.0
GARBAGE_BODY = b"local-iam fault injection: this body is not XML {\x00\n"

_log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
_T = TypeVar("_T")
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_SCOPE_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/[^/]+/([^/]+)/aws4_request")


class ServerClock:
    """The stand-in's "now": the host clock plus an offset the tests can set.

    One clock drives both the TOTP checks and the HTTP ``Date`` header, so a client that
    reads the header sees exactly the skew the server judges codes by.
    """

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._offset = 0.0

    @property
    def offset(self) -> float:
        return self._offset

    def set_offset(self, seconds: float) -> None:
        self._offset = float(seconds)

    def now(self) -> float:
        return self._wall() + self._offset


@dataclass(frozen=True)
class Attempt:
    """One enable, resync or login attempt. Never holds a code or a seed."""

    action: str
    user: str | None
    serial: str | None
    accepted: bool
    reason: str | None
    step_offset: int | None
    server_time: float


class AttemptLog:
    """Every enable/resync/login attempt the strict rules judged, oldest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: list[Attempt] = []

    def record(self, attempt: Attempt) -> None:
        with self._lock:
            self._attempts.append(attempt)

    def all(self) -> list[Attempt]:
        with self._lock:
            return list(self._attempts)

    def clear(self) -> None:
        with self._lock:
            self._attempts.clear()


class FaultKind(StrEnum):
    """What a fault does to the call it hits."""

    ERROR = "error"  # an AWS error response (code, status, message)
    GARBAGE = "garbage"  # 200 with a body that is not XML
    DROP = "drop"  # close the connection without answering
    DELAY = "delay"  # sleep, then let moto answer normally


class FaultSpecError(ValueError):
    """A fault request the control API cannot honour."""


@dataclass
class Fault:
    """A fault waiting for the next ``remaining`` calls of ``action``."""

    action: str
    kind: FaultKind
    remaining: int
    code: str | None = None
    status: int | None = None
    message: str | None = None
    delay: float = 0.0
    #: Only calls signed with credentials of this account (an assumed role's); None: any.
    account: str | None = None

    @classmethod
    def from_request(cls, spec: dict[str, Any]) -> Fault:
        """Validate a control-API fault request and fill AWS's defaults."""
        action = spec.get("action")
        if not isinstance(action, str) or not action:
            raise FaultSpecError("'action' (an AWS Action name) is required")
        try:
            kind = FaultKind(spec.get("kind", "error"))
        except ValueError:
            raise FaultSpecError(f"'kind' must be one of {[k.value for k in FaultKind]}") from None
        count = spec.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise FaultSpecError("'count' must be an integer >= 1")
        delay = spec.get("delay", 0.0)
        if not isinstance(delay, int | float) or not 0 <= delay <= MAX_DELAY_SECONDS:
            raise FaultSpecError(f"'delay' must be a number of seconds in 0..{MAX_DELAY_SECONDS}")
        account = spec.get("account")
        one_account = isinstance(account, str) and _ACCOUNT_ID.fullmatch(account)
        if account is not None and not one_account:
            raise FaultSpecError("'account' must be a 12-digit account id")
        fault = cls(action=action, kind=kind, remaining=count, delay=float(delay), account=account)
        if kind is FaultKind.ERROR:
            code = spec.get("code")
            if not isinstance(code, str) or not code:
                raise FaultSpecError("an 'error' fault needs a 'code' (e.g. Throttling)")
            known = KNOWN_ERRORS.get(code)
            status = spec.get("status") or (known.status if known else None)
            if not isinstance(status, int) or not 400 <= status <= 599:
                raise FaultSpecError(f"'status' (400..599) is required for code {code!r}")
            message = spec.get("message") or (known.message if known else code)
            fault.code, fault.status, fault.message = code, status, str(message)
        return fault

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data


class FaultBook:
    """Pending faults, consumed first-in first-out per Action."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take(self, action: str, account: Callable[[], str | None]) -> Fault | None:
        """The fault for this call of ``action`` (by the caller's ``account``, asked only
        of a fault kept for one account), if any (uses up one of its count)."""
        with self._lock:
            for fault in self._faults:
                if fault.action == action and (fault.account is None or fault.account == account()):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> int:
        with self._lock:
            cleared = len(self._faults)
            self._faults.clear()
            return cleared


class AuthSwitch:
    """Whether calls must be signed by a known key and allowed by its policies."""

    def __init__(self) -> None:
        self._on = threading.Event()

    @property
    def enforced(self) -> bool:
        return self._on.is_set()

    def set(self, enforced: bool) -> None:
        if enforced:
            self._on.set()
        else:
            self._on.clear()


class CallCounter:
    """Calls received per Action, so a test can prove that nothing was sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, action: str) -> None:
        with self._lock:
            self._counts[action] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()


class Latency:
    """The round trip of a real network, added to AWS calls (the bench's and the latency
    tests'): ``seconds`` before each answer, for every Action or only ``actions``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = 0.0
        self._actions: frozenset[str] | None = None

    def set(self, seconds: float, actions: Iterable[str] | None = None) -> None:
        with self._lock:
            self._seconds = seconds
            self._actions = frozenset(actions) if actions is not None else None

    def for_action(self, action: str) -> float:
        with self._lock:
            if self._actions is not None and action not in self._actions:
                return 0.0
            return self._seconds

    def describe(self) -> dict[str, Any]:
        with self._lock:
            actions = sorted(self._actions) if self._actions is not None else None
            return {"seconds": self._seconds, "actions": actions}


@dataclass
class ControlState:
    """Everything the stand-in keeps beside moto's backends."""

    clock: ServerClock
    attempts: AttemptLog
    faults: FaultBook
    calls: CallCounter
    auth: AuthSwitch
    latency: Latency

    @classmethod
    def fresh(cls) -> ControlState:
        return cls(ServerClock(), AttemptLog(), FaultBook(), CallCounter(), AuthSwitch(), Latency())

    def reset(self) -> None:
        self.clock.set_offset(0.0)
        self.attempts.clear()
        self.faults.clear()
        self.calls.clear()
        self.auth.set(False)  # the next test starts with moto's dummy credentials again
        self.latency.set(0.0)


def _json_response(
    start_response: StartResponse, status: str, payload: dict[str, Any]
) -> list[bytes]:
    body = json.dumps(payload).encode("utf-8")
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


class Directory(Protocol):
    """Setting up and looking at the stand-in's IAM state (for the demo and tests).

    ``account`` is a 12-digit account id; None is the default account (moto's), the one
    moto's dummy credentials call.
    """

    def create_user(self, name: str, account: str | None = None) -> None: ...

    def virtual_devices(self, account: str | None = None) -> list[dict[str, Any]]:
        """Serial number and user of every virtual device; never a seed."""
        ...

    def create_principal(
        self, name: str, policy: str, path: str, account: str | None = None
    ) -> dict[str, str]:
        """An IAM user with ``policy`` inline and an access key: ``user_name``, ``arn``,
        ``access_key_id``, ``secret_access_key``. ValueError if IAM would refuse it."""
        ...

    def create_role(
        self, account: str, name: str, trust: str, policy: str | None, path: str
    ) -> dict[str, str]:
        """A role that AssumeRole judges by ``trust``, holding ``policy`` inline:
        ``arn``, ``role_name``, ``account``. ValueError if IAM would refuse it."""
        ...


class ControlMiddleware:
    """Serve the control API, count calls, apply faults; pass the rest to moto.

    The request body is read once and put back as a fresh stream, so moto (which reads
    it again to route and parse the call) sees it unchanged.
    """

    def __init__(
        self,
        app: WsgiApp,
        state: ControlState,
        reset_moto: Callable[[], None],
        directory: Directory | None = None,
    ) -> None:
        self._app = app
        self._state = state
        self._reset_moto = reset_moto
        self._directory = directory

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL_PREFIX):
            return self._control(path[len(CONTROL_PREFIX) :], environ, start_response)
        if path.rstrip("/") == "/moto-api/reset":
            self._state.reset()
        body = _buffer_body(environ)
        action = _action_of(environ, body)
        if action is None:
            return self._app(environ, start_response)
        self._state.calls.count(action)
        if self._state.auth.enforced and not _is_signed(environ):
            # moto would route an unsigned call to S3; AWS refuses it.
            return _refuse_unsigned(environ, start_response)
        delay = self._state.latency.for_action(action)
        if delay:
            time.sleep(delay)
        fault = self._state.faults.take(action, lambda: _caller_account(environ))
        if fault is None:
            return self._app(environ, start_response)
        return self._apply(fault, environ, start_response)

    def _apply(
        self, fault: Fault, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        _log.info("fault %s on %s", fault.kind.value, fault.action)
        if fault.kind is FaultKind.DELAY:
            time.sleep(fault.delay)
            return self._app(environ, start_response)
        if fault.kind is FaultKind.GARBAGE:
            start_response(
                "200 OK",
                [("Content-Type", "text/xml"), ("Content-Length", str(len(GARBAGE_BODY)))],
            )
            return [GARBAGE_BODY]
        if fault.kind is FaultKind.DROP:
            sock = environ.get("werkzeug.socket")
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # werkzeug treats a ConnectionError from the app as a dropped connection and
            # writes nothing; the client sees the socket close with no response.
            raise ConnectionAbortedError("local-iam fault injection: drop")
        assert fault.code is not None and fault.status is not None
        service = _service_of(environ)
        body = query_error_body(
            fault.code, fault.message or fault.code, status=fault.status, service=service
        )
        start_response(
            f"{fault.status} {fault.code}",
            [
                ("Content-Type", "text/xml"),
                ("Content-Length", str(len(body))),
                ("x-amzn-RequestId", "local-iam-fault"),
            ],
        )
        return [body]

    def _control(
        self, route: str, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        route = route.strip("/")
        try:
            payload = self._dispatch(method, route, environ)
        except FaultSpecError as error:
            return _json_response(start_response, "400 Bad Request", {"error": str(error)})
        except _ControlError as error:
            return _json_response(start_response, error.status, {"error": error.message})
        return _json_response(start_response, "200 OK", payload)

    def _dispatch(self, method: str, route: str, environ: dict[str, Any]) -> dict[str, Any]:
        state = self._state
        if route == "health" and method == "GET":
            return {"status": "ok"}
        if route == "faults":
            if method == "GET":
                return {"faults": [f.describe() for f in state.faults.pending()]}
            if method == "POST":
                fault = Fault.from_request(_json_body(environ))
                state.faults.add(fault)
                return {"fault": fault.describe()}
            if method == "DELETE":
                return {"cleared": state.faults.clear()}
        elif route == "clock":
            if method == "PUT":
                offset = _json_body(environ).get("offset")
                if not isinstance(offset, int | float) or isinstance(offset, bool):
                    raise _ControlError("400 Bad Request", "'offset' (seconds) is required")
                state.clock.set_offset(float(offset))
            if method in ("GET", "PUT"):
                now = state.clock.now()
                return {"offset": state.clock.offset, "time": now, "step": step_at(now)}
        elif route == "latency":
            if method == "PUT":
                spec = _json_body(environ)
                seconds, actions = spec.get("seconds"), spec.get("actions")
                if (
                    not isinstance(seconds, int | float)
                    or isinstance(seconds, bool)
                    or not 0 <= seconds <= MAX_DELAY_SECONDS
                ):
                    raise _ControlError(
                        "400 Bad Request", f"'seconds' must be a number in 0..{MAX_DELAY_SECONDS}"
                    )
                if actions is not None and not (
                    isinstance(actions, list) and all(isinstance(a, str) for a in actions)
                ):
                    raise _ControlError("400 Bad Request", "'actions' must be a list of Actions")
                state.latency.set(float(seconds), actions)
            if method in ("GET", "PUT"):
                return state.latency.describe()
        elif route == "attempts" and method == "GET":
            return {"attempts": [asdict(a) for a in state.attempts.all()]}
        elif route == "calls" and method == "GET":
            return {"calls": state.calls.snapshot()}
        elif route == "users" and method == "POST" and self._directory is not None:
            spec = _json_body(environ)
            name = spec.get("name")
            if not isinstance(name, str) or not name:
                raise _ControlError("400 Bad Request", "'name' (an IAM user name) is required")
            _refused_as_400(self._directory.create_user, name, _account_of(spec))
            return {"created": name}
        elif route == "devices" and method == "GET" and self._directory is not None:
            account = _account_of(parse_qs(environ.get("QUERY_STRING", "")))
            return {"devices": _refused_as_400(self._directory.virtual_devices, account)}
        elif route == "principals" and method == "POST" and self._directory is not None:
            return {"principal": self._create_principal(_json_body(environ))}
        elif route == "roles" and method == "POST" and self._directory is not None:
            return {"role": self._create_role(_json_body(environ))}
        elif route == "auth":
            if method == "PUT":
                enforced = _json_body(environ).get("enforced")
                if not isinstance(enforced, bool):
                    raise _ControlError("400 Bad Request", "'enforced' (true or false) is required")
                state.auth.set(enforced)
            if method in ("GET", "PUT"):
                return {"enforced": state.auth.enforced}
        elif route == "reset" and method == "POST":
            self._reset_moto()
            state.reset()
            return {"status": "reset"}
        else:
            raise _ControlError("404 Not Found", f"no control endpoint {route!r}")
        raise _ControlError("405 Method Not Allowed", f"{method} not allowed on {route!r}")

    def _create_principal(self, spec: dict[str, Any]) -> dict[str, str]:
        assert self._directory is not None
        name, policy, path = spec.get("name"), spec.get("policy"), spec.get("path", "/")
        if not isinstance(name, str) or not name:
            raise _ControlError("400 Bad Request", "'name' (an IAM user name) is required")
        if isinstance(policy, dict):
            policy = json.dumps(policy)
        if not isinstance(policy, str) or not policy:
            raise _ControlError("400 Bad Request", "'policy' (a policy document) is required")
        if not isinstance(path, str) or not (path.startswith("/") and path.endswith("/")):
            raise _ControlError("400 Bad Request", "'path' must begin and end with /")
        return _refused_as_400(
            self._directory.create_principal, name, policy, path, _account_of(spec)
        )

    def _create_role(self, spec: dict[str, Any]) -> dict[str, str]:
        assert self._directory is not None
        account, name, path = spec.get("account"), spec.get("name"), spec.get("path", "/")
        trust, policy = _document(spec, "trust"), _document(spec, "policy")
        if not isinstance(account, str) or not account:
            raise _ControlError("400 Bad Request", "'account' (a 12-digit account id) is required")
        if not isinstance(name, str) or not name:
            raise _ControlError("400 Bad Request", "'name' (an IAM role name) is required")
        if trust is None:
            raise _ControlError("400 Bad Request", "'trust' (a trust policy) is required")
        if not isinstance(path, str) or not (path.startswith("/") and path.endswith("/")):
            raise _ControlError("400 Bad Request", "'path' must begin and end with /")
        return _refused_as_400(self._directory.create_role, account, name, trust, policy, path)


def _account_of(spec: dict[str, Any]) -> str | None:
    """The optional ``account`` of a request (a JSON field or a query parameter)."""
    account = spec.get("account")
    if isinstance(account, list):  # parse_qs
        account = account[0]
    if account is not None and not isinstance(account, str):
        raise _ControlError("400 Bad Request", "'account' must be a 12-digit account id")
    return account or None


def _document(spec: dict[str, Any], field: str) -> str | None:
    """A policy document given as JSON text or as an object; None when absent."""
    document = spec.get(field)
    if isinstance(document, dict):
        document = json.dumps(document)
    if document is not None and (not isinstance(document, str) or not document):
        raise _ControlError("400 Bad Request", f"'{field}' must be a policy document")
    return document


def _refused_as_400(call: Callable[..., _T], *args: Any) -> _T:
    """Call the directory; what IAM (or the account id) refuses is the caller's 400."""
    try:
        return call(*args)
    except ValueError as error:  # a bad name, account or policy, or a duplicate
        raise _ControlError("400 Bad Request", str(error)) from None


class _ControlError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: Set in a request's environ once its body was read to its end (see moto_app's handler).
BODY_READ = "local_iam.body_read"


def _buffer_body(environ: dict[str, Any]) -> bytes:
    """Read the whole request body and put it back for the next reader."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ[BODY_READ] = len(body) == length  # the connection may serve another request
    return body


def _action_of(environ: dict[str, Any], body: bytes) -> str | None:
    """The query-protocol Action of a request (form body, else query string)."""
    if body and environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        actions = parse_qs(body.decode("utf-8", "replace")).get("Action")
        if actions:
            return actions[0]
    actions = parse_qs(environ.get("QUERY_STRING", "")).get("Action")
    return actions[0] if actions else None


_ACCOUNT_ID = re.compile(r"[0-9]{12}")
_CREDENTIAL = re.compile(r"Credential=([A-Z0-9]+)/")


def _caller_account(environ: dict[str, Any]) -> str | None:
    """The account of the key a call is signed with (moto keys an assumed role's
    temporary key to the role's account)."""
    from moto.iam.models import get_account_id_from

    found = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    return str(get_account_id_from(found.group(1))) if found else None


def _is_signed(environ: dict[str, Any]) -> bool:
    return "AWS4-HMAC-SHA256" in environ.get("HTTP_AUTHORIZATION", "")


def _refuse_unsigned(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    body = query_error_body(
        "MissingAuthenticationToken",
        "Request is missing Authentication Token",
        status=403,
        service=_service_of(environ),
    )
    start_response(
        "403 Forbidden", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _service_of(environ: dict[str, Any]) -> str:
    """The signing service (iam, sts) from the SigV4 credential scope."""
    match = _SCOPE_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    return match.group(1) if match else "iam"


def _json_body(environ: dict[str, Any]) -> dict[str, Any]:
    body = _buffer_body(environ)
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise _ControlError("400 Bad Request", "the body must be JSON") from None
    if not isinstance(data, dict):
        raise _ControlError("400 Bad Request", "the body must be a JSON object")
    return data
