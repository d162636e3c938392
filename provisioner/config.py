"""The desk's configuration: one TOML file, loaded once and passed in.

Unknown keys are errors (a typo must not silently fall back to a default). The reference
with every key and its default is provisioner.toml.example.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from provisioner.adapters.files import read_trusted
from provisioner.core import validation
from provisioner.core.enrollment import EnrollmentSettings
from provisioner.core.errors import ConfigError, InvalidInput
from provisioner.core.ports import render_template

DEFAULT_PATH = Path("/etc/provisioner/provisioner.toml")
ENV_PATH = "PROVISIONER_CONFIG"


@dataclass(frozen=True)
class Bounds:
    """What a numeric key accepts: a finite number (a whole one where the key is an int)
    from ``minimum`` to ``maximum``, either end excluded when said."""

    minimum: float
    maximum: float
    above_minimum: bool = False
    below_maximum: bool = False

    def admits(self, value: float) -> bool:
        low = value > self.minimum if self.above_minimum else value >= self.minimum
        high = value < self.maximum if self.below_maximum else value <= self.maximum
        return low and high

    def describe(self, whole: bool) -> str:
        low, high = f"{self.minimum:g}", f"{self.maximum:g}"
        if self.above_minimum:
            span = f"above {low} and " + (
                f"below {high}" if self.below_maximum else f"at most {high}"
            )
        else:
            span = f"from {low} to " + (f"below {high}" if self.below_maximum else high)
        return f"{'a whole number' if whole else 'a number'} {span}"


def within(
    minimum: float, maximum: float, *, above: bool = False, below: bool = False
) -> dict[str, Bounds]:
    """The range of a numeric key, declared on its field: ``field(default=5,
    metadata=within(1, 20))``. Every numeric key must declare one (a test holds it)."""
    return {"bounds": Bounds(minimum, maximum, above, below)}


@dataclass(frozen=True)
class TokenConfig:
    issuer: str = "AWS"
    account_name: str = "{user}@{account}"
    touch: bool = False
    #: A file holding the OATH password of the desk's tokens (never the password itself).
    oath_password_file: str = ""
    reader: str = ""
    #: Seconds to wait for a pulled token to come back so a rollback can finish.
    reinsert_timeout: float = field(default=60.0, metadata=within(0, 3600))


@dataclass(frozen=True)
class IamConfig:
    profile: str = ""
    region: str = ""
    #: Empty: boto3's own resolution (AWS_ENDPOINT_URL_IAM, AWS_ENDPOINT_URL, AWS).
    endpoint_url: str = ""
    device_path: str = "/provisioner/"
    device_name: str = "{user}.yubikey.{serial}"
    tags: dict[str, str] = field(default_factory=dict)
    max_attempts: int = field(default=5, metadata=within(1, 20))
    connect_timeout: float = field(default=5.0, metadata=within(0, 300, above=True))
    read_timeout: float = field(default=15.0, metadata=within(0, 600, above=True))


@dataclass(frozen=True)
class EnrollmentConfig:
    #: Below one TOTP period (30 s) less the time the codes take to send.
    margin_seconds: float = field(default=5.0, metadata=within(0, 25, below=True))
    skew_warning_seconds: float = field(default=3.0, metadata=within(0, 3600))
    enable_attempts: int = field(default=3, metadata=within(1, 10))


@dataclass(frozen=True)
class StoreConfig:
    """Where the desk keeps its queue, records and audit trail."""

    #: Empty: SQLite in the state directory. A libpq URL: the fleet's PostgreSQL
    #: database, shared by every desk (``postgresql://provisioner_desk@db/provisioner``).
    url: str = ""
    #: A file holding the desk role's password (mode 600); empty: libpq's own
    #: (PGPASSFILE, ~/.pgpass, PGPASSWORD) or none.
    password_file: str = ""

    def password(self) -> str | None:
        if not self.password_file:
            return None
        try:
            data = read_trusted(Path(self.password_file), "store.password_file", secret=True)
        except OSError as e:
            raise ConfigError(
                f"cannot read store.password_file {self.password_file}: {e.strerror}"
            ) from e
        password = data.decode("utf-8", "replace").rstrip("\r\n")
        if not password:
            raise ConfigError(f"store.password_file {self.password_file} is empty")
        return password


@dataclass(frozen=True)
class DaemonConfig:
    #: Where the queue, the enrollment records and the audit trail live.
    #: Empty: $STATE_DIRECTORY (set by systemd's StateDirectory=) or /var/lib/provisioner.
    state_directory: str = ""
    #: The control socket. Empty: $RUNTIME_DIRECTORY/control.sock or
    #: /run/provisioner/control.sock.
    socket: str = ""
    #: Members of this group (and root) may queue, cancel and read the history.
    operators_group: str = "provisioner-operators"
    #: A CSV of token serial -> IAM user for batch desks; empty: no roster.
    roster: str = ""
    #: Seconds SIGTERM waits for enrollments in progress to finish or roll back.
    shutdown_timeout: float = field(default=30.0, metadata=within(0, 3600))
    #: "127.0.0.1:9464" serves Prometheus metrics there (loopback only); empty: off.
    metrics_listen: str = ""
    #: Seconds an unassigned device of this desk must have existed (by its creation-time
    #: tag) before the orphan sweep deletes it: younger, an enrollment may be enabling it.
    orphan_min_age: float = field(default=600.0, metadata=within(0, 30 * 86400))
    #: Clients the control socket serves at once; one more is told so and closed.
    max_clients: int = field(default=64, metadata=within(1, 4096))
    #: Seconds a control client may stay without sending a request line (one following
    #: an enrollment or watching is being sent events: not idle).
    client_idle_timeout: float = field(default=30.0, metadata=within(0, 86400, above=True))
    #: Requests that may wait at once; one more is refused (exit status 6).
    max_queue: int = field(default=1000, metadata=within(1, 1_000_000))
    #: The readers this desk serves: glob patterns of reader names ("*Yubico*00 00*"),
    #: or parts of them; empty: every reader. Two desks can share a machine (or a hub
    #: be split) by serving different readers.
    readers: list[str] = field(default_factory=list)
    #: The next this many enrollment requests (then the roster's tokens not yet enrolled)
    #: have their user checked in IAM while they wait (again every ``ahead_refresh``
    #: seconds): a plugged token then skips that round trip. 0: nothing checked ahead (a
    #: desk with [[accounts]] checks nothing ahead).
    checks_ahead: int = field(default=16, metadata=within(0, 1000))
    #: Of those, the next this many also get their virtual MFA device created ahead
    #: (journaled; deleted when the request is cancelled or served elsewhere, after
    #: ``ahead_ttl``, at shutdown, or by recovery after a crash): the token then waits
    #: only for EnableMFADevice. Each holds a seed in the daemon's memory. 0: none.
    devices_ahead: int = field(default=2, metadata=within(0, 16))
    #: Seconds a device made ahead is kept unused before it is deleted and made again;
    #: kept below orphan_min_age.
    ahead_ttl: float = field(default=540.0, metadata=within(10, 86400))
    #: Seconds after which a user checked ahead is checked again.
    ahead_refresh: float = field(default=60.0, metadata=within(1, 86400))

    def serves_reader(self, name: str) -> bool:
        """Whether a reader of this name is this desk's to serve."""
        if not self.readers:
            return True
        return any(
            fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else p in name
            for p in self.readers
        )

    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the metrics endpoint, None when off; raises ConfigError."""
        if not self.metrics_listen:
            return None
        host, sep, port_text = self.metrics_listen.rpartition(":")
        host = host.strip("[]")
        try:
            port = validation.whole_number(port_text, "a port", minimum=1, maximum=65535)
            loopback = ipaddress.ip_address(host).is_loopback
        except (ValueError, InvalidInput):
            sep = ""
            port, loopback = 0, False
        if not sep:
            raise ConfigError(
                f"daemon.metrics_listen {self.metrics_listen!r} is not HOST:PORT",
                hint='for example metrics_listen = "127.0.0.1:9464"',
            )
        if not loopback:
            raise ConfigError(
                f"daemon.metrics_listen {self.metrics_listen!r} is not a loopback address",
                hint="the endpoint has no authentication: bind 127.0.0.1 and let a local "
                "agent or an authenticating proxy forward it",
            )
        return host, port

    def state_path(self) -> Path:
        base = self.state_directory or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(base or "/var/lib/provisioner")

    def socket_path(self) -> Path:
        if self.socket:
            return Path(self.socket)
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return Path(runtime or "/run/provisioner") / "control.sock"


_ROLE_ARN = re.compile(r"arn:aws[\w-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}", re.ASCII)
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)


@dataclass(frozen=True)
class AccountConfig:
    """One AWS account the desk enrolls users in (``[[accounts]]``). An empty override
    takes the desk's own value ([iam], [token]); the issuer defaults to ``AWS {name}`` so
    that an authenticator app tells the accounts apart."""

    name: str
    #: The role the desk assumes there; empty: the desk's own credentials.
    role_arn: str = ""
    #: Passed to sts:AssumeRole when set (the role's trust policy asks for it).
    external_id: str = field(default="", repr=False)  # kept out of reprs and logs
    #: The IAM user there, from the person's name: ``{user}``, ``{user}.admin``.
    user_name: str = "{user}"
    device_path: str = ""
    device_name: str = ""
    issuer: str = ""
    account_name: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def iam_user(self, user: str) -> str:
        """The IAM user ``user`` is in this account."""
        name = render_template(self.user_name, {"user": user})
        try:
            return validation.user_name(name)
        except InvalidInput as e:
            raise InvalidInput(f"account {self.name}: {e.message}") from None


@dataclass(frozen=True)
class Config:
    desk: str = field(default_factory=socket.gethostname)
    log_level: str = "info"
    token: TokenConfig = field(default_factory=TokenConfig)
    iam: IamConfig = field(default_factory=IamConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    #: The accounts the desk serves; none: its own (the credentials it runs with).
    accounts: tuple[AccountConfig, ...] = ()
    source: str = "built-in defaults"

    def select_accounts(self, names: str | None) -> tuple[AccountConfig, ...]:
        """The accounts named (``prod,dev``), in the configuration's order; every one the
        desk serves for None. InvalidInput for a name it does not serve."""
        if names is None:
            return self.accounts
        wanted = validation.account_names(names).split(",")
        known = {a.name for a in self.accounts}
        if not known:
            raise InvalidInput(
                f"--accounts {names}: this desk serves no [[accounts]], only its own account",
                hint="configure [[accounts]] in the configuration file (provisioner.toml.example)",
            )
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise InvalidInput(
                f"unknown account {unknown[0]!r}; this desk serves "
                + ", ".join(a.name for a in self.accounts)
            )
        return tuple(a for a in self.accounts if a.name in wanted)

    def enrollment_settings(self, account: AccountConfig | None = None) -> EnrollmentSettings:
        """Every enrollment's settings; in ``account``, with its overrides."""
        tags = dict(self.iam.tags)
        if account is None:
            issuer, account_name = self.token.issuer, self.token.account_name
            device_name, device_path = self.iam.device_name, self.iam.device_path
        else:
            issuer = account.issuer or f"AWS {account.name}"
            account_name = account.account_name or self.token.account_name
            device_name = account.device_name or self.iam.device_name
            device_path = account.device_path or self.iam.device_path
            tags |= account.tags
        return EnrollmentSettings(
            desk=self.desk,
            issuer=issuer,
            account_name=account_name,
            touch=self.token.touch,
            device_name=device_name,
            device_path=device_path,
            extra_tags=tuple(sorted(tags.items())),
            margin=self.enrollment.margin_seconds,
            enable_attempts=self.enrollment.enable_attempts,
            reinsert_timeout=self.token.reinsert_timeout,
        )

    def oath_password(self) -> str | None:
        """Read the password file when one is configured; warn-free only if it is private."""
        name = self.token.oath_password_file
        if not name:
            return None
        try:
            data = read_trusted(Path(name), "token.oath_password_file", secret=True)
        except OSError as e:
            raise ConfigError(f"cannot read token.oath_password_file {name}: {e.strerror}") from e
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"token.oath_password_file {name} is not UTF-8") from None
        password = text.rstrip("\r\n")
        if not password:
            raise ConfigError(f"token.oath_password_file {name} is empty")
        return password


