import csv
import io
import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioner.adapters.sqlite_store import Store
from provisioner.core.audit import log_line, parse_since, render
from provisioner.core.errors import InvalidInput

RECORD = {
    "id": 1,
    "at": 1_800_000_000.0,
    "actor": "root",
    "event": "enrollment",
    "user": "alice",
    "serial": 12345678,
    "device_arn": "arn:aws:iam::123456789012:mfa/provisioner/a.b",
    "outcome": "failed",
    "reason": "IAM refused EnableMFADevice: InvalidAuthenticationCode",
}


def test_log_line_has_stable_keys_and_quotes_what_needs_it() -> None:
    line = log_line(RECORD)
    assert line == (
        "audit at=2027-01-15T08:00:00Z actor=root event=enrollment user=alice "
        "serial=12345678 device_arn=arn:aws:iam::123456789012:mfa/provisioner/a.b "
        'outcome=failed reason="IAM refused EnableMFADevice: InvalidAuthenticationCode"'
    )
    assert "user=" not in log_line({**RECORD, "user": None})


def test_every_audit_record_goes_to_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "s.db", clock=lambda: 1_800_000_000.0)
    with caplog.at_level(logging.INFO, logger="provisioner.audit"):
        store.enqueue("bob", "root")
    assert [r.getMessage() for r in caplog.records] == [
        "audit at=2027-01-15T08:00:00Z actor=root event=queued user=bob"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", 1000_000 - 86400),
        ("7d", 1000_000 - 7 * 86400),
        ("30m", 1000_000 - 1800),
        ("2026-11-01", 1_793_491_200.0),
        ("2026-11-01T09:30", 1_793_525_400.0),
        ("2026-11-01T09:30+01:00", 1_793_521_800.0),
    ],
)
def test_since(text: str, expected: float) -> None:
    assert parse_since(text, now=1000_000) == expected


def test_since_refuses_nonsense() -> None:
    with pytest.raises(InvalidInput):
        parse_since("yesterday")


@pytest.mark.parametrize("text", ["9" * 400 + "d", "36501d", "99999999999999h", "٣d", "²d"])
def test_since_refuses_what_no_float_holds_and_other_scripts_digits(text: str) -> None:
    # "9"*400 + "d" was an OverflowError; 99999999999999h a date 1e10 years back
    with pytest.raises(InvalidInput):
        parse_since(text, now=1000_000)


def test_since_reaches_back_100_years() -> None:
    assert parse_since("36500d", now=1000_000) == 1000_000 - 36500 * 86400


def test_formats() -> None:
    rows = [RECORD, {**RECORD, "id": 2, "user": "bob", "reason": None}]
    parsed = json.loads(render(rows, "json"))
    assert parsed[0]["at"] == "2027-01-15T08:00:00Z" and parsed[1]["user"] == "bob"
    table = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert table[0]["reason"] == RECORD["reason"] and table[1]["reason"] == ""
    assert list(table[0]) == [
        "at",
        "actor",
        "event",
        "user",
        "serial",
        "device_arn",
        "outcome",
        "reason",
    ]
    text = render(rows, "table").splitlines()
    assert text[0].split() == [
        "at",
        "actor",
        "event",
        "user",
        "serial",
        "device_arn",
        "outcome",
        "reason",
    ]
    assert "alice" in text[1] and "bob" in text[2]
    with pytest.raises(InvalidInput):
        render(rows, "xml")


def test_the_account_column_only_where_a_record_names_an_account() -> None:
    plain = [RECORD, {**RECORD, "id": 2, "account": None}]
    assert "account" not in json.loads(render(plain, "json"))[1]
    assert "account" not in render(plain, "csv").splitlines()[0]
    rows = [RECORD, {**RECORD, "id": 2, "account": "prod"}]
    header = render(rows, "csv").splitlines()[0].split(",")
    assert header[:5] == ["at", "actor", "event", "user", "account"]
    assert json.loads(render(rows, "json"))[1]["account"] == "prod"
    assert "prod" in render(rows, "table").splitlines()[2]
    assert "account=prod" in log_line(rows[1]) and "account" not in log_line(RECORD)


def test_a_fleets_trail_shows_the_desk_and_never_the_chain() -> None:
    one = [{**RECORD, "desk": "berlin", "prev_hash": "a", "hash": "b"}]
    assert set(json.loads(render(one, "json"))[0]) & {"desk", "prev_hash", "hash"} == set()
    two = [*one, {**RECORD, "id": 2, "desk": "lisbon", "prev_hash": None, "hash": "c"}]
    assert render(two, "csv").splitlines()[0].split(",")[:2] == ["at", "desk"]
    parsed = json.loads(render(two, "json"))
    assert [r["desk"] for r in parsed] == ["berlin", "lisbon"] and "hash" not in parsed[0]


# --- CSV a spreadsheet opens: no cell it would evaluate (OWASP "CSV injection") ---------------

#: What makes Excel, LibreOffice or Google Sheets read a cell as a formula.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@pytest.mark.parametrize(
    "user",
    ['=HYPERLINK("http://x","y")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "=1", "-"],
)
def test_csv_neutralises_a_user_name_a_spreadsheet_would_evaluate(user: str) -> None:
    # IAM user names may begin with = + - @ (its pattern is [\w+=,.@-]+).
    rows = list(csv.DictReader(io.StringIO(render([{**RECORD, "user": user}], "csv"))))
    assert rows[0]["user"] == "'" + user


@given(
    st.fixed_dictionaries(
        {k: st.text(max_size=12) for k in ("actor", "event", "user", "device_arn", "reason")}
    )
)
def test_no_csv_cell_starts_a_formula(fields: dict[str, str]) -> None:
    exported = render([{**RECORD, **fields}], "csv")
    # newline="": the reader sees every CR and LF as written, as a spreadsheet does
    assert len(list(csv.reader(io.StringIO(exported, newline="")))) == 2  # no row injected
    for row in csv.reader(io.StringIO(exported, newline="")):
        for cell in row:
            assert not cell.startswith(FORMULA_START), cell
    (row,) = csv.DictReader(io.StringIO(exported, newline=""))
    for key, value in fields.items():
        # what was changed is only the quote in front, so a reader can undo it
        assert row[key] in (value, "'" + value)
