"""The daemon's answers and the exit statuses: built in one place, plain JSON on the wire."""

from __future__ import annotations

import json

from provisioner.core.errors import (
    DirectoryError,
    EnrollmentFailed,
    ExitStatus,
    InvalidInput,
)
from provisioner.core.messages import error_answer, failed_outcome, refusal, success


def test_a_refusal_is_final_and_carries_the_exit_status_as_a_plain_number() -> None:
    answer = refusal("bad filter", ExitStatus.USAGE)
    assert json.loads(json.dumps(answer)) == {
        "ok": False,
        "final": True,
        "error": "bad filter",
        "exit": 2,
    }
    assert "exit" not in refusal("unknown op 'x'")


def test_a_success_is_final_and_carries_what_was_asked_for() -> None:
    assert success(actions=["deleted device x"]) == {
        "ok": True,
        "final": True,
        "actions": ["deleted device x"],
    }
    assert list(success(**{"queue": [], "waiting": 0})) == ["ok", "final", "queue", "waiting"]


def test_an_error_answer_says_the_operators_line_and_maps_the_status() -> None:
    error = InvalidInput("user name 'a b' has a space", hint="use the IAM user name")
    answer = error_answer(error)
    assert answer["error"] == error.one_line()
    assert answer["exit"] == ExitStatus.USAGE
    assert answer["final"] is True and answer["ok"] is False


def test_a_failed_outcome_names_the_reason_and_lets_the_caller_override() -> None:
    cause = DirectoryError("denied", code="AccessDenied")
    failed = EnrollmentFailed(step="create", user="alice", token="YubiKey 1", cause=cause)
    outcome = failed_outcome("rolled back", failed)
    assert outcome["reason"] == "AccessDenied"
    assert outcome["exit"] == ExitStatus.FAILED
    assert outcome["detail"] == failed.one_line()
    assert failed_outcome("x", failed, reason="Other")["reason"] == "Other"


def test_the_help_text_lists_every_status_once() -> None:
    text = ExitStatus.help_text()
    assert text.startswith("exit status:\n")
    for status in ExitStatus:
        assert f"  {status.value}  {status.meaning}" in text
    assert ExitStatus(3) is ExitStatus.TOKEN
