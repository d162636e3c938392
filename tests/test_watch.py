"""The live view's screen, rendered to text from status updates shaped as the daemon's."""

from __future__ import annotations

from typing import Any

from provisioner.cli.watch import describe_event, render

NOW = 1_800_000_000.0


def update(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ok": True,
        "event": "update",
        "cause": None,
        "daemon": {"desk": "front", "pcsc": "up", "iam": "http://127.0.0.1:5000", "roster": 2},
        "readers": [
            {"name": "Virtual PCD 00 00", "card_present": True},
            {"name": "Virtual PCD 00 01", "card_present": False},
        ],
        "tokens": [
            {
                "reader": "Virtual PCD 00 00",
                "serial": 1001,
                "state": "enrolling",
                "user": "alice",
                "step": "program token",
            }
        ],
        "queue": [
            {"id": 7, "user": "bob", "serial": None, "requested_by": "root", "requested_at": NOW}
        ],
        "in_progress": [
            {
                "reader": "Virtual PCD 00 00",
                "serial": 1001,
                "user": "alice",
                "step": "program token",
            }
        ],
        "recent": [
            {
                "at": NOW,
                "user": "carol",
                "serial": 1002,
                "ok": True,
                "outcome": "enrolled",
                "seconds": 0.0421,
                "device_arn": "arn:aws:iam::123456789012:mfa/provisioner/carol-1002",
            },
            {
                "at": NOW,
                "user": "dave",
                "serial": 1003,
                "ok": False,
                "outcome": "failed",
                "detail": "token 1003 was removed during program token",
            },
        ],
    }
    return base | overrides


def test_every_part_of_the_desk_is_on_the_screen() -> None:
    screen = "\n".join(render(update(), now=NOW))
    assert "desk front" in screen and "pcscd up" in screen and "roster of 2" in screen
    assert "Virtual PCD 00 00: token 1001 enrolling for alice, step program token" in screen
    assert "Virtual PCD 00 01: empty" in screen
    assert "alice on token 1001 in Virtual PCD 00 00: step program token" in screen
    assert "#7 bob on any token, asked by root" in screen
    assert "carol on token 1002: enrolled in 42 ms (arn:aws:iam::123456789012:mfa/" in screen
    assert "dave on token 1003: failed: token 1003 was removed during program token" in screen
    assert screen.endswith("last event: connected")


def test_the_work_done_ahead_of_a_requests_plug_is_shown_on_its_line() -> None:
    queue = [
        {"id": 7, "user": "bob", "serial": None, "requested_by": "root", "requested_at": NOW},
        {"id": 8, "user": "erin", "serial": None, "requested_by": "root", "requested_at": NOW},
        {"id": 9, "user": "finn", "serial": None, "requested_by": "root", "requested_at": NOW},
    ]
    ahead = [
        {"queue": 7, "user": "bob", "device": "arn:aws:iam::1:mfa/bob.yubikey.q7-a"},
        {"queue": 8, "user": "erin", "device": None},
    ]
    lines = render(update(queue=queue, ahead=ahead), now=NOW, width=200)
    [bob, erin, finn] = [line for line in lines if line.startswith("  #")]
    assert bob.endswith("; device made ahead") and erin.endswith("; checked ahead")
    assert "ahead" not in finn
    assert not any(line.startswith("roster, ready ahead") for line in lines)
    rostered = [{"queue": None, "serial": 40000001, "user": "carol", "device": "arn:x"}]
    lines = render(update(ahead=rostered), now=NOW, width=200)
    assert "roster, ready ahead: 40000001 (carol, device made)" in lines


def test_an_idle_desk_says_so_rather_than_showing_empty_sections() -> None:
    screen = render(update(readers=[], tokens=[], queue=[], in_progress=[], recent=[]), now=NOW)
    assert "readers: none (is a YubiKey plugged in?)" in screen
    assert "in progress: nothing" in screen
    assert "queue: empty" in screen
    assert "last outcomes: none yet" in screen


def test_lines_are_cut_to_the_terminal_width() -> None:
    screen = render(update(), now=NOW, width=40)
    assert all(len(line) <= 40 for line in screen)
    assert any(line.endswith("…") for line in screen)


def test_the_event_that_caused_an_update_is_described() -> None:
    step = {"event": "step", "step": "enable", "user": "alice", "detail": "EnableMFADevice"}
    assert describe_event(step) == "enable for alice: EnableMFADevice"
    assert describe_event({"event": "outcome", "outcome": "enrolled", "user": "bob"}) == (
        "enrolled for bob"
    )
    assert describe_event({"event": "token-removed", "reader": "R"}) == "token-removed in R"
    assert describe_event({"event": "request-queued", "id": 3, "user": "c"}) == (
        "request #3 queued for c"
    )
    screen = render(update(cause=step), now=NOW)
    assert screen[-1] == "last event: enable for alice: EnableMFADevice"


def test_the_accounts_of_the_desk_of_a_request_and_of_an_outcome_are_shown() -> None:
    screen = "\n".join(
        render(
            update(
                daemon={
                    "desk": "d",
                    "pcsc": "up",
                    "iam": "x",
                    "roster": 0,
                    "accounts": ["prod", "dev"],
                },
                queue=[
                    {
                        "id": 4,
                        "user": "erin",
                        "serial": None,
                        "accounts": "prod,dev",
                        "requested_by": "root",
                        "requested_at": 0,
                    }
                ],
                recent=[
                    {
                        "at": 0,
                        "user": "erin",
                        "serial": 7,
                        "outcome": "enrolled",
                        "ok": True,
                        "device_arn": "arn:1",
                        "accounts": [
                            {"account": "prod", "device_arn": "arn:1"},
                            {"account": "dev", "device_arn": "arn:2"},
                        ],
                    }
                ],
            ),
            now=0,
            width=300,
        )
    )
    assert "accounts prod, dev" in screen
    assert "#4 erin in prod, dev on any token" in screen
    assert "(prod: arn:1, dev: arn:2)" in screen
