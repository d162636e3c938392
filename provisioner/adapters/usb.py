"""YubiKeys on the USB bus: which are plugged in, and when one comes or goes.

The only module that imports pyusb. What it answers comes from descriptors, before any
PC/SC exchange: a key without a CCID interface (class 0x0B) has no smart-card function,
so no OATH applet, and cannot hold a TOTP credential whatever its product id says
(FIDO-only keys share 0402 with older FIDO YubiKeys).

Nothing here opens a device node: libusb reads the descriptors from sysfs, and the strings
(product, serial) come from the kernel's copies in sysfs too, so this works in a sandbox
without /dev/bus/usb (systemd's PrivateDevices=yes). Only when sysfs has no string does it
ask the device, best effort.

``UsbWatcher`` follows hotplug through a NETLINK_KOBJECT_UEVENT socket, blocked in poll()
with a stop pipe next to it: no polling, no CPU while nothing happens. The two halves
share the descriptor parsing that decides what a key can do, hence one module.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum, unique
from pathlib import Path
from types import TracebackType
from typing import Any

import usb.core
import usb.util

from provisioner.core.errors import TokenError, UsbUnavailable

log = logging.getLogger("provisioner.usb")  # the journal's name for it, kept across moves

YUBICO_VENDOR_ID = 0x1050
CCID_INTERFACE_CLASS = 0x0B
HID_INTERFACE_CLASS = 0x03
SYSFS = Path("/sys")

#: What a YubiKey product id says it offers over USB (the CCID check is on descriptors).
PRODUCT_FUNCTIONS: Mapping[int, str] = {
    0x0401: "OTP",
    0x0402: "FIDO",
    0x0403: "OTP+FIDO",
    0x0404: "CCID",
    0x0405: "OTP+CCID",
    0x0406: "FIDO+CCID",
    0x0407: "OTP+FIDO+CCID",
    0x0110: "OTP",
    0x0111: "OTP+CCID",
    0x0112: "CCID",
    0x0113: "FIDO",
    0x0114: "OTP+FIDO",
    0x0115: "FIDO+CCID",
    0x0116: "OTP+FIDO+CCID",
    0x0120: "FIDO",
}


@dataclass(frozen=True)
class UsbToken:
    """A YubiKey as its USB descriptors show it."""

    bus: int
    address: int
    vendor_id: int
    product_id: int
    #: The product string ("YubiKey OTP+FIDO+CCID"), or None when it could not be read.
    product: str | None
    #: The USB serial string; None unless the key is configured to show it over USB.
    serial: str | None
    #: An interface of class 0x0B (CCID, smart card) in the active configuration.
    has_ccid: bool
    #: bInterfaceClass of each interface of the active configuration, in order.
    interface_classes: tuple[int, ...]

    @property
    def can_hold_totp(self) -> bool:
        """TOTP lives in the OATH applet, reached through the smart-card (CCID) interface."""
        return self.has_ccid

    @property
    def usb_id(self) -> str:
        return f"{self.vendor_id:04x}:{self.product_id:04x}"

    @property
    def functions(self) -> str:
        """ "OTP+FIDO+CCID", "FIDO", ...: from the product id, else from the interfaces."""
        known = PRODUCT_FUNCTIONS.get(self.product_id)
        if known is not None:
            return known
        if self.has_ccid:
            return "CCID"
        if self.interface_classes and all(c == HID_INTERFACE_CLASS for c in self.interface_classes):
            return "HID"
        return "unknown functions"

    def describe(self) -> str:
        """One sentence for the operator: which key, and whether it can be enrolled."""
        name = self.product or "YubiKey"
        ident = self.usb_id + (f", serial {self.serial}" if self.serial else "")
        if self.has_ccid:
            return f"{name} ({ident}, {self.functions}) can hold a TOTP credential"
        return (
            f"{name} ({ident}, {self.functions} only: no CCID interface) "
            "cannot hold a TOTP credential"
        )


def list_yubikeys(backend: Any = None, *, sysfs: Path | None = SYSFS) -> list[UsbToken]:
    """The Yubico devices on the USB bus, in bus/address order.

    ``backend`` is a pyusb backend (None: libusb 1.0). ``sysfs`` is where the kernel's
    copies of the string descriptors are looked up (None: ask the devices only).
    Raises UsbUnavailable without libusb; never fails on a single unreadable device.
    """
    try:
        found = list(usb.core.find(find_all=True, idVendor=YUBICO_VENDOR_ID, backend=backend))
    except usb.core.NoBackendError as e:
        raise UsbUnavailable("libusb is not available to pyusb: install libusb-1.0-0") from e
    except usb.core.USBError as e:
        raise TokenError(f"cannot list the USB devices: {e}") from e
    tokens = []
    for device in found:
        try:
            tokens.append(_token(device, sysfs))
        except usb.core.USBError as e:  # unplugged while we looked, or unreadable
            log.warning(
                "USB device %s:%s skipped: %s",
                getattr(device, "bus", "?"),
                getattr(device, "address", "?"),
                e,
            )
    return sorted(tokens, key=lambda t: (t.bus, t.address))


def _token(device: Any, sysfs: Path | None) -> UsbToken:
    bus, address = int(device.bus), int(device.address)
    sysdir = _sysfs_device_dir(sysfs, bus, address) if sysfs is not None else None
    configuration = _active_configuration(device, sysdir)
    classes: tuple[int, ...] = ()
    if configuration is not None:
        # Alternate settings repeat an interface; its class is that of setting 0.
        classes = tuple(
            int(i.bInterfaceClass) for i in configuration if int(i.bAlternateSetting) == 0
        )
    return UsbToken(
        bus=bus,
        address=address,
        vendor_id=int(device.idVendor),
        product_id=int(device.idProduct),
        product=_string(device, int(device.iProduct), sysdir, "product"),
        serial=_string(device, int(device.iSerialNumber), sysdir, "serial"),
        has_ccid=CCID_INTERFACE_CLASS in classes,
        interface_classes=classes,
    )


def _active_configuration(device: Any, sysdir: Path | None) -> Any:
    """The active configuration's descriptor, without opening the device if possible."""
    configurations = list(device)  # descriptors libusb already read: no device access
    if not configurations:
        return None
    value = _read_int(sysdir / "bConfigurationValue") if sysdir is not None else None
    if value is not None:
        for c in configurations:
            if int(c.bConfigurationValue) == value:
                return c
    if len(configurations) == 1:
        return configurations[0]
    try:
        return device.get_active_configuration()  # opens the device
    except (usb.core.USBError, NotImplementedError) as e:
        log.debug("active configuration of %s:%s unknown (%s)", device.bus, device.address, e)
        return configurations[0]


