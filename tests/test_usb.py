"""provisioner.adapters.usb: listing YubiKeys from their USB descriptors, and hotplug events.

Two levels of fakes, both built from the same descriptor bytes (tests/data/*.umockdev):
- a pyusb backend that serves those bytes (and string descriptors over GET_DESCRIPTOR), for
  fast checks of what is derived from them;
- umockdev (slow): the real libusb reads the devices from an emulated sysfs, and
  umockdev's GObject testbed emits real add/remove uevents to UsbWatcher's netlink socket.
  umockdev delivers every uevent in libudev's format whatever group the socket joined, so
  the kernel's own format is covered by parse_uevent tests on bytes.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import usb.backend
import usb.backend.libusb0
import usb.backend.libusb1
import usb.backend.openusb
import usb.core

from provisioner.adapters.usb import (
    UeventSource,
    UsbToken,
    UsbUnavailable,
    UsbWatcher,
    list_yubikeys,
    parse_uevent,
)
from provisioner.core.errors import TokenError

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parent.parent
HUB = "/devices/pci0000:00/0000:00:14.0/usb1"


# --- a pyusb backend over raw descriptors ----------------------------------------------------


def umockdev_descriptors(name: str) -> bytes:
    """The H: descriptors= bytes of the first device in tests/data/NAME.umockdev."""
    for line in (DATA / f"{name}.umockdev").read_text().splitlines():
        if line.startswith("H: descriptors="):
            return bytes.fromhex(line.split("=", 1)[1])
    raise AssertionError(f"no descriptors in {name}.umockdev")


class FakeUsbDevice:
    def __init__(
        self,
        raw: bytes,
        *,
        bus: int,
        address: int,
        strings: dict[int, str] | None = None,
        open_error: int | None = None,
    ) -> None:
        self.strings = strings or {}
        self.open_error = open_error
        self.configurations: list[SimpleNamespace] = []
        self.interfaces: list[dict[tuple[int, int], SimpleNamespace]] = []
        self.endpoints: list[dict[tuple[int, int], list[SimpleNamespace]]] = []
        offset = 0
        interface: SimpleNamespace | None = None
        while offset < len(raw):
            length, kind = raw[offset], raw[offset + 1]
            body = raw[offset : offset + length]
            if kind == 1:
                f = struct.unpack("<BBHBBBBHHHBBBB", body)
                self.descriptor = SimpleNamespace(
                    bLength=f[0],
                    bDescriptorType=f[1],
                    bcdUSB=f[2],
                    bDeviceClass=f[3],
                    bDeviceSubClass=f[4],
                    bDeviceProtocol=f[5],
                    bMaxPacketSize0=f[6],
                    idVendor=f[7],
                    idProduct=f[8],
                    bcdDevice=f[9],
                    iManufacturer=f[10],
                    iProduct=f[11],
                    iSerialNumber=f[12],
                    bNumConfigurations=f[13],
                    bus=bus,
                    address=address,
                    port_number=address - 1,
                    port_numbers=(address - 1,),
                    speed=2,
                )
            elif kind == 2:
                f = struct.unpack("<BBHBBBBB", body)
                self.configurations.append(
                    SimpleNamespace(
                        bLength=f[0],
                        bDescriptorType=f[1],
                        wTotalLength=f[2],
                        bNumInterfaces=f[3],
                        bConfigurationValue=f[4],
                        iConfiguration=f[5],
                        bmAttributes=f[6],
                        bMaxPower=f[7],
                        extra_descriptors=b"",
                    )
                )
                self.interfaces.append({})
                self.endpoints.append({})
            elif kind == 4:
                f = struct.unpack("<BBBBBBBBB", body)
                interface = SimpleNamespace(
                    bLength=f[0],
                    bDescriptorType=f[1],
                    bInterfaceNumber=f[2],
                    bAlternateSetting=f[3],
                    bNumEndpoints=f[4],
                    bInterfaceClass=f[5],
                    bInterfaceSubClass=f[6],
                    bInterfaceProtocol=f[7],
                    iInterface=f[8],
                    extra_descriptors=b"",
                )
                self.interfaces[-1][(f[2], f[3])] = interface
                self.endpoints[-1][(f[2], f[3])] = []
            elif kind == 5 and interface is not None:
                f = struct.unpack("<BBBBHB", body)
                self.endpoints[-1][
                    (interface.bInterfaceNumber, interface.bAlternateSetting)
                ].append(
                    SimpleNamespace(
                        bLength=f[0],
                        bDescriptorType=f[1],
                        bEndpointAddress=f[2],
                        bmAttributes=f[3],
                        wMaxPacketSize=f[4],
                        bInterval=f[5],
                        bRefresh=0,
                        bSynchAddress=0,
                        extra_descriptors=b"",
                    )
                )
            offset += length


class DescriptorBackend(usb.backend.IBackend):  # type: ignore[misc]
    """Enough of pyusb's backend interface for find(), descriptors and string descriptors."""

    def __init__(self, *devices: FakeUsbDevice) -> None:
        self.devices = devices
        self.opened: list[FakeUsbDevice] = []

    def enumerate_devices(self) -> Any:
        return iter(self.devices)

    def get_device_descriptor(self, dev: FakeUsbDevice) -> Any:
        return dev.descriptor

    def get_configuration_descriptor(self, dev: FakeUsbDevice, config: int) -> Any:
        return dev.configurations[config]

    def get_interface_descriptor(self, dev: FakeUsbDevice, intf: int, alt: int, config: int) -> Any:
        by_number = sorted(dev.interfaces[config])
        numbers = sorted({n for n, _ in by_number})
        key = (numbers[intf], alt)
        if key not in dev.interfaces[config]:
            raise IndexError(key)
        return dev.interfaces[config][key]

    def get_endpoint_descriptor(
        self, dev: FakeUsbDevice, ep: int, intf: int, alt: int, config: int
    ) -> Any:
        numbers = sorted({n for n, _ in dev.interfaces[config]})
        return dev.endpoints[config][(numbers[intf], alt)][ep]

    def open_device(self, dev: FakeUsbDevice) -> FakeUsbDevice:
        self.opened.append(dev)
        if dev.open_error is not None:
            raise usb.core.USBError(os.strerror(dev.open_error), errno=dev.open_error)
        return dev

    def close_device(self, dev_handle: FakeUsbDevice) -> None:
        pass

    def get_configuration(self, dev_handle: FakeUsbDevice) -> int:
        return int(dev_handle.configurations[0].bConfigurationValue)

    def ctrl_transfer(
        self,
        dev_handle: FakeUsbDevice,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: Any,
        timeout: int,
    ) -> int:
        assert (bmRequestType, bRequest, wValue >> 8) == (0x80, 6, 3), "only GET_DESCRIPTOR(string)"
        index = wValue & 0xFF
        if index == 0:
            payload = bytes([4, 3, 0x09, 0x04])  # language ids: en-US
        elif index in dev_handle.strings:
            text = dev_handle.strings[index].encode("utf-16-le")
            payload = bytes([2 + len(text), 3]) + text
        else:  # what a device does with a string it does not have: stall
            raise usb.core.USBError("Pipe error", errno=errno.EPIPE)
        n = min(len(data), len(payload))
        data[:n] = array.array("B", payload[:n])
        return n