_LEVELS = {"debug", "info", "warning", "error"}
SECTIONS: dict[str, type[Any]] = {
    "token": TokenConfig,
    "iam": IamConfig,
    "enrollment": EnrollmentConfig,
    "daemon": DaemonConfig,
    "store": StoreConfig,
}


def _section(cls: type[Any], data: Any, where: str, defaults: Any = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    defaults = defaults if defaults is not None else cls()
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(
                f"unknown key {where}.{key}",
                hint="known keys: " + ", ".join(sorted(known)),
            )
        default = getattr(defaults, key)
        values[key] = _coerce(value, default, f"{where}.{key}", f.metadata.get("bounds"))
    return cls(**values)


def _coerce(value: Any, default: Any, where: str, bounds: Bounds | None) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if isinstance(default, (int, float)):
        if bounds is None:  # pragma: no cover - test_every_numeric_key_declares_its_range
            raise ConfigError(f"{where}: no range declared")
        return _number(value, isinstance(default, int), bounds, where)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where} must be a list of non-empty strings")
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{where} must be a table of strings")
        return dict(value)
    raise ConfigError(f"{where}: unsupported value")  # pragma: no cover


def _number(value: Any, whole: bool, bounds: Bounds, where: str) -> int | float:
    """A numeric key's value, or one line naming the key and what it takes. TOML gives
    int or float; inf and nan are floats, true is not a number here."""
    wanted = bounds.describe(whole)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        raise ConfigError(f"{where} must be {wanted}, not {shown}")
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, float) and not math.isfinite(value) and not whole:
        raise ConfigError(f"{where} must be a finite number ({wanted}), not {shown}")
    if (whole and isinstance(value, float)) or not bounds.admits(value):
        raise ConfigError(f"{where} must be {wanted}, not {shown}")
    return int(value) if whole else float(value)


