import argparse
import contextlib
import os
import re
import selectors
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from desk_harness import run_cli
from provisioner.cli.main import EXIT_CODES_HELP, build_parser, main
from provisioner.core.errors import (
    CodesRejected,
    ConfigError,
    DaemonRefused,
    EnrollmentFailed,
    InvalidInput,
    ProvisionerError,
    TokenNoOath,
    UserNotFound,
    exit_status,
)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), 2),
        (InvalidInput("x"), 2),
        (TokenNoOath("x"), 3),
        (UserNotFound("x"), 4),
        (ProvisionerError("x"), 1),
        (EnrollmentFailed(step="check", user="a", token="1", cause=UserNotFound("x")), 4),
        (EnrollmentFailed(step="check", user="a", token="1", cause=TokenNoOath("x")), 3),
        (
            EnrollmentFailed(step="enable", user="a", token="1", cause=CodesRejected("x")),
            1,
        ),
        (
            EnrollmentFailed(
                step="enable",
                user="a",
                token="1",
                cause=CodesRejected("x"),
                leftovers=("virtual MFA device arn:x",),
            ),
            5,
        ),
        (DaemonRefused("not in the operators' group", refused=True), 6),
        (DaemonRefused.answered({"ok": False, "error": "x", "exit": 4}), 4),
        (DaemonRefused.answered({"ok": False, "error": "x", "exit": "4"}), 1),
        (DaemonRefused.answered({"ok": False, "error": "x"}), 1),
    ],
)
def test_exit_codes(error: ProvisionerError, code: int) -> None:
    assert exit_status(error) == code
    assert f"  {code}  " in EXIT_CODES_HELP


def test_help_teaches_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("enroll", "tokens", "demo"):
        assert command in text
    assert "exit status" in text and "AWS_ENDPOINT_URL_IAM" in text


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_is_listed_in_help_described_and_in_the_readme(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    commands = _commands()
    assert {"revoke", "resync", "replace", "doctor", "watch", "history"} <= set(commands)
    for name, sub in commands.items():
        assert re.search(rf"^    {name}\b", listing, re.MULTILINE), name
        assert sub.description, f"{name} --help has no description"
        assert f"provisioner {name}" in readme, f"the README never shows provisioner {name}"


def test_enroll_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["enroll", "--help"])
    text = capsys.readouterr().out
    assert "provisioner enroll --user alice" in text
    assert "--serial" in text and "--reader" in text


def test_reader_and_serial_are_exclusive() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["enroll", "--user", "a", "--reader", "x", "--serial", "1"])
    assert info.value.code == 2


