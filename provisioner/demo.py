"""`provisioner demo`: the whole job on a laptop with no YubiKey and no AWS account.

It starts the strict local IAM server (moto, made to check codes the way AWS does) and
emulated YubiKeys, through the real pcscd when it can (root, pcscd and vpcd installed)
and in-process otherwise; enrolls a few users with exactly the code `provisioner enroll`
runs; proves each token works by logging in with a code computed on it; and shows one
enrollment failing half-way and being rolled back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TextIO

from .aws_iam import login_with_mfa
from .cli import TerminalProgress
from .config import Config
from .desk import Desk
from .emulator import EmulatedConnection, EmulatedYubiKey, PcscStack, PcscStackError
from .errors import EnrollmentFailed, ProvisionerError
from .local_iam import LocalIamServer
from .model import EnrollmentResult
from .yubikey import Pcsc, YubiKeyToken, open_token

FIRST_SERIAL = 31_000_001


class _Tokens:
    """Plugs emulated keys in, through pcscd + vpcd or in-process."""

    def __init__(self, stack: PcscStack | None) -> None:
        self.stack = stack
        self._pcsc = Pcsc() if stack else None

    @property
    def how(self) -> str:
        if self.stack:
            return f"through pcscd, in the vpcd readers {', '.join(self.stack.reader_names)}"
        return "in-process (no pcscd)"

    @contextlib.contextmanager
    def plugged(
        self, key: EmulatedYubiKey, slot: int, password: str | None
    ) -> Iterator[YubiKeyToken]:
        if self.stack is None or self._pcsc is None:
            with YubiKeyToken(
                lambda: EmulatedConnection(key),
                "in-process emulated YubiKey",
                oath_password=password,
            ) as token:
                yield token
            return
        self.stack.insert(key, slot)
        try:
            with open_token(self._pcsc, serial=key.serial, oath_password=password) as token:
                yield token
        finally:
            self.stack.remove(slot)

    def close(self) -> None:
        if self._pcsc is not None:
            self._pcsc.close()


@contextlib.contextmanager
def _pcsc_stack(in_process: bool, out: TextIO) -> Iterator[PcscStack | None]:
    if in_process:
        yield None
        return
    stack = PcscStack()
    try:
        stack.start()
    except PcscStackError as e:
        out.write(f"(no PC/SC stack: {e}; using in-process tokens instead)\n")
        yield None
        return
    try:
        yield stack
    finally:
        stack.stop()


def run_demo(users: list[str], in_process: bool, out: TextIO) -> int:
    out.write("provisioner demo: emulated YubiKeys, a local IAM server; no hardware, no AWS.\n")
    with LocalIamServer() as server:
        os.environ.update(server.aws_env())
        out.write(f"local IAM server (strict moto) at {server.endpoint_url}\n")
        for user in users:
            server.create_user(user)
        out.write(f"IAM users: {', '.join(users)}\n")
        with _pcsc_stack(in_process, out) as stack:
            tokens = _Tokens(stack)
            try:
                return _enroll_all(server, tokens, users, out)
            finally:
                tokens.close()


def _enroll_all(server: LocalIamServer, tokens: _Tokens, users: list[str], out: TextIO) -> int:
    config = Config(desk="demo-desk")
    desk = Desk.from_config(config)
    out.write(f"tokens are plugged in {tokens.how}\n")
    results: list[EnrollmentResult] = []
    for i, user in enumerate(users):
        key = EmulatedYubiKey(serial=FIRST_SERIAL + i)
        out.write(f"\n== {user}: YubiKey {key.serial} plugged in\n")
        progress = TerminalProgress(out, prefix="  ")
        with tokens.plugged(key, i % 2, None) as token:
            try:
                result = desk.enrollment(progress).run(token, user)
            except ProvisionerError as e:
                out.write(f"  FAILED: {e.one_line()}\n")
                return 1
            results.append(result)
            out.write(f"  enrolled in {result.seconds * 1000:.0f} ms: {result.device_arn}\n")
            _show_server_check(server, result, out)
            _login(desk, token, result, out)

    out.write("\n== what a failure looks like: IAM fails at EnableMFADevice for bob's second key\n")
    _show_rollback(server, tokens, desk, users[min(1, len(users) - 1)], out)

    out.write("\nsummary:\n")
    for r in results:
        out.write(
            f"  {r.user:<10} token {r.token_serial}  {r.seconds * 1000:6.1f} ms  {r.device_arn}\n"
        )
    out.write(
        "every token above holds its credential, every device is enabled, nothing else exists.\n"
    )
    return 0


def _show_server_check(server: LocalIamServer, result: EnrollmentResult, out: TextIO) -> None:
    enable = [
        a
        for a in server.attempts()
        if a.action == "EnableMFADevice" and a.serial == result.device_arn
    ]
    if enable and enable[-1].accepted:
        offset = enable[-1].step_offset
        which = {0: "N-1 and N", 1: "N and N+1", -1: "N-2 and N-1"}.get(offset or 0, str(offset))
        out.write(
            f"  IAM checked both codes against the seed it holds, at its own time: steps {which}\n"
        )


def _login(desk: Desk, token: YubiKeyToken, result: EnrollmentResult, out: TextIO) -> None:
    now = int(desk.clock.now())
    code = token.calculate(result.credential_id, now)
    expiry = login_with_mfa(result.device_arn, code)
    out.write(f"  login with a fresh code from the token: accepted (session until {expiry})\n")


def _show_rollback(
    server: LocalIamServer, tokens: _Tokens, desk: Desk, user: str, out: TextIO
) -> None:
    key = EmulatedYubiKey(serial=FIRST_SERIAL + 99)
    server.inject_fault(
        "EnableMFADevice", code="ServiceFailure", count=desk.config.iam.max_attempts
    )
    progress = TerminalProgress(out, prefix="  ")
    with tokens.plugged(key, 0, None) as token:
        try:
            desk.enrollment(progress).run(token, user)
        except EnrollmentFailed as e:
            out.write(f"  failed as expected: {e.one_line()}\n")
        else:
            out.write("  (the fault did not fire)\n")
    server.clear_faults()
    left = [c.id for c in key.credentials()]
    out.write(
        f"  token {key.serial} now holds: {left or 'nothing'}; "
        f"unassigned devices in IAM: {server.unassigned_devices() or 'none'}\n"
    )
