"""The `provisioner` command. Errors become exit codes here, and only here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO, TypeVar

from provisioner import __version__
from provisioner.adapters.control_socket import daemon_reachable
from provisioner.config import DEFAULT_PATH, ENV_PATH, Config, load, override
from provisioner.core import validation
from provisioner.core.audit import parse_since
from provisioner.core.errors import (
    EXIT_OK,
    EXIT_REFUSED,
    AlreadyEnrolled,
    ConfigError,
    DaemonNotRunning,
    DaemonRefused,
    ExitStatus,
    InvalidInput,
    ProvisionerError,
    exit_status,
)
from provisioner.core.messages import EventKind, Outcome, TokenState
from provisioner.core.model import EnrollmentResult, Step

log = logging.getLogger("provisioner")

EXIT_CODES_HELP = ExitStatus.help_text()


exit_code = exit_status


def progress_line(elapsed_ms: float, tag: str, text: str) -> str:
    """One line of an enrollment's progress, the same whether this process does the work
    (TerminalProgress) or follows the daemon doing it: elapsed time, step (or !), detail."""
    return f"{elapsed_ms:7.1f} ms  {tag:<14} {text}\n"


def through_daemon(config: Config, *, here_only: bool = False) -> Path | None:
    """Where to send a command that the running daemon or this process can do: the
    daemon's socket when it answers (it owns the tokens and the store while it runs), or
    None to do the work here. ``here_only`` (--direct, --reader) keeps it here."""
    socket_path = config.daemon.socket_path()
    if here_only or not daemon_reachable(socket_path):
        return None
    return socket_path


class TerminalProgress:
    """Progress lines as the enrollment goes: elapsed time, step, what happened."""

    def __init__(self, out: TextIO, prefix: str = "") -> None:
        self._out = out
        self._prefix = prefix
        self._start = time.monotonic()

    def restart(self) -> None:
        self._start = time.monotonic()

    def _line(self, tag: str, text: str) -> None:
        elapsed = (time.monotonic() - self._start) * 1000
        self._out.write(self._prefix + progress_line(elapsed, tag, text))
        self._out.flush()

    def step(self, step: Step, detail: str) -> None:
        self._line(step.value, detail)

    def notice(self, text: str) -> None:
        self._line("!", text)


def setup_logging(level: str, stream: TextIO = sys.stderr) -> None:
    from provisioner.adapters.aws.iam import guard_vendor_logging as guard_boto
    from provisioner.adapters.yubikey import guard_vendor_logging as guard_yubikit

    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=stream,
        format="%(levelname)s %(name)s: %(message)s",
    )
    guard_boto()
    guard_yubikit()
    if level != "debug":
        # Their INFO lines ("Found credentials in environment variables") are noise at a desk.
        for name in ("botocore", "boto3", "urllib3", "yubikit", "ykman"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _config(args: argparse.Namespace) -> Config:
    config = load(args.config)
    if getattr(args, "debug", False):
        config = override(config, log_level="debug")
    return config


# --- enroll --------------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import Pcsc, open_token
    from provisioner.cli import direct
    from provisioner.desk import Desk

    config = _config(args)
    token_changes = {k: v for k, v in (("reader", args.reader),) if v}
    iam_changes = {k: v for k, v in (("profile", args.profile),) if v}
    config = override(config, token=token_changes, iam=iam_changes)
    setup_logging(config.log_level)
    out: TextIO = sys.stdout
    socket_path = through_daemon(config, here_only=args.direct or bool(args.reader))
    if socket_path is not None:
        return enroll_via_daemon(socket_path, args.user, args.serial, out)
    desk = Desk.from_config(config)
    progress = TerminalProgress(out)
    out.write(f"enrolling {args.user} (IAM at {desk.iam.endpoint_url}, desk {config.desk})\n")
    password = config.oath_password()
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
                result = direct.enroll(state, desk, token, args.user, progress)
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
    kind: str = "enroll",
    old_serial: int | None = None,
) -> int:
    """Queue the user with the running daemon and follow the work to its end."""
    request: dict[str, Any] = {"op": "enroll", "user": user, "serial": serial}
    if kind != "enroll":
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
        return 1


def _follow_enrollment(socket_path: Path, request: dict[str, Any], out: TextIO) -> int:
    from provisioner.adapters.control_socket import ControlClient

    user = str(request["user"])
    doing = {"resync": "resyncing", "replace": "replacing the token of"}.get(
        str(request.get("kind")), "enrolling"
    )
    start = time.monotonic()
    with ControlClient(socket_path, timeout=None) as client:
        for event in client.request(request, timeout=None):
            kind = event.get("event")
            elapsed = (time.monotonic() - start) * 1000
            if event.get("refused") or (event.get("final") and "error" in event):
                print(f"provisioner: {event.get('error')}", file=sys.stderr)
                return int(event.get("exit", EXIT_REFUSED if event.get("refused") else 1))
            if kind == EventKind.QUEUED:
                out.write(f"{event['detail']}\n")
            elif kind == EventKind.ENROLLING:
                start = time.monotonic()
                out.write(f"token {event.get('serial')} in {event.get('reader')}: {doing} {user}\n")
            elif kind == EventKind.STEP:
                out.write(progress_line(elapsed, str(event["step"]), event.get("detail", "")))
            elif kind == EventKind.NOTICE:
                out.write(progress_line(elapsed, "!", event.get("detail", "")))
            elif kind == EventKind.OUTCOME:
                return _print_outcome(event, user, out)
            out.flush()
    print("provisioner: the daemon ended the conversation without an outcome", file=sys.stderr)
    return 1


def _print_outcome(event: dict[str, object], user: str, out: TextIO) -> int:
    status = event.get("exit", 1)
    code = status if isinstance(status, int) else 1
    if event.get("outcome") in (Outcome.ENROLLED, Outcome.REPLACED):
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


def print_result(out: TextIO, result: EnrollmentResult) -> None:
    out.write(
        f"enrolled {result.user}: token {result.token_serial} is MFA device "
        f"{result.device_arn} ({result.seconds * 1000:.0f} ms)\n"
    )


# --- tokens ----------------------------------------------------------------------------------


def cmd_tokens(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import Pcsc, list_tokens
    from provisioner.core.model import TokenInfo

    config = _config(args)
    setup_logging(config.log_level)
    with Pcsc() as pcsc:
        entries = list_tokens(pcsc)
    if not entries:
        print("no smart card readers (is a YubiKey plugged in? is pcscd running?)")
        return EXIT_OK
    for entry in entries:
        if isinstance(entry, TokenInfo):
            oath = "OATH" if entry.has_oath else "no OATH"
            serial = entry.serial if entry.serial is not None else "hidden"
            print(
                f"{entry.reader}: YubiKey serial {serial}, firmware {entry.firmware_text}, "
                f"{entry.form_factor}, {oath}"
            )
        else:
            print(f"{entry.name}: {'card present (unreadable)' if entry.card_present else 'empty'}")
    return EXIT_OK


# --- the daemon and its clients ------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from provisioner.daemon.main import run

    config = _config(args)
    setup_logging(config.log_level)
    return run(config)


def _ask(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    from provisioner.adapters.control_socket import ControlClient

    path = _running_daemon(args)
    try:
        with ControlClient(path) as client:
            answer = client.call(request)
    except (ConnectionError, FileNotFoundError) as e:  # it stopped while we talked
        raise DaemonNotRunning(
            f"lost the desk daemon on {path} ({e})", hint="systemctl status provisioner"
        ) from e
    if not answer.get("ok"):
        raise DaemonRefused.answered(answer)
    return answer


def _running_daemon(args: argparse.Namespace) -> Path:
    """The control socket of the desk daemon, which must be answering on it."""
    path = _config(args).daemon.socket_path()
    if not daemon_reachable(path):
        raise DaemonNotRunning(
            f"the desk daemon is not running (no answer on {path})",
            hint="systemctl start provisioner, or run provisioner daemon",
        )
    return path


def cmd_status(args: argparse.Namespace) -> int:
    answer = _ask(args, {"op": "status"})
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK
    daemon = answer["daemon"]
    assert isinstance(daemon, dict)
    print(
        f"desk {daemon['desk']}: daemon up since {_when(daemon['since'])}, "
        f"pcscd {daemon['pcsc']}, IAM at {daemon['iam']}, roster of {daemon['roster']}"
    )
    readers = answer.get("readers") or []
    tokens = {t["reader"]: t for t in answer.get("tokens") or []}
    print("readers:" if readers else "readers: none")
    for reader in readers:
        token = tokens.get(reader["name"])
        if token is None:
            what = "card present" if reader["card_present"] else "empty"
        else:
            serial = token["serial"] if token.get("serial") is not None else "?"
            what = f"token {serial}: {token.get('detail') or token['state']}"
            if token.get("user"):
                what += f" for {token['user']}"
            if token["state"] == TokenState.ENROLLING and token.get("step"):
                what += f" (step {token['step']})"
        print(f"  {reader['name']}: {what}")
    _print_queue(answer.get("queue") or [], answer.get("queue_total"))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from provisioner import doctor
    from provisioner.adapters.usb import list_yubikeys
    from provisioner.desk import Desk

    config = _config(args)

    def iam() -> tuple[Any, Any]:
        desk = Desk.from_config(config)
        return desk.iam, desk.clock

    findings = doctor.run(
        config, iam=iam, list_usb=list_yubikeys, root=Path(args.root), sample_user=args.user
    )
    if args.json:
        print(json.dumps([vars(f) for f in findings], indent=2))
    else:
        for finding in findings:
            print(finding.line())
    failed = [f for f in findings if f.status is doctor.Status.FAIL]
    if failed and not args.json:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
    return 1 if failed else EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """Redraw the desk after each event the daemon sends; Ctrl-C ends it."""
    import shutil

    from provisioner.adapters.control_socket import ControlClient
    from provisioner.cli.watch import CLEAR, render
    from provisioner.daemon.service import HEARTBEAT_SECONDS

    path = _running_daemon(args)
    redraw = sys.stdout.isatty() and not args.once
    try:
        with ControlClient(path) as client:
            # Several missed heartbeats in a row: the daemon is gone or wedged.
            for update in client.request({"op": "watch"}, timeout=HEARTBEAT_SECONDS * 5):
                if update.get("event") == "heartbeat":
                    continue
                if not update.get("ok"):
                    raise DaemonRefused.answered(update)
                width = shutil.get_terminal_size().columns if redraw else 200
                frame = "\n".join(render(update, now=time.time(), width=width))
                sys.stdout.write(f"{CLEAR}{frame}\n" if redraw else f"{frame}\n\n")
                sys.stdout.flush()
                if args.once:
                    return EXIT_OK
    except (ConnectionError, OSError) as e:
        raise DaemonNotRunning(
            f"lost the desk daemon ({e})", hint="systemctl status provisioner"
        ) from e
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _print_queue(entries: list[dict[str, Any]], total: object = None) -> None:
    """The first requests the daemon sent, and how many more wait (``total``)."""
    if not entries:
        print("queue: empty")
        return
    print("queue:")
    for e in entries:
        token = f" (token {e['serial']})" if e.get("serial") is not None else ""
        kind = "" if e.get("kind", "enroll") == "enroll" else f"{e['kind']} "
        print(
            f"  #{e['id']} {kind}{e['user']}{token}: {e['state']}, asked by {e['requested_by']} "
            f"at {_when(e['requested_at'])}"
        )
    if isinstance(total, int) and total > len(entries):
        print(f"  ... and {total - len(entries)} more")


def cmd_queue(args: argparse.Namespace) -> int:
    if args.user:
        answer = _ask(
            args, {"op": "enroll", "user": args.user, "serial": args.serial, "wait": False}
        )
        print(answer.get("detail"))
        return EXIT_OK
    answer = _ask(args, {"op": "queue"})
    _print_queue(answer.get("queue") or [], answer.get("queue_total"))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    answer = _ask(args, {"op": "cancel", "id": args.id})
    cancelled = answer["cancelled"]
    assert isinstance(cancelled, dict)
    print(f"cancelled #{cancelled['id']} ({cancelled['user']})")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    from provisioner.cli import direct
    from provisioner.core.audit import render

    request: dict[str, Any] = {"op": "history", "limit": args.limit}
    if args.user:
        request["user"] = args.user
    if args.serial is not None:
        request["serial"] = args.serial
    if args.since is not None:
        request["since"] = args.since
    config = _config(args)
    if through_daemon(config) is not None:
        records = _ask(args, request).get("history") or []
    else:
        # No daemon answers: the trail itself, read-only, with the same filters.
        found = direct.history(
            config,
            limit=args.limit,
            user=request.get("user"),
            serial=request.get("serial"),
            since=request.get("since"),
        )
        if found is None:
            from provisioner.desk import state_file

            where = state_file(config)
            print(f"provisioner: no audit trail at {where} yet", file=sys.stderr)
        records = found or []
    print(render(records, "json" if args.json else args.format))
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import find_by_serial
    from provisioner.cli import direct
    from provisioner.desk import Desk

    config = _config(args)
    setup_logging(config.log_level)
    if through_daemon(config, here_only=args.direct) is not None:
        answer = _ask(args, {"op": "revoke", "user": args.user, "serial": args.serial})
        for line in answer["actions"]:
            print(line)
        print(f"revoked {args.user}: {answer['device_arn']} (token {answer['serial']})")
        return EXIT_OK
    desk = Desk.from_config(config)
    password = config.oath_password()
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

    config = _config(args)
    setup_logging(config.log_level)
    socket_path = through_daemon(config, here_only=args.direct or bool(args.reader))
    if socket_path is not None:
        return enroll_via_daemon(socket_path, args.user, args.serial, sys.stdout, kind="resync")
    desk = Desk.from_config(config)
    with (
        direct.desk_state(config) as state,
        Pcsc() as pcsc,
        open_token(
            pcsc, reader=args.reader, serial=args.serial, oath_password=config.oath_password()
        ) as token,
    ):
        device, first_step = direct.resync(
            state, desk, token, args.user, TerminalProgress(sys.stdout)
        )
        serial = token.info.serial
    print(
        f"resynced {args.user}: {device} with the codes of time steps {first_step} and "
        f"{first_step + 1} from token {serial}"
    )
    return EXIT_OK


def cmd_replace(args: argparse.Namespace) -> int:
    from provisioner.adapters.yubikey import Pcsc, find_by_serial, open_token
    from provisioner.cli import direct
    from provisioner.desk import Desk

    config = _config(args)
    setup_logging(config.log_level)
    socket_path = through_daemon(config, here_only=args.direct or bool(args.reader))
    if socket_path is not None:
        return enroll_via_daemon(
            socket_path,
            args.user,
            args.serial,
            sys.stdout,
            kind="replace",
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


def cmd_reconcile(args: argparse.Namespace) -> int:
    request = {
        "op": "reconcile",
        "dry_run": args.dry_run,
        "keep_orphans": args.keep_orphans,
        "all_desks": args.all_desks,
    }
    config = _config(args)
    setup_logging(config.log_level)
    if through_daemon(config) is not None:
        actions = _ask(args, request)["actions"]
    else:
        actions = [a.text for a in _reconcile_here(config, args)]
    for text in actions:
        print(text)
    if not actions:
        print("nothing to do: every enrollment finished, no orphaned devices")
    return EXIT_OK


def _reconcile_here(config: Config, args: argparse.Namespace) -> list[Any]:
    from provisioner.cli import direct
    from provisioner.desk import Desk, state_file

    state = state_file(config)
    if not state.exists():
        raise ConfigError(f"no desk state at {state}", hint="check daemon.state_directory")
    desk = Desk.from_config(config)
    password = config.oath_password()
    # Records it takes over are its own while it settles them: a daemon starting meanwhile
    # (or another reconcile) leaves them alone.
    with direct.desk_state(config) as here:
        return desk.recovery(here.store, password).run(
            dry_run=args.dry_run, delete_orphans=not args.keep_orphans, all_desks=args.all_desks
        )


def cmd_install(args: argparse.Namespace) -> int:
    from provisioner.install import install, uninstall

    root = Path(args.root)
    if args.remove:
        lines = uninstall(root, reload=not args.no_reload)
    else:
        lines = install(root, args.executable, reload=not args.no_reload)
    for line in lines:
        print(line)
    return EXIT_OK


def _when(epoch: object) -> str:
    if not isinstance(epoch, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


# --- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from provisioner.demo import run_demo

    setup_logging("debug" if args.debug else "warning")
    return run_demo(
        users=args.users,
        in_process=args.in_process,
        out=sys.stdout,
        progress=lambda: TerminalProgress(sys.stdout, prefix="  "),
    )


# --- parser ----------------------------------------------------------------------------------

_T = TypeVar("_T")


class _Parser(argparse.ArgumentParser):
    """argparse that says what is wrong in one line (its usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} ({self.prog} --help shows the usage)\n")


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
_users = _checked(lambda text: [validation.user_name(u) for u in text.split(",") if u])