def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "p.toml"
    bad.write_text("[token]\ntuch = true\n")
    assert main(["enroll", "--user", "alice", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("provisioner: unknown key token.tuch")


def test_enrollment_failed_message_names_step_token_user_and_cause() -> None:
    e = EnrollmentFailed(
        step="enable",
        user="alice",
        token="12345678",
        cause=CodesRejected("IAM refused EnableMFADevice for alice: InvalidAuthenticationCode"),
    )
    line = e.one_line()
    assert "\n" not in line
    for part in ("alice", "12345678", "'enable'", "InvalidAuthenticationCode", "rolled back"):
        assert part in line


# --- every argument is checked before anything outside is touched ---------------------------


class Outside:
    """Stand-ins for pcscd, the desk daemon's socket and IAM: each hangs up on whoever
    connects (so a command that goes out fails fast) and counts them."""

    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        pcscd = socket.socket(socket.AF_UNIX)
        pcscd.bind(str(tmp / "pcscd.comm"))
        daemon = socket.socket(socket.AF_UNIX)
        daemon.bind(str(tmp / "control.sock"))
        iam = socket.socket()
        iam.bind(("127.0.0.1", 0))
        self.knocks: dict[str, int] = {"pcscd": 0, "the daemon's socket": 0, "IAM": 0}
        self._selector = selectors.DefaultSelector()
        for name, listener in zip(self.knocks, (pcscd, daemon, iam), strict=True):
            listener.listen(16)
            self._selector.register(listener, selectors.EVENT_READ, name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hang_up, daemon=True)
        self._thread.start()
        self.config = tmp / "provisioner.toml"
        self.config.write_text(
            f'[daemon]\nsocket = "{tmp / "control.sock"}"\nstate_directory = "{self.state}"\n'
            "[iam]\nmax_attempts = 1\n"
        )
        endpoint = f"http://127.0.0.1:{iam.getsockname()[1]}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            "PCSCLITE_CSOCK_NAME": str(tmp / "pcscd.comm"),
            "PROVISIONER_CONFIG": str(self.config),
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL_IAM": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }

    def _hang_up(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                conn.close()
                self.knocks[key.data] += 1

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args)

    def touched(self) -> list[str]:
        """Who was knocked on, once the commands have ended (stops the stand-ins)."""
        self._stop.set()
        self._thread.join(5)
        for key in self._selector.get_map().values():
            key.fileobj.setblocking(False)  # type: ignore[union-attr]
            with contextlib.suppress(BlockingIOError):
                while True:  # connections still in the backlog count too
                    key.fileobj.accept()[0].close()  # type: ignore[union-attr]
                    self.knocks[key.data] += 1
        knocked = [name for name, count in self.knocks.items() if count]
        return knocked + (["the store"] if self.state.exists() else [])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Outside]:
    o = Outside(tmp_path)
    yield o
    o.close()


def test_the_stand_ins_notice_a_command_that_goes_out(outside: Outside) -> None:
    """Without this, "nothing was touched" below could be true of a deaf fixture."""
    outside.run("enroll", "--user", "alice", "--direct")
    outside.run("status")
    outside.run("revoke", "--user", "alice", "--direct")
    # One-shot work is recorded in the desk's state, so the store counts as touched too.
    assert set(outside.touched()) == {"pcscd", "the daemon's socket", "IAM", "the store"}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["enroll", "--user", "bad user!"], "--user: 'bad user!' is not a valid IAM user name"),
        (["enroll", "--user", "alice", "--serial", "²"], "--serial: '²' is not a token serial"),
        (["enroll", "--user", "alice", "--serial", "١٢٣"], "--serial: '١٢٣' is not a token serial"),
        (["enroll", "--user", "alice", "--serial", "-5"], "--serial: '-5' is not a token serial"),
        (["enroll", "--user", "alice", "--serial", "0"], "--serial: '0' is not a token serial"),
        (["enroll", "--user", "alice", "--serial", "4294967296"], "--serial: '4294967296' is not"),
        (["queue", "--user", "bad user!"], "--user: 'bad user!' is not a valid IAM user name"),
        (["queue", "--user", "alice", "--serial", "1_000"], "--serial: '1_000' is not a token"),
        (["revoke", "--user", "x y"], "--user: 'x y' is not a valid IAM user name"),
        (["revoke", "--user", "alice", "--serial", "+5"], "--serial: '+5' is not a token serial"),
        (["resync", "--user", ""], "--user: '' is not a valid IAM user name"),
        (["resync", "--user", "alice", "--serial", "5.0"], "--serial: '5.0' is not a token"),
        (["replace", "--user", "alice", "--old-serial", "²"], "--old-serial: '²' is not a token"),
        (["cancel", "²"], "id: '²' is not a request number"),
        (["cancel", "0"], "id: '0' is not a request number"),
        (["history", "--serial", "²"], "--serial: '²' is not a token serial"),
        (["history", "--user", "bad user!"], "--user: 'bad user!' is not a valid IAM user name"),
        (["history", "--since", "9" * 30 + "d"], "--since: '" + "9" * 30 + "d': at most"),
        (["history", "--since", "yesterday"], "--since: 'yesterday': give a time like"),
        (["history", "--limit", "0"], "--limit: '0' is not a number of records (1 to 100000"),
        (["history", "--limit", "10000000"], "--limit: '10000000' is not a number of records"),
        (["doctor", "--user", "bad user!"], "--user: 'bad user!' is not a valid IAM user name"),
        (["demo", "--in-process", "--users", "alice,bad user!"], "--users: 'bad user!' is not"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2_before_anything_is_touched(
    outside: Outside, args: list[str], named: str
) -> None:
    run = outside.run(*args)
    lines = run.stderr.strip().splitlines()
    assert (run.returncode, len(lines)) == (2, 1), run.stderr
    assert lines[0].startswith(f"provisioner {args[0]}: argument ") and named in lines[0]
    assert f"provisioner {args[0]} --help" in lines[0]
    assert outside.touched() == []
