from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioner.adapters.files import load_roster as load
from provisioner.core.errors import ConfigError
from provisioner.core.roster import parse


def test_reads_serials_and_users_in_any_column_order() -> None:
    roster = parse(
        "# batch 7\nuser,serial,note\nalice,12345678,desk 1\n\nbob, 12345679 ,\n", "r.csv"
    )
    assert roster.users_by_serial == {12345678: "alice", 12345679: "bob"}
    assert roster.user_for(12345678) == "alice"
    assert roster.user_for(1) is None and roster.user_for(None) is None


def test_an_accounts_column_names_the_accounts_each_token_is_enrolled_in() -> None:
    roster = parse("serial,user,accounts\n1,alice,prod;dev\n2,bob,\n", "r.csv")
    assert roster.accounts_for(1) == "prod,dev"
    assert roster.accounts_for(2) == ""  # every account the desk serves
    assert roster.accounts_for(None) == "" and roster.accounts_for(3) == ""


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("serial,user,accounts\n1,alice,prod;pr od\n", "r.csv:2: 'pr od' is not a valid account"),
        ("serial,user,accounts\n1,alice,prod;prod\n", "r.csv:2: account prod is named twice"),
        ("serial,user\n1,alice\n1,bob\n", "r.csv:3: serial 1 is listed twice"),
        ("serial,user\n1,alice\n2,alice\n", "r.csv:3: user alice is listed twice"),
        ("serial,user\n1,alice smith\n", "r.csv:2: 'alice smith' is not a valid IAM user name"),
        ("serial,user\nabc,alice\n", "r.csv:2: 'abc' is not a token serial number"),
        # isdigit() passes these; int() refuses the first and misreads the others
        ("serial,user\n1,bob\n²,alice\n", "r.csv:3: '²' is not a token serial number"),
        ("serial,user\n١٢٣,alice\n", "r.csv:2: '١٢٣' is not a token serial number"),
        ("serial,user\n１２３,alice\n", "r.csv:2: '１２３' is not a token serial number"),
        ("serial,user\n4294967296,alice\n", "r.csv:2: '4294967296' is not a token serial"),
        # a quoted field may not run over two lines: line numbers would no longer hold
        ('serial,user\n"1\n2",alice\n', "r.csv:2: "),
        # the csv module's own limit, met by a field of 200000 characters
        ("serial,user\n1," + "a" * 200_000 + "\n", "r.csv:2: "),
        ("serial,user,colour\n1,alice,red\n", "the header must name"),
        ("12345678,alice\n", "the header must name"),
        ("serial,user\n1,alice,extra\n", "r.csv:2: expected 2 fields, found 3"),
    ],
)
def test_every_mistake_is_named_with_its_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "r.csv")
    assert fragment in info.value.one_line()


def test_encodings(tmp_path: Path) -> None:
    bom = tmp_path / "bom.csv"
    bom.write_bytes("serial,user\n1,zoë@corp\n".encode("utf-8-sig").replace("zoë".encode(), b"zoe"))
    assert load(bom).users_by_serial == {1: "zoe@corp"}
    latin = tmp_path / "latin.csv"
    latin.write_bytes("serial,user\n1,zoë\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(latin)
    assert "not UTF-8" in info.value.one_line()


@given(st.text(alphabet=st.sampled_from('serial,user\n"# 0123456789²١alice\r\x00'), max_size=60))
def test_any_text_is_a_roster_or_a_config_error_naming_its_line(text: str) -> None:
    """A roster is re-read on SIGHUP: anything but ConfigError would kill the daemon."""
    try:
        roster = parse(text, "r.csv")
    except ConfigError as e:
        assert e.one_line().startswith("r.csv:")
        assert "\n" not in e.one_line()
        return
    assert all(0 < serial < 2**32 for serial in roster.users_by_serial)
