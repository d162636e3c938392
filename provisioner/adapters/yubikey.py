"""The token adapter: YubiKeys through PC/SC and yubikit. The only module that imports them.

Readers are found the way ykman finds them (a name containing "Yubico YubiKey"), but a
reader is opened only when PC/SC says a card is in it (ykman's probe of an empty reader
costs seconds), exclusively (concurrent sessions corrupt each other's exchanges), and
never by killing whatever else holds the card. Every vendor exception is translated here
into the project's TokenError tree.

One module, larger than most, on purpose: everything yubikit and pyscard can raise is
translated in one place, which the style (one adapter per outside system) asks for.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from smartcard import scard
from yubikit.core import TRANSPORT, BadResponseError, CommandError, NotSupportedError
from yubikit.core.smartcard import ApduError, SmartCardConnection
from yubikit.management import CAPABILITY, ManagementSession
from yubikit.oath import HASH_ALGORITHM, OATH_TYPE, Credential, CredentialData, OathSession

from provisioner.core.errors import (
    PcscCallFailed,
    PcscUnavailable,
    TokenBusy,
    TokenCommandFailed,
    TokenError,
    TokenFull,
    TokenLocked,
    TokenNoOath,
    TokenNotFound,
    TokenRemoved,
    TokenTouchTimeout,
)
from provisioner.core.model import TOTP_DIGITS, TOTP_PERIOD, CredentialSpec, OathState, TokenInfo
from provisioner.core.secret import Seed

logger = logging.getLogger("provisioner.yubikey")  # the journal's name for it, kept across moves

YUBIKEY_READER = "yubico yubikey"

_SW_NOT_FOUND = 0x6A82
_SW_NO_SPACE = 0x6A84
_SW_SECURITY = 0x6982
_SW_AUTH_FAILED = 0x6984

_GONE = {
    scard.SCARD_W_REMOVED_CARD,
    scard.SCARD_E_NO_SMARTCARD,
    scard.SCARD_W_RESET_CARD,
    scard.SCARD_W_UNPOWERED_CARD,
    scard.SCARD_E_READER_UNAVAILABLE,
    scard.SCARD_E_UNKNOWN_READER,
    scard.SCARD_E_INVALID_HANDLE,
    scard.SCARD_E_NOT_TRANSACTED,
    scard.SCARD_W_UNRESPONSIVE_CARD,
}
#: pcscd is not running, or stopped under us (the reader watch shares this).
NO_SERVICE = frozenset({scard.SCARD_E_NO_SERVICE, scard.SCARD_E_SERVICE_STOPPED})


def guard_vendor_logging() -> None:
    """yubikit logs raw APDUs, seeds included, at level 5: keep it above that, always."""
    for name in ("yubikit", "ykman"):
        log = logging.getLogger(name)
        if log.level < logging.INFO:
            log.setLevel(logging.INFO)


def _pcsc_failed(what: str, code: int) -> PcscCallFailed:
    return PcscCallFailed(
        f"{what}: {scard.SCardGetErrorMessage(code)} (0x{code & 0xFFFFFFFF:08x})", code=code
    )


class PcscConnection(SmartCardConnection):
    """An exclusive PC/SC connection to the card in one reader, with a context of its own.

    Its own context, because pcscd keeps a vanished card's exclusive lock until the
    context that held it is released (a disconnect alone does not free it), and the same
    token must be reopened after it is put back.
    """

    def __init__(self, reader: str) -> None:
        self.reader = reader
        self._gone = False
        self._card: Any = None
        hresult, self._context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            self._context = None
            raise _pcsc_failed("reaching pcscd", hresult)
        hresult, card, protocol = scard.SCardConnect(
            self._context,
            reader,
            scard.SCARD_SHARE_EXCLUSIVE,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        if hresult != scard.SCARD_S_SUCCESS:
            self.close()
            raise _pcsc_failed(f"connecting to {reader}", hresult)
        self._card = card
        t1 = protocol == scard.SCARD_PROTOCOL_T1
        self._pci = scard.SCARD_PCI_T1 if t1 else scard.SCARD_PCI_T0
        hresult, _name, _state, _proto, atr = scard.SCardStatus(self._card)
        if hresult != scard.SCARD_S_SUCCESS:
            self._gone = True
            self.close()
            raise _pcsc_failed(f"reading the ATR in {reader}", hresult)
        # As ykman decides it: the ATR's second byte says USB (0xFx) or NFC.
        self._transport = TRANSPORT.USB if len(atr) > 1 and atr[1] & 0xF0 == 0xF0 else TRANSPORT.NFC

    @property
    def transport(self) -> TRANSPORT:
        return self._transport

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        hresult, response = scard.SCardTransmit(self._card, self._pci, list(apdu))
        if hresult != scard.SCARD_S_SUCCESS:
            self._gone = self._gone or hresult in _GONE or hresult == scard.SCARD_F_COMM_ERROR
            raise _pcsc_failed(f"talking to the card in {self.reader}", hresult)
        if len(response) < 2:
            self._gone = True
            raise _pcsc_failed(
                f"short answer from the card in {self.reader}", scard.SCARD_F_COMM_ERROR
            )
        return bytes(response[:-2]), response[-2] << 8 | response[-1]

    def reconnect(self) -> None:
        """Back to the card in this reader after it was removed and put back."""
        hresult, protocol = scard.SCardReconnect(
            self._card,
            scard.SCARD_SHARE_EXCLUSIVE,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
            scard.SCARD_LEAVE_CARD,
        )
        if hresult != scard.SCARD_S_SUCCESS:
            raise _pcsc_failed(f"reconnecting to {self.reader}", hresult)
        self._gone = False
        t1 = protocol == scard.SCARD_PROTOCOL_T1
        self._pci = scard.SCARD_PCI_T1 if t1 else scard.SCARD_PCI_T0

    def close(self) -> None:
        if self._card is not None:
            # Reset: a validated (unlocked) OATH applet must not stay open for the next
            # program. A card that is gone is left alone: resetting or powering it down
            # only confuses the reader driver (vpcd then never reports the next card).
            how = scard.SCARD_LEAVE_CARD if self._gone else scard.SCARD_RESET_CARD
            scard.SCardDisconnect(self._card, how)
            self._card = None
        if self._context is not None:
            scard.SCardReleaseContext(self._context)
            self._context = None


@dataclass(frozen=True)
class ReaderState:
    name: str
    card_present: bool
    is_yubikey_reader: bool


class Pcsc:
    """A PC/SC context: list readers, see which hold a card, open connections."""

    def __init__(self) -> None:
        hresult, self._context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscUnavailable(f"cannot reach pcscd: {scard.SCardGetErrorMessage(hresult)}")

    def close(self) -> None:
        if self._context is not None:
            scard.SCardReleaseContext(self._context)
            self._context = None

    def __enter__(self) -> Pcsc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def readers(self) -> list[ReaderState]:
        hresult, names = scard.SCardListReaders(self._context, [])
        if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hresult in NO_SERVICE:
            raise PcscUnavailable("pcscd stopped answering")
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscUnavailable(f"listing readers: {scard.SCardGetErrorMessage(hresult)}")
        if not names:
            return []
        query = [(name, scard.SCARD_STATE_UNAWARE) for name in names]
        hresult, states = scard.SCardGetStatusChange(self._context, 0, query)
        if hresult not in (scard.SCARD_S_SUCCESS, scard.SCARD_E_TIMEOUT):
            raise PcscUnavailable(f"reading reader states: {scard.SCardGetErrorMessage(hresult)}")
        return [
            ReaderState(
                name=name,
                card_present=bool(state & scard.SCARD_STATE_PRESENT)
                and not state & scard.SCARD_STATE_MUTE,
                is_yubikey_reader=YUBIKEY_READER in name.lower(),
            )
            for name, state, _atr in states
        ]

    def connect(self, reader: str) -> PcscConnection:
        try:
            return PcscConnection(reader)
        except PcscCallFailed as e:
            if e.code == scard.SCARD_E_SHARING_VIOLATION:
                raise TokenBusy(f"the card in {reader} is in use by another program") from e
            if e.code in NO_SERVICE:
                raise PcscUnavailable("pcscd stopped answering") from e
            if e.code in _GONE:
                raise TokenRemoved(f"no card in {reader}") from e
            raise TokenError(f"cannot open the card in {reader}: {e}") from e

    def opener(self, reader: str) -> Callable[[], SmartCardConnection]:
        return lambda: self.connect(reader)


@contextmanager
def _translated(label: str, what: str) -> Iterator[None]:
    """Vendor exceptions in, TokenErrors out."""
    try:
        yield
    except PcscCallFailed as e:
        if e.code in NO_SERVICE:
            raise PcscUnavailable(f"pcscd stopped answering during {what}") from e
        raise TokenRemoved(f"token {label} was removed during {what}") from e
    except TokenError:
        raise
    except ApduError as e:
        if e.sw == _SW_NO_SPACE:
            raise TokenFull(f"token {label} has no free OATH slot") from e
        if e.sw in (_SW_SECURITY, _SW_AUTH_FAILED):
            raise TokenLocked(f"token {label} refused to {what}: the OATH applet is locked") from e
        raise TokenCommandFailed(f"token {label} answered SW=0x{e.sw:04X} to {what}") from e
    except (BadResponseError, NotSupportedError, CommandError) as e:
        raise TokenCommandFailed(f"token {label} gave a bad answer to {what}: {e}") from e
    except (ValueError, IndexError, KeyError, struct.error) as e:
        # yubikit's TLV parsing raises these on malformed answers; the text is not shown
        # (it could quote what the card sent).
        raise TokenCommandFailed(
            f"token {label} gave a bad answer to {what} ({type(e).__name__})"
        ) from e
    except ConnectionError as e:
        raise TokenRemoved(f"token {label} was removed during {what}") from e


class YubiKeyToken:
    """One token, opened exclusively; the enrollment's TokenSession."""

    def __init__(
        self,
        opener: Callable[[], SmartCardConnection],
        reader: str,
        *,
        oath_password: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        guard_vendor_logging()
        self._opener = opener
        self._reader = reader
        self._password = oath_password
        self._sleep = sleep
        self._monotonic = monotonic
        self._connection: SmartCardConnection | None = None
        self._oath: OathSession | None = None
        self._credentials: dict[str, Credential] = {}
        # The last listing, until this session changes the applet: nothing else can while
        # the card is held exclusively, so the desk's look before claiming a token and the
        # enrollment's check share one LIST.
        self._listed: OathState | None = None
        self._connection = self._connect()
        try:
            self._info = self._read_info(self._connection)
        except BaseException:
            self.close()
            raise
        logger.debug(
            "opened token %s in %s: firmware %s, %s, OATH %s",
            self._info.label,
            reader,
            self._info.firmware_text,
            self._info.form_factor,
            "enabled" if self._info.has_oath else "absent",
        )

    # --- opening ----------------------------------------------------------------------

    def _connect(self) -> SmartCardConnection:
        with _translated(self._reader, "open the card"):
            return self._opener()

    def _read_info(self, connection: SmartCardConnection) -> TokenInfo:
        label = self._reader
        try:
            with _translated(label, "read the device info"):
                device = ManagementSession(connection).read_device_info()
        except TokenCommandFailed:
            # Keys older than firmware 4.1 have no READ_CONFIG: OATH alone tells us enough.
            logger.debug("no device info from %s; asking the OATH applet", label)
            version = self._select_oath(connection, label, unlock=False).version
            return TokenInfo(label, None, tuple(version), "unknown", has_oath=True)  # type: ignore[arg-type]
        transport = connection.transport
        enabled = device.config.enabled_capabilities.get(
            transport, device.supported_capabilities.get(transport, CAPABILITY(0))
        )
        supported = device.supported_capabilities.get(transport, CAPABILITY(0))
        return TokenInfo(
            reader=self._reader,
            serial=device.serial,
            firmware=(device.version.major, device.version.minor, device.version.patch),
            form_factor=str(device.form_factor),
            has_oath=bool(enabled & supported & CAPABILITY.OATH),
        )

    def _select_oath(
        self, connection: SmartCardConnection, label: str, *, unlock: bool = True
    ) -> OathSession:
        try:
            with _translated(label, "select the OATH applet"):
                session = OathSession(connection)
        except TokenCommandFailed as e:
            if isinstance(e.__cause__, ApduError) and e.__cause__.sw == _SW_NOT_FOUND:
                raise TokenNoOath(f"token {label} has no OATH applet") from e
            raise
        if unlock and session.locked:
            if self._password is None:
                raise TokenLocked(
                    f"the OATH applet of token {label} is protected by a password "
                    "and none is configured"
                )
            try:
                with _translated(label, "unlock the OATH applet"):
                    session.validate(session.derive_key(self._password))
            except TokenError as e:
                if isinstance(e.__cause__, ApduError):
                    raise TokenLocked(f"wrong OATH password for token {label}") from e
                raise
        return session

    # --- TokenSession -----------------------------------------------------------------

    @property
    def info(self) -> TokenInfo:
        return self._info

    @property
    def label(self) -> str:
        return self._info.label

    def _session(self) -> OathSession:
        if self._connection is None:
            raise TokenRemoved(f"token {self._reader} is closed")
        if not self._info.has_oath:
            raise TokenNoOath(f"token {self.label} has no OATH application enabled")
        if self._oath is None:
            self._oath = self._select_oath(self._connection, self.label)
        return self._oath

    def oath_state(self) -> OathState:
        if self._listed is not None:
            return self._listed
        session = self._session()
        with _translated(self.label, "list its OATH credentials"):
            credentials = session.list_credentials()
        self._credentials = {c.id.decode("utf-8", "replace"): c for c in credentials}
        self._listed = OathState(
            credential_ids=tuple(self._credentials),
            capacity=self._info.oath_capacity,
            password_protected=session.has_key,
        )
        return self._listed

    def put_credential(self, spec: CredentialSpec, seed: Seed) -> None:
        session = self._session()
        self._listed = None
        data = CredentialData(
            name=spec.account,
            oath_type=OATH_TYPE.TOTP,
            hash_algorithm=HASH_ALGORITHM.SHA1,
            secret=seed.reveal(),
            digits=TOTP_DIGITS,
            period=TOTP_PERIOD,
            issuer=spec.issuer or None,
        )
        try:
            with _translated(self.label, f"store credential {spec.credential_id}"):
                credential = session.put_credential(data, touch_required=spec.touch)
        finally:
            data.secret = b""
            del data
        self._credentials[spec.credential_id] = credential

    def calculate(self, credential_id: str, timestamp: int) -> str:
        if timestamp <= 0:
            raise ValueError("timestamp must be positive (0 means 'now' to yubikit)")
        session = self._session()
        credential = self._credentials.get(credential_id) or self._find(credential_id)
        return self._calculate_one(session, credential_id, credential, timestamp)

    def calculate_many(self, credential_ids: Sequence[str], timestamp: int) -> dict[str, str]:
        """Every code in one CALCULATE ALL; a credential that needs a touch (the token
        answers CALCULATE ALL without its code) is then computed on its own. Every id the
        token lacks is named before anyone is asked to touch it."""
        if timestamp <= 0:
            raise ValueError("timestamp must be positive (0 means 'now' to yubikit)")
        wanted = list(dict.fromkeys(credential_ids))
        if not wanted:
            return {}
        session = self._session()
        with _translated(self.label, f"compute codes for {len(wanted)} credentials"):
            answered = {
                c.id.decode("utf-8", "replace"): (c, code)
                for c, code in session.calculate_all(timestamp).items()
            }
        missing = [i for i in wanted if i not in answered]
        if missing:
            raise self._missing(", ".join(missing))
        codes: dict[str, str] = {}
        for credential_id in wanted:
            credential, code = answered[credential_id]
            codes[credential_id] = (
                str(code.value)
                if code is not None
                else self._calculate_one(session, credential_id, credential, timestamp)
            )
        return codes

    def _calculate_one(
        self, session: OathSession, credential_id: str, credential: Credential, timestamp: int
    ) -> str:
        try:
            with _translated(self.label, f"compute a code for {credential_id}"):
                return str(session.calculate_code(credential, timestamp).value)
        except TokenLocked as e:
            # A touch credential answers 6982 when nobody touched it in time.
            if credential.touch_required:
                raise TokenTouchTimeout(f"token {self.label} was not touched in time") from e
            raise

    def _find(self, credential_id: str) -> Credential:
        self.oath_state()
        try:
            return self._credentials[credential_id]
        except KeyError:
            raise self._missing(credential_id) from None

    def _missing(self, credential_ids: str) -> TokenCommandFailed:
        return TokenCommandFailed(f"token {self.label} holds no credential {credential_ids}")

    def delete_credential(self, credential_id: str) -> bool:
        state = self.oath_state()
        if credential_id not in state.credential_ids:
            return False
        session = self._session()
        self._listed = None
        with _translated(self.label, f"delete credential {credential_id}"):
            session.delete_credential(self._credentials[credential_id].id)
        self._credentials.pop(credential_id, None)
        return True

    def reopen(self, timeout: float) -> None:
        """Wait for this same token (by serial) to be plugged back in, and reopen it.

        Over PC/SC the handle we hold is reconnected (SCardReconnect), the standard way
        back to a card that was removed: a fresh connect would find the reader still
        locked by the old exclusive handle.
        """
        self._oath = None
        self._credentials = {}
        self._listed = None
        old = self._connection
        reconnect = getattr(old, "reconnect", None)
        if reconnect is None:
            self._drop_connection()
        deadline = self._monotonic() + timeout
        while True:
            try:
                if reconnect is not None:
                    with _translated(self._reader, "reopen the card"):
                        reconnect()
                    connection = old
                else:
                    connection = self._connect()
                assert connection is not None
                info = self._read_info(connection)
            except (TokenRemoved, TokenNotFound, TokenBusy):
                if self._monotonic() >= deadline:
                    raise TokenRemoved(
                        f"token {self.label} did not come back within {timeout:.0f} s"
                    ) from None
                self._sleep(0.2)
                continue
            if info.serial != self._info.serial:
                if reconnect is None:
                    connection.close()
                raise TokenNotFound(
                    f"a different token ({info.label}) was inserted instead of {self.label}"
                )
            self._connection = connection
            return

    def _drop_connection(self) -> None:
        self._oath = None
        self._credentials = {}
        self._listed = None
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001 - closing a vanished card may fail any way
                logger.debug("closing %s failed", self._reader, exc_info=True)
            self._connection = None

    def close(self) -> None:
        self._drop_connection()

    def __enter__(self) -> YubiKeyToken:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(state: ReaderState) -> str:
    return f"{state.name}: {'card present' if state.card_present else 'empty'}"


def open_token(
    pcsc: Pcsc,
    *,
    reader: str | None = None,
    serial: int | None = None,
    oath_password: str | None = None,
) -> YubiKeyToken:
    """Find the one token the operator means, and open it.

    ``reader`` matches a reader's name exactly or as a case-insensitive part of it (any
    reader: an NFC reader holding a YubiKey works too). ``serial`` opens each YubiKey
    present until it finds that serial. With neither, exactly one token must be present.
    """
    states = pcsc.readers()
    if reader is not None:
        matches = [s for s in states if s.name == reader] or [
            s for s in states if reader.lower() in s.name.lower()
        ]
        if not matches:
            known = "; ".join(describe(s) for s in states) or "no readers at all"
            raise TokenNotFound(f"no reader matches {reader!r} ({known})")
        if len(matches) > 1:
            names = ", ".join(repr(s.name) for s in matches)
            raise TokenNotFound(f"{reader!r} matches several readers: {names}")
        candidates = matches
    else:
        candidates = [s for s in states if s.is_yubikey_reader]
    present = [s for s in candidates if s.card_present]
    if not present:
        where = ", ".join(repr(s.name) for s in candidates) or "no YubiKey reader"
        raise TokenNotFound(f"no token is inserted ({where})")
    if serial is None and len(present) > 1:
        names = ", ".join(repr(s.name) for s in present)
        raise TokenNotFound(
            f"{len(present)} tokens are present ({names}): say which with --reader or --serial"
        )
    for state in present:
        token = YubiKeyToken(pcsc.opener(state.name), state.name, oath_password=oath_password)
        if serial is None or token.info.serial == serial:
            return token
        token.close()
    raise TokenNotFound(f"no token with serial {serial} is present")


def list_tokens(pcsc: Pcsc) -> list[TokenInfo | ReaderState]:
    """Every YubiKey reader: the token's info where a card is in it, the reader otherwise."""
    out: list[TokenInfo | ReaderState] = []
    for state in pcsc.readers():
        if not state.is_yubikey_reader or not state.card_present:
            out.append(state)
            continue
        try:
            with YubiKeyToken(pcsc.opener(state.name), state.name) as token:
                out.append(token.info)
        except TokenError as e:
            logger.info("cannot read %s: %s", state.name, e.one_line())
            out.append(state)
    return out


@contextmanager
def open_in_reader(reader: str, *, oath_password: str | None = None) -> Iterator[YubiKeyToken]:
    """Open the token in one reader with a PC/SC context of its own (one per worker)."""
    with (
        Pcsc() as pcsc,
        YubiKeyToken(pcsc.opener(reader), reader, oath_password=oath_password) as token,
    ):
        yield token


def is_yubikey_reader(name: str) -> bool:
    return YUBIKEY_READER in name.lower()


@contextmanager
def find_by_serial(
    serial: int, *, oath_password: str | None = None
) -> Iterator[YubiKeyToken | None]:
    """The token with this serial if it is plugged in (and not busy), else None."""
    with Pcsc() as pcsc:
        found: YubiKeyToken | None = None
        for state in pcsc.readers():
            if not (state.is_yubikey_reader and state.card_present):
                continue
            try:
                token = YubiKeyToken(
                    pcsc.opener(state.name), state.name, oath_password=oath_password
                )
            except TokenError as e:
                logger.debug("skipping %s: %s", state.name, e.one_line())
                continue
            if token.info.serial == serial:
                found = token
                break
            token.close()
        try:
            yield found
        finally:
            if found is not None:
                found.close()
