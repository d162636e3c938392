from pathlib import Path

import pytest

from provisioner import config as config_module
from provisioner.config import Config, load, override, parse
from provisioner.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "provisioner.toml.example"


def test_the_shipped_example_is_valid_and_matches_the_defaults() -> None:
    config = parse(EXAMPLE.read_text(), str(EXAMPLE))
    defaults = Config()
    assert config.token == defaults.token
    assert config.iam.device_path == defaults.iam.device_path
    assert config.enrollment == defaults.enrollment


def test_values_are_read() -> None:
    config = parse(
        """
desk = "front-desk"
[token]
issuer = "ACME AWS"
touch = true
[iam]
device_path = "/desk/"
tags = { cost-center = "it" }
[enrollment]
margin_seconds = 7
""",
        "t.toml",
    )
    assert config.desk == "front-desk"
    assert config.token.touch is True
    assert config.iam.device_path == "/desk/"
    settings = config.enrollment_settings()
    assert settings.margin == 7.0
    assert ("cost-center", "it") in settings.extra_tags


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[token]\nissuer = 3", "token.issuer must be a string"),
        ("[token]\ntuch = true", "unknown key token.tuch"),
        ("colour = 'red'", "unknown key colour"),
        ("[iam]\ndevice_path = 'nope'", "not a valid IAM path"),
        ("[iam]\ndevice_name = '{usr}'", "bad template"),
        ("[enrollment]\nmargin_seconds = 40", "margin_seconds"),
        ("[enrollment]\nmargin_seconds = -1", "must not be negative"),
        ("log_level = 'loud'", "log_level"),
        ("[iam]\ntags = { 'aws:x' = 'y' }", "not a valid IAM tag key"),
        ("[token\n", "not valid TOML"),
    ],
)
def test_mistakes_are_named(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "t.toml")
    assert fragment in info.value.one_line()


def test_missing_default_file_means_defaults_but_explicit_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "etc/provisioner/provisioner.toml"
    monkeypatch.setattr(config_module, "DEFAULT_PATH", default)
    monkeypatch.delenv("PROVISIONER_CONFIG", raising=False)
    # Nothing at the default path: the built-in defaults, said to be such.
    loaded = load()
    assert loaded == Config()
    assert loaded.source == "built-in defaults"
    # A file there is read: the defaults above came from its absence.
    default.parent.mkdir(parents=True)
    default.write_text('desk = "front-desk"\n')
    assert (load().desk, load().source) == ("front-desk", str(default))
    # An explicit path, as an argument or in $PROVISIONER_CONFIG, must exist.
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert info.value.one_line().startswith(f"configuration file {missing} does not exist")
    monkeypatch.setenv("PROVISIONER_CONFIG", str(missing))
    with pytest.raises(ConfigError) as info:
        load()
    assert info.value.one_line().startswith(f"configuration file {missing} does not exist")


def test_flags_override_the_file() -> None:
    config = override(Config(), token={"reader": "Yubico"}, log_level="debug")
    assert config.token.reader == "Yubico"
    assert config.log_level == "debug"


def test_password_file_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "oath-password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    config = override(Config(), token={"oath_password_file": str(secret)})
    with pytest.raises(ConfigError) as info:
        config.oath_password()
    assert "hunter2" not in info.value.one_line()
    secret.chmod(0o600)
    assert config.oath_password() == "hunter2"
