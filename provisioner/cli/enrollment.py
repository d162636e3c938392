"""`enroll`, `revoke`, `resync`, `replace`: through the running daemon, or here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from provisioner.cli.common import (
    TerminalProgress,
    ask_daemon,
    load_config,
    print_accounts_result,
    print_result,
    setup_logging,
    through_daemon,
)
from provisioner.config import override
from provisioner.core.errors import (
    EXIT_FAILED,
    EXIT_OK,
    AlreadyEnrolled,
    DaemonRefused,
    ExitStatus,
)
from provisioner.core.messages import EventKind, Outcome
from provisioner.core.store import RequestKind

log = logging.getLogger("provisioner")


# --- enroll --------------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import Pcsc, open_token
    from provisioner.cli import direct
    from provisioner.desk import Desk

    config = load_config(args)
    token_changes = {k: v for k, v in (("reader", args.reader),) if v}
    iam_changes = {k: v for k, v in (("profile", args.profile),) if v}
    config = override(config, token=token_changes, iam=iam_changes)
    setup_logging(config.log_level)
    out: TextIO = sys.stdout
    accounts = config.select_accounts(args.accounts)
    socket_path = through_daemon(config, here_only=args.direct or bool(args.reader))
    if socket_path is not None:
        return enroll_via_daemon(socket_path, args.user, args.serial, out, accounts=args.accounts)
    desk = Desk.from_config(config)
    progress = TerminalProgress(out)
    if accounts:
        names = ", ".join(a.name for a in accounts)
        out.write(f"enrolling {args.user} in {names} (desk {config.desk})\n")
    else:
        out.write(f"enrolling {args.user} (IAM at {desk.iam.endpoint_url}, desk {config.desk})\n")
    password = config.oath_password()
    # IAM is asked about the user while the token is found and opened (one round trip
    # off the wait); if that fails, the enrollment's check asks again and says why.
    checked = None if accounts else direct.CheckedMeanwhile(desk, args.user)
    # Recorded in the desk's state before anything exists in IAM (recovery and the orphan
    # sweep leave it alone while this runs), and in its audit trail.
    with direct.desk_state(config) as state, Pcsc() as pcsc:
        with open_token(
            pcsc,
            reader=config.token.reader or None,
            serial=args.serial,
            oath_password=password,
        ) as token:
            progress.restart()
            try:
                if accounts:
                    several = direct.enroll_accounts(
                        state, desk, token, args.user, accounts, progress
                    )
                    print_accounts_result(out, several)
                    return EXIT_OK
                result = direct.enroll(state, desk, token, args.user, progress, checked=checked)
            except AlreadyEnrolled as e:
                out.write(f"nothing to do: {e.message}\n")
                return EXIT_OK
    print_result(out, result)
    return EXIT_OK


def enroll_via_daemon(
    socket_path: Path,
    user: str,
    serial: int | None,
    out: TextIO,
    *,
    kind: RequestKind = RequestKind.ENROLL,
    old_serial: int | None = None,
    accounts: str | None = None,
) -> int:
    """Queue the user with the running daemon and follow the work to its end."""
    request: dict[str, Any] = {"op": "enroll", "user": user, "serial": serial}
    if accounts:
        request["accounts"] = accounts
    if kind != RequestKind.ENROLL:
        request |= {"kind": kind, "old_serial": old_serial}
    try:
        return _follow_enrollment(socket_path, request, out)
    except (ConnectionError, OSError) as e:
        out.flush()
        print(
            f"provisioner: lost the desk daemon before the enrollment of {user} ended ({e}); "
            f"after it restarts, provisioner history --user {user} tells the outcome",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _follow_enrollment(socket_path: Path, request: dict[str, Any], out: TextIO) -> int:
    from provisioner.adapters.control_socket import ControlClient

    user = str(request["user"])
    doing = {RequestKind.RESYNC: "resyncing", RequestKind.REPLACE: "replacing the token of"}.get(
        request.get("kind", RequestKind.ENROLL), "enrolling"
    )
    progress = TerminalProgress(out)
    with ControlClient(socket_path, timeout=None) as client:
        for event in client.request(request, timeout=None):
            kind = event.get("event")
            if event.get("refused") or (event.get("final") and "error" in event):
                print(f"provisioner: {event.get('error')}", file=sys.stderr)
                return DaemonRefused.answered(event).status
            if kind == EventKind.QUEUED:
                out.write(f"{event['detail']}\n")
            elif kind == EventKind.ENROLLING:
                progress.restart()
                out.write(f"token {event.get('serial')} in {event.get('reader')}: {doing} {user}\n")
            elif kind == EventKind.STEP:
                progress.line(str(event["step"]), event.get("detail", ""))
            elif kind == EventKind.NOTICE:
                progress.notice(event.get("detail", ""))
            elif kind == EventKind.OUTCOME:
                return _print_outcome(event, user, out)
            out.flush()
    print("provisioner: the daemon ended the conversation without an outcome", file=sys.stderr)
    return EXIT_FAILED


def _print_outcome(event: dict[str, object], user: str, out: TextIO) -> int:
    code = ExitStatus.of(event.get("exit"))
    devices = event.get("accounts")
    if event.get("outcome") == Outcome.ENROLLED and isinstance(devices, list):
        seconds = event.get("seconds")
        took = f" ({seconds * 1000:.0f} ms)" if isinstance(seconds, float) else ""
        names = ", ".join(str(d.get("account")) for d in devices if d.get("device_arn"))
        out.write(f"enrolled {user} in {names}: token {event.get('serial')}{took}\n")
        for device in devices:
            arn = device.get("device_arn")
            done = (
                f"MFA device {arn}" if arn else "already enrolled with this token; left as it was"
            )
            out.write(f"  {device.get('account')}: {done}\n")
    elif event.get("outcome") in (Outcome.ENROLLED, Outcome.REPLACED):
        seconds = event.get("seconds")
        took = f" ({seconds * 1000:.0f} ms)" if isinstance(seconds, float) else ""
        out.write(
            f"{event['outcome']} {user}: token {event.get('serial')} is MFA device "
            f"{event.get('device_arn')}{took}\n"
        )
    elif event.get("ok") and event.get("summary"):
        out.write(f"{event['summary']}\n")
    elif event.get("ok"):
        out.write(f"nothing to do: {event.get('detail')}\n")
    else:
        out.flush()
        print(f"provisioner: {event.get('detail')}", file=sys.stderr)
    return code


def cmd_revoke(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import find_by_serial
    from provisioner.cli import direct
    from provisioner.desk import Desk

    config = load_config(args)
    setup_logging(config.log_level)
    accounts = config.select_accounts(args.accounts)
    socket_path = through_daemon(config, here_only=args.direct)
    if socket_path is not None:
        request = {"op": "revoke", "user": args.user, "serial": args.serial}
        if args.accounts:
            request["accounts"] = args.accounts
        answer = ask_daemon(socket_path, request)
        for line in answer["actions"]:
            print(line)
        for done in answer.get("accounts") or [answer]:
            where = f" in {done['account']}" if done.get("account") else ""
            print(f"revoked {args.user}{where}: {done['device_arn']} (token {done['serial']})")
        return EXIT_OK
    desk = Desk.from_config(config)
    password = config.oath_password()
    if accounts:
        with direct.desk_state(config) as state:
            revoked = direct.revoke_accounts(
                state,
                desk,
                args.user,
                args.serial,
                lambda serial: find_by_serial(serial, oath_password=password),
                accounts,
            )
        for name, one in revoked:
            for line in one.actions:
                print(f"{name}: {line}")
        for name, one in revoked:
            print(f"revoked {one.user} in {name}: {one.device_arn} (token {one.token_serial})")
        return EXIT_OK
    with direct.desk_state(config) as state:
        done = direct.revoke(
            state,
            desk,
            args.user,
            args.serial,
            lambda serial: find_by_serial(serial, oath_password=password),
        )
    for line in done.actions:
        print(line)
    print(f"revoked {done.user}: {done.device_arn} (token {done.token_serial})")
    return EXIT_OK


def cmd_resync(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import Pcsc, open_token
    from provisioner.cli import direct
    from provisioner.desk import Desk

    config = load_config(args)
    setup_logging(config.log_level)
    socket_path = through_daemon(config, here_only=args.direct or bool(args.reader))
    if socket_path is not None:
        return enroll_via_daemon(
            socket_path,
            args.user,
            args.serial,
            sys.stdout,
            kind=RequestKind.RESYNC,
            accounts=args.accounts,
        )
    desk = Desk.from_config(config)
    with (
        direct.desk_state(config) as state,
        Pcsc() as pcsc,
        open_token(
            pcsc, reader=args.reader, serial=args.serial, oath_password=config.oath_password()
        ) as token,
    ):
        serial = token.info.serial
        accounts = config.select_accounts(args.accounts)
        if accounts:
            for name, device, first_step in direct.resync_accounts(
                state, desk, token, args.user, accounts, TerminalProgress(sys.stdout)
            ):
                print(
                    f"resynced {args.user} in {name}: {device} with the codes of time steps "
                    f"{first_step} and {first_step + 1} from token {serial}"
                )
            return EXIT_OK
        device, first_step = direct.resync(
            state, desk, token, args.user, TerminalProgress(sys.stdout)
        )
    print(
        f"resynced {args.user}: {device} with the codes of time steps {first_step} and "
        f"{first_step + 1} from token {serial}"
    )
    return EXIT_OK


def cmd_replace(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import Pcsc, find_by_serial, open_token
    from provisioner.cli import direct
    from provisioner.desk import Desk

    config = load_config(args)
    setup_logging(config.log_level)
    socket_path = through_daemon(config, here_only=args.direct or bool(args.reader))
    if socket_path is not None:
        return enroll_via_daemon(
            socket_path,
            args.user,
            args.serial,
            sys.stdout,
            kind=RequestKind.REPLACE,
            old_serial=args.old_serial,
        )
    desk = Desk.from_config(config)
    password = config.oath_password()
    progress = TerminalProgress(sys.stdout)
    with (
        direct.desk_state(config) as state,
        Pcsc() as pcsc,
        open_token(pcsc, reader=args.reader, serial=args.serial, oath_password=password) as token,
    ):
        if config.accounts:
            enrolled, revoked = direct.replace_accounts(
                state,
                desk,
                token,
                args.user,
                args.old_serial,
                lambda serial: find_by_serial(serial, oath_password=password),
                config.accounts,
                progress,
            )
            for name, one in revoked:
                for line in one.actions:
                    print(f"{name}: {line}")
            print_accounts_result(sys.stdout, enrolled)
            old = ", ".join(sorted({str(one.token_serial) for _, one in revoked}))
            print(f"replaced {args.user}'s token {old} with token {enrolled.token_serial}")
            return EXIT_OK
        done = direct.replace(
            state,
            desk,
            token,
            args.user,
            args.old_serial,
            lambda serial: find_by_serial(serial, oath_password=password),
            progress,
        )
    for line in done.revoked.actions:
        print(line)
    print(
        f"replaced {args.user}'s token {done.revoked.token_serial} with token "
        f"{done.enrolled.token_serial}: {done.enrolled.device_arn}"
    )
    return EXIT_OK
