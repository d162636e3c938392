"""Token workers: one thread per inserted YubiKey, waiting out a program that holds it."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TypeVar

from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.errors import (
    ProvisionerError,
    TokenBusy,
)
from provisioner.core.messages import (
    EventKind,
    TokenState,
)
from provisioner.core.store import RequestKind
from provisioner.daemon.operations import Operations
from provisioner.daemon.status import PresentToken

log = logging.getLogger("provisioner.service")  # the journal's name for it, kept across moves

TokenOpener = Callable[[str], AbstractContextManager[YubiKeyToken]]
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Pauses between tries at a token another program holds: growing, bounded."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 10.0

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield min(delay, self.cap)
            delay *= self.factor


def retry_while_busy(
    attempt: Callable[[], T],
    *,
    backoff: Backoff,
    pause: Callable[[float], bool],
    on_busy: Callable[[TokenBusy, float], None],
) -> T | None:
    """``attempt()`` until it stops raising TokenBusy. After each refusal ``on_busy`` is
    told, then ``pause(delay)`` waits; it returns False when trying again is no use (the
    token was pulled, the daemon is stopping), and then so does this (None)."""
    for delay in backoff.delays():
        try:
            return attempt()
        except TokenBusy as e:
            on_busy(e, delay)
            if not pause(delay):
                return None
    raise AssertionError("unreachable")  # pragma: no cover - the delays never end


class TokenWorkers(Operations):
    """DeskService's token workers: identify the token, then serve it."""

    def _start_worker(self, reader: str) -> None:
        if self._stopping.is_set():
            return
        with self._lock:
            busy = self._workers.get(reader)
            if busy is not None and busy.is_alive():
                return
            self._present[reader] = PresentToken(reader)
            worker = threading.Thread(
                target=self._serve_token, args=(reader,), name=f"token {reader}", daemon=True
            )
            self._workers[reader] = worker
        worker.start()

    # --- one token ----------------------------------------------------------------------

    def _serve_token(self, reader: str) -> None:
        try:
            with contextlib.ExitStack() as opened:
                token = retry_while_busy(
                    lambda: opened.enter_context(self._open_token(reader)),
                    backoff=self._backoff,
                    pause=lambda seconds: self._still_in(reader, seconds),
                    on_busy=lambda e, delay: self._held(reader),
                )
                if token is not None:
                    self._serve(reader, token)
        except ProvisionerError as e:
            log.warning("token in %s: %s", reader, e.one_line())
            self._set(reader, state=TokenState.FAILED, detail=e.one_line())
            self.events.publish(
                {"event": EventKind.TOKEN_ERROR, "reader": reader, "detail": e.one_line()}
            )
        except Exception:  # noqa: BLE001 - one token's bug must not stop the desk
            log.exception("serving the token in %s failed", reader)
            self._set(reader, state=TokenState.FAILED)
        finally:
            self._update_status()

    def _held(self, reader: str) -> None:
        """Another program has the card: said (naming the likely holder, as `doctor`
        does) when first seen and whenever the suspects change."""
        suspects = self._card_holders()
        # The unit's ProtectProc=invisible hides other users' programs from the daemon.
        who = (
            f" ({', '.join(suspects)} running)"
            if suspects
            else " (provisioner doctor, run as the operator, names it)"
        )
        detail = (
            f"held by another program{who}; tried again until it lets go or the token is pulled out"
        )
        with self._lock:
            before = self._present.get(reader) or PresentToken(reader)
            self._present[reader] = replace(before, state=TokenState.HELD, detail=detail)
        if before.detail == detail:
            return
        if before.state is not TokenState.HELD:
            log.warning("the card in %s is %s", reader, detail)
            self.store.audit("desk", "held token", reason=f"{reader}: {detail}")
        self.events.publish({"event": EventKind.TOKEN_HELD, "reader": reader, "detail": detail})
        self._update_status()

    def _still_in(self, reader: str, seconds: float) -> bool:
        """Wait ``seconds`` (less if the card is pulled or the daemon stops); True when
        the card is still in its reader and the daemon running: worth trying again."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._stopping.is_set() or not self._readers.get(reader, False),
                timeout=seconds,
            )
            if self._stopping.is_set() or not self._readers.get(reader, False):
                # Deregistered under the lock: a card put back from now on gets a worker.
                if self._workers.get(reader) is threading.current_thread():
                    del self._workers[reader]
                return False
            # Pulled and put back while we waited: it is in again, still to be served.
            self._present.setdefault(reader, PresentToken(reader, state=TokenState.HELD))
            return True

    def _serve(self, reader: str, token: YubiKeyToken) -> None:
        info = token.info
        self._set(reader, serial=info.serial, state=TokenState.IDENTIFYING, detail=None)
        self.events.publish(
            {
                "event": EventKind.TOKEN,
                "reader": reader,
                "serial": info.serial,
                "firmware": info.firmware_text,
            }
        )
        if not info.has_oath:
            detail = (
                f"token {info.label} cannot hold a TOTP credential "
                "(its OATH application is absent or disabled)"
            )
            self._set(reader, state=TokenState.UNSUPPORTED)
            self.store.audit("desk", "unsupported token", serial=info.serial, reason=detail)
            self.events.publish(
                {
                    "event": EventKind.UNSUPPORTED,
                    "reader": reader,
                    "serial": info.serial,
                    "detail": detail,
                }
            )
            return
        if info.serial is not None:
            self._seen(info.serial, info.firmware_text)
            self._clean_token(reader, token, info.serial)
        claim = self._claim(token)
        if claim.user is None:
            why = claim.why_not or "plugged in with nobody queued or rostered: left untouched"
            detail = f"token {info.label} {why}"
            log.info("%s", detail)
            self._set(reader, state=TokenState.IDLE, detail=claim.why_not)
            self.store.audit("desk", "ignored token", serial=info.serial, reason=detail)
            self.events.publish(
                {
                    "event": EventKind.IGNORED,
                    "reader": reader,
                    "serial": info.serial,
                    "detail": detail,
                }
            )
            return
        if claim.entry is not None and claim.entry.kind is RequestKind.RESYNC:
            self._resync(reader, token, claim.entry)
        else:
            self._enroll(
                reader, token, claim.user, claim.entry, claim.source, claim.actor, claim.accounts
            )

    def _seen(self, serial: int, firmware: str) -> None:
        """The token in the inventory (where and when it was last seen); a store that
        cannot take it now does not keep the token from being served."""
        try:
            self.store.token_seen(serial, firmware)
        except ProvisionerError as e:
            log.warning("token %s not recorded in the inventory: %s", serial, e.one_line())
