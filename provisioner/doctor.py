"""`provisioner doctor`: what stands between this desk and a working enrollment.

Each check asks the real thing (pcscd, the readers, libusb, the installed files, AWS)
and ends in one :class:`Finding`: OK, or FAIL with the fix, or SKIP when a check it
depends on failed. It runs as whoever starts it, so ``sudo -u provisioner provisioner
doctor`` checks what the daemon's user may do.
"""

from __future__ import annotations

import errno
import os
import shlex
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from provisioner import install
from provisioner.adapters.aws.iam import IamClient
from provisioner.adapters.aws.permissions import (
    MEMBER_PERMISSIONS,
    MEMBER_POLICY_FILE,
    POLICY_FILE,
    checks,
    missing,
    policy_source_arn,
)
from provisioner.adapters.control_socket import socket_answers
from provisioner.adapters.yubikey import Pcsc
from provisioner.config import AccountConfig, Config
from provisioner.core.clock import AwsClock
from provisioner.core.errors import AccessDenied, ProvisionerError, TokenBusy, TokenRemoved

#: libpcsclite's socket to pcscd; PCSCLITE_CSOCK_NAME moves it, as it does for libpcsclite.
PCSCD_SOCKET = "/run/pcscd/pcscd.comm"
#: AWS refuses requests signed more than five minutes off its clock.
MAX_SIGNING_SKEW = 300.0
#: Beyond this the desk's clock needs fixing even though enrollments use AWS's time.
SKEW_TO_FIX = 30.0
#: Processes known to take a YubiKey's CCID interface for themselves.
CARD_HOLDERS = ("scdaemon", "opensc-tool", "pkcs11-tool", "pcsc_scan", "yubioath-desktop")


