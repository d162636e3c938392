"""The `provisioner` command. Errors become exit codes here, and only here."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from . import __version__
from .config import DEFAULT_PATH, ENV_PATH, Config, load, override
from .errors import (
    AlreadyEnrolled,
    ConfigError,
    EnrollmentFailed,
    IamError,
    InvalidInput,
    ProvisionerError,
    TokenError,
)
from .model import EnrollmentResult, Step

log = logging.getLogger("provisioner")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TOKEN = 3
EXIT_IAM = 4
EXIT_LEFTOVERS = 5

EXIT_CODES_HELP = """\
exit status:
  0  enrolled (or already enrolled: nothing to do)
  1  failed, and everything it had done was undone
  2  bad command line, configuration or input
  3  a token or PC/SC problem (nothing was changed in IAM)
  4  an IAM problem (refused, unreachable, no credentials)
  5  failed AND something could not be undone: the message lists it
"""


def exit_code(error: ProvisionerError) -> int:
    """The one place where errors become exit codes."""
    if isinstance(error, EnrollmentFailed):
        if error.leftovers:
            return EXIT_LEFTOVERS
        return exit_code(error.cause) if error.step == Step.CHECK.value else EXIT_FAILED
    if isinstance(error, (ConfigError, InvalidInput)):
        return EXIT_USAGE
    if isinstance(error, TokenError):
        return EXIT_TOKEN
    if isinstance(error, IamError):
        return EXIT_IAM
    return EXIT_FAILED


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
        self._out.write(f"{self._prefix}{elapsed:7.1f} ms  {tag:<14} {text}\n")
        self._out.flush()

    def step(self, step: Step, detail: str) -> None:
        self._line(step.value, detail)

    def notice(self, text: str) -> None:
        self._line("!", text)


def setup_logging(level: str, stream: TextIO = sys.stderr) -> None:
    from .aws_iam import guard_vendor_logging as guard_boto
    from .yubikey import guard_vendor_logging as guard_yubikit

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
    from .desk import Desk
    from .yubikey import Pcsc, open_token

    config = _config(args)
    token_changes = {k: v for k, v in (("reader", args.reader),) if v}
    iam_changes = {k: v for k, v in (("profile", args.profile),) if v}
    config = override(config, token=token_changes, iam=iam_changes)
    setup_logging(config.log_level)
    out: TextIO = sys.stdout
    desk = Desk.from_config(config)
    progress = TerminalProgress(out)
    out.write(f"enrolling {args.user} (IAM at {desk.iam.endpoint_url}, desk {config.desk})\n")
    password = config.oath_password()
    with Pcsc() as pcsc:
        with open_token(
            pcsc,
            reader=config.token.reader or None,
            serial=args.serial,
            oath_password=password,
        ) as token:
            progress.restart()
            try:
                result = desk.enrollment(progress).run(token, args.user)
            except AlreadyEnrolled as e:
                out.write(f"nothing to do: {e.message}\n")
                return EXIT_OK
    print_result(out, result)
    return EXIT_OK


def print_result(out: TextIO, result: EnrollmentResult) -> None:
    out.write(
        f"enrolled {result.user}: token {result.token_serial} is MFA device "
        f"{result.device_arn} ({result.seconds * 1000:.0f} ms)\n"
    )


# --- tokens ----------------------------------------------------------------------------------


def cmd_tokens(args: argparse.Namespace) -> int:
    from .model import TokenInfo
    from .yubikey import Pcsc, list_tokens

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


# --- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging("debug" if args.debug else "warning")
    return run_demo(
        users=[u for u in args.users.split(",") if u],
        in_process=args.in_process,
        out=sys.stdout,
    )


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    enroll.add_argument("--user", required=True, help="the IAM user name (case-sensitive)")
    which = enroll.add_mutually_exclusive_group()
    which.add_argument("--reader", help="the reader holding the token (its name, or part of it)")
    which.add_argument("--serial", type=int, help="the token's serial number (printed on the key)")
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
    demo.add_argument("--users", default="alice,bob,carol", help="comma-separated user names")
    demo.add_argument(
        "--in-process", action="store_true", help="attach the emulated tokens without pcscd"
    )
    demo.add_argument("--debug", action="store_true", help="log every step (never secrets)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ProvisionerError as e:
        sys.stdout.flush()
        print(f"provisioner: {e.one_line()}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("provisioner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
