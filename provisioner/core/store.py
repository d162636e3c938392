"""The desk's store, as a port: the queue, the enrollments with their write-ahead journal,
the credentials to remove from tokens when next seen, and the append-only audit trail.

The daemon, the CLI's direct mode, recovery and reconcile use ``DeskStore`` and the typed
records here, never an adapter's rows. SQLite (``adapters/sqlite_store.py``) is the one
adapter today; another (a fleet's database) is a new module and one line of wiring in
``desk.py``. The enums' values are the strings the store keeps, so a state file written
before they existed reads the same.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Protocol, Self

from provisioner.core.errors import ProvisionerError, StoreError
from provisioner.core.messages import Outcome
from provisioner.core.ports import Fact
from provisioner.core.roster import Roster


class DeviceState(StrEnum):
    """What the journal knows of an enrollment's virtual MFA device."""

    NONE = "none"
    MAYBE = "maybe"  # requested: the answer may have been lost
    CREATED = "created"
    MAYBE_ENABLED = "maybe enabled"
    ENABLED = "enabled"
    CONFIRMED = "confirmed"
    DELETED = "deleted"

    @property
    def may_exist(self) -> bool:
        return self not in (DeviceState.NONE, DeviceState.DELETED)


class CredentialState(StrEnum):
    """What the journal knows of an enrollment's credential on the token."""

    NONE = "none"
    MAYBE = "maybe"
    WRITTEN = "written"
    DELETED = "deleted"

    @property
    def may_exist(self) -> bool:
        return self in (CredentialState.MAYBE, CredentialState.WRITTEN)


#: The state each journal fact leaves the record in.
FACT_STATES: Mapping[Fact, DeviceState | CredentialState] = {
    Fact.DEVICE_REQUESTED: DeviceState.MAYBE,
    Fact.DEVICE_CREATED: DeviceState.CREATED,
    Fact.CREDENTIAL_REQUESTED: CredentialState.MAYBE,
    Fact.CREDENTIAL_WRITTEN: CredentialState.WRITTEN,
    Fact.ENABLE_REQUESTED: DeviceState.MAYBE_ENABLED,
    Fact.ENABLED: DeviceState.ENABLED,
    Fact.CONFIRMED: DeviceState.CONFIRMED,
    Fact.DEVICE_DEACTIVATED: DeviceState.CREATED,
    Fact.DEVICE_DELETED: DeviceState.DELETED,
    Fact.CREDENTIAL_DELETED: CredentialState.DELETED,
}


class RequestKind(StrEnum):
    """What a queued request asks for when its token is plugged in."""

    ENROLL = "enroll"
    RESYNC = "resync"
    REPLACE = "replace"


class RequestState(StrEnum):
    WAITING = "waiting"
    TAKEN = "taken"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    WITHDRAWN = "withdrawn"


#: Outcomes of an enrollment that left the user enrolled.
ENROLLED_OUTCOMES = frozenset({Outcome.ENROLLED, Outcome.ALREADY_ENROLLED})


class Row(Protocol):
    """A row of an adapter's table, as its driver hands it out (a dict, sqlite3.Row)."""

    def keys(self) -> Collection[str]: ...

    def __getitem__(self, name: str) -> Any: ...


@dataclass(frozen=True)
class _Record:
    @classmethod
    def from_row(cls, row: Row) -> Self:
        """From a row of an adapter's table: anything with ``keys()`` and ``row[name]``
        (a dict, sqlite3.Row); columns the record does not know are ignored."""
        names = set(row.keys())
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in names})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class QueueEntry(_Record):
    id: int
    user: str
    serial: int | None
    requested_by: str
    requested_at: float
    state: RequestState
    kind: RequestKind = RequestKind.ENROLL
    old_serial: int | None = None
    #: A client follows it to its end (`provisioner enroll`, not `queue`): when that
    #: client is gone for good (a daemon restart), so is the request.
    followed: bool = False
    #: The accounts to enroll in, ``a,b`` ('': every account the desk serves).
    accounts: str = ""
    #: The desk it waits for (None: any desk of the fleet), and the desk that took it.
    desk: str | None = None
    taken_by: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RequestState(self.state))
        object.__setattr__(self, "kind", RequestKind(self.kind))
        object.__setattr__(self, "followed", bool(self.followed))


