"""A desk: the real adapters wired together from the configuration.

The CLI, the demo and (later) the daemon build their IAM client and AWS clock here, so
that all of them enroll the same way.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from provisioner.adapters.aws.iam import AssumedRole, CallObserver, IamClient
from provisioner.adapters.ownership import alive
from provisioner.adapters.sqlite_schema import STATE_FILE
from provisioner.adapters.sqlite_store import SqliteStore
from provisioner.adapters.yubikey import find_by_serial
from provisioner.config import AccountConfig, Config
from provisioner.core.accounts import (
    Account,
    AccountPlan,
    AccountProgress,
    AccountsEnrollment,
)
from provisioner.core.clock import AwsClock
from provisioner.core.enrollment import Enrollment, EnrollmentSettings
from provisioner.core.errors import ConfigError
from provisioner.core.lifecycle import InAccount, Lifecycle
from provisioner.core.ports import Journal, NullProgress, Progress
from provisioner.core.recovery import AccountDirectory, Recovery
from provisioner.core.store import DeskStore, RecordOwner

log = logging.getLogger("provisioner")


def state_file(config: Config) -> Path:
    """Where the desk's store keeps its state (the SQLite file in the state directory)."""
    return config.daemon.state_path() / STATE_FILE


def desk_store(
    config: Config, *, owner: RecordOwner | None = None, read_only: bool = False
) -> DeskStore:
    """The desk's store: the one place that picks its adapter: SQLite in the state
    directory, or the fleet's PostgreSQL database when ``[store] url`` names one."""
    if not config.store.url:
        return SqliteStore(state_file(config), owner=owner, read_only=read_only, desk=config.desk)
    store: DeskStore = postgres().PostgresStore(
        config.store.url, owner=owner, password=config.store.password(), desk=config.desk
    )
    return store


def postgres(module: str = "postgres_store") -> ModuleType:
    """The PostgreSQL adapter (or its importer, ``postgres_import``), imported only where
    a fleet is configured (psycopg is an extra: ``pip install 'provisioner[fleet]'``)."""
    try:
        return importlib.import_module(f"provisioner.adapters.{module}")
    except ImportError as e:
        raise ConfigError(
            f"[store] url names a PostgreSQL database but psycopg is not installed ({e.name})",
            hint="pip install 'provisioner[fleet]'",
        ) from None


