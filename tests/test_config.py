import os
from pathlib import Path

import pytest

from provisioner import config as config_module
from provisioner.config import Config, load, override, parse
from provisioner.core.errors import ConfigError, InvalidInput

EXAMPLE = Path(__file__).parent.parent / "provisioner.toml.example"


def test_the_shipped_example_is_valid_and_matches_the_defaults() -> None:
    config = parse(EXAMPLE.read_text(), str(EXAMPLE))
    defaults = Config()
    assert config.token == defaults.token
    assert config.iam.device_path == defaults.iam.device_path
    assert config.enrollment == defaults.enrollment


def test_the_examples_accounts_parse_when_uncommented() -> None:
    text = EXAMPLE.read_text()
    part = text[text.index("# [[accounts]]") :]
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and not line.startswith("# #") else ""
        for line in part.splitlines()
    )
    config = parse(uncommented, "example")
    assert [a.name for a in config.accounts] == ["prod", "staging", "sandbox"]
    prod = config.accounts[0]
    assert prod.role_arn == "arn:aws:iam::111111111111:role/provisioner-desk"
    assert prod.external_id == "desk-berlin-7f3a"
    assert config.enrollment_settings(prod).issuer == "AWS prod"
    assert config.select_accounts("sandbox,prod") == (prod, config.accounts[2])


def test_no_accounts_is_the_desks_own_account_as_before() -> None:
    config = parse("", "x")
    assert config.accounts == ()
    assert config.select_accounts(None) == ()
    assert config.enrollment_settings().issuer == "AWS"
    with pytest.raises(InvalidInput, match="serves no \\[\\[accounts\\]\\]"):
        config.select_accounts("prod")


def test_an_accounts_overrides_and_user_template() -> None:
    config = parse(
        '[iam]\ntags = {team = "it"}\n[[accounts]]\nname = "dev"\nuser_name = "{user}.dev"\n'
        'device_path = "/mfa/dev/"\nissuer = "Dev AWS"\ntags = {env = "dev"}\n',
        "x",
    )
    dev = config.accounts[0]
    settings = config.enrollment_settings(dev)
    assert (settings.issuer, settings.device_path) == ("Dev AWS", "/mfa/dev/")
    assert dict(settings.extra_tags) == {"team": "it", "env": "dev"}
    assert dev.iam_user("alice") == "alice.dev"
    with pytest.raises(InvalidInput, match="unknown account 'prod'; this desk serves dev"):
        config.select_accounts("prod")


ROLE = "arn:aws:iam::111111111111:role/r"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[[accounts]]\nrole_arn = ""\n', "accounts[1] needs a name"),
        ('[[accounts]]\nname = "pr od"\n', "accounts[1].name: 'pr od' is not a valid account"),
        (
            '[[accounts]]\nname = "a"\n[[accounts]]\nname = "a"\n',
            "accounts[2].name: account a is configured twice",
        ),
        ('[[accounts]]\nname = "a"\nrole_arn = "arn:aws:iam::1:user/x"\n', "accounts[1].role_arn"),
        (
            '[[accounts]]\nname = "a"\nexternal_id = "xyz"\n',
            "external_id is set without a role_arn",
        ),
        (
            f'[[accounts]]\nname = "a"\nrole_arn = "{ROLE}"\nexternal_id = "x"\n',
            "external_id must be 2 to 1224",
        ),
        ('[[accounts]]\nname = "a"\ncolour = "red"\n', "unknown key accounts[1].colour"),
        ('[[accounts]]\nname = "a"\nuser_name = "{usr}"\n', "bad template '{usr}'"),
        (
            '[[accounts]]\nname = "a"\nuser_name = "{user} x"\n',
            "account a: 'user x' is not a valid IAM user name",
        ),
        ("accounts = 3\n", "accounts must be an array of tables"),
        (
            '[[accounts]]\nname = "a"\nissuer = "AWS"\naccount_name = "{user}"\n'
            '[[accounts]]\nname = "b"\nissuer = "AWS"\naccount_name = "{user}"\n',
            "accounts a and b would write credentials of one name",
        ),
    ],
)
def test_account_mistakes_are_named(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "x")
    assert fragment in caught.value.one_line()


def test_readers_the_desk_serves() -> None:
    every = parse("", "x").daemon
    assert every.serves_reader("anything")
    some = parse('[daemon]\nreaders = ["OTP+FIDO+CCID 00 00", "*vpcd*1"]\n', "x").daemon
    assert some.serves_reader("Yubico YubiKey OTP+FIDO+CCID 00 00")
    assert some.serves_reader("Virtual PCD vpcd 00 01")
    assert not some.serves_reader("Yubico YubiKey OTP+FIDO+CCID 01 00")
    with pytest.raises(ConfigError, match="daemon.readers must be a list of non-empty strings"):
        parse('[daemon]\nreaders = "all"\n', "x")


def test_the_store_is_sqlite_unless_a_url_names_the_fleets_database(tmp_path: Path) -> None:
    assert parse("", "x").store.url == ""
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    config = parse(f'[store]\nurl = "postgresql://d@db/p"\npassword_file = "{password}"\n', "x")
    assert config.store.password() == "s3cret"
    with pytest.raises(ConfigError, match="unknown key store.uri"):
        parse('[store]\nuri = "x"\n', "x")


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
        ("[enrollment]\nmargin_seconds = -1", "margin_seconds must be a number from 0"),
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
    secret.chmod(0o620)  # group-writable: someone could have put a password there
    with pytest.raises(ConfigError) as info:
        config.oath_password()
    assert f"chmod 600 {secret}" in info.value.one_line()