def parse(text: str, source: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from e
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            top[key] = _section(SECTIONS[key], value, key)
        elif key == "accounts":
            top[key] = _accounts(value)
        elif key in ("desk", "log_level"):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{key} must be a non-empty string")
            top[key] = value
        else:
            raise ConfigError(
                f"unknown key {key} in {source}",
                hint="known: desk, log_level, [token], [iam], [enrollment], [daemon], [store], "
                "[[accounts]]",
            )
    config = Config(**top, source=source)
    check(config)
    return config


def _accounts(data: Any) -> tuple[AccountConfig, ...]:
    """``[[accounts]]``: each a table of strings, its name unique, its role an IAM role's
    ARN, an external id only with a role."""
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise ConfigError("accounts must be an array of tables ([[accounts]])")
    accounts: list[AccountConfig] = []
    for number, table in enumerate(data, start=1):
        where = f"accounts[{number}]"
        if "name" not in table:
            raise ConfigError(f"{where} needs a name", hint='for example name = "prod"')
        account = _section(AccountConfig, table, where, defaults=AccountConfig(name="x"))
        try:
            validation.account_name(account.name)
        except InvalidInput as e:
            raise ConfigError(f"{where}.name: {e.message}") from None
        if any(a.name == account.name for a in accounts):
            raise ConfigError(f"{where}.name: account {account.name} is configured twice")
        if account.role_arn and not _ROLE_ARN.fullmatch(account.role_arn):
            raise ConfigError(
                f"{where}.role_arn {account.role_arn!r} is not an IAM role's ARN",
                hint='for example "arn:aws:iam::111111111111:role/provisioner-desk"',
            )
        if account.external_id and not account.role_arn:
            raise ConfigError(f"{where}.external_id is set without a role_arn to assume")
        if account.external_id and not _EXTERNAL_ID.fullmatch(account.external_id):
            raise ConfigError(
                f"{where}.external_id must be 2 to 1224 of letters, digits and + = , . @ : / -"
            )
        accounts.append(account)
    return tuple(accounts)


def check(config: Config) -> None:
    if config.log_level not in _LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(sorted(_LEVELS))}")
    config.daemon.metrics_address()
    # Render the templates once with sample values so typos fail at start, not mid-desk.
    try:
        config.enrollment_settings().names("user", "123456789012", 12345678)
        for account in config.accounts:
            config.enrollment_settings(account).names("user", "123456789012", 12345678)
            account.iam_user("user")
    except InvalidInput as e:
        raise ConfigError(f"{config.source}: {e.message}") from e
    _no_two_accounts_write_one_credential(config)


