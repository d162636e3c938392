"""Who gets a token: a request for this serial, the roster's user, or the oldest request
for any token that this token may serve.
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.errors import (
    TokenError,
)
from provisioner.core.store import QueueEntry
from provisioner.daemon.status import LiveStatus


@dataclass(frozen=True)
class _Claim:
    """Whom a token serves: a user (by a request, or by the roster), or nobody and why."""

    user: str | None
    entry: QueueEntry | None = None
    source: str = ""
    actor: str = ""
    why_not: str | None = None

    @classmethod
    def of(cls, entry: QueueEntry) -> _Claim:
        return cls(entry.user, entry, f"queue:{entry.id}", entry.requested_by)


class Claims(LiveStatus):
    """DeskService's choice of whose work a token does."""

    def _claim(self, token: YubiKeyToken) -> _Claim:
        """A request for this very token, else the roster's user (through that user's
        request for any token, if one waits: it is served, not left for the next token),
        else the oldest request for any token that this token may serve."""
        serial = token.info.serial
        entry = self.store.take_next(serial, users=())
        if entry is not None:
            return _Claim.of(entry)
        rostered = self.roster.user_for(serial) if self.roster else None
        if rostered is not None:
            entry = self.store.take_next(None, users=(rostered,))
            return (
                _Claim.of(entry)
                if entry is not None
                else _Claim(rostered, None, "roster", "roster")
            )
        users, why_not = self._who_may_take(token)
        entry = self.store.take_next(None, users=users)
        return _Claim.of(entry) if entry is not None else _Claim(None, why_not=why_not)

    def _who_may_take(self, token: YubiKeyToken) -> tuple[frozenset[str] | None, str | None]:
        """Whose requests for any token this token may serve: anyone's when it holds none
        of this desk's credentials (named as token.issuer and token.account_name name
        them); only its owner's enrollment when they are all one user's; nobody's when
        they are several users' or name none. With the reason."""
        info = token.info
        if info.serial is not None:
            ask = f"queue a request for it with --serial {info.serial}"
        else:
            ask = "its serial is hidden: enroll it with provisioner enroll --direct"
        try:
            credential_ids = token.oath_state().credential_ids
        except TokenError:
            # Unreadable (locked, pulled): the enrollment's check fails on it before
            # anything is written, and says why to the request's operator.
            return None, None
        settings = self.desk.config.enrollment_settings()
        owners = settings.credential_owners(credential_ids, info.serial)
        if not owners:
            return None, None
        users = set(owners.values())
        holds = ", ".join(f"{user or 'an unnamed user'} ({cid})" for cid, user in owners.items())
        why_not = (
            f"holds this desk's credential of {holds}: left alone by requests for any token; {ask}"
        )
        if len(users) == 1 and None not in users:
            return frozenset(u for u in users if u is not None), why_not
        return frozenset(), why_not
