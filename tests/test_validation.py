import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioner.core import validation
from provisioner.core.errors import InvalidInput


@pytest.mark.parametrize("name", ["alice", "a", "x" * 64, "first.last+it=ops,@x_y-z"])
def test_valid_user_names(name: str) -> None:
    assert validation.user_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "alice smith", "alice/x", "élodie", "a:b"])
def test_invalid_user_names(name: str) -> None:
    with pytest.raises(InvalidInput):
        validation.user_name(name)


@pytest.mark.parametrize("code", ["000000", "123456"])
def test_valid_codes(code: str) -> None:
    assert validation.auth_code(code) == code


@pytest.mark.parametrize("code", ["", "12345", "1234567", "12a456", " 123456", "１２３４５６"])
def test_invalid_codes_and_no_echo(code: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validation.auth_code(code)
    assert code.strip() == "" or code not in str(info.value)


@pytest.mark.parametrize("path", ["/", "/provisioner/", "/a/b/"])
def test_valid_paths(path: str) -> None:
    assert validation.device_path(path) == path


@pytest.mark.parametrize("path", ["", "provisioner", "/a", "a/", "/a//b/", "/ x/"])
def test_invalid_paths(path: str) -> None:
    with pytest.raises(InvalidInput):
        validation.device_path(path)


def test_serial_numbers() -> None:
    serial = "arn:aws:iam::123456789012:mfa/provisioner/alice.yubikey.1"
    assert validation.serial_number(serial) == serial
    with pytest.raises(InvalidInput) as info:
        validation.serial_number("short")
    assert info.value.message == "'short' is not a valid MFA device serial number"


def test_valid_tags_pass_unchanged() -> None:
    fifty = tuple((f"k{i}", "v") for i in range(50))
    assert validation.tags(fifty) == fifty
    pairs = (("provisioner:desk", "front"), ("cost centre", ""), ("my-aws:x", "a/b=c+d@e"))
    assert validation.tags(pairs) == pairs


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (tuple((f"k{i}", "v") for i in range(51)), "51 tags given; IAM takes at most 50"),
        ((("k", "v"), ("K", "w")), "tag 'K' is given twice"),
        ((("aws:owner", "me"),), "'aws:owner' is not a valid IAM tag key"),
        ((("AWS:owner", "me"),), "'AWS:owner' is not a valid IAM tag key"),  # any case
        ((("", "v"),), "'' is not a valid IAM tag key"),
        ((("k" * 129, "v"),), f"'{'k' * 129}' is not a valid IAM tag key"),
        ((("k", "v!"),), "the value of tag 'k' is not valid for IAM: 'v!'"),
        ((("k", "v" * 257),), f"the value of tag 'k' is not valid for IAM: '{'v' * 257}'"),
    ],
)
def test_invalid_tags_are_refused_naming_the_tag(
    pairs: tuple[tuple[str, str], ...], message: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        validation.tags(pairs)
    assert info.value.message == message


# --- numbers from text: one strict parser for serials, ids, ports, --since amounts ------------


@given(st.integers(min_value=1, max_value=2**32 - 1))
def test_every_token_serial_reads_back(serial: int) -> None:
    assert validation.token_serial(str(serial)) == serial


@given(st.text(max_size=30))
def test_a_token_serial_is_ascii_digits_in_range_or_one_clear_refusal(text: str) -> None:
    try:
        serial = validation.token_serial(text)
    except InvalidInput as e:
        line = e.one_line()
        assert "\n" not in line and "token serial" in line
        return
    # What passes is exactly what a person means by a serial: nothing int() forgives.
    assert re.fullmatch("[0-9]+", text)
    assert serial == int(text) and 0 < serial < 2**32


@pytest.mark.parametrize(
    "text",
    [
        "²",  # isdigit() says yes, int() says no
        "١٢٣",  # Arabic-Indic digits: int() reads 123
        "１２３",  # full-width digits: int() reads 123
        "+5",
        "-5",
        " 5",
        "5\n",
        "1_000",
        "0",
        "4294967296",
        "",
        "5.0",
        "0x10",
        "9" * 5000,
    ],
)
def test_what_int_forgives_is_not_a_token_serial(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validation.token_serial(text)
    assert len(info.value.one_line()) < 200  # a 5000-digit "serial" is not echoed whole


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_whole_number_keeps_to_its_range(value: int, maximum: int) -> None:
    if value <= maximum:
        assert validation.whole_number(str(value), "a count", maximum=maximum) == value
    else:
        with pytest.raises(InvalidInput, match="a count"):
            validation.whole_number(str(value), "a count", maximum=maximum)
