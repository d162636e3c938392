"""Start the strict local IAM stand-in as a subprocess and drive its control API.

Standard library only (no moto, no boto3): importing this is cheap, and the server runs
in its own process, so the code under test talks to it over real HTTP exactly as it
would talk to AWS.

    with LocalIamServer() as iam_server:
        env = iam_server.aws_env()           # for boto3 in this or a child process
        iam_server.inject_fault("EnableMFADevice", code="Throttling")
        ...
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

LISTENING_PREFIX = "local-iam listening on "
CONTROL_PREFIX = "/_local_iam/"

FaultKindName = Literal["error", "garbage", "drop", "delay"]

# Dummy credentials: the stand-in accepts any, and real ones must never be sent to it.
DUMMY_ACCESS_KEY_ID = "testing"
DUMMY_SECRET_ACCESS_KEY = "testing"  # noqa: S105 - not a secret, moto's convention
DEFAULT_REGION = "us-east-1"
# moto's default account: the one the dummy credentials (and the control API by default) see.
DEFAULT_ACCOUNT_ID = "123456789012"


class LocalIamError(RuntimeError):
    """The stand-in could not be started, or its control API refused a request."""


@dataclass(frozen=True)
class Attempt:
    """One EnableMFADevice, ResyncMFADevice or GetSessionToken (login) attempt.

    ``step_offset`` is s - N: the server step of the (later) code minus the server's
    current step, when the codes could be placed within 20 steps; None otherwise.
    ``reason`` is None when accepted, else e.g. ``wrong-code``, ``not-consecutive``,
    ``outside-window``, ``code-reused``, ``malformed-code``, ``no-such-user``,
    ``no-such-device``, ``device-in-use``, ``limit-exceeded``,
    ``not-assigned-to-user``, ``not-assigned-to-caller``.
    """

    action: str
    user: str | None
    serial: str | None
    accepted: bool
    reason: str | None
    step_offset: int | None
    server_time: float


@dataclass(frozen=True)
class Principal:
    """An IAM user of the stand-in with one inline policy, and its access key."""

    user_name: str
    arn: str
    access_key_id: str
    secret_access_key: str = field(repr=False)

    def credentials_env(self) -> dict[str, str]:
        """AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for boto3 to call as this user."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }


@dataclass(frozen=True)
class AccountRole:
    """A role in one of the stand-in's accounts, to be assumed with ``sts:AssumeRole``."""

    account: str
    role_name: str
    arn: str


def trust_policy(trusted: Iterable[str], external_id: str | None = None) -> dict[str, Any]:
    """A role's trust policy: the ``trusted`` principals (ARNs or account ids) may assume
    it, presenting ``external_id`` when one is given."""
    statement: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"AWS": sorted(trusted)},
        "Action": "sts:AssumeRole",
    }
    if external_id:
        statement["Condition"] = {"StringEquals": {"sts:ExternalId": external_id}}
    return {"Version": "2012-10-17", "Statement": [statement]}


def aws_env(
    endpoint_url: str, base: dict[str, str] | None = None, ca_bundle: Path | None = None
) -> dict[str, str]:
    """The environment a boto3 client needs to reach the stand-in (dummy credentials).

    Points IAM and STS (only) at ``endpoint_url``; keeps loopback out of any proxy.
    ``base`` (e.g. ``os.environ``) supplies the NO_PROXY value to extend; ``ca_bundle``
    (an HTTPS stand-in's CA) becomes AWS_CA_BUNDLE.
    """
    no_proxy = ",".join(
        part for part in ((base or {}).get("NO_PROXY", ""), "127.0.0.1", "localhost") if part
    )
    env = {
        "AWS_ENDPOINT_URL_IAM": endpoint_url,
        "AWS_ENDPOINT_URL_STS": endpoint_url,
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": DEFAULT_REGION,
        "NO_PROXY": no_proxy,
    }
    if ca_bundle is not None:
        env["AWS_CA_BUNDLE"] = str(ca_bundle)
    return env


def _with_account(spec: dict[str, Any], account: str | None) -> dict[str, Any]:
    return spec if account is None else spec | {"account": account}