class Status(StrEnum):
    OK = "OK"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status.value:<4}  {self.check}: {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def ok(check: str, detail: str) -> Finding:
    return Finding(check, Status.OK, detail)


def fail(check: str, detail: str, fix: str) -> Finding:
    return Finding(check, Status.FAIL, detail, fix)


def skip(check: str, why: str) -> Finding:
    return Finding(check, Status.SKIP, why)


# --- PC/SC ---------------------------------------------------------------------------


def pcscd_socket() -> Path:
    return Path(os.environ.get("PCSCLITE_CSOCK_NAME") or PCSCD_SOCKET)


def check_pcscd(open_pcsc: Callable[[], Pcsc]) -> tuple[Finding, Pcsc | None]:
    name = "pcscd"
    path = pcscd_socket()
    try:
        pcsc = open_pcsc()
    except ProvisionerError as e:
        if socket_answers(path, timeout=2.0):
            # The socket accepts us but pcscd hangs up: its polkit rule said no.
            return (
                fail(
                    name,
                    f"pcscd at {path} refuses this user ({os.geteuid()}): {e.message}",
                    "allow the user in polkit (org.debian.pcsc-lite.access_pcsc and "
                    "access_card; the daemon's user is 'provisioner'), or run as root",
                ),
                None,
            )
        return (
            fail(
                name,
                f"pcscd is not running (nothing answers on {path})",
                "apt-get install pcscd && systemctl enable --now pcscd.socket",
            ),
            None,
        )
    return ok(name, f"reachable at {path}"), pcsc


def check_readers(pcsc: Pcsc | None) -> Finding:
    name = "readers"
    if pcsc is None:
        return skip(name, "pcscd is not reachable")
    try:
        readers = pcsc.readers()
    except ProvisionerError as e:
        return fail(name, e.message, "restart pcscd: systemctl restart pcscd")
    if not readers:
        return fail(
            name,
            "no PC/SC reader is visible",
            "plug in a YubiKey; if it is in, enable its smart card interface "
            "(ykman config usb --enable CCID) and check that pcscd has its CCID driver "
            "(apt-get install libccid)",
        )
    keys = [r for r in readers if r.is_yubikey_reader]
    with_card = [r.name for r in readers if r.card_present]
    what = f"{len(readers)} reader(s), {len(keys)} YubiKey reader(s), {len(with_card)} with a card"
    return ok(name, what)


def _running(names: Sequence[str], proc: Path = Path("/proc")) -> list[str]:
    """'name (pid N)' for each running process whose command name is in ``names``."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            found.append(f"{comm} (pid {entry.name})")
    return sorted(found)


def card_holders(proc: Path = Path("/proc")) -> list[str]:
    """The running programs known to take a YubiKey's card for themselves, 'name (pid
    N)': the likely holders of a card that cannot be opened (PC/SC does not say whose)."""
    return _running(CARD_HOLDERS, proc)


def check_cards_free(pcsc: Pcsc | None, holders: Callable[[], list[str]] = lambda: []) -> Finding:
    """Each card in a YubiKey reader can be opened exclusively, as an enrollment does."""
    name = "cards"
    if pcsc is None:
        return skip(name, "pcscd is not reachable")
    try:
        readers = [r for r in pcsc.readers() if r.card_present and r.is_yubikey_reader]
    except ProvisionerError as e:
        return skip(name, f"cannot list readers ({e.message})")
    if not readers:
        return skip(name, "no YubiKey is plugged in")
    busy = []
    for reader in readers:
        try:
            pcsc.connect(reader.name).close()
        except TokenBusy:
            busy.append(reader.name)
        except (TokenRemoved, ProvisionerError):
            continue  # pulled while we looked: not this check's business
    if not busy:
        return ok(name, f"{len(readers)} YubiKey(s), none held by another program")
    suspects = holders()
    who = f" ({', '.join(suspects)} running)" if suspects else ""
    return fail(
        name,
        f"held by another program{who}: {', '.join(busy)}",
        "stop it (gpgconf --kill scdaemon) or make it share the card (pcsc-shared in "
        "~/.gnupg/scdaemon.conf); close OpenSC/PKCS#11 users such as browsers",
    )


# --- USB, installation, state --------------------------------------------------------


def check_libusb(list_usb: Callable[[], object]) -> Finding:
    name = "libusb"
    try:
        list_usb()
    except ProvisionerError as e:
        return fail(name, e.message, e.hint or "apt-get install libusb-1.0-0")
    return ok(name, "pyusb can list USB devices (FIDO-only keys are reported)")


def check_installed(root: Path) -> list[Finding]:
    unit, rule = root / install.UNIT_PATH, root / install.RULE_PATH
    findings = []
    if not rule.is_file():
        findings.append(fail("udev rule", f"{rule} is missing", "provisioner install"))
    elif rule.read_text() != install.shipped_text("70-provisioner.rules"):
        findings.append(
            fail("udev rule", f"{rule} differs from this version's", "provisioner install")
        )
    else:
        findings.append(ok("udev rule", f"{rule} installed"))
    if not unit.is_file():
        findings.append(fail("systemd unit", f"{unit} is missing", "provisioner install"))
        return findings
    command = _exec_start(unit.read_text())
    target = Path(command) if command else None
    if target is None or not (root / target.relative_to("/")).is_file():
        findings.append(
            fail(
                "systemd unit",
                f"{unit} runs {command or 'nothing'}, which does not exist",
                "provisioner install (from the installation that should run)",
            )
        )
    else:
        findings.append(ok("systemd unit", f"{unit} runs {command}"))
    return findings


def _exec_start(unit: str) -> str | None:
    """The program a unit's ExecStart= runs (its first word, unquoted)."""
    for line in unit.splitlines():
        if line.startswith("ExecStart="):
            words = shlex.split(line[len("ExecStart=") :].lstrip("-@:+!"))
            return words[0] if words else None
    return None


def check_state_directory(config: Config) -> Finding:
    name = "state directory"
    path = config.daemon.state_path()
    # Not created here: systemd makes it, owned by the service's user (StateDirectory=).
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".provisioner-doctor-"):
            pass
    except OSError as e:
        return fail(
            name,
            f"cannot write in {path}: {e.strerror}",
            "systemd creates it for the service (StateDirectory=); by hand: "
            f"install -d -o provisioner -g provisioner -m 0750 {path}",
        )
    if existing != path:
        return ok(name, f"{path} does not exist yet; it can be created in {existing}")
    return ok(name, f"{path} is writable")


# --- AWS -----------------------------------------------------------------------------