def yubikey5(**kw: Any) -> FakeUsbDevice:
    return FakeUsbDevice(umockdev_descriptors("yubikey5"), bus=1, address=2, **kw)


def security_key(**kw: Any) -> FakeUsbDevice:
    return FakeUsbDevice(umockdev_descriptors("security-key"), bus=1, address=3, **kw)


def keyboard(**kw: Any) -> FakeUsbDevice:
    return FakeUsbDevice(umockdev_descriptors("keyboard"), bus=1, address=4, **kw)


def fake_sysfs(root: Path, name: str, **attributes: str | int) -> Path:
    directory = root / "bus/usb/devices" / name
    directory.mkdir(parents=True)
    for key, value in attributes.items():
        (directory / key).write_text(f"{value}\n")
    return root


# --- listing, with the descriptor backend --------------------------------------------------------


def test_a_yubikey_5_has_a_ccid_interface_and_strings_come_from_sysfs(tmp_path: Path) -> None:
    sysfs = fake_sysfs(
        tmp_path, "1-1", busnum=1, devnum=2, bConfigurationValue=1, product="YubiKey OTP+FIDO+CCID"
    )
    backend = DescriptorBackend(yubikey5())
    [token] = list_yubikeys(backend, sysfs=sysfs)
    assert token == UsbToken(
        bus=1,
        address=2,
        vendor_id=0x1050,
        product_id=0x0407,
        product="YubiKey OTP+FIDO+CCID",
        serial=None,
        has_ccid=True,
        interface_classes=(0x03, 0x03, 0x0B),
    )
    assert token.can_hold_totp
    assert token.describe() == (
        "YubiKey OTP+FIDO+CCID (1050:0407, OTP+FIDO+CCID) can hold a TOTP credential"
    )
    assert backend.opened == []  # everything came from descriptors and sysfs: no device node


