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
    validation.serial_number("arn:aws:iam::123456789012:mfa/provisioner/alice.yubikey.1")
    with pytest.raises(InvalidInput):
        validation.serial_number("short")


def test_tags() -> None:
    validation.tags((("provisioner:desk", "front"),))
    with pytest.raises(InvalidInput):
        validation.tags(tuple((f"k{i}", "v") for i in range(51)))
    with pytest.raises(InvalidInput):
        validation.tags((("k", "v"), ("K", "w")))
