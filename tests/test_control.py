"""The control socket without the daemon: who may use it (a pure rule), what may sit at its
path, a live peer's socket left alone, a cap on clients, idle clients closed, EMFILE
survived, bad requests refused at the boundary, and the CLI's one-line errors. Real Unix
sockets, real threads and processes; no pcscd, no root needed."""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from desk_harness import wait_for
from provisioner.adapters.control_socket import (
    Authorizer,
    ControlClient,
    ControlServer,
    Message,
    Peer,
    daemon_reachable,
    may_use_desk,
)
from provisioner.adapters.sqlite_store import Store
from provisioner.cli.main import main
from provisioner.config import Config, DaemonConfig
from provisioner.core.errors import ConfigError, DaemonUnresponsive
from provisioner.daemon.requests import valid_request
from provisioner.daemon.service import DeskService
from provisioner.desk import Desk

SERVICE_UID = 990
OPERATORS_GID = 991

# --- who may use the desk: the rule as a pure function (issue 10.19) -----------------------


@pytest.mark.parametrize(
    ("uid", "gid", "groups", "allowed"),
    [
        (0, 0, (), True),  # root
        (0, 12345, (), True),  # root, whatever its group
        (SERVICE_UID, SERVICE_UID, (), True),  # the service's own user
        (1000, 1000, (100, OPERATORS_GID), True),  # an operator (supplementary group)
        (1000, OPERATORS_GID, (), True),  # an operator (primary group)
        (1000, 1000, (100, 27), False),  # a non-member
        (1000, 1000, (), False),
        (65534, 65534, (65534,), False),  # nobody
        (SERVICE_UID + 1, SERVICE_UID, (), False),  # the service's group is not its user
    ],
)
def test_the_authorization_rule(uid: int, gid: int, groups: tuple[int, ...], allowed: bool) -> None:
    assert (
        may_use_desk(
            uid, gid, frozenset(groups), service_uid=SERVICE_UID, operators_gid=OPERATORS_GID
        )
        is allowed
    )


@pytest.mark.parametrize(("uid", "allowed"), [(0, True), (SERVICE_UID, True), (1000, False)])
def test_without_an_operators_group_only_root_and_the_service_may(uid: int, allowed: bool) -> None:
    rule = {"service_uid": SERVICE_UID, "operators_gid": None}
    assert may_use_desk(uid, uid, frozenset({uid, 100}), **rule) is allowed  # type: ignore[arg-type]


def test_the_authorizer_applies_the_rule_to_the_peer_and_names_the_refused() -> None:
    group = grp.getgrgid(os.getgid())
    authorizer = Authorizer(group.gr_name, service_uid=SERVICE_UID)
    member = Peer(pid=1, uid=4242, gid=4242, groups=frozenset({4242, group.gr_gid}))
    stranger = Peer(pid=1, uid=4242, gid=4242, groups=frozenset({4242}))
    assert authorizer.refusal(Peer(pid=1, uid=0, gid=0)) is None
    assert authorizer.refusal(Peer(pid=1, uid=SERVICE_UID, gid=SERVICE_UID)) is None
    assert authorizer.refusal(member) is None
    refusal = authorizer.refusal(stranger)
    assert refusal is not None
    assert refusal.startswith("not authorized: ") and "(uid 4242)" in refusal
    assert f"operators' group {group.gr_name}" in refusal


def test_an_operators_group_that_does_not_exist_lets_only_root_and_the_service_in() -> None:
    authorizer = Authorizer("no-such-group-here", service_uid=SERVICE_UID)
    assert authorizer.refusal(Peer(pid=1, uid=SERVICE_UID, gid=1)) is None
    assert authorizer.refusal(Peer(pid=1, uid=1000, gid=1000, groups=frozenset({1000}))) is not None


# --- a server in this process ------------------------------------------------------------


def _authorizer() -> Authorizer:
    return Authorizer(grp.getgrgid(os.getgid()).gr_name)


class Recorder:
    """A handler that answers each request with one final line and remembers it."""

    def __init__(self) -> None:
        self.seen: list[Message] = []

    def __call__(self, request: Message, peer: Peer) -> Iterator[Message]:
        self.seen.append(request)
        if request["op"] == "watch":  # like a follower: events for a while, then an end
            for n in range(8):
                time.sleep(0.1)
                yield {"event": "heartbeat", "n": n}
        yield {"ok": True, "final": True, "op": request["op"]}


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "control.sock"