def test_a_security_key_cannot_hold_a_totp_credential() -> None:
    backend = DescriptorBackend(security_key(strings={2: "Security Key by Yubico"}))
    [token] = list_yubikeys(backend, sysfs=None)
    assert (token.product_id, token.has_ccid, token.can_hold_totp) == (0x0120, False, False)
    assert token.interface_classes == (0x03,)
    assert token.product == "Security Key by Yubico"  # asked of the device: no sysfs here
    assert token.describe() == (
        "Security Key by Yubico (1050:0120, FIDO only: no CCID interface) "
        "cannot hold a TOTP credential"
    )


def test_a_fido_only_key_without_readable_strings_is_still_described() -> None:
    raw = bytearray(umockdev_descriptors("security-key"))
    raw[10:12] = (0x0402).to_bytes(2, "little")  # newer FIDO-only keys reuse 0402
    backend = DescriptorBackend(
        FakeUsbDevice(bytes(raw), bus=3, address=9, open_error=errno.EACCES)
    )
    [token] = list_yubikeys(backend, sysfs=None)
    assert token.product is None and token.serial is None  # permission denied: no crash
    assert token.describe() == (
        "YubiKey (1050:0402, FIDO only: no CCID interface) cannot hold a TOTP credential"
    )


def test_alternate_settings_do_not_count_as_interfaces() -> None:
    # An alternate setting 1 of the CCID interface (2), after the configuration.
    alternate = bytes([9, 4, 2, 1, 0, 0x0B, 0, 0, 0])
    backend = DescriptorBackend(
        FakeUsbDevice(umockdev_descriptors("yubikey5") + alternate, bus=1, address=2)
    )
    [token] = list_yubikeys(backend, sysfs=None)
    assert token.interface_classes == (0x03, 0x03, 0x0B)


def test_the_serial_is_read_when_the_key_shows_it(tmp_path: Path) -> None:
    raw = bytearray(umockdev_descriptors("yubikey5"))
    raw[16] = 3  # iSerialNumber
    sysfs = fake_sysfs(tmp_path, "1-1", busnum=1, devnum=2, serial="12345678")
    backend = DescriptorBackend(FakeUsbDevice(bytes(raw), bus=1, address=2, strings={2: "YubiKey"}))
    [token] = list_yubikeys(backend, sysfs=sysfs)
    assert (token.serial, token.product) == ("12345678", "YubiKey")  # sysfs, then the device
    assert "serial 12345678" in token.describe()


def test_other_vendors_are_not_listed_and_order_is_by_bus_and_address() -> None:
    backend = DescriptorBackend(keyboard(), security_key(), yubikey5())
    tokens = list_yubikeys(backend, sysfs=None)
    assert [(t.bus, t.address, t.product_id) for t in tokens] == [(1, 2, 0x0407), (1, 3, 0x0120)]


def test_without_libusb_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (usb.backend.libusb1, usb.backend.openusb, usb.backend.libusb0):
        monkeypatch.setattr(module, "get_backend", lambda *a, **k: None)
    with pytest.raises(UsbUnavailable) as caught:
        list_yubikeys()
    assert isinstance(caught.value, TokenError)
    assert "libusb-1.0-0" in caught.value.one_line()
    assert isinstance(caught.value.__cause__, usb.core.NoBackendError)


# --- uevent messages ----------------------------------------------------------------------------


def kernel_message(action: str, devpath: str, **props: str) -> bytes:
    fields = {"ACTION": action, "DEVPATH": devpath, "SUBSYSTEM": "usb", **props}
    return f"{action}@{devpath}\0".encode() + b"".join(
        f"{k}={v}\0".encode() for k, v in fields.items()
    )


def libudev_message(action: str, devpath: str, **props: str) -> bytes:
    fields = {"ACTION": action, "DEVPATH": devpath, "SUBSYSTEM": "usb", **props}
    body = b"".join(f"{k}={v}\0".encode() for k, v in fields.items())
    header = struct.pack("!8sI", b"libudev\0", 0xFEEDCAFE) + struct.pack("=III", 40, 40, len(body))
    return header + bytes(16) + body  # the filter hashes and bloom: unused here