def check_aws(
    config: Config, iam: IamClient, clock: AwsClock, sample_user: str | None
) -> Iterator[Finding]:
    """Credentials, then each permission the desk needs, then the clock against AWS's."""
    try:
        me = iam.caller_identity()
    except ProvisionerError as e:
        yield fail("AWS credentials", e.message, e.hint or "configure AWS credentials")
        yield skip("IAM permissions", "no valid AWS credentials")
        yield skip("clock", "no answer from AWS")
        return
    yield ok("AWS credentials", f"{me.arn} (account {me.account})")
    principal = policy_source_arn(me.arn)
    user = sample_user or "provisioner-doctor-sample"
    wanted = checks(
        account=me.account,
        device_path=config.iam.device_path,
        user_arn=f"arn:aws:iam::{me.account}:user/{user}",
        principal_arn=principal,
    )
    try:
        evaluations = iam.simulate(principal, wanted)
    except AccessDenied as e:
        yield fail(
            "IAM permissions",
            f"cannot check them: {e.message}",
            f"grant iam:SimulatePrincipalPolicy as {POLICY_FILE} does",
        )
    except ProvisionerError as e:
        yield fail("IAM permissions", f"cannot check them: {e.message}", e.hint or "retry")
    else:
        denied = sorted({e.action for e in missing(evaluations)})
        if denied:
            yield fail(
                "IAM permissions",
                f"{me.arn} may not: {', '.join(denied)}",
                f"attach {POLICY_FILE} (with your account id) to the desk's principal",
            )
        else:
            yield ok("IAM permissions", f"all {len(wanted)} actions allowed for {principal}")
    offset = clock.offset
    if offset is None:
        yield skip("clock", "AWS sent no Date header")
        return
    skew = offset.estimate
    direction = "behind" if skew > 0 else "ahead of"
    detail = f"{abs(skew):.1f} s {direction} AWS (±{offset.uncertainty:.1f} s)"
    if abs(skew) >= SKEW_TO_FIX:
        fix = "enable time sync: timedatectl set-ntp true (or chrony)"
        if abs(skew) >= MAX_SIGNING_SKEW:
            detail += ": AWS refuses requests signed this far off"
        yield fail("clock", detail, fix)
    else:
        yield ok("clock", detail + "; codes follow AWS's clock")


def check_account(
    config: Config, account: AccountConfig, iam: IamClient, sample_user: str | None
) -> Iterator[Finding]:
    """One of the desk's [[accounts]]: its role assumed (trust policy, external id), then
    each permission the desk needs there, asked of that account's policy simulator for
    the role."""
    check = f"account {account.name}"
    try:
        me = iam.caller_identity()
    except ProvisionerError as e:
        yield fail(check, e.message, e.hint or "check the role and its trust policy")
        yield skip(f"{check} permissions", "the role could not be assumed")
        return
    how = "role assumed" if account.role_arn else "the desk's own credentials"
    external = " with its external id" if account.external_id else ""
    yield ok(check, f"{how}{external}: {me.arn} (account {me.account})")
    principal = policy_source_arn(me.arn)
    user = account.iam_user(sample_user or "provisioner-doctor-sample")
    wanted = checks(
        account=me.account,
        device_path=config.enrollment_settings(account).device_path,
        user_arn=f"arn:aws:iam::{me.account}:user/{user}",
        principal_arn=principal,
        table=MEMBER_PERMISSIONS,
    )
    try:
        denied = sorted({e.action for e in missing(iam.simulate(principal, wanted))})
    except ProvisionerError as e:
        yield fail(
            f"{check} permissions",
            f"cannot check them: {e.message}",
            f"grant the role iam:SimulatePrincipalPolicy as {MEMBER_POLICY_FILE} does",
        )
        return
    if denied:
        yield fail(
            f"{check} permissions",
            f"{principal} may not: {', '.join(denied)}",
            f"attach {MEMBER_POLICY_FILE} (with the account's id) to the role",
        )
    else:
        yield ok(f"{check} permissions", f"all {len(wanted)} actions allowed for {principal}")


def run(
    config: Config,
    *,
    iam: Callable[[], tuple[IamClient, AwsClock]],
    open_pcsc: Callable[[], Pcsc] = Pcsc,
    list_usb: Callable[[], object],
    root: Path = Path("/"),
    sample_user: str | None = None,
    directory: Callable[[AccountConfig], IamClient] | None = None,
) -> list[Finding]:
    findings: list[Finding] = []
    pcscd, pcsc = check_pcscd(open_pcsc)
    findings.append(pcscd)
    try:
        findings.append(check_readers(pcsc))
        findings.append(check_cards_free(pcsc, card_holders))
    finally:
        if pcsc is not None:
            pcsc.close()
    findings.append(check_libusb(list_usb))
    findings += check_installed(root)
    findings.append(check_state_directory(config))
    try:
        client, clock = iam()
    except ProvisionerError as e:
        findings.append(fail("AWS credentials", e.message, e.hint or "check [iam]"))
    else:
        findings += check_aws(config, client, clock, sample_user)
        for account in config.accounts:
            if directory is None:
                findings.append(skip(f"account {account.name}", "not checked here"))
                continue
            findings += check_account(config, account, directory(account), sample_user)
    return findings


__all__ = ["Finding", "Status", "run"]