@dataclass(frozen=True)
class Desk:
    config: Config
    clock: AwsClock
    iam: IamClient
    #: The directories of the accounts the desk serves, made on first use (a role's
    #: session is assumed on its first call). The daemon's workers share them.
    _directories: dict[str, IamClient] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _call_observers: list[CallObserver] = field(default_factory=list, repr=False)
    _throttle_observers: list[Callable[[str], None]] = field(default_factory=list, repr=False)

    def observe_calls(
        self, calls: CallObserver, throttled: Callable[[str], None] | None = None
    ) -> None:
        """Tell the metrics of every directory's calls (the desk's own and every
        account's, made now or later) and of each answer that was throttled."""
        with self._lock:
            self._call_observers.append(calls)
            if throttled is not None:
                self._throttle_observers.append(throttled)
            for client in (self.iam, *self._directories.values()):
                client.observe_calls(calls)
                if throttled is not None:
                    client.observe_throttling(throttled)

    @classmethod
    def from_config(cls, config: Config) -> Desk:
        clock = AwsClock(
            on_skew=lambda s: log.warning(
                "the desk's clock is %.1f s %s AWS's; codes follow AWS's clock",
                abs(s),
                "behind" if s > 0 else "ahead of",
            ),
            skew_warning=config.enrollment.skew_warning_seconds,
        )
        iam = IamClient(
            clock,
            profile=config.iam.profile or None,
            region=config.iam.region or None,
            endpoint_url=config.iam.endpoint_url or None,
            max_attempts=config.iam.max_attempts,
            connect_timeout=config.iam.connect_timeout,
            read_timeout=config.iam.read_timeout,
        )
        return cls(config, clock, iam)

    def directory(self, account: AccountConfig | None) -> IamClient:
        """The directory of ``account``: the desk's own (``iam``) without a role to
        assume, else one client per account over the role's refreshed session."""
        if account is None or not account.role_arn:
            return self.iam
        with self._lock:
            client = self._directories.get(account.name)
            if client is None:
                iam = self.config.iam
                client = IamClient(
                    self.clock,
                    profile=iam.profile or None,
                    region=iam.region or None,
                    endpoint_url=iam.endpoint_url or None,
                    max_attempts=iam.max_attempts,
                    connect_timeout=iam.connect_timeout,
                    read_timeout=iam.read_timeout,
                    role=AssumedRole(
                        account.name, account.role_arn, account.external_id, self.config.desk
                    ),
                    base=self.iam.base_session,
                )
                for observer in self._call_observers:
                    client.observe_calls(observer)
                for throttled in self._throttle_observers:
                    client.observe_throttling(throttled)
                self._directories[account.name] = client
            return client

    def recovery(self, store: DeskStore, oath_password: str | None) -> Recovery:
        """What settles unfinished enrollments, with the journal in ``store``; their
        owners' locks live beside it."""
        return Recovery(
            self.iam,
            store,
            lambda eid: self.enrollment(journal=store.journal(eid)),
            lambda serial: find_by_serial(serial, oath_password=oath_password),
            device_path=self.config.iam.device_path,
            desk=self.config.desk,
            owner_alive=lambda owner: alive(self.config.daemon.state_path(), owner),
            now=self.clock.now,
            min_age=self.config.daemon.orphan_min_age,
            accounts={a.name: self._recovery_account(a, store) for a in self.config.accounts},
        )

    def _recovery_account(self, account: AccountConfig, store: DeskStore) -> AccountDirectory:
        return AccountDirectory(
            self.directory(account),
            self.config.enrollment_settings(account).device_path,
            lambda eid: self.account_enrollment(account, journal=store.journal(eid)),
        )

    def lifecycle(self, progress: Progress | None = None) -> Lifecycle:
        """Revoke, resync, replace: with the same settings the enrollments use."""
        return Lifecycle(self.iam, self.clock, self.config.enrollment_settings(), progress)

    def enrollment(
        self, progress: Progress | None = None, journal: Journal | None = None
    ) -> Enrollment:
        return Enrollment(
            self.iam, self.clock, self.config.enrollment_settings(), progress, journal
        )

    # --- several accounts ([[accounts]]) -------------------------------------------------

    def every_settings(self) -> list[EnrollmentSettings]:
        """The settings of every account the desk serves (its own when it names none):
        how its credentials on a token are named."""
        if not self.config.accounts:
            return [self.config.enrollment_settings()]
        return [self.config.enrollment_settings(a) for a in self.config.accounts]

    def lifecycles(
        self, person: str, accounts: Sequence[AccountConfig], progress: Progress | None = None
    ) -> list[InAccount]:
        """Revoke and resync in each of ``accounts``, as ``person``'s user there."""
        return [
            InAccount(
                a.name,
                a.iam_user(person),
                Lifecycle(
                    self.directory(a),
                    self.clock,
                    self.config.enrollment_settings(a),
                    AccountProgress(progress or NullProgress(), a.name),
                ),
            )
            for a in accounts
        ]

    def account_plans(self, person: str, accounts: Sequence[AccountConfig]) -> list[AccountPlan]:
        """Each account with the IAM user ``person`` is there (its user_name template)."""
        return [AccountPlan(a.name, a.iam_user(person)) for a in accounts]

    def account_enrollment(
        self,
        account: AccountConfig,
        progress: Progress | None = None,
        journal: Journal | None = None,
    ) -> Enrollment:
        """One account's enrollment: its directory (the role assumed there), its settings."""
        return Enrollment(
            self.directory(account),
            self.clock,
            self.config.enrollment_settings(account),
            progress,
            journal,
        )

    def accounts_enrollment(
        self,
        person: str,
        accounts: Sequence[AccountConfig],
        progress: Progress | None,
        journal: Callable[[str], Journal],
    ) -> AccountsEnrollment:
        """``person`` enrolled in every one of ``accounts`` at once, each account's steps
        written to ``journal(name)``."""
        progress = progress or NullProgress()
        return AccountsEnrollment(
            [
                Account(
                    a.name,
                    a.iam_user(person),
                    self.account_enrollment(a, AccountProgress(progress, a.name), journal(a.name)),
                )
                for a in accounts
            ],
            self.clock,
            progress,
            margin=self.config.enrollment.margin_seconds,
        )
