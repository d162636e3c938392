"""`provisioner daemon`: the desk service in the foreground, as systemd runs it.

Start-up: open the state, put back requests a killed daemon had taken, listen on the
control socket, start watching readers, then READY=1. While running: STATUS= says what it
is doing, WATCHDOG=1 goes out at half of WATCHDOG_USEC while the service is healthy.
SIGTERM: no new work, enrollments in progress finish or roll back, STOPPING=1, exit 0.
SIGHUP: re-read the roster. Logs go to stderr, which the journal keeps.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioner.adapters.control_socket import DEAF_AFTER, Authorizer, ControlServer, Peer
from provisioner.adapters.files import load_roster
from provisioner.adapters.ownership import DaemonLock, Owner
from provisioner.adapters.reader_watch import ReaderEvent, ReaderEventKind, ReaderWatcher
from provisioner.adapters.signals import SignalPipe
from provisioner.adapters.systemd_notify import Notifier
from provisioner.adapters.usb import UsbWatcher, list_yubikeys
from provisioner.adapters.yubikey import is_yubikey_reader, open_in_reader
from provisioner.config import Config
from provisioner.core.errors import ConfigError, ExitStatus, ProvisionerError
from provisioner.core.recovery import Recovery
from provisioner.core.roster import Roster
from provisioner.daemon.heartbeat import Heartbeat
from provisioner.daemon.requests import valid_request
from provisioner.daemon.service import DeskService
from provisioner.desk import Desk, desk_store
from provisioner.doctor import card_holders

if TYPE_CHECKING:
    from provisioner.adapters.metrics import MetricsEndpoint

log = logging.getLogger("provisioner.daemon")

_PR_SET_DUMPABLE = 4


def no_core_dumps() -> None:
    """Seeds pass through this process's memory: it must never be dumped or ptrace'd."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("could not mark the process non-dumpable")


def _roster(config: Config) -> Roster | None:
    return load_roster(Path(config.daemon.roster)) if config.daemon.roster else None


def run(config: Config) -> int:
    # Read first: a roster or password file it cannot use is exit 2 naming it, before
    # anything starts.
    roster = _roster(config)
    password = config.oath_password()
    no_core_dumps()
    # `kill -USR1` writes every thread's stack to the journal: for a desk that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    notifier = Notifier()
    signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

    state_dir = config.daemon.state_path()
    # Before anything touches the state: a second daemon on it refuses (exit 2).
    lock = DaemonLock.acquire(state_dir)
    owner = Owner.claim(state_dir)
    store = desk_store(config, owner=owner)
    requeued, interrupted = store.settle_taken()
    desk = Desk.from_config(config)

    def recovery() -> Recovery:
        return desk.recovery(store, password)

    service = DeskService(
        desk,
        store,
        open_token=lambda reader: open_in_reader(reader, oath_password=password),
        is_yubikey_reader=is_yubikey_reader,
        roster=roster,
        notifier=notifier,
        recovery=recovery,
        card_holders=card_holders,
    )
    endpoint = _serve_metrics(config, desk, service)
    authorizer = Authorizer(config.daemon.operators_group)

    def handle(request: dict[str, Any], peer: Peer) -> Iterator[dict[str, Any]]:
        return service.handle(request, peer.name)

    interval = notifier.watchdog_interval
    control = ControlServer(
        config.daemon.socket_path(),
        authorizer,
        handle,
        valid_request,
        max_clients=config.daemon.max_clients,
        idle_timeout=config.daemon.client_idle_timeout,
        # Deaf for a whole watchdog timeout: no more pings, so systemd restarts it.
        deaf_after=2 * interval if interval is not None else DEAF_AFTER,
    )
    control.start()
    store.audit("daemon", "started", reason=f"desk {config.desk}, pid {os.getpid()}")
    log.info(
        "listening on %s; state in %s; %d request(s) queued (%d put back, %d interrupted "
        "by a stop)",
        control.path,
        state_dir,
        len(store.waiting()),
        requeued,
        interrupted,
    )
    usb = _watch_usb(service)
    heartbeat = Heartbeat(store, service.status, before=service.retry_unwritten)
    heartbeat.start()
    notifier.ready(f"listening on {control.path}")
    watcher = ReaderWatcher(
        _only_readers_served(config, _beat_on_reader_change(heartbeat, service.on_reader_event))
    )
    # What a crash left is settled before any token is served (it may need a token).
    threading.Thread(
        target=_recover_then_watch,
        args=(recovery, watcher, notifier, service.ahead.start),
        name="recovery",
        daemon=True,
    ).start()

    stopping = False
    trouble: str | None = None
    while not stopping:
        received = signals.wait(interval)
        stopping = signal.SIGTERM in received or signal.SIGINT in received
        if signal.SIGHUP in received and not stopping:
            try:
                service.reload_roster(_roster(config))
                log.info("roster reloaded")
            except ConfigError as e:
                log.error("roster not reloaded, keeping the old one: %s", e.one_line())
        trouble = _control_trouble(control, notifier, trouble)
        # Fed only while the desk can be reached and sees its readers.
        if interval is not None and service.healthy() and watcher.alive and trouble is None:
            notifier.watchdog()

    log.info("stopping: letting enrollments in progress finish or roll back")
    notifier.stopping("stopping: finishing enrollments in progress")
    control.close()
    service.stop(config.daemon.shutdown_timeout)
    watcher.stop()
    if usb is not None:
        usb.stop()
    if endpoint is not None:
        endpoint.close()
    heartbeat.stop()
    store.audit("daemon", "stopped")
    store.close()
    owner.release()
    lock.release()
    notifier.close()
    signals.close()
    return ExitStatus.OK


