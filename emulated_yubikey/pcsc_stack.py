"""`PcscStack`: the real pcscd with two vpcd readers named like a YubiKey's.

Why: the product talks PC/SC to YubiKeys. Running the real pcscd with vsmartcard's
vpcd driver, from a private config folder (no edit of /etc), lets the demo and the
`pcsc` tests put emulated keys into readers that unmodified ykman and pyscard take
for YubiKeys.

Only one pcscd can run per machine (its socket is hard-coded at
/run/pcscd/pcscd.comm), so the stack refuses to start next to another one and says
how to stop it. pcscd's output goes to a log file in a private temp dir; errors quote
its tail. pcscd is never started with --apdu: that would log secrets.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from smartcard import scard

from .card import EmulatedYubiKey
from .errors import PcscStackError
from .vpcd import REINSERT_GAP, VPCD_HOST, VPCD_PORT, VpcdCard

logger = logging.getLogger(__name__)

#: ykman keeps readers whose name contains "yubico yubikey" and derives the USB PID
#: (here OTP+FIDO+CCID, 0x0407) from the words in the name.
DEFAULT_READER_NAME = "Yubico YubiKey OTP+FIDO+CCID"
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
VPCD_CHANNEL = 0x8C7B  # = TCP port 35963; the driver also opens the next port
SLOTS_PER_BANK = 2  # Debian's vpcd makes two readers per configured channel

_STOP_FIX = (
    "Stop it first: `systemctl stop pcscd.socket pcscd.service` where systemd runs it "
    "(stopping only the service lets socket activation restart it), otherwise "
    "`kill <pid>`; or reuse the running stack instead of starting a second one."
)


class PcscStack:
    """Start pcscd with the vpcd readers on enter, stop it (and pull all cards) on exit.

    `reader_names` are "<reader_name> 00 00" (TCP 35963, slot 0) and
    "<reader_name> 00 01" (TCP 35964, slot 1). `banks` > 1 adds two readers per bank,
    "<reader_name> B 00 00" and "... B 00 01" (slots 2 and 3, TCP 35965/35966), "C" and
    so on: enough readers for several desks on one machine. vpcd keeps its readers in one
    static table per loaded library, so each bank after the first loads its own copy of
    the driver (pcscd shares a library only between entries naming the same path).
    `busy_timeout`: how long to wait for another pcscd (another test session, the demo)
    to exit before giving up.
    """

    def __init__(
        self,
        *,
        reader_name: str = DEFAULT_READER_NAME,
        pcscd: str | None = None,
        driver: Path = VPCD_DRIVER,
        start_timeout: float = 5.0,
        debug: bool = False,
        keep_workdir: bool = False,
        busy_timeout: float = 0.0,
        banks: int = 1,
    ) -> None:
        if not 1 <= banks <= 4:
            raise ValueError("banks must be 1..4 (pcscd serves at most 16 readers)")
        self.reader_name = reader_name
        self.banks = banks
        self._pcscd = pcscd
        self._driver = driver
        self._start_timeout = start_timeout
        self._debug = debug
        self._keep_workdir = keep_workdir
        self._busy_timeout = busy_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._cards: dict[int, VpcdCard] = {}
        self._removed: dict[int, VpcdCard] = {}  # last card out of each slot

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"PcscStack(pid={pid}, readers={self.reader_names}, cards={sorted(self._cards)})"

    @property
    def slots(self) -> int:
        return SLOTS_PER_BANK * self.banks

    @property
    def reader_names(self) -> tuple[str, ...]:
        return tuple(
            f"{self._friendly_name(slot // SLOTS_PER_BANK)} 00 {slot % SLOTS_PER_BANK:02d}"
            for slot in range(self.slots)
        )

    def _friendly_name(self, bank: int) -> str:
        return self.reader_name if bank == 0 else f"{self.reader_name} {chr(ord('A') + bank)}"

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "pcscd.log" if self._workdir else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # --- life cycle -------------------------------------------------------------------

    def __enter__(self) -> PcscStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            raise PcscStackError("this PcscStack is already running")
        pcscd = self._preflight()
        self._workdir = Path(tempfile.mkdtemp(prefix="provisioner-pcscd-"))
        conf = self._workdir / "reader.conf.d"
        conf.mkdir()
        for bank in range(self.banks):
            driver = self._driver
            if bank:
                driver = self._workdir / f"libifdvpcd-{bank}.so"
                shutil.copyfile(self._driver, driver)
            channel = VPCD_CHANNEL + SLOTS_PER_BANK * bank  # slot n listens on 35963 + n
            (conf / f"yubikey-vpcd-{bank}").write_text(
                f'FRIENDLYNAME "{self._friendly_name(bank)}"\n'
                f"DEVICENAME /dev/null:0x{channel:04X}\n"
                f"LIBPATH {driver}\n"
                f"CHANNELID 0x{channel:04X}\n"
            )
        cmd = [pcscd, "--foreground", "--config", str(conf)]
        if self._debug:
            cmd.append("--debug")
        assert self.log_path is not None
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        logger.info("pcscd started (pid %d), log %s", self._proc.pid, self.log_path)
        try:
            self._wait_for_readers()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Pull every card, stop pcscd (terminate, then kill), remove the temp dir."""
        for slot in list(self._cards):
            self.remove(slot)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("pcscd did not stop on SIGTERM; killing it")
                proc.kill()
                proc.wait(timeout=5)
        if proc is not None:
            logger.info("pcscd stopped (pid %d, exit %s)", proc.pid, proc.returncode)
        if self._workdir is not None and not self._keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # --- cards ------------------------------------------------------------------------

    def insert(
        self, key: EmulatedYubiKey, slot: int = 0, *, wait: bool = True, timeout: float = 3.0
    ) -> VpcdCard:
        """Put `key` into reader `slot` (0 .. slots-1); by default wait until pcscd sees it."""
        self._require_running()
        self._check_slot(slot)
        card = self._cards.get(slot)
        if card is not None and card.inserted:
            raise PcscStackError(f"reader {self.reader_names[slot]!r} already holds a card")
        previous = card or self._removed.get(slot)
        card = VpcdCard(key, port=VPCD_PORT + slot, host=VPCD_HOST)
        gap_from = previous.removed_at if previous is not None else None
        card.insert(not_before=None if gap_from is None else gap_from + REINSERT_GAP)
        self._cards[slot] = card
        if wait and not self.wait_for_card(slot, present=True, timeout=timeout):
            raise PcscStackError(
                f"pcscd did not see the card in {self.reader_names[slot]!r} within "
                f"{timeout} s{self._log_excerpt()}"
            )
        return card

    def remove(self, slot: int = 0, *, wait: bool = False, timeout: float = 3.0) -> None:
        """Pull the card out of reader `slot` (no-op if empty)."""
        self._check_slot(slot)
        card = self._cards.pop(slot, None)
        if card is not None:
            card.remove()
            self._removed[slot] = card
        if wait and self._proc is not None:
            self.wait_for_card(slot, present=False, timeout=timeout)

    def card_present(self, slot: int = 0) -> bool:
        """What pcscd currently reports for reader `slot`."""
        state = self._reader_state(self.reader_names[slot])
        return bool(state & scard.SCARD_STATE_PRESENT)

    def wait_for_card(self, slot: int = 0, *, present: bool = True, timeout: float = 3.0) -> bool:
        """Wait until pcscd reports reader `slot` with (or without) a card."""
        deadline = time.monotonic() + timeout
        while True:
            if self.card_present(slot) == present:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # --- helpers ----------------------------------------------------------------------

    def log_tail(self, lines: int = 20) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _log_excerpt(self) -> str:
        tail = self.log_tail()
        return f"\n--- pcscd log ({self.log_path}) ---\n{tail}" if tail else ""

    def _preflight(self) -> str:
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        pcscd = self._pcscd or shutil.which("pcscd", path=search)
        if pcscd is None or not os.access(pcscd, os.X_OK):
            raise PcscStackError("pcscd not found: install the Debian package `pcscd`")
        if not self._driver.exists():
            raise PcscStackError(
                f"vpcd driver {self._driver} not found: install the Debian package "
                "`vsmartcard-vpcd`"
            )
        if os.geteuid() != 0:
            raise PcscStackError(
                "starting pcscd needs root (it owns /run/pcscd and the reader ports); "
                "run the demo or the `pcsc` tests as root, e.g. in the CI container"
            )
        pids = _running_pcscd_pids()
        deadline = time.monotonic() + self._busy_timeout
        while pids and time.monotonic() < deadline:
            # Another test session or the demo holds the one pcscd; wait for its turn.
            time.sleep(0.2)
            pids = _running_pcscd_pids()
        if pids:
            raise PcscStackError(
                f"another pcscd is already running (pid {', '.join(map(str, pids))}); "
                f"only one pcscd can run per machine. {_STOP_FIX}"
            )
        if PCSCD_SOCKET.exists():
            if _socket_accepts(PCSCD_SOCKET):
                raise PcscStackError(
                    f"{PCSCD_SOCKET} accepts connections though no pcscd runs: systemd "
                    f"socket activation holds it. {_STOP_FIX}"
                )
            logger.info("removing stale %s left by a killed pcscd", PCSCD_SOCKET)
            PCSCD_SOCKET.unlink(missing_ok=True)
        return pcscd

    def _wait_for_readers(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        wanted = set(self.reader_names)
        seen: set[str] = set()
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PcscStackError(
                    f"pcscd exited with status {self._proc.returncode} while starting"
                    f"{self._log_excerpt()}"
                )
            seen = set(_list_readers())
            if wanted <= seen:
                logger.info("pcscd readers ready: %s", ", ".join(self.reader_names))
                return
            time.sleep(0.02)
        raise PcscStackError(
            f"pcscd did not list the readers {sorted(wanted)} within {self._start_timeout} s "
            f"(saw {sorted(seen)}){self._log_excerpt()}"
        )

    def _require_running(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise PcscStackError(f"pcscd is not running{self._log_excerpt()}")

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot must be 0..{self.slots - 1}")

    def _reader_state(self, reader: str) -> int:
        hresult, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscStackError(f"PC/SC unavailable: {scard.SCardGetErrorMessage(hresult)}")
        try:
            hresult, states = scard.SCardGetStatusChange(
                ctx, 0, [(reader, scard.SCARD_STATE_UNAWARE)]
            )
            if hresult not in (scard.SCARD_S_SUCCESS, scard.SCARD_E_TIMEOUT):
                raise PcscStackError(
                    f"cannot read the state of {reader!r}: {scard.SCardGetErrorMessage(hresult)}"
                )
            return int(states[0][1])
        finally:
            scard.SCardReleaseContext(ctx)


def _list_readers() -> list[str]:
    hresult, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        return []  # pcscd not answering yet
    try:
        hresult, readers = scard.SCardListReaders(ctx, [])
        return list(readers) if hresult == scard.SCARD_S_SUCCESS else []
    finally:
        scard.SCardReleaseContext(ctx)


def _running_pcscd_pids() -> list[int]:
    """Live (non-zombie) pcscd processes, from /proc (same answer as `pgrep -x pcscd`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "pcscd":
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # exited meanwhile
        if state != "Z":
            pids.append(int(entry.name))
    return sorted(pids)


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True
