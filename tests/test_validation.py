import pytest

from provisioner import validation
from provisioner.errors import InvalidInput


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