def _only_readers_served(
    config: Config, handle: Callable[[ReaderEvent], None]
) -> Callable[[ReaderEvent], None]:
    """Reader events for the readers ``daemon.readers`` gives this desk (all without it);
    pcscd's own going up and down always."""
    if not config.daemon.readers:
        return handle

    def served(event: ReaderEvent) -> None:
        if not event.reader or config.daemon.serves_reader(event.reader):
            handle(event)

    return served


#: Changes of the readers themselves (not of the cards in them): the heartbeat says them
#: at once, so `provisioner fleet` shows a desk's readers as soon as it has them.
_READERS_CHANGED = frozenset(
    {
        ReaderEventKind.READER_ADDED,
        ReaderEventKind.READER_REMOVED,
        ReaderEventKind.PCSC_DOWN,
        ReaderEventKind.PCSC_UP,
    }
)


def _beat_on_reader_change(
    heartbeat: Heartbeat, handle: Callable[[ReaderEvent], None]
) -> Callable[[ReaderEvent], None]:
    def handled(event: ReaderEvent) -> None:
        handle(event)
        if event.kind in _READERS_CHANGED:
            heartbeat.soon()

    return handled


def _control_trouble(control: ControlServer, notifier: Notifier, before: str | None) -> str | None:
    """What keeps the control socket from serving now (None: nothing), said once when it
    starts and when it ends."""
    trouble = control.trouble()
    if trouble != before:
        if trouble is not None:
            log.error("%s; the watchdog is not fed until it serves again", trouble)
            notifier.status(trouble)
        else:
            log.warning("the control socket serves again")
    return trouble


def _serve_metrics(config: Config, desk: Desk, service: DeskService) -> MetricsEndpoint | None:
    """The Prometheus endpoint, when ``daemon.metrics_listen`` asks for one."""
    address = config.daemon.metrics_address()
    if address is None:
        return None
    from provisioner.adapters.metrics import DeskMetrics, MetricsEndpoint

    metrics = DeskMetrics(
        tokens_present=lambda: service.counts()["tokens"],
        queue_length=lambda: service.counts()["queued"],
        in_progress=lambda: service.counts()["running"],
        devices_ahead=lambda: sum(1 for r in service.ahead.status() if r["device"]),
    )
    service.events.listen(metrics.observe)
    desk.observe_calls(metrics.iam_call, metrics.throttled)
    host, port = address
    try:
        endpoint = MetricsEndpoint(metrics, host, port)
    except OSError as e:
        raise ConfigError(
            f"cannot serve metrics on {config.daemon.metrics_listen}: {e.strerror}",
            hint="another program has that port: choose another daemon.metrics_listen",
        ) from e
    log.info("metrics at http://%s:%d/metrics", host, endpoint.port)
    return endpoint


def _recover_then_watch(
    recovery: Callable[[], Recovery],
    watcher: ReaderWatcher,
    notifier: Notifier,
    then: Callable[[], None],
) -> None:
    notifier.status("recovering what an earlier stop left unfinished")
    try:
        for action in recovery().run():
            log.warning("recovery: %s", action.text)
    except ProvisionerError as e:
        log.error("recovery incomplete (provisioner reconcile retries it): %s", e.one_line())
    except Exception:  # noqa: BLE001 - the desk must still come up
        log.exception("recovery failed")
    watcher.start()
    then()  # work ahead of plugs, once what a crash left (its devices too) is settled


def _watch_usb(service: DeskService) -> UsbWatcher | None:
    """Keys without a CCID interface never show up in PC/SC: USB events tell about them."""

    def scan(*_: object) -> None:
        try:
            tokens = list_yubikeys()
        except ProvisionerError as e:
            log.warning("USB: %s", e.one_line())
            return
        service.on_usb_tokens(
            {(t.bus, t.address): t.describe() for t in tokens if not t.can_hold_totp}
        )

    watcher = UsbWatcher(scan)
    started = watcher.start()  # before the first scan, so that nothing falls between
    scan()
    return watcher if started else None