# --- numbers: each numeric key declares its type and range (finite, bounded) ---------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[iam]\nmax_attempts = 2.9", "iam.max_attempts must be a whole number"),
        ("[iam]\nmax_attempts = 0", "iam.max_attempts must be a whole number from 1 to"),
        ("[iam]\nmax_attempts = 1000000", "iam.max_attempts must be a whole number from 1 to"),
        ("[iam]\nmax_attempts = true", "iam.max_attempts must be a whole number"),
        ("[iam]\nmax_attempts = inf", "iam.max_attempts must be a whole number"),
        ("[iam]\nconnect_timeout = nan", "iam.connect_timeout must be a finite number"),
        ("[iam]\nconnect_timeout = 0", "iam.connect_timeout must be a number above 0"),
        ("[iam]\nread_timeout = -inf", "iam.read_timeout must be a finite number"),
        ("[iam]\nread_timeout = 1e300", "iam.read_timeout must be a number above 0 and at most"),
        ("[daemon]\nshutdown_timeout = inf", "daemon.shutdown_timeout must be a finite number"),
        ("[daemon]\nshutdown_timeout = -1", "daemon.shutdown_timeout must be a number from 0 to"),
        ("[daemon]\nshutdown_timeout = 'soon'", "daemon.shutdown_timeout must be a number"),
        ("[daemon]\nshutdown_timeout = false", "daemon.shutdown_timeout must be a number"),
        ("[token]\nreinsert_timeout = nan", "token.reinsert_timeout must be a finite number"),
        ("[token]\nreinsert_timeout = 1e9", "token.reinsert_timeout must be a number from 0 to"),
        (
            "[enrollment]\nenable_attempts = 1.5",
            "enrollment.enable_attempts must be a whole number",
        ),
        ("[enrollment]\nenable_attempts = 0", "enrollment.enable_attempts must be a whole number"),
        ("[enrollment]\nskew_warning_seconds = inf", "enrollment.skew_warning_seconds must be a"),
        (
            "[enrollment]\nmargin_seconds = 25",
            "enrollment.margin_seconds must be a number from 0 to below 25",
        ),
        (
            "[daemon]\nmetrics_listen = '127.0.0.1:９４６４'",
            "daemon.metrics_listen '127.0.0.1:９４６４' is not",
        ),
        (
            "[daemon]\nmetrics_listen = '127.0.0.1:+9464'",
            "daemon.metrics_listen '127.0.0.1:+9464' is not",
        ),
        (
            "[daemon]\nmetrics_listen = '127.0.0.1:9_464'",
            "daemon.metrics_listen '127.0.0.1:9_464' is not",
        ),
    ],
)
def test_numbers_are_finite_whole_where_meant_and_in_range(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "t.toml")
    assert info.value.one_line().startswith(fragment)


def test_numbers_in_range_are_taken_with_their_type() -> None:
    config = parse(
        "[iam]\nmax_attempts = 1\nconnect_timeout = 2\n[daemon]\nshutdown_timeout = 0\n", "t.toml"
    )
    assert config.iam.max_attempts == 1 and isinstance(config.iam.max_attempts, int)
    assert config.iam.connect_timeout == 2.0 and isinstance(config.iam.connect_timeout, float)
    assert config.daemon.shutdown_timeout == 0.0


def test_every_numeric_key_declares_its_range() -> None:
    """A key added later (a client cap, a queue bound) is checked like the others."""
    from dataclasses import fields

    from provisioner.config import SECTIONS, Bounds

    numeric = 0
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                numeric += 1
                bounds = f.metadata.get("bounds")
                assert isinstance(bounds, Bounds), f"{name}.{f.name} declares no range"
                assert bounds.admits(f.default), f"{name}.{f.name}'s default is out of range"
    assert numeric >= 8


# --- files others could have written are refused (configuration, roster, password) --------


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646, 0o622, 0o660])
def test_a_configuration_file_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "provisioner.toml"
    path.write_text('desk = "d"\n')
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        load(path)
    line = info.value.one_line()
    assert line.startswith(f"the configuration file {path} is writable by others")
    assert f"chmod go-w {path}" in line


def test_a_roster_others_may_write_is_refused(tmp_path: Path) -> None:
    from provisioner.adapters.files import load_roster

    path = tmp_path / "roster.csv"
    path.write_text("serial,user\n1,alice\n")
    path.chmod(0o664)
    with pytest.raises(ConfigError) as info:
        load_roster(path)
    assert info.value.one_line().startswith(f"the roster {path} is writable by others")
    path.chmod(0o644)
    assert len(load_roster(path)) == 1


def test_a_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    from provisioner.adapters.files import read_trusted

    path = tmp_path / "provisioner.toml"
    path.write_text('desk = "d"\n')
    path.chmod(0o644)
    assert read_trusted(path, "the configuration file") == b'desk = "d"\n'
    mine = os.stat(path).st_uid
    with pytest.raises(ConfigError) as info:
        read_trusted(path, "the configuration file", owners=(mine + 1,))
    line = info.value.one_line()
    assert line.startswith(f"the configuration file {path} is owned by uid {mine}")
    assert f"chown root {path}" in line


def test_the_refusal_is_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from provisioner.cli.main import main

    path = tmp_path / "provisioner.toml"
    path.write_text('desk = "d"\n')
    path.chmod(0o666)
    assert main(["status", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "chmod go-w" in err[0]
