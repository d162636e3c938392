"""The demo itself. It imports the simulators at the top: only `provisioner.demo.run_demo`
imports this module, after checking they are installed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

from emulated_yubikey import (
    DEFAULT_READER_NAME,
    EmulatedConnection,
    EmulatedYubiKey,
    PcscStack,
    PcscStackError,
    VpcdCard,
)
from local_iam_server import LocalIamServer
from provisioner.adapters.aws.iam import login_with_mfa
from provisioner.adapters.yubikey import Pcsc, YubiKeyToken, open_token
from provisioner.config import AccountConfig, Config
from provisioner.core.errors import EnrollmentFailed, ExitStatus, ProvisionerError
from provisioner.core.model import TOTP_PERIOD, EnrollmentResult
from provisioner.core.ports import NullJournal, Progress
from provisioner.desk import Desk

#: Makes the progress display for one enrollment (the CLI's terminal lines, indented).
ProgressFactory = Callable[[], Progress]

FIRST_SERIAL = 31_000_001
VPCD_PORT = 35963


class _Readers(Protocol):
    @property
    def reader_names(self) -> tuple[str, ...]: ...

    def insert(self, key: EmulatedYubiKey, slot: int = 0) -> object: ...

    def remove(self, slot: int = 0) -> None: ...


class _AttachedReaders:
    """vpcd readers of a pcscd that is already running (one pcscd per machine)."""

    reader_names = (f"{DEFAULT_READER_NAME} 00 00", f"{DEFAULT_READER_NAME} 00 01")

    def __init__(self, pcsc: Pcsc) -> None:
        self._pcsc = pcsc
        self._cards: dict[int, VpcdCard] = {}

    @classmethod
    def find(cls) -> _AttachedReaders | None:
        try:
            pcsc = Pcsc()
        except ProvisionerError:
            return None
        names = {r.name for r in pcsc.readers()}
        if not set(cls.reader_names) <= names:
            pcsc.close()
            return None
        return cls(pcsc)

    def insert(self, key: EmulatedYubiKey, slot: int = 0) -> object:
        card = VpcdCard(key, port=VPCD_PORT + slot)
        card.insert()
        self._cards[slot] = card
        self._wait(slot, present=True)
        return card

    def remove(self, slot: int = 0) -> None:
        card = self._cards.pop(slot, None)
        if card is not None:
            card.remove()
            self._wait(slot, present=False)

    def _wait(self, slot: int, *, present: bool) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            states = {r.name: r.card_present for r in self._pcsc.readers()}
            if states.get(self.reader_names[slot]) == present:
                return
            time.sleep(0.02)
        raise PcscStackError(f"pcscd did not see the card change in {self.reader_names[slot]}")

    def close(self) -> None:
        for slot in list(self._cards):
            self.remove(slot)
        self._pcsc.close()


class _Tokens:
    """Plugs emulated keys in: through pcscd + vpcd, or in-process."""

    def __init__(self, readers: _Readers | None) -> None:
        self.readers = readers
        self._pcsc = Pcsc() if readers else None

    @property
    def how(self) -> str:
        if self.readers:
            names = ", ".join(self.readers.reader_names)
            return f"through pcscd, in the vpcd readers {names}"
        return "in-process (no pcscd)"

    @contextlib.contextmanager
    def plugged(self, key: EmulatedYubiKey, slot: int) -> Iterator[YubiKeyToken]:
        if self.readers is None or self._pcsc is None:
            with YubiKeyToken(lambda: EmulatedConnection(key), "in-process emulated YubiKey") as t:
                yield t
            return
        self.readers.insert(key, slot)
        try:
            with open_token(self._pcsc, serial=key.serial) as token:
                yield token
        finally:
            self.readers.remove(slot)

    def close(self) -> None:
        if self._pcsc is not None:
            self._pcsc.close()


@contextlib.contextmanager
def _readers(in_process: bool, out: TextIO) -> Iterator[_Readers | None]:
    if in_process:
        yield None
        return
    stack = PcscStack()
    try:
        stack.start()
    except PcscStackError as e:
        attached = _AttachedReaders.find()
        if attached is None:
            out.write(f"(no PC/SC stack: {e.args[0]}; using in-process tokens instead)\n")
            yield None
            return
        out.write("(pcscd already runs with YubiKey-named vpcd readers: using them)\n")
        try:
            yield attached
        finally:
            attached.close()
        return
    try:
        yield stack
    finally:
        stack.stop()


def run_demo(users: list[str], in_process: bool, out: TextIO, progress: ProgressFactory) -> int:
    if not users:
        out.write("provisioner demo: no users given\n")
        return ExitStatus.USAGE
    out.write("provisioner demo: emulated YubiKeys, a local IAM server; no hardware, no AWS.\n")
    with LocalIamServer() as server:
        os.environ.update(server.aws_env())
        out.write(f"local IAM server (strict moto) at {server.endpoint_url}\n")
        for user in users:
            server.create_user(user)
        out.write(f"IAM users: {', '.join(users)}\n")
        with _readers(in_process, out) as readers:
            tokens = _Tokens(readers)
            try:
                return _enroll_all(server, tokens, users, out, progress)
            finally:
                tokens.close()


def _enroll_all(
    server: LocalIamServer,
    tokens: _Tokens,
    users: list[str],
    out: TextIO,
    progress: ProgressFactory,
) -> int:
    desk = Desk.from_config(Config(desk="demo-desk"))
    out.write(f"tokens are plugged in {tokens.how}\n")
    results: list[tuple[EnrollmentResult, EmulatedYubiKey]] = []
    for i, user in enumerate(users):
        key = EmulatedYubiKey(serial=FIRST_SERIAL + i)
        out.write(f"\n== {user}: YubiKey {key.serial} plugged in\n")
        with tokens.plugged(key, i % 2) as token:
            try:
                result = desk.enrollment(progress()).run(token, user)
            except ProvisionerError as e:
                out.write(f"  FAILED: {e.one_line()}\n")
                return ExitStatus.FAILED
            results.append((result, key))
            out.write(f"  enrolled in {result.seconds * 1000:.0f} ms: {result.device_arn}\n")
            _show_server_check(server, result, out)
            _login(desk, token, result, out)

    victim = users[min(1, len(users) - 1)]
    # (the accounts part below follows the single-account one, after its summary)
    out.write(
        f"\n== what a failure looks like: IAM fails at EnableMFADevice for {victim}'s second key\n"
    )
    spare = _show_rollback(server, tokens, desk, victim, out, progress)

    status = _summary(server, results, spare, out)
    if status != ExitStatus.OK:
        return status
    return _accounts(server, tokens, out, progress)


# --- one plug, three accounts -------------------------------------------------------------

DEMO_ACCOUNTS = {"prod": "111111111111", "staging": "222222222222", "sandbox": "333333333333"}
EXTERNAL_ID = "demo-desk-external-id"


def _accounts(
    server: LocalIamServer, tokens: _Tokens, out: TextIO, progress: ProgressFactory
) -> int:
    """One person enrolled in three accounts with one plug, a login to each with a fresh
    code from the token; then a failure in the third account undoing all three."""
    out.write("\n== one plug, three AWS accounts (the desk assumes a role in each)\n")
    accounts = []
    for name, account in DEMO_ACCOUNTS.items():
        role = server.create_account_role(account, "provisioner-desk", external_id=EXTERNAL_ID)
        accounts.append(AccountConfig(name, role_arn=role.arn, external_id=EXTERNAL_ID))
        for person in ("erin", "frank"):
            server.create_user(person, account=account)
        out.write(f"  account {name} ({account}): role {role.arn}, users erin and frank\n")
    desk = Desk.from_config(Config(desk="demo-desk", accounts=tuple(accounts)))
    key = EmulatedYubiKey(serial=FIRST_SERIAL + 50)
    out.write(f"\n== erin: YubiKey {key.serial} plugged in, enrolled in every account at once\n")
    with tokens.plugged(key, 0) as token:
        try:
            result = desk.accounts_enrollment(
                "erin", desk.config.accounts, progress(), lambda name: NullJournal()
            ).run(token, "erin")
        except ProvisionerError as e:
            out.write(f"  FAILED: {e.one_line()}\n")
            return ExitStatus.FAILED
        out.write(
            f"  enrolled in {len(result.enrolled)} accounts in {result.seconds * 1000:.0f} ms\n"
        )
        for name, one in result.enrolled:
            listed = server.virtual_devices(account=DEMO_ACCOUNTS[name])
            assigned = any(d["serial"] == one.device_arn and d["user"] == "erin" for d in listed)
            code = token.calculate(one.credential_id, int(desk.clock.now()))
            _login_in(server, name, one.device_arn, code)
            out.write(
                f"  {name}: {one.device_arn} listed for erin: {'yes' if assigned else 'NO'}; "
                f"credential {one.credential_id}; login with a fresh code: accepted\n"
            )
    spare = EmulatedYubiKey(serial=FIRST_SERIAL + 51)
    out.write(f"\n== frank: YubiKey {spare.serial}; IAM fails EnableMFADevice in sandbox only\n")
    server.inject_fault(
        "EnableMFADevice",
        code="ServiceFailure",
        count=desk.config.iam.max_attempts,
        account=DEMO_ACCOUNTS["sandbox"],
    )
    with tokens.plugged(spare, 0) as token:
        try:
            desk.accounts_enrollment(
                "frank", desk.config.accounts, progress(), lambda name: NullJournal()
            ).run(token, "frank")
        except EnrollmentFailed as e:
            out.write(f"  failed as expected: {e.one_line()}\n")
        else:
            out.write("  (the fault did not fire)\n")
    server.clear_faults()
    left = {
        name: [d["serial"] for d in server.virtual_devices(account=account) if d["user"] != "erin"]
        for name, account in DEMO_ACCOUNTS.items()
    }
    on_token = [c.id for c in spare.credentials()]
    for name, devices in left.items():
        out.write(f"  {name}: devices of frank or unassigned: {len(devices)}\n")
    out.write(f"  credentials left on token {spare.serial}: {len(on_token)}\n")
    if any(left.values()) or on_token:
        out.write("demo FAILED: the accounts' failure left something behind\n")
        return ExitStatus.FAILED
    out.write("erin holds a working device in every account; frank has nothing anywhere.\n")
    return ExitStatus.OK


def _login_in(server: LocalIamServer, name: str, device: str, code: str) -> None:
    """A login to ``name``'s account with a code from the token (its role's session)."""
    role = f"arn:aws:iam::{DEMO_ACCOUNTS[name]}:role/provisioner-desk"
    sts = server.role_client(role, "sts", external_id=EXTERNAL_ID)
    sts.get_session_token(SerialNumber=device, TokenCode=code)


def _show_server_check(server: LocalIamServer, result: EnrollmentResult, out: TextIO) -> None:
    attempts = [
        a
        for a in server.attempts()
        if a.action == "EnableMFADevice" and a.serial == result.device_arn and a.accepted
    ]
    if attempts:
        offset = attempts[-1].step_offset or 0
        pair = {0: "N-1 and N", 1: "N and N+1", -1: "N-2 and N-1"}.get(offset, str(offset))
        # N by the server's own clock, so a reader (and test_demo) can compare it with the
        # steps the desk says it computed.
        now_step = int(attempts[-1].server_time // TOTP_PERIOD)
        out.write(
            f"  IAM checked both codes against the seed it holds, at its own time: steps {pair}"
            f" (IAM's step N = {now_step})\n"
        )


def _login(desk: Desk, token: YubiKeyToken, result: EnrollmentResult, out: TextIO) -> None:
    code = token.calculate(result.credential_id, int(desk.clock.now()))
    expiry = login_with_mfa(result.device_arn, code)
    out.write(f"  login with a fresh code from the token: accepted (session until {expiry})\n")


def _show_rollback(
    server: LocalIamServer,
    tokens: _Tokens,
    desk: Desk,
    user: str,
    out: TextIO,
    progress: ProgressFactory,
) -> EmulatedYubiKey:
    key = EmulatedYubiKey(serial=FIRST_SERIAL + 99)
    server.inject_fault(
        "EnableMFADevice", code="ServiceFailure", count=desk.config.iam.max_attempts
    )
    with tokens.plugged(key, 0) as token:
        try:
            desk.enrollment(progress()).run(token, user)
        except EnrollmentFailed as e:
            out.write(f"  failed as expected: {e.one_line()}\n")
        else:
            out.write("  (the fault did not fire)\n")
    server.clear_faults()
    return key


def _summary(
    server: LocalIamServer,
    results: list[tuple[EnrollmentResult, EmulatedYubiKey]],
    spare: EmulatedYubiKey,
    out: TextIO,
) -> int:
    out.write("\nsummary (checked, not assumed):\n")
    devices = {d["serial"]: d["user"] for d in server.virtual_devices()}
    problems: list[str] = []
    for result, key in results:
        on_token = result.credential_id in {c.id for c in key.credentials()}
        assigned = devices.get(result.device_arn) == result.user
        state = "ok" if on_token and assigned else "PROBLEM"
        out.write(
            f"  {result.user:<10} token {result.token_serial}  {result.seconds * 1000:6.1f} ms"
            f"  credential on token: {'yes' if on_token else 'NO'}, device enabled: "
            f"{'yes' if assigned else 'NO'}  {state}\n"
        )
        if state != "ok":
            problems.append(result.user)
    unassigned = [serial for serial, user in devices.items() if user is None]
    leftover = [c.id for c in spare.credentials()]
    out.write(
        f"  unassigned virtual MFA devices: {len(unassigned)}; credentials left on the "
        f"failed token {spare.serial}: {len(leftover)}\n"
    )
    if problems or unassigned or leftover:
        out.write("demo FAILED: something is half done (see above)\n")
        return ExitStatus.FAILED
    out.write("every token holds its credential, every device is enabled, nothing else exists.\n")
    return ExitStatus.OK