class LocalIamServer:
    """The strict local IAM stand-in, run as ``python -m local_iam_server``.

    A context manager: entering starts the process and waits for its listening line,
    leaving stops it (SIGTERM, then SIGKILL after ``stop_timeout``). With ``tls`` it
    serves HTTPS with a CA of its own, whose file is :attr:`ca_bundle`.
    """

    def __init__(
        self,
        *,
        startup_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        verbose: bool = False,
        tls: bool = False,
        python: str = sys.executable,
    ) -> None:
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._verbose = verbose
        self._tls = tls
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        self._python = python
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._endpoint_url: str | None = None
        # Talk to loopback directly even if the environment sets a proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"LocalIamServer(endpoint_url={self._endpoint_url!r})"

    # -- life cycle --------------------------------------------------------------------

    def __enter__(self) -> LocalIamServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LocalIamServer:
        """Launch the server and wait until it accepts connections."""
        if self._process is not None:
            raise LocalIamError("the local IAM server is already running")
        command = [self._python, "-m", "local_iam_server", "--port", "0"]
        if self._verbose:
            command.append("--verbose")
        if self._tls:
            self._tls_dir = tempfile.TemporaryDirectory(prefix="local-iam-tls-")
            command += ["--tls-dir", self._tls_dir.name]
        # stderr goes to a file, not a pipe: nobody has to drain it, and its tail
        # explains a failed start.
        self._stderr = tempfile.TemporaryFile(prefix="local-iam-stderr-")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self._child_env(),
        )
        try:
            self._endpoint_url = self._read_listening_line()
            if self.ca_bundle is not None:
                context = ssl.create_default_context(cafile=str(self.ca_bundle))
                self._opener = urllib.request.build_opener(
                    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, wait, SIGKILL); return its exit status, if it ran."""
        process, self._process = self._process, None
        status: int | None = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            status = process.returncode
            if process.stdout is not None:
                process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._tls_dir is not None:
            self._tls_dir.cleanup()
            self._tls_dir = None
        self._endpoint_url = None
        return status

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` with ``tls``) of the running server."""
        if self._endpoint_url is None:
            raise LocalIamError("the local IAM server is not running")
        return self._endpoint_url

    @property
    def ca_bundle(self) -> Path | None:
        """The CA file an HTTPS server's clients trust (AWS_CA_BUNDLE); None over HTTP."""
        return Path(self._tls_dir.name) / "ca.pem" if self._tls_dir is not None else None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def aws_env(self) -> dict[str, str]:
        """Environment variables pointing boto3's IAM and STS at this server."""
        return aws_env(self.endpoint_url, dict(os.environ), self.ca_bundle)

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the server's stderr (requests and attempts with ``verbose``)."""
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace")
        self._stderr.seek(0, os.SEEK_END)
        return text[-max_chars:]

    # -- control API -------------------------------------------------------------------

    def inject_fault(
        self,
        action: str,
        *,
        code: str | None = None,
        status: int | None = None,
        message: str | None = None,
        kind: FaultKindName = "error",
        count: int = 1,
        delay: float = 0.0,
        account: str | None = None,
    ) -> dict[str, Any]:
        """Make the next ``count`` calls of ``action`` fail (only those signed with
        ``account``'s credentials, an assumed role's, when given).

        ``kind``: ``error`` (AWS error ``code``; ``status``/``message`` default to AWS's
        for known codes), ``garbage`` (200 with a non-XML body), ``drop`` (connection
        closed, no response) or ``delay`` (answer normally after ``delay`` seconds).
        """
        spec: dict[str, Any] = {"action": action, "kind": kind, "count": count, "delay": delay}
        if code is not None:
            spec["code"] = code
        if status is not None:
            spec["status"] = status
        if message is not None:
            spec["message"] = message
        if account is not None:
            spec["account"] = account
        fault: dict[str, Any] = self._control("POST", "faults", spec)["fault"]
        return fault

    def pending_faults(self) -> list[dict[str, Any]]:
        faults: list[dict[str, Any]] = self._control("GET", "faults")["faults"]
        return faults

    def clear_faults(self) -> int:
        """Drop all pending faults; returns how many there were."""
        return int(self._control("DELETE", "faults")["cleared"])

    def set_clock_offset(self, seconds: float) -> None:
        """Shift the server's clock (TOTP checks and the HTTP Date header)."""
        self._control("PUT", "clock", {"offset": seconds})

    def set_latency(self, seconds: float, actions: Iterable[str] | None = None) -> dict[str, Any]:
        """Delay every AWS call (or only ``actions``) by ``seconds`` before it is answered,
        until set again or reset: a real network's round trip."""
        spec: dict[str, Any] = {"seconds": seconds}
        if actions is not None:
            spec["actions"] = list(actions)
        return self._control("PUT", "latency", spec)

    def latency(self) -> dict[str, Any]:
        return self._control("GET", "latency")

    def server_time(self) -> float:
        """The server's current time (epoch seconds, offset included)."""
        return float(self._control("GET", "clock")["time"])

    def attempts(self) -> list[Attempt]:
        """Enable, resync and login attempts so far, oldest first."""
        return [Attempt(**entry) for entry in self._control("GET", "attempts")["attempts"]]

    def call_counts(self) -> dict[str, int]:
        """Calls received per Action so far (including those a fault answered)."""
        return {k: int(v) for k, v in self._control("GET", "calls")["calls"].items()}

    def create_user(self, name: str, *, account: str | None = None) -> None:
        """An IAM user to enroll (the demo's users; tests may use boto3 instead), in
        ``account`` (default: the dummy credentials' account)."""
        self._control("POST", "users", _with_account({"name": name}, account))

    def virtual_devices(self, *, account: str | None = None) -> list[dict[str, Any]]:
        """Every virtual MFA device of ``account``: its serial number and user (None:
        unassigned)."""
        route = "devices" if account is None else f"devices?account={account}"
        devices: list[dict[str, Any]] = self._control("GET", route)["devices"]
        return devices

    def unassigned_devices(self, *, account: str | None = None) -> list[str]:
        return [d["serial"] for d in self.virtual_devices(account=account) if d["user"] is None]

    def create_account_role(
        self,
        account: str,
        name: str,
        *,
        trusted: Iterable[str] = (DEFAULT_ACCOUNT_ID,),
        external_id: str | None = None,
        policy: Mapping[str, Any] | str | None = None,
        path: str = "/",
    ) -> AccountRole:
        """A role in ``account`` holding ``policy`` inline, which ``trusted`` principals
        (ARNs or account ids; default: the dummy credentials' account) may assume with
        ``external_id``. Credentials from assuming it see ``account``'s IAM only."""
        spec: dict[str, Any] = {
            "account": account,
            "name": name,
            "trust": trust_policy(trusted, external_id),
            "path": path,
        }
        if policy is not None:
            spec["policy"] = dict(policy) if isinstance(policy, Mapping) else policy
        created = self._control("POST", "roles", spec)["role"]
        return AccountRole(str(created["account"]), str(created["role_name"]), str(created["arn"]))

    def admin_client(self, service: str = "iam") -> Any:
        """A boto3 client of ``service`` (iam, sts) at this server, with the dummy
        credentials: an administrator while authorization is not enforced."""
        import boto3  # only the tests and the benchmarks call this

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=DEFAULT_REGION,
            aws_access_key_id=DUMMY_ACCESS_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY,
            verify=str(self.ca_bundle) if self.ca_bundle else None,
        )

    def role_client(
        self, role_arn: str, service: str = "iam", *, external_id: str | None = None
    ) -> Any:
        """A boto3 client of ``service`` as ``role_arn`` (assumed with the dummy
        credentials): what a member account's role sees, for checks and logins."""
        import boto3

        params = {"RoleArn": role_arn, "RoleSessionName": "local-check"}
        if external_id:
            params["ExternalId"] = external_id
        creds = self.admin_client("sts").assume_role(**params)["Credentials"]
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=DEFAULT_REGION,
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
            verify=str(self.ca_bundle) if self.ca_bundle else None,
        )

    def create_principal(
        self,
        name: str,
        policy: Mapping[str, Any] | str,
        *,
        path: str = "/",
        account: str | None = None,
    ) -> Principal:
        """An IAM user of ``account`` holding ``policy`` (a document) inline, with an
        access key (which moto keys to that account).

        Its calls are judged by that policy once enforcement is on.
        """
        spec = {"name": name, "policy": dict(policy) if isinstance(policy, Mapping) else policy}
        created = self._control(
            "POST", "principals", _with_account(spec | {"path": path}, account)
        )["principal"]
        return Principal(**{k: str(v) for k, v in created.items()})

    def set_auth_enforced(self, enforced: bool) -> None:
        """On: every IAM/STS call must be signed with a principal's key and allowed by its
        policies, as in AWS. Off (the default, and after reset): any credentials do anything."""
        self._control("PUT", "auth", {"enforced": enforced})

    def auth_enforced(self) -> bool:
        return bool(self._control("GET", "auth")["enforced"])

    def reset(self) -> None:
        """Forget everything: moto's state, faults, attempts, counts, clock offset,
        principals; authorization is no longer enforced."""
        self._control("POST", "reset")

    # -- internals ---------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The child must import this very package, installed or not.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _read_listening_line(self) -> str:
        """Wait for ``local-iam listening on URL`` on the child's stdout; return URL."""
        process = self._process
        assert process is not None and process.stdout is not None
        deadline = time.monotonic() + self._startup_timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").strip()
                    if line.startswith(LISTENING_PREFIX):
                        return line[len(LISTENING_PREFIX) :]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LocalIamError(
                        "the local IAM server did not start within "
                        f"{self._startup_timeout:.0f} s; its stderr ends with:\n"
                        f"{self.log_tail(2000)}"
                    )
                if selector.select(timeout=min(remaining, 0.5)):
                    chunk = os.read(process.stdout.fileno(), 4096)
                    if chunk:
                        buffer += chunk
                        continue
                if process.poll() is not None:
                    raise LocalIamError(
                        "the local IAM server exited before listening (status "
                        f"{process.returncode}); its stderr ends with:\n{self.log_tail(2000)}"
                    )

    def _control(
        self, method: str, route: str, payload: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        data = json.dumps(payload).encode("utf-8") if payload is not None else None
        request = urllib.request.Request(  # noqa: S310 - this server's own URL only
            self.endpoint_url + CONTROL_PREFIX + route,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            # S310: the URL is always this server's endpoint.
            with self._opener.open(request, timeout=10) as response:
                answer: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")
            raise LocalIamError(f"{method} {route}: HTTP {error.code}: {detail}") from error
        except (urllib.error.URLError, OSError) as error:
            raise LocalIamError(f"{method} {route}: {error}") from error
        return answer
