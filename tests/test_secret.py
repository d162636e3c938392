import base64
import pickle

import pytest

from provisioner.core.secret import Seed

KEY = bytes(range(40))
B32 = base64.b32encode(KEY).decode()


def test_repr_str_format_hide_the_key() -> None:
    seed = Seed.from_base32(B32)
    for text in (repr(seed), str(seed), f"{seed}", f"{seed!r}", "%s" % (seed,)):  # noqa: UP031
        assert B32 not in text and KEY.hex() not in text
        assert "redacted" in text


def test_decodes_aws_base32_with_or_without_padding() -> None:
    assert Seed.from_base32(B32.encode()).reveal() == KEY
    assert Seed.from_base32(B32.rstrip("=").lower()).reveal() == KEY
    assert Seed.from_base32(B32).base32() == B32.rstrip("=")


def test_bad_base32_error_does_not_echo_the_text() -> None:
    with pytest.raises(ValueError) as info:
        Seed.from_base32("NOT*BASE32*SECRETISH")
    assert "SECRETISH" not in str(info.value)


def test_wipe_forgets_the_key() -> None:
    seed = Seed(KEY)
    held = seed._key  # the buffer the seed owns: wiping must overwrite it, not just drop it
    seed.wipe()
    assert seed.wiped
    assert held == bytearray(len(KEY))
    with pytest.raises(ValueError) as info:
        seed.reveal()
    assert str(info.value) == "the seed was wiped"


def test_never_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Seed(KEY))


def test_equality_is_by_value() -> None:
    assert Seed(KEY) == Seed(KEY)
    assert Seed(KEY) != Seed(KEY[::-1])
