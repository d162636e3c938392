"""The daemon's control socket: one JSON object per line, both ways.

A request is ``{"op": "enroll", "user": "alice"}``; the daemon answers with one or more
lines, the last of which has ``"final": true``. Who may ask is decided by the peer's
credentials (SO_PEERCRED), not by file modes: root, the daemon's own user, and members of
the operators' group (``may_use_desk``); anyone else gets one clear refusal line and is
disconnected. Malformed input (not JSON, not an object, a line over the size limit, a
request its op does not take: the daemon's requests.py) gets an error line and the connection
stays usable; the daemon never dies of a client.

The socket never costs the desk more than it can give: at most ``max_clients`` are served
at once (one more hears "too many clients" and is closed), a client that sends no request
line for ``idle_timeout`` seconds is closed (one following an enrollment or watching is
being sent events, so it is not idle), and when accept() fails (EMFILE, ENFILE) the loop
logs it, backs off and keeps going. Only a stale socket at the path is replaced: a live
one (another daemon's) or anything that is not a socket is refused, and on the way out
the path is removed only if it is still the socket this server bound.
"""

from provisioner.adapters.control_socket.client import (
    CONNECT_TIMEOUT,
    ControlClient,
    daemon_reachable,
    socket_answers,
)
from provisioner.adapters.control_socket.peers import Authorizer, Peer, may_use_desk, peer_of
from provisioner.adapters.control_socket.server import (
    DEAF_AFTER,
    IDLE_TIMEOUT,
    MAX_CLIENTS,
    ControlServer,
)
from provisioner.adapters.control_socket.wire import MAX_LINE, Message

__all__ = [
    "CONNECT_TIMEOUT",
    "DEAF_AFTER",
    "IDLE_TIMEOUT",
    "MAX_CLIENTS",
    "MAX_LINE",
    "Authorizer",
    "ControlClient",
    "ControlServer",
    "Message",
    "Peer",
    "daemon_reachable",
    "may_use_desk",
    "peer_of",
    "socket_answers",
]
