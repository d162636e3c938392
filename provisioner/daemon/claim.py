"""Who gets a token: a request for this serial, the roster's user, or the oldest request
for any token that this token may serve.

The policy is two plain functions (``choose`` and ``who_may_take``) that tests call with a
queue and a token's credentials of their own; ``Claims`` hands them the desk's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.errors import (
    TokenError,
)
from provisioner.core.store import QueueEntry
from provisioner.daemon.status import LiveStatus

#: The queue's ``take_next``: the oldest waiting request for this serial (None: for any
#: token), among these users' (None: anyone's), taken so no other token serves it.
Take = Callable[[int | None, Collection[str] | None], QueueEntry | None]
#: Whose requests for any token a token may serve (None: anyone's), and why not others'.
MayTake = tuple[frozenset[str] | None, str | None]


@dataclass(frozen=True)
class Claim:
    """Whom a token serves: a user (by a request, or by the roster), or nobody and why."""

    user: str | None
    entry: QueueEntry | None = None
    source: str = ""
    actor: str = ""
    why_not: str | None = None
    #: The accounts to enroll in (``prod,dev``); '': every account the desk serves.
    accounts: str = ""

    @classmethod
    def of(cls, entry: QueueEntry) -> Claim:
        return cls(
            entry.user, entry, f"queue:{entry.id}", entry.requested_by, accounts=entry.accounts
        )


def choose(
    serial: int | None,
    rostered: str | None,
    take: Take,
    may_take: Callable[[], MayTake],
    rostered_accounts: str = "",
) -> Claim:
    """A request for this very token, else the roster's user (through that user's request
    for any token, if one waits: it is served, not left for the next token), else the
    oldest request for any token that this token may serve. ``may_take`` is asked last,
    and only then: it looks at the token."""
    entry = take(serial, ())
    if entry is not None:
        return Claim.of(entry)
    if rostered is not None:
        entry = take(None, (rostered,))
        if entry is not None:
            return Claim.of(entry)
        return Claim(rostered, None, "roster", "roster", accounts=rostered_accounts)
    users, why_not = may_take()
    entry = take(None, users)
    return Claim.of(entry) if entry is not None else Claim(None, why_not=why_not)


def who_may_take(owners: Mapping[str, str | None], serial: int | None) -> MayTake:
    """Whose requests for any token a token may serve, from this desk's credentials on it
    (each with the user it names, or None): anyone's when it holds none; only its owner's
    enrollment when they are all one user's; nobody's when they are several users' or name
    none. With the reason."""
    if not owners:
        return None, None
    if serial is not None:
        ask = f"queue a request for it with --serial {serial}"
    else:
        ask = "its serial is hidden: enroll it with provisioner enroll --direct"
    users = set(owners.values())
    holds = ", ".join(f"{user or 'an unnamed user'} ({cid})" for cid, user in owners.items())
    why_not = (
        f"holds this desk's credential of {holds}: left alone by requests for any token; {ask}"
    )
    if len(users) == 1 and None not in users:
        return frozenset(u for u in users if u is not None), why_not
    return frozenset(), why_not


class Claims(LiveStatus):
    """DeskService's choice of whose work a token does."""

    def _claim(self, token: YubiKeyToken) -> Claim:
        serial = token.info.serial
        rostered = self.roster.user_for(serial) if self.roster else None
        accounts = self.roster.accounts_for(serial) if self.roster else ""
        if self.roster is None and self.desk.config.store.url and serial is not None:
            # the fleet's roster: taken by this desk, so no other desk serves this serial
            taken = self.store.take_rostered(serial)
            if taken is not None:
                rostered, accounts = taken

        def take(serial: int | None, users: Collection[str] | None) -> QueueEntry | None:
            return self.store.take_next(serial, users=users)

        return choose(serial, rostered, take, lambda: self._who_may_take(token), accounts)

    def _who_may_take(self, token: YubiKeyToken) -> MayTake:
        """``who_may_take`` for the credentials on ``token``, named as token.issuer and
        token.account_name name them."""
        info = token.info
        try:
            credential_ids = token.oath_state().credential_ids
        except TokenError:
            # Unreadable (locked, pulled): the enrollment's check fails on it before
            # anything is written, and says why to the request's operator.
            return None, None
        owners: dict[str, str | None] = {}
        for settings in self.desk.every_settings():
            owners |= settings.credential_owners(credential_ids, info.serial)
        return who_may_take(owners, info.serial)
