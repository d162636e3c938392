"""moto's server app with the strict rules and the control layer in front.

Imported only by the server process (it imports moto). Patching (strict rules) and
warming up (Flask apps for IAM and STS, botocore models) happen here, before the socket
is announced, so the first real call is as fast as the others.
"""

from __future__ import annotations

import email.utils
import socket
from typing import Any

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.iam.exceptions import IAMException
from moto.iam.models import iam_backends
from moto.moto_api._internal.models import moto_api_backend
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.test import Client

from local_iam_server import accounts, authorization, strict
from local_iam_server.control import BODY_READ, ControlMiddleware, ControlState, ServerClock

# Only the services the product talks to are warmed up; moto routes any other.
_WARM_UP_CALLS = (
    ("iam", "Action=ListUsers&Version=2010-05-08"),
    ("sts", "Action=GetCallerIdentity&Version=2011-06-15"),
)


class _NoDrain:
    """A kept connection's input. After each answer werkzeug "drains" whatever the
    client sent meanwhile, in one read of 10 MB: on a kept connection that is the next
    request, and the read would wait for 10 MB that never come. Here that read finds
    nothing: the next request stays for the next request line (bodies are read with
    their length)."""

    _DRAIN = 10_000_000  # werkzeug.serving's read size when it drains

    def __init__(self, rfile: Any) -> None:
        self._rfile = rfile

    def read(self, size: int = -1) -> bytes:
        if size >= self._DRAIN:
            return b""
        data: bytes = self._rfile.read(size)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rfile, name)


def handler_class(clock: ServerClock, verbose: bool) -> type[MotoRequestHandler]:
    """moto's request handler with the stand-in's clock in ``Date`` and quiet logs."""

    class LocalIamRequestHandler(MotoRequestHandler):
        # As AWS: HTTP/1.1, the connection kept open between requests. werkzeug closes
        # every connection ("Connection: close"), since http.server cannot skip a body
        # the application left unread; a request whose body was read to its end leaves
        # nothing to skip, so its connection is kept (else every call paid a new TCP and
        # TLS handshake, and no client could keep a connection warm).
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.rfile = _NoDrain(self.rfile)  # type: ignore[assignment]
            # headers and body go out in separate writes: without this, on a kept
            # connection the body waits for the client's delayed ACK (about 40 ms)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "connection" and value.lower() == "close":
                environ = getattr(self, "environ", None) or {}
                if environ.get(BODY_READ):
                    return
            super().send_header(keyword, value)

        def date_time_string(self, timestamp: float | None = None) -> str:
            # http.server stamps every response with this; it follows the clock offset
            # so a client can observe the skew the TOTP checks use.
            return email.utils.formatdate(
                clock.now() if timestamp is None else timestamp, usegmt=True
            )

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if verbose:
                super().log_request(code, size)

    return LocalIamRequestHandler


def _warm_up(dispatcher: DomainDispatcherApplication) -> None:
    """Create moto's IAM and STS apps and load their models before announcing."""
    iam_backends[DEFAULT_ACCOUNT_ID]["aws"]  # noqa: B018 - instantiates the backend
    client = Client(dispatcher)
    for service, body in _WARM_UP_CALLS:
        client.post(
            "/",
            data=body,
            content_type="application/x-www-form-urlencoded",
            headers={
                "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/"
                f"{service}/aws4_request, SignedHeaders=host, Signature=0"
            },
        )


def _reset_moto() -> None:
    moto_api_backend.reset()


class _MotoDirectory:
    """The Directory of the control API, over moto's IAM backends (one per account)."""

    @staticmethod
    def _backend(account: str | None) -> Any:
        return accounts.backend_of(account or DEFAULT_ACCOUNT_ID)

    def create_user(self, name: str, account: str | None = None) -> None:
        self._backend(account).create_user("us-east-1", name)

    def virtual_devices(self, account: str | None = None) -> list[dict[str, Any]]:
        return [
            {"serial": d.serial_number, "user": d.user.name if d.user else None}
            for d in self._backend(account).virtual_mfa_devices.values()
        ]

    def create_principal(
        self, name: str, policy: str, path: str, account: str | None = None
    ) -> dict[str, str]:
        backend = self._backend(account)
        try:
            user = backend.create_user("us-east-1", name, path)
            try:
                backend.put_user_policy(name, "provisioner-principal", policy)
            except IAMException:
                backend.delete_user(name)
                raise
            key = backend.create_access_key(name)
        except IAMException as error:
            raise ValueError(f"{error.code}: {error.message}") from None
        return {
            "user_name": user.name,
            "arn": user.arn,
            "access_key_id": key.access_key_id,
            "secret_access_key": key.secret_access_key,
        }

    def create_role(
        self, account: str, name: str, trust: str, policy: str | None, path: str
    ) -> dict[str, str]:
        try:
            return accounts.create_role(account, name, trust, policy, path)
        except accounts.AccountSpecError as error:
            raise ValueError(str(error)) from None


def build_app(state: ControlState) -> ControlMiddleware:
    """Patch moto with the strict rules and wrap its dispatcher in the control layer."""
    strict.install(strict.StrictIamRules(state.clock, state.attempts))
    authorization.install(state.auth)
    accounts.install()
    dispatcher = DomainDispatcherApplication(create_backend_app)
    _warm_up(dispatcher)
    return ControlMiddleware(dispatcher, state, _reset_moto, _MotoDirectory())