@pytest.fixture
def server(sock_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(sock_path, _authorizer(), Recorder(), valid_request)
    srv.start()
    yield srv
    srv.close()


def _connect(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def _exchange(s: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    s.sendall(json.dumps(request).encode() + b"\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, "the server closed the connection without an answer"
        line += chunk
    answer: dict[str, Any] = json.loads(line)
    return answer


def _answered(path: Path) -> bool:
    with ControlClient(path, timeout=10) as client:
        return client.call({"op": "status"}).get("ok") is True


# --- what may sit at the socket's path (issue 10.12) ---------------------------------------


def test_a_regular_file_at_the_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me\n")
    with pytest.raises(ConfigError) as info:
        ControlServer(path, _authorizer(), Recorder(), valid_request)
    assert "is a regular file, not a socket" in info.value.one_line()
    assert path.read_text() == "keep me\n"


@pytest.mark.parametrize("kind", ["directory", "symbolic link", "named pipe"])
def test_anything_else_that_is_not_a_socket_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing"
    if kind == "directory":
        path.mkdir()
    elif kind == "symbolic link":
        path.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(path)
    with pytest.raises(ConfigError) as info:
        ControlServer(path, _authorizer(), Recorder(), valid_request)
    assert f"is a {kind}, not a socket" in info.value.one_line()
    assert os.path.lexists(path)


def test_a_socket_path_under_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as info:
        ControlServer(tmp_path / "file" / "control.sock", _authorizer(), Recorder(), valid_request)
    assert "control.sock" in info.value.one_line()


def test_a_stale_socket_is_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # nobody listens: connect is refused
    srv = ControlServer(sock_path, _authorizer(), Recorder(), valid_request)
    srv.start()
    try:
        assert _answered(sock_path)
    finally:
        srv.close()
    assert not os.path.lexists(sock_path)


# --- a live peer's socket is never taken (issue 10.1, the socket's half) --------------------


def test_a_live_servers_socket_is_refused_naming_its_pid(
    server: ControlServer, sock_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        ControlServer(sock_path, _authorizer(), Recorder(), valid_request)
    assert f"pid {os.getpid()}" in info.value.one_line()
    assert "\n" not in info.value.one_line()
    assert _answered(sock_path)  # still the first server's


def test_close_leaves_a_socket_that_is_no_longer_its_own(
    server: ControlServer, sock_path: Path
) -> None:
    # Someone (an older daemon, an operator) put another socket at the path.
    sock_path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock_path))
    other.listen(1)
    try:
        server.close()
        assert sock_path.exists(), "close() removed a socket it did not bind"
        probe = _connect(sock_path)
        probe.close()
    finally:
        other.close()


def test_close_removes_its_own_socket(sock_path: Path) -> None:
    srv = ControlServer(sock_path, _authorizer(), Recorder(), valid_request)
    srv.start()
    srv.close()
    assert not os.path.lexists(sock_path)


def test_alive_only_while_its_socket_is_reachable(server: ControlServer, sock_path: Path) -> None:
    assert server.alive and server.trouble() is None
    sock_path.unlink()  # nobody can reach the daemon any more
    assert not server.alive
    assert "control socket" in (server.trouble() or "")


# --- bad requests stop at the boundary (issue 10.15) ---------------------------------------


def test_bad_requests_never_reach_the_handler(sock_path: Path) -> None:
    recorder = Recorder()
    srv = ControlServer(sock_path, _authorizer(), recorder, valid_request)
    srv.start()
    try:
        with _connect(sock_path) as s:
            for bad in (
                {"op": "enroll", "user": "a", "serial": True},
                {"op": "enroll", "user": "a", "serial": -5},
                {"op": "enroll", "user": "a", "serial": 10**30},
                {"op": "cancel", "id": "3"},
                {"op": "frobnicate"},
                {"op": "status", "extra": 1},
            ):
                answer = _exchange(s, bad)
                assert answer["ok"] is False and answer["final"] is True
                assert answer["exit"] == 2 and "\n" not in answer["error"]
            good = _exchange(s, {"op": "enroll", "user": "alice", "serial": 12345678})
            assert good["ok"] is True  # the connection stays usable
    finally:
        srv.close()
    assert recorder.seen == [{"op": "enroll", "user": "alice", "serial": 12345678}]


@pytest.fixture
def desk_service(tmp_path: Path, sock_path: Path) -> Iterator[tuple[Path, Store]]:
    """A real DeskService on a real store behind a real ControlServer; a config naming it."""
    store = Store(tmp_path / "provisioner.db")
    service = DeskService(
        Desk.from_config(Config()),
        store,
        open_token=lambda reader: pytest.fail("no token is opened here"),  # type: ignore[arg-type,return-value]
        is_yubikey_reader=lambda reader: False,
    )
    srv = ControlServer(
        sock_path,
        _authorizer(),
        lambda request, peer: service.handle(request, peer.name),
        valid_request,
    )
    srv.start()
    config = tmp_path / "provisioner.toml"
    config.write_text(f'[daemon]\nsocket = "{sock_path}"\n')
    try:
        yield config, store
    finally:
        srv.close()
        service.stop(1)
        store.close()


@pytest.mark.parametrize("serial", ["-5", "99999999999999999999", "4294967296"])
def test_the_cli_prints_a_refused_request_as_one_line_exit_2(
    desk_service: tuple[Path, Store], serial: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config, store = desk_service
    # The CLI itself refuses it while reading the command line (issue 10.13), before the
    # socket is reached; the socket's own check is test_bad_requests_never_reach_the_handler.
    with pytest.raises(SystemExit) as exited:
        main(["queue", "--user", "erin", "--serial", serial, "--config", str(config)])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.startswith("provisioner queue: argument --serial: ") and err.count("\n") == 1
    assert "internal error" not in err
    assert store.waiting() == []


# --- too many clients, idle clients, EMFILE (issue 10.3) -----------------------------------


def test_a_client_over_the_cap_gets_one_line_and_is_closed(sock_path: Path) -> None:
    srv = ControlServer(sock_path, _authorizer(), Recorder(), valid_request, max_clients=2)
    srv.start()
    held = [_connect(sock_path) for _ in range(2)]
    try:
        for s in held:  # answered: each holds one of the two places
            assert _exchange(s, {"op": "status"})["ok"] is True
        with _connect(sock_path) as extra:
            line = extra.makefile("rb").readline()
            answer = json.loads(line)
            assert answer["ok"] is False and answer["final"] is True
            assert "too many clients" in answer["error"] and answer["exit"] == 1
            assert extra.recv(1) == b""  # closed
        held.pop().close()
        wait_for(lambda: srv.clients < 2, what="the server to see the client leave")
        assert _answered(sock_path)
    finally:
        for s in held:
            s.close()
        srv.close()


def test_an_idle_client_is_closed(sock_path: Path) -> None:
    srv = ControlServer(sock_path, _authorizer(), Recorder(), valid_request, idle_timeout=0.3)
    srv.start()
    try:
        with _connect(sock_path) as s:
            assert _exchange(s, {"op": "status"})["ok"] is True
            rest = s.makefile("rb").read()  # blocks until the server closes
            assert b"idle" in rest
        wait_for(lambda: srv.clients == 0, what="the idle client's place freed")
        # a client trickling a request one byte at a time is idle too
        with _connect(sock_path) as s:
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for byte in b'{"op": "status"}' * 100:
                    s.sendall(bytes([byte]))
                    time.sleep(0.05)
    finally:
        srv.close()


def test_a_client_following_events_is_not_idle(sock_path: Path) -> None:
    srv = ControlServer(sock_path, _authorizer(), Recorder(), valid_request, idle_timeout=0.2)
    srv.start()
    try:
        with ControlClient(sock_path, timeout=10) as client:
            answers = list(client.request({"op": "watch"}, timeout=10))
        assert [a.get("n") for a in answers[:-1]] == list(range(8))
        assert answers[-1]["ok"] is True
    finally:
        srv.close()


SERVER_WITH_FEW_DESCRIPTORS = textwrap.dedent(
    """
    import grp, logging, os, resource, sys
    from pathlib import Path
    from provisioner.adapters.control_socket import Authorizer, ControlServer
    from provisioner.daemon.requests import valid_request

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

    def handler(request, peer):
        yield {"ok": True, "final": True}

    group = grp.getgrgid(os.getgid()).gr_name
    server = ControlServer(Path(sys.argv[1]), Authorizer(group), handler, valid_request)
    server.start()
    in_use = len(os.listdir("/proc/self/fd"))
    # a few descriptors to spare: a handful of clients exhaust them (EMFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 6, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print("ready", flush=True)
    sys.stdin.read()
    server.close()
    """
)


def test_the_accept_loop_survives_emfile_and_answers_again(sock_path: Path) -> None:
    sock_path.parent.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_WITH_FEW_DESCRIPTORS, str(sock_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    try:
        assert proc.stdout.readline() == "ready\n"
        idle = [_connect(sock_path) for _ in range(40)]  # more than it has descriptors
        wait_for(lambda: any("cannot accept" in line for line in log), what="the EMFILE logged")
        late = _connect(sock_path, timeout=30)  # waits in the backlog
        late.sendall(b'{"op": "status"}\n')
        for s in idle:
            s.close()
        answer = json.loads(late.makefile("rb").readline())
        assert answer["ok"] is True
        late.close()
        assert _answered(sock_path)
    finally:
        proc.stdin.close()
        proc.wait(30)
    text = "".join(log)
    assert "Traceback" not in text, text
    assert "Too many open files" in text
    # rate-limited: one line for the whole episode, however many accept() calls failed
    assert sum("cannot accept" in line for line in log) < 5, text
    assert any("accepting again" in line for line in log), text


# --- the client side: timeouts become one line (issue 10.3) ---------------------------------


def test_a_daemon_that_never_answers_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(1)  # accepts (in the kernel), never answers
    try:
        with ControlClient(path, timeout=0.2) as client, pytest.raises(DaemonUnresponsive) as info:
            client.call({"op": "status"}, timeout=0.2)
        assert "did not answer" in info.value.one_line()
    finally:
        mute.close()


def test_a_full_backlog_is_a_one_line_error_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "full.sock"
    full = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    full.bind(str(path))
    full.listen(0)
    waiting = []
    try:
        while True:  # fill the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            waiting.append(s)
        with pytest.raises(DaemonUnresponsive):
            ControlClient(path, timeout=1, connect_timeout=0.3)
        # busy is not absent: enroll must not fall back to opening the token itself
        assert daemon_reachable(path)
    finally:
        for s in waiting:
            s.close()
        full.close()


@pytest.mark.slow
def test_the_cli_turns_a_timeout_into_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(8)
    config = tmp_path / "provisioner.toml"
    config.write_text(f'[daemon]\nsocket = "{path}"\n')
    try:
        code = main(["status", "--config", str(config)])
    finally:
        mute.close()
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("provisioner: the desk daemon did not answer") and err.count("\n") == 1


def test_the_cli_turns_a_daemon_hanging_up_into_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rude.sock"
    rude = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rude.bind(str(path))
    rude.listen(8)

    def hang_up() -> None:  # every connection closed at once, unanswered
        while True:
            try:
                conn, _ = rude.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    config = tmp_path / "provisioner.toml"
    config.write_text(f'[daemon]\nsocket = "{path}"\n')
    try:
        code = main(["queue", "--config", str(config)])
    finally:
        rude.shutdown(socket.SHUT_RDWR)
        rude.close()
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("provisioner: lost the desk daemon") and err.count("\n") == 1


# --- configuration ------------------------------------------------------------------------


def test_the_cap_and_the_idle_timeout_are_configured() -> None:
    from provisioner.config import parse

    daemon = parse("[daemon]\nmax_clients = 8\nclient_idle_timeout = 5\n", "t.toml").daemon
    assert (daemon.max_clients, daemon.client_idle_timeout) == (8, 5.0)
    assert (DaemonConfig().max_clients, DaemonConfig().client_idle_timeout) == (64, 30.0)
    for bad in ("max_clients = 0", "client_idle_timeout = 0", "client_idle_timeout = inf"):
        with pytest.raises(ConfigError) as info:
            parse(f"[daemon]\n{bad}\n", "t.toml")
        assert bad.split()[0] in info.value.one_line()
