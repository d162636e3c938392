import argparse
import re
from pathlib import Path

import pytest

from provisioner.cli import EXIT_CODES_HELP, build_parser, exit_code, main
from provisioner.errors import (
    ConfigError,
    EnrollmentFailed,
    InvalidAuthenticationCode,
    InvalidInput,
    ProvisionerError,
    TokenNoOath,
    UserNotFound,
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
            EnrollmentFailed(
                step="enable", user="a", token="1", cause=InvalidAuthenticationCode("x")
            ),
            1,
        ),
        (
            EnrollmentFailed(
                step="enable",
                user="a",
                token="1",
                cause=InvalidAuthenticationCode("x"),
                leftovers=("virtual MFA device arn:x",),
            ),
            5,
        ),
    ],
)
def test_exit_codes(error: ProvisionerError, code: int) -> None:
    assert exit_code(error) == code
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
        cause=InvalidAuthenticationCode(
            "IAM refused EnableMFADevice for alice: InvalidAuthenticationCode"
        ),
    )
    line = e.one_line()
    assert "\n" not in line
    for part in ("alice", "12345678", "'enable'", "InvalidAuthenticationCode", "rolled back"):
        assert part in line