def test_kernel_uevents_are_parsed() -> None:
    event = parse_uevent(
        kernel_message("add", f"{HUB}/1-1", DEVTYPE="usb_device", PRODUCT="1050/407/543")
    )
    assert event is not None
    assert (event.action, event.devpath) == ("add", f"{HUB}/1-1")
    assert event.properties["PRODUCT"] == "1050/407/543"


def test_libudev_messages_are_parsed() -> None:
    event = parse_uevent(libudev_message("remove", f"{HUB}/1-2", DEVTYPE="usb_device"))
    assert event is not None
    assert (event.action, event.devpath, event.properties["DEVTYPE"]) == (
        "remove",
        f"{HUB}/1-2",
        "usb_device",
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"libudev\0short",
        libudev_message("add", "/x").replace(b"\xfe\xed\xca\xfe", b"\0\0\0\0"),  # wrong magic
        b"libudev\0"
        + b"\xfe\xed\xca\xfe"
        + struct.pack("=III", 40, 4000, 10)
        + bytes(16),  # out of bounds
        b"no at sign here\0ACTION=add\0DEVPATH=/x\0",
        b"add@/devices/x\0SUBSYSTEM=usb\0",  # no ACTION/DEVPATH
    ],
)
def test_anything_else_is_not_an_event(data: bytes) -> None:
    assert parse_uevent(data) is None


# --- the watcher on the real kernel socket ------------------------------------------------------


def test_the_watcher_starts_and_stops_promptly_on_the_kernel_socket() -> None:
    watcher = UsbWatcher(lambda *event: None, source=UeventSource.KERNEL)
    assert watcher.start(), "no NETLINK_KOBJECT_UEVENT socket here"
    assert watcher.running
    time.sleep(0.05)  # the thread is blocked in poll() by now
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 0.5
    assert not watcher.running
    watcher.stop()  # twice is harmless


def test_no_netlink_is_a_warning_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> socket.socket:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("provisioner.adapters.usb.socket.socket", refuse)
    watcher = UsbWatcher(lambda *event: None)
    with caplog.at_level(logging.WARNING, logger="provisioner.usb"):
        assert watcher.start() is False
    assert not watcher.running
    assert "USB hotplug not watched" in caplog.text
    watcher.stop()


# --- umockdev: the real libusb, emulated sysfs and uevents ---------------------------------------


def umockdev_tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install the Debian package umockdev"
    return path


def device_args(*names: str) -> list[str]:
    args = []
    for name in names:
        args += ["-d", str(DATA / f"{name}.umockdev")]
    return args


LIST_CHILD = """
import dataclasses, json
from provisioner.adapters.usb import list_yubikeys
print(json.dumps([dict(dataclasses.asdict(t), describe=t.describe()) for t in list_yubikeys()]))
"""


def child_env(tmp_path: Path) -> dict[str, str]:
    # umockdev's testbed directory goes here: pytest removes it even if the child crashed.
    return {**os.environ, "TMPDIR": str(tmp_path)}