def _string(device: Any, index: int, sysdir: Path | None, attribute: str) -> str | None:
    """A string descriptor: the kernel's copy in sysfs, else asked of the device."""
    if index == 0:
        return None
    if sysdir is not None:
        try:
            text = (sysdir / attribute).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        if text:
            return text
    try:
        value = usb.util.get_string(device, index)
    # USBError: no permission or gone; ValueError: pyusb found no language id (what a
    # device that could not be opened looks like); NotImplementedError: backend.
    except (usb.core.USBError, ValueError, NotImplementedError) as e:
        log.debug("string %d of %s:%s unreadable: %s", index, device.bus, device.address, e)
        return None
    return str(value) if value else None


def _sysfs_device_dir(sysfs: Path, bus: int, address: int) -> Path | None:
    """/sys/bus/usb/devices/B-P.P... of the device at bus/address, if sysfs has it."""
    for entry in _usb_device_dirs(sysfs):
        if _read_int(entry / "busnum") == bus and _read_int(entry / "devnum") == address:
            return entry
    return None


def _usb_device_dirs(sysfs: Path) -> Iterator[Path]:
    try:
        entries = list((sysfs / "bus/usb/devices").iterdir())
    except OSError:
        return
    for entry in entries:
        if ":" not in entry.name:  # "1-1:1.0" are interfaces
            yield entry


