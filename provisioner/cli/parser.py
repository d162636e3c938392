"""The command line: every command, its flags and its --help."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from typing import NoReturn, TypeVar

from provisioner import __version__
from provisioner.cli.common import (
    EXIT_CODES_HELP,
)
from provisioner.cli.enrollment import cmd_enroll, cmd_replace, cmd_resync, cmd_revoke
from provisioner.cli.inspection import (
    cmd_doctor,
    cmd_fleet,
    cmd_history,
    cmd_lost,
    cmd_reconcile,
    cmd_status,
    cmd_tokens,
    cmd_watch,
)
from provisioner.cli.queueing import cmd_cancel, cmd_queue, cmd_roster_load
from provisioner.cli.setup import (
    cmd_daemon,
    cmd_demo,
    cmd_install,
    cmd_store_import,
    cmd_store_migrate,
)
from provisioner.config import DEFAULT_PATH, ENV_PATH
from provisioner.core import validation
from provisioner.core.audit import parse_since
from provisioner.core.errors import (
    EXIT_USAGE,
    InvalidInput,
)

log = logging.getLogger("provisioner")


# --- parser ----------------------------------------------------------------------------------

_T = TypeVar("_T")


class Parser(argparse.ArgumentParser):
    """argparse that says what is wrong in one line (its usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} ({self.prog} --help shows the usage)\n")


def _checked(check: Callable[[str], _T]) -> Callable[[str], _T]:
    """An argparse ``type=`` from one of the project's checks: every argument is checked
    while the command line is read, before pcscd, IAM, the daemon or the store is touched."""

    def parse(text: str) -> _T:
        try:
            return check(text)
        except InvalidInput as e:
            raise argparse.ArgumentTypeError(e.one_line()) from None

    return parse


#: The most records the daemon answers in one history request.
HISTORY_LIMIT_MAX = 100_000

_user = _checked(validation.user_name)
_serial = _checked(validation.token_serial)
_since = _checked(parse_since)
_request_number = _checked(
    lambda text: validation.whole_number(text, "a request number", minimum=1, maximum=2**63 - 1)
)
_limit = _checked(
    lambda text: validation.whole_number(
        text, "a number of records", minimum=1, maximum=HISTORY_LIMIT_MAX
    )
)
_accounts = _checked(validation.account_names)


def _role_name(text: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_$]{0,62}", text):
        raise InvalidInput(f"{text!r} is not a role name (lower-case letters, digits, _)")
    return text


_users = _checked(lambda text: [validation.user_name(u) for u in text.split(",") if u])


def token_choice(parser: argparse.ArgumentParser, which: str) -> None:
    """--reader or --serial: how the operator names a token that is plugged in."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--reader", help=f"the reader holding {which} (its name, or part of it)")
    group.add_argument(
        "--serial", type=_serial, help=f"{which}'s serial number (printed on the key)"
    )


def accounts_choice(parser: argparse.ArgumentParser, verb: str) -> None:
    """--accounts: which of the desk's [[accounts]] (default: all of them)."""
    parser.add_argument(
        "--accounts",
        metavar="NAMES",
        type=_accounts,
        help=f"{verb} in these of the desk's [[accounts]] only, comma-separated "
        "(default: every account the desk serves)",
    )