def _no_two_accounts_write_one_credential(config: Config) -> None:
    """Two accounts whose credentials would have one name: the second would overwrite
    the first on the token. Refused at load, as the enrollment would refuse it."""
    seen: dict[str, str] = {}
    for number, account in enumerate(config.accounts, start=1):
        settings = config.enrollment_settings(account)
        # each account a different id (as they are): when the issuers agree, the account
        # id in the account_name template is what tells the credentials apart
        probe = settings.names("user", f"{number:012d}", 12345678)[0].credential_id
        if probe in seen:
            raise ConfigError(
                f"accounts {seen[probe]} and {account.name} would write credentials of one "
                f"name ({probe})",
                hint="give each account its own issuer (the default is 'AWS {name}')",
            )
        seen[probe] = account.name


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the configuration: an explicit path must exist; the default path may not."""
    explicit = path is not None or ENV_PATH in os.environ
    chosen = Path(path if path is not None else os.environ.get(ENV_PATH, DEFAULT_PATH))
    try:
        text = read_trusted(chosen, "the configuration file").decode("utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"configuration file {chosen} does not exist") from None
        return Config()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read configuration file {chosen}: {e}") from e
    return parse(text, str(chosen))


def override(config: Config, **changes: Any) -> Config:
    """Flags override the file: ``override(cfg, token={"reader": "x"})``."""
    out = config
    for section, values in changes.items():
        if not values:
            continue
        if isinstance(values, dict):
            out = replace(out, **{section: replace(getattr(out, section), **values)})
        else:
            out = replace(out, **{section: values})
    return out