def _read_int(path: Path, base: int = 10) -> int | None:
    try:
        return int(path.read_text().strip(), base)
    except (OSError, ValueError):
        return None


# --- hotplug ---------------------------------------------------------------------------

NETLINK_KOBJECT_UEVENT = 15
_UDEV_MAGIC = 0xFEEDCAFE
_UDEV_HEADER = struct.Struct("!8sI")  # "libudev\0", magic (network order)
_UDEV_OFFSETS = struct.Struct("=III")  # header_size, properties_off, properties_len (host order)
_RECV_BUFFER = 1 << 20  # socket buffer: a hub full of devices at once
_MAX_MESSAGE = 1 << 16


@unique
class UeventSource(IntEnum):
    """The netlink multicast group to listen on."""

    #: Raw kernel uevents ("add@/devices/...\\0KEY=VALUE\\0..."), before udev has run its
    #: rules: a device node may not have its group and mode yet.
    KERNEL = 1
    #: What udevd re-broadcasts once its rules ran ("libudev" header, then KEY=VALUE\\0...).
    UDEV = 2


@dataclass(frozen=True)
class Uevent:
    action: str
    devpath: str
    properties: Mapping[str, str]


def parse_uevent(data: bytes) -> Uevent | None:
    """A kernel or libudev uevent message; None for anything else."""
    if data.startswith(b"libudev\0"):
        if len(data) < _UDEV_HEADER.size + _UDEV_OFFSETS.size:
            return None
        _prefix, magic = _UDEV_HEADER.unpack_from(data)
        if magic != _UDEV_MAGIC:
            return None
        _size, offset, length = _UDEV_OFFSETS.unpack_from(data, _UDEV_HEADER.size)
        if offset < _UDEV_HEADER.size or offset + length > len(data):
            return None
        body = data[offset : offset + length]
    else:
        head, _sep, body = data.partition(b"\0")
        if b"@/" not in head:  # "add@/devices/..."
            return None
    properties: dict[str, str] = {}
    for item in body.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            properties[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    action = properties.get("ACTION")
    devpath = properties.get("DEVPATH")
    if not action or not devpath:
        return None
    return Uevent(action, devpath, properties)


def _product_ids(properties: Mapping[str, str]) -> tuple[int, int] | None:
    """(vendor, product) from PRODUCT=1050/407/543, which USB device uevents carry."""
    parts = properties.get("PRODUCT", "").split("/")
    if len(parts) < 2:
        return None
    try:
        return int(parts[0], 16), int(parts[1], 16)
    except ValueError:
        return None


#: on_event(action, devpath, product_id), called from the watcher's thread.
UsbEventHandler = Callable[[str, str, int | None], None]


class UsbWatcher:
    """Calls ``on_event("add"|"remove", devpath, product_id)`` as YubiKeys come and go.

    Start it before listing what is already plugged in (list_yubikeys), so that nothing
    falls between the two. Sending on the uevent netlink family takes CAP_NET_ADMIN (the
    kernel, udevd), so messages are taken as they come; an "add" that does not say which
    device it is (no PRODUCT=) is checked against sysfs.
    """

    def __init__(
        self,
        on_event: UsbEventHandler,
        *,
        source: UeventSource | None = None,
        vendor_id: int = YUBICO_VENDOR_ID,
        sysfs: Path = SYSFS,
    ) -> None:
        self._on_event = on_event
        # udevd running: listen after it, so that the rules (group, mode) have been applied.
        self.source = source or (
            UeventSource.UDEV if Path("/run/udev/control").exists() else UeventSource.KERNEL
        )
        self._vendor_id = vendor_id
        self._sysfs = sysfs
        #: devpath -> product id of the vendor's devices present, for remove events that
        #: do not say what went away.
        self._present: dict[str, int | None] = {}
        self._sock: socket.socket | None = None
        self._stop_r = self._stop_w = -1
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, sock: socket.socket | None = None) -> bool:
        """Start the thread; False (and a warning) if no uevent socket can be opened.

        ``sock``: an uevent socket already bound, e.g. one systemd passed
        (ListenNetlink=kobject-uevent 2); by default the watcher opens its own.
        """
        if self._thread is not None:
            return self.running
        if sock is None:
            sock = self._open()
            if sock is None:
                return False
        sock.setblocking(False)
        self._sock = sock
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._present = dict(self._scan())
        self._thread = threading.Thread(target=self._run, name="usb-watch", daemon=True)
        self._thread.start()
        return True

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
            )
        except OSError as e:  # EAFNOSUPPORT under RestrictAddressFamilies, EPERM, ...
            log.warning("USB hotplug not watched: cannot open a uevent socket: %s", e)
            return None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECV_BUFFER)
            sock.bind((0, int(self.source)))
        except OSError as e:
            sock.close()
            log.warning("USB hotplug not watched: cannot listen for uevents: %s", e)
            return None
        log.debug("watching USB hotplug (%s uevents)", self.source.name.lower())
        return sock

    def stop(self, timeout: float = 5.0) -> None:
        """Wake the thread through the stop pipe, wait for it, close everything."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        thread.join(timeout)
        if thread.is_alive():
            log.warning("USB watcher thread did not stop within %.1f s", timeout)
            return  # it still uses the descriptors
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_r = self._stop_w = -1

    def __enter__(self) -> UsbWatcher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _mask in poller.poll()}
            if self._stop_r in ready:
                return
            self._drain(sock)

    def _drain(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped events: say so, go on
                    log.warning("USB hotplug events were lost (receive buffer overrun)")
                    continue
                log.error("USB hotplug watch failed: %s", e)
                return
            event = parse_uevent(data)
            if event is not None:
                self._handle(event)

    def _handle(self, event: Uevent) -> None:
        props = event.properties
        if props.get("SUBSYSTEM") != "usb" or props.get("DEVTYPE") != "usb_device":
            return
        if event.action == "add":
            ids = _product_ids(props) or self._sysfs_ids(event.devpath)
            if ids is None or ids[0] != self._vendor_id:
                return
            product_id: int | None = ids[1]
            self._present[event.devpath] = product_id
        elif event.action == "remove":
            ids = _product_ids(props)
            known = event.devpath in self._present
            product_id = self._present.pop(event.devpath, None)
            if ids is not None:
                if ids[0] != self._vendor_id:
                    return
                product_id = ids[1]
            elif not known:
                return
        else:
            return
        try:
            self._on_event(event.action, event.devpath, product_id)
        except Exception:  # noqa: BLE001 - a failing handler must not end the watch
            log.exception("USB event handler failed on %s %s", event.action, event.devpath)

    # -- sysfs ---------------------------------------------------------------------------

    def _sysfs_ids(self, devpath: str) -> tuple[int, int] | None:
        directory = self._sysfs / devpath.lstrip("/")
        vendor = _read_int(directory / "idVendor", 16)
        product = _read_int(directory / "idProduct", 16)
        return None if vendor is None or product is None else (vendor, product)

    def _scan(self) -> Iterator[tuple[str, int | None]]:
        """The vendor's devices already present, as devpath -> product id."""
        for entry in _usb_device_dirs(self._sysfs):
            if _read_int(entry / "idVendor", 16) != self._vendor_id:
                continue
            try:
                real = entry.resolve()
                devpath = "/" + str(real.relative_to(self._sysfs.resolve()))
            except (OSError, ValueError):
                continue
            yield devpath, _read_int(entry / "idProduct", 16)
