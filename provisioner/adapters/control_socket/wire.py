"""One JSON object per line, both ways: framing, parsing, limits."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from provisioner.core.errors import (
    InvalidInput,
)

log = logging.getLogger("provisioner.control")  # the journal's name for it, kept across moves

MAX_LINE = 64 * 1024
Message = dict[str, Any]
#: Checks a request off the wire (raises InvalidInput) before the handler sees it; the daemon
#: owns the table of ops, so the socket knows only JSON lines.
Validator = Callable[[dict[str, Any]], Message]


class Idle(Exception):
    """The client sent no complete request line in time."""


def say(conn: socket.socket, message: Message) -> None:
    """One line if it fits in the socket's buffer now; never blocks, never raises."""
    with contextlib.suppress(OSError):
        conn.send(encode(message), socket.MSG_DONTWAIT)


def say_and_close(conn: socket.socket, message: Message) -> None:
    with conn:
        say(conn, message)


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def send(conn: socket.socket, message: Message) -> None:
    conn.sendall(encode(message))


def lines(conn: socket.socket, idle_timeout: float, validate: Validator) -> Iterator[Message | str]:
    """Requests from the client: a valid request, or a str saying what was wrong with a
    line. Each line must be complete within ``idle_timeout`` of connecting or of the last
    answer, else Idle: a client trickling bytes is as idle as a silent one."""
    buffer = b""
    deadline = time.monotonic() + idle_timeout

    def recv() -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Idle
        conn.settimeout(remaining)
        try:
            return conn.recv(65536)
        except TimeoutError:
            raise Idle from None

    while True:
        chunk = recv()
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield parse(line, validate)
            deadline = time.monotonic() + idle_timeout
        if len(buffer) > MAX_LINE:
            yield f"request line longer than {MAX_LINE} bytes"
            deadline = time.monotonic() + idle_timeout
            # Skip to the end of this oversized line.
            while b"\n" not in buffer:
                chunk = recv()
                if not chunk:
                    return
                buffer = chunk[-MAX_LINE:] if b"\n" not in chunk else chunk
            buffer = buffer.split(b"\n", 1)[1]


def parse(line: bytes, validate: Validator) -> Message | str:
    if len(line) > MAX_LINE:
        return f"request line longer than {MAX_LINE} bytes"
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "request is not a JSON line"
    if not isinstance(value, dict):
        return "request must be a JSON object"
    try:
        return validate(value)
    except InvalidInput as e:
        return e.one_line()