@dataclass(frozen=True)
class EnrollmentRecord(_Record):
    """One enrollment and its journal: what may exist in IAM and on the token."""

    id: int
    user: str
    serial: int | None
    reader: str
    source: str
    started_at: float
    step: str
    outcome: str = Outcome.IN_PROGRESS
    finished_at: float | None = None
    device_arn: str | None = None
    reason: str | None = None
    credential_id: str | None = None
    device_state: DeviceState = DeviceState.NONE
    credential_state: CredentialState = CredentialState.NONE
    #: The owning process's token (None: recorded before owners existed) and its pid.
    owner: str | None = None
    owner_pid: int | None = None
    #: The account's name ('': the desk's own), and the first record of the enrollment
    #: in several accounts this one belongs to (None: alone).
    account: str = ""
    batch: int | None = None
    #: The desk that ran it.
    desk: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_state", DeviceState(self.device_state))
        object.__setattr__(self, "credential_state", CredentialState(self.credential_state))

    @property
    def enrolled(self) -> bool:
        return self.outcome in ENROLLED_OUTCOMES


@dataclass(frozen=True)
class TokenCleanup(_Record):
    """A credential to remove from a token the next time it is plugged in."""

    id: int
    serial: int
    credential_id: str
    enrollment_id: int | None
    reason: str
    created_at: float
    done_at: float | None = None


@dataclass(frozen=True)
class AuditRecord(_Record):
    id: int
    at: float
    actor: str
    event: str
    user: str | None
    serial: int | None
    device_arn: str | None
    outcome: str | None
    reason: str | None
    account: str | None = None
    #: The desk that wrote it, and its place in that desk's hash chain (core/audit.py):
    #: the hash of the desk's record before it, and its own.
    desk: str | None = None
    prev_hash: str | None = None
    hash: str | None = None


class InventoryState(StrEnum):
    """A token's life in the fleet's inventory."""

    BLANK = "blank"  # seen, holding none of the desks' credentials
    ENROLLED = "enrolled"
    REVOKED = "revoked"  # its devices gone; a credential may still be on it
    WIPED = "wiped"  # the revoked credential removed from it too
    LOST = "lost"  # reported lost: everything it held revoked


@dataclass(frozen=True)
class TokenRecord(_Record):
    """One token of the inventory: where and when it last changed."""

    serial: int
    state: InventoryState
    #: ``;``-separated: the users and the accounts it holds credentials of.
    users: str
    accounts: str
    firmware: str | None
    desk: str | None
    changed_at: float
    first_seen_at: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", InventoryState(self.state))


#: A desk beats every 10 s; one whose last beat is older than this is silent (dead or cut
#: off), and another desk may settle its records.
SILENT_AFTER = 30.0


@dataclass(frozen=True)
class DeskBeat(_Record):
    """A desk of the fleet as its last heartbeat said: what it is and what it does."""

    name: str
    version: str
    pid: int
    started_at: float
    beat_at: float
    #: JSON: {"readers": [...], "tokens": n, "working": [...], "last_outcome": {...}}
    status: str = "{}"
    stopped_at: float | None = None

    def silent_for(self, now: float) -> float:
        return max(0.0, now - self.beat_at)

    def state(self, now: float) -> str:
        """ "stopped" (said so on its way out), "silent" or "alive"."""
        if self.stopped_at is not None:
            return "stopped"
        return "silent" if self.silent_for(now) > SILENT_AFTER else "alive"


#: A fact with what it names: (fact, device_arn, credential_id).
FactEntry = tuple[Fact, str | None, str | None]


class RecordsFacts(Protocol):
    def record_fact(
        self,
        enrollment_id: int,
        fact: Fact,
        *,
        device_arn: str | None = None,
        credential_id: str | None = None,
    ) -> None: ...

    def record_facts(self, enrollment_id: int, facts: Sequence[FactEntry]) -> None:
        """Several facts, in order, in one write (the record as if each was written)."""
        ...