def token_choice(parser: argparse.ArgumentParser, which: str) -> None:
    """--reader or --serial: how the operator names a token that is plugged in."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--reader", help=f"the reader holding {which} (its name, or part of it)")
    group.add_argument(
        "--serial", type=_serial, help=f"{which}'s serial number (printed on the key)"
    )


def direct_choice(parser: argparse.ArgumentParser, verb: str) -> None:
    """--direct: do it in this command even though the desk daemon runs."""
    parser.add_argument(
        "--direct",
        action="store_true",
        help=f"{verb} here even if the desk daemon is running (it must not hold the token)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        '  provisioner enroll --user carol --reader "Yubico YubiKey OTP+FIDO+CCID 00 01"\n\n'
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    enroll.add_argument(
        "--user", required=True, type=_user, help="the IAM user name (case-sensitive)"
    )
    token_choice(enroll, "the token")
    direct_choice(enroll, "enroll")
    enroll.add_argument("--profile", help="AWS profile to use (default: the boto3 chain)")
    common(enroll)
    enroll.set_defaults(func=cmd_enroll)

    tokens = sub.add_parser(
        "tokens",
        help="list readers and the YubiKeys in them",
        description="List PC/SC readers, and serial, firmware and OATH support of each YubiKey.",
    )
    common(tokens)
    tokens.set_defaults(func=cmd_tokens)

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
    common(reconcile)
    reconcile.set_defaults(func=cmd_reconcile)

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
        "--since",
        type=_since,
        help="only records since then: 24h, 7d, 30m, or 2026-11-01[T09:30] (UTC)",
    )
    history.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output format"
    )
    history.add_argument("--json", action="store_true", help="the same as --format json")
    common(history)
    history.set_defaults(func=cmd_history)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DaemonRefused as e:
        sys.stdout.flush()
        print(f"provisioner: {e.one_line()}", file=sys.stderr)
        return e.status
    except ProvisionerError as e:
        sys.stdout.flush()
        print(f"provisioner: {e.one_line()}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("provisioner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
