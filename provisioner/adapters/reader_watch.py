"""Reader and card events from PC/SC, without polling.

One thread blocks in SCardGetStatusChange on every reader plus the ``\\\\?PnP?\\Notification``
pseudo-reader, so it wakes when a card is inserted or removed and when readers come and
go (a real USB YubiKey is a reader that appears with its card already in it; vpcd's
readers stay and only their card changes). Idle, it uses no CPU. ``stop()`` cancels the
blocking call. If pcscd goes away the watcher reports it and reconnects when it is back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum, unique
from typing import Any

from smartcard import scard

from provisioner.adapters.yubikey import NO_SERVICE

log = logging.getLogger("provisioner.reader_watch")  # the journal's name for it, kept across moves

PNP_READER = "\\\\?PnP?\\Notification"
_INFINITE = 0xFFFFFFFF
_RECONNECT_DELAY = 1.0


@unique
class ReaderEventKind(StrEnum):
    READER_ADDED = "reader-added"
    READER_REMOVED = "reader-removed"
    CARD_INSERTED = "card-inserted"
    CARD_REMOVED = "card-removed"
    PCSC_DOWN = "pcsc-down"
    PCSC_UP = "pcsc-up"


@dataclass(frozen=True)
class ReaderEvent:
    kind: ReaderEventKind
    reader: str = ""


class ReaderWatcher:
    """Calls ``on_event`` (from its own thread) for every reader or card change."""

    def __init__(self, on_event: Callable[[ReaderEvent], None]) -> None:
        self._on_event = on_event
        self._stop = threading.Event()
        self._context: Any = None
        self._lock = threading.Lock()
        self._present: dict[str, bool] = {}
        self._thread: threading.Thread | None = None
        self.pcsc_up = False

    # --- life ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="reader-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            if self._context is not None:
                scard.SCardCancel(self._context)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> dict[str, bool]:
        """Reader name -> card present, as last seen."""
        with self._lock:
            return dict(self._present)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop.is_set():
            if not self._connect():
                self._stop.wait(_RECONNECT_DELAY)
                continue
            try:
                self._watch()
            except _PcscGone:
                self._down()
                self._stop.wait(_RECONNECT_DELAY)
            finally:
                self._release()

    def _connect(self) -> bool:
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            if self.pcsc_up or not self._present:
                log.debug("pcscd unreachable: %s", scard.SCardGetErrorMessage(hresult))
            self._down()
            return False
        with self._lock:
            self._context = context
        if not self.pcsc_up:
            self.pcsc_up = True
            self._emit(ReaderEvent(ReaderEventKind.PCSC_UP))
        return True

    def _release(self) -> None:
        with self._lock:
            context, self._context = self._context, None
        if context is not None:
            scard.SCardReleaseContext(context)

    def _down(self) -> None:
        if self.pcsc_up:
            self.pcsc_up = False
            for reader in list(self._present):
                self._forget(reader)
            self._emit(ReaderEvent(ReaderEventKind.PCSC_DOWN))

    def _watch(self) -> None:
        states: dict[str, int] = {}
        pnp_state = scard.SCARD_STATE_UNAWARE
        while not self._stop.is_set():
            readers = self._list()
            for gone in [r for r in self._present if r not in readers]:
                states.pop(gone, None)
                self._forget(gone)
            for new in readers:
                if new not in states:
                    states[new] = scard.SCARD_STATE_UNAWARE
                    with self._lock:
                        self._present[new] = False
                    self._emit(ReaderEvent(ReaderEventKind.READER_ADDED, new))
            query = [(r, s) for r, s in states.items()] + [(PNP_READER, pnp_state)]
            hresult, answer = scard.SCardGetStatusChange(self._context, _INFINITE, query)
            if hresult == scard.SCARD_E_CANCELLED or self._stop.is_set():
                return
            if hresult in NO_SERVICE:
                raise _PcscGone
            if hresult == scard.SCARD_E_UNKNOWN_READER:
                continue  # a reader vanished between listing and waiting: list again
            if hresult not in (scard.SCARD_S_SUCCESS, scard.SCARD_E_TIMEOUT):
                log.warning("PC/SC status: %s", scard.SCardGetErrorMessage(hresult))
                self._stop.wait(_RECONNECT_DELAY)
                continue
            for name, state, _atr in answer:
                current = state & ~scard.SCARD_STATE_CHANGED
                if name == PNP_READER:
                    pnp_state = current
                    continue
                states[name] = current
                present = bool(state & scard.SCARD_STATE_PRESENT) and not bool(
                    state & scard.SCARD_STATE_MUTE
                )
                with self._lock:
                    was = self._present.get(name, False)
                    self._present[name] = present
                if present and not was:
                    self._emit(ReaderEvent(ReaderEventKind.CARD_INSERTED, name))
                elif was and not present:
                    self._emit(ReaderEvent(ReaderEventKind.CARD_REMOVED, name))

    def _list(self) -> list[str]:
        hresult, readers = scard.SCardListReaders(self._context, [])
        if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hresult in NO_SERVICE:
            raise _PcscGone
        if hresult != scard.SCARD_S_SUCCESS:
            log.warning("listing readers: %s", scard.SCardGetErrorMessage(hresult))
            return list(self._present)
        return list(readers)

    def _forget(self, reader: str) -> None:
        with self._lock:
            had_card = self._present.pop(reader, False)
        if had_card:
            self._emit(ReaderEvent(ReaderEventKind.CARD_REMOVED, reader))
        self._emit(ReaderEvent(ReaderEventKind.READER_REMOVED, reader))

    def _emit(self, event: ReaderEvent) -> None:
        log.debug("PC/SC event: %s %s", event.kind.value, event.reader)
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the watcher
            log.exception("handling %s failed", event)


class _PcscGone(Exception):
    pass