@pytest.mark.slow
def test_umockdev_yubikeys_are_listed_by_libusb(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            umockdev_tool("umockdev-run"),
            *device_args("usb-root-hub", "yubikey5", "security-key", "keyboard"),
            "--",
            sys.executable,
            "-c",
            LIST_CHILD,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    tokens = {t["product_id"]: t for t in json.loads(result.stdout)}
    assert sorted(tokens) == [0x0120, 0x0407]  # the keyboard and the root hub are not listed
    key5 = tokens[0x0407]
    assert (key5["bus"], key5["address"], key5["has_ccid"]) == (1, 2, True)
    assert key5["interface_classes"] == [3, 3, 0x0B]
    assert key5["product"] == "YubiKey OTP+FIDO+CCID"  # from the emulated sysfs
    sk = tokens[0x0120]
    assert (sk["address"], sk["has_ccid"], sk["interface_classes"]) == (3, False, [3])
    assert sk["describe"] == (
        "Security Key by Yubico (1050:0120, FIDO only: no CCID interface) "
        "cannot hold a TOTP credential"
    )


@pytest.mark.slow
def test_umockdev_without_yubikeys_nothing_is_listed(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            umockdev_tool("umockdev-run"),
            *device_args("usb-root-hub", "keyboard"),
            "--",
            sys.executable,
            "-c",
            LIST_CHILD,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


HOTPLUG_CHILD = """
import json, queue, sys, time
sys.path.append(GI_PATH)  # Debian's python3-gi, appended: the venv's packages come first
import gi
gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev

# Never call UMockdev.in_mock_environment() before the testbed exists: it caches its answer.
testbed = UMockdev.Testbed.new()

from provisioner.adapters.usb import UsbWatcher

def load(name):
    # add_from_string also sends the device's "add" uevent.
    with open(f"{DATA}/{name}.umockdev") as f:
        testbed.add_from_string(f.read())

def unplug(syspath):
    testbed.uevent(syspath, "remove")  # remove_device alone sends nothing
    testbed.remove_device(syspath)

events = queue.Queue()
log = []

def next_event():
    event = events.get(timeout=5)
    log.append(event)
    return event

load("usb-root-hub")
load("security-key")  # plugged in before the watcher starts
watcher = UsbWatcher(lambda *event: events.put(list(event)))
assert watcher.start()
load("yubikey5")
next_event()
load("keyboard")  # not a YubiKey: no event
# Another vendor whose uevent does not say PRODUCT= either: sysfs says it is not a YubiKey.
testbed.add_device("usb", "1-5", HUB, ["idVendor", "04d9", "idProduct", "1603"],
                   ["DEVTYPE", "usb_device"])
# A YubiKey whose uevent does not say PRODUCT=: the watcher reads idVendor from sysfs.
testbed.add_device("usb", "1-4", HUB, ["idVendor", "1050", "idProduct", "0406"],
                   ["DEVTYPE", "usb_device"])
next_event()
unplug(HUB + "/1-1")
next_event()
unplug(HUB + "/1-4")  # its remove says nothing either: remembered from its add
next_event()
unplug(HUB + "/1-3")  # the keyboard: no event
unplug(HUB + "/1-5")  # nothing says what it was, and it was not seen added: no event
unplug(HUB + "/1-2")  # the one present at start
next_event()
started = time.monotonic()
watcher.stop()
print(json.dumps({"events": log, "stop_seconds": time.monotonic() - started,
                  "left": events.qsize()}))
"""


def system_gi_path() -> str:
    """Where Debian's python3-gi lives; the venv is not a system-site-packages one."""
    probe = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import sys, os, gi; print(sys.version_info[:2] == tuple(map(int, sys.argv[1].split('.'))));"
            "print(os.path.dirname(os.path.dirname(gi.__file__)))",
            f"{sys.version_info.major}.{sys.version_info.minor}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0, (
        "umockdev's GObject bindings are missing: install the Debian packages python3-gi and "
        f"gir1.2-umockdev-1.0 ({probe.stderr.strip()})"
    )
    same_version, path = probe.stdout.split()
    assert same_version == "True", "/usr/bin/python3 and the venv's python differ in version"
    return path


@pytest.mark.slow
def test_umockdev_hotplug_reaches_the_watcher(tmp_path: Path) -> None:
    code = (
        HOTPLUG_CHILD.replace("GI_PATH", repr(system_gi_path()))
        .replace("{DATA}", str(DATA))
        .replace("HUB", repr(f"/sys{HUB}"))
    )
    result = subprocess.run(
        [umockdev_tool("umockdev-wrapper"), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["events"] == [
        ["add", f"{HUB}/1-1", 0x0407],
        ["add", f"{HUB}/1-4", 0x0406],
        ["remove", f"{HUB}/1-1", 0x0407],
        ["remove", f"{HUB}/1-4", 0x0406],
        ["remove", f"{HUB}/1-2", 0x0120],
    ]
    assert report["left"] == 0  # nothing for the keyboards
    assert report["stop_seconds"] < 0.5


def test_a_failing_handler_does_not_end_the_watch(caplog: pytest.LogCaptureFixture) -> None:
    # Driven through a socketpair standing in for a uevent socket handed over (start(sock)).
    calls: list[tuple[str, str, int | None]] = []
    done = threading.Event()

    def handler(action: str, devpath: str, product_id: int | None) -> None:
        calls.append((action, devpath, product_id))
        if len(calls) == 1:
            raise RuntimeError("handler bug")
        done.set()

    watcher = UsbWatcher(handler, source=UeventSource.UDEV)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    assert watcher.start(ours)
    try:
        with caplog.at_level(logging.ERROR, logger="provisioner.usb"):
            for n in (1, 2):
                theirs.send(
                    libudev_message(
                        "add", f"{HUB}/1-{n}", DEVTYPE="usb_device", PRODUCT="1050/407/543"
                    )
                )
            assert done.wait(5)
    finally:
        watcher.stop()
        theirs.close()
    assert [c[1] for c in calls] == [f"{HUB}/1-1", f"{HUB}/1-2"]
    assert "USB event handler failed" in caplog.text
