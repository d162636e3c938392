"""The control socket's requests are checked at the boundary, field by field, against one
table: what passes is typed and in range; anything else is one line, exit status 2."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.core.errors import InvalidInput, exit_status
from provisioner.daemon.requests import MAX_SERIAL, OPS, valid_request

# What the CLI sends today (cli.py): each must pass unchanged.
CLI_REQUESTS: list[dict[str, Any]] = [
    {"op": "status"},
    {"op": "watch"},
    {"op": "queue"},
    {"op": "enroll", "user": "alice", "serial": None},
    {"op": "enroll", "user": "alice", "serial": 12345678},
    {"op": "enroll", "user": "bob", "serial": None, "wait": False},
    {"op": "enroll", "user": "dave", "serial": None, "accounts": "prod,dev"},
    {"op": "enroll", "user": "erin", "serial": None, "wait": False, "desk": "lisbon-2"},
    {"op": "enroll", "user": "bob", "serial": 7, "kind": "resync", "old_serial": None},
    {"op": "enroll", "user": "bob", "serial": None, "kind": "replace", "old_serial": 9},
    {"op": "cancel", "id": 3},
    {"op": "history", "limit": 50},
    {"op": "history", "limit": 1000, "user": "bob", "serial": 5, "since": 1_800_000_000.5},
    {"op": "history", "limit": 1, "since": 1_800_000_000},
    {"op": "revoke", "user": "carol", "serial": None},
    {"op": "revoke", "user": "carol", "serial": MAX_SERIAL},
    {"op": "reconcile", "dry_run": True, "keep_orphans": False, "all_desks": False},
]


@pytest.mark.parametrize("request_", CLI_REQUESTS, ids=lambda r: json.dumps(r))
def test_what_the_cli_sends_passes_unchanged(request_: dict[str, Any]) -> None:
    assert valid_request(dict(request_)) == request_


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        # the cases: a boolean taken for 1, a negative serial queued forever,
        # a huge integer that reached SQLite (OverflowError)
        ({"op": "enroll", "user": "a", "serial": True}, '"serial" must be'),
        ({"op": "enroll", "user": "a", "serial": -5}, '"serial" must be'),
        ({"op": "enroll", "user": "a", "serial": 2**64}, '"serial" must be'),
        ({"op": "enroll", "user": "a", "serial": 2**32}, '"serial" must be'),
        ({"op": "enroll", "user": "a", "serial": 0}, '"serial" must be'),
        ({"op": "enroll", "user": "a", "serial": 5.0}, '"serial" must be'),
        ({"op": "enroll", "user": "a", "serial": "5"}, '"serial" must be'),
        ({"op": "enroll", "user": "a", "old_serial": -1, "kind": "replace"}, '"old_serial"'),
        ({"op": "enroll", "user": "a", "kind": "delete"}, '"kind" must be one of'),
        ({"op": "enroll", "user": "a", "wait": 0}, '"wait" must be true or false'),
        ({"op": "enroll", "user": "a", "accounts": ["prod"]}, '"accounts" must be account names'),
        ({"op": "enroll", "user": "a", "accounts": "prod,pr od"}, "not a list of account names"),
        ({"op": "enroll", "user": "a", "accounts": ","}, "names no account"),
        ({"op": "enroll", "user": "bad user!"}, "not a valid IAM user name"),
        ({"op": "enroll", "user": "x" * 65}, "not a valid IAM user name"),
        ({"op": "enroll", "user": 5}, '"user" must be'),
        ({"op": "enroll"}, 'needs "user"'),
        ({"op": "enroll", "user": None}, 'needs "user"'),
        ({"op": "enroll", "user": "a", "colour": "red"}, 'no field "colour"'),
        ({"op": "status", "verbose": True}, 'no field "verbose"'),
        ({"op": "cancel"}, 'needs "id"'),
        ({"op": "cancel", "id": True}, '"id" must be'),
        ({"op": "cancel", "id": -1}, '"id" must be'),
        ({"op": "cancel", "id": 2**63}, '"id" must be'),
        ({"op": "history", "limit": 0}, '"limit" must be'),
        ({"op": "history", "limit": 10**30}, '"limit" must be'),
        ({"op": "history", "since": 10**30}, '"since" must be'),
        ({"op": "history", "since": -1}, '"since" must be'),
        ({"op": "history", "since": False}, '"since" must be'),
        ({"op": "history", "user": ["a"]}, '"user" must be'),
        ({"op": "revoke", "user": "a", "serial": 1.5}, '"serial" must be'),
        ({"op": "reconcile", "dry_run": "yes"}, '"dry_run" must be true or false'),
        ({"op": "nope"}, 'unknown op "nope"'),
        ({"op": 3}, '"op"'),
        ({}, '"op"'),
    ],
    ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else None,
)
def test_bad_requests_are_refused_with_one_line(request_: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        valid_request(request_)
    text = info.value.one_line()
    assert fragment in text
    assert "\n" not in text and len(text) < 300
    assert exit_status(info.value) == 2


def test_a_long_bad_value_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidInput) as info:
        valid_request({"op": "enroll", "user": "é" * 60_000})
    assert len(info.value.one_line()) < 300


def test_every_op_of_the_service_is_in_the_table() -> None:
    assert set(OPS) == {
        "enroll",
        "status",
        "queue",
        "cancel",
        "history",
        "reconcile",
        "watch",
        "revoke",
    }


# --- hypothesis: anything a client may send ----------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
FIELDS = sorted({name for fields in OPS.values() for name in fields} | {"x"})
REQUESTS = st.builds(
    lambda op, fields: {"op": op, **fields},
    st.sampled_from([*OPS, "x"]) | JSON,
    st.dictionaries(st.sampled_from(FIELDS), JSON | st.integers(1, 2**32 - 1), max_size=5),
)


def _is_serial(value: object) -> bool:
    return type(value) is int and 0 < value <= MAX_SERIAL


@settings(max_examples=500, deadline=None)
@given(request_=REQUESTS)
def test_what_passes_is_typed_and_in_range(request_: dict[str, Any]) -> None:
    try:
        checked = valid_request(request_)
    except InvalidInput as e:
        assert "\n" not in e.one_line() and exit_status(e) == 2
        return
    op = checked["op"]
    assert set(checked) <= {"op", *OPS[op]}
    for name in ("serial", "old_serial"):
        assert checked.get(name) is None or _is_serial(checked[name])
    if "user" in checked and checked["user"] is not None:
        assert isinstance(checked["user"], str) and 0 < len(checked["user"]) <= 64
    if op in ("enroll", "revoke"):
        assert isinstance(checked["user"], str)
    if op == "cancel":
        assert type(checked["id"]) is int and 0 < checked["id"] < 2**63
    for flag in ("wait", "dry_run", "keep_orphans", "all_desks"):
        assert checked.get(flag) in (None, True, False)
    if checked.get("limit") is not None:
        assert type(checked["limit"]) is int and 0 < checked["limit"] <= 100_000
    if checked.get("since") is not None:
        since = checked["since"]
        assert type(since) in (int, float) and 0 <= since < 2**53
