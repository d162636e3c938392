"""Run the strict local IAM stand-in: moto's server app in its own process.

``python -m local_iam_server [--host 127.0.0.1] [--port 0] [--tls-dir DIR] [--verbose]``

With ``--tls-dir`` it serves HTTPS with a certificate from a CA of its own, written to
``DIR/ca.pem`` (for ``AWS_CA_BUNDLE``), and the URL it prints is ``https://``.

Exactly one line goes to stdout, ``local-iam listening on URL``, once the socket accepts
connections; after that stdout is pointed at stderr, so that nothing moto prints can
fill a pipe the parent no longer reads. SIGTERM and SIGINT stop it with status 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from provisioner.adapters.signals import SignalPipe

LISTENING_PREFIX = "local-iam listening on "

_log = logging.getLogger("local_iam_server")


def _check_host(host: str, allow_non_loopback: bool) -> None:
    """Refuse to expose dummy IAM on a network unless explicitly asked."""
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise SystemExit(f"local-iam: --host must be an IP address, not {host!r}") from None
    if not address.is_loopback and not allow_non_loopback:
        raise SystemExit(
            f"local-iam: refusing to bind {host}: not a loopback address "
            "(pass --allow-non-loopback if you really mean it)"
        )


def _url(host: str | bytes | bytearray, port: int, scheme: str = "http") -> str:
    name = bytes(host).decode() if isinstance(host, bytes | bytearray) else host
    shown = f"[{name}]" if ":" in name else name
    return f"{scheme}://{shown}:{port}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m local_iam_server",
        description="Strict local IAM/STS stand-in (moto, patched) for tests and the demo.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument(
        "--allow-non-loopback",
        action="store_true",
        help="allow binding a non-loopback address (dummy credentials, no auth!)",
    )
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        help="serve HTTPS; write its own CA to TLS_DIR/ca.pem (for AWS_CA_BUNDLE)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log requests and attempts to stderr"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; return the exit status."""
    args = _parse_args(argv)
    _check_host(args.host, args.allow_non_loopback)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format="local-iam %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    # moto is imported only now: a refused --host fails fast, before loading it.
    from werkzeug.serving import make_server

    from local_iam_server.control import ControlState
    from local_iam_server.moto_app import build_app, handler_class

    state = ControlState.fresh()
    app = build_app(state)
    ssl_context = None
    if args.tls_dir is not None:
        from local_iam_server.tls import server_context

        ssl_context = server_context(args.tls_dir, args.host)
    try:
        server = make_server(
            args.host,
            args.port,
            app,
            threaded=True,
            request_handler=handler_class(state.clock, args.verbose),
            ssl_context=ssl_context,
        )
    except OSError as error:
        raise SystemExit(f"local-iam: cannot listen on {args.host}:{args.port}: {error}") from None
    signals = SignalPipe((signal.SIGTERM, signal.SIGINT))

    serving = threading.Thread(
        # A short poll interval keeps shutdown (and so SIGTERM) quick.
        target=server.serve_forever,
        kwargs={"poll_interval": 0.1},
        name="local-iam",
        daemon=True,
    )
    serving.start()
    print(
        LISTENING_PREFIX
        + _url(*server.server_address[:2], scheme="https" if ssl_context else "http"),
        flush=True,
    )
    # From now on fd 1 is stderr: a parent that read the line may stop reading stdout.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _log.info("serving; SIGTERM or SIGINT stops")
    while not signals.wait(None):
        pass
    server.shutdown()
    server.server_close()
    serving.join(timeout=5.0)
    return 0
