"""Run one emulated YubiKey in a vpcd reader until Ctrl-C, for trying ykman by hand.

python -m emulated_yubikey --serial 12345678
ykman --reader "Yubico YubiKey OTP+FIDO+CCID 00 00" info
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from contextlib import ExitStack

from provisioner.adapters.signals import SignalPipe

from .card import DEFAULT_FIRMWARE, DEFAULT_SERIAL, EmulatedYubiKey
from .errors import EmulatorError
from .management import Capability, FormFactor, default_capabilities
from .pcsc_stack import DEFAULT_READER_NAME, PcscStack
from .vpcd import VPCD_PORT, VpcdCard

logger = logging.getLogger("emulated_yubikey")


def _firmware(text: str) -> tuple[int, int, int]:
    try:
        major, minor, patch = (int(part) for part in text.split("."))
    except ValueError:
        raise argparse.ArgumentTypeError("firmware looks like 5.4.3") from None
    return major, minor, patch


def _form_factor(text: str) -> FormFactor:
    try:
        return FormFactor[text.upper().replace("-", "_")]
    except KeyError:
        names = ", ".join(f.name.lower().replace("_", "-") for f in FormFactor)
        raise argparse.ArgumentTypeError(f"choose one of: {names}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emulated_yubikey",
        description=(
            "Put one emulated YubiKey 5 (OATH + Management applets) into a vsmartcard "
            "vpcd reader of pcscd, so that ykman and the provisioner see a YubiKey. "
            "The key lives until Ctrl-C; if pcscd restarts, it is re-inserted."
        ),
        epilog=(
            f'Readers: "{DEFAULT_READER_NAME} 00 00" (port {VPCD_PORT}) and '
            f'"{DEFAULT_READER_NAME} 00 01" (port {VPCD_PORT + 1}). Try: '
            f'ykman --reader "{DEFAULT_READER_NAME} 00 00" info'
        ),
    )
    p.add_argument(
        "--port",
        type=int,
        default=VPCD_PORT,
        help=f"vpcd TCP port: {VPCD_PORT} = reader 00 00, {VPCD_PORT + 1} = 00 01",
    )
    p.add_argument("--host", default="127.0.0.1", help="where vpcd listens (default: %(default)s)")
    p.add_argument(
        "--serial", type=int, default=DEFAULT_SERIAL, help="serial number (default: %(default)s)"
    )
    p.add_argument(
        "--hide-serial",
        action="store_true",
        help="report no serial, as a key configured to hide it",
    )
    p.add_argument(
        "--firmware",
        type=_firmware,
        default=DEFAULT_FIRMWARE,
        help="firmware version, e.g. 5.7.0 (64 OATH slots from 5.7; default 5.4.3)",
    )
    p.add_argument(
        "--form-factor",
        type=_form_factor,
        default=FormFactor.USB_A_KEYCHAIN,
        help="e.g. usb-a-keychain (default), usb-c-nano",
    )
    p.add_argument(
        "--no-nfc",
        action="store_true",
        help="a key without NFC (default: keychains have NFC, Nanos do not)",
    )
    p.add_argument(
        "--no-oath",
        action="store_true",
        help="a key without the OATH application (its SELECT fails)",
    )
    p.add_argument(
        "--password",
        default=None,
        help="OATH password (test value only: it shows in the process list)",
    )
    p.add_argument(
        "--used-slots", type=int, default=0, help="pre-fill this many dummy OATH credentials"
    )
    p.add_argument(
        "--no-touch",
        action="store_true",
        help="the simulated user never touches: touch credentials time out",
    )
    p.add_argument(
        "--start-pcscd",
        action="store_true",
        help="also start a private pcscd with the vpcd readers (needs root and no other pcscd)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log APDU headers (no data)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
    )
    caps = default_capabilities(args.firmware)
    if args.no_oath:
        caps &= ~Capability.OATH
    try:
        key = EmulatedYubiKey(
            serial=None if args.hide_serial else args.serial,
            firmware=args.firmware,
            form_factor=args.form_factor,
            capabilities=caps,
            nfc=False if args.no_nfc else None,
            oath_password=args.password,
            used_slots=args.used_slots,
            touch=not args.no_touch,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    signals = SignalPipe((signal.SIGTERM,))
    try:
        with ExitStack() as stack:
            if args.start_pcscd:
                stack.enter_context(PcscStack())
            card = VpcdCard(key, port=args.port, host=args.host)
            stack.callback(card.remove)
            _serve(card, signals)
    except KeyboardInterrupt:
        pass
    except EmulatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _serve(card: VpcdCard, signals: SignalPipe) -> None:
    """Keep the card inserted; wait for pcscd when it is not (re)started yet."""
    waiting_said = False
    while True:
        if not card.inserted:
            try:
                card.insert()
                logger.info("%r: press Ctrl-C to remove", card)
                waiting_said = False
            except EmulatorError as e:
                if not waiting_said:
                    logger.warning("%s; retrying every second", e)
                    waiting_said = True
        if signals.wait(1.0):
            return


if __name__ == "__main__":
    sys.exit(main())