#: Facts written before their side effect: one the store cannot take stops the step
#: (nothing may exist that the journal does not say may exist).
BEFORE_FACTS = frozenset({Fact.DEVICE_REQUESTED, Fact.CREDENTIAL_REQUESTED, Fact.ENABLE_REQUESTED})


class EnrollmentJournal:
    """The Journal port of one enrollment, written to its record: what an adapter's
    ``journal()`` hands out.

    A fact that says what was done (written after its side effect) and that the store
    cannot take now (the fleet's database restarting) is kept, in order, and written
    with the next fact, or by ``flush``: the enrollment goes on to its end or its
    rollback rather than leaving a side effect unundone. A fact written before its side
    effect is never kept: the store refusing it stops the step (StoreError).

    ``defer_after``: facts of what was done are always kept until the next fact written
    before a side effect (one write for both) or ``flush``, which the owner must call
    at the end. A crash in between leaves the record saying only what may exist, which
    recovery looks at anyway: nothing is lost, and a round trip to the store is saved
    per step.
    """

    def __init__(
        self, store: RecordsFacts, enrollment_id: int, *, defer_after: bool = False
    ) -> None:
        self._store = store
        self._id = enrollment_id
        self._defer = defer_after
        self._pending: list[FactEntry] = []

    @property
    def pending(self) -> int:
        """Facts not yet in the store."""
        return len(self._pending)

    def record(
        self, fact: Fact, *, device_arn: str | None = None, credential_id: str | None = None
    ) -> None:
        entry = (fact, device_arn, credential_id)
        if self._defer and fact not in BEFORE_FACTS:
            self._pending.append(entry)
            return
        try:
            self._store.record_facts(self._id, [*self._pending, entry])
        except StoreError:
            if fact in BEFORE_FACTS:
                raise
            self._pending.append(entry)
            return
        self._pending.clear()

    def flush(self) -> None:
        """Write the facts kept; StoreError (and they stay kept) if the store still refuses."""
        if self._pending:
            self._store.record_facts(self._id, list(self._pending))
            self._pending.clear()


class RecordOwner(Protocol):
    """The process an enrollment record belongs to (``adapters/ownership.Owner``)."""

    token: str
    pid: int