def direct_choice(parser: argparse.ArgumentParser, verb: str) -> None:
    """--direct: do it in this command even though the desk daemon runs."""
    parser.add_argument(
        "--direct",
        action="store_true",
        help=f"{verb} here even if the desk daemon is running (it must not hold the token)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="provisioner",
        description=(
            "Enroll YubiKeys as AWS IAM MFA devices: the token's OATH applet gets a TOTP "
            "credential, computes two consecutive codes at once, and IAM enables it for "
            "the user. Any failure undoes what was done."
        ),
        epilog=(
            f"configuration: {DEFAULT_PATH} by default, or ${ENV_PATH}, or --config "
            "(reference: provisioner.toml.example).\n"
            "AWS access: the standard boto3 chain (AWS_PROFILE, environment, instance "
            "role); AWS_ENDPOINT_URL_IAM points it at another endpoint.\n\n" + EXIT_CODES_HELP
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"provisioner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", metavar="FILE", help=f"configuration file (default {DEFAULT_PATH})"
        )
        p.add_argument("--debug", action="store_true", help="log every step (never secrets)")

    enroll = sub.add_parser(
        "enroll",
        help="enroll the token that is plugged in for one IAM user",
        description=(
            "Create a virtual MFA device for USER, write its seed into the token's OATH "
            "applet, compute two consecutive codes on the token and enable the device. "
            "Prints each step as it happens and, at the end, the device ARN."
        ),
        epilog="examples:\n  provisioner enroll --user alice\n"
        "  provisioner enroll --user bob --serial 12345678\n"
        "  provisioner enroll --user dave --accounts prod,dev   # of the desk's [[accounts]]\n"
        '  provisioner enroll --user carol --reader "Yubico YubiKey OTP+FIDO+CCID 00 01"\n\n'
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    enroll.add_argument(
        "--user", required=True, type=_user, help="the IAM user name (case-sensitive)"
    )
    token_choice(enroll, "the token")
    accounts_choice(enroll, "enroll")
    direct_choice(enroll, "enroll")
    enroll.add_argument("--profile", help="AWS profile to use (default: the boto3 chain)")
    common(enroll)
    enroll.set_defaults(func=cmd_enroll)

    tokens = sub.add_parser(
        "tokens",
        help="list readers and the YubiKeys in them",
        description="List PC/SC readers, and serial, firmware and OATH support of each YubiKey.",
    )
    tokens.add_argument(
        "--inventory",
        action="store_true",
        help="instead: every token the fleet (or this desk) has seen, its state (blank, "
        "enrolled, revoked, wiped, lost), users, accounts, and where and when it changed",
    )
    tokens.add_argument("--user", type=_user, help="with --inventory: only this user's tokens")
    tokens.add_argument("--serial", type=_serial, help="with --inventory: only this token")
    tokens.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="with --inventory"
    )
    common(tokens)
    tokens.set_defaults(func=cmd_tokens)

    lost = sub.add_parser(
        "lost",
        help="a token was lost: revoke every device it holds, in every account",
        description=(
            "Deactivates and deletes every virtual MFA device enrolled on the token with "
            "this serial, for every user, in every account the desk serves, from any desk "
            "of the fleet; marks it lost in the inventory; and removes its credentials if "
            "it is ever plugged in at a desk again. Recorded in the audit trail."
        ),
    )
    lost.add_argument("--serial", required=True, type=_serial, help="the lost token's serial")
    common(lost)
    lost.set_defaults(func=cmd_lost)

    demo = sub.add_parser(
        "demo",
        help="enroll emulated YubiKeys against a local IAM server (no hardware, no AWS)",
        description=(
            "Starts a local IAM server (moto, made strict) and emulated YubiKeys (in the "
            "real pcscd through vsmartcard's vpcd reader when run as root with pcscd "
            "installed; in-process otherwise), enrolls a few users, and proves each token "
            "works by logging in with a code computed on it."
        ),
    )
    demo.add_argument(
        "--users", default="alice,bob,carol", type=_users, help="comma-separated user names"
    )
    demo.add_argument(
        "--in-process", action="store_true", help="attach the emulated tokens without pcscd"
    )
    demo.add_argument("--debug", action="store_true", help="log every step (never secrets)")
    demo.set_defaults(func=cmd_demo)

    daemon = sub.add_parser(
        "daemon",
        help="run the desk service in the foreground (what systemd runs)",
        description=(
            "Watch the readers; enroll each YubiKey plugged in for the user queued for it "
            "(provisioner enroll/queue) or named by the roster; serve the control socket. "
            "Speaks systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING). SIGTERM "
            "lets enrollments in progress finish or roll back; SIGHUP re-reads the roster."
        ),
    )
    common(daemon)
    daemon.set_defaults(func=cmd_daemon)

    status = sub.add_parser(
        "status",
        help="the daemon, readers, tokens present, work in progress",
        description=(
            "Asks the desk daemon once: its desk, pcscd and IAM, each reader and the token in "
            "it (its state, user and step), and the queue. provisioner watch shows the same "
            "live."
        ),
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--desk",
        metavar="NAME",
        help="another desk of the fleet (or 'all'): its last heartbeat, from the store",
    )
    common(status)
    status.set_defaults(func=cmd_status)

    doctor = sub.add_parser(
        "doctor",
        help="check this desk: pcscd, readers, cards, libusb, install, AWS access, clock",
        description=(
            "One line per check, OK or FAIL with the fix (SKIP when a check it depends on "
            "failed): pcscd reachable and not refused by polkit; PC/SC readers visible; no "
            "card held by another program (scdaemon, OpenSC); libusb available to pyusb; "
            "the udev rule and the systemd unit installed; the state directory writable; "
            "AWS credentials valid (GetCallerIdentity); every IAM action the desk needs "
            "allowed for that principal (SimulatePrincipalPolicy); the clock against AWS's. "
            "Checks as the user who runs it: sudo -u provisioner provisioner doctor checks "
            "the daemon's user. Exits 1 when any check fails."
        ),
    )
    doctor.add_argument(
        "--user",
        type=_user,
        help="simulate the user permissions on this IAM user (default: a sample name)",
    )
    doctor.add_argument(
        "--root", default="/", help="look for the unit and the rule under this directory"
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    common(doctor)
    doctor.set_defaults(func=cmd_doctor)

    watch = sub.add_parser(
        "watch",
        help="a live view of the desk: readers, tokens, queue, steps, last outcomes",
        description=(
            "Shows the readers, the tokens in them, the enrollments in progress with their "
            "current step, the queue and the last outcomes, redrawn each time the daemon "
            "reports an event (no polling). Ctrl-C ends it. When the output is not a "
            "terminal, each update is printed after the previous one."
        ),
    )
    watch.add_argument("--once", action="store_true", help="print the view once and exit")
    watch.add_argument(
        "--desk",
        metavar="NAME",
        help="another desk of the fleet (or 'all'): its heartbeats as they come, from the store",
    )
    common(watch)
    watch.set_defaults(func=cmd_watch)

    queue = sub.add_parser(
        "queue",
        help="list waiting requests, or queue a user without waiting (--user)",
        description="Without --user: the waiting requests. With --user: queue that user for "
        "the next token plugged in (or --serial's) and return at once.",
    )
    queue.add_argument("--user", type=_user, help="queue this IAM user")
    queue.add_argument("--serial", type=_serial, help="only for the token with this serial")
    accounts_choice(queue, "enroll")
    queue.add_argument(
        "--desk",
        metavar="NAME",
        help="only this desk of the fleet may serve it (default: whichever desk the token "
        "is plugged in at)",
    )
    common(queue)
    queue.set_defaults(func=cmd_queue)

    cancel = sub.add_parser(
        "cancel",
        help="cancel a waiting request by its number",
        description=(
            "Withdraws a request that is still waiting for its token (#N in provisioner "
            "queue); one whose token is already being served runs to its end. Recorded in "
            "the audit trail."
        ),
    )
    cancel.add_argument(
        "id", type=_request_number, help="the request number (#N in provisioner queue)"
    )
    common(cancel)
    cancel.set_defaults(func=cmd_cancel)

    revoke = sub.add_parser(
        "revoke",
        help="deactivate and delete a user's token, and clear the token if it is plugged in",
        description=(
            "Deactivates the user's MFA device enrolled by provisioner, deletes the virtual "
            "device, and removes its credential from the token if the token is plugged in "
            "(otherwise says that it stays there). With several such devices, --serial says "
            "which. Recorded in the audit trail. With the desk daemon running, the daemon "
            "does it and takes the credential off the token as soon as the token is plugged "
            "in at the desk (at once if it is in); --direct does it here instead."
        ),
    )
    revoke.add_argument("--user", required=True, type=_user, help="the IAM user")
    revoke.add_argument(
        "--serial", type=_serial, help="the token to revoke, if the user has several"
    )
    accounts_choice(revoke, "revoke")
    direct_choice(revoke, "revoke")
    common(revoke)
    revoke.set_defaults(func=cmd_revoke)

    resync = sub.add_parser(
        "resync",
        help="resynchronize a user's device from the token plugged in (ResyncMFADevice)",
        description=(
            "Computes two consecutive codes with the credential on the user's token (plugged "
            "in) for AWS's current time and sends them with ResyncMFADevice. Recorded in the "
            "audit trail. With the desk daemon running, the request is queued for the user's "
            "token (--serial, or the one token provisioner enrolled for the user) and done "
            "when it is plugged in, at once if it is in; --direct or --reader does it here."
        ),
    )
    resync.add_argument("--user", required=True, type=_user, help="the IAM user")
    token_choice(resync, "the user's token")
    accounts_choice(resync, "resync")
    direct_choice(resync, "resync")
    common(resync)
    resync.set_defaults(func=cmd_resync)

    replace = sub.add_parser(
        "replace",
        help="enroll the new token plugged in, then revoke the user's old one",
        description=(
            "Enrolls the token plugged in for the user first, then revokes the user's other "
            "token enrolled by provisioner (--old-serial if there are several), so the user "
            "is never without MFA. If revoking fails the user keeps both, and the message "
            "says what to run. With the desk daemon running, the request is queued for the "
            "next token plugged in (or --serial's), and the old token's credential is removed "
            "when that token is next plugged in at the desk; --direct or --reader does it here."
        ),
    )
    replace.add_argument("--user", required=True, type=_user, help="the IAM user")
    token_choice(replace, "the new token")
    replace.add_argument("--old-serial", type=_serial, help="the token to replace, if several")
    direct_choice(replace, "replace")
    common(replace)
    replace.set_defaults(func=cmd_replace)

    reconcile = sub.add_parser(
        "reconcile",
        help="settle enrollments a crash interrupted, and delete orphaned devices",
        description=(
            "For each enrollment the journal says did not finish: record it as done if IAM "
            "has it enabled; finish it with the token's credential if the token is plugged "
            "in; otherwise delete its device and remove its credential (now, or when the "
            "token is next seen). Then delete unassigned virtual MFA devices under the "
            "desk's path that carry this desk's tags. The daemon does this at start-up; "
            "run it by hand after a one-shot enroll was killed. Uses the running daemon "
            "when there is one."
        ),
    )
    reconcile.add_argument(
        "--dry-run", action="store_true", help="say what it would do, do nothing"
    )
    reconcile.add_argument(
        "--keep-orphans", action="store_true", help="list orphaned devices but delete none"
    )
    reconcile.add_argument(
        "--all-desks", action="store_true", help="also orphans tagged with other desks' names"
    )
    reconcile.add_argument(
        "--desk",
        metavar="NAME",
        help="settle a dead desk's records and orphans from here (a fleet's desks share "
        "the store); refused while that desk's heartbeat says it is alive",
    )
    common(reconcile)
    reconcile.set_defaults(func=cmd_reconcile)

    roster = sub.add_parser(
        "roster",
        help="the fleet's roster: token serial -> user (and accounts), for every desk",
        description="A fleet keeps one roster in its database; each desk takes a rostered "
        "token's entry as it serves it, so no two desks serve one serial.",
    )
    roster_sub = roster.add_subparsers(dest="roster_command", metavar="COMMAND", required=True)
    roster_load = roster_sub.add_parser(
        "load",
        help="replace the fleet's roster with a CSV (serial,user[,accounts])",
        description="Checks FILE as a desk's roster file is checked (every mistake named "
        "with its line; nothing loaded from a file with one), then replaces the fleet's "
        "roster with it. Recorded in the audit trail.",
    )
    roster_load.add_argument("file", help="the CSV: serial,user and optionally accounts")
    common(roster_load)
    roster_load.set_defaults(func=cmd_roster_load)

    fleet = sub.add_parser(
        "fleet",
        help="every desk of the fleet: alive or silent since when, and what it does",
        description=(
            "Each desk writes a heartbeat to the store every 10 s: its version, readers, "
            "tokens, the work in progress and its last outcome. A desk silent for 30 s is "
            "shown as SILENT since its last beat (crashed, cut off, or its machine down); "
            "one that stopped says when. Reads the store ([store] url: the fleet's "
            "database; else this desk's own state)."
        ),
    )
    fleet.add_argument("--json", action="store_true", help="the heartbeats as JSON")
    common(fleet)
    fleet.set_defaults(func=cmd_fleet)

    store = sub.add_parser(
        "store",
        help="the fleet's PostgreSQL database: create or upgrade its schema",
        description="A fleet of desks shares one PostgreSQL database ([store] url). Its "
        "schema is made and upgraded by the database's owner, never by a desk.",
    )
    store_sub = store.add_subparsers(dest="store_command", metavar="COMMAND", required=True)
    migrate = store_sub.add_parser(
        "migrate",
        help="create or upgrade the schema, and grant the desks' role what desks need",
        description=(
            "Run with the database owner's URL. Creates the tables (or brings them to this "
            "version's schema, one versioned step at a time, each in one transaction) and "
            "grants the desks' role exactly what desks need: the queue, the enrollments "
            "and the credentials to clean to read and write, the audit trail to INSERT "
            "and SELECT only (append-only by the database's grants). Running it again "
            "changes nothing but renews the grants. Desks refuse to start on a schema of "
            "another version and say to run this."
        ),
        epilog="example:\n  provisioner store migrate --url "
        "postgresql://provisioner_owner@db.internal/provisioner?sslmode=verify-full\n\n"
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    migrate.add_argument(
        "--url",
        required=True,
        help="the database owner's libpq URL (a password from PGPASSFILE or ~/.pgpass)",
    )
    migrate.add_argument(
        "--desk-role",
        default="provisioner_desk",
        type=_checked(_role_name),
        help="the role desks log in as (default provisioner_desk)",
    )
    common(migrate)
    migrate.set_defaults(func=cmd_store_migrate)
    imports = store_sub.add_parser(
        "import-sqlite",
        help="move a desk's SQLite history into the fleet's database, without duplicates",
        description=(
            "Appends FILE's audit trail to the desk's hash chain in the fleet (the file's "
            "own chain checked first), and moves its finished enrollments, the credentials "
            "still to remove from tokens and the waiting requests. Each row remembers "
            "where it came from: running it again adds nothing. A file with unfinished "
            "enrollments is refused (settle them with provisioner reconcile first). Uses "
            "[store] url, as the desks' role."
        ),
    )
    imports.add_argument(
        "file", help="the desk's state file (e.g. /var/lib/provisioner/provisioner.db)"
    )
    imports.add_argument("--desk", help="the desk the history is from (default: this desk's name)")
    common(imports)
    imports.set_defaults(func=cmd_store_import)

    install = sub.add_parser(
        "install",
        help="put the systemd unit, the udev rule, the users and a first config in place",
        description=(
            "Installs /etc/systemd/system/provisioner.service (ExecStart pointing at this "
            "installation), /etc/udev/rules.d/70-provisioner.rules, the user provisioner "
            "and the group provisioner-operators (sysusers.d), and "
            "/etc/provisioner/provisioner.toml if there is none (never overwritten). Then "
            "reloads systemd and udev when they run. Running it twice changes nothing. "
            "Next: add operators to provisioner-operators, put AWS settings in "
            "/etc/provisioner/environment, systemctl enable --now provisioner."
        ),
    )
    install.add_argument("--root", default="/", help="install under this directory (an image)")
    install.add_argument("--executable", help="the command ExecStart runs (default: this one)")
    install.add_argument("--no-reload", action="store_true", help="do not reload systemd/udev")
    install.add_argument(
        "--remove", action="store_true", help="remove the unit and the rule (keeps state, config)"
    )
    install.set_defaults(func=cmd_install)

    history = sub.add_parser(
        "history",
        help="the audit trail: who asked, what was done",
        description=(
            "The desk's audit trail, newest last: requests, enrollments with their outcome "
            "and device, revocations, resyncs, cleaned tokens, daemon starts and stops. "
            "Filter by --user, --serial and --since; export with --format json or csv. The "
            "same records go to the journal as key=value lines (logger provisioner.core.audit). "
            "Asks the desk daemon; with none running, reads the trail itself, read-only."
        ),
        epilog="examples:\n  provisioner history --since 24h\n"
        "  provisioner history --user bob --since 2026-11-01 --format csv > bob.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    history.add_argument("--limit", type=_limit, default=50, help="the last N records (default 50)")
    history.add_argument("--user", type=_user, help="only records about this IAM user")
    history.add_argument("--serial", type=_serial, help="only records about this token")
    history.add_argument(
        "--account",
        type=_checked(validation.account_name),
        help="only records of this of the desk's [[accounts]]",
    )
    history.add_argument("--desk", metavar="NAME", help="only records this desk of the fleet wrote")
    history.add_argument(
        "--since",
        type=_since,
        help="only records since then: 24h, 7d, 30m, or 2026-11-01[T09:30] (UTC)",
    )
    history.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output format"
    )
    history.add_argument("--json", action="store_true", help="the same as --format json")
    history.add_argument(
        "--verify",
        action="store_true",
        help="check every desk's hash chain instead: each record holds the hash of its "
        "desk's record before it; names the first record changed or missing (exit 1)",
    )
    common(history)
    history.set_defaults(func=cmd_history)
    return parser
