"""The control API's requests: enroll (queue and follow), queue, cancel, revoke,
reconcile, history, status and watch. Requests arrive already validated (requests.py).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator, Sequence

from provisioner.config import AccountConfig
from provisioner.core.errors import (
    ExitStatus,
    InvalidInput,
    ProvisionerError,
)
from provisioner.core.lifecycle import (
    Revoked,
    audit_revoke_failed,
    audit_revoked,
    revoke_everywhere,
)
from provisioner.core.messages import (
    EventKind,
    Outcome,
    TokenState,
    error_answer,
    refusal,
    success,
)
from provisioner.core.model import TagKey
from provisioner.core.store import QueueEntry, RequestKind
from provisioner.daemon.events import Event
from provisioner.daemon.operations import no_token_here
from provisioner.daemon.status import HEARTBEAT_SECONDS
from provisioner.daemon.workers import TokenWorkers

log = logging.getLogger("provisioner.service")  # the journal's name for it, kept across moves


class ControlHandlers(TokenWorkers):
    """DeskService's answers to the control socket."""

    def _revoke(self, request: Event, peer_name: str) -> Event:
        from provisioner.core import validation

        user, serial = request.get("user"), request.get("serial")
        if not isinstance(user, str) or (serial is not None and not isinstance(serial, int)):
            return refusal("revoke needs a user name", ExitStatus.USAGE)
        try:
            validation.user_name(user)
            accounts = self.desk.config.select_accounts(request.get("accounts"))
            if accounts:
                return self._revoke_accounts(user, serial, accounts, peer_name)
            done = self.desk.lifecycle().revoke(
                user, serial, no_token_here, self._removed_when_seen
            )
        except ProvisionerError as e:
            return error_answer(e)
        audit_revoked(self.store, peer_name, done)
        self._forget_on_token(done, peer_name)
        event: Event = {
            "event": EventKind.REVOKED,
            "user": user,
            "serial": done.token_serial,
            "detail": f"{done.device_arn} revoked by {peer_name}",
        }
        self.events.publish(event)
        return success(
            user=user,
            serial=done.token_serial,
            device_arn=done.device_arn,
            actions=list(done.actions),
        )

    def _revoke_accounts(
        self, user: str, serial: int | None, accounts: Sequence[AccountConfig], peer_name: str
    ) -> Event:
        def revoked(account: str, done: Revoked) -> None:
            audit_revoked(self.store, peer_name, done, account=account)
            self._forget_on_token(done, peer_name)
            self.events.publish(
                {
                    "event": EventKind.REVOKED,
                    "user": done.user,
                    "serial": done.token_serial,
                    "account": account,
                    "detail": f"{done.device_arn} revoked by {peer_name}",
                }
            )

        try:
            done = revoke_everywhere(
                self.desk.lifecycles(user, accounts),
                serial,
                no_token_here,
                self._removed_when_seen,
                on_done=revoked,
            )
        except ProvisionerError as e:
            audit_revoke_failed(self.store, peer_name, user, serial, e)
            return error_answer(e)
        return success(
            user=user,
            serial=done[0][1].token_serial,
            device_arn=done[0][1].device_arn,
            actions=[f"{name}: {line}" for name, one in done for line in one.actions],
            accounts=[
                {"account": name, "device_arn": one.device_arn, "serial": one.token_serial}
                for name, one in done
            ],
        )

    def handle(self, request: Event, peer_name: str) -> Iterator[Event]:
        op = request.get("op")
        if op == "enroll":
            yield from self._queue_and_follow(request, peer_name)
        elif op == "status":
            yield success(**self.status())
        elif op == "queue":
            yield success(**self._queue_view())
        elif op == "cancel":
            yield self._cancel(request, peer_name)
        elif op == "history":
            yield self._history(request)
        elif op == "reconcile":
            yield self._reconcile(request)
        elif op == "watch":
            yield from self._watch()
        elif op == "revoke":
            yield self._revoke(request, peer_name)
        else:
            yield refusal(f"unknown op {op!r}")

    def _queue_and_follow(self, request: Event, peer_name: str) -> Iterator[Event]:
        from provisioner.core import validation

        user, serial = request.get("user"), request.get("serial")
        kind, old_serial = request.get("kind", "enroll"), request.get("old_serial")
        if (
            not isinstance(user, str)
            or (serial is not None and not isinstance(serial, int))
            or kind not in tuple(RequestKind)
            or (old_serial is not None and not isinstance(old_serial, int))
        ):
            yield refusal(
                "enroll needs a user name (and an optional integer serial)", ExitStatus.USAGE
            )
            return
        accounts = request.get("accounts") or ""
        try:
            validation.user_name(user)
            if accounts and kind == RequestKind.REPLACE:
                raise InvalidInput("--accounts applies to an enrollment or a resync")
            # The names are checked against the configuration now, not at the plug.
            self.desk.config.select_accounts(accounts or None)
            if kind == RequestKind.RESYNC and serial is None:
                serial = self._the_users_token(user)
        except ProvisionerError as e:
            yield error_answer(e)
            return
        if self._stopping.is_set():
            yield refusal("the daemon is stopping", ExitStatus.FAILED)
            return
        follow = bool(request.get("wait", True))
        try:
            entry = self.store.enqueue(
                user,
                peer_name,
                serial,
                kind=RequestKind(kind),
                old_serial=old_serial,
                followed=follow,
                limit=self.desk.config.daemon.max_queue,
                accounts=accounts,
                desk=request.get("desk"),
            )
        except ProvisionerError as e:
            log.warning("refused a request for %s from %s: %s", user, peer_name, e.message)
            yield error_answer(e)
            return
        # No "queue" key: this is news for watchers, not for the follower of this entry.
        self.events.publish({"event": EventKind.REQUEST_QUEUED, "id": entry.id, "user": user})
        with self.events.subscribe(lambda e: e.get("queue") == entry.id) as inbox:
            position = self.store.queue_length(up_to=entry.id)
            # Tokens already plugged in are offered at once (in the usual order: the new
            # request is not necessarily the one served), followed or not.
            self._offer_idle_tokens(entry.serial)
            which = f"token {serial}" if serial is not None else "a token"
            what = {"enroll": "", "resync": " for a resync", "replace": " for a new token"}[kind]
            if accounts:
                what += f" in {accounts.replace(',', ', ')}"
            if request.get("desk"):
                what += f" at desk {request['desk']}"
            yield {
                "ok": True,
                "event": EventKind.QUEUED,
                "id": entry.id,
                "user": user,
                "position": position,
                "final": not follow,
                "detail": f"{user} is queued{what} (#{entry.id}, position {position}): "
                f"plug in {which}",
            }
            if not follow:
                return
            finished = False
            try:
                while True:
                    try:
                        event = inbox.get(timeout=2.0)
                    except queue.Empty:
                        if self._stopping.is_set():
                            yield self._stopped(entry)
                            finished = True
                            return
                        yield {
                            "event": EventKind.WAITING
                        }  # also tells us the client is still there
                        continue
                    yield event
                    if event.get("final"):
                        finished = True
                        return
            finally:
                if not finished:
                    # The operator gave up (Ctrl-C): a request nobody waits for is cancelled.
                    self.store.cancel(entry.id, peer_name)

    def _watch(self) -> Iterator[Event]:
        """The desk's status now, then again after every event, until the client leaves.

        Each update carries the event that caused it and the whole status, so a watcher
        never has to rebuild the desk's state from events it may have missed.
        """
        with self.events.subscribe(lambda e: True) as inbox:
            yield {"ok": True, "event": EventKind.UPDATE, "cause": None, **self.status()}
            while not self._stopping.is_set():
                try:
                    cause = inbox.get(timeout=HEARTBEAT_SECONDS)
                except queue.Empty:
                    yield {"event": EventKind.HEARTBEAT}
                    continue
                yield {"ok": True, "event": EventKind.UPDATE, "cause": cause, **self.status()}
        yield refusal("the daemon is stopping", ExitStatus.FAILED)

    def _the_users_token(self, user: str) -> int:
        """The serial of the one token provisioner enrolled for ``user``."""
        devices = self.desk.lifecycle().devices_of(user)
        serials = sorted({str(d.tag(TagKey.TOKEN_SERIAL)) for d in devices})
        serial = devices[0].token_serial if len(serials) == 1 else None
        if serial is None:
            what = "no token" if not serials else f"tokens {', '.join(serials)}"
            raise InvalidInput(
                f"{user} has {what} enrolled by provisioner",
                hint="say which token with --serial" if serials else "enroll one first",
            )
        return serial

    def _stopped(self, entry: QueueEntry) -> Event:
        """The daemon stops while a client follows a request: a request still waiting
        goes with its client (a restart would withdraw it anyway), and it is said."""
        withdrawn = self.store.withdraw(entry.id)
        detail = (
            f"the daemon is stopping: request #{entry.id} for {entry.user} is withdrawn; "
            "run the command again once the daemon is back"
            if withdrawn is not None
            else "the daemon is stopping"
        )
        return {
            "ok": False,
            "final": True,
            "outcome": Outcome.DAEMON_STOPPING,
            "detail": detail,
            "exit": ExitStatus.FAILED,
        }

    def _offer_idle_tokens(self, serial: int | None = None) -> None:
        """Serve tokens already plugged in: idle ones, and for a request naming a token,
        that token even after earlier work on it (a resync of the token just enrolled)."""
        with self._lock:
            idle = [
                t.reader
                for t in self._present.values()
                if t.state == TokenState.IDLE
                or (
                    serial is not None
                    and t.serial == serial
                    and t.state in (TokenState.ENROLLED, TokenState.FAILED)
                )
            ]
        for reader in idle:
            self._start_worker(reader)

    def _cancel(self, request: Event, peer_name: str) -> Event:
        entry_id = request.get("id")
        if not isinstance(entry_id, int):
            return refusal("cancel needs a queue id")
        entry = self.store.cancel(entry_id, peer_name)
        if entry is None:
            return refusal(f"no waiting request #{entry_id} (see provisioner queue)")
        self.events.publish(
            {
                "queue": entry_id,
                "event": EventKind.OUTCOME,
                "final": True,
                "ok": False,
                "outcome": Outcome.CANCELLED,
                "exit": ExitStatus.FAILED,
                "detail": f"request #{entry_id} for {entry.user} was cancelled by {peer_name}",
            }
        )
        return success(cancelled=vars(entry))

    def _reconcile(self, request: Event) -> Event:
        if self._recovery is None:
            return refusal("reconcile is not available")
        with self._lock:
            busy = frozenset(self._active)
        actions = self._recovery().run(
            dry_run=bool(request.get("dry_run")),
            delete_orphans=not request.get("keep_orphans"),
            all_desks=bool(request.get("all_desks")),
            busy=busy,
            desk=request.get("desk"),
        )
        return success(actions=[a.text for a in actions])

    def _history(self, request: Event) -> Event:
        limit = request.get("limit", 100)
        user = request.get("user")
        serial = request.get("serial")
        since = request.get("since")
        if not (isinstance(limit, int) and 0 < limit <= 100_000):
            return refusal("limit must be 1..100000")
        if (
            (user is not None and not isinstance(user, str))
            or (serial is not None and not isinstance(serial, int))
            or (since is not None and not isinstance(since, (int, float)))
        ):
            return refusal("bad history filter")
        records = self.store.history(
            limit=limit,
            user=user,
            serial=serial,
            since=since,
            account=request.get("account"),
            desk=request.get("desk"),
        )
        return success(history=[r.as_dict() for r in records])

    # --- state ------------------------------------------------------------------------