class DeskStore(Protocol):
    """Everything the desk keeps. Every method is atomic; implementations are
    thread-safe (the daemon's token workers share one). An adapter that cannot open,
    read or write its store raises StoreError (its own error kept as the cause)."""

    # the queue
    def enqueue(
        self,
        user: str,
        requested_by: str,
        serial: int | None = None,
        *,
        kind: RequestKind = RequestKind.ENROLL,
        old_serial: int | None = None,
        followed: bool = False,
        limit: int | None = None,
        accounts: str = "",
        desk: str | None = None,
    ) -> QueueEntry: ...

    def waiting(self, limit: int | None = None) -> list[QueueEntry]: ...

    def queue_length(self, up_to: int | None = None) -> int: ...

    def queue_entry(self, entry_id: int) -> QueueEntry | None: ...

    def take_next(
        self, serial: int | None, *, users: Collection[str] | None = None
    ) -> QueueEntry | None: ...

    def finish_entry(
        self, entry_id: int, state: RequestState, enrollment_id: int | None
    ) -> None: ...

    def cancel(self, entry_id: int, actor: str) -> QueueEntry | None: ...

    def withdraw(self, entry_id: int) -> QueueEntry | None: ...

    def link_entry(self, entry_id: int, enrollment_id: int) -> None: ...

    def settle_taken(self) -> tuple[int, int]: ...

    # enrollments and their journal
    def start_enrollment(
        self,
        user: str,
        serial: int | None,
        reader: str,
        source: str,
        *,
        owner: RecordOwner | None = None,
    ) -> int: ...

    def start_enrollments(
        self,
        users: Sequence[tuple[str, str]],
        serial: int | None,
        reader: str,
        source: str,
        *,
        owner: RecordOwner | None = None,
    ) -> list[int]:
        """One record per (account, user), created together, settled together."""
        ...

    def claim_enrollment(
        self, enrollment_id: int, previous: str | None, owner: RecordOwner | None = None
    ) -> bool: ...

    def release_enrollment(self, enrollment_id: int) -> None: ...

    def attach_token(self, enrollment_id: int, serial: int | None, reader: str) -> None:
        """The token of a record started before its plug (work done ahead): from now on
        recovery looks for its credential on that token."""
        ...

    def record_step(self, enrollment_id: int, step: str, device_arn: str | None = None) -> None: ...

    def finish_enrollment(
        self,
        enrollment_id: int,
        *,
        outcome: Outcome,
        actor: str,
        device_arn: str | None = None,
        reason: str | None = None,
    ) -> None: ...

    def journal(self, enrollment_id: int, *, defer_after: bool = False) -> EnrollmentJournal:
        """The record's journal (``defer_after``: see EnrollmentJournal)."""
        ...

    def record_fact(
        self,
        enrollment_id: int,
        fact: Fact,
        *,
        device_arn: str | None = None,
        credential_id: str | None = None,
    ) -> None: ...

    def record_facts(self, enrollment_id: int, facts: Sequence[FactEntry]) -> None: ...

    def enrollment(self, enrollment_id: int) -> EnrollmentRecord | None: ...

    def unfinished_enrollments(self, desk: str | None = None) -> list[EnrollmentRecord]:
        """This desk's unfinished records, or another (dead) desk's."""
        ...

    def left_behind(self) -> set[str]: ...

    # credentials to remove from tokens
    def add_token_cleanup(
        self, serial: int, credential_id: str, enrollment_id: int | None, reason: str
    ) -> None: ...

    def token_cleanups(self, serial: int | None = None) -> list[TokenCleanup]: ...

    def finish_token_cleanup(self, cleanup_id: int, actor: str, outcome: str) -> None: ...

    # the audit trail
    def audit(
        self,
        actor: str,
        event: str,
        *,
        user: str | None = None,
        serial: int | None = None,
        device_arn: str | None = None,
        outcome: str | None = None,
        reason: str | None = None,
        account: str | None = None,
    ) -> None: ...

    def audit_resync(
        self,
        actor: str,
        user: str,
        serial: int | None,
        outcome: tuple[str, int] | ProvisionerError,
    ) -> None: ...

    def history(
        self,
        *,
        limit: int = 100,
        since: float | None = None,
        user: str | None = None,
        serial: int | None = None,
        account: str | None = None,
        desk: str | None = None,
    ) -> list[AuditRecord]: ...

    # the fleet's roster (`provisioner roster load`): serial -> user, accounts
    def load_roster(self, roster: Roster, actor: str) -> int:
        """Replace the fleet's roster with ``roster`` (validated); how many entries."""
        ...

    def take_rostered(self, serial: int) -> tuple[str, str] | None:
        """The (user, accounts) the fleet's roster names for this serial, taken by this
        desk (None: not rostered, or another desk has taken it)."""
        ...

    def release_rostered(self, serial: int) -> None:
        """A rostered token this desk took and did not enroll: free for any desk again."""
        ...

    def roster_size(self) -> int: ...

    # the token inventory (kept by the store from what it records; seen and lost told)
    def token_seen(self, serial: int, firmware: str) -> None: ...

    def mark_lost(self, serial: int, actor: str, reason: str) -> None: ...

    def inventory(
        self, *, user: str | None = None, serial: int | None = None
    ) -> list[TokenRecord]: ...

    # the fleet's desks
    def heartbeat(
        self, version: str, pid: int, started_at: float, status: str, *, stopped: bool = False
    ) -> None:
        """This desk's heartbeat: who it is, since when, and what it does now (JSON)."""
        ...

    def desks(self) -> list[DeskBeat]:
        """Every desk that ever beat, by name."""
        ...

    def audit_trail(self, after: int = 0, limit: int = 10_000) -> list[AuditRecord]:
        """The whole trail in order, ``limit`` records after record #``after``: what
        ``history --verify`` walks."""
        ...

    def close(self) -> None: ...
